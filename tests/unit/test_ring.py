"""Ring-memory inference: greedy tokens and logits equal transformers' on tiny random HF Mixtral / Qwen2-MoE /
OLMoE checkpoints (ring on with a budget <= 1/4 of the model, and off), the memory bound in a subprocess,
the CLI, and every bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from semoe.cli.main import main
from semoe.inference.ring import MiB, RingEngine, parse_size, ring_generate
from semoe.inference.sections import open_model, plan_sections
from tests.hf_helpers import assert_clear_margins, randomize_hf

transformers = pytest.importorskip("transformers")

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, num_experts_per_tok=2, max_position_embeddings=64)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, moe_intermediate_size=64, shared_expert_intermediate_size=48)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, norm_topk_prob=True)),
}
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26]]
NEW = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine idle OpenMP threads
    spinning against other processes make them many times slower: one thread here, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_hf(family: str, seed: int = 0, **overrides):
    """A tiny random HF model in eval mode, float32, with non-trivial norms and routers."""
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides}, attn_implementation="sdpa")
    return randomize_hf(getattr(transformers, model_name)(cfg))


def write_word_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer.json whose token i is the word "w{i}" (offline, for the CLI)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def hf_greedy(hf, prompt: list[int], new: int, eos: int | None = None) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of one prompt, and the logits of each step [n, V]."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                          min_new_tokens=0 if eos is not None else new, eos_token_id=eos, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits)[:, 0].float()
    assert_clear_margins(logits)
    return out.sequences[0, len(prompt):].tolist(), logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_ckpt(request, tmp_path_factory):
    family = request.param
    hf = build_hf(family)
    d = tmp_path_factory.mktemp(family)
    hf.save_pretrained(d, safe_serialization=True)
    refs = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    return family, hf, d, refs


def model_bytes(d: Path) -> int:
    """Bytes of the model's weights in float32 (what "the model" is when a budget is a fraction of it)."""
    return open_model(d).param_bytes(torch.float32)


# ------------------------------------------------------------------------------------ correctness


@pytest.mark.numerics
@pytest.mark.parametrize("ring", ["on", "off"])
def test_greedy_and_logits_match_transformers(family_ckpt, ring: str) -> None:
    family, _, d, refs = family_ckpt
    budget = model_bytes(d) // 4 if ring == "on" else None
    with RingEngine(d, max_memory=budget, batch_size=2, strategy="layer" if ring == "on" else "auto") as engine:
        assert engine.resident == (ring == "off")
        if ring == "on":
            assert engine.num_slots == 2 and engine.plan.total_bytes >= 4 * budget
        S = len(engine.plan.sections)
        assert S == COMMON["num_hidden_layers"] + 2
        result = engine.generate(PROMPTS, NEW, return_logits=True)
    assert result.tokens == [r[0] for r in refs], family  # hf_greedy checked the references' top-2 margins
    for ours, (_, ref) in zip(result.logits, refs):  # float32 vs float32, other op orders: see test_hf_parity
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    st = result.stats
    assert st.passes == NEW and st.new_tokens == NEW * len(PROMPTS) and st.prompt_tokens == sum(map(len, PROMPTS))
    # ring on: every pass streams every section; off: each section is read once
    assert st.loads == (NEW * S if ring == "on" else S)
    total = sum(r.nbytes for s in engine.plan.sections for r in s.reads)
    assert st.bytes_read == (NEW * total if ring == "on" else total)
    assert st.compute_s > 0 and st.wall_s >= st.compute_s


@pytest.mark.numerics
def test_eos_and_per_sequence_limits(family_ckpt) -> None:
    _, hf, d, refs = family_ckpt
    first = refs[0][0]
    stop = next(j for j in range(1, NEW) if first[j] not in first[:j])  # a token prompt 0 first makes at step j
    eos = first[stop]
    limits = [NEW, 2, NEW, 1]
    result = ring_generate(d, PROMPTS, limits, max_memory=model_bytes(d) // 4, batch_size=3, eos_id=eos)
    for prompt, limit, got in zip(PROMPTS, limits, result.tokens):
        want, _ = hf_greedy(hf, prompt, limit, eos=eos)
        assert got == want
    assert result.tokens[0] == first[:stop + 1]
    assert [len(t) for t in result.tokens][1::2] == [2, 1]


def test_sections_slots_waves_and_kv_staging(tmp_path) -> None:
    """Granularity, K > 2, several waves and the KV-staging path (host cache -> device) change nothing."""
    hf = build_hf("qwen2_moe", seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    refs = [hf_greedy(hf, p, NEW)[0] for p in PROMPTS]
    size = model_bytes(tmp_path)
    slot3 = plan_sections(open_model(tmp_path), layers_per_section=3).slot_bytes
    with RingEngine(tmp_path, max_memory=3 * slot3 + MiB // 2, slots=3, layers_per_section=3, batch_size=2) as engine:
        assert [s.units for s in engine.plan.sections][:2] == [("embed", "layer.0", "layer.1"),
                                                               ("layer.2", "layer.3", "layer.4")]
        assert engine.num_slots == 3 and not engine.resident
        assert engine.generate(PROMPTS, NEW).tokens == refs
    # a budget that holds one micro-batch at a time: the prompts run in several waves
    with RingEngine(tmp_path, max_memory=size // 4, batch_size=1) as engine:
        room = engine.budget - engine.ring_bytes
        one = engine._resident_bytes([(1, 7, 7 + NEW - 1, 1)])
        engine.budget = engine.ring_bytes + int(1.5 * one)  # room for exactly one sequence
        assert room > one
        result = engine.generate(PROMPTS, NEW)
        assert result.tokens == refs and result.stats.waves > 1
        engine._force_kv_staging = True
        engine.budget = None
        result = engine.generate(PROMPTS, NEW)
        assert result.tokens == refs and result.stats.waves == 1


def test_drop_page_cache_drops_every_read(tmp_path, monkeypatch) -> None:
    """With drop_page_cache the drops are deferred off the loader's path (done by whichever thread would
    wait), but every range read is dropped exactly once, before its section is read again, and none is
    left pending at close; the tokens do not change."""
    from semoe.storage.safetensors_io import SafetensorsReader
    from semoe.storage.tensor_io import ReadRun

    hf = build_hf("mixtral", seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    refs = [hf_greedy(hf, p, NEW)[0] for p in PROMPTS]
    dropped: list[tuple[int, int]] = []
    real = SafetensorsReader.drop_cache
    monkeypatch.setattr(SafetensorsReader, "drop_cache",
                        lambda self, offset=0, nbytes=0: (dropped.append((offset, nbytes)), real(self, offset, nbytes)))
    engine = RingEngine(tmp_path, max_memory=model_bytes(tmp_path) // 4, batch_size=2, drop_page_cache=True,
                        strategy="layer")
    ring = engine._ring
    reads: list[tuple[int, int]] = []
    real_load = type(ring)._load

    def load(self, ticket: int, section: int, mode: str = "full") -> None:
        assert not any(d[3] == section for d in self._drops), "a section is read before its last read is dropped"
        real_load(self, ticket, section, mode)
        reads.extend((op.offset, op.nbytes) if isinstance(op, ReadRun) else (op[2], op[3])
                     for op in self._programs[(section, ticket % self.K, "full")])

    monkeypatch.setattr(type(ring), "_load", load)
    assert engine.generate(PROMPTS, NEW).tokens == refs
    engine.close()
    assert not ring._drops and sorted(dropped) == sorted(reads) and len(reads) > len(engine.plan.sections)


def test_sharded_fused_and_bf16_checkpoints(tmp_path) -> None:
    hf = build_hf("mixtral", seed=2)
    refs = [hf_greedy(hf, p, NEW)[0] for p in PROMPTS]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="300KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 3
    size = model_bytes(sharded)
    assert ring_generate(sharded, PROMPTS, NEW, max_memory=size // 4).tokens == refs
    # transformers-5 in-memory names: experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F], one region each
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((sharded / "config.json").read_text())
    plan = plan_sections(open_model(fused))
    assert any(r.key.startswith("src:") for s in plan.sections for r in s.regions)
    assert ring_generate(fused, PROMPTS, NEW, max_memory=size // 4).tokens == refs
    # bfloat16 weights, float32 compute: cast through the staging area, equal to transformers on the same weights
    bf = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(bf, safe_serialization=True)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(bf, dtype=torch.float32).eval()
    engine = RingEngine(bf, max_memory=size // 4)
    assert engine.plan.staging_bytes > 0
    with engine:
        assert engine.generate(PROMPTS, NEW).tokens == [hf_greedy(hf32, p, NEW)[0] for p in PROMPTS]


def test_semoe_checkpoint_from_training_code(tmp_path) -> None:
    """A checkpoint written by the trainer's save_checkpoint (semoe format, experts split over 2 files) is
    served by the same engine and equals the in-memory model's generate()."""
    from semoe.config import ModelConfig, MoEConfig, RouterConfig, RunConfig, to_dict
    from semoe.inference.generate import generate
    from semoe.models.transformer import MoETransformer
    from semoe.storage.checkpoint import save_checkpoint

    router = RouterConfig(top_k=2, capacity_factor=None, eval_capacity_factor=None)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=32, d_ff=96, num_experts=8, activation="swiglu", router=router))
    torch.manual_seed(3)
    model = MoETransformer(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 7, model, None, {"config": to_dict(RunConfig(model=cfg))})
    want = generate(model, PROMPTS, NEW, temperature=0.0)
    source = open_model(tmp_path / "run")  # a run folder resolves to its newest checkpoint
    assert source.fmt == "semoe" and source.path == ckpt
    for budget in (None, model_bytes(ckpt) // 4):
        assert ring_generate(source, PROMPTS, NEW, max_memory=budget).tokens == want


# ------------------------------------------------------------------------------------ memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from semoe.inference.ring import RingEngine, process_memory
    base = process_memory()
    with RingEngine(sys.argv[1], max_memory=int(sys.argv[2]), batch_size=2, strategy=sys.argv[3]) as engine:
        r = engine.generate([list(range(1, 17)), list(range(3, 19))], 6)
        resident = engine.resident
    end = process_memory()
    print(json.dumps({"base": base, "end": end, "resident": resident, "bytes_read": r.stats.bytes_read,
                      "peak_anon": r.stats.peak_anon_mb, "peak_file": r.stats.peak_file_mb,
                      "routed": r.stats.routed_layer_loads, "cache_inserts": r.stats.cache_inserts,
                  "dense_cache_bytes": r.stats.dense_cache_bytes, "switches": r.stats.layout_switches}))
""")
#: what the process may hold above its RSS after imports, besides the budget: library code pages that the
#: first forward touches (file-backed), thread stacks, allocator slack. docs/inference.md documents it.
OVERHEAD_MIB = 24


def save_memory_test_model(path: Path) -> None:
    """The ~67 MB random Mixtral of the memory tests (CPU and CUDA), saved as an HF folder."""
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=192, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize("strategy", ["layer", "routed"])
def test_peak_rss_within_budget_plus_overhead(tmp_path, strategy: str) -> None:
    """Whole layers streamed, or routed experts with the expert cache filling what the budget leaves: the process
    grows by at most the budget plus the documented overhead."""
    save_memory_test_model(tmp_path)
    disk = model_bytes(tmp_path)
    budget = 16 * MiB
    assert disk >= 4 * budget  # ~67 MB on disk
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(budget), strategy],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not m["resident"]
    if strategy == "layer":
        assert m["bytes_read"] >= 6 * disk * 0.99  # six passes, each streamed from disk
    else:
        # the leftover budget holds cached dense parts (first) and experts: both caches fill it
        # (< 0.95: the prefill of 32 tokens picks every expert; it runs in the decode layout, its extra picks forced
        # into a cache of a few entries, so less of what the cache held survives it than with whole-layer slots)
        assert m["routed"] > 0 and m["dense_cache_bytes"] > 0 and m["bytes_read"] < 6 * disk * 0.95
        assert m["switches"] == 1  # every pass (two sequences, 4 of 8 experts per decode pass) from compact slots
    grew = m["end"]["peak_rss"] - m["base"]["rss"]
    assert grew <= budget / MiB + OVERHEAD_MIB, m
    # the model's file pages never entered the resident set (they are read, not mapped)
    assert m["peak_file"] - m["base"]["file"] < disk / MiB / 2, m


# ------------------------------------------------------------------------------------ API and bad input


def test_parse_size() -> None:
    assert parse_size("300MB") == 300 * MiB and parse_size("2GB") == 2 * 1024 * MiB
    assert parse_size("1.5GiB") == int(1.5 * 1024 * MiB) and parse_size("512k") == 512 * 1024
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1MB", "0", "3XB"):
        with pytest.raises(ValueError, match=r"memory size|cannot read"):
            parse_size(bad)


def test_budget_too_small_states_minimum(family_ckpt) -> None:
    _, _, d, refs = family_ckpt
    plan = plan_sections(open_model(d))
    with pytest.raises(ValueError, match=r"needs at least ([\d.]+) MiB for K=2 slots of the largest section "
                                         r"\(([\d.]+) MiB\)") as e:
        RingEngine(d, max_memory=2 * plan.slot_bytes - 1, strategy="layer")  # (routed passes need less: compact
    # slots, tests/unit/test_ring_routed.py)
    minimum, slot = map(float, re.search(r"at least ([\d.]+) MiB for K=2 slots.*?\(([\d.]+) MiB\)",
                                          str(e.value)).groups())
    assert slot == pytest.approx(plan.slot_bytes / MiB, abs=0.05) and minimum > 2 * slot
    assert "raise --max-memory" in str(e.value)
    # the stated minimum works
    with RingEngine(d, max_memory=f"{minimum + 0.1}MB", strategy="layer") as engine:
        assert engine.generate([PROMPTS[1]], NEW).tokens == [refs[1][0]]
    with pytest.raises(ValueError, match="K=5 slots"):
        RingEngine(d, max_memory=int(3 * plan.slot_bytes), slots=5)


def test_bad_models(tmp_path) -> None:
    hf = build_hf("mixtral", seed=4, num_hidden_layers=2)
    good = tmp_path / "good"
    hf.save_pretrained(good, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(good.glob("model-*.safetensors"))
    assert len(shards) >= 2
    # unsupported architecture: the error lists the supported ones
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"'llama' is not supported.*mixtral.*qwen2_moe.*olmoe"):
        open_model(llama)
    # missing shard
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in good.iterdir():
        if f != shards[1]:
            (missing / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=shards[1].name):
        open_model(missing)
    # corrupt (truncated) shard: named
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes()[:-100] if f == shards[0] else f.read_bytes())
    with pytest.raises(ValueError, match=rf"{shards[0].name}.*truncated"):
        open_model(corrupt)
    # unsupported dtype: integer weights
    int8 = tmp_path / "int8"
    int8.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(sd, str(int8 / "model.safetensors"))
    (int8 / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ValueError, match=r"q_proj\.weight.*torch\.int8.*not supported"):
        open_model(int8)
    with pytest.raises(ValueError, match=r"dtype 'float64' is not supported by the ring engine; choose one of"):
        RingEngine(good, dtype=torch.float64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an HF checkpoint"):
        open_model(tmp_path / "empty")
    with RingEngine(good) as engine:
        with pytest.raises(ValueError, match="every prompt needs at least one token"):
            engine.generate([[1], []], 2)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
            engine.generate([[1, 500]], 2)
        with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
            engine.generate([[1] * 60], 10)
        with pytest.raises(ValueError, match="no prompts"):
            engine.generate([], 2)


def test_loader_error_reaches_caller(tmp_path) -> None:
    """A shard that becomes short while the engine runs: the loader's error is raised in the caller."""
    hf = build_hf("olmoe", seed=5, num_hidden_layers=4)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    engine = RingEngine(tmp_path, max_memory=model_bytes(tmp_path) // 2)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected end of file"):
        engine.generate([[1, 2, 3]], 3)
    engine.close()


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, object]:
    hf = build_hf("mixtral", seed=6)
    d = tmp_path_factory.mktemp("cli_mixtral")
    hf.save_pretrained(d, safe_serialization=True)
    write_word_tokenizer(d)
    return d, hf


def test_cli_generate_prompts_file_with_budget(cli_model, tmp_path, capsys) -> None:
    d, hf = cli_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7 w8 w9\n\nw1 w2 w3\nw10 w11 w12 w13 w14\n")
    budget_mb = model_bytes(d) / MiB / 4
    rc = main(["generate", "--model", str(d), "--max-memory", f"{budget_mb:.2f}MB", "--prompts-file", str(prompts),
               "--batch-size", "2", "--max-new-tokens", "4", "--temperature", "0", "--slots", "2",
               "--dtype", "float32"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    for i, p in enumerate([PROMPTS[0], PROMPTS[1], PROMPTS[2]]):
        want = hf_greedy(hf, p, 4)[0]
        assert out[i] == f"[{i + 1}] " + " ".join(f"w{t}" for t in p + want)
    assert out[3].startswith("tokens/s: ") and "12 new tokens" in out[3] and "ring of K=2 slots, float32" in out[3]
    assert out[4].startswith("read: ") and "MiB per new token" in out[4] and "cache hit rate" in out[4]
    assert out[5].startswith("peak memory: ") and "MiB RSS" in out[5] and "budget" in out[5]


def test_cli_single_prompt_without_budget(cli_model, capsys) -> None:
    d, hf = cli_model
    rc = main(["generate", "--checkpoint", str(d), "--prompt", "w1 w2 w3", "--max-new-tokens", "3",
               "--temperature", "0", "--dtype", "float32"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "w1 w2 w3 " + " ".join(f"w{t}" for t in hf_greedy(hf, [1, 2, 3], 3)[0])
    assert "all sections resident" in out[1]


@pytest.mark.parametrize("case,match", [
    ("empty_file", "has no prompts"),
    ("no_file", "does not exist"),
    ("small_budget", "needs at least"),
    ("bad_size", "cannot read memory size"),
    ("no_tokenizer", "no tokenizer.json"),
    ("corrupt", "truncated"),
    ("bad_slots", "slots must be an integer >= 2"),
    ("missing_shard", "is missing"),
    ("int8", "torch.int8, which the ring engine does not read"),
])
def test_cli_bad_input_exit_2(cli_model, tmp_path, capsys, case: str, match: str) -> None:
    d, _ = cli_model
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = ["generate", "--model", str(d), "--prompt", "w1 w2", "--temperature", "0", "--max-new-tokens", "2"]
    if case == "empty_file":
        args = [*args[:3], "--prompts-file", str(empty), *args[5:]]
    elif case == "no_file":
        args = [*args[:3], "--prompts-file", str(tmp_path / "nope.txt"), *args[5:]]
    elif case == "small_budget":
        args += ["--max-memory", "10KB"]
    elif case == "bad_size":
        args += ["--max-memory", "lots"]
    elif case == "bad_slots":
        args += ["--slots", "1", "--max-memory", "100MB"]
    elif case == "missing_shard":
        _, hf = cli_model
        other = tmp_path / "sharded"
        hf.save_pretrained(other, safe_serialization=True, max_shard_size="500KB")
        write_word_tokenizer(other)
        sorted(other.glob("model-*.safetensors"))[-1].unlink()
        args[2] = str(other)
    elif case == "int8":
        _, hf = cli_model
        other = tmp_path / "int8"
        other.mkdir()
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        sd["lm_head.weight"] = sd["lm_head.weight"].to(torch.int8)
        save_file(sd, str(other / "model.safetensors"))
        for name in ("config.json", "tokenizer.json"):
            (other / name).write_text((d / name).read_text())
        args[2] = str(other)
    elif case in ("no_tokenizer", "corrupt"):
        other = tmp_path / "m"
        other.mkdir()
        for f in d.iterdir():
            if f.name != "tokenizer.json" or case == "corrupt":
                data = f.read_bytes()
                (other / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" and case == "corrupt"
                                             else data)
        args[2] = str(other)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "semoe generate: error:" in err and match in err
