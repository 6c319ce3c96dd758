"""Gather rows: ``out[n] = x[index[n]]``; backward scatter-adds into the source rows.

Legend: T tokens, N gathered rows (assignments), D hidden.

When the index is a permutation of all rows (each row exactly once, e.g. the regrouping of received
rows from source-major to expert-major order) and its inverse is passed, the backward is a gather with
the inverse: no zero-filled ``[T, D]`` buffer and no scatter-add.
"""

from __future__ import annotations

import torch


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, index_N: torch.Tensor,  # type: ignore[override]
                inverse_T: torch.Tensor | None) -> torch.Tensor:
        ctx.bijective = inverse_T is not None
        ctx.save_for_backward(inverse_T if ctx.bijective else index_N)
        ctx.num_rows = x_TD.shape[0]
        return x_TD.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        if ctx.bijective:  # grad_T[t] = grad_N[inverse[t]]
            return grad_ND.index_select(0, index), None, None
        grad_TD = grad_ND.new_zeros((ctx.num_rows, grad_ND.shape[1]))
        grad_TD.index_add_(0, index, grad_ND)
        return grad_TD, None, None


def permute(x_TD: torch.Tensor, index_N: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x_TD`` in the order ``index_N`` (int64); a row may appear several times (top-k).

    ``inverse``: only when ``index_N`` is a permutation of all ``T`` rows, its inverse (``argsort(index_N)``);
    the backward then gathers with it instead of scatter-adding into zeros (same result)."""
    if inverse is not None and not (inverse.numel() == index_N.numel() == x_TD.shape[0]):
        raise ValueError(f"inverse needs a permutation of all {x_TD.shape[0]} rows; got an index of "
                         f"{index_N.numel()} and an inverse of {inverse.numel()}")
    return _Permute.apply(x_TD, index_N, inverse)
