"""Gather rows: ``out[n] = x[index[n]]``; backward scatter-adds into the source rows.

Legend: T tokens, N gathered rows (assignments), D hidden.
"""

from __future__ import annotations

import torch


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index_N)
        ctx.num_rows = x_TD.shape[0]
        return x_TD.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):  # type: ignore[override]
        (index_N,) = ctx.saved_tensors
        grad_TD = grad_ND.new_zeros((ctx.num_rows, grad_ND.shape[1]))
        grad_TD.index_add_(0, index_N, grad_ND)
        return grad_TD, None


def permute(x_TD: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_TD`` in the order ``index_N`` (int64); a row may appear several times (top-k)."""
    return _Permute.apply(x_TD, index_N)
