"""Where a run's initial weights come from: a component the trainer is given.

:class:`RandomInit` (the default) builds the model from the seed, every rank alike, and lets expert
parallelism keep each rank's experts. :class:`PretrainedInit` (``semoe train --init-from HF_DIR``) starts from
an HF Mixtral / Qwen2-MoE / OLMoE checkpoint folder: the model config comes from its ``config.json``
(:func:`semoe.models.hf.model_config_from_hf`), the tokenizer from its ``tokenizer.json``
(:func:`semoe.training.data.tokenizer_spec_from_hf`), the weights from its (sharded) safetensors.

The pretrained path holds nothing twice: the model is built on the meta device, expert parallelism shards it
there (no memory), every parameter is then allocated once on its device and filled tensor by tensor with
positional reads (``storage.safetensors_io``, no memory map) through one staging buffer the size of the
largest stored tensor. Each rank reads the dense tensors and *only its own experts'* byte ranges (from a fused
``gate_up_proj [E, 2F, D]`` too: expert e is a contiguous slice of it). Where the bytes lie comes from the
ring engine's index of the folder (:func:`semoe.inference.sections.open_model`, the one HF mapping).

Experts can go elsewhere than into the model: :meth:`PretrainedInit.fill` writes each local expert through an
:class:`ExpertSink` (default: the model's own stacked parameters). An expert store that trains a model bigger
than memory implements ``put`` and receives the experts one at a time, straight from the files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from semoe.config import ModelConfig
from semoe.inference.sections import ModelSource, ParamView, Read, build_meta_model, open_model
from semoe.layers.experts import Experts
from semoe.models.hf import HF_SIDE_FILES, hf_source_record, model_config_from_hf, read_hf_config
from semoe.models.transformer import MoETransformer
from semoe.storage.safetensors_io import SafetensorsReader
from semoe.training.data import TokenizerSpec, tokenizer_spec_from_hf

log = logging.getLogger(__name__)

__all__ = ["ExpertSink", "ModelInit", "PretrainedInit", "RandomInit", "local_expert_ids"]


class ExpertSink(Protocol):
    """Receives one expert's tensor: ``param`` the stacked parameter's name (``layers.3.moe.experts.w1``),
    ``expert`` the global expert id, ``value`` that expert's slice (``[D, F]`` / ``[F, D]``, the model's layout)."""

    def put(self, param: str, expert: int, value: torch.Tensor) -> None: ...


class ModelInit(Protocol):
    """How the trainer gets its model: ``build`` it (before expert parallelism shards it), then
    ``materialize`` it on the device with its initial weights (after sharding). ``tokenizer``: the model's
    own tokenizer, or None (the trainer trains one on the data). ``manifest`` / ``extra_files``: what its
    checkpoints record and carry about the source; ``resume_problem``: why a checkpoint cannot be resumed
    with this source (None: it can). ``streams_experts``: ``materialize`` takes ``experts=`` (an
    :class:`ExpertSink`) for a model whose experts were taken out on the meta device (the expert store)."""

    tokenizer: TokenizerSpec | None
    streams_experts: bool

    def build(self, cfg: ModelConfig) -> MoETransformer: ...

    def materialize(self, model: MoETransformer, device: torch.device, dtype: torch.dtype,
                    load_weights: bool = True) -> None: ...

    def manifest(self) -> dict[str, Any]: ...

    def extra_files(self) -> dict[str, Path]: ...

    def resume_problem(self, manifest: dict[str, Any]) -> str | None: ...


class RandomInit:
    """Random initial weights from the global seed (the caller seeds ``torch``), identical on every rank."""

    tokenizer: TokenizerSpec | None = None
    streams_experts: bool = False

    def build(self, cfg: ModelConfig) -> MoETransformer:
        return MoETransformer(cfg)

    def materialize(self, model: MoETransformer, device: torch.device, dtype: torch.dtype,
                    load_weights: bool = True) -> None:
        model.to(device, dtype)

    def manifest(self) -> dict[str, Any]:
        return {}

    def extra_files(self) -> dict[str, Path]:
        return {}

    def resume_problem(self, manifest: dict[str, Any]) -> str | None:
        src = manifest.get("hf_source")
        if src:
            return (f"it was fine-tuned from the HF checkpoint {src.get('path')}; resume it with "
                    f"--init-from {src.get('path')}")
        return None


@dataclass
class PretrainedInit:
    """Initial model, weights and tokenizer from an HF checkpoint folder (see the module docstring).

    Build it with :meth:`from_hf`; ``model_config`` is the folder's config in semoe terms (``--set``
    overrides go on top of it); ``bytes_read`` counts what :meth:`fill` read (tests check that a rank reads
    its own experts only)."""

    path: Path
    source: ModelSource
    model_config: ModelConfig
    tokenizer: TokenizerSpec | None
    record: dict[str, Any]
    bytes_read: int = 0
    experts_read: dict[str, list[int]] = field(default_factory=dict)
    streams_experts: bool = True

    @classmethod
    def from_hf(cls, path: str | Path) -> PretrainedInit:
        """Open ``path`` (JSON and safetensors headers only). ``ValueError`` for an unsupported architecture
        (naming the supported ones), a folder without ``tokenizer.json``, or weights that do not match."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--init-from {path} does not exist or is not a folder; pass an HF checkpoint "
                                    "folder (config.json, safetensors, tokenizer.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"--init-from {path} has no config.json; pass an HF checkpoint folder of "
                             "Mixtral, Qwen2-MoE or OLMoE")
        cfg = model_config_from_hf(read_hf_config(path))  # the architecture check comes first
        tokenizer = tokenizer_spec_from_hf(path)
        source = open_model(path)
        return cls(path=path, source=source, model_config=cfg, tokenizer=tokenizer, record=hf_source_record(path))

    # ------------------------------------------------------------------ ModelInit
    def build(self, cfg: ModelConfig) -> MoETransformer:
        """The model on the meta device (no memory), in training mode."""
        return build_meta_model(cfg).train()

    def materialize(self, model: MoETransformer, device: torch.device, dtype: torch.dtype,
                    load_weights: bool = True, experts: ExpertSink | None = None) -> None:
        """Allocate the (sharded) model once on ``device`` in ``dtype``, zero its buffers, and fill its
        parameters from the checkpoint (skipped with ``load_weights=False``: a resume overwrites them).
        ``experts``: where the experts go (see :meth:`fill`); the model may then hold none of them (the
        expert store took them out on the meta device), so only the dense part is allocated."""
        model.to(dtype=dtype)
        # Module.to_empty is _apply(empty_like): from a meta tensor that imports sympy (~34 MiB, ~1 s) on first
        # use; torch.empty of the same shape allocates the same uninitialised storage without it
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(self.source.buffers[name]) if name in self.source.buffers else buf.zero_()
        if load_weights:
            self.fill(model, experts)

    def manifest(self) -> dict[str, Any]:
        return {"hf_source": self.record, "eos_token_ids": list(self.source.eos_ids)}

    def extra_files(self) -> dict[str, Path]:
        return {name: self.path / hf for hf, name in HF_SIDE_FILES.items() if (self.path / hf).is_file()}

    def resume_problem(self, manifest: dict[str, Any]) -> str | None:
        src = manifest.get("hf_source") or {}
        if src.get("fingerprint") == self.record["fingerprint"]:
            return None
        if not src:
            return f"it was not trained from {self.path} (a run without --init-from)"
        return (f"it was trained from another HF checkpoint ({src.get('model_type')} at {src.get('path')}, "
                f"fingerprint {src.get('fingerprint')}; {self.path} has {self.record['fingerprint']})")

    # ------------------------------------------------------------------ reading
    @torch.no_grad()
    def fill(self, model: MoETransformer, experts: ExpertSink | None = None) -> None:
        """Copy every parameter of ``model`` from the checkpoint: dense ones into the model, each of this
        rank's experts (``Experts.expert_offset`` .. + ``num_local_experts``) into ``experts`` (default: the
        model). Shapes are checked; a parameter the checkpoint does not hold is a ``ValueError``. With
        ``experts``, stacked expert weights that are no longer parameters of the model (the expert store
        replaced them) are read too, into ``experts`` (which checks their shapes)."""
        stacked = {f"{n}.{p}": m for n, m in model.named_modules() if isinstance(m, Experts)
                   for p in ("w1", "w2", "w3") if getattr(m, p) is not None}
        params: dict[str, torch.Tensor | None] = dict(model.named_parameters())
        if experts is not None:
            for name in stacked:
                params.setdefault(name, None)  # held by ``experts`` only
        readers: dict[Path, SafetensorsReader] = {}
        try:
            for name, p in params.items():
                view = self.source.views.get(name)
                if view is None:
                    raise ValueError(f"{self.path} holds no tensor for parameter {name!r}; the model config "
                                     "(with its --set overrides) does not match the checkpoint")
                region = self.source.regions[view.region]
                if name in stacked:
                    mod = stacked[name]
                    # expert e is region[e]; of a fused gate_up_proj only rows [lo, hi) (contiguous) are read
                    lo, hi = view.lo or 0, view.hi if view.hi is not None else region[1]
                    per, inner = math.prod(region[1:]), math.prod(region[2:])
                    kind_only = ParamView(view.param, view.region, view.kind)
                    for e in range(mod.expert_offset, mod.expert_offset + mod.num_local_experts):
                        slab = self._read(readers, view.region, e * per + lo * inner, (hi - lo) * inner)
                        value = kind_only.apply(slab.view(1, hi - lo, *region[2:]))[0]
                        if p is not None:
                            _check(name, value, tuple(p.shape[1:]), f"expert {e}")
                        self.experts_read.setdefault(name, []).append(e)
                        if experts is None:
                            p.data[e - mod.expert_offset].copy_(value)
                        else:
                            experts.put(name, e, value)
                else:
                    assert p is not None  # only stacked experts may live outside the model
                    value = view.apply(self._read(readers, view.region, 0, math.prod(region)).view(region))
                    _check(name, value, tuple(p.shape), "")
                    p.data.copy_(value)
        finally:
            for r in readers.values():
                r.close()
        log.info("initialised %s from %s (%.1f MiB read)", type(model).__name__, self.path, self.bytes_read / 2**20)

    def _read(self, readers: dict[Path, SafetensorsReader], region: str, lo: int, n: int) -> torch.Tensor:
        """Elements [lo, lo + n) of a region (flat, in the stored dtype), from the reads that cover them."""
        reads = [r for r in self.source.reads[region] if r.elem_offset < lo + n and lo < r.elem_offset + r.numel]
        if not reads or sum(_overlap(r, lo, n) for r in reads) != n:
            raise ValueError(f"{self.path}: the stored tensors do not cover {region} elements [{lo}, {lo + n}); "
                             "the checkpoint is incomplete")
        dtype = reads[0].src_dtype
        out = torch.empty(n, dtype=dtype)
        for r in reads:
            a, b = max(lo, r.elem_offset), min(lo + n, r.elem_offset + r.numel)
            if r.src_dtype != dtype:
                raise ValueError(f"{self.path}: {region} is stored in mixed dtypes ({dtype}, {r.src_dtype})")
            reader = readers.get(r.path)
            if reader is None:
                reader = readers[r.path] = SafetensorsReader(r.path)
            item = dtype.itemsize
            reader.readv(r.offset + (a - r.elem_offset) * item, [out[a - lo:b - lo]])
            self.bytes_read += (b - a) * item
        return out


def _overlap(r: Read, lo: int, n: int) -> int:
    return max(0, min(lo + n, r.elem_offset + r.numel) - max(lo, r.elem_offset))


def _check(name: str, value: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != want:
        raise ValueError(f"{name}{' ' + what if what else ''}: the checkpoint's tensor has shape {tuple(value.shape)}, "
                         f"the model expects {want}; the model config (with its --set overrides) does not match "
                         "the checkpoint")


def local_expert_ids(model: nn.Module) -> Iterator[tuple[str, list[int]]]:
    """(stacked expert parameter, the global expert ids this rank holds) of every MoE layer."""
    for n, m in model.named_modules():
        if isinstance(m, Experts):
            ids = list(range(m.expert_offset, m.expert_offset + m.num_local_experts))
            for p in ("w1", "w2", "w3"):
                if getattr(m, p) is not None:
                    yield f"{n}.{p}", ids

