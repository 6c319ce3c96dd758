"""A ``semoe`` command that ran under a process group destroys it before the interpreter exits: left to
interpreter teardown, gloo's threads can abort a worker after a successful run (SIGABRT, "terminate called without
an active exception"; seen once in CI at the end of a 2-rank ``semoe train``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from semoe.parallel import shutdown_distributed
from tests.dist.launcher import run_ranks


def _command_then_state(rank: int, world: int) -> dict:
    import semoe.cli.train as train_cli
    from semoe.cli.main import main

    seen = {}

    def command(args, argv) -> int:  # stands in for `semoe train` in this forked rank only
        x = torch.ones(2)
        dist.all_reduce(x)
        seen["sum"], seen["initialised"] = x[0].item(), dist.is_initialized()
        return 0

    train_cli.run = command
    rc = main(["train"])
    return {"rc": rc, **seen, "after": dist.is_initialized()}


def _twice(rank: int, world: int) -> list[bool]:
    groups = dist.new_group([0, 1])
    before = dist.is_initialized() and dist.get_world_size(groups) == 2
    shutdown_distributed()
    once = dist.is_initialized()
    shutdown_distributed()  # nothing left: a no-op, no error
    return [before, once, dist.is_initialized()]


def test_cli_destroys_the_process_group_after_a_successful_command(tmp_path) -> None:
    for r in run_ranks(_command_then_state, 2, tmp_path):
        assert r == {"rc": 0, "sum": 2.0, "initialised": True, "after": False}


def test_shutdown_distributed_is_idempotent(tmp_path) -> None:
    assert run_ranks(_twice, 2, tmp_path) == [[True, False, False]] * 2
