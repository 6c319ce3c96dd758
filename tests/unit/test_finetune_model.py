"""Model pieces fine-tuning needs: attention that does not cross packed document boundaries, and transformers'
load-balancing loss (pooled over the layers) against transformers' own function.

The attention tests run semoe in float64 against itself (packed vs separate), so they agree to float64 rounding.
The loss test feeds semoe's router logits (float64) to transformers' function, which accumulates in float32."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from semoe.config import ModelConfig, MoEConfig, RouterConfig
from semoe.models.transformer import MoETransformer, document_mask

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


def tiny_cfg(scope: str = "layer", **router) -> ModelConfig:
    rc = RouterConfig(top_k=2, capacity_factor=None, eval_capacity_factor=None, normalize_topk=True, z_loss_coef=0.0,
                      aux_loss_coef=0.02, aux_loss_scope=scope, **router)
    moe = MoEConfig(d_model=32, d_ff=48, num_experts=4, activation="swiglu", router=rc)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32, moe=moe,
                       dense_d_ff=64, moe_every=1)


def test_packed_documents_equal_separate_runs() -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny_cfg()).double().eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(packed, doc_ids=doc).logits
        ref_a, ref_b = model(a).logits, model(b).logits
        plain = model(packed).logits
    # RoPE depends on the distance between positions only: doc b at positions 7.. scores as at 0..
    torch.testing.assert_close(out[:, :7], ref_a, atol=1e-10, rtol=0)
    torch.testing.assert_close(out[:, 7:], ref_b, atol=1e-10, rtol=0)
    assert (plain[:, 7:] - ref_b).abs().max() > 1e-3  # without the mask, b sees a
    # one document per row: exactly the plain causal path (no mask is built)
    assert document_mask(torch.zeros_like(packed), packed, None) is None
    with torch.no_grad():
        assert torch.equal(model(packed, doc_ids=torch.zeros_like(packed)).logits, plain)


def test_packed_documents_do_not_see_each_other() -> None:
    """Changing the tokens of document 0 leaves the logits of document 1 of the same row unchanged (up to the
    float64 rounding of matmuls whose row blocking follows the expert group sizes), so no gradient crosses."""
    torch.manual_seed(1)
    model = MoETransformer(tiny_cfg()).double().eval()
    x = torch.randint(0, 64, (2, 12))
    doc = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    x2 = x.clone()
    x2[0, :5] = (x2[0, :5] + 1) % 64
    with torch.no_grad():
        out, out2 = model(x, doc_ids=doc).logits, model(x2, doc_ids=doc).logits
    assert (out[0, 5:] - out2[0, 5:]).abs().max() < 1e-12
    assert (out[0, :5] - out2[0, :5]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], out2[1], atol=1e-12, rtol=0)


def test_doc_ids_errors() -> None:
    model = MoETransformer(tiny_cfg()).eval()
    x = torch.randint(0, 64, (1, 6))
    with pytest.raises(ValueError, match="without a KV cache"):
        model(x, cache=model.new_cache(1, 8), doc_ids=torch.zeros_like(x))
    with pytest.raises(ValueError, match="shaped like tokens"):
        model(x, doc_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, doc_ids=torch.zeros(1, 6))


def _router_logits(model: MoETransformer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(model output, each MoE layer's router logits [T, E], differentiable), captured by forward hooks."""
    captured: list[torch.Tensor] = []
    hooks = [layer.moe.router.register_forward_hook(
        lambda mod, args, _out: captured.append(args[0] @ mod.weight.t())) for layer in model.layers]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, captured


@pytest.mark.parametrize("normalize", [True, False])
def test_model_scope_aux_loss_is_transformers_load_balancing_loss(normalize: bool) -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(2)
    cfg = tiny_cfg("model")
    cfg = ModelConfig(**{**cfg.__dict__, "moe": MoEConfig(**{**cfg.moe.__dict__, "router": RouterConfig(
        **{**cfg.moe.router.__dict__, "normalize_topk": normalize})})})
    model = MoETransformer(cfg).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.router.weight.normal_(std=0.5)
    x = torch.randint(0, 64, (2, 10))
    out, logits = _router_logits(model, x)
    ref = load_balancing_loss_func(tuple(logits), cfg.moe.num_experts, cfg.moe.router.top_k)
    # transformers accumulates the probabilities in float32 whatever the logits' dtype: sums of T * L = 60 rows
    # of float32 (eps 6e-8) agree with float64 to a few 1e-7 relative; 1e-5 leaves a 10x margin
    assert ref.dtype == torch.float32
    assert float(out.aux_loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    # z-loss off: the router loss is the weighted aux loss alone
    assert float(out.router_loss.detach()) == pytest.approx(0.02 * float(out.aux_loss.detach()), rel=1e-12)
    # same gradient with respect to every router weight (the counts are constants on both sides)
    g_ours = torch.autograd.grad(out.aux_loss, [layer.moe.router.weight for layer in model.layers], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [layer.moe.router.weight for layer in model.layers])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    # it is not the per-layer loss: "layer" scope gives E*sum f*P per layer with f over assignments, summed
    layer_model = MoETransformer(tiny_cfg("layer")).double()
    layer_model.load_state_dict(model.state_dict())
    per_layer = layer_model(x)
    assert abs(float(per_layer.aux_loss.detach()) - float(ref.detach())) > 1e-3
