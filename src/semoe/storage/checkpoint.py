"""Layout-independent checkpoints (DESIGN.md §3).

A checkpoint is a folder ``step_00000100/`` holding

* ``model-dense.safetensors``: every replicated parameter and persistent buffer, by its module name;
* ``model-experts-EEEEE.safetensors``: one tensor per *global* expert id, e.g.
  ``layers.3.moe.experts.5.w1`` (one file per expert-parallel rank that wrote it);
* ``optim-dense.safetensors`` / ``optim-experts-EEEEE.safetensors``: AdamW state keyed the same way
  (``<key>.exp_avg``, ``<key>.exp_avg_sq``, ``<key>.step``);
* ``tokenizer.json`` when the run had one, and ``manifest.json``: format, step, the run config,
  the data position, RNG state, and the byte size and sha256 of every file.

Any ep_size or world size reads it: a rank looks up only the keys of the experts it holds.
Writes are atomic: everything goes into ``.tmp-step_...``, files are fsynced, then rank 0 renames
the folder and updates ``latest``. Loading reads safetensors and JSON only (nothing is unpickled) and
checks sizes and hashes first, so a truncated or corrupt file is reported, not half-loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from semoe.layers.experts import Experts

log = logging.getLogger(__name__)

FORMAT = "semoe-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


# ----------------------------------------------------------------------------- naming
def _expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def _expert_param_names(model: nn.Module) -> dict[str, tuple[str, Experts, str]]:
    """parameter name -> (module name, module, weight name) for stacked expert weights."""
    out = {}
    for mname, mod in _expert_modules(model).items():
        for pname, _ in mod.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    return out


def _expert_key(mname: str, gid: int, pname: str) -> str:
    return f"{mname}.{gid}.{pname}" if mname else f"{gid}.{pname}"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP (DTensor) gathered to its full value (collective: every rank calls it, in the
    same order); any other tensor as it is. Checkpoints hold full dense tensors whatever the layout."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a full ``src``; a DTensor ``dst`` takes its own shard of it (no communication)."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(src.to_local())
    else:
        dst.copy_(src)


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense, expert) tensors of this rank in checkpoint naming (experts split per global id)."""
    experts = _expert_param_names(model)
    dense: dict[str, torch.Tensor] = {}
    expert: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in experts:
            mname, mod, pname = experts[name]
            for i in range(mod.num_local_experts):
                expert[_expert_key(mname, mod.expert_offset + i, pname)] = t[i].detach().contiguous().cpu()
        else:
            dense[name] = _full(t).detach().contiguous().cpu()
    return dense, expert


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW-style state in checkpoint naming: ``<key>.<state name>``."""
    experts = _expert_param_names(model)
    dense: dict[str, torch.Tensor] = {}
    expert: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p)
        if not state:
            continue
        for sname, v in state.items():
            v = torch.as_tensor(_full(v)).detach().cpu()
            if name in experts and v.dim() > 0 and v.shape == p.shape:
                mname, mod, pname = experts[name]
                for i in range(mod.num_local_experts):
                    expert[f"{_expert_key(mname, mod.expert_offset + i, pname)}.{sname}"] = v[i].contiguous()
            elif name in experts:  # a scalar such as "step": stored per expert for layout independence
                mname, mod, pname = experts[name]
                for i in range(mod.num_local_experts):
                    expert[f"{_expert_key(mname, mod.expert_offset + i, pname)}.{sname}"] = v.clone().reshape(())
            else:
                dense[f"{name}.{sname}"] = v.contiguous()
    return dense, expert


# ----------------------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, str]) -> None:
    if "torch" in state:
        raw = base64.b64decode(state["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    manifest: dict[str, Any], *, rank: int = 0, ep_rank: int = 0, dp_index: int = 0,
                    barrier: Callable[[], None] = lambda: None, keep_last: int = 0,
                    extra_files: dict[str, Path] | None = None,
                    expert_writer: Callable[[Path], list[Path]] | None = None) -> Path:
    """Write a checkpoint of ``step`` under ``root`` atomically; every rank calls it.

    Global rank 0 writes the dense tensors and the manifest; the ranks of the first replica
    (``dp_index == 0``) write their experts. ``barrier`` synchronises ranks (a no-op in one process).
    ``keep_last > 0`` removes older checkpoints after the new one is in place. ``expert_writer``: writes the
    experts' files into the given folder itself and returns them (the expert store streams them, they are
    not in ``model``).
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    dense, expert = model_tensors(model)
    odense, oexpert = optimizer_tensors(model, optimizer) if optimizer is not None else ({}, {})
    written: list[Path] = []
    if rank == 0:
        written.append(tmp / "model-dense.safetensors")
        save_file(dense, str(written[-1]))
        if odense:
            written.append(tmp / "optim-dense.safetensors")
            save_file(odense, str(written[-1]))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            written.append(tmp / name)
    if dp_index == 0 and expert:
        written.append(tmp / f"model-experts-{ep_rank:05d}.safetensors")
        save_file(expert, str(written[-1]))
        if oexpert:
            written.append(tmp / f"optim-experts-{ep_rank:05d}.safetensors")
            save_file(oexpert, str(written[-1]))
    if dp_index == 0 and expert_writer is not None:
        written += expert_writer(tmp)
    for path in written:
        _fsync_file(path)
    barrier()
    if rank == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        full = {"format": FORMAT, "version": VERSION, "step": step, **manifest, "files": files}
        _write_json_atomic(tmp / MANIFEST, full)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        if keep_last > 0:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


# ----------------------------------------------------------------------------- reading
def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one)."""
    root = Path(root)
    if (root / MANIFEST).exists():
        return root
    latest = root / "latest"
    if latest.exists():
        cand = root / latest.read_text().strip()
        if (cand / MANIFEST).exists():
            return cand
    done = [p for p in sorted(root.glob("step_*")) if (p / MANIFEST).exists()]
    return done[-1] if done else None


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """Read and check a checkpoint's manifest and files (sizes, and sha256 when ``verify``)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} is not a semoe checkpoint (no {MANIFEST}); pass a step_* folder "
                              "or the run's checkpoints folder")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupt ({e}); use an earlier checkpoint") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} "
                              f"version {manifest.get('version')!r} (expected {FORMAT} v{VERSION})")
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing; the checkpoint is incomplete, "
                                  "use an earlier one")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or changed: {size} bytes, expected "
                                  f"{meta['bytes']}; use an earlier checkpoint")
        if verify and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 mismatch); use an earlier checkpoint")
    return manifest


class _Reader:
    """key -> tensor over all safetensors files of a checkpoint whose name starts with ``prefix``."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        for f in sorted(Path(path).glob(f"{prefix}-*.safetensors")):
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"checkpoint file {f} cannot be read ({e}); use an earlier checkpoint") from e
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint; it was written for a different model")
        return self.handles[self.where[key]].get_tensor(key)


def _check_shape(key: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != tuple(want):
        raise CheckpointError(f"tensor {key!r} has shape {tuple(got.shape)} in the checkpoint but the model "
                              f"expects {tuple(want)}: the checkpoint is from a different model config")


@torch.no_grad()
def load_model(path: Path, model: nn.Module, strict: bool = True) -> None:
    """Copy the checkpoint's tensors into ``model`` (any expert sharding)."""
    reader = _Reader(path, "model")
    experts = _expert_param_names(model)
    for name, t in model.state_dict().items():
        if name in experts:
            mname, mod, pname = experts[name]
            for i in range(mod.num_local_experts):
                key = _expert_key(mname, mod.expert_offset + i, pname)
                src = reader.get(key)
                _check_shape(key, src, tuple(t.shape[1:]))
                t[i].copy_(src)
        elif name in reader or strict:
            src = reader.get(name)
            _check_shape(name, src, tuple(t.shape))
            _copy_into(t, src)


@torch.no_grad()
def load_optimizer(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Fill ``opt.state`` for every parameter from the checkpoint (layout independent)."""
    reader = _Reader(path, "optim")
    if not reader.where:
        raise CheckpointError(f"{path} has no optimizer state; it cannot be resumed (load weights only)")
    experts = _expert_param_names(model)
    names = sorted({k.rsplit(".", 1)[1] for k in reader.where})
    for name, p in model.named_parameters():
        state: dict[str, torch.Tensor] = {}
        for sname in names:
            if name in experts:
                mname, mod, pname = experts[name]
                keys = [f"{_expert_key(mname, mod.expert_offset + i, pname)}.{sname}"
                        for i in range(mod.num_local_experts)]
                if keys[0] not in reader:
                    continue
                parts = [reader.get(k) for k in keys]
                v = parts[0] if parts[0].dim() == 0 else torch.stack(parts)
            else:
                key = f"{name}.{sname}"
                if key not in reader:
                    continue
                v = reader.get(key)
            if v.dim() > 0:
                _check_shape(f"{name}.{sname}", v, tuple(p.shape))
                v = v.to(p.device, p.dtype)
                if isinstance(p, DTensor):  # FSDP: this rank's shard of the full moment
                    v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            state[sname] = v
        if state:
            opt.state[p] = state
