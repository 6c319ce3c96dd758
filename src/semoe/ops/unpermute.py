"""Weighted un-permutation: ``out[index[n]] += weight[n] * y[n]``, the combine step of an MoE layer.

Legend: N expert-output rows, T tokens, D hidden, B rows of a block.

Rows are processed in blocks of ~1 MiB: the weighted rows of a block are formed in one small reused
buffer and added into ``out`` while still in cache (instead of an ``[N, D]`` temporary per call, which
costs a fresh page-faulted allocation whenever glibc has just returned the memory to the kernel); the
backward gathers the output gradient straight into the input gradient and computes the weight gradient
block by block from it before scaling it in place.
"""

from __future__ import annotations

import torch

_BLOCK_BYTES = 1 << 20


def _block_rows(t: torch.Tensor) -> int:
    return max(1, _BLOCK_BYTES // max(1, t.shape[1] * t.element_size()))


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, index_N: torch.Tensor, weight_N: torch.Tensor,
                num_rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_ND, index_N, weight_N)
        dtype = torch.promote_types(y_ND.dtype, weight_N.dtype)  # bf16 expert rows combine in float32
        out_TD = y_ND.new_zeros((num_rows, y_ND.shape[1]), dtype=dtype)
        N, B = y_ND.shape[0], _block_rows(y_ND)
        w_N1 = weight_N.to(dtype).unsqueeze(1)
        tmp_BD = out_TD.new_empty((min(B, N), y_ND.shape[1]))
        for s in range(0, N, B):
            e = min(s + B, N)
            out_TD.index_add_(0, index_N[s:e], torch.mul(y_ND[s:e], w_N1[s:e], out=tmp_BD[:e - s]))
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):  # type: ignore[override]
        y_ND, index_N, weight_N = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_y or need_w):
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, no out= buffers
            g_ND = grad_TD.index_select(0, index_N)
            grad_y = g_ND * weight_N.to(g_ND.dtype).unsqueeze(1) if need_y else None
            grad_w = (g_ND * y_ND).sum(1).to(weight_N.dtype) if need_w else None
            return grad_y, None, grad_w, None
        grad_TD = grad_TD.contiguous()
        N, D, B = y_ND.shape[0], y_ND.shape[1], _block_rows(y_ND)
        g_ND = grad_TD.new_empty((N, D))  # gathered output gradient, scaled in place into grad_y
        w_N1 = weight_N.to(g_ND.dtype).unsqueeze(1)
        grad_w = torch.empty(N, dtype=g_ND.dtype, device=g_ND.device) if need_w else None
        tmp_BD = g_ND.new_empty((min(B, N), D)) if need_w else None
        for s in range(0, N, B):
            e = min(s + B, N)
            g = torch.index_select(grad_TD, 0, index_N[s:e], out=g_ND[s:e])
            if grad_w is not None:
                torch.sum(torch.mul(g, y_ND[s:e], out=tmp_BD[:e - s]), 1, out=grad_w[s:e])
            if need_y:
                g.mul_(w_N1[s:e])
        return (g_ND if need_y else None), None, (grad_w.to(weight_N.dtype) if need_w else None), None


def unpermute(y_ND: torch.Tensor, index_N: torch.Tensor, weight_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum ``weight_N[n] * y_ND[n]`` into row ``index_N[n]`` of a ``[num_rows, D]`` zero tensor, in the
    promoted dtype of the two (bfloat16 expert outputs with float32 router weights sum in float32)."""
    return _Unpermute.apply(y_ND, index_N, weight_N, num_rows)
