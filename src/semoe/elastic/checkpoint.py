"""Asynchronous, layout-independent checkpoints of an elastic run (the format of ``semoe.storage.checkpoint``).

``save()`` copies this rank's share of the state (tensors it owns: shared ones on rank 0, task t's on the
first rank holding t, token-gated experts by global id on their first replica) into host memory and
returns; a background thread writes ``model-rankRRRRR.safetensors`` / ``optim-rankRRRRR.safetensors`` into
``.tmp-step_X-<attempt>``, fsyncs them and drops a ``rankR.done`` marker. Rank 0's thread waits for every
marker, writes the manifest (sizes, sha256), renames the folder to ``step_X`` and then replaces ``latest``
(both atomic renames). A kill at any point leaves the previous checkpoint and ``latest`` as they were: the
reader (``semoe.storage.checkpoint.find_latest``) only ever sees complete folders.

No collective runs in the thread (the markers go through the shared file system), so training goes on
while the disk works; the next ``save()`` waits for the previous write (the stall it reports).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from semoe.config import MultiTaskRunConfig, from_dict
from semoe.storage import checkpoint as ckpt

log = logging.getLogger(__name__)


def owned_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, owns: Callable[[str], bool],
                  write_experts: bool) -> tuple[dict, dict]:
    """Copies (safe to write while training goes on) of this rank's share: the replicated tensors whose key
    ``owns`` accepts, and its token-gated experts (by global id) when ``write_experts``."""
    dense, expert = ckpt.model_tensors(model)
    model_t = {k: v.clone() for k, v in dense.items() if owns(k)}
    if write_experts:
        model_t.update({k: v.clone() for k, v in expert.items()})
    optim_t: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        odense, oexpert = ckpt.optimizer_tensors(model, optimizer)
        optim_t = {k: v.clone() for k, v in odense.items() if owns(k.rsplit(".", 1)[0])}
        if write_experts:
            optim_t.update({k: v.clone() for k, v in oexpert.items()})
    return model_t, optim_t


class AsyncCheckpointer:
    """One writer per rank; ``save`` returns after a host copy, ``wait`` blocks until the last save is done."""

    def __init__(self, root: Path, rank: int, world: int, attempt: str, keep_last: int = 2,
                 timeout_s: float = 600.0) -> None:
        self.root, self.rank, self.world, self.attempt = Path(root), rank, world, attempt
        self.keep_last, self.timeout_s = keep_last, timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stalls_s: list[float] = []  # time each save() blocked the step (copy + waiting for the previous)
        self.write_s: list[float] = []  # time the background writes took
        self.last_path: Path | None = None

    def save(self, step: int, model_t: dict[str, torch.Tensor], optim_t: dict[str, torch.Tensor],
             manifest: dict[str, Any], t0: float | None = None) -> Path:
        """Write ``step`` in the background. ``t0``: when the caller started (its copy counts as stall)."""
        t0 = time.perf_counter() if t0 is None else t0
        self.wait()
        final = ckpt.step_dir(self.root, step)
        # a daemon: a worker that torchrun stops after a peer died must not wait for markers that never come
        # (the trainer waits for its last save explicitly; an unfinished write is only a .tmp-* folder)
        self._thread = threading.Thread(target=self._write, args=(step, model_t, optim_t, manifest), daemon=True,
                                        name=f"ckpt-{step}")
        self._thread.start()
        self.stalls_s.append(time.perf_counter() - t0)
        self.last_path = final
        return final

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err

    def _write(self, step: int, model_t: dict, optim_t: dict, manifest: dict) -> None:
        try:
            t = time.perf_counter()
            final = ckpt.step_dir(self.root, step)
            tmp = self.root / f".tmp-{final.name}-{self.attempt}"
            tmp.mkdir(parents=True, exist_ok=True)
            written = []
            for prefix, tensors in (("model", model_t), ("optim", optim_t)):
                if tensors:
                    path = tmp / f"{prefix}-rank{self.rank:05d}.safetensors"
                    save_file(tensors, str(path))
                    written.append(path)
            for path in written:
                ckpt._fsync_file(path)
            marker = tmp / f"rank{self.rank}.done"
            marker.write_text(str(len(written)))
            if self.rank == 0:
                self._commit(tmp, final, step, manifest)
            self.write_s.append(time.perf_counter() - t)
        except BaseException as e:  # reported by the next save() / wait()
            self._error = e

    def _commit(self, tmp: Path, final: Path, step: int, manifest: dict) -> None:
        deadline = time.monotonic() + self.timeout_s
        markers = [tmp / f"rank{r}.done" for r in range(self.world)]
        while not all(m.exists() for m in markers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish writing {tmp} within {self.timeout_s} s")
            time.sleep(0.005)
        for m in markers:
            m.unlink()
        files = {p.name: {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in sorted(tmp.iterdir())}
        full = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": step, **manifest, "files": files}
        ckpt._write_json_atomic(tmp / ckpt.MANIFEST, full)
        ckpt._fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpt._fsync_dir(self.root)
        (self.root / "latest.tmp").write_text(final.name)
        os.replace(self.root / "latest.tmp", self.root / "latest")
        ckpt._fsync_dir(self.root)
        if self.keep_last > 0:
            for old in sorted(self.root.glob("step_*"))[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)


def clean_partial(root: Path) -> None:
    """Remove ``.tmp-*`` folders left by a killed run (call on rank 0 before any rank saves)."""
    for p in Path(root).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def check_task_set(manifest: dict, batches: dict[str, int], path: Path) -> None:
    """A checkpoint of another task set (or other batches) cannot be resumed: say so."""
    saved = manifest.get("tasks")
    if saved != batches:
        raise ckpt.CheckpointError(f"checkpoint {path} was trained on tasks {saved}, this run has {batches}; "
                                   "use the same elastic.tasks to resume, or another --out to start afresh")


def load_multitask_config(checkpoint: Path) -> MultiTaskRunConfig:
    """The run config stored in an elastic checkpoint's manifest."""
    return from_dict(MultiTaskRunConfig, ckpt.read_manifest(checkpoint, verify=False)["config"])
