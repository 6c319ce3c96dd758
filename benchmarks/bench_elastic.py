"""Unbalanced multi-task training step: elastic placement vs uniform placement vs DeepSpeed-MoE, same model, data
and global batches, at W ranks (gloo, 1 thread per rank).

    flock -x /tmp/semoe-cpu.lock .venv/bin/python benchmarks/bench_elastic.py             # W = 2 and 4
    .venv/bin/python benchmarks/bench_elastic.py --smoke                                    # seconds (CI)

Workload: 4 tasks with global batches 8:4:2:1 (``--tasks``, default synth=128,digits=64,cancer=32,wine=16, times
``--batch-scale``; per-sample costs = tokens per sample 8, 4, 2, 1), the multi-task model of
``semoe.models.multitask`` with wide task-routed layers (``--task-ff``, the task experts; ``--shared-ff``, the
shared expert and DeepSpeed's residual MLP, default as wide as the task experts) and a narrow backbone, so the
experts carry most of the work. Loss: the sum over tasks of each task's mean cross-entropy. AdamW (fused, the
trainers' ``build_optimizer``, for every placement). No token-gated layer (its all-to-all would make every
placement wait alike). docs/elastic.md says why ``--shared-ff 384`` (half the task expert) is the UFO-like
workload.

Placements:
  elastic    ``semoe.elastic`` (``ElasticTrainer``), its plan re-planned from measured times: a calibration launch
             trains ``--calib-rounds`` x ``--calib-steps`` steps from the token plan (load = batch x tokens per
             sample) and re-plans after each round from the median per-rank CPU times (``elastic.replan_every``:
             per-task costs and the fixed cost of a task on a rank, ``planner.fit_costs``); the plan a last
             move chose is measured too, and the timed launch starts from the plan measured fastest. Each
             task's expert is replicated over its ranks, each of them reading its slice of that task.
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
``--breakdown`` adds per rank the CPU time of each part of the step (``breakdown_ms``: forward by component,
backward, each kind of collective, gradient-sync glue, clipping, optimizer, the rest; exclusive timers that add up
to the step; and the experts' forward + backward timed alone at the rows they got) and ``critical_path_ms`` /
``samples_per_critical_s``: per step the sum over the stretches between world collectives of the slowest rank's
CPU time, the step with a core per rank and no waiting beyond what the collectives force (the hooks cost a little:
read the breakdown rows against each other, the rows without it for throughput).
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
    p.add_argument("--batch-scale", type=float, default=1.0, help="every global batch of --tasks multiplied by "
                   "this (rounded, same ratios): 9 gives synth=1152,digits=576,cancer=288,wine=144, UFO's "
                   "1152:576 for the two largest tasks")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=64)
    p.add_argument("--task-ff", type=int, default=768)
    p.add_argument("--shared-ff", type=int, default=None, help="width of the shared expert and of DeepSpeed's "
                   "residual MLP (PR-MoE); default: --task-ff")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3, help="placements alternate, each runs once per round; a row "
                   "is the round with the median samples/s")
    p.add_argument("--calib-rounds", type=int, default=3, help="re-plans of the elastic calibration launch")
    p.add_argument("--calib-steps", type=int, default=20, help="steps measured before each re-plan (and for the "
                   "last plan, which is kept only if no plan measured before was faster)")
    p.add_argument("--calib-gain", type=float, default=0.03, help="elastic.replan_gain of the calibration")
    p.add_argument("--breakdown", action="store_true", help="per-rank CPU time of each part of the step "
                   "(forward by component, backward, all-reduce, all-to-all, clipping, optimizer; exclusive "
                   "timers) and each expert's forward + backward timed alone at its rows (``breakdown`` in a row)")
    p.add_argument("--smoke", action="store_true", help="tiny, 1 world of 2, no DeepSpeed (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.worlds, args.placements = "2", "elastic,uniform"
        args.tasks, args.task_ff, args.warmup, args.steps = "synth=16,digits=8,cancer=4,wine=2", 64, 1, 3
        args.rounds, args.calib_rounds, args.calib_steps = 1, 1, 2
    if args.batch_scale <= 0:
        p.error("--batch-scale must be > 0")
    if args.batch_scale != 1:
        args.tasks = ",".join(f"{n}={max(1, round(int(b) * args.batch_scale))}"
                              for n, b in (x.split("=") for x in args.tasks.split(",")))
    bad = [x for x in args.placements.split(",") if x and x not in CHOICES]
    if bad:
        p.error(f"unknown placement(s) {bad}; choose from {', '.join(CHOICES)}")
    return args


def _run_config(args: argparse.Namespace):
    from semoe.config import ElasticConfig, MultiTaskModelConfig, MultiTaskRunConfig, TrainConfig

    shared = {} if args.shared_ff is None else {"shared_expert_d_ff": args.shared_ff}
    model = MultiTaskModelConfig(d_model=args.d_model, n_blocks=args.blocks, d_ff=args.d_ff,
                                 task_expert_d_ff=args.task_ff, token_moe=None, **shared)
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


# ------------------------------------------------------------------------------------------ breakdown
class _Phases:
    """Exclusive CPU-time (process time) timers: a phase nested in another is not counted in the outer one,
    so the phases and the rest add up to the step. ``segments``: per step, the CPU time between collectives
    over the whole world and inside each of them (every rank runs the same sequence of them), from which
    ``_launch`` takes the step's critical path with a core per rank: the sum over segments of the max over
    ranks (a rank cannot leave a world collective before the slowest rank has entered it)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.total: dict[str, float] = {}
        self.rows: dict[str, int] = {}
        self.module_rows: dict[int, int] = {}
        self.segments: list[list[float]] = []
        self._stack: list[list] = []
        self._seg_c0 = 0.0
        self.on = False

    def start_step(self) -> None:
        self.on, self._seg_c0 = True, time.process_time()
        self.segments.append([])

    def end_step(self) -> None:
        self.segments[-1].append(time.process_time() - self._seg_c0)
        self.on = False

    def wrap_collective(self, obj, attr: str) -> None:
        import inspect

        import torch.distributed as dist

        orig = getattr(obj, attr)
        sig = inspect.signature(orig)
        name = f"collective {attr}"

        def timed(*a, **k):
            if not self.on:
                return orig(*a, **k)
            group = sig.bind_partial(*a, **k).arguments.get("group")
            whole = group is None or dist.get_world_size(group) == self.world
            c0 = time.process_time()
            if whole:
                self.segments[-1].append(c0 - self._seg_c0)
            self.enter(name)
            try:
                return orig(*a, **k)
            finally:
                self.exit()
                if whole:
                    c1 = time.process_time()
                    self.segments[-1].append(c1 - c0)
                    self._seg_c0 = c1
        setattr(obj, attr, timed)

    def enter(self, name: str) -> None:
        if self.on:
            self._stack.append([name, time.process_time(), 0.0])

    def exit(self) -> None:
        if not self.on or not self._stack:
            return
        name, c0, child = self._stack.pop()
        dt = time.process_time() - c0
        self.total[name] = self.total.get(name, 0.0) + dt - child
        if self._stack:
            self._stack[-1][2] += dt

    def wrap(self, obj, attr: str, name: str) -> None:
        orig = getattr(obj, attr)

        def timed(*a, **k):
            self.enter(name)
            try:
                return orig(*a, **k)
            finally:
                self.exit()
        setattr(obj, attr, timed)

    def hook(self, module, name: str) -> None:
        def pre(m, args):
            x = args[0] if args else None
            if self.on and hasattr(x, "shape"):
                self.rows[name] = self.rows.get(name, 0) + int(x.shape[0])
                self.module_rows[id(m)] = self.module_rows.get(id(m), 0) + int(x.shape[0])
            self.enter(name)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(lambda m, a, o: self.exit())


def _install_breakdown(model, optimizer, extra: dict) -> _Phases:
    """Timers on this rank's model: forward by component, backward, collectives, optimizer; ``extra``:
    more ``{name: (object, attribute)}`` to time (clipping)."""
    import torch
    import torch.distributed as dist

    ph = _Phases(dist.get_world_size())
    for t, m in model.stems.items():
        ph.hook(m, "fwd stems+heads")
        ph.hook(model.heads[t], "fwd stems+heads")
    for b in model.blocks:
        for m in (b.norm1, b.mlp, b.norm2):
            if m is not None:
                ph.hook(m, "fwd backbone")
        moe = b.task_moe
        if moe is None:
            continue
        ph.hook(moe, "fwd task layer: mixing, routing, all-to-all")
        if hasattr(moe, "moe"):  # DeepSpeed: residual MLP (PR-MoE), gate, experts
            ph.hook(moe.moe.mlp, "fwd shared expert")
            ph.hook(moe.moe.deepspeed_moe.gate, "fwd gate")
            ph.hook(moe.moe.deepspeed_moe.experts, "fwd task experts")
        else:
            ph.hook(moe.shared, "fwd shared expert")
            for e in moe.task_experts.values():
                ph.hook(e, "fwd task experts")
    ph.hook(model.norm_f, "fwd backbone")
    ph.wrap(torch.Tensor, "backward", "backward (all)")
    for fn in ("all_reduce", "all_gather", "broadcast", "barrier", "all_to_all_single"):
        ph.wrap_collective(dist, fn)
    ph.wrap(optimizer, "step", "optimizer step")
    ph.wrap(optimizer, "zero_grad", "optimizer zero_grad")
    for name, (obj, attr) in extra.items():
        ph.wrap(obj, attr, name)
    return ph


def _expert_alone_ms(model, ph: _Phases, steps: int, reps: int = 5) -> dict[str, float]:
    """Per step, ms of CPU: the shared experts and the task experts of the task-routed layers, forward +
    backward alone at the rows each got per step (so the experts' backward can be told from the rest)."""
    import torch

    shared, task = [], []
    for b in model.blocks:
        moe = b.task_moe
        if moe is None:
            continue
        if hasattr(moe, "moe"):
            shared.append(moe.moe.mlp)
            task.append(moe.moe.deepspeed_moe.experts)
        else:
            shared.append(moe.shared)
            task += list(moe.task_experts.values())
    out: dict[str, float] = {}
    D = model.cfg.d_model
    for kind, mods in (("shared", shared), ("task", task)):
        if kind == "task" and any(not hasattr(m, "fc1") for m in mods):
            continue  # DeepSpeed's experts take its dispatched [E, capacity, D] layout: not timed alone
        work = [(m, ph.module_rows.get(id(m), 0) // max(steps, 1)) for m in mods]
        work = [(m, n) for m, n in work if n > 0]
        if not work:
            continue
        times = []
        for _ in range(reps):
            xs = [torch.randn(n, D, requires_grad=True) for _, n in work]
            c0 = time.process_time()
            for (m, _), x in zip(work, xs):
                m(x).sum().backward()
            times.append(time.process_time() - c0)
        for m, _ in work:
            m.zero_grad(set_to_none=True)
        out[f"fwd+bwd alone: {kind} expert"] = 1e3 * statistics.median(times)
    return out


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
    from semoe.training.trainer import build_optimizer

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
    opt = build_optimizer(model, run.train)  # the elastic trainer's AdamW (fused)
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
    step.parts = (model, opt, {})
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
    from semoe.training.trainer import build_optimizer

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
            if getattr(run.model, "shared_expert_d_ff", None) is not None:  # residual MLP = semoe's shared expert
                self.moe.mlp = FFN(D, run.model.shared_expert_d_ff)
            self.aux = torch.zeros(())

        def forward(self, x_ND, spans):
            out, aux, _ = self.moe(x_ND)
            self.aux = aux
            return out

    with stdout_to_stderr():
        for block in model.blocks:
            if block.task_moe is not None:
                block.task_moe = DSTaskMoE()
    opt = build_optimizer(model, run.train)  # the elastic trainer's AdamW (fused)
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
    step.parts = (model, opt, {})
    return step, plan


def _calibrate(args, run, rank: int, world: int, out_dir: str) -> dict:
    """Train from the token plan and re-plan from measured times ``calib_rounds`` times; the final plan."""
    from semoe.config import replace
    from semoe.elastic.planner import plan_key
    from semoe.training.elastic_trainer import ElasticTrainer

    run = replace(run, elastic=replace(run.elastic, replan_every=args.calib_steps, replan_gain=args.calib_gain))
    trainer = ElasticTrainer(run, Path(out_dir), resume=None)
    plans, s = [trainer.plan.describe()], 0

    def window() -> None:
        nonlocal s
        for _ in range(args.calib_steps):
            trainer.train_step(s)
            s += 1
    for _ in range(args.calib_rounds):
        window()
        if trainer.maybe_replan(s):
            plans.append(trainer.plan.describe())
    if plan_key(trainer.plan) not in trainer.measured:  # the last move's plan: measured before it is kept
        window()
        if trainer.busy:
            trainer.record_measured()
    best = min(trainer.measured.values(), key=lambda m: m[0])[1]
    if plan_key(best) != plan_key(trainer.plan):
        plans.append("measured faster, kept: " + best.describe())
    return {"plan_json": best.to_json(), "plans": plans}


def _elastic_step(args, run, rank: int, world: int, out_dir: str, plan_json: dict | None):
    from semoe.elastic.planner import Plan
    from semoe.training.elastic_trainer import ElasticTrainer

    plan = Plan.from_json(plan_json) if plan_json is not None else None
    trainer = ElasticTrainer(run, Path(out_dir), resume=None, plan=plan)

    def step(s: int) -> float:
        return trainer.train_step(s)["loss"]
    step.parts = (trainer.model, trainer.optimizer, {"clip (norm)": (trainer.layout, "clip_"),
                                                      "gradient sync": (trainer.layout, "sync_gradients")})
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
        ph = _install_breakdown(*step.parts) if args.breakdown else None
        times, cpu = [], 0.0
        for s in range(args.warmup, args.warmup + args.steps):
            dist.barrier()
            if ph is not None:
                ph.start_step()
            t0, c0 = time.perf_counter(), time.process_time()
            step(s)
            cpu += time.process_time() - c0
            times.append(time.perf_counter() - t0)
            if ph is not None:
                ph.end_step()
        peak = _vm_hwm_mb()
        result.update(step_s=statistics.median(times), cpu_s=cpu, peak_rss_mb=peak, train_rss_mb=peak - base_rss,
                      plan=plan.describe())
        if ph is not None:
            parts = {k: 1e3 * v / args.steps for k, v in sorted(ph.total.items())}
            parts["rest (python, loss, data, glue)"] = 1e3 * cpu / args.steps - sum(parts.values())
            parts.update(_expert_alone_ms(step.parts[0], ph, args.steps))
            result["breakdown_ms"] = parts
            result["breakdown_rows"] = {k: v // args.steps for k, v in ph.rows.items()}
            result["segments_s"] = ph.segments
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
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "train_rss_mb": max(r["train_rss_mb"] for r in ranks),
            **({"breakdown_ms": [r["breakdown_ms"] for r in ranks],
                "breakdown_rows": [r["breakdown_rows"] for r in ranks], **_critical_path(ranks, samples)}
               if "breakdown_ms" in ranks[0] else {})}


def _critical_path(ranks: list[dict], samples: int) -> dict:
    """The step with a core per rank, from the per-rank CPU time between world collectives: per step the sum
    over segments of the max over ranks (the median over steps); None when the ranks' segments do not line up."""
    per_step = []
    for segs in zip(*(r["segments_s"] for r in ranks)):
        if len({len(x) for x in segs}) != 1:
            return {"critical_path_ms": None}
        per_step.append(sum(max(col) for col in zip(*segs)))
    crit = statistics.median(per_step)
    return {"critical_path_ms": 1e3 * crit, "samples_per_critical_s": samples / crit,
            "world_collectives_per_step": len(ranks[0]["segments_s"][0]) // 2}


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
                       "task_ff": args.task_ff, "shared_ff": args.shared_ff or args.task_ff,
                       "batch_scale": args.batch_scale,
                       "samples_per_s_all": [g.get("samples_per_s") for g in got]}
                emit_json(row)
                rows[placement] = row
            el, un, ds = (rows.get(p, {}) for p in PLACEMENTS)
            summary: dict = {"summary": True, "world": world, "smoke": args.smoke, "tasks": args.tasks,
                             "batch_scale": args.batch_scale,
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
