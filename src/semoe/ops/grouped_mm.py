"""Grouped matmul over rows sorted by group: ``out[rows of g] = x[rows of g] @ w[g]``.

Legend: N rows (sorted by expert), G groups (local experts), K in features, M out features.
``torch._grouped_mm`` runs where the build has it (CPU float32 in torch 2.13, CUDA bf16 on Hopper);
elsewhere, and as the reference tests compare against, a per-group loop.
"""

from __future__ import annotations

import torch


def grouped_mm_loop(x_NK: torch.Tensor, w_GKM: torch.Tensor, counts_G: list[int]) -> torch.Tensor:
    """Reference: one ``mm`` per group. ``counts_G`` are the group sizes (sum = N)."""
    outs = [xg @ w_GKM[g] for g, xg in enumerate(torch.split(x_NK, counts_G, dim=0))]
    if not outs:
        return x_NK.new_zeros((0, w_GKM.shape[-1]))
    return torch.cat(outs, dim=0)


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if (w.shape[-1] * w.element_size()) % 16 or (w.shape[-2] * w.element_size()) % 16:
        return False  # the kernel needs 16-byte aligned strides (forward and backward)
    if x.device.type == "cpu":
        return x.dtype == torch.float32 and w.dtype == torch.float32
    same_bf16 = x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    return same_bf16 and torch.cuda.get_device_capability(x.device)[0] >= 9


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense (``_grouped_mm``'s backward
    rejects stride-0 expanded gradients such as the one ``y.sum().backward()`` produces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.contiguous()


def grouped_mm(x_NK: torch.Tensor, w_GKM: torch.Tensor, counts_G: list[int],
               offsets_G: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped GEMM. ``offsets_G`` (int32 cumulative counts on x's device) saves a host->device copy
    when the caller already has it; groups may be empty."""
    if x_NK.shape[0] == 0 or not _native_ok(x_NK, w_GKM):
        return grouped_mm_loop(x_NK, w_GKM, counts_G)
    if offsets_G is None:
        offsets_G = torch.tensor(counts_G, device=x_NK.device).cumsum(0).to(torch.int32)
    out = torch._grouped_mm(x_NK, w_GKM, offs=offsets_G)
    return _ContiguousGrad.apply(out)
