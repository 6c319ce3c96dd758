"""The MoE layer against an independent per-token for-loop implementation, and its bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semoe.config import MoEConfig, ParallelConfig, RouterConfig
from semoe.layers import MoELayer
from semoe.parallel import ParallelDims

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


def loop_reference(layer: MoELayer, x_TD: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Token by token: softmax, top-k, position-priority capacity (choices first, then tokens)."""
    cfg = layer.cfg
    ex = layer.experts
    probs = F.linear(x_TD, layer.router.weight).softmax(-1)
    dtype = x_TD.dtype
    w, e = torch.topk(probs, cfg.router.top_k, dim=-1)
    if cfg.router.normalize_topk:
        w = w / w.sum(-1, keepdim=True)
    used = [0] * cfg.num_experts
    out = [torch.zeros(cfg.d_model, dtype=dtype) for _ in range(x_TD.shape[0])]
    for k in range(cfg.router.top_k):
        for t in range(x_TD.shape[0]):
            j = int(e[t, k])
            if capacity is not None and used[j] >= capacity:
                continue
            used[j] += 1
            h = x_TD[t] @ ex.w1[j]
            h = F.silu(h) * (x_TD[t] @ ex.w3[j]) if cfg.activation == "swiglu" else F.gelu(h)
            out[t] = out[t] + w[t, k] * (h @ ex.w2[j])
    return torch.stack(out)


ROUTINGS = [(1, 1.0, False), (2, 1.25, True), (2, 0.5, False), (2, None, True)]
LOOP_CASES = [(impl, act, *r) for impl in ("grouped_mm", "loop", "padded") for act in ("swiglu", "gelu")
              for r in ROUTINGS if not (impl == "padded" and r[1] is None)]  # padded needs a capacity


@pytest.mark.parametrize("impl,activation,top_k,cf,renorm", LOOP_CASES)
def test_layer_matches_loop(impl: str, activation: str, top_k: int, cf: float | None, renorm: bool) -> None:
    """In float64: the loop multiplies vectors where the layer multiplies blocks (other sum orders), and a
    near-tie between two router scores must not be able to flip a routing decision; the float64 results
    agree to ~1e-15, the tolerance is 1e-10."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=12, d_ff=20, num_experts=6, activation=activation, expert_impl=impl,
                    router=RouterConfig(top_k=top_k, capacity_factor=cf, normalize_topk=renorm, min_capacity=1))
    layer = MoELayer(cfg).double().train()
    x = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    o = layer(x)
    T = 18
    cap = None if cf is None else max(1, math.ceil(cf * top_k * T / 6))
    assert o.stats.capacity == cap
    x2 = x.detach().clone().requires_grad_(True)
    ref = loop_reference(layer, x2.view(-1, 12), cap).view(2, 9, 12)
    torch.testing.assert_close(o.out, ref, atol=1e-10, rtol=1e-10)
    c = torch.randn_like(ref)
    grads = torch.autograd.grad((o.out * c).sum(), [x, *layer.parameters()], allow_unused=True)
    ref_grads = torch.autograd.grad((ref * c).sum(), [x2, *layer.parameters()], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    assert o.stats.dropped == o.stats.assignments - int(o.stats.tokens_per_expert.sum())


def test_stats_and_losses_balanced_value() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, router=RouterConfig(top_k=2)))
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities: aux loss is exactly 1
    o = layer(torch.randn(32, 8))
    assert float(o.aux_loss.detach()) == pytest.approx(1.0, abs=1e-6)
    assert float(o.z_loss.detach()) == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert int(o.stats.routed_per_expert.sum()) == 64


@pytest.mark.parametrize("kind", ["topk", "expert_choice"])
def test_losses_switched_off_leave_the_output(kind: str) -> None:
    """``compute_losses = False`` (what the inference engine sets): same output and stats, zero losses."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4,
                               router=RouterConfig(kind=kind, top_k=2, z_loss_coef=1e-3)))
    x = torch.randn(32, 8)
    with torch.inference_mode():
        on = layer(x)
        layer.compute_losses = False
        off = layer(x)
    assert not layer.router.compute_losses
    assert torch.equal(on.out, off.out) and on.stats.tokens_per_expert.tolist() == off.stats.tokens_per_expert.tolist()
    assert float(on.z_loss) > 0 and float(off.z_loss) == float(off.aux_loss) == float(off.router_loss) == 0.0


def test_aux_free_bias_moves_towards_balance() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4,
                    router=RouterConfig(top_k=1, capacity_factor=None, bias_update_rate=0.05))
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.router.weight[0] += 0.3  # expert 0 is favoured by every (positive) input
    x = torch.randn(256, 8).abs()
    first = layer(x).stats.routed_per_expert.clone()
    for _ in range(40):
        last = layer(x).stats.routed_per_expert
    assert first.max() - first.min() > last.max() - last.min()
    assert layer.router.expert_bias[int(first.argmax())] < 0 < layer.router.expert_bias[int(first.argmin())]


def test_noise_only_in_training() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4,
                               router=RouterConfig(noise="jitter", jitter_eps=0.5, capacity_factor=None)))
    x = torch.randn(16, 8)
    layer.eval()
    a, b = layer(x).out, layer(x).out
    assert torch.equal(a, b)
    layer.train()
    c, d = layer(x).out, layer(x).out
    assert not torch.equal(c, d)  # a new draw per call


@pytest.mark.parametrize("make,match", [
    (lambda: MoEConfig(num_experts=4, router=RouterConfig(top_k=5)), "top_k"),
    (lambda: RouterConfig(capacity_factor=0.0), "capacity_factor"),
    (lambda: RouterConfig(capacity_factor=-1.0), "capacity_factor"),
    (lambda: RouterConfig(eval_capacity_factor=0.0), "eval_capacity_factor"),
    (lambda: MoEConfig(expert_impl="padded", router=RouterConfig(capacity_factor=None)), "padded"),
    (lambda: ParallelDims(world_size=6, ep_size=4), "not divisible by ep_size"),
    (lambda: ParallelConfig(ep_size=-1), "ep_size"),
    (lambda: RouterConfig(kind="nope"), "router.kind"),
])
def test_bad_config(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=6))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by ep_size=4"):
        layer.experts.shard_(0, 4)
