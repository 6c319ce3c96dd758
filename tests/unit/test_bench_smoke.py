"""Every benchmark's ``--smoke`` size runs, exits 0 and prints its JSON lines: ``bench_moe_layer.py`` in one
process (float32 and bfloat16) and under torchrun with two ranks, ``bench_offload.py``, ``bench_train.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_moe_layer.py"
RESULT_KEYS = {"impl", "world", "mode", "tokens_per_s", "step_ms", "peak_rss_mb", "drop_rate", "param_mb",
               "activation_mb", "gemm_fraction"}


def _run(cmd: list[str], timeout: float) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # stdout is JSON only
    assert lines, f"no JSON lines; stderr:\n{proc.stderr[-4000:]}"
    return lines


def _check(lines: list[dict], world: int) -> None:
    results, summary = lines[:-1], lines[-1]
    assert [r["impl"] for r in results] == ["semoe"]  # --smoke runs no peers
    r = results[0]
    assert RESULT_KEYS <= r.keys()
    assert r["world"] == world and r["mode"] == "capacity"
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_rss_mb"] > 0
    assert 0.0 <= r["drop_rate"] <= 1.0
    assert summary["world"] == world
    assert summary["ratio_vs_deepspeed"] is None
    assert summary["gemm_bound_tokens_per_s"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smoke_one_process(dtype: str) -> None:
    lines = _run([sys.executable, str(SCRIPT), "--smoke", "--dtype", dtype], timeout=120)
    _check(lines, world=1)
    assert lines[0]["dtype"] == lines[-1]["dtype"] == dtype  # the layer and the matmul probe in that dtype


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_smoke_two_ranks() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), "--smoke"]
    _check(_run(cmd, timeout=120), world=2)


OFFLOAD_ROW_KEYS = {"impl", "workload", "cache", "tokens_per_s", "peak_rss_mb", "peak_anon_mb", "peak_file_mb",
                    "bound_tokens_per_s", "x_of_bound", "base_rss_mb", "budget_mb", "model_mb", "passes"}


def test_offload_smoke(tmp_path) -> None:
    """``bench_offload.py --smoke``: every (impl, workload, cache) row, semoe's ring against accelerate when it is
    installed (then both must produce the same greedy tokens), and the summary line last."""
    import importlib.util

    script = ROOT / "benchmarks" / "bench_offload.py"
    lines = _run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path)], timeout=300)
    rows, summary = lines[:-1], lines[-1]
    impls = {"semoe"} | ({"accelerate"} if importlib.util.find_spec("accelerate") else set())
    assert {(r["impl"], r["workload"], r["cache"]) for r in rows} == {
        (i, w, c) for i in impls for w in ("prefill", "decode") for c in ("warm", "cold")}
    for r in rows:
        assert OFFLOAD_ROW_KEYS <= r.keys()
        assert r["tokens_per_s"] > 0 and r["bound_tokens_per_s"] > 0 and r["peak_rss_mb"] >= r["peak_anon_mb"] > 0
        assert r["budget_mb"] * 4 <= r["model_mb"] * 1.01
    for r in rows:
        if r["impl"] == "semoe":  # the ring, not a resident model: two slots, every pass streamed
            assert r["slots"] == 2 and r["load_s"] > 0
    assert summary["summary"] is True and summary["smoke"] is True
    assert summary["greedy_tokens_agree"] is (True if "accelerate" in impls else None)
    assert set(summary["targets"]) >= {"within_1.3x_of_bound", "peak_rss_le_base_plus_1.1_budget_plus_overhead"}


def test_train_smoke() -> None:
    """``bench_train.py --smoke``: two torchrun jobs (semoe with no switch and with every switch), one JSON
    line each in the requested dtype, and the summary line."""
    script = ROOT / "benchmarks" / "bench_train.py"
    lines = _run([sys.executable, str(script), "--smoke", "--dtype", "bfloat16"], timeout=300)
    rows, summary = lines[:-1], lines[-1]
    assert [(r["impl"], r["features"]) for r in rows] == [("semoe", "plain"), ("semoe", "all")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["dtype"] == "bfloat16" and r["world"] == 2
    assert summary["summary"] is True and summary["ratio_vs_deepspeed"] is None


FINETUNE_KEYS = {"impl", "tokens_per_s", "step_ms", "peak_rss_mb", "load_peak_rss_mb", "loss0", "cpu", "model"}


def test_finetune_smoke(tmp_path) -> None:
    """``bench_finetune.py --smoke``: semoe's --init-from training step and transformers' own model on the same
    HF checkpoint and batch; the same first loss (same weights, same data), a summary with the ratios."""
    pytest.importorskip("transformers")
    script = ROOT / "benchmarks" / "bench_finetune.py"
    lines = _run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path)], timeout=300)
    rows, summary = lines[:-1], lines[-1]
    assert [r["impl"] for r in rows] == ["semoe", "transformers"]
    for r in rows:
        assert FINETUNE_KEYS <= r.keys() and "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["loss0"] > 0
    assert rows[1]["experts_implementation"] == "grouped_mm"  # transformers' default experts implementation
    assert summary["summary"] is True and summary["smoke"] is True and summary["errors"] is None
    assert summary["loss0_spread"] < 1e-4  # the same model and batch
    assert summary["speedup_vs_transformers"] > 0 and "target_1.5x_transformers_at_le_memory" in summary


OFFLOAD_KEYS = {"impl", "cache", "tokens_per_s", "step_ms", "peak_rss_mb", "budget_mb", "expert_state_mb",
                "bytes_moved_per_step", "bound_step_ms", "batch", "tokens_per_expert"}


def test_offload_train_smoke() -> None:
    """``bench_offload_train.py --smoke --dtype float32,bfloat16``: in-memory and semoe-offload warm/cold rows in
    each dtype with the issue's fields and ``dtype``, expert state 4x the budget, bytes moved every offloaded step,
    and the summary's ratios (same dtype for the in-memory ratio, each dtype's own and the first's unsuffixed)."""
    script = ROOT / "benchmarks" / "bench_offload_train.py"
    lines = _run([sys.executable, str(script), "--smoke", "--peers", "none", "--dtype", "float32,bfloat16"],
                 timeout=300)
    rows, summary = lines[:-1], lines[-1]
    cases = [("in-memory", "warm"), ("semoe-offload", "warm"), ("semoe-offload", "cold")]
    assert [(r["impl"], r["cache"], r["dtype"]) for r in rows] == [
        (*c, d) for d in ("float32", "bfloat16") for c in cases]
    for r in rows:
        assert OFFLOAD_KEYS <= r.keys() and "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["bound_step_ms"] > 0
    for r in rows:
        if r["impl"] == "semoe-offload":
            assert r["expert_state_mb"] >= 4 * r["budget_mb"] and r["bytes_moved_per_step"] > 0 and r["t_star"] > 0
            # the regime: T* = b F / (6 B) from the row's own b, F, B; the smoke's 4 x 32 tokens top-2 over 4 experts
            b = r["bytes_moved_per_step"] / r["expert_params"]
            assert r["tokens_per_expert"] == 4 * 32 * 2 / 4 and r["batch"] == 4
            assert r["t_star"] == pytest.approx(b * r["flops"] / (6 * r["disk_bytes_per_s"]), rel=1e-9)
            assert r["tokens_per_expert_over_t_star"] == pytest.approx(r["tokens_per_expert"] / r["t_star"], rel=1e-9)
            assert summary[f"in_regime_{r['cache']}@{r['dtype']}"] == (r["tokens_per_expert_over_t_star"] >= 1.5)
    assert summary["batch_chosen"] == "given" and summary["batch"] == {"float32": 4, "bfloat16": 4}
    assert summary["summary"] is True and summary["ratio_vs_in_memory_warm"] > 0
    assert summary["ratio_vs_in_memory_cold@bfloat16"] > 0 and summary["best_dtype_warm"] in ("float32", "bfloat16")


def test_elastic_smoke() -> None:
    """``bench_elastic.py --smoke``: elastic and uniform placement at 2 ranks on the same multi-task workload; the
    issue's fields, the elastic plan's busy max/mean within its target, the summary with the bound ratio."""
    lines = _run([sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--smoke"], timeout=300)
    rows, summary = lines[:-1], lines[-1]
    assert [r["placement"] for r in rows] == ["elastic", "uniform"]
    for r in rows:
        assert {"placement", "world", "samples_per_s", "busy_max_over_mean", "peak_rss_mb", "bound_ratio"} <= r.keys()
        assert r["world"] == 2 and r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["busy_max_over_mean"] >= 1
    assert summary["summary"] is True and summary["errors"] is None
    assert summary["bound_ratio"] == pytest.approx(2 * 16 * 8 / (16 * 8 + 8 * 4 + 4 * 2 + 2 * 1), rel=1e-4)  # 6 digits
    assert summary["elastic_over_uniform"] > 0



def test_elastic_smoke_breakdown() -> None:
    """``bench_elastic.py --smoke --breakdown``: per rank the parts of the step (exclusive CPU timers), the experts
    timed alone, and the critical path over world collectives, which no rank's own CPU time can exceed."""
    lines = _run([sys.executable, str(ROOT / "benchmarks" / "bench_elastic.py"), "--smoke", "--breakdown"],
                 timeout=300)
    for r in lines[:-1]:
        assert len(r["breakdown_ms"]) == 2
        for parts in r["breakdown_ms"]:
            assert {"backward (all)", "fwd shared expert", "fwd task experts", "optimizer step",
                    "collective all_reduce"} <= parts.keys()
            assert parts["fwd+bwd alone: shared expert"] > 0
        assert r["critical_path_ms"] > 0 and r["world_collectives_per_step"] >= 1


EXPERT_OFFLOAD_KEYS = {"impl", "model", "batch", "cache", "tokens_per_s", "bound_tokens_per_s", "bytes_read_per_token",
                       "peak_rss_mb", "x_of_bound", "budget_mb", "model_mb"}


def test_expert_offload_smoke(tmp_path) -> None:
    """``bench_expert_offload.py --smoke``: both tiny models at B = 1 and 4, every semoe row (whole-layer, routed,
    auto) and accelerate where installed; at B = 1 routed rows read < 0.6x the file bytes per token of whole-layer
    rows, and every semoe row's greedy tokens equal the whole-layer ring's."""
    pytest.importorskip("transformers")
    script = ROOT / "benchmarks" / "bench_expert_offload.py"
    lines = _run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path), "--impls",
                  "semoe-layer,semoe-routed,semoe-auto,accelerate"], timeout=300)
    rows, summary = lines[:-1], lines[-1]
    semoe = {(r["impl"], r["model"], r["batch"]) for r in rows if r["impl"].startswith("semoe")}
    assert semoe == {(i, m, b) for i in ("semoe-layer", "semoe-routed", "semoe-auto")
                     for m in ("mixtral-e8k2", "many-e32k4") for b in (1, 4)}
    for r in rows:
        assert EXPERT_OFFLOAD_KEYS <= r.keys() and r["tokens_per_s"] > 0 and r["bound_tokens_per_s"] > 0
        assert r["cache"] == "cold" and r["peak_rss_mb"] > 0
    by = {(r["impl"], r["model"], r["batch"]): r for r in rows}
    for m in ("mixtral-e8k2", "many-e32k4"):
        assert by[("semoe-routed", m, 1)]["semoe_bytes_per_token"] < 0.6 * by[("semoe-layer", m, 1)][
            "semoe_bytes_per_token"]
    assert summary["summary"] is True and summary["smoke"] is True
    # the semoe rows run the same ops on the same batch shapes: the same tokens (accelerate: other op orders)
    assert all(ok for v in summary["greedy_tokens_equal_semoe_layer"].values() for impl, ok in v.items()
               if impl.startswith("semoe")), summary


@pytest.mark.numerics
def test_make_big_model_smoke(tmp_path) -> None:
    """``make_big_model.py --smoke``: the streamed OLMoE-layout checkpoint (several shards, an index naming every
    tensor once) loads in transformers, and its logits equal the ring engine's on the same files (float32 both:
    other op orders only), through a 2-slot ring within a budget and routed-only loading."""
    transformers = pytest.importorskip("transformers")
    import torch

    from semoe.inference.ring import RingEngine
    from semoe.inference.sections import open_model, plan_sections

    out = tmp_path / "olmoe"
    (line,) = _run([sys.executable, str(ROOT / "benchmarks" / "make_big_model.py"), "--smoke", "--layers", "6",
                    "--out", str(out)], timeout=120)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    assert line["bytes"] == index["metadata"]["total_size"] == open_model(out).param_bytes(torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "OlmoeForCausalLM" and hf.config.num_hidden_layers == 6
    assert sum(p.numel() for p in hf.parameters()) * 2 == line["bytes"]
    prompts = [[1, 5, 9, 3], [7, 2, 300, 11]]
    x = torch.tensor(prompts)
    with torch.no_grad():
        ref = hf(x).logits[:, -1].float()
    assert bool(torch.isfinite(ref).all()) and ref.shape == (2, 384) and float(ref.std()) > 1e-3
    slot = plan_sections(open_model(out), 1, torch.float32).slot_bytes
    for kw in ({}, {"max_memory": 2 * slot + 2**19, "strategy": "routed"}):
        with RingEngine(out, dtype="float32", **kw) as engine:
            got = engine.generate(prompts, 1, return_logits=True).logits
        torch.testing.assert_close(torch.stack([g[0] for g in got]), ref, atol=1e-4, rtol=0)
