"""Scatter rows into a zero-padded buffer: ``out[slot[n]] = x[n]``; backward gathers.

Used by the capacity-padded dispatch: kept assignments go to slot ``expert * C + position`` of an
``[E * C, D]`` buffer; unused slots stay zero. Legend: N rows, S slots, D hidden.
"""

from __future__ import annotations

import torch


class _PadRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, slot_N: torch.Tensor, num_slots: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(slot_N)
        out_SD = x_ND.new_zeros((num_slots, x_ND.shape[1]))
        out_SD.index_copy_(0, slot_N, x_ND)
        return out_SD

    @staticmethod
    def backward(ctx, grad_SD: torch.Tensor):  # type: ignore[override]
        (slot_N,) = ctx.saved_tensors
        return grad_SD.index_select(0, slot_N), None, None


def pad_rows(x_ND: torch.Tensor, slot_N: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Place row n of ``x_ND`` at row ``slot_N[n]`` (distinct) of a ``[num_slots, D]`` zero tensor."""
    return _PadRows.apply(x_ND, slot_N, num_slots)
