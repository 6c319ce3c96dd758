"""Start N gloo ranks as forked processes (fast: no interpreter start-up, no re-imports).

``run_ranks(fn, world, tmp_path, *args)`` runs ``fn(rank, world, *args)`` on every rank with the
default process group initialised from a FileStore under ``tmp_path``, and returns the per-rank
results (anything ``torch.save`` can store with weights_only loading: tensors, numbers, lists, dicts).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world: int, store_path: str, out_dir: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():  # ``fn`` may have destroyed it (the tests of ``shutdown_distributed``)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, tmp_path: Path, *args: Any, timeout: float = 120.0) -> list[Any]:
    tmp_path = Path(tmp_path)
    run_dir = tmp_path / f"ranks_{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(fn, world, str(run_dir / "store"), str(run_dir), args),
                             nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
