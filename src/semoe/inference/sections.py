"""Where every parameter of a model lies on disk, and how the model is cut into sections for the ring.

Legend: E experts, D d_model, F expert hidden size.

A model folder is either an HF checkpoint (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``) of a supported architecture, or a semoe checkpoint (``manifest.json``
+ ``model-*.safetensors``, as written by ``semoe train`` and ``semoe convert``). :func:`open_model`
reads only the JSON files and the safetensors headers and returns a :class:`ModelSource`: for every
parameter of :class:`~semoe.models.transformer.MoETransformer`, the byte ranges that hold it.

HF names go through the one mapping of ``semoe.models.hf`` (:func:`~semoe.models.hf.hf_key_to_semoe`).
No tensor is transposed or copied on load: a tensor is read, bytes as stored, into a *region* of a
slot, and the parameter is a view of that region (``t``: a transposed view; per-expert HF tensors
``[F, D]`` are read into ``region[e]`` of an ``[E, F, D]`` region whose ``transpose(1, 2)`` is the
stacked ``[E, D, F]`` parameter; a fused ``gate_up_proj [E, 2F, D]`` is one region with two views).
Only a dtype change (e.g. a bfloat16 file computed in float32) goes through a staging buffer, in pieces of
at most :data:`CAST_CHUNK` bytes, each cast straight into its place in the slot.

:func:`plan_sections` groups *units* (the embedding, each layer, the head = final norm + lm_head) into
sections of ``layers_per_section`` consecutive units and lays each section's regions out in a flat byte
buffer (a slot).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer
from torch.overrides import TorchFunctionMode

from semoe.config import ModelConfig, RunConfig, from_dict
from semoe.inference.load import resolve_checkpoint
from semoe.models.hf import (
    SUPPORTED_MODEL_TYPES,
    checkpoint_files,
    hf_key_to_semoe,
    model_config_from_hf,
    read_hf_config,
    semoe_param_slot,
)
from semoe.models.transformer import MoETransformer
from semoe.storage import checkpoint as ckpt
from semoe.storage.safetensors_io import SafetensorsHeader, TensorInfo, read_header, read_tensor

log = logging.getLogger(__name__)

__all__ = ["COMPUTE_DTYPES", "ModelSource", "ParamView", "Read", "Region", "Section", "SectionPlan",
           "build_meta_model", "compact_sections", "open_model", "plan_sections"]

#: dtypes the ring computes in, and the floating-point dtypes it reads from files (cast on load).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_READABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ALIGN = 256  # byte alignment of regions inside a slot (cache lines, CUDA copy alignment)
#: a read that needs a dtype cast goes through the staging area in pieces of at most this many bytes (each
#: piece is read, then cast into its place in the slot): the file is read once, the slot written once, and the
#: staging area stays small whatever the largest tensor.
CAST_CHUNK = 4 * 2**20

ViewKind = Literal["id", "t", "t12"]


# ----------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Read:
    """One stored tensor (or all of it that a region needs): ``nbytes`` at absolute ``offset`` of ``path``
    in ``src_dtype``, going to element ``elem_offset`` of region ``region`` (``numel`` elements); ``tensor``: its
    name in the file (for errors)."""

    path: Path
    offset: int
    nbytes: int
    src_dtype: torch.dtype
    region: str
    elem_offset: int
    numel: int
    tensor: str = ""


@dataclass(frozen=True)
class ParamView:
    """Parameter ``param`` = ``kind`` applied to ``region`` (optionally first sliced on dim 1 to
    ``[lo, hi)``): "id" as is, "t" 2-D transpose, "t12" swap dims 1 and 2."""

    param: str
    region: str
    kind: ViewKind = "id"
    lo: int | None = None
    hi: int | None = None

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.lo is not None:
            t = t[:, self.lo:self.hi]
        if self.kind == "t":
            return t.t()
        if self.kind == "t12":
            return t.transpose(1, 2)
        return t


@dataclass
class _RegionSpec:
    shape: tuple[int, ...]
    reads: list[Read] = field(default_factory=list)
    experts: set[int] | None = None  # for a stacked expert region: the expert ids read so far


@dataclass
class ModelSource:
    """A model on disk: its config, the regions and reads that hold its parameters, and extras.

    ``regions``: region key -> storage shape (elements of the compute dtype); ``reads``: by region key;
    ``views``: one per model parameter; ``buffers``: the model's (small) buffers, read once
    (semoe format) or zero (HF); ``files``: every safetensors file the model is read from.
    """

    path: Path
    fmt: Literal["hf", "semoe"]
    cfg: ModelConfig
    regions: dict[str, tuple[int, ...]]
    reads: dict[str, list[Read]]
    views: dict[str, ParamView]
    buffers: dict[str, torch.Tensor]
    files: list[Path]
    tokenizer_file: Path | None = None
    eos_ids: tuple[int, ...] = ()
    model_type: str = "semoe"

    @property
    def disk_bytes(self) -> int:
        """Size of the model's safetensors files."""
        return sum(f.stat().st_size for f in self.files)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The floating-point dtype that holds most of the stored parameter bytes (the checkpoint's dtype)."""
        by: dict[torch.dtype, int] = {}
        for reads in self.reads.values():
            for r in reads:
                by[r.src_dtype] = by.get(r.src_dtype, 0) + r.nbytes
        return max(by, key=lambda d: by[d]) if by else torch.float32

    def param_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all parameters in ``dtype`` (what a fully resident model takes)."""
        return sum(math.prod(s) for s in self.regions.values()) * dtype.itemsize


class _SkipMetaInit(TorchFunctionMode):
    """Skip the initialisation arithmetic of meta tensors, whose values do not exist anyway.

    torch implements some meta kernels in Python (``torch._refs``: ``normal_``, a tensor times a Python
    scalar, ``empty_like``); their first use imports ``torch._dynamo`` and sympy, ~70 MiB of resident
    memory and ~1 s, a fixed cost the ring engine does not need. Under this mode ``torch.nn.init.*`` and
    in-place random fills of a meta tensor return it unchanged, ``randn``/``rand`` become ``empty``, and
    a meta tensor times a number is a new empty meta tensor of the same shape and dtype. Only shapes,
    dtypes and module structure matter on the meta device, and those are unchanged."""

    _INPLACE = (torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_)
    _SCALE = (torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul)
    _RANDOM = (torch.randn, torch.rand)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in self._INPLACE or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        if func in self._SCALE and len(args) == 2 and isinstance(args[0], torch.Tensor) and args[0].is_meta \
                and isinstance(args[1], (int, float)) and args[0].is_floating_point():
            return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta")
        if func in self._RANDOM and kwargs.get("device") in (None, "meta", torch.device("meta")):
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


def build_meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> MoETransformer:
    """The model on the meta device (no memory), in eval mode: the ring runs its modules with
    parameters swapped in from slots."""
    with torch.device("meta"), _SkipMetaInit():
        model = MoETransformer(cfg)
    return model.to(dtype).eval()


def _check_dtype(info: TensorInfo, path: Path) -> None:
    if info.dtype not in _READABLE:
        raise ValueError(f"tensor {info.name!r} in {path} has dtype {info.dtype}, which the ring engine does not "
                         f"read (floating-point weights only: {[str(d) for d in _READABLE]}); quantized or integer "
                         "checkpoints are not supported, convert the weights to float32/float16/bfloat16")


def _add_piece(regions: dict[str, _RegionSpec], views: dict[str, ParamView], num_experts: dict[str, int],
               path: Path, info: TensorInfo, name: str, op: str) -> None:
    """Place one stored tensor: semoe target ``name`` (with ``{e}`` for fused expert tensors), HF op ``op``."""
    _check_dtype(info, path)
    if op in ("gate_t", "up_t", "down_t"):  # a fused [E, ., .] tensor: one region, read once, views per param
        stacked = name.replace(".{e}", "")
        if len(info.shape) != 3:
            raise ValueError(f"{path}: fused expert tensor {info.name!r} has shape {info.shape}, expected 3-D")
        key = f"src:{path.name}:{info.name}"
        if key not in regions:
            regions[key] = _RegionSpec(info.shape, [Read(path, info.offset, info.nbytes, info.dtype, key, 0,
                                                         info.numel, info.name)])
        half = info.shape[1] // 2
        lo, hi = {"gate_t": (0, half), "up_t": (half, 2 * half), "down_t": (None, None)}[op]
        _add_view(views, ParamView(stacked, key, "t12", lo, hi), path)
        return
    stacked, e = semoe_param_slot(name)
    if e is None:
        key = stacked
        if key in regions:
            raise ValueError(f"parameter {stacked!r} is stored twice (again in {path.name} as {info.name!r}); "
                             "the checkpoint is inconsistent")
        regions[key] = _RegionSpec(info.shape, [Read(path, info.offset, info.nbytes, info.dtype, key, 0, info.numel,
                                                     info.name)])
        _add_view(views, ParamView(stacked, key, "t" if op == "t" else "id"), path)
        return
    # one expert of a stacked parameter: region [E, *stored shape], expert e at slice e
    E = num_experts.get(stacked)
    if E is None:
        raise ValueError(f"{path.name}: tensor {info.name!r} maps to {name!r}, which this model config does not "
                         "have; config and weights disagree")
    if not 0 <= e < E:
        raise ValueError(f"{path.name}: tensor {info.name!r} is expert {e}, the model has {E} experts")
    key = stacked
    spec = regions.setdefault(key, _RegionSpec((E, *info.shape), experts=set()))
    if spec.experts is None or spec.shape[1:] != info.shape:
        raise ValueError(f"{path.name}: expert tensor {info.name!r} has shape {info.shape}, other experts of "
                         f"{stacked} have {spec.shape[1:]}")
    if e in spec.experts:
        raise ValueError(f"expert {e} of {stacked} is stored twice (again in {path.name}); the checkpoint is "
                         "inconsistent")
    spec.experts.add(e)
    spec.reads.append(Read(path, info.offset, info.nbytes, info.dtype, key, e * info.numel, info.numel, info.name))
    if stacked not in views:
        views[stacked] = ParamView(stacked, key, "t12" if op == "t" else "id")


def _add_view(views: dict[str, ParamView], view: ParamView, path: Path) -> None:
    if view.param in views:
        raise ValueError(f"parameter {view.param!r} is stored twice (again in {path.name}); the checkpoint is "
                         "inconsistent")
    views[view.param] = view


def _finish(path: Path, fmt: Literal["hf", "semoe"], cfg: ModelConfig, regions: dict[str, _RegionSpec],
            views: dict[str, ParamView], buffers: dict[str, torch.Tensor], files: list[Path],
            **extra: object) -> ModelSource:
    """Check that every parameter of the model is covered with the right shape, and nothing else."""
    meta = build_meta_model(cfg)
    params = dict(meta.named_parameters())
    unknown = sorted(set(views) - set(params))
    if unknown:
        raise ValueError(f"{path}: tensors for {unknown[:6]} have no place in this model ({cfg.n_layers} layers, "
                         f"moe_every={cfg.moe_every}); config and weights disagree")
    missing = sorted(set(params) - set(views))
    for key, spec in regions.items():
        if spec.experts is not None and len(spec.experts) < spec.shape[0]:
            missing.append(f"{key} (experts {sorted(set(range(spec.shape[0])) - spec.experts)})")
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    for name, view in views.items():
        got = tuple(view.apply(torch.empty(regions[view.region].shape, device="meta")).shape)
        if got != tuple(params[name].shape):
            raise ValueError(f"{path}: {name} would have shape {got} from the stored tensor, the model expects "
                             f"{tuple(params[name].shape)}; config and weights disagree")
    return ModelSource(path=path, fmt=fmt, cfg=cfg, regions={k: s.shape for k, s in regions.items()},
                       reads={k: sorted(s.reads, key=lambda r: (str(r.path), r.offset)) for k, s in regions.items()},
                       views=views, buffers=buffers, files=files, **extra)  # type: ignore[arg-type]


def _zero_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    meta = build_meta_model(cfg)
    return {name: torch.zeros(b.shape, dtype=b.dtype) for name, b in meta.named_buffers()}


def _stacked_experts(cfg: ModelConfig) -> dict[str, int]:
    meta = build_meta_model(cfg)
    return {n: p.shape[0] for n, p in meta.named_parameters() if ".moe.experts.w" in n}


def _eos_from(obj: dict) -> list[int]:
    eos = obj.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def inspect_hf_folder(path: Path) -> tuple[dict, ModelConfig, bool, list[Path]]:
    """(config.json, semoe ModelConfig, tied embeddings, safetensors files) of an HF folder, checked:
    an unsupported architecture or a corrupt single-file checkpoint is an error naming it."""
    hf = read_hf_config(path)
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: HF model_type {mt!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    cfg = model_config_from_hf(hf)
    single = path / "model.safetensors"
    if single.is_file() and not (path / "model.safetensors.index.json").is_file():
        read_header(single)  # a clear error for a corrupt file before anything else opens it
    return hf, cfg, bool(hf.get("tie_word_embeddings", False)), checkpoint_files(path)


def _open_hf(path: Path) -> ModelSource:
    hf, cfg, tied, files = inspect_hf_folder(path)
    mt = hf["model_type"]
    regions: dict[str, _RegionSpec] = {}
    views: dict[str, ParamView] = {}
    num_experts = _stacked_experts(cfg)
    for f, keys in files:
        header: SafetensorsHeader = read_header(f)
        for key in keys:
            if key not in header:
                raise ValueError(f"tensor {key!r} is listed for {f.name} but that file does not contain it; "
                                 "the index and the shard disagree, re-download the checkpoint")
            maps = hf_key_to_semoe(mt, key)
            if not maps or (tied and key == "lm_head.weight"):
                continue
            for tmap in maps:
                _add_piece(regions, views, num_experts, f, header[key], tmap.name, tmap.op)
    eos = _eos_from(hf)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = _eos_from(json.loads(gen.read_text())) or eos
    tok = path / "tokenizer.json"
    return _finish(path, "hf", cfg, regions, views, _zero_buffers(cfg), [f for f, _ in files],
                   tokenizer_file=tok if tok.is_file() else None, eos_ids=tuple(eos), model_type=str(mt))


def _open_semoe(path: Path) -> ModelSource:
    step = resolve_checkpoint(path)
    manifest = ckpt.read_manifest(step, verify=False)  # sizes checked; headers are checked below
    try:
        cfg = from_dict(RunConfig, manifest["config"]).model
    except KeyError as e:
        raise ValueError(f"{step / ckpt.MANIFEST} has no model config; it was not written by semoe") from e
    files = sorted(step.glob("model-*.safetensors"))
    if not files:
        raise ValueError(f"{step} has no model-*.safetensors files; the checkpoint is incomplete")
    regions: dict[str, _RegionSpec] = {}
    views: dict[str, ParamView] = {}
    buffers = _zero_buffers(cfg)
    num_experts = _stacked_experts(cfg)
    for f in files:
        header = read_header(f)
        for key, info in header.tensors.items():
            if key in buffers:  # router buffers: tiny, read once, kept resident
                buffers[key] = read_tensor(f, key).reshape(buffers[key].shape).to(buffers[key].dtype)
                continue
            _add_piece(regions, views, num_experts, f, info, key, "copy")
    tok = step / "tokenizer.json"
    eos = tuple(int(e) for e in manifest.get("eos_token_ids") or ())  # written by `semoe convert`
    if not eos and tok.is_file():  # `semoe train` checkpoints: the tokenizer's end-of-text token
        eid = Tokenizer.from_file(str(tok)).token_to_id("<|endoftext|>")
        eos = (eid,) if eid is not None else ()
    return _finish(step, "semoe", cfg, regions, views, buffers, files,
                   tokenizer_file=tok if tok.is_file() else None, eos_ids=eos)


def open_model(path: str | Path) -> ModelSource:
    """Read a model folder's metadata (JSON and safetensors headers only): an HF checkpoint folder
    (``config.json``) or a semoe checkpoint (a step folder, a run's ``checkpoints`` folder or its run
    folder). Errors name the folder and the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; pass the model folder (an HF checkpoint folder with config.json, "
                         "or a semoe checkpoint folder with manifest.json)")
    if (path / "config.json").is_file():
        return _open_hf(path)
    if ckpt.find_latest(path) is not None or ckpt.find_latest(path / "checkpoints") is not None:
        return _open_semoe(path)
    raise ValueError(f"{path} is neither an HF checkpoint folder (config.json + safetensors; supported: "
                     f"{list(SUPPORTED_MODEL_TYPES)}) nor a semoe checkpoint (manifest.json)")


# ----------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Region:
    """A region placed in a slot: ``byte_offset`` and ``nbytes`` in the slot, ``shape`` of its elements."""

    key: str
    shape: tuple[int, ...]
    byte_offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayer:
    """The routed experts of one MoE layer of a section, each loadable on its own: expert e's slices (its row
    ``e`` of every stacked expert region: w1, w3, w2, or a fused gate_up and down) are ``reads[e]`` on disk (in
    file order) and the byte ranges ``slot_ranges[e]`` (offset, nbytes) of the slot, in region order; ``nbytes``
    per expert in the slot (compute dtype), ``disk_bytes`` per expert as stored. Shared experts are dense."""

    layer: int
    num_experts: int
    top_k: int
    reads: tuple[tuple[Read, ...], ...]
    slot_ranges: tuple[tuple[tuple[int, int], ...], ...]
    nbytes: int
    disk_bytes: int
    #: (region key, elements of one expert row) of each stacked expert region, in slot order
    row_numel: tuple[tuple[str, int], ...] = ()

    @property
    def positions(self) -> int:
        """Expert rows the slot holds for this layer: ``num_experts`` (whole layer: row e is expert e) or fewer (a
        compact layout for routed passes: the picked experts in rows 0, 1, ... in ascending id order)."""
        return len(self.slot_ranges)

    def reads_at(self, e: int, p: int) -> tuple[Read, ...]:
        """Expert ``e``'s reads aimed at row ``p`` of the stacked regions (``reads[e]`` aims at row e)."""
        if p == e:
            return self.reads[e]
        per = dict(self.row_numel)
        return tuple(dataclasses.replace(r, elem_offset=r.elem_offset + (p - e) * per[r.region])
                     for r in self.reads[e])


@dataclass(frozen=True)
class Section:
    """Consecutive units ("embed", "layer.3", "head") computed from one slot. ``dense_reads``: every read but the
    routed experts' (attention, norms, routers, shared experts, embedding, head); ``experts``: the routed experts
    of each MoE layer, loadable one by one (routed-only loading)."""

    index: int
    units: tuple[str, ...]
    regions: tuple[Region, ...]
    views: tuple[ParamView, ...]
    reads: tuple[Read, ...]  # sorted by (file, offset)
    nbytes: int
    dense_reads: tuple[Read, ...] = ()
    experts: tuple[ExpertLayer, ...] = ()

    @property
    def bytes_read(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def dense_bytes_read(self) -> int:
        return sum(r.nbytes for r in self.dense_reads)

    def expert_layer(self, layer: int) -> ExpertLayer | None:
        return next((x for x in self.experts if x.layer == layer), None)


@dataclass(frozen=True)
class SectionPlan:
    """The sections of a model for one compute dtype."""

    source: ModelSource
    dtype: torch.dtype
    sections: tuple[Section, ...]

    @property
    def slot_bytes(self) -> int:
        """Bytes of the largest section: the size of a ring slot."""
        return max(s.nbytes for s in self.sections)

    @property
    def staging_bytes(self) -> int:
        """Bytes of the staging area of dtype casts: the largest read that needs one, at most
        :data:`CAST_CHUNK` (0 when the files are in the compute dtype)."""
        return min(CAST_CHUNK, max((r.nbytes for s in self.sections for r in s.reads if r.src_dtype != self.dtype),
                                   default=0))

    @property
    def total_bytes(self) -> int:
        """Bytes of all sections (a pass reads this much when nothing stays resident)."""
        return sum(s.nbytes for s in self.sections)


def _unit_of(param: str, tied: bool) -> list[str]:
    if param.startswith("layers."):
        return [f"layer.{param.split('.')[1]}"]
    if param.startswith("tok_emb."):
        return ["embed", "head"] if tied else ["embed"]
    return ["head"]


def plan_sections(source: ModelSource, layers_per_section: int = 1, dtype: torch.dtype = torch.float32) -> SectionPlan:
    """Cut the model into sections of ``layers_per_section`` consecutive units (the embedding and the head
    count as units) and lay each section out in a slot."""
    if not isinstance(layers_per_section, int) or layers_per_section < 1:
        raise ValueError(f"layers_per_section must be an integer >= 1, got {layers_per_section!r}")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype} is not supported; use one of {[str(d) for d in COMPUTE_DTYPES]}")
    cfg = source.cfg
    units = ["embed", *(f"layer.{i}" for i in range(cfg.n_layers)), "head"]
    by_unit: dict[str, list[ParamView]] = {u: [] for u in units}
    for view in source.views.values():
        for u in _unit_of(view.param, cfg.tie_embeddings):
            by_unit[u].append(view)
    sections = []
    for idx, start in enumerate(range(0, len(units), layers_per_section)):
        sec_units = tuple(units[start:start + layers_per_section])
        views = tuple(v for u in sec_units for v in by_unit[u])
        keys = list(dict.fromkeys(v.region for v in views))
        reads = sorted((r for k in keys for r in source.reads[k]), key=lambda r: (str(r.path), r.offset))
        # lay regions out in the order their first bytes come from disk
        first = {}
        for r in reads:
            first.setdefault(r.region, len(first))
        keys.sort(key=lambda k: first.get(k, len(first)))
        regions, pos = [], 0
        for k in keys:
            n = math.prod(source.regions[k]) * dtype.itemsize
            regions.append(Region(k, source.regions[k], pos, n))
            pos += -(-n // ALIGN) * ALIGN
        experts = _expert_layers(cfg, views, regions, dtype, source.reads)
        routed = {rd for x in experts for per in x.reads for rd in per}
        expert_regions = {rd.region for rd in routed}
        dense = tuple(r for r in reads if r.region not in expert_regions)
        sections.append(Section(idx, sec_units, tuple(regions), views, tuple(reads), max(pos, ALIGN), dense, experts))
    return SectionPlan(source, dtype, tuple(sections))


_EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.moe\.experts\.w[123]$")


def _expert_layers(cfg: ModelConfig, views: tuple[ParamView, ...], regions: list[Region], dtype: torch.dtype,
                   reads: dict[str, list[Read]]) -> tuple[ExpertLayer, ...]:
    """Per MoE layer of a section: each expert's pieces of the stacked expert regions (row e of each)."""
    E = cfg.moe.num_experts
    by_layer: dict[int, list[Region]] = {}
    placed = {r.key: r for r in regions}
    for v in views:
        m = _EXPERT_PARAM.match(v.param)
        if m is None:
            continue
        reg = placed[v.region]
        if reg.shape[0] != E:
            raise ValueError(f"expert region {reg.key} has shape {reg.shape}, expected {E} experts first")
        layer_regions = by_layer.setdefault(int(m.group(1)), [])
        if reg not in layer_regions:
            layer_regions.append(reg)
    return tuple(_one_expert_layer(layer, regs, E, cfg.moe.router.top_k, dtype, reads)
                 for layer, regs in sorted(by_layer.items()))


def _one_expert_layer(layer: int, regs: list[Region], E: int, top_k: int, dtype: torch.dtype,
                      source_reads: dict[str, list[Read]]) -> ExpertLayer:
    regs = sorted(regs, key=lambda r: r.byte_offset)
    reads: list[tuple[Read, ...]] = []
    ranges: list[tuple[tuple[int, int], ...]] = []
    for e in range(E):
        mine: list[Read] = []
        spans: list[tuple[int, int]] = []
        for reg in regs:
            per = math.prod(reg.shape[1:])
            lo, hi = e * per, (e + 1) * per
            spans.append((reg.byte_offset + lo * dtype.itemsize, per * dtype.itemsize))
            for r in source_reads[reg.key]:
                a, b = max(lo, r.elem_offset), min(hi, r.elem_offset + r.numel)
                if a < b:
                    item = r.src_dtype.itemsize
                    mine.append(Read(r.path, r.offset + (a - r.elem_offset) * item, (b - a) * item, r.src_dtype,
                                     r.region, a, b - a, r.tensor))
        reads.append(tuple(sorted(mine, key=lambda r: (str(r.path), r.offset))))
        ranges.append(tuple(spans))
    return ExpertLayer(layer, E, top_k, tuple(reads), tuple(ranges), sum(n for _, n in ranges[0]),
                       sum(r.nbytes for r in reads[0]), tuple((r.key, math.prod(r.shape[1:])) for r in regs))


def compact_sections(plan: SectionPlan, rows: int) -> tuple[Section, ...]:
    """The plan's sections laid out for routed passes: every stacked expert region holds ``rows`` expert rows
    instead of E (the dense regions as before, in the same order), so a slot is the dense part plus ``rows``
    experts per MoE layer. Such a slot is only loaded in parts (``mode="dense"``, then the picked experts into rows
    0, 1, ... in ascending expert id: :meth:`ExpertLayer.reads_at`); ``reads`` is the dense part. ``rows`` >= E
    gives the plan's own sections."""
    out = []
    item = plan.dtype.itemsize
    for sec in plan.sections:
        if not sec.experts or rows >= min(x.num_experts for x in sec.experts):
            out.append(sec)
            continue
        stacked = {key for x in sec.experts for key, _ in x.row_numel}
        regions, pos = [], 0
        for r in sec.regions:
            shape = (rows, *r.shape[1:]) if r.key in stacked else r.shape
            n = math.prod(shape) * item
            regions.append(Region(r.key, shape, pos, n))
            pos += -(-n // ALIGN) * ALIGN
        placed = {r.key: r for r in regions}
        experts = []
        for x in sec.experts:
            spans = tuple(tuple((placed[key].byte_offset + p * per * item, per * item) for key, per in x.row_numel)
                          for p in range(rows))
            experts.append(dataclasses.replace(x, slot_ranges=spans))
        out.append(dataclasses.replace(sec, regions=tuple(regions), reads=sec.dense_reads, nbytes=max(pos, ALIGN),
                                       experts=tuple(experts)))
    return tuple(out)
