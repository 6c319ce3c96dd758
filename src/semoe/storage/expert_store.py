"""ExpertStore: the tensors of this rank's experts in tiers (host memory cache over a disk directory).

Legend: L local experts of a layer; a tensor of the store is one stacked ``[L, ...]`` block (one layer's
``w1`` weights, or their gradient, or an AdamW moment), contiguous, so expert ``l`` is the byte range
``[l * s, (l + 1) * s)`` of its file and can be read alone (router-aware fetching).

Tiers. On a CPU device and host are one tier, so there are two: host memory, bounded by ``budget_bytes``
(everything resident counts: in use, cached, being prefetched), and disk (one raw file per tensor under
``root``). On CUDA the host tier is pinned memory and tensors in use are copied to the device on a copy
stream (guarded by ``torch.cuda.is_available()``; not exercised by the CPU tests).

IO (``semoe.storage.tensor_io``, shared with the ring engine). Reads are positional (``os.preadv`` into the
tensor's bytes, no memory map, no O_DIRECT: see that module), followed by ``posix_fadvise(DONTNEED)`` on the
range just read, so the process never maps file pages (its RSS holds
only the host tier) and the page cache does not keep a second copy. Not for the rows this store wrote since its
last :meth:`ExpertStore.flush`: their pages are dirty, which ``DONTNEED`` does not drop (it only starts their
writeback, a disk write per row per step that the kernel would otherwise coalesce over the rewrites of later
steps), so the page cache holds them either way until the kernel has written them; writes are ``os.pwrite`` (they stay
in the page cache until the kernel writes them; :meth:`ExpertStore.flush` syncs). Reads for the prefetch
scheduler run on ``io_threads`` threads; the training thread waits only for what is not there yet
(``stall_s``). Experts known to be all zero (the gradient of an expert no token reached, fresh AdamW
moments) are not stored and cost no IO.

Eviction: least recently used first among tensors nobody holds; a modified (dirty) tensor is written back
first. A request that cannot fit even after evicting everything evictable raises
:class:`StoreBudgetError` naming the minimum budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semoe.storage.tensor_io import PositionalFile, byte_view

log = logging.getLogger(__name__)

STORE_META = "store.json"


class StoreBudgetError(ValueError):
    """The host budget cannot hold the tensors one step needs at once; the message states the minimum."""


class StoreIOError(OSError):
    """The store directory cannot be written (permissions, full disk); the message says which and what to do."""


@dataclass
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Path
    host: torch.Tensor | None = None
    loaded: set[int] = field(default_factory=set)  # experts whose host rows are valid
    zero: set[int] = field(default_factory=set)  # experts known to be all zero (nothing on disk)
    on_disk: set[int] = field(default_factory=set)  # experts whose file rows are valid
    # experts whose file rows this store wrote since its last flush: their pages are dirty in the page cache (or
    # were until the kernel wrote them back); a read does not ``posix_fadvise(DONTNEED)`` them (see the module doc)
    unsynced: set[int] = field(default_factory=set)
    dirty: set[int] = field(default_factory=set)  # loaded experts newer than the file
    pins: int = 0
    last_use: int = 0
    pending: bool = False  # prefetched and not acquired since: other prefetches do not evict it
    writing: Future | None = None  # a write-behind of its host rows in flight (the buffer is not reused until done)
    version: int = 0  # bumped by every modification: a write-behind clears ``dirty`` only if none came meanwhile
    io_phase: str = ""  # the store's phase when its last read was asked for (the IO counters' label)

    @property
    def kind(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0]


@dataclass
class StoreStats:
    """Counters since the last :meth:`ExpertStore.reset_stats`."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    stall_s: float = 0.0
    peak_resident: int = 0
    # bytes by (phase, tensor kind, "read" | "write"); the phase is :attr:`ExpertStore.phase` when the IO was
    # asked for (a prefetch counts in the phase that issued it), the kind the key's suffix ("W", "G", ...)
    by: dict[tuple[str, str, str], int] = field(default_factory=dict)
    stall_by: dict[str, float] = field(default_factory=dict)  # stall_s by phase

    def count(self, phase: str, kind: str, op: str, nbytes: int) -> None:
        k = (phase, kind, op)
        self.by[k] = self.by.get(k, 0) + nbytes

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "stall_s": self.stall_s,
                "peak_resident": self.peak_resident, "by": {"/".join(k): v for k, v in sorted(self.by.items())}}


class ExpertStore:
    """Stacked expert tensors under a host-memory budget, spilled to files in ``root``.

    ``declare`` a tensor (key, shape, dtype; it starts all zero), ``put`` values, ``acquire`` it (some experts
    or all) for use and ``release`` it (``dirty=True`` when modified), ``prefetch`` it ahead of use.
    ``fingerprint``: what the store holds (model config, rank, experts); a directory holding another
    fingerprint is refused and left untouched."""

    def __init__(self, root: str | Path, budget_bytes: int, fingerprint: dict[str, Any] | None = None,
                 io_threads: int = 2) -> None:
        self.root = Path(root)
        self.budget = int(budget_bytes)
        if self.budget <= 0:
            raise ValueError(f"the store's host budget must be > 0 bytes, got {budget_bytes!r}")
        self.fingerprint = fingerprint or {}
        self._open_dir()
        self.entries: dict[str, _Entry] = {}
        self.resident = 0
        self.stats = StoreStats()
        self._clock = 0
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="semoe-store-io")
        # write-behinds on a thread of their own: a read the step waits for never queues behind them
        self._wpool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semoe-store-write")
        self._inflight: dict[str, Future] = {}
        self.pinned = torch.cuda.is_available()  # host tier in pinned memory, for asynchronous copies
        self._files: dict[str, PositionalFile] = {}
        self._spares: list[torch.UntypedStorage] = []  # host memory of dropped tensors, counted in resident
        self._lent: dict[int, int] = {}  # data_ptr -> bytes of buffers lent (counted in resident) until adopted
        self.phase = ""  # what the caller is doing ("forward", "backward", "optimizer"): labels the IO counters

    # ------------------------------------------------------------------ directory
    def _open_dir(self) -> None:
        meta_path = self.root / STORE_META
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.fingerprint:
                raise ValueError(f"{self.root} holds the expert store of another model or rank ({meta_path}: "
                                 f"{old}); nothing was overwritten. Point storage.dir at an empty folder, or "
                                 "delete that one if it is no longer needed")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"0")
            probe.unlink()
            tmp = meta_path.with_name(STORE_META + ".tmp")
            tmp.write_text(json.dumps(self.fingerprint, sort_keys=True))
            os.replace(tmp, meta_path)
        except OSError as e:
            raise StoreIOError(e.errno, f"the expert store directory {self.root} is not writable ({e}); set "
                               "storage.dir to a writable folder with room for the expert state") from e

    # ------------------------------------------------------------------ declaring
    def declare(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """A new tensor of ``shape`` (``[L, ...]``), all zero until written."""
        if key in self.entries:
            raise KeyError(f"{key!r} is declared twice")
        name = key.replace("/", "__")
        e = _Entry(key, tuple(int(s) for s in shape), dtype, self.root / f"{name}.bin")
        e.zero = set(range(e.experts))
        self.entries[key] = e

    def tensor_bytes(self, key: str) -> int:
        return self.entries[key].nbytes

    def put(self, key: str, value: torch.Tensor) -> None:
        """Set the whole tensor (a copy is kept; it goes to disk when evicted)."""
        t = self.acquire(key, experts=[], zero_fill=False)
        t.copy_(value)
        self.release(key, dirty=range(self.entries[key].experts))

    def put_expert(self, key: str, expert: int, value: torch.Tensor) -> None:
        """Set one expert's rows (an :class:`~semoe.training.init.ExpertSink`-style entry point)."""
        t = self.acquire(key, experts=[])
        t[expert].copy_(value)
        self.release(key, dirty=[expert])

    def adopt(self, key: str, value: torch.Tensor, zero: set[int]) -> None:
        """Make ``value`` (contiguous, not used elsewhere) the tensor's contents without a copy; ``zero``:
        experts whose rows are known to be zero (not written to disk)."""
        with self._lock:
            e = self._forget(key)
            if self._lent.pop(value.data_ptr(), None) is None:  # a lent buffer is counted already
                self._reserve(e.nbytes, reuse=False)
                self.resident += e.nbytes
            e.host = value
            e.loaded = set(range(e.experts))
            e.zero = set(zero)
            e.dirty = e.loaded - e.zero
            e.version += 1
            self._touch(e)
            self.stats.peak_resident = max(self.stats.peak_resident, self.resident)

    def lend(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer for a tensor that will be :meth:`adopt`-ed (the experts' weight gradient, which the
        expert op writes into it): a spare buffer of its size where there is one, else new memory, counted in
        the budget from now on, so the adopt reserves nothing and frees no spare (no fresh pages per step).
        Where the budget has no room now (everything is in use), an ordinary uncounted tensor: its adopt
        reserves for it then. A lent buffer that is not adopted goes back with :meth:`give_back`."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            if not self._try_reserve(nbytes):
                return torch.empty(shape, dtype=dtype)
            storage = self._take_spare(nbytes)
            if storage is not None:
                t = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            else:
                t = torch.empty(shape, dtype=dtype, **({"pin_memory": True} if self.pinned else {}))
                self.resident += nbytes
            self._lent[t.data_ptr()] = nbytes
            self.stats.peak_resident = max(self.stats.peak_resident, self.resident)
            return t

    def give_back(self, t: torch.Tensor) -> None:
        """Return a buffer from :meth:`lend` that was not adopted (its contents were added into the stored
        tensor): a spare again if the caller holds no other reference, else its bytes leave the budget."""
        with self._lock:
            nbytes = self._lent.pop(t.data_ptr(), None)
            if nbytes is None:
                return
            # references: the caller's, ``t`` and getrefcount's argument
            if sys.getrefcount(t) <= 3 and self._sole_storage(t, nbytes):
                self._spares.append(t.untyped_storage())
            else:
                self.resident -= nbytes

    def reclaim_lent(self) -> None:
        """Forget lent buffers never adopted nor given back (their owner dropped them): their bytes leave the
        budget's count."""
        with self._lock:
            for nbytes in self._lent.values():
                self.resident -= nbytes
            self._lent.clear()

    def set_zero(self, key: str) -> None:
        """Forget the contents: all zero again (no IO; memory freed)."""
        with self._lock:
            e = self._forget(key)
            e.zero = set(range(e.experts))
            e.on_disk.clear()
            e.unsynced.clear()
            e.version += 1

    def _forget(self, key: str) -> _Entry:
        """``key``'s entry with its host copy dropped (after any read in flight; refused while in use).
        The caller holds the lock."""
        e = self.entries[key]
        self._wait_inflight(key)
        self._wait_writing(e)
        if e.pins:
            raise RuntimeError(f"{key} is in use")
        self._drop(e)
        return e

    # ------------------------------------------------------------------ using
    def acquire(self, key: str, experts: list[int] | range | None = None, zero_fill: bool = True) -> torch.Tensor:
        """The tensor in host memory with (at least) ``experts`` valid (None: all), held until
        :meth:`release`. Rows of other experts are unspecified (a reused buffer holds old bytes there)."""
        t0 = time.perf_counter()
        fut = self._inflight.get(key)
        if fut is not None:
            fut.result()
        with self._lock:
            e = self.entries[key]
            self._ensure_host(e, zero_fill)
            e.pins += 1
            e.pending = False
            e.io_phase = self.phase
            self._touch(e)
            want = [x for x in (range(e.experts) if experts is None else experts) if x not in e.loaded]
        try:
            self._load_rows(e, want)
        except BaseException:
            self.release(key)
            raise
        dt = time.perf_counter() - t0
        self.stats.stall_s += dt
        self.stats.stall_by[self.phase] = self.stats.stall_by.get(self.phase, 0.0) + dt
        return e.host

    def release(self, key: str, dirty: list[int] | range | set[int] | None = None, write_behind: bool = False) -> None:
        """Done with the tensor; ``dirty``: the experts whose rows were modified. ``write_behind``: start
        writing the dirty rows to disk now on an IO thread (the tensor stays cached; a later eviction then
        finds it clean and the step does not wait for that write). A tensor modified again before the write
        is done stays dirty; its buffer is not reused or dropped until the write is done."""
        with self._lock:
            e = self.entries[key]
            if dirty is not None:
                d = set(dirty)
                e.dirty |= d
                e.zero -= d
                e.loaded |= d
                e.version += 1
            e.pins -= 1
            if write_behind and e.writing is None and e.host is not None:
                rows = sorted(x for x in e.dirty if x not in e.zero)
                if rows:
                    e.writing = self._wpool.submit(self._write_job, e, e.host, rows, e.version, self.phase)
            self._freed.notify_all()

    def _write_job(self, e: _Entry, host: torch.Tensor, rows: list[int], version: int, phase: str) -> None:
        ok = False
        try:
            self._write_rows(e, host, rows, phase)
            ok = True
        finally:  # a failed write leaves the rows dirty: the next write-back (eviction, flush) raises its error
            with self._lock:
                if ok:
                    e.on_disk.update(rows)
                    if e.version == version:
                        e.dirty.difference_update(rows)
                e.writing = None
                self._freed.notify_all()

    def _wait_writing(self, e: _Entry) -> None:
        """Wait (the lock released meanwhile) until ``e``'s write-behind, if any, is done; its error is raised."""
        self._wait_unlocked(e.writing)

    def _wait_unlocked(self, fut: Future | None) -> None:
        """Wait for ``fut`` (if any) with the store's lock released meanwhile; its error is raised."""
        if fut is not None:
            self._lock.release()
            try:
                fut.result()
            finally:
                self._lock.acquire()

    def prefetch(self, key: str, experts: list[int] | range | None = None) -> None:
        """Start reading ``experts`` (None: all) of ``key`` on an IO thread, if it fits without evicting
        anything in use or prefetched and not used yet; otherwise do nothing (the later :meth:`acquire` reads
        it). The tensor stays protected from other prefetches' evictions until it is acquired."""
        with self._lock:
            e = self.entries[key]
            if key in self._inflight:
                return
            want = [x for x in (range(e.experts) if experts is None else experts) if x not in e.loaded]
            if e.host is not None and all(x in e.zero for x in want):  # nothing to read: keep it
                e.pending = True
                self._touch(e)
                return
            if e.host is None and not self._try_reserve(e.nbytes, evict_pending=False):
                return
            if e.host is None:
                self._alloc(e, zero_fill=True, reserved=True)
            e.pins += 1
            e.pending = True
            e.io_phase = self.phase
            self._touch(e)
            self._inflight[key] = self._pool.submit(self._prefetch_job, e, want)

    def _prefetch_job(self, e: _Entry, want: list[int]) -> None:
        try:
            self._load_rows(e, want)
        finally:
            with self._lock:
                e.pins -= 1
                self._inflight.pop(e.key, None)
                self._freed.notify_all()

    def _wait_inflight(self, key: str) -> None:
        self._wait_unlocked(self._inflight.get(key))

    # ------------------------------------------------------------------ internals
    def _touch(self, e: _Entry) -> None:
        self._clock += 1
        e.last_use = self._clock

    def _ensure_host(self, e: _Entry, zero_fill: bool) -> None:
        if e.host is None:
            self._reserve(e.nbytes)
            self._alloc(e, zero_fill, reserved=True)

    def _alloc(self, e: _Entry, zero_fill: bool, reserved: bool) -> None:
        """Host memory for ``e`` after a successful reserve: a spare buffer of its size (memory an evicted
        tensor left, already counted in ``resident``: no page faults, no zeroing of the whole block), else
        a new one. ``zero_fill``: the rows of experts known to be zero are zeroed and count as loaded."""
        storage = self._take_spare(e.nbytes)
        if storage is not None:  # a tensor over the storage itself (not a view: no _base keeping another alive)
            e.host = torch.empty(0, dtype=e.dtype).set_(storage, 0, e.shape)
        else:  # not zero-filled: the rows read from disk overwrite theirs, the zero experts' are zeroed below
            kw = {"pin_memory": True} if self.pinned else {}
            e.host = torch.empty(e.shape, dtype=e.dtype, **kw)
            self.resident += e.nbytes
        if zero_fill:
            for x in e.zero:
                e.host[x].zero_()
        e.loaded = set(e.zero) if zero_fill else set()
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident)

    def _take_spare(self, nbytes: int) -> torch.UntypedStorage | None:
        i = next((i for i, b in enumerate(self._spares) if b.nbytes() == nbytes), None)
        return None if i is None else self._spares.pop(i)

    def _try_reserve(self, nbytes: int, evict_pending: bool = True, reuse: bool = True) -> bool:
        """Make room for ``nbytes``, evicting LRU tensors nobody holds; tensors prefetched and not acquired
        yet go last (a demand read may take them: a prefetch that is never used cannot block the step),
        and never for another prefetch (``evict_pending=False``). ``reuse``: a spare buffer of exactly
        ``nbytes`` will serve :meth:`_alloc` (otherwise spares are freed first to make room)."""
        if nbytes > self.budget:
            return False
        while True:
            if reuse and any(b.nbytes() == nbytes for b in self._spares):
                return True
            if self.resident + nbytes <= self.budget:
                return True
            if self._spares:  # free memory nobody uses before evicting a tensor
                i = next((i for i, b in enumerate(self._spares) if b.nbytes() != nbytes), 0)
                self.resident -= self._spares.pop(i).nbytes()
                continue
            if not self._evict_one(pending=False) and not (evict_pending and self._evict_one(pending=True)):
                return False

    def _free_spares(self) -> None:
        while self._spares:
            self.resident -= self._spares.pop().nbytes()

    def _reserve(self, nbytes: int, reuse: bool = True) -> None:
        while not self._try_reserve(nbytes, reuse=reuse):
            held = sum(x.nbytes for x in self.entries.values() if x.host is not None and x.pins)
            if self._inflight:  # a prefetch holds memory for a moment: wait for it
                self._freed.wait(timeout=1.0)
                continue
            if self._lent:  # buffers lent and not adopted yet hold the room: they become ordinary tensors (their
                self.resident -= self._lent.popitem()[1]  # adopt then reserves, as for any gradient not lent)
                continue
            raise StoreBudgetError(
                f"the expert store's host budget ({self.budget / 2**20:.2f} MiB) cannot hold the tensors one step "
                f"needs at once: {(held + nbytes) / 2**20:.2f} MiB in use plus this request. Raise "
                f"storage.budget_mb to at least {self.minimum_hint(held + nbytes) / 2**20:.2f}")

    def minimum_hint(self, need: int) -> int:
        return max(need, getattr(self, "min_budget", 0))

    def _evict_one(self, pending: bool = True) -> bool:
        cands = [x for x in self.entries.values() if x.host is not None and x.pins == 0 and (pending or not x.pending)]
        if not cands:
            return False
        free = [x for x in cands if x.writing is None]
        if not free:  # every candidate is being written: wait for the oldest, then look again
            self._wait_writing(min(cands, key=lambda x: x.last_use))
            return True
        victim = min(free, key=lambda x: x.last_use)
        self._write_back(victim)
        self._drop(victim)
        return True

    def _drop(self, e: _Entry) -> None:
        """Forget ``e``'s host copy; its memory becomes a spare buffer (still counted in ``resident``) when
        nothing else references it (no caller kept the tensor or a view of it), else it is released."""
        if e.host is not None:
            assert e.writing is None, f"{e.key}: dropped while its write-behind is in flight"
            h = e.host
            e.host = None
            # references: ``h`` and getrefcount's argument
            if sys.getrefcount(h) <= 2 and self._sole_storage(h, e.nbytes):
                self._spares.append(h.untyped_storage())
            else:
                self.resident -= e.nbytes
        e.host = None
        e.loaded = set()
        e.dirty = set()
        e.pending = False

    @staticmethod
    def _sole_storage(h: torch.Tensor, nbytes: int) -> bool:
        """``h`` covers its whole storage and no other tensor uses it (the storage's users: ``h`` and
        untyped_storage()'s temporary)."""
        return (torch._C._storage_Use_Count(h.untyped_storage()._cdata) <= 2 and h.is_contiguous()
                and h.storage_offset() == 0 and h.untyped_storage().nbytes() == nbytes)

    def _file(self, e: _Entry) -> PositionalFile:
        with self._lock:
            return self._open_file(e)

    def _open_file(self, e: _Entry) -> PositionalFile:
        f = self._files.get(e.key)
        if f is None:
            try:
                f = PositionalFile(e.path)
            except OSError as err:
                raise StoreIOError(err.errno, f"cannot open {e.path} in the expert store ({err}); set storage.dir "
                                   "to a writable folder") from err
            self._files[e.key] = f
        return f

    def _write_back(self, e: _Entry) -> None:
        """Write ``e``'s dirty rows now (after its write-behind, if one is in flight). The caller holds the lock."""
        self._wait_writing(e)
        rows = sorted(x for x in e.dirty if x not in e.zero)
        if not rows:
            e.dirty = set()
            return
        self._write_rows(e, e.host, rows, self.phase)
        e.on_disk.update(rows)
        e.dirty = set()

    def _write_rows(self, e: _Entry, host: torch.Tensor, rows: list[int], phase: str) -> None:
        f, rb = self._file(e), e.row_bytes
        flat = byte_view(host)
        for x in rows:
            try:
                f.write(x * rb, flat[x * rb:(x + 1) * rb])
            except OSError as err:
                raise StoreIOError(err.errno, f"writing {e.path} failed ({err}): the disk under {self.root} is "
                                   "full or failing; free space or set storage.dir elsewhere (checkpoints already "
                                   "written are untouched)") from err
            with self._lock:  # IO threads count too
                e.unsynced.add(x)
                self.stats.bytes_written += rb
                self.stats.writes += 1
                self.stats.count(phase, e.kind, "write", rb)

    def _load_rows(self, e: _Entry, want: list[int]) -> None:
        assert e.host is not None
        todo = []
        for x in want:
            if x in e.zero:
                e.host[x].zero_()
            elif x in e.on_disk:
                todo.append(x)
            else:
                raise RuntimeError(f"{e.key} expert {x} is neither in memory nor on disk")
            e.loaded.add(x)
        if not todo:
            return
        f, rb = self._file(e), e.row_bytes
        flat = byte_view(e.host)
        for x in todo:
            f.readv(x * rb, [flat[x * rb:(x + 1) * rb]])
            if x not in e.unsynced:  # the bytes are in the host tier now; no second copy in the page cache
                f.drop_cache(x * rb, rb)
            with self._lock:  # IO threads count too
                self.stats.bytes_read += rb
                self.stats.reads += 1
                self.stats.count(e.io_phase, e.kind, "read", rb)

    # ------------------------------------------------------------------ bookkeeping
    def reset_stats(self) -> StoreStats:
        old = self.stats
        self.stats = StoreStats(peak_resident=self.resident)
        return old

    def flush(self) -> None:
        """Write every dirty tensor to disk (they stay cached) and fsync the files."""
        with self._lock:
            for e in self.entries.values():
                self._wait_writing(e)
                if e.host is not None and e.dirty:
                    self._write_back(e)
            for f in self._files.values():
                f.sync()
            for e in self.entries.values():  # on disk now: clean pages, which a read drops again
                e.unsynced.clear()

    def drop_page_cache(self) -> None:
        """Evict the store's files from the kernel page cache (a cold-cache measurement)."""
        self.flush()
        for f in self._files.values():
            f.drop_cache()

    def evict_all(self) -> None:
        """Write back and drop every tensor nobody holds (host tier empty afterwards, if nothing is in use)."""
        with self._lock:
            for e in list(self.entries.values()):
                self._wait_inflight(e.key)
                self._wait_writing(e)
                if e.host is not None and e.pins == 0:
                    self._write_back(e)
                    self._drop(e)
            self._free_spares()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._wpool.shutdown(wait=True)
        for f in self._files.values():
            f.close()
        self._files.clear()

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
