"""The global gradient norm (``semoe.parallel.grads``): its units are the same tensors in every expert-parallel
layout, so splitting the experts over ranks moves it by float64 rounding only, and it is the L2 norm."""

from __future__ import annotations

import pytest
import torch

from semoe.parallel.grads import expert_grad_sq, grad_norm


@pytest.mark.numerics
def test_expert_part_is_layout_independent_in_float32() -> None:
    """8 experts' float32 gradient held by 1, 2, 4 or 8 ranks (consecutive blocks, as ``Experts.shard_`` keeps
    them): the sum of the ranks' parts equals the whole to float64 rounding, where a float32 norm of each rank's
    stacked block would differ by float32 rounding; and it is the squared norm (float64 reference)."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(8, 96, 160, generator=g) * torch.logspace(-3, 1, 8).view(8, 1, 1)
    whole = expert_grad_sq(grad)
    assert whole.dtype == torch.float64
    for ep in (2, 4, 8):
        parts = [expert_grad_sq(b) for b in grad.chunk(ep)]
        assert float(torch.stack(parts).sum()) == pytest.approx(float(whole), rel=1e-14, abs=0)
    exact = float(grad.double().square().sum())
    assert float(whole) == pytest.approx(exact, rel=1e-5)  # float32 norms of 15k elements each
    assert expert_grad_sq(grad[:0]) == 0


@pytest.mark.numerics
def test_grad_norm_is_the_l2_norm_of_every_gradient() -> None:
    """A model with dense and stacked expert parameters (float64): the norm equals torch's over all gradients;
    parameters without a gradient are left out."""
    torch.manual_seed(0)

    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(4, 6, 5, dtype=torch.float64))

    model = torch.nn.Module()
    model.embed = torch.nn.Linear(6, 6, dtype=torch.float64)
    model.experts = Experts()
    model.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    x = torch.randn(7, 6, dtype=torch.float64)
    (model.embed(x) @ model.experts.w1).square().sum().backward()
    want = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1e9)
    assert model.unused.grad is None
    assert float(grad_norm(model, None)) == pytest.approx(float(want), rel=1e-12)
