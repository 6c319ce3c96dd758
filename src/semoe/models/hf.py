"""Import HF checkpoints of Mixtral, Qwen2-MoE and OLMoE (config.json + safetensors) into semoe, and export
semoe models back to them: the one place that knows HF's names and config fields.

Legend: E experts, D hidden size, F expert hidden size, H shared-expert hidden size.

HF ``nn.Linear`` weights are ``[out, in]`` (``x @ w.T``); semoe experts and shared experts store
``x @ w`` layouts, so those are transposed. Attention, norms, embeddings, the router and dense MLPs
keep HF's layout. ``save_pretrained`` in transformers 5.x writes the legacy per-expert names
(``...experts.{e}.w1.weight`` / ``...experts.{e}.gate_proj.weight``) although transformers keeps the
experts fused in memory (``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``); both
spellings are accepted.

:func:`iter_semoe_tensors` is the single place that applies the mapping; it yields one tensor per
global expert (``layers.{i}.moe.experts.{e}.w1`` ``[D, F]``), the semoe checkpoint format.
Nothing here imports transformers, and nothing unpickles: only JSON and safetensors are read.

Export (:func:`hf_export_plan`, :func:`hf_config_from_semoe`) is the inverse of the same mapping: the HF
keys of a model are enumerated, each is sent through :func:`hf_key_to_semoe`, and the result is inverted,
so import and export cannot drift apart. Export writes the per-expert keys (``...experts.{e}.w1.weight``),
the layout of the original checkpoints and of what ``save_pretrained`` writes in transformers 5.x (which
fuses the experts only in memory); vLLM and llama.cpp's converters read it too.

Routing semantics of an import: dropless, HF's top-k renormalisation (``norm_topk_prob``; Mixtral always
renormalises), ``router_aux_loss_coef`` as the load-balancing coefficient with transformers' own loss
(``aux_loss_scope="model"``: pooled over the layers, see ``semoe.layers.losses.pooled_load_balancing_loss``),
no z-loss. That is transformers' training loss with ``output_router_logits=True``, which is how MoE fine-tuning
recipes run it; to train like transformers with ``output_router_logits=false`` (no aux loss), set
``model.moe.router.aux_loss_coef=0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from semoe.config import ModelConfig, MoEConfig, RouterConfig
from semoe.models.transformer import MoETransformer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "olmoe")

Op = Literal["copy", "t", "gate_t", "up_t", "down_t"]


@dataclass(frozen=True)
class TensorMap:
    """How one HF tensor becomes semoe tensor(s).

    ``name``: the semoe name; for the fused ops it contains ``{e}``, filled with each expert id.
    ``op``: "copy" (same layout), "t" (2-D transpose), "gate_t" / "up_t" (first / second half of a
    fused ``gate_up_proj [E, 2F, D]``, per expert, transposed to ``[D, F]``), "down_t" (fused
    ``down_proj [E, D, F]``, per expert, transposed to ``[F, D]``).
    """

    name: str
    op: Op


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")
_SEMOE_EXPERT_RE = re.compile(r"^(layers\.\d+\.moe\.experts)\.(\d+)\.(w[123])$")
_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
_EXPERT_PROJ = {
    "mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"},
    "qwen2_moe": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    "olmoe": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
}
_DENSE_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _check_model_type(model_type: object) -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return str(model_type)


def hf_key_to_semoe(model_type: str, key: str) -> list[TensorMap]:
    """Where the HF checkpoint tensor ``key`` goes in semoe. An empty list means "not a parameter,
    skip it" (old checkpoints' ``rotary_emb.inv_freq``). Unknown keys raise ``ValueError``."""
    mt = _check_model_type(model_type)
    top = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if key in top:
        return [TensorMap(top[key], "copy")]
    m = _LAYER_RE.match(key)
    if m is not None:
        maps = _layer_key(mt, f"layers.{m.group(1)}", m.group(2))
        if maps is not None:
            return maps
    raise ValueError(f"unknown tensor {key!r} in a {mt} checkpoint; semoe cannot map it "
                     "(is the checkpoint from a different architecture or a newer transformers?)")


def _layer_key(mt: str, p: str, rest: str) -> list[TensorMap] | None:
    """Mapping of ``model.layers.{i}.<rest>`` (``p`` = "layers.{i}"), or None if unknown."""
    if rest == "input_layernorm.weight":
        return [TensorMap(f"{p}.attn_norm.weight", "copy")]
    if rest == "post_attention_layernorm.weight":
        return [TensorMap(f"{p}.ffn_norm.weight", "copy")]
    if rest.endswith("rotary_emb.inv_freq"):
        return []
    if rest.startswith("self_attn."):
        attn = rest[len("self_attn."):]
        proj, _, kind = attn.partition(".")
        if proj in _ATTN and (kind == "weight" or (kind == "bias" and mt == "qwen2_moe" and proj != "o_proj")):
            return [TensorMap(f"{p}.attn.{_ATTN[proj]}.{kind}", "copy")]
        if mt == "olmoe" and attn in ("q_norm.weight", "k_norm.weight"):
            return [TensorMap(f"{p}.attn.{attn}", "copy")]
        return None
    moe_prefixes = ("block_sparse_moe.", "mlp.") if mt == "mixtral" else ("mlp.",)
    for pre in moe_prefixes:
        if not rest.startswith(pre):
            continue
        sub = rest[len(pre):]
        if sub == "gate.weight":
            return [TensorMap(f"{p}.moe.router.weight", "copy")]
        if sub == "experts.gate_up_proj":
            return [TensorMap(f"{p}.moe.experts.{{e}}.w1", "gate_t"), TensorMap(f"{p}.moe.experts.{{e}}.w3", "up_t")]
        if sub == "experts.down_proj":
            return [TensorMap(f"{p}.moe.experts.{{e}}.w2", "down_t")]
        em = _EXPERT_RE.match(sub)
        if em is not None and em.group(2) in _EXPERT_PROJ[mt]:
            return [TensorMap(f"{p}.moe.experts.{em.group(1)}.{_EXPERT_PROJ[mt][em.group(2)]}", "t")]
        if mt == "qwen2_moe":
            if sub == "shared_expert_gate.weight":
                return [TensorMap(f"{p}.moe.shared.gate", "copy")]
            proj, _, kind = sub.removeprefix("shared_expert.").partition(".")
            if sub.startswith("shared_expert.") and proj in _DENSE_PROJ and kind == "weight":
                return [TensorMap(f"{p}.moe.shared.{_DENSE_PROJ[proj]}", "t")]
            proj, _, kind = sub.partition(".")
            if proj in _DENSE_PROJ and kind == "weight":  # a dense layer (decoder_sparse_step > 1)
                return [TensorMap(f"{p}.mlp.{_DENSE_PROJ[proj]}.weight", "copy")]
    return None


def convert_tensor(tmap: TensorMap, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Apply ``tmap`` to the HF tensor ``t``: yields (semoe name, contiguous tensor)."""
    if tmap.op == "copy":
        yield tmap.name, t.contiguous()
    elif tmap.op == "t":
        if t.dim() != 2:
            raise ValueError(f"{tmap.name}: expected a 2-D tensor to transpose, got shape {tuple(t.shape)}")
        yield tmap.name, t.t().contiguous()
    elif tmap.op in ("gate_t", "up_t", "down_t"):
        if t.dim() != 3:
            raise ValueError(f"{tmap.name}: expected a fused 3-D expert tensor, got shape {tuple(t.shape)}")
        if tmap.op != "down_t" and t.shape[1] % 2:
            raise ValueError(f"{tmap.name}: fused gate_up_proj has odd dim 1 ({t.shape[1]})")
        half = t.shape[1] // 2
        for e in range(t.shape[0]):
            w = t[e]
            if tmap.op == "gate_t":
                w = w[:half]
            elif tmap.op == "up_t":
                w = w[half:]
            yield tmap.name.format(e=e), w.t().contiguous()
    else:  # pragma: no cover - Op is closed
        raise AssertionError(tmap.op)


def converted_shapes(tmap: TensorMap, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(semoe name, shape) of what :func:`convert_tensor` yields for an HF tensor of ``shape``, without
    reading it (the converter and the ring engine size their outputs from the headers alone)."""
    shape = tuple(int(s) for s in shape)
    if tmap.op == "copy":
        return [(tmap.name, shape)]
    if tmap.op == "t":
        if len(shape) != 2:
            raise ValueError(f"{tmap.name}: expected a 2-D tensor to transpose, got shape {shape}")
        return [(tmap.name, (shape[1], shape[0]))]
    if len(shape) != 3:
        raise ValueError(f"{tmap.name}: expected a fused 3-D expert tensor, got shape {shape}")
    E, a, b = shape
    if tmap.op == "down_t":
        return [(tmap.name.format(e=e), (b, a)) for e in range(E)]
    if a % 2:
        raise ValueError(f"{tmap.name}: fused gate_up_proj has odd dim 1 ({a})")
    return [(tmap.name.format(e=e), (b, a // 2)) for e in range(E)]


def semoe_param_slot(name: str) -> tuple[str, int | None]:
    """Model parameter and expert index of a semoe checkpoint name: per-expert names
    ``layers.{i}.moe.experts.{e}.w1`` live in slice ``e`` of the stacked ``layers.{i}.moe.experts.w1``."""
    m = _SEMOE_EXPERT_RE.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}.{m.group(3)}", int(m.group(2))


# ----------------------------------------------------------------------------------------- config


def _req(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"HF config ({hf.get('model_type')}) lacks {key!r}; is config.json complete?")
    return hf[key]


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported; semoe implements default RoPE only")
    return float(rp.get("rope_theta", hf.get("rope_theta", default)))


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A semoe :class:`ModelConfig` from an HF ``config.json`` dict of a Mixtral, Qwen2-MoE or OLMoE
    model: dropless routing, SwiGLU experts, HF's top-k renormalisation, no z-loss."""
    mt = _check_model_type(hf.get("model_type"))
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; semoe experts are SwiGLU (silu)")
    D = int(_req(hf, "hidden_size"))
    n_heads = int(_req(hf, "num_attention_heads"))
    max_seq_len = int(hf.get("max_position_embeddings") or 4096)
    moe_every, dense_d_ff, attn_bias, qk_norm = 1, int(_req(hf, "intermediate_size")), False, False
    shared_d_ff = 0
    if mt == "mixtral":
        E, d_ff = int(_req(hf, "num_local_experts")), int(_req(hf, "intermediate_size"))
        normalize, theta, eps_default = True, _rope_theta(hf, 1e6), 1e-5
        if hf.get("sliding_window") is not None and int(hf["sliding_window"]) < max_seq_len:
            log.info("mixtral sliding_window=%s: semoe attends over the full sequence, so max_seq_len is capped "
                     "at the window (identical results within it)", hf["sliding_window"])
            max_seq_len = int(hf["sliding_window"])
    elif mt == "qwen2_moe":
        E, d_ff = int(_req(hf, "num_experts")), int(_req(hf, "moe_intermediate_size"))
        normalize, theta, eps_default = bool(hf.get("norm_topk_prob", False)), _rope_theta(hf, 1e4), 1e-6
        if hf.get("mlp_only_layers"):
            raise ValueError(f"qwen2_moe mlp_only_layers={hf['mlp_only_layers']} is not supported; semoe places "
                             "dense layers by decoder_sparse_step only")
        if hf.get("use_sliding_window"):
            raise ValueError("qwen2_moe use_sliding_window=True is not supported (semoe attention is full causal)")
        moe_every = int(hf.get("decoder_sparse_step") or 1)
        attn_bias = bool(hf.get("qkv_bias", True))
        shared_d_ff = int(hf.get("shared_expert_intermediate_size") or 0)
    else:  # olmoe
        E, d_ff = int(_req(hf, "num_experts")), int(_req(hf, "intermediate_size"))
        normalize, theta, eps_default = bool(hf.get("norm_topk_prob", False)), _rope_theta(hf, 1e4), 1e-5
        if hf.get("clip_qkv") is not None:
            raise ValueError(f"olmoe clip_qkv={hf['clip_qkv']} is not supported")
        if hf.get("attention_bias"):
            raise ValueError("olmoe attention_bias=True is not supported (semoe has no o_proj bias)")
        qk_norm = True
    if E < 1:
        raise ValueError(f"{mt} config has {E} experts; a dense model is not an MoE checkpoint semoe imports")
    jitter = float(hf.get("router_jitter_noise") or 0.0)
    if jitter > 0:
        log.warning("router_jitter_noise=%s: semoe jitters the router input only; transformers' Mixtral also "
                    "jitters the experts' input during training (inference is unaffected)", jitter)
    router = RouterConfig(
        kind="topk", top_k=int(_req(hf, "num_experts_per_tok")), score_func="softmax", normalize_topk=normalize,
        noise="jitter" if jitter > 0 else "none", jitter_eps=jitter if jitter > 0 else 0.01,
        capacity_factor=None, eval_capacity_factor=None,
        aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0), z_loss_coef=0.0, aux_loss_scope="model",
    )
    init_std = float(hf.get("initializer_range") or 0.02)
    moe = MoEConfig(
        d_model=D, d_ff=d_ff, num_experts=E, activation="swiglu", router=router,
        num_shared_experts=1 if shared_d_ff > 0 else 0, shared_d_ff=shared_d_ff or None,
        shared_expert_gate=shared_d_ff > 0, expert_impl="grouped_mm", init_std=init_std,
    )
    head_dim = hf.get("head_dim")
    return ModelConfig(
        vocab_size=int(_req(hf, "vocab_size")), d_model=D, n_layers=int(_req(hf, "num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim) if head_dim is not None else None, max_seq_len=max_seq_len, rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps") or eps_default), moe_every=moe_every, dense_d_ff=dense_d_ff,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attn_bias=attn_bias, qk_norm=qk_norm,
        moe=moe, init_std=init_std,
    )



# ----------------------------------------------------------------------------------------- export

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_keys(model_type: str, cfg: ModelConfig) -> list[str]:
    """Every tensor name of the HF checkpoint of ``cfg`` as ``model_type`` (per-expert keys, layer by layer,
    the order ``save_pretrained`` uses)."""
    mt = _check_model_type(model_type)
    keys = ["model.embed_tokens.weight"]
    moe = "block_sparse_moe" if mt == "mixtral" else "mlp"
    proj = ("w1", "w2", "w3") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        keys.append(f"{p}.input_layernorm.weight")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.append(f"{p}.self_attn.{name}.weight")
            if cfg.attn_bias and name != "o_proj":
                keys.append(f"{p}.self_attn.{name}.bias")
        if cfg.qk_norm:
            keys += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        keys.append(f"{p}.post_attention_layernorm.weight")
        if cfg.is_moe_layer(i):
            keys.append(f"{p}.{moe}.gate.weight")
            keys += [f"{p}.{moe}.experts.{e}.{w}.weight" for e in range(cfg.moe.num_experts) for w in proj]
            if cfg.moe.num_shared_experts > 0:
                keys += [f"{p}.mlp.shared_expert.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
                if cfg.moe.shared_expert_gate:
                    keys.append(f"{p}.mlp.shared_expert_gate.weight")
        else:
            keys += [f"{p}.mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
    keys.append("model.norm.weight")
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return keys


def hf_export_plan(model_type: str, cfg: ModelConfig) -> list[tuple[str, TensorMap]]:
    """(HF key, where it comes from) for every tensor of the HF checkpoint: ``TensorMap(semoe name, op)``
    with op "copy" or "t" (a 2-D transpose, its own inverse). Built by sending each HF key through
    :func:`hf_key_to_semoe`, so it is the exact inverse of the import."""
    plan = []
    seen: set[str] = set()
    for key in hf_keys(model_type, cfg):
        maps = hf_key_to_semoe(model_type, key)
        assert len(maps) == 1 and maps[0].op in ("copy", "t"), (key, maps)  # per-expert keys map one to one
        assert maps[0].name not in seen, maps[0].name
        seen.add(maps[0].name)
        plan.append((key, maps[0]))
    return plan


def export_tensor(tmap: TensorMap, t: torch.Tensor) -> torch.Tensor:
    """The HF tensor for semoe tensor ``t`` under ``tmap`` (from :func:`hf_export_plan`), contiguous."""
    return (t.t() if tmap.op == "t" else t).contiguous()


def export_problems(cfg: ModelConfig, model_type: str) -> list[str]:
    """Why ``cfg`` cannot be written as an HF ``model_type`` checkpoint that computes the same function
    (empty: it can). Training-only settings (capacity, z-loss, noise) are not problems: HF runs dropless."""
    mt = _check_model_type(model_type)
    moe, rc = cfg.moe, cfg.moe.router
    out = []
    if moe.activation != "swiglu":
        out.append(f"the experts use {moe.activation!r}; Mixtral, Qwen2-MoE and OLMoE experts are SwiGLU (silu)")
    if rc.kind != "topk" or rc.score_func != "softmax":
        out.append(f"the router is {rc.kind!r} with {rc.score_func!r} scores; HF routes top-k over a softmax")
    if rc.second_expert != "topk":
        out.append("router.second_expert='random' (GShard) has no HF equivalent")
    if rc.noise == "gaussian":
        out.append("router.noise='gaussian' has a learned noise projection HF does not have")
    if rc.noise == "jitter" and mt != "mixtral":
        out.append(f"router jitter exists in Mixtral only, not in {mt}")
    if rc.bias_update_rate > 0:
        out.append("router.bias_update_rate > 0 (aux-loss-free balancing) changes expert selection with a bias "
                   "HF does not have")
    shared = moe.num_shared_experts > 0
    if mt == "mixtral":
        if not rc.normalize_topk:
            out.append("Mixtral always renormalises the top-k weights, the model has router.normalize_topk=false")
        if cfg.attn_bias or cfg.qk_norm or shared or cfg.moe_every != 1:
            out.append("Mixtral has no q/k/v bias, no qk-norm, no shared expert and an MoE FFN in every layer")
    elif mt == "qwen2_moe":
        if not (shared and moe.shared_expert_gate):
            out.append("Qwen2-MoE has a gated shared expert in every MoE layer (model.moe.num_shared_experts >= 1 "
                       "with shared_expert_gate=true)")
        if cfg.qk_norm:
            out.append("Qwen2-MoE has no qk-norm")
    else:
        if not cfg.qk_norm:
            out.append("OLMoE normalises q and k (model.qk_norm=true)")
        if cfg.attn_bias or shared or cfg.moe_every != 1:
            out.append("OLMoE has no q/k/v bias, no shared expert and an MoE FFN in every layer")
    return out


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF architecture that computes what ``cfg`` computes, for a model that was not imported from HF;
    ``ValueError`` listing, per architecture, why none does."""
    if cfg.qk_norm:
        order = ["olmoe"]
    elif cfg.moe.num_shared_experts > 0 or cfg.attn_bias or cfg.moe_every != 1:
        order = ["qwen2_moe"]
    else:
        order = ["mixtral", "olmoe", "qwen2_moe"]
    reasons = {}
    for mt in order:
        problems = export_problems(cfg, mt)
        if not problems:
            return mt
        reasons[mt] = problems
    detail = "; ".join(f"{mt}: {', '.join(p)}" for mt, p in reasons.items())
    hint = (" (train with --set model.moe.router.normalize_topk=true to make it a Mixtral)"
            if "mixtral" in reasons and len(reasons["mixtral"]) == 1 and not cfg.moe.router.normalize_topk else "")
    raise ValueError(f"this semoe model has no HF architecture that computes the same function: {detail}{hint}")


def _same_function(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Differences between two model configs that change what the model computes in inference or how
    HF trains it (router losses), ignoring semoe-only training settings (capacity, noise seed, expert impl)."""
    ignore = {"capacity_factor", "eval_capacity_factor", "min_capacity", "drop_policy", "seed", "jitter_eps",
              "expert_impl", "init_std", "z_loss_coef", "aux_loss_scope"}

    def flat(d: dict, pre: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            elif k not in ignore:
                out[f"{pre}{k}"] = v
        return out

    fa, fb = flat(dataclasses.asdict(a)), flat(dataclasses.asdict(b))
    if a.moe_every == b.moe_every == 1:  # no dense layer: its width is unused
        fa.pop("dense_d_ff"), fb.pop("dense_d_ff")
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def hf_config_from_semoe(cfg: ModelConfig, model_type: str | None = None, base: dict[str, Any] | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as an HF ``model_type`` (default: :func:`infer_model_type`).

    ``base``: the original config.json of an imported model. When the model still has the config that
    ``base`` describes it is kept as it is (only the dtype is set), so an import-export round trip gives
    the same file; otherwise the fields semoe determines are overwritten. The result is checked by
    importing it again: it must give back ``cfg`` (up to semoe-only training settings)."""
    mt = _check_model_type(model_type or (base or {}).get("model_type") or infer_model_type(cfg))
    problems = export_problems(cfg, mt)
    if problems:
        raise ValueError(f"the model cannot be exported as {mt}: {'; '.join(problems)}")
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"export dtype {dtype} is not supported; choose one of {list(_TORCH_DTYPE_NAMES.values())}")
    out: dict[str, Any] = dict(base) if base else {}
    if not (base and base.get("model_type") == mt and not _same_function(model_config_from_hf(base), cfg)):
        moe, rc = cfg.moe, cfg.moe.router
        fields: dict[str, Any] = {
            "model_type": mt, "architectures": [ARCHITECTURES[mt]], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "initializer_range": cfg.init_std, "num_experts_per_tok": rc.top_k,
            "router_aux_loss_coef": rc.aux_loss_coef, "attention_dropout": 0.0,
        }
        if cfg.head_dim is not None and cfg.head_dim != cfg.d_model // cfg.n_heads:
            fields["head_dim"] = cfg.head_dim
        if "rope_theta" in out and "rope_parameters" not in out:
            fields["rope_theta"] = cfg.rope_theta
        else:
            fields["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
        if mt == "mixtral":
            fields.update(num_local_experts=moe.num_experts, intermediate_size=moe.d_ff,
                          router_jitter_noise=rc.jitter_eps if rc.noise == "jitter" else 0.0)
            if out.get("sliding_window") is not None and int(out["sliding_window"]) < cfg.max_seq_len:
                fields["sliding_window"] = None
        elif mt == "qwen2_moe":
            fields.update(num_experts=moe.num_experts, moe_intermediate_size=moe.d_ff,
                          intermediate_size=cfg.dense_d_ff, shared_expert_intermediate_size=moe.shared_hidden,
                          norm_topk_prob=rc.normalize_topk, decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                          qkv_bias=cfg.attn_bias, use_sliding_window=False)
        else:
            fields.update(num_experts=moe.num_experts, intermediate_size=moe.d_ff, norm_topk_prob=rc.normalize_topk,
                          attention_bias=False, clip_qkv=None)
        out.update(fields)
    out["dtype"] = _TORCH_DTYPE_NAMES[dtype]
    if "torch_dtype" in out:
        out["torch_dtype"] = out["dtype"]
    diff = _same_function(model_config_from_hf(out), cfg)
    if diff:  # a field semoe does not write, or a mapping bug: refuse rather than write a different model
        raise ValueError(f"the exported {mt} config would not describe this model: {'; '.join(diff[:6])}")
    return out


# ------------------------------------------------------------------------------------------ files


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` dict of an HF checkpoint directory."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{path} has no config.json; pass an HF checkpoint directory")
    with f.open() as fh:
        return json.load(fh)


def checkpoint_files(path: str | Path) -> list[tuple[Path, list[str]]]:
    """(safetensors file, its tensor names) of a checkpoint directory: ``model.safetensors`` or the
    shards listed by ``model.safetensors.index.json`` (all checked to exist)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as fh:
            weight_map: dict[str, str] = json.load(fh).get("weight_map") or {}
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        out = []
        for fname, keys in by_file.items():
            f = path / fname
            if not f.is_file():
                raise ValueError(f"shard {fname!r} listed in {index.name} is missing from {path}")
            out.append((f, keys))
        return out
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as fh:
            return [(single, list(fh.keys()))]
    raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                     "(only safetensors checkpoints are read)")


def iter_semoe_tensors(path: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an HF checkpoint as (semoe name, tensor), one HF tensor read at a time; expert tensors
    come one per global expert (``layers.{i}.moe.experts.{e}.w1`` ``[D, F]``, ``w3`` ``[D, F]``,
    ``w2`` ``[F, D]``). Every name is checked before the first tensor is read. ``dtype``: cast to it
    (default: as stored). With tied embeddings a stored ``lm_head.weight`` is skipped."""
    hf = read_hf_config(path)
    mt = _check_model_type(hf.get("model_type"))
    tied = bool(hf.get("tie_word_embeddings", False))
    files = checkpoint_files(path)
    plan = [(f, [(k, hf_key_to_semoe(mt, k)) for k in keys]) for f, keys in files]
    for f, items in plan:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            present = set(fh.keys())
            for key, maps in items:
                if key not in present:
                    raise ValueError(f"tensor {key!r} is listed for {f.name} but that file does not contain it")
                if not maps or (tied and key == "lm_head.weight"):
                    continue
                t = fh.get_tensor(key)
                for tmap in maps:
                    for name, x in convert_tensor(tmap, t):
                        yield name, (x.to(dtype) if dtype is not None else x)
                del t


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> MoETransformer:
    """Build a :class:`MoETransformer` from an HF Mixtral / Qwen2-MoE / OLMoE checkpoint directory.

    The model is built on the meta device, allocated empty on ``device`` in ``dtype``, and filled
    tensor by tensor from :func:`iter_semoe_tensors` (the state dict is never held twice). Every
    parameter must be covered, else ``ValueError`` names what is missing. Returned in eval mode.
    """
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for buf in model.buffers():  # semoe buffers start at zero (router expert_bias, call counter)
            buf.zero_()
    params = dict(model.named_parameters())
    need_experts: dict[str, int] = {n: p.shape[0] for n, p in params.items() if _is_stacked_expert(n)}
    filled: set[str] = set()
    filled_experts: dict[str, set[int]] = {n: set() for n in need_experts}
    with torch.no_grad():
        for name, t in iter_semoe_tensors(path):
            target, e = semoe_param_slot(name)
            p = params.get(target)
            if p is None or (e is None) == (target in need_experts):
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model ({cfg.n_layers} layers, "
                                 f"moe_every={cfg.moe_every}); config.json and the weights disagree")
            if e is not None and not 0 <= e < need_experts[target]:
                raise ValueError(f"checkpoint tensor {name!r}: expert {e} out of range "
                                 f"(model has {need_experts[target]} experts)")
            dst = p[e] if e is not None else p
            if tuple(dst.shape) != tuple(t.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
            dst.copy_(t)
            if e is not None:
                filled_experts[target].add(e)
            else:
                filled.add(target)
    missing = [n for n in params if n not in need_experts and n not in filled]
    missing += [f"{n} (experts {sorted(set(range(need_experts[n])) - got)})"
                for n, got in filled_experts.items() if len(got) < need_experts[n]]
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    model.eval()
    log.info("loaded %s checkpoint %s: %d layers, %d experts", hf["model_type"], path, cfg.n_layers,
             cfg.moe.num_experts)
    return model


# ---------------------------------------------------------------------------- the source of a run

#: HF side files a semoe checkpoint carries (under these names: a ``config.json`` would make the folder look
#: like an HF checkpoint), so that ``semoe convert --to-hf`` writes back the original config and tokenizer files.
HF_SIDE_FILES = {"config.json": "hf_config.json", "generation_config.json": "hf_generation_config.json",
                 "tokenizer_config.json": "hf_tokenizer_config.json",
                 "special_tokens_map.json": "hf_special_tokens_map.json"}
_FINGERPRINT_BLOCKS, _BLOCK = 16, 1 << 16


def hf_fingerprint(path: str | Path) -> str:
    """A content fingerprint of an HF checkpoint folder that reads little: config.json, and of every
    safetensors file its size, its header and 16 blocks of 64 KiB spread over the data (two checkpoints of
    the same architecture but other weights differ in those blocks; a full hash of a 90 GB model would
    take minutes)."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f, _ in checkpoint_files(path):
        size = f.stat().st_size
        h.update(f"|{f.name}|{size}|".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, size)))
            start = 8 + n
            for i in range(_FINGERPRINT_BLOCKS):
                fh.seek(start + (size - start) * i // _FINGERPRINT_BLOCKS)
                h.update(fh.read(_BLOCK))
    return h.hexdigest()[:32]


def hf_source_record(path: str | Path) -> dict[str, Any]:
    """What a semoe checkpoint records about the HF checkpoint it came from (``manifest["hf_source"]``):
    model type, folder, :func:`hf_fingerprint` and the stored weight dtype (the default of an export)."""
    path = Path(path)
    hf = read_hf_config(path)
    mt = _check_model_type(hf.get("model_type"))
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    if dtype not in _TORCH_DTYPE_NAMES.values():
        f, keys = checkpoint_files(path)[0]
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            stored = fh.get_slice(keys[0]).get_dtype()
        dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")
    return {"model_type": mt, "path": str(path.resolve()), "fingerprint": hf_fingerprint(path), "dtype": dtype}


def _is_stacked_expert(param_name: str) -> bool:
    return re.fullmatch(r"layers\.\d+\.moe\.experts\.w[123]", param_name) is not None


__all__ = ["ARCHITECTURES", "HF_SIDE_FILES", "SUPPORTED_MODEL_TYPES", "TensorMap", "checkpoint_files", "convert_tensor",
           "converted_shapes", "export_problems", "export_tensor", "hf_config_from_semoe", "hf_export_plan",
           "hf_fingerprint", "hf_key_to_semoe", "hf_keys", "hf_source_record", "infer_model_type",
           "iter_semoe_tensors", "load_hf_checkpoint", "model_config_from_hf", "read_hf_config",
           "semoe_param_slot"]
