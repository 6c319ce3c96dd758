"""Training under expert parallelism: resume on a different world size / ep_size continues with the
same losses as an uninterrupted single-process run.

The runs are in float64 (``train.dtype=float64``): other world sizes multiply other blocks and sum
gradients in another order, and over several AdamW steps float32 rounding differences of that kind grow
to ~1e-6 in the parameters (AdamW divides by sqrt(v)). In float64 a step can move a parameter by at most
lr * |d grad| / eps_adam more, ~3e-3 * 1e-16 / 1e-8 = 3e-11, so 1e-9 on the losses holds on any CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from semoe.config import ParallelConfig, apply_overrides, replace
from semoe.training.trainer import Trainer
from tests.dist.launcher import run_ranks
from tests.dist.trainer_parts import resumed_trainer, train_part
from tests.unit.test_train import tiny_run

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)

TOL = 1e-9  # float64 runs: see the module docstring


def _resume(rank: int, world: int, run, out: str, cache: str) -> list[float]:
    t = resumed_trainer(run, out, cache, start_step=4)
    assert t.ep_size == run.parallel.resolve_ep(world)
    return t.fit().losses


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resume_on_other_world_size(tmp_path, corpus_file, cache_dir, first: int, second: int) -> None:
    run = tiny_run(corpus_file, steps=8, ckpt_every=100, dtype="float64")
    run = replace(run, parallel=ParallelConfig(ep_size=0))
    ref = Trainer(run, tmp_path / "ref", cache_dir, resume=None).fit().losses
    out = str(tmp_path / "run")
    if first == 1:
        part = train_part(0, 1, run, out, str(cache_dir), 4)
    else:
        part = run_ranks(train_part, first, tmp_path, run, out, str(cache_dir), 4)[0]
    assert part == pytest.approx(ref[:4], abs=TOL)
    if second == 1:
        after = _resume(0, 1, run, out, str(cache_dir))
    else:
        after = run_ranks(_resume, second, tmp_path, run, out, str(cache_dir))[0]
    assert after == pytest.approx(ref[4:], abs=TOL)


def _dp_ep(rank: int, world: int, run, out: str, cache: str) -> list[float]:
    t = Trainer(run, Path(out), Path(cache), resume=None)
    return [t.train_step(s)["loss"] for s in range(3)]


def test_two_replicas_of_ep2_match_single_process(tmp_path, corpus_file, cache_dir) -> None:
    """4 ranks = 2 expert replicas x ep 2: the same losses as one process on the same global batch.
    Dropless and without the load-balancing loss, because capacity and that loss are defined per
    expert-parallel group (and a single process is one bigger group)."""
    run = apply_overrides(tiny_run(corpus_file, steps=3, ckpt_every=100, dtype="float64"),
                          ["model.moe.router.capacity_factor=none", "model.moe.router.eval_capacity_factor=none",
                           "model.moe.router.aux_loss_coef=0", "parallel.ep_size=2"])
    t = Trainer(replace(run, parallel=ParallelConfig(ep_size=1)), tmp_path / "ref", cache_dir, resume=None)
    ref = [t.train_step(s)["loss"] for s in range(3)]
    got = run_ranks(_dp_ep, 4, tmp_path, run, str(tmp_path / "run"), str(cache_dir))
    for losses in got:
        assert losses == pytest.approx(ref, abs=TOL)
