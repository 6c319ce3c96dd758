"""Counters of the ring engine (:class:`RingStats`), shared by the engine (:mod:`semoe.inference.ring`) and
its loader (:mod:`semoe.inference.loader`), which both import this module (and not each other's)."""

from __future__ import annotations

from dataclasses import dataclass

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
        for name in ("passes", "loads", "bytes_read", "load_s", "wait_s", "compute_s", "wall_s", "waves",
                     "prompt_tokens", "new_tokens", "copy_s", "copy_bytes", "stall_s"):
            setattr(out, name, getattr(self, name) - getattr(before, name))
        return out
