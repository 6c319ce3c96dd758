"""Ring-memory inference: run an MoE model larger than memory by streaming it section by section.

Legend: B sequences of a group (or a chunk of it), S new positions in this pass, L cached + new positions,
D d_model, V vocab, G kv heads, Kh head dim, K ring slots, T tokens of a call (B * S).

SE-MoE's ring memory: the model is cut into sections (consecutive units: the embedding, layers, the
head; see :mod:`semoe.inference.sections`); the compute device holds a ring of K preallocated slots;
a loader thread fills the slot of ticket t + K - 1 while the section of ticket t computes, round-robin
(ticket t lives in slot t mod K); the slots and the loader are :class:`~semoe.inference.loader.SlotRing`
(CPU: positional reads straight into host-memory slots, no memory map; CUDA: pinned host buffers, a copy
stream and events).

Throughput mode: all prompts of a call (a *wave*, as many as the memory budget holds) are grouped by
prompt length (exact without padding masks), one KV cache per group (on the compute device, or
``kv_device``); every loaded section runs over every active group before it is evicted, so one load
serves the whole wave. A pass is one trip over all sections: the first pass is the prefill, in chunks of
``batch_size`` rows (micro-batches: their activations are what the budget must hold), each later pass
decodes one token per sequence, a whole group per call. A sequence stops at an EOS id or its token limit;
a group leaves the passes when all its sequences have stopped.

The math is the model's own: the :class:`~semoe.models.transformer.MoETransformer` is built once on the
meta device, and before a section runs, its parameters and buffers are pointed at views of the slot
(plain stores into the modules' parameter dicts, no copy; the meta tensors are put back after a wave).
Nothing is allocated by the ring in the steady state: slots, the staging area and the pinned buffers are
allocated once; KV caches once per wave.

Routed-only loading (CPU, ``strategy``): an MoE layer's section may load its dense part only; attention and
the router run over the whole wave, then only the union of the picked experts is loaded (those the next
layer's router predicted from this layer's output are loaded ahead, misses on demand, hot ones copied from the
:class:`~semoe.inference.expert_cache.ExpertCache`), then the MoE layer: the same ops as ``Block.forward``, so
the output is bit-identical to the resident model. :meth:`RingEngine._mode_for` chooses per section and pass.

Compact slots (``compact_slots``): a routed pass can use at most min(E, T k) experts of a layer, so its slots hold
the dense part and that many expert rows (the picked experts in ascending id order, the routing renumbered to rows,
order-keeping); the layout switches at pass boundaries, and the memory smaller slots free goes to the expert cache.

Memory budget (``max_memory``): K slots of the largest section + the staging area (only for a dtype
cast) + the resident set of a wave (KV caches, hidden states, the activation estimate of
:func:`activation_bytes`) + an explicit expert cache must fit; otherwise the wave is made smaller, and if not
even one sequence fits, ``ValueError`` states the minimum; an "auto" expert cache gets what is left. The
process's fixed overhead (interpreter, torch, code) is outside the budget; ``docs/inference.md`` gives its
measured size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import re
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semoe.inference.expert_cache import ExpertCache
from semoe.inference.expert_views import ExpertViews, experts_on_views, supports_views
from semoe.inference.generate import sample_next
from semoe.inference.loader import SlotRing, trim_heap
from semoe.inference.sections import (
    ExpertLayer,
    ModelSource,
    Section,
    build_meta_model,
    compact_sections,
    open_model,
    plan_sections,
)
from semoe.inference.stats import RingStats
from semoe.models.transformer import MoETransformer, moe_layers, rope_cos_sin
from semoe.precision import check_dtype_runs, cpu_matmul_probe, dtype_name, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["DTYPE_CHOICES", "GenerationResult", "RingEngine", "RingStats", "activation_bytes", "compute_dtype",
           "parse_size", "process_memory", "ring_generate"]

MiB = 2**20
#: loading strategies: "layer" streams whole layers, "routed" the dense part and then only the routed experts,
#: "auto" lets the cost model (RingEngine._mode_for) choose per section and pass
STRATEGIES = ("auto", "layer", "routed")
#: routed loading must be expected to take less than this share of the whole layer's time: its misses wait after
#: the router while a whole layer loads ahead under compute (bench_expert_offload, 2-core EPYC, cold: routed at
#: f = 0.68 took 1.9x the whole-layer time, at f = 0.25 0.86x)
ROUTED_MARGIN = 0.5
#: the engine's own memory that no estimate names (Python objects of the plan, the read programs and the bindings,
#: routing tensors, the loader's and readers' thread stacks and malloc arenas, allocator slack), kept out of what the
#: caches get: measured 3.7-8.2 MiB of anonymous memory above the slots, caches, KV caches and activation estimate on
#: the *-big bench models (Intel Xeon, bf16, B = 1 to 16: it grows by 0.8-1.9 MiB from B=1 to B=16); at most 1/16 of
#: the budget (tiny budgets)
RUNTIME_RESERVE = 8 * MiB
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(size: str | int | float) -> int:
    """Bytes from "300MB", "2GB", "1.5GiB", "512K" or a number of bytes. KB/MB/GB/TB are binary
    (1 MB = 2**20 bytes), as are KiB/MiB/GiB/TiB."""
    if isinstance(size, bool):
        raise ValueError(f"memory size must be a number of bytes or a string like '300MB', got {size!r}")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        m = _SIZE_RE.match(str(size))
        if m is None:
            raise ValueError(f"cannot read memory size {size!r}; write it like '300MB', '2GB' or '1.5GiB'")
        value = int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {size!r}")
    return value


def process_memory() -> dict[str, float]:
    """This process's memory in MiB: ``rss`` (now), ``peak_rss`` (VmHWM, since start), ``anon`` and
    ``file`` (RssAnon / RssFile now). Linux ``/proc``; elsewhere only rss and peak_rss (resource)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                name = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "anon", "RssFile": "file"}.get(key)
                if name:
                    out[name] = int(rest.split()[0]) / 1024.0
    except OSError:
        import resource

        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out["rss"] = out["peak_rss"]
    return out


# ------------------------------------------------------------------------------------------ precision

#: the dtypes ``dtype=`` / ``--dtype`` accept besides "auto".
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype: torch.dtype | str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype the engine computes in (slots, KV caches, activations): ``dtype`` as given, or for "auto"
    on CUDA the checkpoint's ``stored`` dtype (float32, bfloat16 or float16; a float64 checkpoint computes in
    float32), on a CPU :func:`semoe.precision.resolve_dtype` (the trainer's rule: bfloat16 only where the measured
    probe finds it fast, else float32). The choice is checked to run on ``device`` and logged."""
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    if name not in ("auto", *DTYPE_CHOICES):
        raise ValueError(f"dtype {name!r} is not supported by the ring engine; choose one of "
                         f"{['auto', *DTYPE_CHOICES]} (float64 is a training reference precision only)")
    if name == "auto" and device.type == "cuda":
        out = stored if dtype_name(stored) in DTYPE_CHOICES else torch.float32
    else:
        out = resolve_dtype(name, device, native=stored)
    check_dtype_runs(out, device)
    if device.type == "cpu" and out != torch.float32 and not cpu_matmul_probe().fast_bf16:
        log.warning("computing in %s on a CPU whose %s matmul is not fast (see the CPU matmul probe above); "
                    "float32 will likely be faster", dtype_name(out), dtype_name(out))
    log.info("ring engine computes in %s (dtype=%s on %s; the checkpoint is stored in %s%s)", dtype_name(out), name,
             device, dtype_name(stored), "" if stored == out else ", cast while reading")
    return out


# ------------------------------------------------------------------------------------------ memory


def activation_bytes(cfg: Any, batch: int, new: int, total: int, itemsize: int) -> int:
    """A generous estimate of the peak temporary memory of one block forward over ``batch`` sequences
    of ``new`` positions that attend to ``total`` positions (every intermediate counted as if live at
    once): attention projections, RoPE copies, repeated K/V, the attention matrix (float32), and the
    MoE layer's routing, permuted rows and expert hidden states."""
    T = batch * new
    H, G, Kh, D = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
    moe = cfg.moe
    k = moe.router.top_k
    F_ = max(moe.d_ff, cfg.dense_d_ff)
    shared = moe.shared_hidden if moe.num_shared_experts else 0
    per_token = 8 * D + 6 * H * Kh + 4 * G * Kh + k * (2 * D + 3 * F_) + 3 * shared
    return (itemsize * T * per_token + 4 * T * 3 * moe.num_experts + 8 * T * k * 6
            + 4 * batch * H * new * total + 2 * itemsize * batch * H * total * Kh)


@dataclass
class GenerationResult:
    """``tokens``: the new tokens of each prompt (an EOS id included when produced); ``logits``: with
    ``return_logits``, per prompt a float32 ``[len(tokens[i]), V]`` tensor of the logits each new token
    was chosen from; ``stats``: this call's counters."""

    tokens: list[list[int]]
    logits: list[torch.Tensor] | None
    stats: RingStats


def _share_workspaces(model: nn.Module) -> None:
    """One activation workspace for all expert layers: the ring computes one layer at a time, and a
    workspace per layer would keep n_layers x the largest call's activations resident."""
    shared = None
    for m in model.modules():
        ws = getattr(m, "workspace", None)
        if ws is not None and ws.__class__.__name__ == "FFNWorkspace":
            shared = shared or ws
            m.workspace = shared


# ------------------------------------------------------------------------------------------ engine


@dataclass
class _Group:
    """The prompts of one length in a wave: one KV cache (batch-major, so a chunk of rows is a view), the
    prefill in chunks of ``chunk`` rows (activations bounded by the budget), each decode step in one call."""

    rows: list[int]  # prompt indices
    tokens: torch.Tensor  # [B, S] the next input
    limits: list[int]
    chunk: int  # rows per prefill call
    k: list[torch.Tensor] | None  # per layer [B, G, max_len, Kh]; None when every sequence makes one token
    v: list[torch.Tensor] | None
    start: int = 0
    x: list[torch.Tensor] = field(default_factory=list)  # hidden states, one tensor per chunk
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(self.done)

    def chunks(self) -> list[slice]:
        """Row slices of this pass: chunks for the prefill, all rows for a decode step."""
        B = len(self.rows)
        step = self.chunk if self.tokens.shape[1] > 1 else B
        return [slice(j, min(j + step, B)) for j in range(0, B, step)]


class RingEngine:
    """Streams a model from disk through a ring of slots and generates with it.

    ``model``: a model folder (HF or semoe, see :func:`~semoe.inference.sections.open_model`) or an
    opened :class:`ModelSource`. ``max_memory``: the budget of the compute device's memory ("300MB",
    bytes); ``None`` = no budget: every section is loaded once and stays (ring off). With a budget
    that holds the whole model with room to spare (model <= 3/4 of it) the sections also stay resident;
    otherwise ``slots`` (default 2) slots of the largest section form the ring. ``layers_per_section``:
    units (embedding, layers, head) per section. ``batch_size``: sequences per prefill call (micro-batch).
    ``kv_device``: where KV caches live (default: the compute device). ``drop_page_cache``: drop the
    file pages of each section from the kernel page cache after reading it (they never count in this
    process's RSS either way; this frees the machine's cache at the price of disk reads every pass).
    ``dtype``: the compute dtype: a torch dtype, "float32" (the default: results independent of the machine),
    "bfloat16", "float16" or "auto" (:func:`compute_dtype`: bfloat16 on a CPU whose bfloat16 matmul is measured
    fast, else float32; the checkpoint's 16-bit dtype on CUDA; the CLI's default). Slots hold the weights in it (a
    file in another dtype is cast while it is read, through a small staging area).
    ``strategy``: how MoE layers are loaded (CPU): "layer" (every byte of a section, read ahead under the previous
    sections' compute), "routed" (the dense part ahead, then only the experts the wave's routers pick: predicted
    ones ahead, misses on demand), "auto" (default: the cost model of :meth:`_mode_for` per section and pass).
    ``expert_cache``: memory for routed experts between uses (:mod:`semoe.inference.expert_cache`): "auto" (what
    the budget leaves after the ring and the wave), a size, or 0/None (off). ``io_threads``: reader threads for
    on-demand expert reads. ``prefetch``: predict the next layer's experts (its router on this layer's output);
    ``prefetch_depth`` 2 (default) also predicts the layer after it (its router on the same output; read once the
    earlier predictions are served: more time to read, lower accuracy), 1 only the next layer. Predictions run on
    resident copies of the MoE layers' ffn norms and routers (a few KiB per layer, in the budget).
    ``prefetch_width``: a top-k router's prediction names its top (k + width) experts instead of k (default 0): more
    hits, more bytes; queued predictions the router then did not pick are dropped unread.
    ``dense_cache``: with "routed" / "auto", keep the sections' dense parts (attention, norms, routers, embedding,
    head) in what the budget leaves after the ring and the wave, before the expert cache gets the rest: every pass
    uses every dense byte, an expert only when a router picks it, so per byte the dense part is worth the most.
    ``compact_slots`` (default True; CPU, strategy "routed"/"auto", with a budget): a pass that routes runs from slots
    of the dense part + min(E, T k) expert rows (:meth:`_layout_rows`), switched at pass boundaries, the memory they
    free going to the expert cache; a model whose layer does not fit twice in the budget is then served from such
    slots alone. False: whole-layer slots always (the engine before).
    ``readahead``: ask the kernel (``POSIX_FADV_WILLNEED``) to read the next section into the page cache while
    the loader waits for a slot (off by default: on the development machine it lowered the loader's cold
    read rate from ~1.3-1.6 to ~1.1 GB/s).
    """

    def __init__(self, model: str | Path | ModelSource, *, max_memory: str | int | None = None,
                 slots: int | None = None, layers_per_section: int = 1, device: str | torch.device | None = None,
                 dtype: torch.dtype | str = torch.float32, kv_device: str | torch.device | None = None,
                 batch_size: int = 8, drop_page_cache: bool = False, readahead: bool = False,
                 strategy: str = "auto", expert_cache: str | int | None = "auto", io_threads: int = 2,
                 prefetch: bool | str = True, dense_cache: bool = True, prefetch_depth: int = 2,
                 prefetch_width: int = 0, compact_slots: bool = True) -> None:
        self.source = model if isinstance(model, ModelSource) else open_model(model)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
        self.dtype = dtype = compute_dtype(dtype, self.device, self.source.stored_dtype)
        self.plan = plan_sections(self.source, layers_per_section, dtype)
        self.layers_per_section = layers_per_section
        self.cfg = self.source.cfg
        self.kv_device = torch.device(kv_device) if kv_device is not None else self.device
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.budget = parse_size(max_memory) if max_memory is not None else None
        self._force_kv_staging = False  # tests: exercise the kv_device != device path on one device
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)} (layer: stream whole layers; "
                             "routed: dense part, then only the experts the router picks; auto: the cost model)")
        has_experts = any(s.experts for s in self.plan.sections)
        if strategy == "routed" and self.device.type != "cpu":
            raise ValueError(f"strategy='routed' runs on a CPU device only for now, not {self.device}; use "
                             "strategy='layer' (or 'auto', which streams whole layers there)")
        self.strategy = strategy if has_experts and self.device.type == "cpu" else "layer"
        S = len(self.plan.sections)
        # compact slots (routed passes): possible where experts are loaded one by one (CPU, strategy not "layer")
        self._compactable = compact_slots and self.strategy != "layer" and self.budget is not None
        self._layouts: dict[int, tuple[Section, ...]] = {}  # rows -> compact sections (memo)
        self._cache_request = expert_cache
        self._cache_reserved = 0 if expert_cache in (None, "auto", 0) else parse_size(expert_cache)  # type: ignore[arg-type]
        sizes, self.resident = self._choose_slots(slots, S)
        if self.resident and strategy != "auto":
            raise ValueError(f"strategy={strategy!r} was asked for, but "
                             + ("no --max-memory was given" if self.budget is None else
                                f"max_memory={self.budget / MiB:.1f} MiB holds the whole model "
                                f"({self.plan.total_bytes / MiB:.1f} MiB)")
                             + ": every section is loaded once and stays, nothing is streamed; use strategy='auto' "
                             f"or a budget below {math.ceil(self.plan.total_bytes / 0.75 / MiB)}MB")
        if self.resident:
            self.strategy = "layer"
            self._compactable = False
        if not isinstance(prefetch_width, int) or prefetch_width < 0:
            raise ValueError(f"prefetch_width must be an integer >= 0 (extra experts per predicted token), got "
                             f"{prefetch_width!r}")
        if prefetch not in (True, False, "always"):
            raise ValueError(f"prefetch must be True (predictions read when the cost rule says they pay), 'always' "
                             f"(every prediction read) or False (off), got {prefetch!r}")
        if prefetch_depth not in (1, 2):
            raise ValueError(f"prefetch_depth must be 1 (the next layer's experts) or 2 (also the layer after), "
                             f"got {prefetch_depth!r}; prefetch=False turns prediction off")
        self.model = build_meta_model(self.cfg, dtype)
        _share_workspaces(self.model)
        for layer in moe_layers(self.model):  # generation needs no router losses (~3% of a decode pass)
            layer.compute_losses = False
        # resident copies of each MoE layer's ffn norm and router for the predictions (made when the layer's dense
        # part is first bound): a layer's experts can be predicted before its section is loaded
        self._predictors: dict[int, tuple[nn.Module, nn.Module] | None] = {}
        self._predictor_shells: dict[int, tuple[nn.Module, nn.Module]] = {}  # meta copies, filled on capture
        predictor_bytes = 0
        if prefetch and self.strategy != "layer":
            for i, block in enumerate(self.model.layers):
                if block.is_moe:
                    self._predictors[i] = None
                    norm, router = copy.deepcopy(block.ffn_norm), copy.deepcopy(block.moe.router)
                    if prefetch_width and router.cfg.kind == "topk":  # predict the top (k + width) experts
                        router.cfg = dataclasses.replace(router.cfg, top_k=min(router.cfg.top_k + prefetch_width,
                                                                               router.num_experts))
                    self._predictor_shells[i] = (norm, router)
                    predictor_bytes += sum(p.numel() * p.element_size() for m in (block.ffn_norm, block.moe.router)
                                           for p in m.parameters())
        self.ring_bytes = sum(sizes) + self.plan.staging_bytes
        # the copies may take at most 1/4 of what the budget leaves after the ring and one sequence (the rest is for
        # the waves, the dense and the expert cache)
        if predictor_bytes and self.budget is not None and 4 * predictor_bytes > (
                self.budget - self.ring_bytes - self._cache_reserved - self._one_sequence_bytes()):
            log.info("no room for the routers' resident copies (%.2f MiB): predictions one layer ahead, from the "
                     "next section's own router once its dense part is in", predictor_bytes / MiB)
            self._predictors.clear()
            predictor_bytes = 0
        self.ring_bytes += predictor_bytes
        self._ring_extra = self.plan.staging_bytes + predictor_bytes
        # the layout the ring starts in: whole layers when two fit, else compact slots with the most rows that fit
        self._rows: int | None = None  # expert rows per compact slot; None: whole-layer slots
        self._sections = self.plan.sections
        if not self._full_fits:
            self._rows = self._rows_fit
            self._sections = self._compact(self._rows)
            sizes = [max(sec.nbytes for sec in self._sections)] * len(sizes)
            self.ring_bytes = sum(sizes) + self._ring_extra
            log.info("a whole layer does not fit twice in max_memory=%.1f MiB: compact slots of the dense part + %d "
                     "experts (%.1f MiB each); routed passes only", self.budget / MiB, self._rows, sizes[0] / MiB)
        self._ring_now = self.ring_bytes  # the ring's bytes in the current layout (ring_bytes: in the largest)
        self._wave_need = 0
        self._hold = False  # a pass's tickets are not requested ahead across the pass boundary (compact slots)
        self._left_in_pass = 0
        self._check_cache_fits()
        self._buffers = {f"model.{n}": b.to(device=self.device, dtype=dtype if b.is_floating_point() else b.dtype)
                         for n, b in self.source.buffers.items()}
        self.stats = RingStats()
        entry = max((x.nbytes for sec in self.plan.sections for x in sec.experts), default=0)
        self.cache = ExpertCache(entry, self._cache_reserved, self.device) \
            if self.strategy != "layer" and entry and expert_cache != 0 else None
        self._ring = SlotRing(self.plan, self.device, sizes, self.stats, drop_page_cache, readahead, self.cache,
                              io_threads, self._sections)
        # routed passes (compact or whole-layer slots) compute from the experts where they lie (no copy of a cache hit
        # into the slot), each expert once its own reads are done, where the experts' impl can run on per-expert views
        # (expert_views)
        self._ring.in_place = self.strategy != "layer" and all(supports_views(moe.experts)
                                                               for moe in moe_layers(self.model))
        self._views: dict[int, ExpertViews] = {}
        # cost model (see _mode_for): (pass, section, tokens, mode, expected whole-layer s, expected routed s)
        self.decisions: deque[tuple[int, int, int, str, float, float]] = deque(maxlen=4096)
        self._last_mode: dict[int, str] = {}
        self._cur_section = 0
        self._pass_tokens = self._next_pass_tokens = 0
        self.prefetch = prefetch
        self.prefetch_depth = prefetch_depth
        # the cost rule of _worth_reading: per depth [experts named that the router then picked, experts named]
        # (prior 3 of 4: predictions are read until measured otherwise), and the compute time of one MoE layer
        # (seconds, moving average; None until measured)
        self._precision: dict[int, list[float]] = {1: [3.0, 4.0], 2: [3.0, 4.0]}
        self._layer_compute_s: float | None = None
        # predictions for sections not requested yet: section index -> [(expert layer, experts, depth)]
        self._deferred: dict[int, list[tuple[ExpertLayer, list[int], int]]] = {}
        # the predictions made for each (ticket, layer): depth -> experts (for the per-depth hit rates)
        self._predicted: dict[tuple[int, int], dict[int, set[int]]] = {}
        self.dense_cache = dense_cache and self.strategy != "layer"
        self._dense_total = dtype.itemsize * sum(rd.numel for sec in self.plan.sections for rd in sec.dense_reads)
        self._finalizer = weakref.finalize(self, self._ring.close)  # stops the loader if close() is forgotten
        self._pending: deque[tuple[int, int, str]] = deque()  # (ticket, section, mode) requested, not computed
        self._next_section = 0
        self._allowed = 0  # sections the current generate() call may still compute
        self._kv_scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bindings: dict[tuple[int, int], list[tuple[dict, str, torch.Tensor]]] = {}
        self._meta: dict[str, tuple[dict, str, torch.Tensor]] = {}
        log.info("ring engine: %s (%s), %d sections, %s, slot %.1f MiB, budget %s, strategy %s", self.source.path,
                 self.source.fmt, S, "resident" if self.resident else f"K={len(sizes)} slots",
                 self.plan.slot_bytes / MiB, "none" if self.budget is None else f"{self.budget / MiB:.1f} MiB",
                 self.strategy)

    # set-up ---------------------------------------------------------------------------------------
    def min_memory(self, slots: int = 2) -> int:
        """Bytes the ring itself needs with ``slots`` slots of the largest section (plus staging)."""
        return slots * self.plan.slot_bytes + self.plan.staging_bytes

    def _check_cache_fits(self) -> None:
        """An expert cache of an explicit size must fit the budget next to the ring and one sequence."""
        if not self._cache_reserved or self.budget is None:
            return
        if self.strategy == "layer":
            raise ValueError(f"expert_cache={self._cache_request!r} was asked for, but with strategy "
                             f"{self.strategy!r} ({'the whole model is resident' if self.resident else 'whole layers'}"
                             ") no expert is read on its own; drop the expert cache or use strategy 'routed'/'auto'")
        room = self.budget - self.ring_bytes - self._one_sequence_bytes()
        if self._cache_reserved > room:
            raise ValueError(f"an expert cache of {self._cache_reserved / MiB:.2f} MiB does not fit: "
                             f"max_memory={self.budget / MiB:.2f} MiB leaves {max(room, 0) / MiB:.2f} MiB after the "
                             f"ring ({self.ring_bytes / MiB:.2f} MiB) and one sequence; lower --expert-cache (or "
                             "'auto': whatever the budget leaves) or raise --max-memory")

    def _one_sequence_bytes(self, prompt_len: int = 1, new: int = 1) -> int:
        return self._resident_bytes([(1, prompt_len, prompt_len + max(new, 1) - 1, 1)])

    def _choose_slots(self, slots: int | None, S: int) -> tuple[list[int], bool]:
        """Slot sizes, and whether every section has its own slot (resident: each is read once)."""
        plan = self.plan
        self._full_fits, self._rows_fit = True, 0
        resident = [s.nbytes for s in plan.sections]
        if slots is not None and (not isinstance(slots, int) or slots < 2):
            raise ValueError(f"slots must be an integer >= 2 (one computing, one loading), got {slots!r}")
        if self.budget is None:
            if slots is not None and slots < S:
                return [plan.slot_bytes] * slots, False
            return resident, True
        one = self._one_sequence_bytes()
        need2 = self.min_memory(2) + one
        if self.budget < need2 and self._compactable and slots in (None, 2):
            rows = self._max_rows(2, one)
            if rows >= self._top_k:
                self._full_fits, self._rows_fit = False, rows
                return [plan.slot_bytes] * 2, False  # (replaced by compact slots in __init__)
            k = self._top_k
            need_k = 2 * max(sec.nbytes for sec in self._compact(k)) + plan.staging_bytes + one
            raise ValueError(
                f"max_memory={self.budget / MiB:.2f} MiB is too small: the model needs at least {need2 / MiB:.2f} "
                f"MiB for K=2 slots of the largest section ({plan.slot_bytes / MiB:.2f} MiB), or {need_k / MiB:.2f} "
                f"MiB for 2 compact slots of the dense part and {k} experts per MoE layer (routed passes of one "
                f"sequence), plus one sequence's cache and activations; raise --max-memory to at least "
                f"{math.ceil(need_k / MiB)}MB")
        if self.budget < need2:
            raise ValueError(
                f"max_memory={self.budget / MiB:.2f} MiB is too small: the model needs at least "
                f"{need2 / MiB:.2f} MiB for K=2 slots of the largest section ({plan.slot_bytes / MiB:.2f} MiB)"
                + (f" plus a {plan.staging_bytes / MiB:.2f} MiB dtype-cast staging area" if plan.staging_bytes else "")
                + f" plus {one / MiB:.2f} MiB for one sequence's cache and activations; raise --max-memory to at "
                f"least {math.ceil(need2 / MiB)}MB"
                + (" or use fewer --layers-per-section" if self.layers_per_section > 1 else ""))
        if slots is None:
            if plan.total_bytes + plan.staging_bytes <= 0.75 * self.budget:
                return resident, True
            return [plan.slot_bytes] * 2, False
        slots = min(slots, S)
        if slots == S and plan.total_bytes + plan.staging_bytes + one <= self.budget:
            return resident, True
        need = self.min_memory(slots) + one
        if self.budget < need:
            raise ValueError(f"max_memory={self.budget / MiB:.2f} MiB cannot hold K={slots} slots of the largest "
                             f"section ({plan.slot_bytes / MiB:.2f} MiB): that needs {need / MiB:.2f} MiB; use fewer "
                             f"--slots (K=2 needs {need2 / MiB:.2f} MiB) or raise --max-memory")
        return [plan.slot_bytes] * slots, False

    @property
    def _top_k(self) -> int:
        return next(x.top_k for sec in self.plan.sections for x in sec.experts)

    @property
    def _num_experts(self) -> int:
        return next(x.num_experts for sec in self.plan.sections for x in sec.experts)

    def _compact(self, rows: int) -> tuple[Section, ...]:
        """The sections laid out with ``rows`` expert rows per MoE layer (memo)."""
        if rows not in self._layouts:
            self._layouts[rows] = compact_sections(self.plan, rows)
        return self._layouts[rows]

    def _max_rows(self, K: int, one: int) -> int:
        """Expert rows per MoE layer for K compact slots when no whole layer fits: the most whose slots take at most
        3/4 of the budget (the rest for the waves and the caches), at least top-k when those fit next to one sequence
        (0: not even that)."""
        room = self.budget - self.plan.staging_bytes  # type: ignore[operator]
        best = 0
        for rows in range(1, self._num_experts):
            ring = K * max(sec.nbytes for sec in self._compact(rows))
            if ring > 0.75 * room and not (rows <= self._top_k and ring <= room - one):
                break
            best = rows
        return best

    def _layout_rows(self, T: int) -> int | None:
        """The slot layout for a pass over ``T`` tokens: None (whole-layer slots) or the expert rows of compact
        slots, which hold the dense part + min(E, T k) experts per MoE layer (every expert the pass can pick): compact
        when the whole layer does not fit the budget, or when routed loading is chosen for the pass (strategy
        "routed", or "auto" and the cost model of :meth:`_expected_s` prefers it for every MoE section) and fewer than
        E rows suffice. The memory the smaller slots free goes to the expert cache (:meth:`_fit_caches`)."""
        if not self._compactable:
            return None
        E = self._num_experts
        rows = min(E, max(T, 1) * self._top_k)
        if not self._full_fits:  # as many rows as fit (a pass whose routers pick more: the expert cache holds the
            # rest where experts are served in place, else it fails: _routed_layer)
            return min(rows, self._rows_fit)
        if self._ring.in_place:
            # in place, a pass's picks beyond the slot's rows are read into expert cache entries: a prefill runs in
            # the layout of the decode passes after it (one token per sequence), so it does not take the cache's room
            # back for whole-layer or wider slots, when the cache there can hold the extra picks of a layer. "auto":
            # when those decode passes route and routing this pass is expected to read for less time than whole
            # layers (no margin: the whole-layer pass would also evict what the cache then holds no room for)
            Td = self._next_pass_tokens
            decode = min(E, max(Td, 1) * self._top_k)
            if decode < rows and self._cache_entries(decode) >= rows - decode and (
                    self.strategy != "auto" or (self._routes_all(Td, ROUTED_MARGIN) and self._routes_all(T, 1.0))):
                return decode
        if rows >= E:
            return None
        if self.strategy == "auto" and not self._routes_all(T, ROUTED_MARGIN):
            return None
        return rows

    def _routes_all(self, T: int, margin: float) -> bool:
        """Whether the cost model (:meth:`_expected_s`) expects routed loading of every MoE section for a pass over
        ``T`` tokens to take less than ``margin`` times the whole-layer loads."""
        for sec in self.plan.sections:
            if sec.experts:
                t_layer, t_routed = self._expected_s(sec, T)
                if t_routed >= margin * t_layer:
                    return False
        return True

    def _cache_entries(self, rows: int) -> int:
        """Expert cache entries in the compact layout of ``rows`` rows (as :meth:`_fit_caches` would size it)."""
        if self.cache is None:
            return 0
        if self._cache_request != "auto":
            return self._cache_reserved // self.cache.entry_bytes
        ring = self._ring.K * max(sec.nbytes for sec in self._compact(rows)) + self._ring_extra
        room = self.budget - ring - self._wave_need - self._ring.dense_capacity - self._reserve  # type: ignore[operator]
        return max(0, room) // self.cache.entry_bytes

    def _arrange(self, T: int) -> None:
        """At a pass boundary (nothing requested ahead): switch the slot layout if this pass wants another one. Going
        to larger slots, the caches shrink first; going to smaller ones, the expert cache grows after: the budget
        holds the ring, the wave and the caches at every moment."""
        rows = self._layout_rows(T)
        if rows == self._rows or self._pending:
            return
        sections = self.plan.sections if rows is None else self._compact(rows)
        K = self._ring.K
        new = K * max(sec.nbytes for sec in sections) + self._ring_extra
        self._unbind()
        self._bindings.clear()
        self._deferred.clear()
        grow = new > self._ring_now
        self._ring_now = new
        if grow:
            self._fit_caches()
            trim_heap()
        self._ring.set_layout(sections, [(new - self._ring_extra) // K] * K)  # (trims after freeing the old slots)
        self._rows, self._sections = rows, sections
        if not grow:
            self._fit_caches()
        self.stats.layout_switches += 1
        log.debug("slot layout: %s (%.1f MiB per slot)", "whole layers" if rows is None else f"dense + {rows} experts",
                  (new - self._ring_extra) / K / MiB)

    def _resident_bytes(self, groups: Iterable[tuple[int, int, int, int]]) -> int:
        """Memory (on the compute device) of a wave of groups ``(rows, prompt_len, max_len, prefill chunk)``:
        KV caches (when on the compute device; none for groups that make one token), the hidden states of
        every row during the prefill, and the largest single call's activations and logits (a prefill chunk,
        or a whole group's decode step), plus the KV staging area when the caches live elsewhere."""
        cfg, item = self.cfg, self.dtype.itemsize
        groups = list(groups)
        kv_per_pos = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * item
        stage = self._stage_kv
        kv_here = not (stage and self.kv_device != self.device)
        kv = sum(B * L * kv_per_pos for B, P, L, _ in groups if L > P) if kv_here else 0
        # hidden states of every row during the prefill; a routed layer keeps two more per row (attention output and
        # its norm) until the wave's routers have run and the experts are in
        hidden = (1 if self.strategy == "layer" else 3) * sum(B * P * cfg.d_model * item for B, P, _, _ in groups)
        act = 0
        for B, P, L, c in groups:
            prefill = activation_bytes(cfg, c, P, P, item) + 8 * B * cfg.vocab_size
            decode = activation_bytes(cfg, B, 1, L, item) + 8 * B * cfg.vocab_size if L > P else 0
            act = max(act, prefill, decode)
        scratch = 0
        if stage and any(L > P for _, P, L, _ in groups):
            Bmax = max(B for B, P, L, _ in groups if L > P)
            Lmax = max(L for B, P, L, _ in groups if L > P)
            scratch = 2 * Bmax * Lmax * cfg.kv_heads * cfg.dim_per_head * item
        return kv + hidden + act + scratch

    @property
    def _stage_kv(self) -> bool:
        return self._force_kv_staging or self.kv_device != self.device

    @property
    def num_slots(self) -> int:
        return self._ring.K

    def close(self) -> None:
        """Stop the loader thread and close the files."""
        if getattr(self, "_ring", None) is not None:
            self._finalizer()
            self._ring = None  # type: ignore[assignment]

    def __enter__(self) -> RingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # generation -----------------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[Sequence[int]] | torch.Tensor,
                       max_new_tokens: int | Sequence[int]) -> tuple[list[list[int]], list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2 or prompts.is_floating_point():
                raise ValueError(f"prompts tensor must be integer [batch, seq], got {prompts.dtype} "
                                 f"{tuple(prompts.shape)}")
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise TypeError("prompts must be a list of token-id lists or a [batch, seq] tensor")
        out = [[int(t) for t in p] for p in prompts]
        if not out:
            raise ValueError("no prompts given; pass at least one prompt")
        if any(not p for p in out):
            raise ValueError("every prompt needs at least one token")
        V = self.cfg.vocab_size
        bad = [t for p in out for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids must be in [0, {V}), got {bad[:5]}")
        limits = [max_new_tokens] * len(out) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(out) or any(not isinstance(n, int) or n < 0 for n in limits):
            raise ValueError(f"max_new_tokens must be an integer >= 0 or one per prompt, got {max_new_tokens!r}")
        for p, n in zip(out, limits):
            if len(p) + n - 1 > self.cfg.max_seq_len:
                raise ValueError(f"prompt of {len(p)} tokens + {n} new tokens exceeds max_seq_len="
                                 f"{self.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
        return out, limits

    def _plan_waves(self, prompts: list[list[int]], limits: list[int]) -> list[dict[int, tuple[list[int], int]]]:
        """Waves of ``{prompt length: (prompt indices, prefill chunk)}`` that fit the budget: rows are added
        in order, ``batch_size`` at a time (fewer when one prefill call of that many would not fit)."""
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            if limits[i] > 0:
                by_len.setdefault(len(p), []).append(i)
        room = None if self.budget is None else self.budget - self.ring_bytes - self._cache_reserved
        chunk: dict[int, int] = {}
        for P, rows in by_len.items():
            L = P + max(limits[i] for i in rows) - 1
            bs = min(self.batch_size, len(rows))
            if room is not None:
                need = self._resident_bytes([(1, P, L, 1)])
                if need > room:
                    raise ValueError(
                        f"max_memory={self.budget / MiB:.2f} MiB leaves {room / MiB:.2f} MiB after the ring "
                        f"({self.ring_bytes / MiB:.2f} MiB for {self.num_slots} slots); one sequence of {P} prompt "
                        f"tokens needs {need / MiB:.2f} MiB of KV cache and activations: raise --max-memory to at "
                        f"least {math.ceil((self.ring_bytes + need) / MiB)}MB or shorten the prompt")
                while bs > 1 and self._resident_bytes([(bs, P, L, bs)]) > room:
                    bs //= 2
            chunk[P] = bs

        def spec(wave: dict[int, list[int]]) -> list[tuple[int, int, int, int]]:
            return [(len(r), P, P + max(limits[i] for i in r) - 1, min(chunk[P], len(r))) for P, r in wave.items()]

        waves: list[dict[int, list[int]]] = []
        cur: dict[int, list[int]] = {}
        for P, rows in by_len.items():
            for j in range(0, len(rows), chunk[P]):
                trial = {**cur, P: cur.get(P, []) + rows[j:j + chunk[P]]}
                if cur and room is not None and self._resident_bytes(spec(trial)) > room:
                    waves.append(cur)
                    trial = {P: rows[j:j + chunk[P]]}
                cur = trial
        if cur:
            waves.append(cur)
        return [{P: (r, min(chunk[P], len(r))) for P, r in w.items()} for w in waves]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int | Sequence[int], *,
                 eos_id: int | Iterable[int] | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, return_logits: bool = False) -> GenerationResult:
        """Continue every prompt by up to its ``max_new_tokens`` (an int, or one per prompt), stopping at an
        ``eos_id``. ``temperature == 0``: greedy (the default); else nucleus sampling with ``top_p``."""
        if self._ring is None:
            raise ValueError("this RingEngine is closed; make a new one")
        prompts, limits = self._check_prompts(prompts, max_new_tokens)
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        eos = set() if eos_id is None else ({int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id})
        waves = self._plan_waves(prompts, limits)
        before = RingStats(**vars(self.stats))
        results: list[list[int]] = [[] for _ in prompts]
        logits_out: list[list[torch.Tensor]] | None = [[] for _ in prompts] if return_logits else None
        sample = functools.partial(self._sample, results=results, logits_out=logits_out, eos=eos,
                                   temperature=temperature, top_p=top_p, generator=generator)
        S = len(self.plan.sections)
        self._allowed = sum(S * max(limits[i] for rows, _ in w.values() for i in rows) for w in waves)
        self._size_cache(waves, limits)
        t0 = time.perf_counter()
        for wave in waves:
            self._run_wave(prompts, limits, wave, sample)
            self.stats.waves += 1
        self._ring.collect_device_times()  # (CUDA) synchronises: wall_s includes the device's work
        if self.cache is not None:
            self.stats.cache_inserts, self.stats.cache_evictions = self.cache.inserts, self.cache.evictions
        self.stats.wall_s += time.perf_counter() - t0
        self.stats.prompt_tokens += sum(len(p) for p, n in zip(prompts, limits) if n > 0)
        self.stats.new_tokens += sum(len(r) for r in results)
        self._record_memory()
        logits = [torch.stack(x) if x else torch.zeros(0, self.cfg.vocab_size) for x in logits_out] \
            if logits_out is not None else None
        return GenerationResult(results, logits, self.stats.minus(before))

    def _size_cache(self, waves: list[dict[int, tuple[list[int], int]]], limits: list[int]) -> None:
        """What the budget leaves after the ring and the largest wave goes to the dense cache first (up to every
        section's dense part, after an explicit expert cache size, which was reserved when the waves were planned),
        then to the expert cache ("auto")."""
        self._wave_need = max((self._resident_bytes([(len(r), P, P + max(limits[i] for i in r) - 1, c)
                                                     for P, (r, c) in w.items()]) for w in waves), default=0)
        self._fit_caches()

    @property
    def _reserve(self) -> int:
        """Budget bytes kept from the caches for the engine's unnamed memory (:data:`RUNTIME_RESERVE`)."""
        return min(RUNTIME_RESERVE, (self.budget or 0) // 16)

    def _fit_caches(self) -> None:
        """The dense cache gets what the budget leaves after the ring in its largest layout (``ring_bytes``), the
        largest wave and an explicit expert cache (so it stays put when the layout switches); an "auto" expert cache
        gets the rest after the ring in its current layout (with compact slots, what they free), both less the
        runtime reserve (:data:`RUNTIME_RESERVE`)."""
        if self.budget is None or self.resident:
            self._ring.set_dense_capacity(0)
            if self.cache is not None:
                self.cache.resize(self._cache_reserved if self._cache_request != "auto" else 0)
            return
        reserved = self._cache_reserved if self.cache is not None else 0
        room = max(0, self.budget - self.ring_bytes - self._wave_need - reserved - self._reserve)  # type: ignore[operator]
        dense = min(self._dense_total, room) if self.dense_cache else 0
        self._ring.set_dense_capacity(dense)
        if self.cache is None:
            return
        if self._cache_request != "auto":
            self.cache.resize(self._cache_reserved)
            return
        now = max(0, self.budget - self._ring_now - self._wave_need - dense - self._reserve)  # type: ignore[operator]
        self.cache.resize(now)
        log.debug("expert cache: %.1f MiB (%d experts)", self.cache.capacity_bytes / MiB, self.cache.capacity)

    def _record_memory(self) -> None:
        mem = process_memory()
        st = self.stats
        st.peak_rss_mb = max(st.peak_rss_mb, mem.get("peak_rss", 0.0))
        st.peak_anon_mb = max(st.peak_anon_mb, mem.get("anon", 0.0))
        st.peak_file_mb = max(st.peak_file_mb, mem.get("file", 0.0))
        if self.device.type == "cuda":
            st.peak_device_mb = max(st.peak_device_mb, torch.cuda.max_memory_allocated(self.device) / MiB)

    def _new_group(self, prompts: list[list[int]], limits: list[int], rows: list[int], P: int, chunk: int) -> _Group:
        cfg = self.cfg
        B = len(rows)
        max_len = P + max(limits[i] for i in rows) - 1
        shape = (B, cfg.kv_heads, max_len, cfg.dim_per_head)
        pin = self.kv_device.type == "cpu" and self.device.type == "cuda"
        k = v = None
        if max_len > P:  # the prefill's keys/values are needed by later steps
            k = [torch.empty(shape, dtype=self.dtype, device=self.kv_device, pin_memory=pin)
                 for _ in range(cfg.n_layers)]
            v = [torch.empty(shape, dtype=self.dtype, device=self.kv_device, pin_memory=pin)
                 for _ in range(cfg.n_layers)]
        tokens = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
        return _Group(rows=rows, tokens=tokens, limits=[limits[i] for i in rows], chunk=chunk, k=k, v=v,
                      counts=[0] * B, done=[False] * B)

    def _run_wave(self, prompts: list[list[int]], limits: list[int], wave: dict[int, tuple[list[int], int]],
                  sample: Callable[[_Group, torch.Tensor], None]) -> None:
        groups = [self._new_group(prompts, limits, rows, P, chunk) for P, (rows, chunk) in wave.items()]
        self._kv_scratch = None
        if self._stage_kv and any(g.k is not None for g in groups):
            cfg = self.cfg
            bmax = max(len(g.rows) for g in groups if g.k is not None)
            lmax = max(g.k[0].shape[2] for g in groups if g.k is not None)
            shape = (bmax, cfg.kv_heads, lmax, cfg.dim_per_head)
            self._kv_scratch = (torch.empty(shape, dtype=self.dtype, device=self.device),
                                torch.empty(shape, dtype=self.dtype, device=self.device))
        try:
            while True:
                active = [g for g in groups if not g.finished]
                if not active:
                    break
                for g in active:
                    pos = torch.arange(g.start, g.start + g.tokens.shape[1], device=self.device)
                    g.cos, g.sin = rope_cos_sin(pos, self.cfg.dim_per_head, self.cfg.rope_theta)
                self._pass_tokens = sum(len(g.rows) * g.tokens.shape[1] for g in active)
                self._next_pass_tokens = sum(len(g.rows) for g in active)  # a decode step: one token per row
                self._hold = self._compactable
                self._arrange(self._pass_tokens)
                self._left_in_pass = len(self._sections) - len(self._pending)
                for section in self._sections:
                    self._cur_section = section.index
                    ticket, slot, mode = self._acquire(section.index)
                    t0 = time.perf_counter()
                    try:
                        self._bind(self._section_bindings(section, slot))
                        self._compute(section, active, sample, self.model, ticket, mode)
                    finally:
                        self._ring.release(ticket)
                    self.stats.compute_s += time.perf_counter() - t0
                    if self.device.type == "cpu":
                        mem = process_memory()
                        self.stats.peak_anon_mb = max(self.stats.peak_anon_mb, mem.get("anon", 0.0))
                        self.stats.peak_file_mb = max(self.stats.peak_file_mb, mem.get("file", 0.0))
                self.stats.passes += 1
                if self.cache is not None:
                    self.cache.tick()
        finally:
            self._kv_scratch = None
            self._deferred.clear()
            self._predicted.clear()
            self._unbind()

    def _acquire(self, section: int) -> tuple[int, int, str]:
        """Request tickets up to K ahead (never more sections than this call may still compute), each with the
        cost model's mode, and wait for the one of ``section``: (ticket, slot, mode)."""
        ring, S = self._ring, len(self._sections)
        while len(self._pending) < ring.K and len(self._pending) < self._allowed and \
                not (self._hold and self._left_in_pass <= 0):
            self._left_in_pass -= 1
            sec = self._sections[self._next_section]
            mode = self._mode_for(sec)
            t = ring.request(sec.index, mode)
            self._pending.append((t, sec.index, mode))
            for xl, experts, depth in self._deferred.pop(sec.index, []) if mode == "dense" else ():
                self._submit_prediction(t, sec, xl, experts, depth)
            self._next_section = (self._next_section + 1) % S
        ticket, sec, mode = self._pending.popleft()
        assert sec == section, f"ring schedule out of order: got section {sec}, expected {section}"
        self._allowed -= 1
        return ticket, ring.acquire(ticket), mode

    def _mode_for(self, section: Section) -> str:
        """How to load ``section`` this time: "full" (every byte, read ahead under the previous sections' compute)
        or "dense" (the dense part; then only the routed experts). The cost model, per MoE layer of the section,
        for the T tokens of the pass the load serves (the prefill's tokens, or one per sequence when decoding):
        each of the E experts is picked with probability f = 1 - (1 - k/E)^T (independent uniform routing, an
        upper bound for trained routers), so routed loading expects f * (E - c) expert reads from disk and
        f * c copies from the cache (c: the layer's experts in the cache), against E expert reads for the whole
        layer, each at its measured rate (single-expert reads, cache copies, whole-section reads). Routed wins
        when it is expected to take less than ``ROUTED_MARGIN`` (0.5) of the whole-layer time (its misses wait after
        the router, while a whole layer loads ahead under compute). Decisions are kept in ``decisions`` and logged
        (INFO when a section's choice changes, DEBUG each time)."""
        if not section.experts or self.strategy == "layer":
            return "full"
        if self.strategy == "routed":
            return "dense"
        T = self._pass_tokens if section.index >= self._cur_section else self._next_pass_tokens
        t_layer, t_routed = self._expected_s(section, T)
        # (compact slots hold no whole layer; they are chosen for a pass when the rule routes every MoE section, or
        # when no whole layer fits the budget)
        mode = "dense" if t_routed < ROUTED_MARGIN * t_layer or self._rows is not None else "full"
        self.decisions.append((self.stats.passes, section.index, T, mode, t_layer, t_routed))
        level = logging.INFO if self._last_mode.get(section.index) != mode else logging.DEBUG
        log.log(level, "cost model: section %d (%s) for %d tokens: %s (expected whole layer %.2f ms, routed %.2f ms)",
                section.index, ",".join(section.units), T, "routed experts" if mode == "dense" else "whole layer",
                1e3 * t_layer, 1e3 * t_routed)
        self._last_mode[section.index] = mode
        return mode

    def _expected_s(self, section: Section, T: int) -> tuple[float, float]:
        """The cost model's expected load seconds of ``section`` for a pass over ``T`` tokens: (whole layer, routed);
        see :meth:`_mode_for`."""
        ring = self._ring
        bw_layer = ring.bw_section.rate
        bw_expert = ring.bw_expert.rate if ring.bw_expert.measured else bw_layer  # until measured: as a section
        t_layer = t_routed = 0.0
        for xl in section.experts:
            E = xl.num_experts
            f = 1.0 - (1.0 - xl.top_k / E) ** max(T, 1)
            c = self.cache.layer_count(xl.layer) if self.cache is not None else 0
            t_layer += E * xl.disk_bytes / bw_layer
            t_routed += f * ((E - c) * xl.disk_bytes / bw_expert + c * xl.nbytes / ring.bw_cache.rate)
        return t_layer, t_routed

    def _section_bindings(self, section: Section, slot: int) -> list[tuple[dict, str, torch.Tensor]]:
        """(owning module's ``_parameters`` or ``_buffers`` dict, attribute, view of the slot) for every
        parameter and buffer of ``section``, built once per (section, slot)."""
        key = (section.index, slot)
        if key not in self._bindings:
            views = self._ring.views(section, slot)
            layers = {u.split(".")[1] for u in section.units if u.startswith("layer.")}
            views.update({n: b for n, b in self._buffers.items() if n.split(".")[2] in layers})
            self._bindings[key] = [(*self._owner(name), t) for name, t in views.items()]
        return self._bindings[key]

    def _owner(self, name: str) -> tuple[dict, str]:
        """The ``_parameters`` / ``_buffers`` dict of the module that owns ``name`` ("model.a.b.w"), and the
        attribute; the meta tensor found there is remembered (restored by :meth:`_unbind`)."""
        path, _, attr = name.removeprefix("model.").rpartition(".")
        mod = self.model.get_submodule(path)
        table = mod._parameters if attr in mod._parameters else mod._buffers
        if attr not in table:
            raise KeyError(f"{name}: no such parameter or buffer in the model")
        self._meta.setdefault(name, (table, attr, table[attr]))
        return table, attr

    @staticmethod
    def _bind(bindings: list[tuple[dict, str, torch.Tensor]]) -> None:
        """Point the model's parameters and buffers at the slot's views: plain dict stores, no copy (the
        model is built on the meta device; ``torch.func.functional_call`` did the same swap but walked the
        whole module tree twice per call, ~20% of a decode pass)."""
        for table, attr, t in bindings:
            table[attr] = t

    def _unbind(self) -> None:
        """Put the meta tensors back (no slot stays referenced by the model after a wave)."""
        for table, attr, meta in self._meta.values():
            table[attr] = meta

    def _compute(self, section: Section, active: list[_Group], sample: Callable[[_Group, torch.Tensor], None],
                 model: MoETransformer, ticket: int = -1, mode: str = "full") -> None:
        for pos, unit in enumerate(section.units):
            if unit == "embed":
                for g in active:
                    g.x = [model.tok_emb(g.tokens[sl]) for sl in g.chunks()]
            elif unit == "head":
                w = model.lm_head.weight if model.lm_head is not None else model.tok_emb.weight
                for g in active:
                    h_B1D = model.norm(torch.cat([x[:, -1:] for x in g.x]))
                    sample(g, F.linear(h_B1D, w)[:, 0].float())
            else:
                i = int(unit.split(".")[1])
                layer = model.layers[i]
                xl = section.expert_layer(i) if mode == "dense" else None
                t0, w0 = time.perf_counter(), self.stats.wait_s
                if xl is not None:
                    self._routed_layer(layer, i, xl, ticket, active)
                else:
                    if layer.is_moe:
                        self._capture_predictor(i, layer)
                    for g in active:
                        outs = [self._layer(layer, i, g, sl, x) for sl, x in zip(g.chunks(), g.x)]
                        g.x = [out for out, _ in outs]
                        if self.cache is not None and layer.is_moe:  # uses feed the cache's scores
                            used = torch.stack([mo.stats.routed_per_expert for _, mo in outs]).sum(0)
                            self.cache.touch(i, used.nonzero().squeeze(1).tolist())
                if layer.is_moe:  # this layer's compute, without the waits for its experts (the cost rule's W)
                    w = time.perf_counter() - t0 - (self.stats.wait_s - w0)
                    W = self._layer_compute_s
                    self._layer_compute_s = w if W is None else 0.8 * W + 0.2 * w
            if unit != "head":
                self._prefetch_next(section, pos, ticket, mode, active, model)

    def _routed_layer(self, layer: nn.Module, i: int, xl: ExpertLayer, ticket: int, active: list[_Group]) -> None:
        """An MoE layer whose experts are not loaded yet: attention and the router over the whole wave (every
        group, every chunk), then the union of the routed experts is made sure to be in the slot (prefetched,
        cached or read now), then the MoE layer, given the routing computed here (the router runs once). The same
        ops in the same order as ``Block.forward``, so the output is bit-identical."""
        D = self.cfg.d_model
        parts: list[list[tuple[torch.Tensor, torch.Tensor, Any]]] = []
        ids: list[torch.Tensor] = []
        for g in active:
            hyr = []
            for sl, x in zip(g.chunks(), g.x):
                h_BSD = self._layer(layer, i, g, sl, x, attention_only=True)
                y_BSD = layer.ffn_norm(h_BSD)
                routing = layer.moe.router(y_BSD.reshape(-1, D), layer.moe.comm)
                ids.append(routing.expert_A)
                hyr.append((h_BSD, y_BSD, routing))
            parts.append(hyr)
        need = torch.cat(ids).unique().tolist()
        # (more picks than slot rows: in place, the rest go to expert cache entries; else only where no whole layer
        # fits the budget, or the slots hold every pick)
        spare = self.cache.capacity if self.cache is not None and self._ring.in_place else 0
        if len(need) > xl.positions + spare:
            raise ValueError(f"layer {i}: the routers of this pass ({self._pass_tokens} tokens) picked {len(need)} "
                             f"experts, but max_memory={self.budget / MiB:.2f} MiB holds {xl.positions} per slot next "
                             "to the dense part (a whole layer does not fit twice): use fewer or shorter prompts per "
                             f"wave (--batch-size) or raise --max-memory to at least "
                             f"{math.ceil(self.min_memory(2) / MiB + 1)}MB")
        self._capture_predictor(i, layer)
        # in place, the compute starts before the misses are in: the cache hits' groups first, each miss's group once
        # its read is done (expert_ffn_views: any group order gives the same bits); in compact and whole-layer slots
        in_place = self._ring.in_place
        # (the order the compute takes the picks in, which their misses are read in: each MoE call's (group, chunk)
        # in ascending ids, the first call's first)
        order = need if len(ids) == 1 else list(dict.fromkeys(e for t in ids for e in t.unique().tolist()))
        self._ring.ensure_experts(ticket, xl, need, wait=not in_place, order=order)
        self._count_predictions(ticket, i, need)
        # (the uses feed the cache's scores; in whole-layer slots served in place, after the compute: the loader's
        # admission of a miss then weighs the scores before this use, as when the compute waited for every read)
        late_touch = in_place and xl.positions == xl.num_experts
        if self.cache is not None and not late_touch:
            self.cache.touch(i, need)
        if xl.positions < xl.num_experts:  # compact slot: the picked experts are groups 0, 1, ... in id order, so
            # the routing names groups (an order-keeping renumbering: the same sort, the same sums, the same bits)
            lut = torch.zeros(xl.num_experts, dtype=torch.long, device=self.device)
            lut[torch.tensor(need, dtype=torch.long, device=self.device)] = torch.arange(len(need), device=self.device)
            hyr_all = [[(h, y, dataclasses.replace(r, expert_A=lut[r.expert_A])) for h, y, r in hyr] for hyr in parts]
        else:
            hyr_all = parts
        try:
            # in place: group j's weights are views of wherever expert need[j] lies (a cache entry or a slot row), each
            # built when the compute first needs it (waiting for its read if it is a miss); whole-layer slots: group j
            # is expert j (groups without rows are not touched)
            ring = self._ring
            names = need if xl.positions < xl.num_experts else list(range(xl.num_experts))
            with (experts_on_views(layer.moe.experts, self._expert_views(i, xl).lazy(
                    len(names), lambda j: ring.placement(ticket, xl, names[j]),
                    lambda j: ring.placed(ticket, xl, names[j]))) if in_place else contextlib.nullcontext()):
                for g, hyr in zip(active, hyr_all):
                    g.x = [h_BSD + layer.moe(y_BSD, routing=routing).out for h_BSD, y_BSD, routing in hyr]
            if in_place:
                ring.finish_experts(ticket, xl, need)
            if self.cache is not None and late_touch:
                self.cache.touch(i, need)
        finally:
            if in_place:
                self._ring.unpin(ticket)

    def _expert_views(self, i: int, xl: ExpertLayer) -> ExpertViews:
        """How layer ``i``'s experts become per-expert weight views (memo)."""
        if i not in self._views:
            section = next(sec for sec in self.plan.sections if sec.expert_layer(i) is not None)
            self._views[i] = ExpertViews(section, xl, self.dtype)
        return self._views[i]

    def _capture_predictor(self, i: int, layer: nn.Module) -> None:
        """Resident copies of layer ``i``'s ffn norm and router (its parameters cloned out of the slot; buffers are
        resident already), made once, while its section is bound."""
        if self._predictors.get(i, False) is not None:
            return
        shells = self._predictor_shells[i]
        for bound, cp in zip((layer.ffn_norm, layer.moe.router), shells):
            for src, dst in zip(bound.modules(), cp.modules()):
                for name, t in src._parameters.items():
                    if t is not None:
                        dst._parameters[name] = t.detach().clone()
                for name, t in src._buffers.items():
                    if t is not None:
                        dst._buffers[name] = t
        self._predictors[i] = shells

    def _count_predictions(self, ticket: int, i: int, need: list[int]) -> None:
        """Per-depth accuracy of the predictions made for layer ``i`` of ``ticket``."""
        made = self._predicted.pop((ticket, i), None)
        if not made:
            return
        st, picked = self.stats, set(need)
        for depth, experts in made.items():
            hits = len(picked & experts)
            prec = self._precision[depth]
            prec[0] += hits
            prec[1] += len(experts)
            if depth == 1:
                st.predicted_d1_needed += len(picked)
                st.predicted_d1_hits += hits
            else:
                st.predicted_d2_needed += len(picked)
                st.predicted_d2_hits += hits

    def _submit_prediction(self, ticket: int, section: Section, xl: ExpertLayer, experts: list[int],
                           depth: int) -> None:
        self._predicted.setdefault((ticket, xl.layer), {})[depth] = set(experts)
        experts = self._worth_reading(xl, experts, depth)
        if experts:
            self._ring.prefetch_experts(ticket, xl, experts, section)

    def _worth_reading(self, xl: ExpertLayer, experts: list[int], depth: int) -> list[int]:
        """The predicted experts worth loading ahead (``prefetch=True``; all of them with ``"always"``). One in the
        expert cache is a copy: always. One on disk (read time t at the measured single-expert rate) pays when
        p * min(t, d * W) > (1 - p) * t * u: a hit (the depth's measured precision p, the share of named experts the
        router then picks) hides up to d layers of compute (W per MoE layer, measured) of its read; a wasted read
        delays the needed ones by t when the disk is the bottleneck (u = 1: the layer's expected needed reads,
        f(T) (E - c) t, take longer than W) and costs nothing when it would idle (u = 0). So with small experts
        (reads shorter than the compute) every prediction is read, while with experts of several MiB on a disk
        that is busy anyway only accurate predictions are (random routers: about none)."""
        if self.prefetch == "always" or self._layer_compute_s is None:
            return experts
        cached = [e for e in experts if self.cache is not None and (xl.layer, e) in self.cache]
        ring = self._ring
        rate = ring.bw_expert.rate if ring.bw_expert.measured else ring.bw_section.rate
        t, W = xl.disk_bytes / rate, self._layer_compute_s
        hits, named = self._precision[depth]
        p = hits / named
        E = xl.num_experts
        c = self.cache.layer_count(xl.layer) if self.cache is not None else 0
        f = 1.0 - (1.0 - xl.top_k / E) ** max(self._next_pass_tokens, 1)
        u = 1.0 if f * (E - c) * t > W else 0.0
        if p * min(t, depth * W) > (1.0 - p) * t * u:
            return experts
        self.stats.predictions_skipped += len(experts) - len(cached)
        return cached

    def _upcoming(self, section: Section, pos: int, ticket: int, mode: str
                  ) -> list[tuple[int, Section, int | None, str | None]]:
        """The next ``prefetch_depth`` layers after unit ``pos`` of ``section`` in this pass: (layer index, its
        section, its ticket (None: not requested yet), its load mode (None: not chosen yet)). Stops at the head."""
        out: list[tuple[int, Section, int | None, str | None]] = []
        sections = self._sections
        later = [(sections[sec], tk, md) for tk, sec, md in self._pending]
        nxt = self._next_section
        for _ in range(self.prefetch_depth):
            later.append((sections[nxt], None, None))
            nxt = (nxt + 1) % len(sections)
        walk = [(section, ticket, mode, u) for u in section.units[pos + 1:]]
        walk += [(sec, tk, md, u) for sec, tk, md in later for u in sec.units]
        for sec, tk, md, u in walk:
            if not u.startswith("layer.") or len(out) == self.prefetch_depth:
                break
            out.append((int(u.split(".")[1]), sec, tk, md))
        return out

    def _prefetch_next(self, section: Section, pos: int, ticket: int, mode: str, active: list[_Group],
                       model: MoETransformer) -> None:
        """Prediction: the next MoE layers' routers (depth 1: the next layer, depth 2: the one after) applied to this
        unit's output (through each one's ffn norm), on the resident copies of :meth:`_capture_predictor`; their
        experts are loaded ahead into their tickets' slots (a section not requested yet gets them when it is).
        Before a layer's copies exist (the first pass), depth 1 binds the next section's dense part instead (it
        holds the router) and depth 2 is skipped."""
        if not self.prefetch:
            return
        D = self.cfg.d_model
        for depth, (j, sec, tk, md) in enumerate(self._upcoming(section, pos, ticket, mode), start=1):
            xl = sec.expert_layer(j)
            if xl is None or md == "full" or (tk == ticket and md != "dense"):
                continue
            pred = self._predictors.get(j)
            if pred is not None:
                norm, router = pred
            elif depth == 1 and tk is not None:
                if sec is not section:
                    self._ring.wait_loaded(tk)
                    self._bind(self._section_bindings(sec, tk % self._ring.K))
                norm, router = model.layers[j].ffn_norm, model.layers[j].moe.router
            else:
                continue
            comm = model.layers[j].moe.comm
            ids = [router(norm(x).reshape(-1, D), comm).expert_A for g in active for x in g.x]
            experts = torch.cat(ids).unique().tolist()
            if tk is None:
                self._deferred.setdefault(sec.index, []).append((xl, experts, depth))
            else:
                self._submit_prediction(tk, sec, xl, experts, depth)

    def _layer(self, layer: nn.Module, i: int, g: _Group, sl: slice, x_BSD: torch.Tensor,
               attention_only: bool = False) -> Any:
        """Block ``layer`` on rows ``sl`` of group ``g``: (output, MoE output or None); with ``attention_only``
        just ``x + attn(attn_norm(x))`` (``Block.forward``'s first half, the same ops). The KV cache as the
        group holds it (on the compute device, or staged from ``kv_device``)."""
        def run(x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> Any:
            if attention_only:
                return x + layer.attn(layer.attn_norm(x), g.cos, g.sin, kv, start, None)
            return layer(x, g.cos, g.sin, kv, start)

        if g.k is None or g.v is None:  # prefill of sequences that make one token: no cache
            return run(x_BSD, None, 0)
        k, v = g.k[i][sl], g.v[i][sl]  # batch-major: a view of these rows
        if self._kv_scratch is None:
            return run(x_BSD, (k, v), g.start)
        # the cache lives elsewhere (e.g. host memory): stage this layer's keys/values on the compute device
        B, S = x_BSD.shape[:2]
        end = g.start + S
        ks, vs = self._kv_scratch[0][:B, :, :end], self._kv_scratch[1][:B, :, :end]
        if g.start:  # (strided copies: synchronous, so no pinned buffer is reused too early)
            ks[:, :, :g.start].copy_(k[:, :, :g.start])
            vs[:, :, :g.start].copy_(v[:, :, :g.start])
        out = run(x_BSD, (ks, vs), g.start)
        k[:, :, g.start:end].copy_(ks[:, :, g.start:end])
        v[:, :, g.start:end].copy_(vs[:, :, g.start:end])
        return out

    def _sample(self, g: _Group, logits_BV: torch.Tensor, *, results: list[list[int]],
                logits_out: list[list[torch.Tensor]] | None, eos: set[int], temperature: float, top_p: float,
                generator: torch.Generator | None) -> None:
        next_B = sample_next(logits_BV, temperature, top_p, generator)
        for b, tok in enumerate(next_B.tolist()):
            if g.done[b]:
                continue
            row = g.rows[b]
            results[row].append(tok)
            if logits_out is not None:
                logits_out[row].append(logits_BV[b].detach().to("cpu", copy=True))
            g.counts[b] += 1
            g.done[b] = tok in eos or g.counts[b] >= g.limits[b]
        g.start += g.tokens.shape[1]
        g.tokens = next_B[:, None]
        g.x = []


def ring_generate(model: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                  max_memory: str | int | None = None, **kwargs: Any) -> GenerationResult:
    """One-shot: open ``model`` in a :class:`RingEngine` with ``max_memory``, generate, close. Keyword
    arguments go to the engine (slots, layers_per_section, batch_size, device, ...) or to
    :meth:`RingEngine.generate` (eos_id, temperature, top_p, generator, return_logits)."""
    gen_keys = {"eos_id", "temperature", "top_p", "generator", "return_logits"}
    gen_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_keys}
    with RingEngine(model, max_memory=max_memory, **kwargs) as engine:
        return engine.generate(prompts, max_new_tokens, **gen_kwargs)
