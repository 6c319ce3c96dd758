"""Offloaded MoE inference within a memory budget: semoe's ring engine against HF accelerate, in one run.

Run (from the repository root):

    python benchmarks/bench_offload.py            # the full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_offload.py --smoke    # tiny model, one repetition, in one process (CI, seconds)
    python benchmarks/bench_offload.py --device cuda   # ring in GPU memory, model in host memory (warm rows)

Both contenders serve the same HF Mixtral checkpoint (random weights, float32, made once under --workdir)
within the same budget (--budget-frac of the weights, 1/4 by default):

  semoe       ``RingEngine(model, max_memory=budget)``: the model stays on disk, a loader thread reads each
              section with ``preadv`` into one of K=2 preallocated slots while the previous section computes;
              all prompts of the batch form one wave, micro-batches of --batch-size sequences.
  accelerate  ``AutoModelForCausalLM.from_pretrained(model, device_map="auto", max_memory={"cpu": budget},
              offload_folder=...)`` then ``generate``: modules that do not fit the budget are "disk"-offloaded
              and loaded on demand by accelerate's hooks, without prefetch (transformers 5 writes the fused
              expert tensors to the offload folder and reads the rest from the checkpoint, through
              ``safetensors.safe_open``, i.e. a memory map).

Workloads (greedy, equal-length prompts, every sequence runs to its token limit):
  prefill     a prefill-heavy batch (--prefill BxP, default 8x64): B prompts of P tokens, 1 new token;
              tokens_per_s counts prompt tokens
  decode      --decode BxPxN (default 16x8x16): B prompts of P tokens, N new tokens each; tokens_per_s counts
              new tokens
Page cache: ``warm`` (the model files were read just before), ``cold`` (the files' pages are dropped with
``posix_fadvise(POSIX_FADV_DONTNEED)`` before every pass over the model: semoe drops each section's pages
after reading it, accelerate gets a forward pre-hook that evicts its checkpoint and offload files; only
those files are touched).

Each (impl, workload, cache) runs in its own process (a fresh peak RSS): imports, model set-up, one warm-up
generate, then --reps timed generates; the median is reported. The contenders alternate, the order flipping
for every workload/cache pair. A thread samples /proc/self/status every 2 ms for the anonymous and
file-backed resident pages.

Output (stdout, JSON lines; human text goes to stderr): one line per (impl, workload, cache) with
  tokens_per_s        median over repetitions
  peak_rss_mb         the process's peak RSS (VmHWM, MiB) over its whole life, set-up included
  peak_anon_mb / peak_file_mb   the largest RssAnon / RssFile sampled (MiB); accelerate reads offloaded
                      weights through memory maps, so its file-backed pages grow with what it has read
  base_rss_mb         RSS after the imports, before the model is touched (the fixed part of the process)
  over_budget_mb      peak_rss_mb - base_rss_mb - budget_mb
  bound_tokens_per_s  tokens / (passes x max(bytes streamed per pass / measured read bandwidth, compute time
                      per pass with everything resident)); read bandwidth: ``preadv`` of the model files, warm
                      or after eviction, measured right before each (workload, cache) row's runs (median of
                      ``--reps``; the rate of a shared VM disk drifts over minutes); resident compute: semoe
                      with no budget (every section loaded once), also measured right before each row
  read_gb_per_s       that row's measured read bandwidth
  resident_compute_s_per_pass   that row's measured resident compute per pass
  x_of_bound          bound_tokens_per_s / tokens_per_s (1.0 = at the bound)
  plus budget_mb, model_mb, passes, wall_s, tokens, and semoe's load_s / wait_s / compute_s; with
  --device cuda also peak_device_mb (torch's peak allocation) and semoe's h2d_gb_per_s, copy_s, stall_s
  and copy_hidden_share (events on the copy and compute streams), and the bound's read bandwidth is the
  slower of the page-cache read and a pinned 64 MiB host-to-device copy
then one summary line: read bandwidths (median over the rows of each cache state), resident compute per
pass of each row, semoe / accelerate ratios, whether the greedy tokens of both contenders agree, and the targets
(every semoe row within 1.3x of its bound; prefill cold >= 1.5x accelerate; semoe peak RSS <= base +
1.1 x budget + 24 MiB, the documented overhead).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import emit_json, log, median, random_mixtral_checkpoint, stdout_to_stderr

MiB = 2**20
OVERHEAD_MIB = 24  # documented fixed overhead above the post-import RSS (docs/inference.md)

FULL = dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
            num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
SMOKE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=16, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


# ------------------------------------------------------------------------------------------ memory sampling
def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024.0
    return out


class MemorySampler:
    """Largest RssAnon / RssFile of this process, sampled every ``interval_s`` by a thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.anon, self.file = interval_s, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        s = _status()
        self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------------------------------ set-up
def ensure_model(workdir: Path, cfg: dict[str, Any]) -> Path:
    """An HF Mixtral checkpoint with random weights for ``cfg`` (made once, reused)."""
    return random_mixtral_checkpoint(workdir, "mixtral", cfg)


def model_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def evict(paths: list[Path]) -> None:
    from semoe.storage.safetensors_io import evict_file_cache

    evict_file_cache([p for p in paths if p.is_file()])


def read_bandwidth(files: list[Path], cold: bool, reps: int) -> float:
    """Bytes/s of reading the files with 16 MiB ``preadv`` calls into one buffer (median of ``reps``)."""
    import torch

    buf = torch.empty(16 * MiB, dtype=torch.uint8)
    mv = memoryview(buf.numpy())
    rates = []
    for _ in range(reps):
        if cold:
            evict(files)
        n, t0 = 0, time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                off = 0
                while (k := os.preadv(fd, [mv], off)) > 0:
                    off += k
                n += off
            finally:
                os.close(fd)
        rates.append(n / (time.perf_counter() - t0))
    return median(rates)


def h2d_bandwidth(reps: int) -> float:
    """Bytes/s of a 64 MiB pinned host -> device copy (median of ``reps``)."""
    import torch

    src = torch.empty(64 * MiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    dst.copy_(src)
    rates = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(src.numel() / (time.perf_counter() - t0))
    return median(rates)


def workloads(smoke: bool, vocab: int, prefill: str, decode: str) -> dict[str, dict[str, Any]]:
    """{name: prompts, max_new, tokens counted, passes}; ``prefill`` "BxP", ``decode`` "BxPxN"."""
    import torch

    g = torch.Generator().manual_seed(1)
    if smoke:
        shapes = {"prefill": (2, 8, 1), "decode": (2, 4, 3)}
    else:
        B, P = (int(v) for v in prefill.split("x"))
        Bd, Pd, N = (int(v) for v in decode.split("x"))
        shapes = {"prefill": (B, P, 1), "decode": (Bd, Pd, N)}
    out = {}
    for name, (B, P, N) in shapes.items():
        prompts = torch.randint(0, vocab, (B, P), generator=g).tolist()
        tokens = B * P if name == "prefill" else B * N
        out[name] = dict(prompts=prompts, max_new=N, tokens=tokens, passes=N)
    return out


# ------------------------------------------------------------------------------------------ workers
def run_semoe(spec: dict[str, Any]) -> dict[str, Any]:
    from semoe.inference.ring import RingEngine

    engine = RingEngine(spec["model"], max_memory=spec["budget"], batch_size=spec["batch_size"],
                        drop_page_cache=spec["cache"] == "cold", device=spec.get("device", "cpu"),
                        strategy="layer" if spec["budget"] is not None else "auto")  # whole layers: the bound's model
    files = model_files(Path(spec["model"]))
    runs, stats = [], []
    try:
        for rep in range(spec["reps"] + 1):  # the first is the warm-up
            if spec["cache"] == "cold":
                evict(files)
            t0 = time.perf_counter()
            result = engine.generate(spec["prompts"], spec["max_new"])
            if rep:
                runs.append(time.perf_counter() - t0)
                stats.append(result.stats)
        extra = {
            "resident": engine.resident, "slots": engine.num_slots,
            "bytes_per_pass": engine.plan.total_bytes,
            "load_s": median([s.load_s for s in stats]), "wait_s": median([s.wait_s for s in stats]),
            "compute_s": median([s.compute_s for s in stats]), "passes": stats[-1].passes,
        }
        if engine.device.type == "cuda":  # host-to-device copies, timed with events on the copy stream
            extra.update(h2d_gb_per_s=median([s.h2d_gb_per_s for s in stats]),
                         copy_hidden_share=median([s.copy_hidden_share for s in stats]),
                         copy_s=median([s.copy_s for s in stats]), stall_s=median([s.stall_s for s in stats]))
    finally:
        engine.close()
    return {"times": runs, "tokens_out": result.tokens, **extra}


def run_accelerate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    offload = Path(spec["offload_dir"])
    shutil.rmtree(offload, ignore_errors=True)
    cuda = spec.get("device", "cpu") == "cuda"
    # CUDA: the budget is GPU memory and the rest of the model stays in host memory (accelerate's cpu offload)
    max_memory = {0: spec["budget"], "cpu": 2**40} if cuda else {"cpu": spec["budget"]}
    with stdout_to_stderr():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model"], device_map="auto", max_memory=max_memory, offload_folder=str(offload),
            dtype=torch.float32)
    model.eval()
    files = model_files(Path(spec["model"])) + sorted(p for p in offload.rglob("*") if p.is_file())
    if spec["cache"] == "cold":  # drop the files' pages before every pass over the model
        model.register_forward_pre_hook(lambda *_: evict(files))
    x = torch.tensor(spec["prompts"], device="cuda" if cuda else "cpu")
    runs = []
    with torch.no_grad():
        for rep in range(spec["reps"] + 1):
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=spec["max_new"],
                                 min_new_tokens=spec["max_new"], eos_token_id=None, pad_token_id=0)
            if cuda:
                torch.cuda.synchronize()
            if rep:
                runs.append(time.perf_counter() - t0)
    placement: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1
    return {"times": runs, "tokens_out": out[:, x.shape[1]:].tolist(), "placement": placement,
            "passes": spec["max_new"]}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One contender on one workload; returns its measurements."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["impl"] == "accelerate":
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    else:
        import semoe.inference.ring  # noqa: F401
    base = _status()["VmRSS"]
    with MemorySampler() as mem:
        res = run_accelerate(spec) if spec["impl"] == "accelerate" else run_semoe(spec)
    res.update(base_rss_mb=base, peak_rss_mb=_status()["VmHWM"], peak_anon_mb=mem.anon, peak_file_mb=mem.file,
               wall_s=median(res["times"]))
    if spec.get("device", "cpu") == "cuda":
        res["peak_device_mb"] = torch.cuda.max_memory_allocated() / MiB
    return res


def run_worker(spec: dict[str, Any], isolated: bool) -> dict[str, Any]:
    if not isolated:
        return worker(spec)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['impl']}/{spec['workload']}/{spec['cache']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, one repetition, one process (CI)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "semoe-bench-offload")
    ap.add_argument("--budget-frac", type=float, default=0.25, help="budget as a fraction of the weights' bytes")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per contender (default 3; smoke 1)")
    ap.add_argument("--batch-size", type=int, default=8, help="semoe micro-batch: sequences per prefill call (default "
                    "8, the engine's and `semoe generate`'s default; accelerate runs the whole batch in one call)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: on a 2-core "
                    "machine one core computes and one reads; 0: torch's default)")
    ap.add_argument("--prefill", default="8x64", help="prefill-heavy batch: BxP (B prompts of P tokens, 1 new)")
    ap.add_argument("--decode", default="16x8x16", help="decode batch: BxPxN (B prompts of P tokens, N new)")
    ap.add_argument("--impls", default=None, help="comma list of semoe,accelerate (default: both when accelerate "
                    "is installed)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the budget is GPU memory, semoe's ring lives there and the model in host memory "
                    "(page cache; warm rows only), accelerate offloads what does not fit to host memory")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; run with --device cpu")
    cfg = SMOKE if args.smoke else FULL
    reps = args.reps or (1 if args.smoke else 3)
    have_acc = importlib.util.find_spec("accelerate") is not None
    impls = args.impls.split(",") if args.impls else (["semoe", "accelerate"] if have_acc else ["semoe"])
    if "accelerate" in impls and not have_acc:
        raise SystemExit("accelerate is not installed: pip install accelerate, or pass --impls semoe")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.workdir, cfg)
    files = model_files(model)

    from semoe.inference.sections import open_model, plan_sections

    source = open_model(model)
    weights = source.param_bytes(torch.float32)
    budget = int(args.budget_frac * weights)
    bytes_per_pass = plan_sections(source).total_bytes
    log(f"model {weights / MiB:.1f} MiB of weights, budget {budget / MiB:.1f} MiB")
    isolated = not args.smoke
    loads = workloads(args.smoke, cfg["vocab_size"], args.prefill, args.decode)
    common_spec = dict(model=str(model), reps=reps, batch_size=args.batch_size, threads=args.threads,
                       offload_dir=str(args.workdir / "offload"), device=args.device)
    caches = ("warm",) if args.device == "cuda" else ("warm", "cold")
    h2d = h2d_bandwidth(reps) if args.device == "cuda" else None

    def resident_compute(name: str, w: dict[str, Any]) -> float:
        """Seconds per pass with every section resident (the compute side of the bound)."""
        r = run_worker({**common_spec, **w, "impl": "semoe", "workload": name, "cache": "warm", "budget": None,
                        "tokens": w["tokens"]}, isolated)
        log(f"resident {name}: {r['wall_s']:.3f} s for {r['passes']} passes")
        return r["wall_s"] / r["passes"]

    compute_pass: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    bw_rows: dict[str, float] = {}
    tokens_out: dict[tuple[str, str, str], Any] = {}
    flip = False
    for name, w in loads.items():
        for cache in caches:
            order = impls[::-1] if flip else impls
            flip = not flip
            # the read rate drifts over minutes on a shared VM disk (1.3-1.9 GB/s cold between runs of one
            # day), the compute rate of a shared VM by +-10%: measure both right before this row's runs
            bw_row = read_bandwidth(files, cache == "cold", reps)
            if h2d is not None:  # CUDA: host memory -> pinned buffer -> device, the slower of the two
                bw_row = min(bw_row, h2d)
            bw_rows[f"{name}/{cache}"] = bw_row
            compute_row = resident_compute(name, w)
            compute_pass[f"{name}/{cache}"] = compute_row
            bound_s = w["passes"] * max(bytes_per_pass / bw_row, compute_row)
            for impl in order:
                spec = {**common_spec, **w, "impl": impl, "workload": name, "cache": cache, "budget": budget}
                r = run_worker(spec, isolated)
                tps = w["tokens"] / r["wall_s"]
                row = {"impl": impl, "workload": name, "cache": cache, "tokens_per_s": tps,
                       "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"],
                       "peak_file_mb": r["peak_file_mb"], "bound_tokens_per_s": w["tokens"] / bound_s,
                       "x_of_bound": w["tokens"] / bound_s / tps, "base_rss_mb": r["base_rss_mb"],
                       "over_budget_mb": r["peak_rss_mb"] - r["base_rss_mb"] - budget / MiB,
                       "read_gb_per_s": bw_row / 1e9, "resident_compute_s_per_pass": compute_row,
                       "budget_mb": budget / MiB, "model_mb": weights / MiB, "passes": r["passes"],
                       "wall_s": r["wall_s"], "tokens": w["tokens"]}
                for k in ("load_s", "wait_s", "compute_s", "slots", "placement", "peak_device_mb", "h2d_gb_per_s",
                          "copy_hidden_share", "copy_s", "stall_s"):
                    if k in r:
                        row[k] = r[k]
                rows.append(row)
                tokens_out[(impl, name, cache)] = r["tokens_out"]
                emit_json(row)
                log(f"{impl:10s} {name:7s} {cache}: {tps:9.1f} tok/s  bound {row['bound_tokens_per_s']:9.1f}  "
                    f"peak RSS {row['peak_rss_mb']:.0f} MiB (anon {row['peak_anon_mb']:.0f}, file "
                    f"{row['peak_file_mb']:.0f})")

    def tps(impl: str, name: str, cache: str) -> float | None:
        for r in rows:
            if (r["impl"], r["workload"], r["cache"]) == (impl, name, cache):
                return r["tokens_per_s"]
        return None

    ratio = {}
    for name in loads:
        for cache in caches:
            a, s = tps("accelerate", name, cache), tps("semoe", name, cache)
            ratio[f"{name}/{cache}"] = s / a if a and s else None
    agree = None
    if "accelerate" in impls:
        agree = all(tokens_out[("semoe", n, c)] == tokens_out[("accelerate", n, c)] for n in loads
                    for c in caches)
    semoe_rows = [r for r in rows if r["impl"] == "semoe"]
    targets = {
        "within_1.3x_of_bound": all(r["x_of_bound"] <= 1.3 for r in semoe_rows),
        "prefill_cold_vs_accelerate_ge_1.5": (ratio.get("prefill/cold") or 0) >= 1.5
        if "accelerate" in impls and "cold" in caches else None,
    }
    if args.device == "cuda":  # the budget is device memory
        targets["peak_device_le_1.1_budget_plus_overhead"] = all(
            r["peak_device_mb"] <= 1.1 * r["budget_mb"] + OVERHEAD_MIB for r in semoe_rows)
    else:
        targets["peak_rss_le_base_plus_1.1_budget_plus_overhead"] = all(
            r["peak_rss_mb"] <= r["base_rss_mb"] + 1.1 * r["budget_mb"] + OVERHEAD_MIB for r in semoe_rows)
    emit_json({"summary": True, "smoke": args.smoke, "model_mb": weights / MiB, "budget_mb": budget / MiB,
               "bytes_per_pass_mb": bytes_per_pass / MiB, "read_gb_per_s": {
                   c: median([v for k, v in bw_rows.items() if k.endswith("/" + c)]) / 1e9 for c in caches},
               "device": args.device, "h2d_gb_per_s": h2d / 1e9 if h2d else None,
               "read_gb_per_s_per_row": {k: v / 1e9 for k, v in bw_rows.items()},
               "resident_compute_s_per_pass": compute_pass, "ratio_semoe_vs_accelerate": ratio,
               "greedy_tokens_agree": agree, "targets": targets, "threads": args.threads or torch.get_num_threads(),
               "reps": reps, "fixed_overhead_mib": OVERHEAD_MIB,
               "workloads": {n: {"batch": len(w["prompts"]), "prompt_len": len(w["prompts"][0]),
                                 "new_tokens": w["max_new"]} for n, w in loads.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
