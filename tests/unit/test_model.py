"""MoETransformer: shapes, causality, KV cache, training, input checks, layer layout, generation."""

from __future__ import annotations

import pytest
import torch

from semoe.config import ModelConfig, MoEConfig, RouterConfig, replace
from semoe.inference.generate import generate, sample_next
from semoe.layers import MoELayer
from semoe.models import MoETransformer, moe_layers, num_params

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)

V, D = 64, 32


def tiny_cfg(**kw) -> ModelConfig:
    router = RouterConfig(top_k=2, capacity_factor=None, eval_capacity_factor=None)
    moe = MoEConfig(d_model=D, d_ff=48, num_experts=4, activation="swiglu", router=router)
    base = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, dense_d_ff=48, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed: int = 0, **kw) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(tiny_cfg(**kw)).eval()


def test_shapes_and_outputs():
    model = make_model()
    tokens = torch.randint(0, V, (3, 11))
    out = model(tokens)
    assert out.logits.shape == (3, 11, V) and out.logits.dtype == torch.float32
    assert len(out.moe_stats) == 2 and all(s.tokens == 33 for s in out.moe_stats)
    assert out.router_loss.shape == () and out.router_loss.item() > 0
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    coef = model.cfg.moe.router
    assert torch.allclose(out.router_loss, coef.aux_loss_coef * out.aux_loss + coef.z_loss_coef * out.z_loss)


def test_causal():
    model = make_model()
    tokens = torch.randint(0, V, (2, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % V
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_kv_cache_matches_full_forward():
    """In float64: prefill, chunk and decode multiply blocks of other shapes than the full forward (other
    kernels, other sum orders) and route 2-10 tokens at a time; float64 keeps the difference ~1e-15 and
    no router near-tie can flip, so 1e-10 holds on any CPU."""
    model = make_model(qk_norm=True, attn_bias=True).double()
    tokens = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(2, 16)
        parts = [model(tokens[:, :5], cache=cache).logits, model(tokens[:, 5:8], cache=cache).logits]  # prefill, chunk
        parts += [model(tokens[:, i:i + 1], cache=cache).logits for i in range(8, 12)]  # decode
    assert cache.length == 12 and full.dtype == torch.float64
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=0)


def test_training_memorises_a_batch():
    model = make_model(seed=1).train()
    torch.manual_seed(2)
    tokens = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(tokens[:, :-1])
        lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        (lm + out.router_loss).backward()
        opt.step()
        losses.append(lm.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    ("tokens", "err", "match"),
    [
        (torch.zeros(1, 4), ValueError, "integer"),
        (torch.full((1, 4), V), ValueError, r"\[0, 64\)"),
        (torch.full((1, 4), -1), ValueError, r"\[0, 64\)"),
        (torch.zeros(1, 33, dtype=torch.long), ValueError, "max_seq_len"),
        (torch.zeros(4, dtype=torch.long), ValueError, "shape"),
        ([[1, 2]], TypeError, "Tensor"),
    ],
)
def test_bad_inputs(tokens, err, match):
    with pytest.raises(err, match=match):
        make_model()(tokens)


def test_cache_overflow_and_batch_mismatch():
    model = make_model()
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cache"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 33)


def test_moe_every_two_alternates():
    model = make_model(n_layers=4, moe_every=2)
    kinds = [layer.is_moe for layer in model.layers]
    assert kinds == [False, True, False, True]
    assert isinstance(model.layers[1].moe, MoELayer) and not hasattr(model.layers[0], "moe")
    assert model.layers[0].mlp.w1.weight.shape == (48, D)
    assert moe_layers(model) == [model.layers[1].moe, model.layers[3].moe]
    names = set(model.state_dict())
    assert "layers.0.mlp.w2.weight" in names and "layers.1.moe.experts.w1" in names
    assert len(model(torch.zeros(1, 3, dtype=torch.long)).moe_stats) == 2


def test_init_scales_output_projections():
    torch.manual_seed(0)
    model = MoETransformer(tiny_cfg(d_model=256, n_layers=8, moe=replace(tiny_cfg().moe, d_model=256),
                                    init_std=0.02))
    assert abs(model.layers[0].attn.wq.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 5e-4
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_tied_embeddings():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert "lm_head.weight" not in tied.state_dict() and tied.lm_head is None
    assert num_params(untied) - num_params(tied) == V * D
    with torch.no_grad():
        tied.tok_emb.weight[5].zero_()  # the output projection is the embedding: logit 5 becomes 0
        logits = tied(torch.randint(6, V, (1, 4))).logits
    assert torch.all(logits[..., 5] == 0) and logits[..., 6].abs().max() > 0


def test_generate_greedy_matches_full_forward():
    model = make_model(seed=3)
    prompt = [[1, 2, 3, 4], [5, 6, 7, 8]]
    out = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    assert out == generate(model, torch.tensor(prompt), max_new_tokens=6, temperature=0.0)
    for p, new in zip(prompt, out):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert new == seq[len(p):]


def test_generate_unequal_lengths_match_single_runs():
    model = make_model(seed=4)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3]]
    together = generate(model, prompts, max_new_tokens=5, temperature=0.0)
    assert together == [generate(model, [p], max_new_tokens=5, temperature=0.0)[0] for p in prompts]


def test_generate_stops_at_eos():
    model = make_model(seed=3)
    free = generate(model, [[1, 2, 3, 4]], max_new_tokens=6, temperature=0.0)[0]
    eos = free[2]
    first = free.index(eos)
    stopped = generate(model, [[1, 2, 3, 4], [9, 9, 9, 9]], max_new_tokens=6, temperature=0.0, eos_id=eos)
    assert stopped[0] == free[:first + 1]
    assert len(stopped[1]) <= 6


def test_sampling_seeded_and_top_p():
    model = make_model(seed=5)
    runs = [generate(model, [[1, 2]], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0][0]) == 8
    assert not model.training  # mode restored (make_model returns an eval model)
    model.train()
    generate(model, [[1]], 2, temperature=0.0)
    assert model.training
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    picks = {int(sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert picks == {0}  # p(top-1) = 0.64 >= 0.5: the nucleus is one token
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, top_p=0.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 30], 8)
