"""The elastic planner (ranks per task, slices, count matrices, re-planning) and its bad input; the
multi-task data (held-out splits, layout-independent batches)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from semoe.config import ElasticConfig
from semoe.elastic.data import batch_indices, load_tasks
from semoe.elastic.planner import Plan, bound_ratio, load_plan, measured_costs, plan_tasks, replan, uniform_plan

UFO = {"a": (8, 1.0), "b": (4, 1.0), "c": (2, 1.0), "d": (1, 1.0)}


def brute_force_best(tasks: dict, world: int) -> float:
    """The lowest busiest-rank load over every assignment of ranks-per-task (>= 1 each, one task per rank)."""
    best = np.inf
    names = list(tasks)
    for n in itertools.product(range(1, world + 1), repeat=len(names)):
        if sum(n) != world:
            continue
        best = min(best, max(tasks[t][0] * tasks[t][1] / k for t, k in zip(names, n)))
    return best


def test_slices_cover_every_batch_once_and_every_rank_works() -> None:
    for world in range(1, 9):
        plan = plan_tasks(UFO, world)
        for t, (b, _) in UFO.items():
            sl = plan.slices(t)
            assert sl[0][1] == 0 and sl[-1][2] == b and all(x[2] == y[1] for x, y in itertools.pairwise(sl))
        assert all(plan.local(r) for r in range(world))
        assert plan.rank_loads().sum() == pytest.approx(sum(b * c for b, c in UFO.values()))


def test_largest_remainder_follows_the_load() -> None:
    plan = plan_tasks({"big": (64, 8.0), "mid": (32, 4.0), "s1": (16, 2.0), "s2": (8, 1.0)}, 4)
    # quotas 3.01, 0.75, 0.19, 0.05 -> 3 ranks for big, 1 for mid, the small ones share (with mid)
    assert [len(r) for r in plan.ranks] == [3, 1, 1, 1]
    assert plan.ranks[2] == plan.ranks[3] == plan.ranks[1]
    assert plan.busy_max_over_mean() < 1.05


def test_without_sharing_matches_brute_force_on_small_cases() -> None:
    for world in (4, 5, 6):
        tasks = {"a": (12, 1.0), "b": (6, 1.0), "c": (3, 2.0), "d": (2, 1.0)}
        plan = plan_tasks(tasks, world, share=False)
        assert all(len(r) >= 1 for r in plan.ranks) and sum(len(r) for r in plan.ranks) == world
        # largest remainder is within the one-rank rounding of the optimum here
        assert plan.rank_loads().max() <= 1.5 * brute_force_best(tasks, world)


def test_count_matrices_and_bound() -> None:
    plan = plan_tasks(UFO, 4)
    counts = plan.a2a_counts()
    assert np.count_nonzero(counts - np.diag(np.diag(counts))) == 0  # elastic: no all-to-all traffic
    assert counts.sum() == 15
    uni = uniform_plan({"a": (8, 1.0), "b": (4, 1.0), "c": (4, 1.0), "d": (4, 1.0)}, 4)
    m = uni.a2a_counts()
    assert m.sum() == 20 and (m[:, 0] == 2).all() and (m.sum(1) == 5).all()  # task a's expert on rank 0
    assert bound_ratio(UFO, 4) == pytest.approx(4 * 8 / 15)


def test_replan_from_measured_times_moves_ranks_to_the_slow_task() -> None:
    tasks = {"a": (8, 1.0), "b": (8, 1.0)}
    plan = plan_tasks(tasks, 4)
    assert [len(r) for r in plan.ranks] == [2, 2]
    times = np.array([3.0, 3.0, 1.0, 1.0])  # task a is 3x as costly as predicted
    costs = measured_costs(plan, times)
    assert costs["a"] / costs["b"] == pytest.approx(3.0)
    new = replan(plan, times)
    assert [len(r) for r in new.ranks] == [3, 1]
    assert replan(plan, np.ones(4)) is plan  # balanced already: keep it
    assert replan(plan, world=3).world == 3


def test_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="batch 0"):
        plan_tasks({"a": (8, 1.0), "b": (0, 1.0)}, 2)
    with pytest.raises(ValueError, match="global batch 0"):
        ElasticConfig(tasks="a=8,b=0").task_batches()
    with pytest.raises(ValueError, match="share_ranks"):
        plan_tasks(UFO, 3, share=False)
    with pytest.raises(ValueError, match="name=batch"):
        ElasticConfig(tasks="a8").task_batches()
    with pytest.raises(ValueError, match="max-restarts"):
        ElasticConfig(max_restarts=-1)
    path = tmp_path / "plan.json"
    plan_tasks(UFO, 4).save(path)
    with pytest.raises(ValueError, match="for 4 ranks but this run has 2"):
        load_plan(path, 2, {t: b for t, (b, _) in UFO.items()})
    with pytest.raises(ValueError, match="plans tasks"):
        load_plan(path, 4, {"a": 8})
    assert load_plan(path, 4, {t: b for t, (b, _) in UFO.items()}) == plan_tasks(UFO, 4)
    assert Plan.from_json(plan_tasks(UFO, 4).to_json()) == plan_tasks(UFO, 4)


def test_tasks_have_held_out_splits_and_layout_independent_batches() -> None:
    data = load_tasks(["digits", "cancer", "wine", "synth"])
    for d in data.values():
        assert len(d.y_test) > 0 and len(d.y_train) > 2 * len(d.y_test)
        assert set(np.unique(d.y_test)) == set(range(d.num_classes))  # stratified
        assert np.abs(d.x_train.mean((0, 1))).max() < 0.2
    with pytest.raises(ValueError, match="unknown task"):
        load_tasks(["mnist"])
    idx = batch_indices(10, 4, 2, 0, 0)  # crosses an epoch boundary: 8..11 -> epoch 0 pos 8,9 + epoch 1 pos 0,1
    assert len(idx) == 4 and len(set(idx[:2])) == 2
    full = np.concatenate([batch_indices(10, 5, s, 0, 0) for s in range(2)])
    assert sorted(full) == list(range(10))  # one epoch = every sample once
