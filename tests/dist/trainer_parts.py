"""Rank functions shared by the resume tests (run through ``tests.dist.launcher.run_ranks``): train the first
steps and checkpoint, then resume from the newest checkpoint in the same folder."""

from __future__ import annotations

from pathlib import Path

from semoe.training.trainer import Trainer


def train_part(rank: int, world: int, run, out: str, cache: str, steps: int) -> list[float]:
    """``steps`` training steps from scratch, then a checkpoint of step ``steps``; their losses."""
    t = Trainer(run, Path(out), Path(cache), resume=None)
    losses = [t.train_step(s)["loss"] for s in range(steps)]
    t.save(steps)
    return losses


def resumed_trainer(run, out: str, cache: str, start_step: int = 4) -> Trainer:
    """The trainer resumed from ``out``'s newest checkpoint, which must be that of ``start_step``."""
    t = Trainer(run, Path(out), Path(cache), resume="auto")
    assert t.start_step == start_step
    return t
