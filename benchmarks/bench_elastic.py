"""Unbalanced multi-task training step: elastic placement vs uniform placement vs DeepSpeed-MoE, same model, data
and global batches, at W ranks (gloo, 1 thread per rank).

    flock -x /tmp/semoe-cpu.lock .venv/bin/python benchmarks/bench_elastic.py             # W = 2 and 4
    .venv/bin/python benchmarks/bench_elastic.py --smoke                                    # seconds (CI)

Workload: 4 tasks with global batches 8:4:2:1 (``--tasks``, default synth=128,digits=64,cancer=32,wine=16; per-sample
costs = tokens per sample 8, 4, 2, 1), the multi-task model of ``semoe.models.multitask`` with wide task-routed
layers (``--task-ff``) and a narrow backbone, so the task experts carry most of the work. Loss: the sum over tasks of
each task's mean cross-entropy. AdamW. No token-gated layer (its all-to-all would make every placement wait alike).

Placements:
  elastic    ``semoe.elastic`` (``ElasticTrainer``), its plan re-planned from measured times: a calibration launch
             trains ``--calib-rounds`` x ``--calib-steps`` steps from the token plan (load = batch x tokens per
             sample) and re-plans after each round from the median per-rank CPU times (``elastic.replan_every``:
             per-task costs and the fixed cost of a task on a rank, ``planner.fit_costs``); the timed launch
             starts from that plan. Each task's expert is replicated over its ranks, each of them reading its
             slice of that task.
  elastic_tokens  the same from the token plan, without re-planning (not in the default placements).
  uniform    every rank reads an equal slice of every task (1/W of each global batch), task t's expert lives on
             rank t % W only; the task-routed layers send each task's rows to that rank and back (all-to-all with
             the planner's count matrix, ``Plan.a2a_counts``); everything else is replicated.
  deepspeed  DeepSpeed-MoE's layer (``deepspeed.moe.layer.MoE``) in place of each task-routed layer, in its most
             natural configuration for this job: one expert per task (num_experts = number of tasks), ep_size = W,
             top-1 gating, ``use_residual=True`` (PR-MoE: a dense MLP next to the experts, mixed by a learned
             coefficient: DeepSpeed's counterpart of the shared + task expert), dropless (``drop_tokens=False``),
             every rank an equal slice of every task; dense gradients summed over the world in a plain loop
             (the engine adds nothing to an ep_size = W layer's reduction). Token-gated, so it learns its own
             task-to-expert routing instead of being told.

Per placement: ``warmup`` steps, then ``steps`` timed steps (a barrier before each). ``samples_per_s``: global
samples / median step time. ``busy_max_over_mean``: per-rank CPU time (process time: compute, not waiting in a
collective) over the timed steps, max over mean. ``samples_per_cpu_s``: global samples / the busiest rank's CPU
time per step, the throughput with a core per rank: where ranks outnumber the cores (W=4 on 2 cores) wall time
measures the scheduler (every placement takes about total CPU / cores), and this is the one to read.
``peak_rss_mb``: peak resident set, max over ranks; ``train_rss_mb``: its growth from just before the model is
built (max over ranks). ``bound_ratio``: the analytic bound of elastic over one-rank-per-task placement,
W * max_t load_t / sum_t load_t (notes/elastic.md).
Output: one JSON line per (placement, world), then one summary line per world with the ratios and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common import emit_json, log, stdout_to_stderr  # noqa: E402

PLACEMENTS = ("elastic", "uniform", "deepspeed")
CHOICES = (*PLACEMENTS, "elastic_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--placements", default=",".join(PLACEMENTS))
    p.add_argument("--tasks", default="synth=128,digits=64,cancer=32,wine=16")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=64)
    p.add_argument("--task-ff", type=int, default=768)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3, help="placements alternate, each runs once per round; a row "
                   "is the round with the median samples/s")
    p.add_argument("--calib-rounds", type=int, default=3, help="re-plans of the elastic calibration launch")
    p.add_argument("--calib-steps", type=int, default=6, help="steps measured before each re-plan")
    p.add_argument("--calib-gain", type=float, default=0.03, help="elastic.replan_gain of the calibration")
    p.add_argument("--smoke", action="store_true", help="tiny, 1 world of 2, no DeepSpeed (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.worlds, args.placements = "2", "elastic,uniform"
        args.tasks, args.task_ff, args.warmup, args.steps = "synth=16,digits=8,cancer=4,wine=2", 64, 1, 3
        args.rounds, args.calib_rounds, args.calib_steps = 1, 1, 2
    bad = [x for x in args.placements.split(",") if x and x not in CHOICES]
    if bad:
        p.error(f"unknown placement(s) {bad}; choose from {', '.join(CHOICES)}")
    return args


def _run_config(args: argparse.Namespace):
    from semoe.config import ElasticConfig, MultiTaskModelConfig, MultiTaskRunConfig, TrainConfig

    model = MultiTaskModelConfig(d_model=args.d_model, n_blocks=args.blocks, d_ff=args.d_ff,
                                 task_expert_d_ff=args.task_ff, token_moe=None)
    train = TrainConfig(steps=10**6, lr=1e-3, warmup_steps=0, eval_every=10**6, ckpt_every=10**6, dtype="float32")
    return MultiTaskRunConfig(model=model, train=train, elastic=ElasticConfig(tasks=args.tasks))


def _reset_peak_rss() -> float:
    from common import current_rss_mb

    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        pass
    return current_rss_mb()


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    from common import peak_rss_mb

    return peak_rss_mb()


# ------------------------------------------------------------------------------------------ placements
def _uniform_step(args, run, rank: int, world: int):
    """The uniform placement: a step function and the model (see the module docstring)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from semoe.elastic.data import load_tasks, task_batch, task_specs
    from semoe.elastic.planner import uniform_plan
    from semoe.models.multitask import MultiTaskMoE
    from semoe.parallel.all_to_all import all_to_all
    from semoe.training.step import optimizer_step
    from semoe.training.trainer import param_groups

    batches = run.elastic.task_batches()
    data = load_tasks(list(batches))
    plan = uniform_plan({t: (b, float(data[t].tokens)) for t, b in batches.items()}, world)
    owner = {t: plan.experts_on[i][0] for i, t in enumerate(plan.tasks)}
    rows = {(r, t): (hi - lo) * data[t].tokens for t in plan.tasks for r, lo, hi in plan.slices(t)}
    model = MultiTaskMoE(run.model, task_specs(data), seed=run.train.seed)

    class UniformTaskMoE(nn.Module):
        def __init__(self, base) -> None:
            super().__init__()
            self.shared, self.policy = base.shared, base.policy
            self.task_experts = nn.ModuleDict({t: e for t, e in base.task_experts.items() if owner[t] == rank})

        def forward(self, x_ND, spans):
            shared_ND = self.shared(x_ND)
            order = sorted(range(len(spans)), key=lambda i: (owner[spans[i][0]], i))
            send = torch.cat([x_ND[spans[i][1]:spans[i][2]] for i in order])
            send_splits = [sum(spans[i][2] - spans[i][1] for i in order if owner[spans[i][0]] == o)
                           for o in range(world)]
            mine = [t for t in plan.tasks if owner[t] == rank]
            recv_splits = [sum(rows[(s, t)] for t in mine) for s in range(world)]
            recv = all_to_all(send, send_splits, recv_splits, dist.group.WORLD)
            outs, off = [], 0
            for s in range(world):
                for t in mine:
                    outs.append(self.task_experts[t](recv[off:off + rows[(s, t)]]))
                    off += rows[(s, t)]
            back = all_to_all(torch.cat(outs), recv_splits, send_splits, dist.group.WORLD)
            pieces, off = {}, 0
            for i in order:
                n = spans[i][2] - spans[i][1]
                pieces[i], off = back[off:off + n], off + n
            parts = []
            for i, (t, lo, hi) in enumerate(spans):
                p = torch.softmax(self.policy[t], 0)
                parts.append(p[0] * shared_ND[lo:hi] + p[1] * pieces[i])
            return torch.cat(parts)

    for block in model.blocks:
        if block.task_moe is not None:
            block.task_moe = UniformTaskMoE(block.task_moe)
    opt = torch.optim.AdamW(param_groups(model, run.train), lr=run.train.lr, foreach=True)
    replicated = [p for n, p in model.named_parameters() if ".task_experts." not in n]

    def sync() -> None:  # the task experts' gradients came back through the all-to-all: complete already
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        dist.all_reduce(flat)
        off = 0
        for p in replicated:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()

    def step(s: int) -> float:
        xs, ys = {}, {}
        for i, t in enumerate(plan.tasks):
            _, lo, hi = plan.slices(t)[rank]
            xs[t], ys[t] = task_batch(data[t], batches[t], s, run.train.seed, i, lo, hi)

        def objective(_):
            out = model(xs)
            v = sum(F.cross_entropy(out.logits[t], ys[t], reduction="sum") / batches[t] for t in xs)
            return v, float(v.detach())
        kept, _ = optimizer_step(opt, [None], objective, lr=run.train.lr, sync=sync,
                                 clip=lambda: torch.zeros(()))
        return kept[0]
    return step, plan


def _deepspeed_step(args, run, rank: int, world: int):
    import logging

    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger as ds_logger
    from torch import nn

    from semoe.elastic.data import load_tasks, task_batch, task_specs
    from semoe.elastic.planner import uniform_plan
    from semoe.models.multitask import FFN, MultiTaskMoE
    from semoe.training.step import optimizer_step
    from semoe.training.trainer import param_groups

    ds_logger.setLevel(logging.ERROR)
    with stdout_to_stderr():
        deepspeed.init_distributed(dist_backend="gloo")
    batches = run.elastic.task_batches()
    data = load_tasks(list(batches))
    plan = uniform_plan({t: (b, float(data[t].tokens)) for t, b in batches.items()}, world)
    model = MultiTaskMoE(run.model, task_specs(data), seed=run.train.seed)
    E = -(-len(plan.tasks) // world) * world

    class DSTaskMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            D = run.model.d_model
            self.moe = MoE(hidden_size=D, expert=FFN(D, run.model.task_expert_d_ff), num_experts=E, ep_size=world,
                           k=1, use_residual=True, drop_tokens=False, capacity_factor=1.0, eval_capacity_factor=1.0,
                           min_capacity=1)
            self.moe.set_deepspeed_parallelism()
            self.aux = torch.zeros(())

        def forward(self, x_ND, spans):
            out, aux, _ = self.moe(x_ND)
            self.aux = aux
            return out

    with stdout_to_stderr():
        for block in model.blocks:
            if block.task_moe is not None:
                block.task_moe = DSTaskMoE()
    opt = torch.optim.AdamW(param_groups(model, run.train), lr=run.train.lr, foreach=True)
    dense = [p for p in model.parameters() if getattr(p, "allreduce", True)]
    expert = [p for p in model.parameters() if not getattr(p, "allreduce", True)]
    assert expert, "DeepSpeed MoE experts not found"

    def sync() -> None:  # ep_size = W: every expert has one replica, its gradient is complete
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in dense])
        dist.all_reduce(flat)
        off = 0
        for p in dense:
            p.grad = flat[off:off + p.numel()].view_as(p).clone()
            off += p.numel()

    aux_layers = [b.task_moe for b in model.blocks if b.task_moe is not None]

    def step(s: int) -> float:
        xs, ys = {}, {}
        for i, t in enumerate(plan.tasks):
            _, lo, hi = plan.slices(t)[rank]
            xs[t], ys[t] = task_batch(data[t], batches[t], s, run.train.seed, i, lo, hi)

        def objective(_):
            out = model(xs)
            v = sum(F.cross_entropy(out.logits[t], ys[t], reduction="sum") / batches[t] for t in xs)
            v = v + 0.01 * sum(m.aux for m in aux_layers) / world
            return v, float(v.detach())
        kept, _ = optimizer_step(opt, [None], objective, lr=run.train.lr, sync=sync, clip=lambda: torch.zeros(()))
        return kept[0]
    return step, plan


def _calibrate(args, run, rank: int, world: int, out_dir: str) -> dict:
    """Train from the token plan and re-plan from measured times ``calib_rounds`` times; the final plan."""
    from semoe.config import replace
    from semoe.training.elastic_trainer import ElasticTrainer

    run = replace(run, elastic=replace(run.elastic, replan_every=args.calib_steps, replan_gain=args.calib_gain))
    trainer = ElasticTrainer(run, Path(out_dir), resume=None)
    plans, s = [trainer.plan.describe()], 0
    for _ in range(args.calib_rounds):
        for _ in range(args.calib_steps):
            trainer.train_step(s)
            s += 1
        if trainer.maybe_replan(s):
            plans.append(trainer.plan.describe())
    return {"plan_json": trainer.plan.to_json(), "plans": plans}


def _elastic_step(args, run, rank: int, world: int, out_dir: str, plan_json: dict | None):
    from semoe.elastic.planner import Plan
    from semoe.training.elastic_trainer import ElasticTrainer

    plan = Plan.from_json(plan_json) if plan_json is not None else None
    trainer = ElasticTrainer(run, Path(out_dir), resume=None, plan=plan)

    def step(s: int) -> float:
        return trainer.train_step(s)["loss"]
    return step, trainer.plan


def _worker(rank: int, world: int, placement: str, args: argparse.Namespace, store: str, out: str,
            plan_json: dict | None) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    result: dict = {"placement": placement, "world": world}
    try:
        run = _run_config(args)
        from semoe.elastic.data import load_tasks

        load_tasks(list(run.elastic.task_batches()))  # imports scikit-learn: not part of any placement's memory
        base_rss = _reset_peak_rss()
        if placement == "calibrate":
            result.update(_calibrate(args, run, rank, world, str(Path(out) / "run")))
            raise _Done
        if placement.startswith("elastic"):
            step, plan = _elastic_step(args, run, rank, world, str(Path(out) / "run"), plan_json)
        elif placement == "uniform":
            step, plan = _uniform_step(args, run, rank, world)
        else:
            step, plan = _deepspeed_step(args, run, rank, world)
        for s in range(args.warmup):
            step(s)
        times, cpu = [], 0.0
        for s in range(args.warmup, args.warmup + args.steps):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(s)
            cpu += time.process_time() - c0
            times.append(time.perf_counter() - t0)
        peak = _vm_hwm_mb()
        result.update(step_s=statistics.median(times), cpu_s=cpu, peak_rss_mb=peak, train_rss_mb=peak - base_rss,
                      plan=plan.describe())
    except _Done:
        pass
    except Exception as e:  # recorded, the other contenders still run
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


class _Done(Exception):
    """The calibration launch is over (nothing to time)."""


def _launch(placement: str, world: int, args: argparse.Namespace, workdir: Path,
            plan_json: dict | None = None) -> dict:
    import torch.multiprocessing as mp

    run_dir = workdir / f"{placement}-{world}-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    mp.start_processes(_worker, args=(world, placement, args, str(run_dir / "store"), str(run_dir), plan_json),
                       nprocs=world, join=True, start_method="fork")
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        log(f"[bench_elastic] {placement} at {world} ranks failed: {errors[0]}\n{ranks[0].get('traceback', '')}")
        return {"placement": placement, "world": world, "error": errors[0]}
    if placement == "calibrate":
        log(f"[bench_elastic] calibration W={world}, plans in turn:\n" + "\n".join(ranks[0]["plans"]))
        return ranks[0]
    samples = sum(int(x.split("=")[1]) for x in args.tasks.split(","))
    step = max(r["step_s"] for r in ranks)
    cpu = [r["cpu_s"] for r in ranks]
    cpu_step = max(cpu) / args.steps  # the busiest rank's CPU time per step: the step on one core per rank
    log(f"[bench_elastic] {placement} W={world}:\n{ranks[0]['plan']}")
    return {"placement": placement, "world": world, "samples_per_s": samples / step, "step_ms": 1e3 * step,
            "plan": ranks[0]["plan"].splitlines(),
            "busy_max_over_mean": max(cpu) / statistics.mean(cpu), "busy_s_per_rank": cpu,
            "cpu_step_ms_max": 1e3 * cpu_step, "samples_per_cpu_s": samples / cpu_step,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "train_rss_mb": max(r["train_rss_mb"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    from semoe.elastic.data import load_tasks
    from semoe.elastic.planner import bound_ratio

    args = parse_args(argv)
    placements = [p for p in args.placements.split(",") if p]
    if "deepspeed" in placements and importlib.util.find_spec("deepspeed") is None:
        log("[bench_elastic] deepspeed is not installed (pip install -e '.[bench]'): its rows are skipped")
        placements.remove("deepspeed")
    tasks = dict((x.split("=")[0], int(x.split("=")[1])) for x in args.tasks.split(","))
    data = load_tasks(list(tasks))
    loads = {t: (b, float(data[t].tokens)) for t, b in tasks.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            runs: dict[str, list[dict]] = {p: [] for p in placements}
            calib = _launch("calibrate", world, args, Path(tmp)) if "elastic" in placements else {}
            for r in range(args.rounds):
                for placement in placements if r % 2 == 0 else placements[::-1]:
                    plan_json = calib.get("plan_json") if placement == "elastic" else None
                    runs[placement].append(_launch(placement, world, args, Path(tmp), plan_json))
            rows = {}
            for placement, got in runs.items():
                ok = sorted((g for g in got if "error" not in g), key=lambda g: g["samples_per_s"])
                row = ok[len(ok) // 2] if ok else got[0]
                row = {**row, "bound_ratio": bound_ratio(loads, world), "tasks": args.tasks, "rounds": len(got),
                       "samples_per_s_all": [g.get("samples_per_s") for g in got]}
                emit_json(row)
                rows[placement] = row
            el, un, ds = (rows.get(p, {}) for p in PLACEMENTS)
            summary: dict = {"summary": True, "world": world, "smoke": args.smoke,
                             "bound_ratio": bound_ratio(loads, world)}
            if "samples_per_s" in el and "samples_per_s" in un:
                summary["elastic_over_uniform"] = el["samples_per_s"] / un["samples_per_s"]
                summary["fraction_of_bound"] = summary["elastic_over_uniform"] / summary["bound_ratio"]
                summary["target_80pct_of_bound"] = summary["fraction_of_bound"] >= 0.8
                summary["elastic_over_uniform_cpu"] = el["samples_per_cpu_s"] / un["samples_per_cpu_s"]
                summary["fraction_of_bound_cpu"] = summary["elastic_over_uniform_cpu"] / summary["bound_ratio"]
            tok = rows.get("elastic_tokens", {})
            if "samples_per_s" in tok and "samples_per_s" in un:
                summary["elastic_tokens_over_uniform"] = tok["samples_per_s"] / un["samples_per_s"]
            if "samples_per_s" in el:
                summary["target_busy_le_1.15"] = el["busy_max_over_mean"] <= 1.15
            if "samples_per_s" in el and "samples_per_s" in ds:
                summary["elastic_over_deepspeed"] = el["samples_per_s"] / ds["samples_per_s"]
                summary["elastic_over_deepspeed_cpu"] = el["samples_per_cpu_s"] / ds["samples_per_cpu_s"]
                summary["memory_vs_deepspeed"] = el["train_rss_mb"] / max(ds["train_rss_mb"], 1e-9)
                summary["target_1.64x_at_le_0.82_memory"] = (summary["elastic_over_deepspeed"] >= 1.64
                                                             and summary["memory_vs_deepspeed"] <= 0.82)
            summary["errors"] = {p: r["error"] for p, r in rows.items() if "error" in r} or None
            emit_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
