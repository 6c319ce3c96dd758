"""Parity with HF transformers: MoE blocks and whole Mixtral / Qwen2-MoE / OLMoE models.

Both sides compute in float32 with different op orders (HF loops over experts with index_add; semoe sorts).
A single forward has no amplifying step, so the difference stays at a few float32 ulps of the outputs:
measured <= 1.5e-7 on logits of magnitude <= 0.72 with AVX-512, AVX2 and no-SIMD kernels (2026-12-01,
Intel Xeon with AMX). The tolerances (1e-5 on a block's output, 1e-4 on logits) leave 70-700x of margin;
only a routing near-tie could exceed them, and the greedy checks assert that every reference step's top-2
margin is clear (``assert_clear_margins``). float64 would not help here: transformers' RMSNorm and router
softmax compute in float32 whatever the model's dtype."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from tests.hf_helpers import assert_clear_margins, randomize_hf

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from semoe.config import MoEConfig, RouterConfig  # noqa: E402
from semoe.inference.generate import generate  # noqa: E402
from semoe.layers import MoELayer  # noqa: E402
from semoe.models import num_params  # noqa: E402
from semoe.models.hf import (  # noqa: E402
    hf_key_to_semoe,
    iter_semoe_tensors,
    load_hf_checkpoint,
    model_config_from_hf,
)

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)

H, F_EXPERT, F_SHARED = 48, 40, 56
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, num_experts_per_tok=2, max_position_embeddings=64)


def hf_models():
    """(model_type, config class, model class, extra config) of the three families."""
    t = transformers
    return {
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, dict(num_local_experts=4)),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM,
                      dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80)),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM, dict(num_experts=4, norm_topk_prob=True)),
    }


# ------------------------------------------------------------------------------------ block level


def _block(model_type: str):
    t = transformers
    if model_type == "mixtral":
        cfg = t.MixtralConfig(hidden_size=H, intermediate_size=F_EXPERT, num_local_experts=6, num_experts_per_tok=2)
        return t.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg), True, 0
    if model_type == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=F_EXPERT, num_experts=6, num_experts_per_tok=2,
                               shared_expert_intermediate_size=F_SHARED, norm_topk_prob=False)
        return t.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(cfg), False, F_SHARED
    cfg = t.OlmoeConfig(hidden_size=H, intermediate_size=F_EXPERT, num_experts=6, num_experts_per_tok=2,
                        norm_topk_prob=False)
    return t.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock(cfg), False, 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe"])
def test_block_parity(model_type):
    torch.manual_seed(0)
    block, normalize, shared = _block(model_type)
    with torch.no_grad():
        for p in block.parameters():  # HF may leave them torch.empty / zeros
            p.normal_(std=0.2)
    block.eval()
    router = RouterConfig(top_k=2, normalize_topk=normalize, capacity_factor=None, eval_capacity_factor=None)
    cfg = MoEConfig(d_model=H, d_ff=F_EXPERT, num_experts=6, activation="swiglu", router=router,
                    num_shared_experts=1 if shared else 0, shared_d_ff=shared or None, shared_expert_gate=bool(shared))
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2F, H], [E, H, F]
        layer.experts.w1.copy_(gate_up[:, :F_EXPERT].transpose(1, 2))
        layer.experts.w3.copy_(gate_up[:, F_EXPERT:].transpose(1, 2))
        layer.experts.w2.copy_(down.transpose(1, 2))
        if shared:
            layer.shared.w1.copy_(block.shared_expert.gate_proj.weight.t())
            layer.shared.w3.copy_(block.shared_expert.up_proj.weight.t())
            layer.shared.w2.copy_(block.shared_expert.down_proj.weight.t())
            layer.shared.gate.copy_(block.shared_expert_gate.weight)
    x = torch.randn(2, 7, H)
    with torch.no_grad():
        ref = block(x)
        ours = layer(x)
    assert isinstance(ref, torch.Tensor) and ref.shape == x.shape  # transformers 5: tensor only
    assert ours.stats.dropped == 0
    torch.testing.assert_close(ours.out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ model level


def build_hf(model_type: str):
    """A tiny random HF model in eval mode, float32, with non-trivial norms and routers."""
    cfg_cls, model_cls, extra = hf_models()[model_type]
    torch.manual_seed(0)
    return randomize_hf(model_cls(cfg_cls(**COMMON, **extra, attn_implementation="sdpa")))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "olmoe"])
def saved_hf(request, tmp_path_factory):
    model_type = request.param
    hf = build_hf(model_type)
    d = tmp_path_factory.mktemp(model_type)
    hf.save_pretrained(d, safe_serialization=True)
    return model_type, hf, d


def test_model_logits_and_greedy_match_hf(saved_hf):
    model_type, hf, d = saved_hf
    ours = load_hf_checkpoint(d)
    assert ours.cfg.moe.router.capacity_factor is None and ours.cfg.qk_norm == (model_type == "olmoe")
    assert num_params(ours) == sum(p.numel() for p in hf.parameters())
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = hf(tokens).logits
    ours_logits = ours(tokens).logits
    torch.testing.assert_close(ours_logits, ref, atol=1e-4, rtol=0)

    prompt = tokens[:, :5]
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                             min_new_tokens=8, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    assert_clear_margins(torch.stack(hf_out.logits))  # [steps, B, V]: no near-tie, so tokens cannot flip
    assert generate(ours, prompt, max_new_tokens=8, temperature=0.0) == hf_out.sequences[:, 5:].tolist()


def test_sharded_and_fused_checkpoints(saved_hf, tmp_path):
    _, hf, d = saved_hf
    tokens = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ref = hf(tokens).logits
    # sharded: save_pretrained with a small shard size writes an index
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(load_hf_checkpoint(sharded).forward(tokens).logits, ref, atol=1e-4, rtol=0)
    # fused: the in-memory transformers-5 names (experts.gate_up_proj / down_proj)
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((Path(d) / "config.json").read_text())
    torch.testing.assert_close(load_hf_checkpoint(fused).forward(tokens).logits, ref, atol=1e-4, rtol=0)


def test_iter_semoe_tensors_per_expert(saved_hf):
    _, _, d = saved_hf
    names = {}
    for name, t in iter_semoe_tensors(d):
        names[name] = tuple(t.shape)
    assert names["layers.1.moe.experts.3.w1"] == names["layers.1.moe.experts.3.w3"]
    D, F = names["layers.1.moe.experts.3.w1"]
    assert D == 64 and names["layers.1.moe.experts.3.w2"] == (F, D)
    assert "layers.1.moe.router.weight" in names and "tok_emb.weight" in names


def test_key_mapping():
    m = hf_key_to_semoe("mixtral", "model.layers.3.block_sparse_moe.experts.5.w2.weight")
    assert [(x.name, x.op) for x in m] == [("layers.3.moe.experts.5.w2", "t")]
    m = hf_key_to_semoe("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight")
    assert [(x.name, x.op) for x in m] == [("layers.0.moe.shared.w3", "t")]
    m = hf_key_to_semoe("qwen2_moe", "model.layers.0.mlp.down_proj.weight")
    assert [(x.name, x.op) for x in m] == [("layers.0.mlp.w2.weight", "copy")]
    assert hf_key_to_semoe("olmoe", "model.layers.1.self_attn.k_norm.weight")[0].name == "layers.1.attn.k_norm.weight"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.weird"):
        hf_key_to_semoe("olmoe", "model.layers.0.mlp.weird")
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        hf_key_to_semoe("mixtral", "model.layers.0.self_attn.q_proj.bias")


def test_config_mapping_and_errors():
    qwen = dict(model_type="qwen2_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=4, vocab_size=100, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, shared_expert_intermediate_size=48, decoder_sparse_step=2,
                router_aux_loss_coef=0.02, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    cfg = model_config_from_hf(qwen)
    assert (cfg.moe_every, cfg.dense_d_ff, cfg.moe.d_ff, cfg.moe.num_experts) == (2, 96, 32, 8)
    assert cfg.attn_bias and cfg.moe.shared_hidden == 48 and cfg.moe.shared_expert_gate
    assert cfg.rope_theta == 5e5 and cfg.moe.router.aux_loss_coef == 0.02 and cfg.moe.router.z_loss_coef == 0
    assert not cfg.moe.router.normalize_topk and cfg.moe.router.eval_capacity_factor is None
    with pytest.raises(ValueError, match="mlp_only_layers"):
        model_config_from_hf({**qwen, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match=r"deepseek_v3.*mixtral"):
        model_config_from_hf({**qwen, "model_type": "deepseek_v3"})


def test_unsupported_model_type_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"'llama' is not supported.*olmoe"):
        load_hf_checkpoint(tmp_path)


def test_missing_shard_and_missing_key(tmp_path):
    hf = build_hf("mixtral")
    bad = tmp_path / "bad"
    hf.config.save_pretrained(bad)
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    save_file({"model.embed_tokens.weight": hf.model.embed_tokens.weight.detach().clone()},
              str(bad / "model-00001-of-00002.safetensors"))
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors"):
        load_hf_checkpoint(bad)
    # only the embedding present: the loader names what is missing
    (bad / "model.safetensors.index.json").unlink()
    (bad / "model-00001-of-00002.safetensors").rename(bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensors for: .*norm\.weight"):
        load_hf_checkpoint(bad)
