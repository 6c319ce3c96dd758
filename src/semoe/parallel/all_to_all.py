"""Variable-split all-to-all with autograd (flat). Backward is the same exchange with the splits
swapped. Legend: N rows sent, M rows received."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):  # type: ignore[override]
        return _exchange(grad_MD, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _exchange(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out_MD, x_ND.contiguous(), recv_splits, send_splits, group=group)
    return out_MD


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows ``[sum(send_splits[:r]), +send_splits[r])`` to rank r of ``group``; receive
    ``recv_splits[s]`` rows from each rank s, concatenated in rank order. Differentiable."""
    return _AllToAll.apply(x_ND, list(send_splits), list(recv_splits), group)
