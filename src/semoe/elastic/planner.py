"""The elastic planner: which ranks train which task (UFO's placement, re-planned as loads and world change).

Input: tasks {name: (global batch B_t, cost per sample c_t)}, the world size W and ``overhead`` f, the fixed
cost of holding a task on a rank (its stem, head and task experts run and step once per rank, whatever the
rows), and ``comm`` (a ``CommModel``), the cost on each of its ranks of summing the gradients of a task held by
more than one rank. A rank's predicted time is ``sum over its slices (rows x c_t) + f x (number of tasks on it)
+ sum over its tasks held by n_t > 1 ranks of comm_t(n_t)``.

Two candidate plans; the one with the lighter predicted busiest rank wins (the line only when lighter by more
than ``LINE_GAIN``, 2%: at the token plan no gradient-sum cost is known yet, and a cut that buys 0.6% once put 2
rows of a task on a fourth rank, a 4-rank all-reduce for 2 rows):

* **largest remainder**: task t's quota is ``W * load_t / sum(load)`` ranks (``load_t = B_t * c_t``);
  Hamilton rounding gives each task ``r_t`` ranks of its own, each an equal contiguous slice. A task whose
  quota rounds to 0 (only with ``share=True``) shares a rank: it goes to the rank with the least load so far
  (heaviest such task first). With ``share=False`` every task gets at least one rank (the largest
  remainders give up theirs), which needs W >= number of tasks; this is the only candidate then.
* **line partition** (``share=True``): the tasks, heaviest first, laid end to end as one line of rows, cut
  into W contiguous pieces of equal predicted time (the smallest busiest time T for which filling each rank
  up to T, paying f for every task it touches, covers the line; binary search). Slices are uneven and a
  rank at a cut holds two tasks; it balances what whole ranks cannot (W=2 with one task of 3/4 the load).

Every rank of task t holds t's parameters (stem, head, task experts, policy): the task expert is replicated
over t's ranks, and each of them reads its slice of t. ``uniform`` is the baseline: every rank takes an
equal slice of every task and task t's expert lives on rank ``t % W`` only.

Gradient rules (objective: the sum over tasks of each task's mean loss over its global batch): a rank's loss
is ``sum_t (sum of its rows' losses of t) / B_t``, so the sum over ranks is the objective; shared parameters
are summed over all ranks, task t's parameters over t's ranks, token-gated experts over their replicas.
The sums equal one process's gradient of the whole global multi-task batch (tests/dist/test_elastic.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

LINE_GAIN = 0.02  # the line's uneven cuts must buy this much (predicted): a cut costs more than the model sees


@dataclass(frozen=True)
class CommModel:
    """The cost, on each of its ``n`` ranks, of summing a task's gradients over them: ``latency + rate *
    numel * 2 (n - 1) / n`` (a ring all-reduce moves ``2 (n - 1) / n`` of the buffer through every rank), 0 on
    one rank. ``numel``: gradient elements of each task's parameters, in the plan's task order; ``rate`` and
    ``latency`` in the units of the plan's costs (measured: ``fit_comm``)."""

    numel: tuple[int, ...]
    rate: float
    latency: float = 0.0

    def cost(self, i: int, n: int) -> float:
        if n <= 1:
            return 0.0
        return self.latency + self.rate * self.numel[i] * 2 * (n - 1) / n


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
    rows: tuple[tuple[int, ...], ...] | None = None  # rows of task i on each of ranks[i]; None: equal slices
    overhead: float = 0.0  # fixed cost of a task on a rank, in the units of rows x cost
    comm: CommModel | None = None  # cost of a task's gradient sum on each of its ranks when it has several

    # --------------------------------------------------------------- queries
    def index(self, task: str) -> int:
        return self.tasks.index(task)

    def slices(self, task: str) -> list[tuple[int, int, int]]:
        """(rank, lo, hi) of ``task``'s global batch on each of its ranks."""
        i = self.index(task)
        rs, b = self.ranks[i], self.batches[i]
        if self.rows is not None:
            sizes = list(self.rows[i])
        else:
            q, rem = divmod(b, len(rs))
            sizes = [q + (1 if j < rem else 0) for j in range(len(rs))]
        out, lo = [], 0
        for r, n in zip(rs, sizes):
            out.append((r, lo, lo + n))
            lo += n
        return out

    def local(self, rank: int) -> list[tuple[str, int, int]]:
        """(task, lo, hi) of every task slice ``rank`` computes, in task order."""
        return [(t, lo, hi) for t in self.tasks for r, lo, hi in self.slices(t) if r == rank and hi > lo]

    def holds(self, rank: int) -> list[str]:
        """Tasks whose parameters ``rank`` holds, in task order."""
        return [t for t, on in zip(self.tasks, self.experts_on) if rank in on]

    def rank_loads(self) -> np.ndarray:
        """[W] predicted work per rank: sum over its slices of rows x cost, plus ``overhead`` per slice, plus
        the gradient sum of every task it holds with other ranks (``comm``)."""
        return self.row_loads() + self.overhead * self.tasks_on() + self.comm_loads()

    def row_loads(self) -> np.ndarray:
        """[W] sum over each rank's slices of rows x cost."""
        load = np.zeros(self.world)
        for t, c in zip(self.tasks, self.costs):
            for r, lo, hi in self.slices(t):
                load[r] += (hi - lo) * c
        return load

    def comm_loads(self) -> np.ndarray:
        """[W] predicted cost of each rank's task-group gradient sums (0 without a ``comm`` model)."""
        load = np.zeros(self.world)
        if self.comm is not None:
            for i, on in enumerate(self.experts_on):
                for r in on:
                    load[r] += self.comm.cost(i, len(on))
        return load

    def tasks_on(self) -> np.ndarray:
        """[W] number of task slices each rank computes."""
        return np.array([len(self.local(r)) for r in range(self.world)])

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
        over = f", overhead {self.overhead:.3g} per task on a rank" if self.overhead else ""
        if self.comm is not None:
            over += f", gradient sum {self.comm.rate:.3g} per element + {self.comm.latency:.3g}"
        lines = [f"{self.placement} plan for {self.world} ranks (busy max/mean {self.busy_max_over_mean():.3f}"
                 f"{over}):"]
        for t, b, c, rs in zip(self.tasks, self.batches, self.costs, self.ranks):
            rows = f" rows {[hi - lo for _, lo, hi in self.slices(t)]}" if self.rows is not None else ""
            lines.append(f"  {t:>8}: batch {b:4d} x cost {c:.4g} -> ranks {list(rs)}{rows}")
        lines.append("  load per rank: " + ", ".join(f"{x:.4g}" for x in loads))
        return "\n".join(lines)

    # --------------------------------------------------------------- files
    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        return cls(world=int(d["world"]), tasks=tuple(d["tasks"]), batches=tuple(int(b) for b in d["batches"]),
                   costs=tuple(float(c) for c in d["costs"]), ranks=tuple(tuple(r) for r in d["ranks"]),
                   experts_on=tuple(tuple(r) for r in d["experts_on"]), placement=d.get("placement", "elastic"),
                   rows=None if d.get("rows") is None else tuple(tuple(int(n) for n in r) for r in d["rows"]),
                   overhead=float(d.get("overhead", 0.0)), comm=None if d.get("comm") is None else CommModel(
                       numel=tuple(int(n) for n in d["comm"]["numel"]), rate=float(d["comm"]["rate"]),
                       latency=float(d["comm"].get("latency", 0.0))))

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
    for i, (t, rs) in enumerate(zip(plan.tasks, plan.ranks)):
        if not rs or any(not 0 <= r < plan.world for r in rs) or len(set(rs)) != len(rs):
            raise ValueError(f"plan: task {t} has ranks {list(rs)}, need distinct ranks in 0..{plan.world - 1}")
        if plan.rows is not None and (len(plan.rows[i]) != len(rs) or sum(plan.rows[i]) != plan.batches[i]
                                      or min(plan.rows[i]) < 1):
            raise ValueError(f"plan: task {t} has rows {list(plan.rows[i])} on ranks {list(rs)}; need one count "
                             f">= 1 per rank, summing to its batch {plan.batches[i]}")
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


def plan_tasks(tasks: dict[str, tuple[int, float]], world: int, share: bool = True,
               overhead: float = 0.0, comm: CommModel | None = None) -> Plan:
    """The elastic plan of ``tasks`` {name: (global batch, cost per sample)} on ``world`` ranks; ``overhead``:
    the fixed cost of a task on a rank (same units as batch x cost); ``comm``: the cost of a task's gradient
    sum on each of its ranks when it has more than one (same units; None: free)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not tasks:
        raise ValueError("no tasks to plan; give at least one name=batch in elastic.tasks")
    if not (overhead >= 0 and math.isfinite(overhead)):
        raise ValueError(f"overhead per task must be a number >= 0, got {overhead}")
    if comm is not None and (len(comm.numel) != len(tasks) or not all(
            x >= 0 and math.isfinite(x) for x in (comm.rate, comm.latency, *comm.numel))):
        raise ValueError(f"comm model {comm} needs one element count per task ({len(tasks)}) and a rate and "
                         "latency >= 0; measure it with fit_comm")
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
            rank_load[r] += load[i] / len(ranks[i]) + overhead + (comm.cost(i, len(ranks[i])) if comm else 0.0)
    for i in sorted((i for i in range(len(names)) if not ranks[i]), key=lambda i: -load[i]):
        r = int(np.argmin(rank_load))  # lightest rank so far (the first on ties)
        ranks[i] = [r]
        rank_load[r] += load[i] + overhead
    common = dict(world=world, tasks=tuple(names), batches=tuple(int(b) for b in batch),
                  costs=tuple(float(c) for c in cost), placement="elastic", overhead=float(overhead), comm=comm)
    plan = Plan(ranks=tuple(tuple(r) for r in ranks), experts_on=tuple(tuple(r) for r in ranks), **common)
    check_plan(plan)
    line = _line_partition(batch, cost, world, overhead, comm) if share else None
    if line is not None:
        cand = Plan(ranks=tuple(tuple(r for r, _ in x) for x in line), experts_on=tuple(tuple(r for r, _ in x)
                    for x in line), rows=tuple(tuple(k for _, k in x) for x in line), **common)
        if all(cand.local(r) for r in range(world)) and \
                cand.rank_loads().max() < plan.rank_loads().max() * (1 - LINE_GAIN):
            check_plan(cand)
            return cand
    return plan


def _line_partition(batch: np.ndarray, cost: np.ndarray, world: int, overhead: float,
                    comm: CommModel | None = None) -> list[list[tuple[int, int]]] | None:
    """Per task, its (rank, rows) pieces when the tasks (heaviest first) are laid end to end and cut into
    ``world`` pieces of the least possible busiest time; None if some rank would stay idle. A task cut over
    ranks pays ``comm`` on each of them (for the number of pieces it had in the previous fill: a few fills
    until that number holds)."""
    order = np.argsort(-(batch * cost), kind="stable")

    def fill(limit: float, pieces: list[int]) -> list[list[tuple[int, int]]] | None:
        out: list[list[tuple[int, int]]] = [[] for _ in batch]
        r, used = 0, 0.0
        for i in order:
            left = int(batch[i])
            split = comm.cost(int(i), max(pieces[i], 2)) if comm is not None else 0.0
            while left:
                room = limit - used - overhead
                if not out[i] and room >= 0 and left * cost[i] <= room * (1 + 1e-12):
                    k, extra = left, 0.0  # the whole task fits here: no gradient sum with another rank
                else:
                    room -= split
                    k = min(left, math.floor(room / cost[i] + 1e-9)) if room > 0 else 0
                    extra = split
                if k <= 0:
                    if used == 0 or r + 1 >= world:
                        return None
                    r, used = r + 1, 0.0
                    continue
                out[i].append((r, k))
                used += overhead + k * cost[i] + extra
                left -= k
                if left:  # this rank is full for task i (k was all that fit): its next rows go to the next rank
                    if r + 1 >= world:
                        return None
                    r, used = r + 1, 0.0
        return out

    total = float((batch * cost).sum())
    pieces = [1] * len(batch)
    best = None
    for _ in range(4 if comm is not None else 1):
        lo = total / world
        hi = total + overhead * len(batch) + (sum(comm.cost(i, world) for i in range(len(batch))) if comm else 0)
        best = fill(hi, pieces)
        for _ in range(60):  # the least limit for which the greedy fill covers every task within W ranks
            mid = (lo + hi) / 2
            got = fill(mid, pieces)
            if got is None:
                lo = mid
            else:
                hi, best = mid, got
        got_pieces = [len(x) for x in best] if best is not None else pieces
        if got_pieces == pieces:
            break
        pieces = got_pieces
    used = {r for x in best or [] for r, _ in x}
    return best if len(used) == world else None


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
    """Cost per sample of every task from measured per-rank busy times [W]: a rank's time less the plan's
    overhead per task on it is split over its slices in proportion to rows x current cost; a task's cost is
    its time summed over ranks / its batch. The scale is arbitrary (only ratios matter to the planner)."""
    return fit_costs(plan, rank_times, fit_overhead=False)[0]


def fit_costs(plan: Plan, rank_times: np.ndarray, fit_overhead: bool = True,
              comm: CommModel | None = None,
              history: list[tuple[Plan, np.ndarray]] | tuple = ()) -> tuple[dict[str, float], float]:
    """(cost per sample of every task, overhead per task on a rank), in the units of ``rank_times``.

    ``comm`` (same units, measured: ``fit_comm``): each rank's task-group gradient sums under ``plan`` are
    taken off its time first. The overhead comes from a least-squares fit ``time_r = a *
    predicted_rows_load_r + f * tasks_on_r`` (plus a per-rank constant, equal on every rank, when the ranks
    tell all three apart); it needs ranks with different numbers of tasks, and a fit with a negative term is
    not taken: then the plan's overhead (rescaled) is kept. The costs split each rank's time less ``f *
    tasks_on_r`` (and the constant) over its slices in proportion to rows x current cost.

    ``history``: earlier (plan, its measured per-rank times) of the same world and tasks (the windows of the
    plans trained before this one): their ranks join the least-squares fit and the cost split (row loads at
    ``plan``'s costs), so the fit has more equations than unknowns (at W=2 one window has two ranks for two
    or three unknowns, and its noise went straight into the overhead) and the rows that moved between plans
    measure what a row costs."""
    windows = [*((p, np.asarray(t, dtype=np.float64)) for p, t in history), (plan, np.asarray(rank_times,
                                                                                              dtype=np.float64))]
    for p, _ in windows:
        if p.world != plan.world or p.tasks != plan.tasks or p.batches != plan.batches:
            raise ValueError("fit_costs: a history window is of another world or task set than the plan")
    windows = [(replace(p, costs=plan.costs, overhead=plan.overhead), t) for p, t in windows]
    if comm is not None:
        windows = [(p, np.maximum(t - replace(p, comm=comm).comm_loads(), 1e-12 * max(t.max(), 1e-300)))
                   for p, t in windows]
    times = windows[-1][1]
    row_load = np.concatenate([p.row_loads() for p, _ in windows])
    n_on = np.concatenate([p.tasks_on() for p, _ in windows]).astype(np.float64)
    all_times = np.concatenate([t for _, t in windows])
    scale = times.sum() / max((plan.row_loads() + plan.overhead * plan.tasks_on()).sum(), 1e-300)  # -> seconds
    f, fixed = plan.overhead * scale, 0.0
    if fit_overhead:
        for cols in ((row_load, n_on, np.ones_like(n_on)), (row_load, n_on)):
            x = np.stack(cols, 1)
            if np.linalg.matrix_rank(x / np.maximum(np.abs(x).max(0), 1e-300)) == x.shape[1]:
                coef = np.linalg.lstsq(x, all_times, rcond=None)[0]
                if coef[0] > 0 and coef[1] >= 0 and (len(coef) < 3 or coef[2] >= 0):
                    f, fixed = float(coef[1]), float(coef[2]) if len(coef) == 3 else 0.0
                break
    pred = np.zeros(len(plan.tasks))
    for p, t in windows:
        rows = p.row_loads()
        rest = np.maximum(t - f * p.tasks_on() - fixed, 1e-12 * max(t.max(), 1e-300))
        for i, task in enumerate(p.tasks):
            for r, lo, hi in p.slices(task):
                pred[i] += rest[r] * ((hi - lo) * p.costs[i] / rows[r] if rows[r] > 0 else 0.0)
    return {task: float(pred[i] / (plan.batches[i] * len(windows))) for i, task in enumerate(plan.tasks)}, f


def fit_comm(numel: tuple[int, ...], measured: list[tuple[int, int, float]]) -> CommModel | None:
    """The ``CommModel`` of tasks with ``numel`` gradient elements each, from ``measured`` all-reduces
    (elements, ranks in the group, time on each rank): ``time = latency + rate * elements * 2 (n - 1) / n``
    by least squares when the sizes tell the two apart and both come out >= 0, else through the origin.
    None when nothing was measured over more than one rank."""
    pts = [(e * 2 * (n - 1) / n, t) for e, n, t in measured if n > 1 and e > 0 and math.isfinite(t) and t >= 0]
    if not pts:
        return None
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if len(set(x.tolist())) >= 2:
        coef = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0]
        if coef[0] >= 0 and coef[1] > 0:
            return CommModel(numel=tuple(int(n) for n in numel), rate=float(coef[1]), latency=float(coef[0]))
    return CommModel(numel=tuple(int(n) for n in numel), rate=float(y.sum() / x.sum()), latency=0.0)


def replan(plan: Plan, rank_times: np.ndarray | None = None, world: int | None = None, share: bool = True,
           gain: float = 0.1, comm: CommModel | None = None,
           history: list[tuple[Plan, np.ndarray]] | tuple = ()) -> Plan:
    """A new plan from measured per-rank times (costs and overhead per task, ``fit_costs``, with the earlier
    windows of ``history``; ``comm``: the measured cost of the task-group gradient sums, in the units of the
    times) and/or a new world size, or ``plan`` itself when nothing changes by more than ``gain`` (the
    predicted busiest rank of the new plan, relative, both predicted with the new costs)."""
    world = plan.world if world is None else world
    if rank_times is None:
        costs, overhead, comm = dict(zip(plan.tasks, plan.costs)), plan.overhead, plan.comm
    else:
        costs, overhead = fit_costs(plan, rank_times, comm=comm, history=history)
    tasks = {t: (b, costs[t]) for t, b in zip(plan.tasks, plan.batches)}
    new = plan_tasks(tasks, world, share, overhead=overhead, comm=comm)
    if world != plan.world:
        return new
    old_on_new_costs = replace(plan, costs=new.costs, overhead=new.overhead, comm=new.comm)
    same = new.ranks == plan.ranks and [new.slices(t) for t in new.tasks] == [plan.slices(t) for t in plan.tasks]
    if same or new.rank_loads().max() > (1 - gain) * old_on_new_costs.rank_loads().max():
        return plan
    return new


def plan_key(plan: Plan) -> tuple:
    """What makes two plans do the same work: the ranks and the slices of every task (not the costs)."""
    return plan.ranks, tuple(tuple(plan.slices(t)) for t in plan.tasks)


def choose_measured(current: Plan, proposal: Plan, measured: dict[tuple, tuple[float, Plan]],
                    gain: float = 0.1) -> Plan:
    """The plan to train next, given ``measured`` {``plan_key``: (measured busiest-rank time, plan)} of every
    plan trained so far (``current``'s included) and the re-planner's ``proposal``: back to a plan measured at
    least ``gain`` faster than ``current``; ``current`` when the proposal was measured before and was not
    ``gain`` faster; else the proposal. The cost model cannot see everything (a task split over one more rank
    pays its all-reduce there); a move the measurements refute is undone and not made again."""
    cur = plan_key(current)
    if cur not in measured:
        raise ValueError("the current plan has no measured time; record it in `measured` first")
    cur_t = measured[cur][0]
    best = min(measured, key=lambda k: measured[k][0])
    if best != cur and measured[best][0] < (1 - gain) * cur_t:
        return measured[best][1]
    new = plan_key(proposal)
    if new != cur and new in measured and measured[new][0] >= (1 - gain) * cur_t:
        return current
    return proposal
