"""Weighted un-permutation: ``out[index[n]] += weight[n] * y[n]``, the combine step of an MoE layer.

Legend: N expert-output rows, T tokens, D hidden.
"""

from __future__ import annotations

import torch


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, index_N: torch.Tensor, weight_N: torch.Tensor,
                num_rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_ND, index_N, weight_N)
        out_TD = y_ND.new_zeros((num_rows, y_ND.shape[1]))
        out_TD.index_add_(0, index_N, y_ND * weight_N.to(y_ND.dtype).unsqueeze(1))
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):  # type: ignore[override]
        y_ND, index_N, weight_N = ctx.saved_tensors
        g_ND = grad_TD.index_select(0, index_N)
        grad_y = g_ND * weight_N.to(g_ND.dtype).unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_w = (g_ND * y_ND).sum(1).to(weight_N.dtype) if ctx.needs_input_grad[2] else None
        return grad_y, None, grad_w, None


def unpermute(y_ND: torch.Tensor, index_N: torch.Tensor, weight_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum ``weight_N[n] * y_ND[n]`` into row ``index_N[n]`` of a ``[num_rows, D]`` zero tensor."""
    return _Unpermute.apply(y_ND, index_N, weight_N, num_rows)
