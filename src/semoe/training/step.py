"""One optimizer step, shared by every trainer (``Trainer`` and ``semoe.training.elastic_trainer.ElasticTrainer``).

The step: set the learning rate, forward + loss + backward over the micro-batches (gradient sync held
back until the last one when the caller has a ``no_sync``), gradient sync, global-norm clipping, a
divergence check, the optimizer step, an after-step hook (e.g. router biases), zero_grad. What differs
between trainers (the model's forward and loss, how gradients are reduced, how the norm is counted) comes
in as functions; the order of operations is this file's alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

B = TypeVar("B")


def optimizer_step(optimizer: torch.optim.Optimizer, micro_batches: Iterable[B],
                   objective: Callable[[B], tuple[torch.Tensor, Any]], *, lr: float,
                   sync: Callable[[], None], clip: Callable[[], torch.Tensor],
                   check: Callable[[list[Any], float], None] | None = None,
                   after: Callable[[], None] | None = None,
                   no_sync: Callable[[], AbstractContextManager] | None = None,
                   set_to_none: bool = True) -> tuple[list[Any], float]:
    """Run one step. ``objective(batch) -> (scalar to differentiate, anything to keep)``; ``sync()`` reduces
    the gradients, ``clip()`` clips them and returns the norm before clipping, ``check(kept, norm)`` may raise
    before the optimizer moves anything. Returns (what ``objective`` kept per micro-batch, the norm)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    batches = list(micro_batches)
    kept: list[Any] = []
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            value, keep = objective(batch)
            value.backward()
        kept.append(keep)
    sync()
    norm = float(clip())
    if check is not None:
        check(kept, norm)
    optimizer.step()
    if after is not None:
        after()
    optimizer.zero_grad(set_to_none=set_to_none)
    return kept, norm
