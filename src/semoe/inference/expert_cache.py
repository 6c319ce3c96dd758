"""The expert cache: routed experts kept in memory between their uses, in the budget the ring leaves over.

Legend: an *entry* is one expert of one layer, ``(layer, expert)``: its slices of every stacked expert tensor
(w1, w3, w2) laid end to end, in the compute dtype (what :class:`~semoe.inference.sections.ExpertLayer` calls
``slot_ranges``); a *tick* is one pass of the ring (one decode step of a wave).

Policy: **decayed LFU with frequency admission.** Every expert the routers pick gets a score, its use count
decayed by half every ``half_life`` ticks (``score = score * 2**(-dt / half_life) + 1`` at each use), kept for
all experts seen, cached or not. A newly read expert enters the cache when there is a free entry, or when its
score beats the lowest-scored entry's, which is then evicted; otherwise it is not cached (a one-off use does not
push out an expert that keeps coming back). Why: trained routers are skewed (some experts are hot for long
stretches) but the hot set drifts with the text; plain LRU loses the frequency signal, plain LFU never forgets
(colibri's measurements on OLMoE: LRU 68% vs Belady 84% at 24 of 64 experts per layer, shared/notes). With
random (uniform) routers no policy can beat ``cached / E`` per layer, which is what the benchmark's bound uses.

Only the ring's loader thread reads and fills entries (:meth:`get`, :meth:`admit`, :meth:`pin`); the compute thread
records uses (:meth:`touch`), advances the clock (:meth:`tick`) and releases pins (:meth:`unpin`); a lock guards the
bookkeeping. A *pinned* entry is one a routed pass computes from in place (its weights are viewed, not copied into a
slot): it is never evicted until unpinned, so admissions then evict the lowest-scored unpinned entry. Entries are
allocated once, on first use, and reused after evictions (no allocation in the steady state).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

__all__ = ["ExpertCache"]

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """At most ``capacity_bytes // entry_bytes`` experts of ``entry_bytes`` each on ``device``."""

    def __init__(self, entry_bytes: int, capacity_bytes: int = 0, device: torch.device | str = "cpu",
                 half_life: float = 16.0) -> None:
        if entry_bytes <= 0:
            raise ValueError(f"expert entry size must be > 0 bytes, got {entry_bytes}")
        self.entry_bytes, self.device, self.half_life = entry_bytes, torch.device(device), float(half_life)
        self.entries: dict[Key, torch.Tensor] = {}
        self._free: list[torch.Tensor] = []
        self._pins: dict[Key, int] = {}  # entries in use in place (not evictable), with their pin counts
        self._score: dict[Key, tuple[float, int]] = {}  # (score at tick, tick), for every expert seen
        self.clock = 0
        self.capacity = 0
        self.inserts = self.evictions = 0
        self._lock = threading.Lock()
        self.resize(capacity_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.entry_bytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated for entries (in use or free)."""
        return (len(self.entries) + len(self._free)) * self.entry_bytes

    def resize(self, capacity_bytes: int) -> None:
        """Hold at most ``capacity_bytes``: the lowest-scored entries are evicted, spare buffers freed (pinned entries
        stay: the ring resizes between passes, when none is pinned)."""
        with self._lock:
            self.capacity = max(0, int(capacity_bytes) // self.entry_bytes)
            while len(self.entries) > self.capacity and self._evict_lowest():
                pass
            keep = max(0, self.capacity - len(self.entries))
            del self._free[keep:]

    def layer_count(self, layer: int) -> int:
        """Experts of ``layer`` in the cache (the cost model's cache state)."""
        with self._lock:
            return sum(1 for lay, _ in self.entries if lay == layer)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    # compute side -------------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass done: scores age by one tick."""
        self.clock += 1

    def touch(self, layer: int, experts: list[int]) -> None:
        """The routers picked these experts of ``layer`` (one use each)."""
        with self._lock:
            for e in experts:
                key = (layer, e)
                self._score[key] = (self._decayed(key) + 1.0, self.clock)

    # loader side --------------------------------------------------------------------------------
    def get(self, key: Key) -> torch.Tensor | None:
        """The entry of ``key``, or None."""
        return self.entries.get(key)

    def pin(self, key: Key) -> torch.Tensor | None:
        """The entry of ``key``, pinned (not evictable until :meth:`unpin`), or None when it is not cached."""
        with self._lock:
            buf = self.entries.get(key)
            if buf is not None:
                self._pins[key] = self._pins.get(key, 0) + 1
            return buf

    def unpin(self, keys: list[Key]) -> None:
        """Release one pin of each of ``keys``."""
        with self._lock:
            for key in keys:
                n = self._pins.get(key, 0) - 1
                if n > 0:
                    self._pins[key] = n
                else:
                    self._pins.pop(key, None)

    @property
    def pinned(self) -> int:
        """Entries pinned now."""
        return len(self._pins)

    def admit(self, key: Key, force: bool = False, pin: bool = False) -> torch.Tensor | None:
        """A buffer for ``key`` to be filled by the caller when the policy admits it (a free entry, or a score
        above the lowest unpinned entry's, which is evicted), else None; ``force``: evict the lowest unpinned entry
        in any case (a predicted expert about to be used); ``pin``: the new entry is pinned (see :meth:`pin`). Call
        from the loader thread only."""
        with self._lock:
            if key in self.entries or self.capacity == 0:
                return None
            if len(self.entries) >= self.capacity:
                low = self._lowest()
                if low is None or (not force and self._decayed(low) >= self._decayed(key)):
                    return None
                self._evict(low)
            buf = self._free.pop() if self._free else torch.empty(self.entry_bytes, dtype=torch.uint8,
                                                                  device=self.device)
            self.entries[key] = buf
            self.inserts += 1
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            return buf

    def discard(self, key: Key) -> None:
        """Forget an entry whose filling failed."""
        with self._lock:
            if key in self.entries:
                self._free.append(self.entries.pop(key))
                self._pins.pop(key, None)

    # policy ---------------------------------------------------------------------------------------
    def _decayed(self, key: Key) -> float:
        score, at = self._score.get(key, (0.0, self.clock))
        return score * 2.0 ** (-(self.clock - at) / self.half_life)

    def _lowest(self) -> Key | None:
        """The lowest-scored unpinned entry (None: every entry is pinned)."""
        free = [k for k in self.entries if k not in self._pins]
        return min(free, key=self._decayed) if free else None

    def _evict_lowest(self) -> bool:
        low = self._lowest()
        if low is None:
            return False
        self._evict(low)
        return True

    def _evict(self, key: Key) -> None:
        self._free.append(self.entries.pop(key))
        self.evictions += 1
