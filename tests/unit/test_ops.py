"""Ops against plain-torch references (autograd of index ops, a per-group loop)."""

from __future__ import annotations

import pytest
import torch

from semoe.ops import grouped_mm, grouped_mm_loop, pad_rows, permute, unpermute


def test_permute_unpermute_match_autograd_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([3, 0, 0, 5, 2, 3, 1])
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    y = permute(x, idx) * 2.0
    out = unpermute(y, idx, w, 6)
    ref = torch.zeros(6, 5, dtype=torch.float64).index_add(0, idx, x[idx] * 2.0 * w[:, None])
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda a, b: unpermute(permute(a, idx), idx, b, 6), (x, w))


def test_pad_rows_gradcheck() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([7, 0, 2, 5])
    out = pad_rows(x, slots, 8)
    assert out[1].abs().sum() == 0 and torch.equal(out[7], x[0].detach())
    assert torch.autograd.gradcheck(lambda a: pad_rows(a, slots, 8), (x,))


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 0, 4], [2, 2, 2, 2]])
def test_grouped_mm_matches_loop(counts: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(len(counts), 8, 6, requires_grad=True)
    out = grouped_mm(x, w, counts)
    out.sum().backward()  # expanded stride-0 gradient: must not trip _grouped_mm's backward
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = grouped_mm_loop(x, w, counts)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_grouped_mm_empty() -> None:
    out = grouped_mm(torch.zeros(0, 4), torch.randn(3, 4, 5), [0, 0, 0])
    assert out.shape == (0, 5)
