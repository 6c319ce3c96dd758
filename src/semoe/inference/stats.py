"""Counters of the ring engine (:class:`RingStats`), shared by the engine (:mod:`semoe.inference.ring`) and
its loader (:mod:`semoe.inference.loader`), which both import this module (and not each other's)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["RingStats"]


@dataclass
class RingStats:
    """Counters of an engine (cumulative) or of one :meth:`RingEngine.generate` call.

    ``load_s``: time the loader spent reading (and issuing copies); ``wait_s``: time the compute
    waited for the loader; ``compute_s``: time in section compute (host time; on CUDA kernels run
    asynchronously, so there only ``wall_s`` is exact). ``peak_*_mb`` are MiB of this process: peak RSS
    (VmHWM) and the largest RssAnon / RssFile seen at section boundaries. CUDA only, from events:
    ``copy_s`` / ``copy_bytes``, the host-to-device copies' device time and bytes; ``stall_s``, the time
    the compute stream stood waiting for a copy (the part of ``copy_s`` not hidden under compute)."""

    passes: int = 0
    loads: int = 0
    bytes_read: int = 0
    load_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    waves: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    peak_rss_mb: float = 0.0
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0
    peak_device_mb: float = 0.0
    copy_s: float = 0.0
    copy_bytes: int = 0
    stall_s: float = 0.0
    # routed-only loading (see docs/inference.md): MoE-layer loads by strategy, and per expert of a routed layer
    full_layer_loads: int = 0  # MoE layers streamed whole (dense part + every expert)
    layout_switches: int = 0  # slot layout changes (whole layers <-> compact slots for routed passes)
    routed_layer_loads: int = 0  # MoE layers loaded dense part first, then only the routed experts
    experts_needed: int = 0  # (layer, expert) pairs the routers picked in routed layers (union over a wave)
    expert_cache_hits: int = 0  # of those, copied from the expert cache
    expert_prefetch_hits: int = 0  # of those, already loaded or loading from a prediction when the router asked
    expert_misses: int = 0  # of those, read from disk on demand after the router ran
    experts_prefetched: int = 0  # experts loaded on a prediction (next layer's router on this layer's output)
    prefetch_wasted: int = 0  # prefetched experts the router then did not pick
    predictions_skipped: int = 0  # predicted experts not read ahead: the cost rule said the read would not pay
    prediction_yields: int = 0  # on-demand expert jobs served between two pieces of a prediction's reads
    expert_bytes_read: int = 0  # file bytes of single-expert reads (part of bytes_read)
    dense_cache_bytes: int = 0  # dense-part bytes copied from the dense cache instead of read
    # prediction accuracy per depth (1: layer i+1's experts from layer i's output, 2: layer i+2's): the picked
    # experts of the routed layers a depth-d prediction was made for, and how many of them it had predicted
    predicted_d1_needed: int = 0
    predicted_d1_hits: int = 0
    predicted_d2_needed: int = 0
    predicted_d2_hits: int = 0
    cache_inserts: int = 0
    cache_evictions: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """Share of the experts needed in routed layers that came from the expert cache."""
        return self.expert_cache_hits / self.experts_needed if self.experts_needed else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        """Share of the experts needed in routed layers that a prediction had loaded (or started) in time."""
        return self.expert_prefetch_hits / self.experts_needed if self.experts_needed else 0.0

    @property
    def prediction_hit_rate_d1(self) -> float:
        """Share of the picked experts that the depth-1 prediction (the layer before's output) had named."""
        return self.predicted_d1_hits / self.predicted_d1_needed if self.predicted_d1_needed else 0.0

    @property
    def prediction_hit_rate_d2(self) -> float:
        """Share of the picked experts that the depth-2 prediction (two layers before's output) had named."""
        return self.predicted_d2_hits / self.predicted_d2_needed if self.predicted_d2_needed else 0.0

    @property
    def bytes_per_token(self) -> float:
        """File bytes read per generated token."""
        return self.bytes_read / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def h2d_gb_per_s(self) -> float:
        """Host-to-device copy rate (CUDA; 0 elsewhere)."""
        return self.copy_bytes / self.copy_s / 1e9 if self.copy_s > 0 else 0.0

    @property
    def copy_hidden_share(self) -> float:
        """Share of the copies' time hidden under compute (CUDA; 0 elsewhere)."""
        return max(0.0, 1.0 - self.stall_s / self.copy_s) if self.copy_s > 0 else 0.0

    def minus(self, before: RingStats) -> RingStats:
        """The counters accumulated since ``before`` (peaks are kept as they are)."""
        out = RingStats(**vars(self))
        for f in fields(self):
            if not f.name.startswith("peak_"):
                setattr(out, f.name, getattr(self, f.name) - getattr(before, f.name))
        return out
