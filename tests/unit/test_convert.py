"""``semoe convert --from-hf``: the semoe checkpoint holds exactly the mapped tensors, loads into the same model,
serves the ring engine and the CLI, is written with bounded memory, and bad input is refused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from semoe.cli.main import main
from semoe.inference.convert import convert_hf_checkpoint
from semoe.inference.load import load_checkpoint_model
from semoe.inference.ring import MiB, ring_generate
from semoe.inference.sections import open_model
from semoe.models.hf import iter_semoe_tensors, load_hf_checkpoint
from semoe.storage.checkpoint import read_manifest
from semoe.storage.safetensors_io import load_file, read_header

from .test_ring import PROMPTS, build_hf, hf_greedy, write_word_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qwen_sharded(tmp_path_factory):
    """A sharded Qwen2-MoE checkpoint (shared expert, q/k/v bias) with a tokenizer."""
    hf = build_hf("qwen2_moe", seed=7)
    d = tmp_path_factory.mktemp("qwen_sharded")
    hf.save_pretrained(d, safe_serialization=True, max_shard_size="400KB")
    assert (d / "model.safetensors.index.json").is_file()
    write_word_tokenizer(d)
    return hf, d


@pytest.mark.numerics
def test_convert_equals_mapping_and_model(qwen_sharded, tmp_path) -> None:
    hf, src = qwen_sharded
    out = convert_hf_checkpoint(src, tmp_path / "semoe")
    manifest = read_manifest(out, verify=True)  # sizes and sha256 of every file
    assert manifest["format"] == "semoe-checkpoint" and manifest["config"]["model"]["n_layers"] == 12
    names = sorted(p.name for p in out.iterdir())
    assert names == ["hf_config.json", "hf_generation_config.json", "manifest.json", "model-dense.safetensors",
                     *[f"model-experts-{i:05d}.safetensors" for i in range(12)], "tokenizer.json"]
    assert manifest["hf_source"]["model_type"] == "qwen2_moe" and manifest["hf_source"]["dtype"] == "float32"
    written = {}
    for f in out.glob("model-*.safetensors"):
        written.update(load_file(f))
    want = dict(iter_semoe_tensors(src))
    buffers = {k for k in written if k not in want}
    assert buffers == {f"layers.{i}.moe.router.{b}" for i in range(12) for b in ("expert_bias", "calls")}
    for name, t in want.items():
        assert torch.equal(written[name], t), name
    assert read_header(out / "model-experts-00003.safetensors").tensors.keys() == {
        f"layers.3.moe.experts.{e}.{w}" for e in range(8) for w in ("w1", "w2", "w3")}
    # the trainer's loader reads it into the same model as the HF importer
    ours, tok, _ = load_checkpoint_model(out)
    ref = load_hf_checkpoint(src)
    tokens = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(ours(tokens).logits, ref(tokens).logits, atol=0, rtol=0)
    assert tok is not None
    # and the ring engine serves it: greedy tokens equal transformers'
    source = open_model(out)
    assert source.fmt == "semoe"
    budget = source.param_bytes(torch.float32) // 4
    assert ring_generate(out, PROMPTS, 4, max_memory=budget).tokens == [hf_greedy(hf, p, 4)[0] for p in PROMPTS]


def test_convert_cli_bf16_then_generate(qwen_sharded, tmp_path, capsys) -> None:
    _, src = qwen_sharded
    out = tmp_path / "bf16"
    assert main(["convert", "--from-hf", str(src), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "semoe checkpoint:" in capsys.readouterr().out
    assert all(i.dtype == torch.bfloat16 for i in read_header(out / "model-experts-00000.safetensors").tensors.values())
    assert main(["generate", "--model", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "--temperature",
                 "0", "--max-memory", "4MB"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("w1 w2 w3 w") and len(text[0].split()) == 6 and text[1].startswith("tokens/s:")


def test_convert_bad_input(qwen_sharded, tmp_path, capsys) -> None:
    _, src = qwen_sharded
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    assert main(["convert", "--from-hf", str(src), "--out", str(taken)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err and (taken / "x").read_text() == "keep me"
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "--from-hf", str(llama), "--out", str(tmp_path / "o1")]) == 2
    assert "supported: ['mixtral', 'qwen2_moe', 'olmoe']" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    shards = sorted(src.glob("model-*.safetensors"))
    for f in src.iterdir():
        if f != shards[-1]:
            (broken / f.name).write_bytes(f.read_bytes())
    assert main(["convert", "--from-hf", str(broken), "--out", str(tmp_path / "o3")]) == 2
    assert shards[-1].name in capsys.readouterr().err
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written


CONVERT_SCRIPT = textwrap.dedent("""
    import json, sys
    from semoe.inference.convert import convert_hf_checkpoint
    from semoe.inference.ring import process_memory
    base = process_memory()
    convert_hf_checkpoint(sys.argv[1], sys.argv[2])
    print(json.dumps({"base": base, "end": process_memory()}))
""")


def test_convert_memory_is_bounded(tmp_path) -> None:
    """Converting a ~45 MB checkpoint grows the process by a fixed amount, far less than the model."""
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=192, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    src = tmp_path / "hf"
    transformers.MixtralForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    size = (src / "model.safetensors").stat().st_size
    assert size > 40 * MiB
    proc = subprocess.run([sys.executable, "-c", CONVERT_SCRIPT, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["end"]["peak_rss"] - m["base"]["rss"]
    # ~14 MiB measured, the same for a 67 MB model: sha256 chunks (4 MiB), library pages, one tensor at a time
    assert grew < 20 and size / MiB > 2 * 20, m
    assert sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")) >= size * 0.99
