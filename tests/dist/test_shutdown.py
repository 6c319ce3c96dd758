"""A ``semoe`` command that ran under a process group destroys it before the interpreter exits. Left to
interpreter teardown, gloo's worker threads are still running then (a 2-rank ``semoe train --recipe multitask``
had 8 worker and 4 transport loops alive after ``main`` returned), and one that drops a finished work's tensors
needs the GIL of an interpreter being torn down: the thread is ended inside a ``noexcept`` destructor and the
worker aborts after a successful run (SIGABRT, "terminate called without an active exception"; once in CI, once
in ~45 local runs)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from semoe.parallel import shutdown_distributed
from tests.dist.launcher import run_ranks


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (its worker loops and transport loops)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)


def _command_then_state(rank: int, world: int) -> dict:
    import semoe.cli.train as train_cli
    from semoe.cli.main import main

    seen = {}

    def command(args, argv) -> int:  # stands in for `semoe train` in this forked rank only
        x = torch.ones(2)
        dist.all_reduce(x)
        sub = dist.new_group([0, 1])  # a subgroup too, as the trainers make (dropped when the command returns)
        dist.all_reduce(x, group=sub)
        seen["sum"], seen["threads"] = x[0].item(), len(_gloo_threads()) > 0
        return 0

    train_cli.run = command
    rc = main(["train"])
    return {"rc": rc, **seen, "after": dist.is_initialized(), "threads_after": _gloo_threads()}


def _twice(rank: int, world: int) -> list[bool]:
    groups = dist.new_group([0, 1])
    before = dist.is_initialized() and dist.get_world_size(groups) == 2
    shutdown_distributed()
    once = dist.is_initialized()
    shutdown_distributed()  # nothing left: a no-op, no error
    return [before, once, dist.is_initialized()]


def test_cli_destroys_the_process_group_after_a_successful_command(tmp_path) -> None:
    for r in run_ranks(_command_then_state, 2, tmp_path):
        # no gloo thread outlives the command: none is left to wake up inside interpreter teardown
        assert r == {"rc": 0, "sum": 4.0, "threads": True, "after": False, "threads_after": []}


def test_shutdown_distributed_is_idempotent(tmp_path) -> None:
    assert run_ranks(_twice, 2, tmp_path) == [[True, False, False]] * 2
