"""The elastic planner: which ranks train which task (UFO's placement, re-planned as loads and world change).

Input: tasks {name: (global batch B_t, cost per sample c_t)} and the world size W. A task's load is
``B_t * c_t``. Its quota is ``W * load_t / sum(load)`` ranks; largest-remainder rounding gives each task
``r_t`` ranks of its own. A task whose quota rounds to 0 (only with ``share=True``) shares a rank: it goes
to the rank with the least load so far (heaviest such task first). With ``share=False`` every task gets at
least one rank (the largest remainders give up theirs), which needs W >= number of tasks.

Each of task t's ranks takes an equal contiguous slice of t's global batch (the first ``B_t % r_t`` one more)
and holds t's parameters (stem, head, task experts, policy): the task expert is replicated over t's ranks,
and every rank of t reads an equal share of t. ``uniform`` is the baseline: every rank takes an equal slice
of every task and task t's expert lives on rank ``t % W`` only.

Gradient rules (objective: the sum over tasks of each task's mean loss over its global batch): a rank's loss
is ``sum_t (sum of its rows' losses of t) / B_t``, so the sum over ranks is the objective; shared parameters
are summed over all ranks, task t's parameters over t's ranks, token-gated experts over their replicas.
The sums equal one process's gradient of the whole global multi-task batch (tests/dist/test_elastic.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Plan:
    """A placement. ``ranks[i]``: the ranks of task ``tasks[i]``; ``experts_on[i]``: the ranks that hold task
    i's parameters (= ``ranks[i]`` for an elastic plan, one rank for uniform)."""

    world: int
    tasks: tuple[str, ...]
    batches: tuple[int, ...]
    costs: tuple[float, ...]
    ranks: tuple[tuple[int, ...], ...]
    experts_on: tuple[tuple[int, ...], ...]
    placement: str = "elastic"

    # --------------------------------------------------------------- queries
    def index(self, task: str) -> int:
        return self.tasks.index(task)

    def slices(self, task: str) -> list[tuple[int, int, int]]:
        """(rank, lo, hi) of ``task``'s global batch on each of its ranks."""
        i = self.index(task)
        rs, b = self.ranks[i], self.batches[i]
        q, rem = divmod(b, len(rs))
        out, lo = [], 0
        for j, r in enumerate(rs):
            hi = lo + q + (1 if j < rem else 0)
            out.append((r, lo, hi))
            lo = hi
        return out

    def local(self, rank: int) -> list[tuple[str, int, int]]:
        """(task, lo, hi) of every task slice ``rank`` computes, in task order."""
        return [(t, lo, hi) for t in self.tasks for r, lo, hi in self.slices(t) if r == rank and hi > lo]

    def holds(self, rank: int) -> list[str]:
        """Tasks whose parameters ``rank`` holds, in task order."""
        return [t for t, on in zip(self.tasks, self.experts_on) if rank in on]

    def rank_loads(self) -> np.ndarray:
        """[W] predicted work per rank: sum over its slices of rows x cost."""
        load = np.zeros(self.world)
        for t, c in zip(self.tasks, self.costs):
            for r, lo, hi in self.slices(t):
                load[r] += (hi - lo) * c
        return load

    def busy_max_over_mean(self) -> float:
        load = self.rank_loads()
        return float(load.max() / load.mean())

    def a2a_counts(self) -> np.ndarray:
        """[W, W] samples rank i sends to rank j in a task-routed layer (to the ranks holding the task's
        expert, spread evenly over them); an elastic plan's is diagonal: no all-to-all at all."""
        m = np.zeros((self.world, self.world), dtype=np.int64)
        for i, t in enumerate(self.tasks):
            owners = self.experts_on[i]
            for r, lo, hi in self.slices(t):
                if r in owners:
                    m[r, r] += hi - lo
                else:
                    n, k = hi - lo, len(owners)
                    for j, o in enumerate(owners):
                        m[r, o] += n // k + (1 if j < n % k else 0)
        return m

    def describe(self) -> str:
        loads = self.rank_loads()
        lines = [f"{self.placement} plan for {self.world} ranks (busy max/mean {self.busy_max_over_mean():.3f}):"]
        for t, b, c, rs in zip(self.tasks, self.batches, self.costs, self.ranks):
            lines.append(f"  {t:>8}: batch {b:4d} x cost {c:g} -> ranks {list(rs)}")
        lines.append("  load per rank: " + ", ".join(f"{x:g}" for x in loads))
        return "\n".join(lines)

    # --------------------------------------------------------------- files
    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(world=int(d["world"]), tasks=tuple(d["tasks"]), batches=tuple(int(b) for b in d["batches"]),
                   costs=tuple(float(c) for c in d["costs"]), ranks=tuple(tuple(r) for r in d["ranks"]),
                   experts_on=tuple(tuple(r) for r in d["experts_on"]), placement=d.get("placement", "elastic"))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def load_plan(path: Path, world: int, tasks: dict[str, int]) -> Plan:
    """A plan file, checked against this run's world size and tasks."""
    plan = Plan.from_json(json.loads(Path(path).read_text()))
    if plan.world != world:
        raise ValueError(f"plan file {path} is for {plan.world} ranks but this run has {world}; "
                         "delete it (or pass none) to let the planner plan for this world size")
    if dict(zip(plan.tasks, plan.batches)) != tasks:
        raise ValueError(f"plan file {path} plans tasks {dict(zip(plan.tasks, plan.batches))}, this run trains "
                         f"{tasks}; delete it to re-plan")
    check_plan(plan)
    return plan


def check_plan(plan: Plan) -> None:
    """Every rank has work, every task is fully covered by ranks in range, slices are non-empty."""
    for t, rs in zip(plan.tasks, plan.ranks):
        if not rs or any(not 0 <= r < plan.world for r in rs) or len(set(rs)) != len(rs):
            raise ValueError(f"plan: task {t} has ranks {list(rs)}, need distinct ranks in 0..{plan.world - 1}")
    idle = [r for r in range(plan.world) if not plan.local(r)]
    if idle:
        raise ValueError(f"plan: ranks {idle} have no task; use fewer ranks or larger task batches")


def _largest_remainder(quota: np.ndarray, total: int, minimum: int, cap: np.ndarray) -> np.ndarray:
    """Integers summing to ``total``, each in [minimum, cap], close to ``quota`` (Hamilton's method)."""
    n = np.clip(np.floor(quota).astype(int), minimum, cap)
    while n.sum() < total:
        room = np.flatnonzero(n < cap)
        if room.size == 0:
            break
        rem = quota[room] - n[room]
        n[room[np.argmax(rem)]] += 1
    while n.sum() > total:
        room = np.flatnonzero(n > minimum)
        rem = quota[room] - n[room]
        n[room[np.argmin(rem)]] -= 1
    return n


def plan_tasks(tasks: dict[str, tuple[int, float]], world: int, share: bool = True) -> Plan:
    """The elastic plan of ``tasks`` {name: (global batch, cost per sample)} on ``world`` ranks."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not tasks:
        raise ValueError("no tasks to plan; give at least one name=batch in elastic.tasks")
    names = list(tasks)
    for t, (b, c) in tasks.items():
        if b < 1:
            raise ValueError(f"task {t!r} has global batch {b}; every task needs a batch >= 1")
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"task {t!r} has cost per sample {c}; it must be a positive number")
    batch = np.array([tasks[t][0] for t in names])
    cost = np.array([float(tasks[t][1]) for t in names])
    load = batch * cost
    quota = world * load / load.sum()
    cap = batch.copy()  # no more ranks than samples
    if not share:
        if len(names) > world:
            raise ValueError(f"{len(names)} tasks but {world} ranks and elastic.share_ranks=false: every task "
                             "needs a rank of its own; add ranks, drop tasks or set elastic.share_ranks=true")
        n = _largest_remainder(quota, world, 1, cap)
    else:
        n = _largest_remainder(quota, min(world, int(cap.sum())), 0, cap)
    ranks: list[list[int]] = [[] for _ in names]
    nxt = 0
    for i in range(len(names)):
        ranks[i] = list(range(nxt, nxt + int(n[i])))
        nxt += int(n[i])
    rank_load = np.zeros(world)
    for i in range(len(names)):
        for r in ranks[i]:
            rank_load[r] += load[i] / len(ranks[i])
    for i in sorted((i for i in range(len(names)) if not ranks[i]), key=lambda i: -load[i]):
        r = int(np.argmin(rank_load))  # lightest rank so far (the first on ties)
        ranks[i] = [r]
        rank_load[r] += load[i]
    plan = Plan(world=world, tasks=tuple(names), batches=tuple(int(b) for b in batch),
                costs=tuple(float(c) for c in cost), ranks=tuple(tuple(r) for r in ranks),
                experts_on=tuple(tuple(r) for r in ranks), placement="elastic")
    check_plan(plan)
    return plan


def uniform_plan(tasks: dict[str, tuple[int, float]], world: int) -> Plan:
    """The baseline: every rank takes an equal slice of every task; task i's expert lives on rank i % W."""
    names = list(tasks)
    for t, (b, _) in tasks.items():
        if b < world:
            raise ValueError(f"uniform placement needs every task batch >= world size {world}; task {t!r} has {b}")
    return Plan(world=world, tasks=tuple(names), batches=tuple(int(tasks[t][0]) for t in names),
                costs=tuple(float(tasks[t][1]) for t in names), ranks=tuple(tuple(range(world)) for _ in names),
                experts_on=tuple((i % world,) for i in range(len(names))), placement="uniform")


def bound_ratio(tasks: dict[str, tuple[int, float]], world: int) -> float:
    """The analytic speed-up bound of elastic over one-rank-per-task placement: W * max_t load_t / sum load."""
    load = np.array([b * c for b, c in tasks.values()], dtype=np.float64)
    return float(world * load.max() / load.sum())


def measured_costs(plan: Plan, rank_times: np.ndarray) -> dict[str, float]:
    """Cost per sample of every task from measured per-rank busy times [W]: a rank's time is split over its
    slices in proportion to rows x current cost; a task's cost is its time summed over ranks / its batch.
    The scale is arbitrary (only ratios matter to the planner)."""
    pred = np.zeros(len(plan.tasks))
    loads = plan.rank_loads()
    for i, t in enumerate(plan.tasks):
        for r, lo, hi in plan.slices(t):
            share = (hi - lo) * plan.costs[i] / loads[r] if loads[r] > 0 else 0.0
            pred[i] += rank_times[r] * share
    return {t: float(pred[i] / plan.batches[i]) for i, t in enumerate(plan.tasks)}


def replan(plan: Plan, rank_times: np.ndarray | None = None, world: int | None = None, share: bool = True,
           gain: float = 0.1) -> Plan:
    """A new plan from measured per-rank times and/or a new world size, or ``plan`` itself when nothing
    changes by more than ``gain`` (the predicted busiest rank of the new plan, relative)."""
    world = plan.world if world is None else world
    costs = dict(zip(plan.tasks, plan.costs)) if rank_times is None else measured_costs(plan, rank_times)
    tasks = {t: (b, costs[t]) for t, b in zip(plan.tasks, plan.batches)}
    new = plan_tasks(tasks, world, share)
    if world != plan.world:
        return new
    old_on_new_costs = Plan(plan.world, plan.tasks, plan.batches, new.costs, plan.ranks, plan.experts_on)
    if new.ranks == plan.ranks or new.rank_loads().max() > (1 - gain) * old_on_new_costs.rank_loads().max():
        return plan
    return new
