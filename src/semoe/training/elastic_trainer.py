"""The elastic multi-task trainer (the components of ``semoe.elastic``, trained with the shared step): one
process or many under torchrun, ranks placed by the planner.

Each rank holds the shared backbone, the tasks of its plan (stems, heads, task experts, policies) and its
share of the token-gated experts; it trains on its slices of its tasks' global batches. The optimizer step
is ``semoe.training.step.optimizer_step`` (the Trainer's), with the gradient rules of
``semoe.elastic.layout``. Checkpoints are asynchronous (``semoe.elastic.checkpoint``) and layout independent:
a run resumes on any world size and re-plans. ``replan_every`` re-plans from measured per-rank busy times
(CPU time; per-task costs and the fixed cost of a task on a rank, ``semoe.elastic.planner.fit_costs``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from semoe.config import MultiTaskRunConfig, to_dict
from semoe.elastic.checkpoint import AsyncCheckpointer, check_task_set, clean_partial, owned_tensors
from semoe.elastic.data import load_tasks, task_batch, task_specs
from semoe.elastic.layout import ElasticLayout, token_ep_size
from semoe.elastic.planner import CommModel, Plan, choose_measured, fit_comm, plan_key, plan_tasks, replan
from semoe.models.multitask import MultiTaskMoE, param_task
from semoe.parallel import apply_expert_parallel, build_mesh, init_distributed
from semoe.storage import checkpoint as ckpt
from semoe.training.metrics import MetricsWriter
from semoe.training.step import optimizer_step
from semoe.training.trainer import TrainingDiverged, build_optimizer, lr_at

log = logging.getLogger(__name__)

HISTORY = 8  # earlier re-plan windows (plan, measured times) that join the fit of costs and gradient sums


@dataclass
class ElasticResult:
    out_dir: Path
    plan: Plan
    losses: list[float] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # held-out, at the end
    checkpoint: Path | None = None
    stalls_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


class ElasticTrainer:
    """``ElasticTrainer(run, out_dir).fit()``; ``plan``: a fixed plan (else the planner's for this world)."""

    def __init__(self, run: MultiTaskRunConfig, out_dir: Path, resume: str | None = "auto",
                 plan: Plan | None = None) -> None:
        self.run, self.out_dir = run, Path(out_dir)
        self.distributed = init_distributed()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.batches = run.elastic.task_batches()
        self.data = load_tasks(list(self.batches), seed=0)
        self.specs = task_specs(self.data)
        self.dtype = torch.float64 if run.train.dtype == "float64" else torch.float32
        self.ckpt_root = self.out_dir / "checkpoints"
        resume_from = None
        if resume is not None:
            resume_from = ckpt.find_latest(self.ckpt_root if resume == "auto" else Path(resume))
            if resume_from is None and resume != "auto":
                raise ckpt.CheckpointError(f"no checkpoint found at {resume}")
        manifest = ckpt.read_manifest(resume_from) if resume_from is not None else None
        if manifest is not None:
            check_task_set(manifest, self.batches, resume_from)
        if plan is not None:
            if plan.world != self.world:
                raise ValueError(f"the plan is for {plan.world} ranks but this run has {self.world}; re-plan for "
                                 f"{self.world} ranks (omit the plan)")
            if dict(zip(plan.tasks, plan.batches)) != self.batches:
                raise ValueError(f"the plan is for tasks {dict(zip(plan.tasks, plan.batches))}, this run trains "
                                 f"{self.batches}")
        elif manifest is not None:  # the checkpoint's measured costs, re-planned for this world
            old = Plan.from_json(manifest["plan"])
            plan = replan(old, world=self.world, share=run.elastic.share_ranks) if old.world != self.world else old
        else:
            costs = {t: (b, float(self.data[t].tokens)) for t, b in self.batches.items()}
            plan = plan_tasks(costs, self.world, share=run.elastic.share_ranks)
        self.attempt = self._attempt_token()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(self.ckpt_root)
        self._barrier()
        self.checkpointer = AsyncCheckpointer(self.ckpt_root, self.rank, self.world, self.attempt,
                                              keep_last=run.train.keep_last)
        self.start_step = 0
        self._build(plan)
        if resume_from is not None:
            self._load(resume_from)
            self.start_step = int(manifest["data"]["step"])
            if self.rank == 0:
                log.info("resumed from %s at step %d on %d ranks (written on %s)", resume_from, self.start_step,
                         self.world, manifest.get("world_size"))
        self.busy: list[np.ndarray] = []  # per-step per-rank busy seconds since the last (re-)plan
        self.comm: list[np.ndarray] = []  # per step: CPU s per rank of each task's gradient sum, then the shared
        self.task_numel = np.zeros(len(self.plan.tasks))  # gradient elements of each task's parameters
        self.measured: dict[tuple, tuple[float, Plan]] = {}  # plan_key -> (median busiest-rank time, plan)
        self.windows: list[tuple[Plan, np.ndarray]] = []  # earlier re-plan windows: (plan, median busy per rank)
        self._comm_points: list[list[tuple[int, int, float]]] = []  # their gradient sums, as ``fit_comm`` takes

    # ------------------------------------------------------------------ setup
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _attempt_token(self) -> str:
        t = torch.tensor([random.SystemRandom().randrange(1 << 40)], dtype=torch.int64)
        if self.distributed:
            dist.broadcast(t, 0)
        return f"{int(t):x}"

    def _build(self, plan: Plan) -> None:
        self.plan = plan
        self._busy_prev: float | None = None  # this rank's busy time of the last step, sent with the next one
        cfg, tc = self.run.model, self.run.train
        self.model = MultiTaskMoE(cfg, self.specs, plan.holds(self.rank), seed=tc.seed).to(self.dtype)
        self.mesh = None
        if cfg.token_moe is not None and self.distributed:
            self.mesh = build_mesh(token_ep_size(self.world, cfg.token_moe.num_experts))
            apply_expert_parallel(self.model, self.mesh)
        self.layout = ElasticLayout(plan, self.rank, self.mesh, self.distributed)
        # gradient elements of each task whose first rank this is (summed over the world: every task's count)
        self._numel_mine = torch.zeros(len(plan.tasks), dtype=torch.float64)
        for t, n in self.layout.numel(self.model)[1].items():
            if plan.experts_on[plan.index(t)][0] == self.rank:
                self._numel_mine[plan.index(t)] = n
        self.optimizer = build_optimizer(self.model, tc)
        if self.rank == 0:
            log.info("%s", plan.describe())

    def _load(self, path: Path) -> None:
        ckpt.load_model(path, self.model)
        ckpt.load_optimizer(path, self.model, self.optimizer)

    # ------------------------------------------------------------------ steps
    def local_batch(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This rank's slices of its tasks' global batches at ``step``."""
        xs, ys = {}, {}
        for t, lo, hi in self.plan.local(self.rank):
            x, y = task_batch(self.data[t], self.batches[t], step, self.run.train.seed, self.plan.index(t), lo, hi)
            xs[t], ys[t] = x.to(self.dtype), y
        return xs, ys

    def objective(self, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]):
        """This rank's share of the objective (sum over tasks of the mean loss over each global batch) and
        per-task [loss sum, correct, rows] of its rows."""
        out = self.model(xs)
        value = out.router_loss / self.world
        stats = torch.zeros(len(self.plan.tasks), 3, dtype=torch.float64)
        for t, logits in out.logits.items():
            ce = F.cross_entropy(logits, ys[t], reduction="sum")
            value = value + ce / self.batches[t]
            i = self.plan.index(t)
            stats[i] = torch.tensor([float(ce.detach()), float((logits.argmax(-1) == ys[t]).sum()), len(ys[t])],
                                    dtype=torch.float64)
        return value, out, stats

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        tc = self.run.train
        xs, ys = self.local_batch(step)
        box: dict[str, torch.Tensor] = {}

        def objective(_):
            value, _, stats = self.objective(xs, ys)
            box["stats"] = stats
            return value, value

        def sync() -> None:  # the shared gradients, the norm and every rank's statistics ride one all-reduce
            _, box["summed"] = self.layout.sync_gradients(self.model, extra=self._stats_vector(box["stats"]))

        def check(kept: list, norm: float) -> None:
            if not math.isfinite(float(kept[0].detach())) or not math.isfinite(norm):
                raise TrainingDiverged(f"loss or grad norm ({norm}) not finite at step {step}; the last checkpoint "
                                       f"is {self.checkpointer.last_path}. Lower train.lr and resume from it.")

        c0 = time.process_time()
        self.layout.prepare_(self.model, tail=self._stats_numel())  # gradients: zeroed views of flat buffers
        _, norm = optimizer_step(self.optimizer, [None], objective, lr=lr_at(step, tc), sync=sync,
                                 clip=lambda: self.layout.clip_(self.model, tc.grad_clip), check=check)
        stats = self._unpack(box["summed"])
        self._busy_prev = time.process_time() - c0
        row: dict[str, float] = {"loss": 0.0, "grad_norm": norm, "lr": lr_at(step, tc)}
        for i, t in enumerate(self.plan.tasks):
            loss_t = float(stats[i, 0] / stats[i, 2])
            row["loss"] += loss_t
            row[f"loss_{t}"] = loss_t
            row[f"acc_{t}"] = float(stats[i, 1] / stats[i, 2])
        return row

    def _stats_numel(self) -> int:
        """The length of ``_stats_vector``."""
        T = len(self.plan.tasks)
        return 5 * T + self.world + 2

    def _stats_vector(self, stats: torch.Tensor) -> torch.Tensor:
        """What every rank contributes to the step's statistics, summed in the shared gradients' all-reduce (in
        their dtype): per-task [loss sum, correct, rows]; its busy time of the previous step (in its slot; the
        step's own is not over yet); the CPU time of each of its task-group gradient sums and of the shared one,
        of the previous step too (they are not done yet); the gradient elements of each task whose first rank it
        is; a flag: there was a previous step in this plan. Busy = the rank's CPU time of a whole step (forward,
        backward, gradient sync, clipping, optimizer update; not wall time: a rank that waits in a collective, or
        for a core, is not busy), so what each task costs on a rank beyond its rows counts too."""
        T, W = len(self.plan.tasks), self.world
        busy = torch.zeros(W, dtype=torch.float64)
        if self._busy_prev is not None:
            busy[self.rank] = self._busy_prev
        comm = torch.zeros(T + 1, dtype=torch.float64)
        for i, t in enumerate(self.plan.tasks):
            comm[i] = self.layout.comm_s.get(t, 0.0)
        comm[T] = self.layout.comm_s.get("", 0.0)
        flag = torch.tensor([1.0 if self._busy_prev is not None else 0.0], dtype=torch.float64)
        return torch.cat([stats.reshape(-1), busy, comm, self._numel_mine, flag])

    def _unpack(self, summed: torch.Tensor) -> torch.Tensor:
        """The summed statistics vector: keeps the busy times (of the previous step, when there was one) and
        the per-rank CPU time of the gradient sums (a task's sum over its ranks / their number); returns the
        per-task stats."""
        T, W = len(self.plan.tasks), self.world
        stats, busy = summed[:3 * T].view(T, 3), summed[3 * T:3 * T + W]
        comm, numel, flag = summed[3 * T + W:4 * T + W + 1], summed[4 * T + W + 1:5 * T + W + 1], summed[-1]
        if float(flag) > 0:  # busy times and gradient-sum times of the previous step
            self.busy.append(busy.numpy().copy())
            n_on = np.array([len(on) for on in self.plan.experts_on] + [self.world], dtype=np.float64)
            self.comm.append(comm.numpy() / n_on)
        self.task_numel = numel.numpy().copy()
        return stats

    def comm_model(self) -> CommModel | None:
        """The measured cost of a task's gradient sum on each of its ranks (``planner.fit_comm``), from the median
        CPU times since the last plan of this plan's sums over more than one rank (the shared one included, with
        the elements of the tasks every rank holds, which ride it)."""
        if self.world == 1:
            return None
        points = [x for window in self._comm_points[-HISTORY:] for x in window] + self._comm_measured()
        return fit_comm(tuple(int(n) for n in self.task_numel), points) if points else None

    def _comm_measured(self) -> list[tuple[int, int, float]]:
        """(elements, ranks, median CPU s on each) of this window's gradient sums over more than one rank."""
        if not self.comm or self.world == 1:
            return []
        med = np.median(np.stack(self.comm), 0)
        world_tasks = [self.plan.index(t) for t in self.layout.world_tasks]  # summed in the shared buffer
        shared_numel = self.layout.numel(self.model)[0] + int(sum(self.task_numel[i] for i in world_tasks))
        measured = [(int(self.task_numel[i]), len(on), float(med[i])) for i, on in enumerate(self.plan.experts_on)
                    if len(on) > 1 and i not in world_tasks] + [(shared_numel, self.world, float(med[-1]))]
        return measured

    @torch.no_grad()
    def evaluate(self) -> dict[str, tuple[float, float]]:
        """{task: (held-out loss, held-out accuracy)}: each task's test split divided over its ranks."""
        self.model.eval()
        xs, ys = {}, {}
        for i, t in enumerate(self.plan.tasks):
            on = self.plan.experts_on[i]
            if self.rank in on:
                d = self.data[t]
                idx = np.array_split(np.arange(len(d.y_test)), len(on))[on.index(self.rank)]
                xs[t], ys[t] = torch.from_numpy(d.x_test[idx]).to(self.dtype), torch.from_numpy(d.y_test[idx])
        stats = torch.zeros(len(self.plan.tasks), 3, dtype=torch.float64)
        out = self.model(xs)
        for t, logits in out.logits.items():
            ce = float(F.cross_entropy(logits, ys[t], reduction="sum"))
            stats[self.plan.index(t)] = torch.tensor([ce, float((logits.argmax(-1) == ys[t]).sum()), len(ys[t])],
                                                     dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(stats)
        return {t: (float(stats[i, 0] / stats[i, 2]), float(stats[i, 1] / stats[i, 2]))
                for i, t in enumerate(self.plan.tasks)}

    # ------------------------------------------------------------------ checkpoints
    def _owns(self, key: str) -> bool:
        t = param_task(key)
        if t is not None:
            return self.plan.experts_on[self.plan.index(t)][0] == self.rank
        return self.rank == 0

    def manifest(self, step: int) -> dict:
        return {"config": to_dict(self.run), "data": {"step": step,
                "fingerprints": {t: d.fingerprint() for t, d in self.data.items()}},
                "tasks": self.batches, "plan": self.plan.to_json(), "world_size": self.world}

    def save(self, step: int, wait: bool = False) -> Path:
        t0 = time.perf_counter()
        write_experts = self.mesh is None or self.mesh.get_local_rank("dp") == 0
        model_t, optim_t = owned_tensors(self.model, self.optimizer, self._owns, write_experts)
        path = self.checkpointer.save(step, model_t, optim_t, self.manifest(step), t0=t0)
        if wait:
            self.checkpointer.wait()
            self._barrier()
        return path

    def record_measured(self) -> np.ndarray:
        """The median per-rank busy times since the last plan; the busiest one is kept in ``measured`` as this
        plan's time."""
        times = np.median(np.stack(self.busy), 0)
        self.measured[plan_key(self.plan)] = (float(times.max()), self.plan)
        return times

    def maybe_replan(self, step: int) -> bool:
        """Every ``replan_every`` steps: re-plan from the measured busy times (this window's and those of the last
        ``HISTORY`` windows before it, pooled in one fit); move to the new plan through a
        checkpoint (written synchronously) when it is better by ``replan_gain`` (predicted, or measured for a
        plan trained before: ``planner.choose_measured`` goes back to a plan measured faster)."""
        ec = self.run.elastic
        if not ec.replan_every or not self.busy or (step % ec.replan_every):
            return False
        times = self.record_measured()
        new = replan(self.plan, times, share=ec.share_ranks, gain=ec.replan_gain, comm=self.comm_model(),
                     history=self.windows[-HISTORY:])
        new = choose_measured(self.plan, new, self.measured, ec.replan_gain)
        self.windows.append((self.plan, times))
        self._comm_points.append(self._comm_measured())
        self.busy, self.comm = [], []
        if new == self.plan:
            return False
        path = self.save(step, wait=True)
        self._build(new)
        self._load(path)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self) -> ElasticResult:
        tc = self.run.train
        main = self.rank == 0
        metrics = MetricsWriter(self.out_dir / "metrics.csv", resume_step=self.start_step) if main else None
        exact = _ExactLog(self.out_dir / "losses.jsonl", self.start_step) if main else None
        result = ElasticResult(self.out_dir, self.plan)
        samples = sum(self.batches.values())
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps, disable=not main,
                   desc="train", unit="step", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            row = self.train_step(step)
            dt = time.perf_counter() - t0
            done = step + 1
            result.losses.append(row["loss"])
            result.step_s.append(dt)
            busy = self.busy[-1] if self.busy else np.full(self.world, np.nan)  # the previous step's
            row = {"step": done, **row, "step_ms": 1e3 * dt, "samples_per_s": samples / dt,
                   "busy_max_over_mean": float(busy.max() / busy.mean())}
            if done % tc.eval_every == 0 or done == tc.steps:
                for t, (vl, va) in self.evaluate().items():
                    row[f"val_loss_{t}"], row[f"val_acc_{t}"] = vl, va
            if done % tc.ckpt_every == 0 or done == tc.steps:
                self.save(done)
                result.stalls_s.append(self.checkpointer.stalls_s[-1])
            if metrics and exact:
                metrics.log(row)
                exact.log(done, row["loss"])
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            self.maybe_replan(done)
        bar.close()
        self.checkpointer.wait()
        self._barrier()
        result.plan, result.checkpoint = self.plan, self.checkpointer.last_path
        result.accuracy = {t: a for t, (_, a) in self.evaluate().items()}
        if metrics and exact:
            metrics.close()
            exact.close()
            from semoe.training.task_plots import plot_tasks

            plot_tasks(self.out_dir / "metrics.csv", self.out_dir)
        return result


class _ExactLog:
    """``losses.jsonl``: step and loss at full precision (metrics.csv keeps 6 digits), continued on resume."""

    def __init__(self, path: Path, resume_step: int) -> None:
        kept = []
        if path.exists():
            text = path.read_text()
            lines = text.split("\n")[:-1]  # a last line without its newline was cut short by a kill: dropped
            kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= resume_step]
        tmp = path.with_name(path.name + ".tmp")  # replaced atomically: a kill here loses no kept line
        tmp.write_text("".join(f"{ln}\n" for ln in kept))
        os.replace(tmp, path)
        self._f = open(path, "a")  # closed in close()

    def log(self, step: int, loss: float) -> None:
        self._f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_losses(out_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's ``losses.jsonl``."""
    rows = [json.loads(ln) for ln in (Path(out_dir) / "losses.jsonl").read_text().splitlines() if ln]
    return {r["step"]: r["loss"] for r in rows}
