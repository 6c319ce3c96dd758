"""Training with the experts offloaded (semoe.storage.offload) vs all in memory vs DeepSpeed ZeRO-3 offload.

One JSON line per row, each row in its own process (its peak RSS is its own: VmHWM of /proc/self/status,
reset once the trainer is built, so it covers the timed steps):

* ``in-memory``: the plain trainer, the compute side of the bound;
* ``semoe-offload`` / ``warm``: expert state (W, G, m, v) >= 4x ``storage.budget_mb``, the store's files
  served from the page cache where the kernel kept them;
* ``semoe-offload`` / ``cold``: the same with the store's files dropped from the page cache before every
  step (``posix_fadvise(DONTNEED)`` after an fsync, outside the timed region), so reads come from the disk;
* ``deepspeed`` / ``offload`` ``cpu`` and ``nvme``: its nearest setup, the HF Mixtral of the same shapes
  (transformers, random weights) with ``MixtralSparseMoeBlock`` a ZeRO-3 leaf module, ``offload_param`` and
  ``offload_optimizer`` to cpu or to nvme (files in the work folder, DeepSpeed's async IO), DeepSpeed's CPU
  AdamW, gloo, one process; each with HF's attention ``eager`` and ``sdpa`` (``--ds-attn``, an ``attn`` field; on a
  CPU in bf16 at the bench's 32-wide heads HF's default SDPA is the slower, its flash backward: docs/storage.md),
  the summary taking DeepSpeed's fastest row. A row that cannot run carries its error. (semoe's own MoE layer
  cannot be a ZeRO-3 leaf: it returns a dataclass, in which DeepSpeed does not find the tensors to hook its
  pre-backward gather on, so the experts are still partitioned when autograd runs their backward; see
  docs/storage.md.)

``--dtype float32,bfloat16`` (default float32): every row in each dtype (bfloat16: CPU autocast over float32
master weights, AdamW state float32, for semoe as ``train.dtype=bfloat16``; for DeepSpeed its ``"bf16":
{"enabled": true}``), a ``dtype`` field in each row. The summary compares like with like for the step-time targets
(``ratio_vs_in_memory_<cache>@<dtype>``: offloaded vs in memory in the same dtype) and best with best for
DeepSpeed (``ratio_vs_deepspeed_<cache>``: semoe offloaded at its fastest dtype over DeepSpeed's fastest row,
as benchmarks/bench_finetune.py reports each contender's fastest); the unsuffixed ``ratio_vs_in_memory_<cache>``
etc. are those of the first dtype given.

Also measured in the same run: the matmul rate F in the row's dtype (one expert's ``[T_e, D] x [D, F]``) and the disk
bandwidth B (pwrite + fdatasync, then pread after dropping the pages, in the store's directory), from which
T* = b * F / (6 * B) with b the bytes moved per expert parameter per step, and the bound
``bound_step_ms = max(in-memory step, bytes moved / B)``. Summary line: the ratios against the targets.
Every row carries ``batch`` and ``tokens_per_expert``; offloaded rows also ``t_star`` and
``tokens_per_expert_over_t_star`` (this row's b, F and B). Issue #11's targets hold in the regime tokens per expert
per step >= 1.5 T*: without ``--batch`` the bench first measures B (median of 3 probes) and, per dtype, F at the
candidate batch's tokens per expert, and takes the smallest batch at ``--regime`` (1.5) T* with b = the schedule's
40 B/param (the measured b is below it, so the rows land above the aim); the summary has ``batch``,
``regime_pick`` and ``in_regime_<cache>@<dtype>``. With ``--batch`` (and ``--smoke``) a row below 1.5 T* is
logged as a warning.

Offloaded rows also carry ``moved_by_mb`` (MiB per step by phase / tensor kind / read|write, from the store's
counters) and ``stall_by_ms`` (waits for IO by phase), and ``schedule_{read,write}_bytes_per_step`` (what the
schedule moves between the tiers when nothing stays cached across phases; see docs/storage.md).

Each row also has ``step_ms_min`` and ``step_ms_all`` (the timed steps after ``--warmup`` untimed ones; the summary's
``ratio_vs_in_memory_of_min_*`` compares the least disturbed steps); DeepSpeed rows ``parts_ms`` (forward, backward,
optimizer step). ``--malloc default`` runs every row without the fixed mmap threshold (faster allocation, peak
RSS then keeps freed heap). ``--peers only``: the in-memory and DeepSpeed rows (a shorter run).

Run timings alone: ``flock -x /tmp/semoe-cpu.lock python benchmarks/bench_offload_train.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model

LOG = logging.getLogger("bench_offload_train")
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of our land shall speak to thee my lord good night sweet prince what news "
         "from rome to be or not is question noble friends come hither").split()



def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_corpus(path: Path, n_lines: int = 4000) -> None:
    import random

    rng = random.Random(0)
    path.write_text("\n".join(f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}: " +
                              " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)))


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.d_model={args.d_model}", f"model.moe.d_ff={args.d_ff}", f"model.moe.num_experts={args.experts}",
            f"model.n_layers={args.layers}", f"model.max_seq_len={args.seq}", f"train.seq_len={args.seq}",
            f"train.batch_size={args.batch}", f"train.dtype={args.dtype}", f"train.steps={args.steps + args.warmup}",
            "train.eval_every=1000", "train.ckpt_every=1000", "model.moe.router.capacity_factor=none",
            "model.moe.router.eval_capacity_factor=none", "train.val_fraction=0.3"]  # no eval; big batches fit


def matmul_rate(t_e: int, d: int, f: int, dtype: str = "float32") -> float:
    import torch

    a, b = torch.randn(t_e, d).to(getattr(torch, dtype)), torch.randn(d, f).to(getattr(torch, dtype))
    c = torch.mm(a, b)  # out=: the rate of the matmul itself, not of a fresh output's page faults
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        torch.mm(a, b, out=c)
        reps += 1
    return 2.0 * t_e * d * f * reps / (time.perf_counter() - t0)


def disk_bandwidth(folder: Path, nbytes: int, probes: int = 3) -> float:
    """Bytes/s of writing then reading ``nbytes`` through the store's IO path, page cache dropped in between: the
    median of ``probes`` probes (one probe's rate varies up to 3x on a shared disk)."""
    return statistics.median(_disk_probe(folder, nbytes) for _ in range(probes))


def _disk_probe(folder: Path, nbytes: int) -> float:
    import torch

    from semoe.storage.tensor_io import PositionalFile

    folder.mkdir(parents=True, exist_ok=True)
    buf = torch.randn(nbytes // 4)
    f = PositionalFile(folder / "bandwidth.bin")
    try:
        t0 = time.perf_counter()
        f.write(0, buf)
        f.sync()
        t_w = time.perf_counter() - t0
        f.drop_cache()
        t0 = time.perf_counter()
        f.readv(0, [buf])
        t_r = time.perf_counter() - t0
        f.drop_cache()
    finally:
        f.close()
        (folder / "bandwidth.bin").unlink()
    return 2 * nbytes / (t_w + t_r)


SCHEDULE_BYTES_PER_PARAM = 4 * (2 + 4) + 4 * (1 + 3)  # what the schedule moves per expert parameter (see below)


def tokens_per_expert(batch: int, seq: int, experts: int) -> float:
    """Tokens each expert computes per step: top-2, dropless, balanced routing."""
    return batch * seq * 2 / experts


def t_star(bytes_per_param: float, flops: float, disk_bytes_per_s: float) -> float:
    """T* = b F / (6 B) (issue #11): the tokens per expert per step at which an expert's 6 T_e FLOPs per parameter
    (forward 2, backward 4) take as long as moving its b bytes per parameter."""
    return bytes_per_param * flops / (6 * disk_bytes_per_s)


def regime_batch(args: argparse.Namespace, dtype: str, disk_bytes_per_s: float) -> tuple[int, dict]:
    """The smallest batch at which tokens per expert per step >= ``args.regime`` T*, T* from the schedule's bytes
    per parameter (40; the measured bytes are 0.83-0.87x that, so the run lands above the aim), the matmul rate F
    in ``dtype`` measured at the batch's own tokens per expert (F grows with them, so iterate until the batch
    holds) and the disk bandwidth given. Returns the batch and what it was chosen from."""
    import torch

    torch.set_num_threads(args.threads)
    batch, flops = 1, 0.0
    for _ in range(10):
        flops = matmul_rate(int(tokens_per_expert(batch, args.seq, args.experts)), args.d_model, args.d_ff, dtype)
        need = args.regime * t_star(SCHEDULE_BYTES_PER_PARAM, flops, disk_bytes_per_s)
        new = max(1, math.ceil(need * args.experts / (2 * args.seq)))
        if new <= batch:
            break
        batch = new
    else:  # not settled: the rate at the last batch (the rows report where the run lands)
        flops = matmul_rate(int(tokens_per_expert(batch, args.seq, args.experts)), args.d_model, args.d_ff, dtype)
    t_e = tokens_per_expert(batch, args.seq, args.experts)
    return batch, {"flops": flops, "disk_bytes_per_s": disk_bytes_per_s, "tokens_per_expert": t_e,
                   "t_star": t_star(SCHEDULE_BYTES_PER_PARAM, flops, disk_bytes_per_s)}


def row_semoe(args: argparse.Namespace, impl: str, cache: str) -> dict:
    import torch

    from semoe.config import apply_overrides, replace
    from semoe.models.recipes import tiny
    from semoe.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    corpus = work / "corpus.txt"
    run = tiny()
    run = replace(run, data=str(corpus), model=replace(run.model, vocab_size=320))
    run = apply_overrides(run, overrides(args))
    e_params = 3 * args.layers * args.experts * args.d_model * args.d_ff
    state = 16 * e_params  # W, G, m, v in float32
    budget_mb = state / 2**20 * args.budget_frac if impl == "semoe-offload" else 0.0
    run = apply_overrides(run, [f"storage.budget_mb={budget_mb}"])
    t = Trainer(run, work / f"{impl}-{cache}", work / "cache", resume=None)
    for s in range(args.warmup):  # warm-up (allocations, buffers grown to the step's sizes, first reads)
        t.train_step(s)
    if t.offload is not None and cache == "cold":
        t.offload.store.drop_page_cache()
    Path("/proc/self/clear_refs").write_text("5")
    times, io, stalls, reads, writes, by, stall_by, faults = [], [], [], [], [], [], [], []
    for s in range(args.warmup, args.warmup + args.steps):
        if t.offload is not None and cache == "cold":
            # the flush writes back what the last step left dirty (counted in this step's bytes, as the warm row
            # writes it when evicting it during the next step)
            t.offload.store.phase = "flush"
            t.offload.store.drop_page_cache()
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        row = t.train_step(s)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if t.offload is not None:
            io.append(row["io_mb"] * 2**20)
            reads.append(row["io_read_mb"] * 2**20)
            writes.append(row["io_write_mb"] * 2**20)
            stalls.append(row["stall_ms"])
            by.append(dict(t.offload.last_stats.by))
            stall_by.append(dict(t.offload.last_stats.stall_by))
    tokens = args.batch * args.seq
    t_e = tokens_per_expert(args.batch, args.seq, args.experts)
    step_ms = 1e3 * statistics.median(times)
    out = {"impl": impl, "cache": cache if impl == "semoe-offload" else "warm", "dtype": args.dtype,
           "tokens_per_s": tokens / (step_ms / 1e3), "step_ms": step_ms, "step_ms_min": 1e3 * min(times),
           "step_ms_all": [round(1e3 * x, 1) for x in times], "peak_rss_mb": status("VmHWM") / 2**20,
           "minor_faults_per_step": statistics.median(faults), "budget_mb": budget_mb,
           "expert_state_mb": state / 2**20, "bytes_moved_per_step": statistics.median(io) if io else 0.0,
           "bytes_read_per_step": statistics.median(reads) if reads else 0.0,
           "bytes_written_per_step": statistics.median(writes) if writes else 0.0,
           "stall_ms": statistics.median(stalls) if stalls else 0.0, "batch": args.batch, "tokens_per_expert": t_e,
           "expert_params": e_params, "steps": args.steps, "threads": args.threads, "malloc": args.malloc,
           "cpu": cpu_model()}
    if by:  # MiB per step by phase / tensor kind / read|write (median over the timed steps)
        keys = sorted({k for d in by for k in d})
        out["moved_by_mb"] = {"/".join(k): statistics.median(d.get(k, 0) for d in by) / 2**20 for k in keys}
        phases = sorted({k for d in stall_by for k in d})
        out["stall_by_ms"] = {k: 1e3 * statistics.median(d.get(k, 0.0) for d in stall_by) for k in phases}
    if impl == "semoe-offload":
        # the bytes the schedule must move between the tiers (host <- disk reads, host -> disk writes) when
        # nothing survives from one phase to the next: W read in forward and in backward for the routed experts
        # (all, here), the optimizer's W, G, m, v read (24 B/param); G written once, W, m, v written back
        # (16 B/param). What the budget keeps cached across a phase boundary (the last layer's W from forward
        # to backward, the last keys' G from backward to the optimizer) is not moved, so it can be less.
        out["schedule_read_bytes_per_step"] = 4 * e_params * (2 + 4)
        out["schedule_write_bytes_per_step"] = 4 * e_params * (1 + 3)
        out["schedule_bytes_per_step"] = out["schedule_read_bytes_per_step"] + out["schedule_write_bytes_per_step"]
        out["flops"] = matmul_rate(int(t_e), args.d_model, args.d_ff, args.dtype)
        out["disk_bytes_per_s"] = disk_bandwidth(work / "bw", min(state, 256 * 2**20))
    return out


def hf_mixtral(args: argparse.Namespace, attn: str = "sdpa"):
    """The HF Mixtral (transformers, random weights, built here) with the semoe model's shapes: the same
    experts (SwiGLU d_model x d_ff, ``experts`` per layer, top-2, dropless), layers, heads and vocabulary;
    ``attn``: HF's ``attn_implementation`` ("sdpa", its default, or "eager")."""
    import torch
    import transformers

    from semoe.config import apply_overrides
    from semoe.models.recipes import tiny

    cfg = apply_overrides(tiny(), overrides(args)).model
    hf = transformers.MixtralConfig(
        vocab_size=320, hidden_size=cfg.d_model, intermediate_size=cfg.moe.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.router.top_k, max_position_embeddings=args.seq, output_router_logits=True,
        attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(hf)


def row_deepspeed(args: argparse.Namespace, device: str, attn: str = "sdpa") -> dict:
    """DeepSpeed's nearest setup: the HF Mixtral (HF attention ``attn``), its MixtralSparseMoeBlock a ZeRO-3 leaf
    module, ZeRO-3 with ``offload_param`` and ``offload_optimizer`` to ``device`` ("cpu", or "nvme": files in the
    work folder through DeepSpeed's async IO, O_DIRECT), DeepSpeed's CPU AdamW, gloo, one process. Bytes moved:
    the block-layer reads + writes of the process per step (``/proc/self/io``)."""
    from common import deepspeed_hf_moe_engine, process_io_bytes

    e_params = 3 * args.layers * args.experts * args.d_model * args.d_ff
    base = {"impl": "deepspeed", "cache": "warm" if device == "cpu" else "cold", "offload": device, "attn": attn,
            "dtype": args.dtype,
            "tokens_per_s": None, "step_ms": None, "peak_rss_mb": None, "budget_mb": None,
            "expert_state_mb": 16 * e_params / 2**20, "bytes_moved_per_step": None, "bound_step_ms": None,
            "batch": args.batch, "tokens_per_expert": tokens_per_expert(args.batch, args.seq, args.experts),
            "threads": args.threads, "malloc": args.malloc, "cpu": cpu_model()}
    try:
        import torch

        torch.set_num_threads(args.threads)
        model = hf_mixtral(args, attn)
        off: dict = {"device": device}
        if device == "nvme":
            (Path(args.workdir) / "ds-nvme").mkdir(exist_ok=True)
            off["nvme_path"] = str(Path(args.workdir) / "ds-nvme")
        config = {"gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}}
        if args.dtype == "bfloat16":  # DeepSpeed's mixed precision: bf16 model, float32 master weights in the optimizer
            config["bf16"] = {"enabled": True}
        engine = deepspeed_hf_moe_engine(model, args.batch, {
            "stage": 3, "offload_param": dict(off), "offload_optimizer": dict(off)}, config=config)
        x = torch.randint(0, 320, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

        parts: list[tuple[float, float, float]] = []

        def step() -> None:
            t0 = time.perf_counter()
            out = engine(input_ids=x, labels=x)  # cross-entropy + router_aux_loss_coef * HF's aux loss
            t1 = time.perf_counter()
            engine.backward(out.loss)
            t2 = time.perf_counter()
            engine.step()
            parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

        for _ in range(args.warmup):
            step()
        Path("/proc/self/clear_refs").write_text("5")
        times, moved = [], []
        for _ in range(args.steps):
            r0, w0 = process_io_bytes()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            r1, w1 = process_io_bytes()
            moved.append((r1 - r0) + (w1 - w0))
        step_ms = 1e3 * statistics.median(times)
        timed = parts[-args.steps:]  # where the step goes: forward, backward (with ZeRO-3's gathers), optimizer step
        base["parts_ms"] = {n: 1e3 * statistics.median(p[i] for p in timed)
                            for i, n in enumerate(("forward", "backward", "step"))}
        base.update(step_ms=step_ms, tokens_per_s=args.batch * args.seq / (step_ms / 1e3), step_ms_min=1e3 * min(times),
                    step_ms_all=[round(1e3 * x, 1) for x in times],
                    peak_rss_mb=status("VmHWM") / 2**20, bytes_moved_per_step=statistics.median(moved),
                    expert_params=e_params, steps=args.steps)
    except BaseException as e:  # recorded, not raised: the row says why DeepSpeed does not run here
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        base["error"] = f"{type(e).__name__}: {str(e)[:300]} (at {Path(where.filename).name}:{where.lineno})"
    return base


def child(args: argparse.Namespace) -> None:
    row, args.dtype = args.row.split("@")
    if row.startswith("deepspeed:"):
        _, device, attn = row.split(":")
        res = row_deepspeed(args, device, attn)
    else:
        impl, cache = row.split(":")
        res = row_semoe(args, impl, cache)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps (CI)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                    help="fixed: MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the kernel, so peak RSS "
                         "measures live memory; every fresh block >= 64 KiB costs page faults); default: glibc's "
                         "dynamic threshold (faster allocation, RSS keeps freed heap)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences per step; default: per dtype the smallest batch at >= --regime T* (F and B "
                         "measured first); given, the run warns when it lands below --regime T*")
    ap.add_argument("--regime", type=float, default=1.5,
                    help="tokens per expert per step over T* that the default batch aims at (issue #11: >= 1.5)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-frac", type=float, default=0.25, help="host budget / expert state (<= 0.25)")
    ap.add_argument("--peers", default="auto", choices=["auto", "none", "only"],
                    help="none: no DeepSpeed rows; only: DeepSpeed rows and the in-memory row (a shorter run)")
    ap.add_argument("--dtype", default="float32",
                    help="float32, bfloat16 or float32,bfloat16: every row in each (bf16: autocast, float32 masters)")
    ap.add_argument("--ds-attn", default="eager,sdpa",
                    help="HF attention implementations of the DeepSpeed rows (each a row per offload device; the "
                         "summary compares with the fastest): eager, sdpa or both")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.d_model, args.d_ff, args.experts, args.batch, args.seq = 2, 1, 32, 128, 4, 4, 32
    dtypes = args.dtype.split(",")
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes:
        ap.error(f"--dtype {args.dtype!r}: choose float32, bfloat16 or float32,bfloat16")
    ds_attn = args.ds_attn.split(",")
    if not ds_attn or any(a not in ("eager", "sdpa") for a in ds_attn):
        ap.error(f"--ds-attn {args.ds_attn!r}: choose eager, sdpa or eager,sdpa")
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch {args.batch}: must be >= 1")
    if args.regime <= 0:
        ap.error(f"--regime {args.regime}: must be > 0")
    if args.row is not None:
        if args.batch is None:
            ap.error("a --row needs its --batch")
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    ours = ["in-memory:warm"] + (["semoe-offload:warm", "semoe-offload:cold"] if args.peers != "only" else [])
    rows = [f"{r}@{d}" for d in dtypes for r in ours]
    rows += [f"deepspeed:{dev}:{a}@{d}" for d in dtypes for a in ds_attn for dev in ("cpu", "nvme")
             if args.peers != "none"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_offload_") as work:
        batches, regime = {d: args.batch for d in dtypes}, {}
        if args.batch is None:  # size the run to the regime: F and B first, then the batch
            state = 16 * 3 * args.layers * args.experts * args.d_model * args.d_ff
            bw = disk_bandwidth(Path(work) / "bw", min(state, 256 * 2**20))
            for d in dtypes:
                batches[d], regime[d] = regime_batch(args, d, bw)
                LOG.info("%s: batch %d (%.0f tokens/expert/step; F %.0f GFLOP/s, B %.2f GB/s, T* %.0f at %d B/param)",
                         d, batches[d], regime[d]["tokens_per_expert"], regime[d]["flops"] / 1e9, bw / 1e9,
                         regime[d]["t_star"], SCHEDULE_BYTES_PER_PARAM)
        # enough text for the largest batch's validation windows too (4000 lines: 226 windows of 129 tokens)
        write_corpus(Path(work) / "corpus.txt", 4000 * max(1, math.ceil(max(batches.values()) / 150)))
        fwd, skip = [], False
        for a in sys.argv[1:]:  # the child gets the sizes; --peers / --dtype are the parent's
            if skip:
                skip = False
            elif a in ("--peers", "--dtype", "--ds-attn"):
                skip = True
            elif not a.startswith(("--peers=", "--dtype=", "--ds-attn=")):
                fwd.append(a)
        for row in rows:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                   "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
            if args.malloc == "fixed":
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            else:
                env.pop("MALLOC_MMAP_THRESHOLD_", None)
            size = [] if args.batch is not None else ["--batch", str(batches[row.split("@")[1]])]
            res = subprocess.run([sys.executable, __file__, *fwd, *size, "--row", row, "--workdir", work],
                                 capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                r = {"impl": row.split(":")[0], "cache": "warm", "dtype": row.split("@")[1], "error": res.stderr[-600:]}
            else:
                r = json.loads(line[-1][len("RESULT "):])
            results.append(r)
    mems = {r["dtype"]: r for r in results if r["impl"] == "in-memory"}
    for mem in mems.values():
        if "error" in mem:
            print(json.dumps(mem), flush=True)
            raise SystemExit(f"the in-memory row ({mem['dtype']}) failed: {mem['error'][-600:]}")
    for r in results:
        if r["impl"] == "semoe-offload" and "error" not in r:
            b = r["bytes_moved_per_step"] / r["expert_params"]
            r["bytes_per_expert_param"] = b
            r["t_star"] = t_star(b, r["flops"], r["disk_bytes_per_s"])  # this row's b, F and B
            r["tokens_per_expert_over_t_star"] = r["tokens_per_expert"] / r["t_star"]
            if r["tokens_per_expert_over_t_star"] < 1.5:
                LOG.warning("%s %s @%s: %.0f tokens/expert/step = %.2f T* (T* %.0f), below the 1.5 T* that issue "
                            "#11's targets assume%s", r["impl"], r["cache"], r["dtype"], r["tokens_per_expert"],
                            r["tokens_per_expert_over_t_star"], r["t_star"],
                            " (--smoke: expected)" if args.smoke else
                            "; drop --batch to size the run to the regime" if args.batch is not None else "")
            io_floor_ms = 1e3 * r["bytes_moved_per_step"] / r["disk_bytes_per_s"]
            r["io_floor_ms"] = io_floor_ms
            r["bound_step_ms"] = max(mems[r["dtype"]]["step_ms"], io_floor_ms)  # compute side: same dtype
        elif "error" not in r and r.get("step_ms") is not None:
            r.setdefault("bound_step_ms", r["step_ms"])
        print(json.dumps(r), flush=True)
    ds_rows = [r for r in results if r["impl"] == "deepspeed" and r.get("tokens_per_s")]
    ds = max(ds_rows, key=lambda r: r["tokens_per_s"], default=None)  # DeepSpeed's fastest setup and dtype
    summary = {"summary": True, "smoke": args.smoke, "cpu": cpu_model(), "dtypes": dtypes,
               "batch_chosen": "given" if args.batch is not None else "regime", "batch": batches,
               "regime_pick": regime or None,
               "errors": [f"{r['impl']}:{r.get('offload', r['cache'])}:{r.get('attn', '')}@{r['dtype']}: "
                          f"{r['error'][:200]}"
                          for r in results if "error" in r] or None}
    for d in dtypes:  # like with like: offloaded vs in memory in the same dtype
        mem = mems[d]
        offs = {r["cache"]: r for r in results if r["impl"] == "semoe-offload" and r["dtype"] == d and "error" not in r}
        for cache, r in offs.items():
            vals = {"ratio_vs_in_memory": r["step_ms"] / mem["step_ms"],
                    "ratio_vs_in_memory_of_min": r["step_ms_min"] / mem["step_ms_min"],  # least disturbed steps
                    "ratio_vs_bound": r["step_ms"] / r["bound_step_ms"],
                    "tokens_per_expert_over_t_star": r["tokens_per_expert_over_t_star"],
                    "in_regime": r["tokens_per_expert_over_t_star"] >= 1.5,
                    "moved_over_schedule": r["bytes_moved_per_step"] / r["schedule_bytes_per_step"],
                    "read_over_schedule": r["bytes_read_per_step"] / r["schedule_read_bytes_per_step"],
                    "written_over_schedule": r["bytes_written_per_step"] / r["schedule_write_bytes_per_step"],
                    "rss_over_budget_mb": r["peak_rss_mb"] - r["budget_mb"]}
            for k, v in vals.items():
                summary[f"{k}_{cache}@{d}"] = v
                if d == dtypes[0]:
                    summary[f"{k}_{cache}"] = v
    for cache in ("warm", "cold"):  # best with best: semoe offloaded at its fastest dtype vs DeepSpeed's fastest
        offs = [r for r in results if r["impl"] == "semoe-offload" and r["cache"] == cache and "error" not in r]
        best = max(offs, key=lambda r: r["tokens_per_s"], default=None)
        if best is not None:
            summary[f"best_dtype_{cache}"] = best["dtype"]
            summary[f"ratio_vs_deepspeed_{cache}"] = best["tokens_per_s"] / ds["tokens_per_s"] if ds else None
    summary["deepspeed_fastest"] = f"{ds['offload']}:{ds['attn']}@{ds['dtype']}" if ds else None
    summary["targets"] = {"ratio_vs_in_memory": 1.3, "ratio_vs_bound": 1.15, "moved_over_schedule": 1.05,
                          "ratio_vs_deepspeed": 2.0, "tokens_per_expert_over_t_star": 1.5}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
