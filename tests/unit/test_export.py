"""``semoe convert --to-hf``: HF -> semoe -> HF gives the original tensors bit for bit (float32 and bfloat16,
sharded), transformers' ``from_pretrained`` loads every export and its logits match semoe's, a fine-tune with a
changed config writes that config, semoe-native models are exported as the architecture that computes the same
function or refused with the reasons, and bad input leaves nothing behind.

Logit tolerance as in ``test_hf_parity.py`` (float32, different summation orders, <= 1.5e-7 measured on logits of
magnitude < 1): 1e-4."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from semoe.cli.main import main
from semoe.config import ModelConfig, MoEConfig, RouterConfig, RunConfig, replace, to_dict
from semoe.inference.convert import convert_hf_checkpoint, convert_to_hf
from semoe.inference.load import load_checkpoint_model
from semoe.models.hf import export_problems, hf_export_plan, infer_model_type
from semoe.models.recipes import tiny
from semoe.models.transformer import MoETransformer
from semoe.storage import checkpoint as ckpt
from semoe.storage.safetensors_io import load_file
from semoe.training.data import train_or_load_tokenizer
from tests.hf_helpers import TINY_FAMILIES, build_tiny_hf, save_tiny_hf

transformers = pytest.importorskip("transformers")


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def semoe_logits(ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_checkpoint_model(ckpt_dir)
    with torch.no_grad():
        return model(tokens).logits


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.numerics
@pytest.mark.parametrize(("family", "dtype"), [(f, torch.float32) for f in TINY_FAMILIES] +
                         [("mixtral", torch.bfloat16)])
def test_roundtrip_bit_identical_and_loads(family: str, dtype: torch.dtype, tmp_path: Path) -> None:
    hf = build_tiny_hf(family, seed=4).to(dtype)
    src = save_tiny_hf(hf, tmp_path / "hf", max_shard_size="150KB", bos=family == "mixtral")
    semoe_ckpt = convert_hf_checkpoint(src, tmp_path / "semoe")
    out = convert_to_hf(semoe_ckpt, tmp_path / "export", max_shard_size="150KB")
    orig, back = hf_tensors(src), hf_tensors(out)
    assert sorted(orig) == sorted(back)
    for key, t in orig.items():  # same dtype, shape and bits, tensor by tensor
        assert back[key].dtype == t.dtype == dtype and torch.equal(back[key], t), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(orig) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in orig.values())
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((src / name).read_text()), name
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # transformers loads it; its logits are semoe's
    tokens = torch.randint(3, 128, (2, 11))
    ref = hf_logits(out, tokens)
    torch.testing.assert_close(ref, semoe_logits(semoe_ckpt, tokens).to(ref.dtype), atol=1e-4, rtol=0)


def test_trained_checkpoint_with_changed_config(tmp_path: Path) -> None:
    """A fine-tune (trainer checkpoint, float32 master weights) with an override: the export writes the new
    coefficient and everything else from the original config; --dtype casts."""
    from semoe.training.init import PretrainedInit
    from semoe.training.trainer import Trainer
    from tests.unit.test_finetune import finetune_run, write_sft

    src = save_tiny_hf(build_tiny_hf("olmoe", seed=5), tmp_path / "hf", bos=False)
    init = PretrainedInit.from_hf(src)
    run = finetune_run(init, write_sft(tmp_path / "d.jsonl"), steps=1)
    run = replace(run, model=replace(run.model, moe=replace(run.model.moe, router=replace(
        run.model.moe.router, aux_loss_coef=0.05))))
    t = Trainer(run, tmp_path / "run", tmp_path / "cache", resume=None, init=init)
    t.train_step(0)
    t.save(1)
    out = tmp_path / "export"
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    cfg, orig = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert cfg["router_aux_loss_coef"] == 0.05 and cfg["dtype"] == "bfloat16"
    assert {k: v for k, v in cfg.items() if k not in ("router_aux_loss_coef", "dtype")} == \
        {k: v for k, v in orig.items() if k not in ("router_aux_loss_coef", "dtype")}
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(out).values())
    tokens = torch.randint(3, 128, (1, 9))
    ref = hf_logits(out, tokens)  # upcast to float32 on load: the bf16-rounded weights
    model = t.model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ours = model(tokens).logits
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=0)


def native_cfg(**kw) -> ModelConfig:
    rc = RouterConfig(top_k=2, capacity_factor=1.25, eval_capacity_factor=None, normalize_topk=kw.pop("norm", True))
    moe_kw = {k: kw.pop(k) for k in list(kw) if k in ("num_shared_experts", "shared_d_ff", "shared_expert_gate",
                                                     "activation")}
    moe = MoEConfig(d_model=64, d_ff=96, num_experts=4, router=rc, **{"activation": "swiglu", **moe_kw})
    return ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, moe=moe,
                       dense_d_ff=80, **kw)


def save_native(cfg: ModelConfig, folder: Path, tokenizer: Path) -> Path:
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "router" in name or name.endswith("shared.gate"):
                p.normal_(std=0.3)
    return ckpt.save_checkpoint(folder, 3, model, None, {"config": to_dict(RunConfig(model=cfg))},
                                extra_files={"tokenizer.json": tokenizer})


@pytest.mark.numerics
@pytest.mark.parametrize(("kind", "kw"), [
    ("mixtral", {}),
    ("olmoe", {"qk_norm": True, "norm": False}),
    ("qwen2_moe", {"attn_bias": True, "moe_every": 2, "num_shared_experts": 1, "shared_d_ff": 48,
                   "shared_expert_gate": True, "norm": False}),
])
def test_native_model_exports_as_the_matching_architecture(kind: str, kw: dict, tmp_path: Path) -> None:
    tok = tmp_path / "tok.json"
    train_or_load_tokenizer(["the king and queen of our land shall speak to thee " * 50], 300, tok)
    cfg = native_cfg(**kw)
    assert infer_model_type(cfg) == kind
    step = save_native(cfg, tmp_path / "ckpts", tok)
    out = convert_to_hf(step, tmp_path / "export")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == kind and hf_cfg["eos_token_id"] == 0  # semoe's <|endoftext|>
    tokens = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(hf_logits(out, tokens), semoe_logits(step, tokens), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok("the king").input_ids == \
        train_or_load_tokenizer([], 300, tok).encode("the king").ids


def test_native_model_without_hf_equivalent_is_refused(tmp_path: Path, capsys) -> None:
    tok = tmp_path / "tok.json"
    train_or_load_tokenizer(["some text to train on " * 40], 300, tok)
    step = save_native(replace(tiny().model, vocab_size=300), tmp_path / "ckpts", tok)  # top-k not renormalised
    out = tmp_path / "export"
    assert main(["convert", "--to-hf", str(step), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no HF architecture" in err and "Mixtral always renormalises" in err and "normalize_topk=true" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    gelu = native_cfg(activation="gelu")
    assert any("SwiGLU" in p for p in export_problems(gelu, "mixtral"))
    with pytest.raises(ValueError, match="SwiGLU"):
        convert_to_hf(save_native(gelu, tmp_path / "gelu", tok), tmp_path / "g")
    assert export_problems(native_cfg(), "olmoe") == ["OLMoE normalises q and k (model.qk_norm=true)"]


def test_to_hf_bad_input(tmp_path: Path, capsys) -> None:
    src = save_tiny_hf(build_tiny_hf("mixtral", seed=6), tmp_path / "hf")
    semoe_ckpt = convert_hf_checkpoint(src, tmp_path / "semoe")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    assert main(["convert", "--to-hf", str(semoe_ckpt), "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "x").read_text() == "keep me"
    assert main(["convert", "--to-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(src), "--out", str(tmp_path / "o2")]) == 2  # an HF folder, not semoe
    assert "no semoe checkpoint" in capsys.readouterr().err
    # a trained aux-loss-free bias has no HF counterpart
    model, _, run = load_checkpoint_model(semoe_ckpt)
    with torch.no_grad():
        model.layers[0].moe.router.expert_bias[1] = 0.5
    biased = ckpt.save_checkpoint(tmp_path / "biased", 1, model, None, {"config": to_dict(run)})
    with pytest.raises(ValueError, match="expert_bias is not zero"):
        convert_to_hf(biased, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()
    # a checkpoint missing an expert tensor is refused before anything is written
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in semoe_ckpt.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((cut / "manifest.json").read_text())
    (cut / "model-experts-00001.safetensors").unlink()
    del manifest["files"]["model-experts-00001.safetensors"]
    (cut / "manifest.json").write_text(json.dumps(manifest))
    assert main(["convert", "--to-hf", str(cut), "--out", str(tmp_path / "o4")]) == 2
    assert "lacks tensors" in capsys.readouterr().err and not (tmp_path / "o4").exists()


def test_export_plan_is_the_inverse_of_the_import() -> None:
    cfg = native_cfg(attn_bias=True, moe_every=2, num_shared_experts=1, shared_d_ff=48, shared_expert_gate=True)
    plan = hf_export_plan("qwen2_moe", cfg)
    names = [t.name for _, t in plan]
    assert len(names) == len(set(names))
    params = {n for n, _ in MoETransformer(cfg).named_parameters()}
    stacked = {n.rsplit(".", 2)[0] + "." + n.rsplit(".", 1)[1] if ".experts." in n else n for n in names}
    assert stacked == params  # every parameter, each expert once
