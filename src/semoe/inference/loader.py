"""The ring's loader: K preallocated slots on the compute device, filled by a loader thread.

Legend: K slots, t a ticket (one request for one section), s a section.

Ticket t is loaded into slot ``t % K`` once ticket ``t - K`` has been released, so the loader fills the
slot of ticket t + K - 1 while ticket t computes (SE-MoE's ring memory). On a CPU-only machine the loader
reads the safetensors files with positional reads (``os.preadv``, no memory map: file pages never enter
the process's resident set) straight into the slot, one system call per run of consecutive file bytes. On
CUDA it reads into one of two pinned host buffers and copies that into the device slot on a copy stream;
per-slot events order the copy after the slot's previous reader and the compute after the copy, and
timing events measure the copies and the compute's waits for them. Used by
:class:`~semoe.inference.ring.RingEngine`.

Routed-only loading (CPU): a ticket may ask for a section's dense part only (``mode="dense"``: attention, norms,
routers, shared experts); the engine then asks for single experts of that ticket, either on demand after the
router ran (:meth:`SlotRing.ensure_experts`, urgent: served first, read in parallel by the reader pool) or on a
prediction (:meth:`SlotRing.prefetch_experts`, served before any later ticket's section load). An expert comes
from the :class:`~semoe.inference.expert_cache.ExpertCache` (a copy) or from disk (its row of each stacked
tensor, read straight into the slot), and a disk read is offered to the cache. Slots start zeroed: rows of
experts that were not loaded hold stale but finite weights of another section, which no token is routed to.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from semoe.inference.expert_cache import ExpertCache
from semoe.inference.sections import ExpertLayer, Read, Region, Section, SectionPlan
from semoe.inference.stats import RingStats
from semoe.storage.safetensors_io import SafetensorsReader
from semoe.storage.tensor_io import PositionalReader, ReadPool, ReadRun, byte_view, coalesce

log = logging.getLogger(__name__)

#: bytes per piece of a prediction's disk reads: an on-demand read waits at most for one piece per reader thread
#: (2 x 2 MiB: ~3 ms at 1.3 GB/s), not for the whole prediction (a 12 MiB expert: ~10 ms)
PREDICTION_PIECE = 2 * 2**20

#: an on-demand expert's reads are spread over the reader threads in pieces of at least this many bytes (below it a
#: second system call costs more than it saves)
SPREAD_MIN = 256 * 2**10

__all__ = ["Bandwidth", "SlotRing", "trim_heap"]


def trim_heap() -> None:
    """Hand freed heap memory back to the kernel: glibc serves blocks below its (self-raising, up to 32 MiB) mmap
    threshold from the heap and keeps them there when freed, so the RSS would not drop after a layout switch or an
    expert cache shrink freed them; a no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Bandwidth:
    """Bytes and seconds of one kind of transfer, measured (cumulative); ``rate`` falls back to ``prior``."""

    prior: float
    nbytes: int = 0
    seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.nbytes += nbytes
        self.seconds += seconds

    @property
    def measured(self) -> bool:
        return self.seconds > 0 and self.nbytes > 2**20

    @property
    def rate(self) -> float:
        """Bytes per second (the prior until more than 1 MiB was measured)."""
        return self.nbytes / self.seconds if self.measured else self.prior


@dataclass
class _Expert:
    """One expert of one ticket: loading state, where it came from, why it was loaded."""

    done: bool = False
    source: str = ""  # "disk" or "cache"
    prefetched: bool = False  # loaded on a prediction
    needed: bool = False  # a router picked it
    in_slot: bool = False  # (compact layout) placed in its row of the slot, or placed in place (``where``)
    #: (compact layout, in place) the byte buffer holding its weights and the (offset, nbytes) of each stacked
    #: region's row in it, in region order: an expert cache entry or a row of the slot
    where: tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None = None


@dataclass
class _Job:
    ticket: int
    section: Section
    layer: ExpertLayer
    experts: list[int]
    #: compact layout: the row of the slot each expert goes to (an on-demand job: every picked expert); None:
    #: row e (whole-layer layout), or, with ``to_cache``, a prediction read into the expert cache only
    positions: list[int] | None = None
    to_cache: bool = False
    #: experts served in place (``SlotRing.in_place``): a cache hit stays in its entry (pinned), a miss is read into
    #: an entry it is admitted to, else into the next free row of the slot (whole-layer layout: its row e); nothing
    #: is copied
    place: bool = False
    #: a prediction (from :meth:`SlotRing.prefetch_experts`): its disk reads give way to on-demand jobs between pieces
    prediction: bool = False


def split_runs(runs: list[ReadRun], limit: int) -> list[ReadRun]:
    """``runs`` cut into runs of at most ``limit`` bytes (the last piece of each shorter), in file order, each naming
    the same :class:`Read` s as the run it comes from (a prediction's reads are read piece by piece, so that an
    on-demand read waits for one piece, not the whole prediction)."""
    out: list[ReadRun] = []
    for run in runs:
        if run.nbytes <= limit:
            out.append(run)
            continue
        cur: ReadRun | None = None
        offset = run.offset
        for view in run.views:
            pos = 0
            while pos < view.nbytes:
                if cur is None or cur.nbytes == limit:
                    cur = ReadRun(run.reader, offset, [], 0, run.tag, run.parts)
                    out.append(cur)
                n = min(view.nbytes - pos, limit - cur.nbytes)
                cur.views.append(view[pos:pos + n])
                cur.nbytes += n
                pos += n
                offset += n
    return out


def _placed(x: _Expert, whole: bool) -> bool:
    """Whether the compute can take expert ``x`` (:meth:`SlotRing.placement`): placed by an on-demand job, or, in
    whole-layer slots, loaded into its row by a prediction (in compact slots a prediction goes to the cache only)."""
    return x.in_slot or (whole and x.done)


def _in_order(experts: list[int], order: list[int] | None) -> list[int]:
    """``experts`` in the compute's ``order`` (None: ascending ids)."""
    if order is None:
        return sorted(experts)
    rank = {e: i for i, e in enumerate(order)}
    return sorted(experts, key=lambda e: rank[e])


def _named(err: BaseException, reads: list[Read]) -> ValueError:
    """A read error that names the file and the tensor(s) it was reading."""
    names = sorted({r.tensor for r in reads if r.tensor})
    what = f"tensor {', '.join(repr(n) for n in names)}" if names else "a tensor"
    msg = f"reading {what} of {reads[0].path} failed: {err}"
    return err.__class__(msg) if isinstance(err, ValueError) else ValueError(msg)


class SlotRing:
    """K slots filled by a loader thread. Ticket t (section ``s``) is loaded into slot ``t % K`` once
    ticket ``t - K`` has been released; the compute acquires tickets in order and releases them in order.
    With ``sizes`` given per slot and K equal to the number of sections, slot i holds section i for good
    (resident mode: each section is read once)."""

    def __init__(self, plan: SectionPlan, device: torch.device, sizes: list[int], stats: RingStats,
                 drop_page_cache: bool, readahead: bool, cache: ExpertCache | None = None,
                 io_threads: int = 1, sections: tuple[Section, ...] | None = None) -> None:
        self.plan, self.device, self.stats = plan, device, stats
        # the slot layout of each section: the plan's (whole layers) or compact ones (set_layout)
        self.sections = sections if sections is not None else plan.sections
        self.K = len(sizes)
        self.drop_page_cache, self.readahead = drop_page_cache, readahead
        self.cuda = device.type == "cuda"
        self.slots = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
        self.cache = cache
        # compact layouts: serve the picked experts in place (no copy of a cache hit into the slot; the compute takes
        # views of each expert's weights where they are: :meth:`placements`); set by the engine
        self.in_place = False
        self._pins: dict[int, list[tuple[int, int]]] = {}  # per ticket: cache entries pinned for its compute
        # the dense cache: each section's dense part (what ``dense_reads`` fill, as it lies in the slot after
        # any cast) kept in memory once read, up to ``dense_capacity`` bytes (set by the engine from the budget),
        # then copied into the slot instead of read again; sections enter in the order they are first read and
        # stay (every pass uses every dense byte)
        self.dense_capacity = 0
        self.dense_cache: dict[int, torch.Tensor] = {}
        self._dense_ranges: dict[int, list[tuple[int, int]]] = {}
        self._dense_lock = threading.Lock()
        # measured rates (bytes/s) for the cost model: whole-section reads, single-expert reads, cache copies
        self.bw_section, self.bw_expert, self.bw_cache = Bandwidth(1e9), Bandwidth(1e9), Bandwidth(8e9)
        self.content = [-1] * self.K  # the section each slot holds (-1: none or being loaded)
        host_max = max(sizes)
        self.staging = torch.empty(plan.staging_bytes, dtype=torch.uint8) if plan.staging_bytes else None
        if self.cuda:  # double-buffered pinned host memory, a copy stream, per-slot events
            self.pinned = [torch.empty(host_max, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.ev_loaded = [torch.cuda.Event() for _ in range(self.K)]
            self.ev_free = [torch.cuda.Event() for _ in range(self.K)]
            self.ev_pinned = [torch.cuda.Event() for _ in range(2)]
            self.pin_next = 0
        # timing events (CUDA): (start, end, bytes) of each copy on the copy stream, and (before, after) the
        # compute stream's wait for a slot; read by collect_device_times() once the work is done
        self._copy_events: list[tuple[Any, Any, int]] = []
        self._stall_events: list[tuple[Any, Any]] = []
        self.readers = {f: SafetensorsReader(f) for f in plan.source.files}
        # single experts are read through their own descriptors, marked random access: no kernel readahead past an
        # expert's bytes (with the page cache dropped, read ahead pages are read from disk for nothing), while the
        # section reads keep theirs
        self.expert_readers: dict[Any, PositionalReader] = {}
        self._programs: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
        # page-cache drops not yet done (reader, offset, nbytes, section): done by whichever thread would
        # otherwise wait (deque append/popleft are atomic), at the latest before the section is read again
        self._drops: deque[tuple[PositionalReader, int, int, int]] = deque()
        self.pool = ReadPool(io_threads)
        self.prediction_piece = PREDICTION_PIECE  # bytes per piece of a prediction's reads
        self._yield_s = 0.0  # seconds the loader spent serving on-demand jobs inside a prediction's reads (cumulative)
        self.cv = threading.Condition()
        self.requests: deque[tuple[int, int, str]] = deque()  # (ticket, section, "full" | "dense")
        self.urgent: deque[_Job] = deque()  # experts a router picked that are not loaded: first
        self.prefetch: deque[_Job] = deque()  # predicted experts, one per job
        self.experts: dict[int, dict[tuple[int, int], _Expert]] = {}  # per ticket: (layer, expert) -> state
        self.busy_ticket: int | None = None  # the ticket whose experts the loader is writing right now
        self.ticket_section: dict[int, int] = {}  # section of each ticket taken up by the loader, until released
        self.done: set[int] = set()
        self.released = -1
        self.next_ticket = 0
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="semoe-ring-loader", daemon=True)
        self.thread.start()

    # compute side ---------------------------------------------------------------------------------
    def request(self, section: int, mode: str = "full") -> int:
        """A ticket for ``section``: all of it (``mode="full"``) or its dense part only (``"dense"``; its experts
        then come one by one through :meth:`ensure_experts` / :meth:`prefetch_experts`)."""
        with self.cv:
            t = self.next_ticket
            self.next_ticket += 1
            self.requests.append((t, section, mode))
            self.cv.notify_all()
            return t

    def wait_loaded(self, ticket: int) -> None:
        """Block until ``ticket``'s section (or dense part) is loaded, without acquiring it."""
        with self.cv:
            while ticket not in self.done and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error

    def ensure_experts(self, ticket: int, layer: ExpertLayer, experts: list[int], wait: bool = True,
                       order: list[int] | None = None) -> None:
        """Block until these experts of ``layer`` are in ``ticket``'s slot: the ones not loaded or loading yet (no
        prediction asked for them) are read now, before anything else. Counts hits and misses. ``wait=False`` (a
        compact layout served in place): only ask; each expert is then waited for by :meth:`placement` and the
        counts are made by :meth:`finish_experts`; in whole-layer slots as well (the experts not loaded yet go to their
        rows, or into expert cache entries, one after the other in ascending ids, each placed once its own reads are
        done, and the hits stay in their entries: :meth:`_place_experts`). ``order``: ``experts`` in the order the
        compute takes them (several MoE calls per layer: each call's picks in ascending ids, the first call's first),
        the order their misses are read in (default: ascending ids)."""
        t0 = time.perf_counter()
        st = self.stats
        if layer.positions < layer.num_experts:
            self._ensure_compact(ticket, layer, experts, wait or not self.in_place, order)
            st.wait_s += time.perf_counter() - t0
            return
        place = self.in_place and not wait
        with self.cv:
            table = self.experts.setdefault(ticket, {})
            new = self._mark_needed(table, layer, experts)
            # predictions of this layer still queued (not started): the picked ones join the on-demand job (one
            # batch through the reader pool), the others are no longer worth reading (this layer's routing is known)
            promoted: list[int] = []
            if self.prefetch:
                keep = deque()
                for j in self.prefetch:
                    if j.ticket == ticket and j.layer.layer == layer.layer:
                        promoted += [e for e in j.experts if table[(layer.layer, e)].needed]
                    else:
                        keep.append(j)
                self.prefetch = keep
            if new or promoted:
                picks = _in_order(new + promoted, order) if place else new + promoted
                self.urgent.append(_Job(ticket, self._section_of(ticket), layer, picks, place=place))
                self.cv.notify_all()
            if not place:
                self._await(table, layer, experts, new, lambda x: x.done)
        st.wait_s += time.perf_counter() - t0

    def _mark_needed(self, table: dict, layer: ExpertLayer, experts: list[int]) -> list[int]:
        """Holding ``cv``: mark ``experts`` picked by a router (a prediction that loaded one counts as a hit); returns
        the ones neither loaded nor loading (no prediction asked for them)."""
        new = []
        for e in experts:
            x = table.get((layer.layer, e))
            if x is None:
                x = table[(layer.layer, e)] = _Expert()
                new.append(e)
            elif x.prefetched and not x.needed:
                self.stats.expert_prefetch_hits += 1
            x.needed = True
        return new

    def _await(self, table: dict, layer: ExpertLayer, experts: list[int], read: list[int],
               ready: Callable[[_Expert], bool]) -> None:
        """Holding ``cv``: wait until ``ready`` holds for each of ``experts`` (:meth:`_wait_until`), then count them:
        needed, cache hits, and misses among ``read`` (those read on demand)."""
        self._wait_until(lambda: all(ready(table[(layer.layer, e)]) for e in experts))
        st = self.stats
        st.experts_needed += len(experts)
        st.expert_cache_hits += sum(table[(layer.layer, e)].source == "cache" for e in experts)
        st.expert_misses += sum(table[(layer.layer, e)].source == "disk" for e in read)

    def _wait_until(self, done: Callable[[], bool]) -> None:
        """Holding ``cv``: wait until ``done()`` (doing a pending page-cache drop rather than only waiting); the
        loader's error, if any, is raised."""
        while self.error is None and not done():
            if self._drops:
                self.cv.release()
                try:
                    self._drop_one()
                finally:
                    self.cv.acquire()
                continue
            self.cv.wait()
        if self.error is not None:
            raise self.error

    def _ensure_compact(self, ticket: int, layer: ExpertLayer, experts: list[int], wait: bool = True,
                        order: list[int] | None = None) -> None:
        """:meth:`ensure_experts` in a compact layout: the picked experts (ascending ids) go to rows 0, 1, ... of the
        slot, each copied from the expert cache (where predictions were read to) or read from disk; one on-demand job
        for all of them (a prediction still being read finishes first: the loader serves one job at a time)."""
        if len(experts) > layer.positions and not self.in_place:
            raise RuntimeError(f"layer {layer.layer}: {len(experts)} experts picked, the slot holds "
                               f"{layer.positions}")  # invariant: the engine sizes slots for the pass's tokens
        with self.cv:
            table = self.experts.setdefault(ticket, {})
            self._mark_needed(table, layer, experts)
            self.prefetch = deque(j for j in self.prefetch if not (j.ticket == ticket and j.layer.layer == layer.layer))
            if self.in_place:
                self.urgent.append(_Job(ticket, self._section_of(ticket), layer, _in_order(experts, order),
                                        place=True))
            else:
                self.urgent.append(_Job(ticket, self._section_of(ticket), layer, list(experts),
                                        positions=list(range(len(experts)))))
            self.cv.notify_all()
            if wait:
                self._await(table, layer, experts, experts, lambda x: x.in_slot)

    def placement(self, ticket: int, layer: ExpertLayer, e: int) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """(in place, after ``ensure_experts(..., wait=False)``) block until expert ``e`` is placed (a cache hit: at
        once; a miss: when its read is done), then where it lies, as :meth:`placements` gives it."""
        t0 = time.perf_counter()
        whole = layer.positions == layer.num_experts
        with self.cv:
            x = self.experts[ticket][(layer.layer, e)]
            self._wait_until(lambda: _placed(x, whole))
            where = x.where
        self.stats.wait_s += time.perf_counter() - t0
        if where is None and whole:  # loaded by a prediction: in its row of the slot
            where = (self.slots[ticket % self.K], layer.slot_ranges[e])
        assert where is not None, f"expert {e} of layer {layer.layer} was not placed"  # invariant
        return where

    def placed(self, ticket: int, layer: ExpertLayer, e: int) -> bool:
        """Whether expert ``e`` of ``layer`` is placed for ``ticket`` now (:meth:`placement` would not wait)."""
        with self.cv:
            return _placed(self.experts[ticket][(layer.layer, e)], layer.positions == layer.num_experts)

    def finish_experts(self, ticket: int, layer: ExpertLayer, experts: list[int]) -> None:
        """(after ``ensure_experts(..., wait=False)`` and the compute) wait for any expert not placed yet and count
        them as :meth:`ensure_experts` does (whole-layer slots: misses among those no prediction asked for)."""
        t0 = time.perf_counter()
        whole = layer.positions == layer.num_experts
        with self.cv:
            table = self.experts[ticket]
            read = [e for e in experts if not table[(layer.layer, e)].prefetched] if whole else experts
            self._await(table, layer, experts, read, lambda x: _placed(x, whole))
        self.stats.wait_s += time.perf_counter() - t0

    def prefetch_experts(self, ticket: int, layer: ExpertLayer, experts: list[int],
                         section: Section | None = None) -> None:
        """Load these experts of ``layer`` into ``ticket``'s slot when the loader has nothing more urgent (a
        prediction: they may not be needed); one job, its disk reads in parallel through the reader pool. The job
        waits until the ticket's dense part is loaded (its slot is free then); jobs of earlier tickets go first.
        ``section``: the ticket's section (needed when the loader has not taken the ticket up yet)."""
        with self.cv:
            table = self.experts.setdefault(ticket, {})
            section = section if section is not None else self._section_of(ticket)
            compact = layer.positions < layer.num_experts
            if compact and self.cache is None:  # a compact slot fills after the router: predictions need the cache
                return
            new = [e for e in experts if (layer.layer, e) not in table
                   and not (compact and (layer.layer, e) in self.cache)]  # type: ignore[operator]
            for e in new:
                table[(layer.layer, e)] = _Expert(prefetched=True)
            if new:
                self.prefetch.append(_Job(ticket, section, layer, new, to_cache=compact, prediction=True))
                self.stats.experts_prefetched += len(new)
            self.cv.notify_all()

    def placements(self, ticket: int, layer: ExpertLayer, experts: list[int]
                   ) -> list[tuple[torch.Tensor, tuple[tuple[int, int], ...]]]:
        """(in place, after :meth:`ensure_experts`) where each of ``experts`` of ``ticket`` lies: (byte buffer,
        (offset, nbytes) of each stacked region's row). Cache entries among them stay pinned until :meth:`unpin`."""
        with self.cv:
            table = self.experts[ticket]
            out = []
            for e in experts:
                where = table[(layer.layer, e)].where
                assert where is not None, f"expert {e} of layer {layer.layer} was not placed"  # invariant
                out.append(where)
            return out

    def unpin(self, ticket: int) -> None:
        """The compute of ``ticket``'s routed layer is done: its cache entries may be evicted again."""
        with self.cv:
            keys = self._pins.pop(ticket, [])
        if keys and self.cache is not None:
            self.cache.unpin(keys)

    def _section_of(self, ticket: int) -> Section:
        return self.sections[self.ticket_section[ticket]]

    def acquire(self, ticket: int) -> int:
        """Block until ``ticket`` is loaded; returns its slot. Re-raises a loader error."""
        t0 = time.perf_counter()
        # the compute thread would only wait: it does pending page-cache drops meanwhile, one at a time
        # (each ~1 ms), so that they are off the loader's path (when the loader is the bottleneck)
        while self._drops and ticket not in self.done and self.error is None:
            self._drop_one()
        with self.cv:
            while ticket not in self.done and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error
        self.stats.wait_s += time.perf_counter() - t0
        slot = ticket % self.K
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)  # done when the compute before this section is done
            stream.wait_event(self.ev_loaded[slot])
            after.record(stream)  # done when, in addition, the section's copy is done
            self._stall_events.append((before, after))
        return slot

    def collect_device_times(self) -> None:
        """Add the device time of the copies and of the compute's waits so far to the stats (CUDA; waits
        for the device). Call when no load is in flight (after a generate call)."""
        if not self.cuda:
            return
        torch.cuda.synchronize(self.device)
        with self.cv:
            copies, self._copy_events = self._copy_events, []
        stalls, self._stall_events = self._stall_events, []
        for start, end, nbytes in copies:
            self.stats.copy_s += start.elapsed_time(end) / 1e3
            self.stats.copy_bytes += nbytes
        for before, after in stalls:
            self.stats.stall_s += before.elapsed_time(after) / 1e3

    def release(self, ticket: int) -> None:
        slot = ticket % self.K
        if self.cuda:
            self.ev_free[slot].record(torch.cuda.current_stream(self.device))
        with self.cv:
            assert ticket == self.released + 1, "tickets are released in order"
            if self.prefetch:  # predictions for this ticket that were not served: dropped
                self.prefetch = deque(j for j in self.prefetch if j.ticket != ticket)
            while self.busy_ticket == ticket and self.error is None:  # the slot is not left half written
                self.cv.wait()
            table = self.experts.pop(ticket, {})
            if self.cache is not None and ticket in self._pins:
                self.cache.unpin(self._pins.pop(ticket))
            self.stats.prefetch_wasted += sum(x.prefetched and not x.needed for x in table.values())
            self.ticket_section.pop(ticket, None)
            self.released = ticket
            self.done.discard(ticket)
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join()
        while self._drop_one():
            pass
        self.pool.close()
        for r in [*self.readers.values(), *self.expert_readers.values()]:
            r.close()
        self.readers.clear()
        self.expert_readers.clear()

    # loader side ----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while True:
            with self.cv:
                while not (self.stopping or self.urgent or self._next_prefetch() is not None or self._ready()
                           or self._drops):
                    self.cv.wait()
                if self.stopping:
                    return
                job: _Job | tuple[int, int, str] | None = None
                pj = self._next_prefetch()
                if self.urgent:  # a router waits for these
                    job = self.urgent.popleft()
                elif pj is not None and (not self._ready() or pj.ticket < self.requests[0][0]):
                    # needed before any later ticket's section; at most one expert per reader thread at a time, so
                    # that an on-demand read (a router waits) never waits behind a long prediction
                    n = max(1, self.pool.threads)
                    if len(pj.experts) > n:
                        job = _Job(pj.ticket, pj.section, pj.layer, pj.experts[:n], to_cache=pj.to_cache,
                                   prediction=True)
                        pj.experts = pj.experts[n:]
                    else:
                        job = pj
                        self.prefetch.remove(pj)
                elif self._ready():
                    job = self.requests.popleft()
                    self.ticket_section[job[0]] = job[1]
                if isinstance(job, _Job):
                    self.busy_ticket = job.ticket
            if job is None:  # idle, with page-cache drops pending: do one, then look again
                self._drop_one()
                continue
            try:
                if isinstance(job, _Job):
                    self._load_experts(job)
                else:
                    self._load(*job)
            except BaseException as e:  # handed to the compute thread, which raises it
                log.debug("ring loader failed on %s", job, exc_info=True)
                with self.cv:
                    self.error = e
                    self.busy_ticket = None
                    self.cv.notify_all()
                return
            with self.cv:
                if isinstance(job, _Job):
                    self.busy_ticket = None
                    self._mark_done(job)
                else:
                    self.done.add(job[0])
                self.cv.notify_all()
                idle = not (self._ready() or self.urgent or self.prefetch)
            if idle and self.readahead and self.K < len(self.plan.sections) and not isinstance(job, _Job):
                self._hint((job[1] + 1) % len(self.plan.sections))

    def _mark_done(self, job: _Job) -> None:
        """Holding ``cv``: the experts of a finished expert job are loaded (and, compact, placed)."""
        table = self.experts.get(job.ticket, {})
        for e in job.experts:
            if (job.layer.layer, e) in table:
                x = table[(job.layer.layer, e)]
                x.done = True
                x.in_slot = x.in_slot or job.positions is not None or job.place

    def _serve_urgent(self, busy: set[tuple[int, int]]) -> None:
        """Called by the loader between two pieces of a prediction's reads: serve the on-demand jobs waiting (a router
        waits for them; the prediction may not even be needed) before the prediction goes on, unless one of them
        needs an expert in ``busy`` (the prediction is writing it: it is finished first, and then used as it is)."""
        while True:
            with self.cv:
                if not self.urgent or self.stopping or self.error is not None:
                    return
                job = self.urgent[0]
                # (more picks than slot rows: some go to forced cache entries, which the prediction's pinned one
                # could leave without room; finished first then, as before)
                if len(job.experts) > job.layer.positions or any((job.layer.layer, e) in busy for e in job.experts):
                    return
                self.urgent.popleft()
                outer, self.busy_ticket = self.busy_ticket, job.ticket
            self.stats.prediction_yields += 1
            t0 = time.perf_counter()
            self._load_experts(job)  # (an error propagates: the prediction's job fails with it)
            self._yield_s += time.perf_counter() - t0  # (not the prediction's time)
            with self.cv:
                self.busy_ticket = outer
                self._mark_done(job)
                self.cv.notify_all()

    def _next_prefetch(self) -> _Job | None:
        """The prediction to serve next (call with ``cv`` held): of those whose ticket is loaded (its slot holds that
        ticket: a prediction two layers ahead may be asked for before), the earliest ticket's oldest."""
        best = None
        for j in self.prefetch:
            if j.ticket in self.done and (best is None or j.ticket < best.ticket):
                best = j
        return best

    def _ready(self) -> bool:
        """Whether the next requested ticket's slot is free (call with ``cv`` held)."""
        return bool(self.requests) and self.requests[0][0] - self.K <= self.released

    def _program(self, section: Section, slot: int, target: torch.Tensor, what: Any = "full",
                 reads: tuple[Read, ...] | None = None, memo: bool = True) -> list[ReadRun | tuple[Any, ...]]:
        """``reads`` (default: all of ``section``'s) into ``target``: :class:`~semoe.storage.tensor_io.ReadRun` s
        of consecutive file bytes (each one ``preadv``, tagged with their :class:`Read` s), or ("cast", reader,
        offset, nbytes, src dtype, typed destination, staging view, read) through the staging area. The byte views
        are built here, once per (section, slot, ``what``): the loader's steady state then runs one system call
        per run and no torch code."""
        key = (section.index, slot, what)
        if memo and key in self._programs:
            return self._programs[key]
        dtype = self.plan.dtype
        regions = {r.key: r for r in section.regions}
        prog: list[ReadRun | tuple[Any, ...]] = []
        direct: list[tuple[PositionalReader, int, memoryview, Any]] = []
        readers = self.readers if not (what is None or (isinstance(what, tuple) and what[0] == "expert")) \
            else self._expert_readers()
        for rd in section.reads if reads is None else reads:
            reg = regions[rd.region]
            start = reg.byte_offset + rd.elem_offset * dtype.itemsize
            if rd.src_dtype == dtype:
                direct.append((readers[rd.path], rd.offset, byte_view(target[start:start + rd.nbytes]), rd))
                continue
            prog.extend(coalesce(direct))
            direct = []
            assert self.staging is not None
            typed = target[start:start + rd.numel * dtype.itemsize].view(dtype)
            step = self.staging.numel() // rd.src_dtype.itemsize  # elements per piece through the staging area
            for lo in range(0, rd.numel, step):
                n = min(step, rd.numel - lo) * rd.src_dtype.itemsize
                raw = self.staging[:n]
                prog.append(("cast", readers[rd.path], rd.offset + lo * rd.src_dtype.itemsize, n, rd.src_dtype,
                             typed[lo:lo + step], (raw, byte_view(raw)), rd))
        prog.extend(coalesce(direct))
        if memo:
            self._programs[key] = prog
        return prog

    def _expert_readers(self) -> dict[Any, PositionalReader]:
        if not self.expert_readers:
            for f in self.plan.source.files:
                r = self.expert_readers[f] = PositionalReader(f)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(r.fd, 0, 0, os.POSIX_FADV_RANDOM)
        return self.expert_readers

    def _run_program(self, prog: list[ReadRun | tuple[Any, ...]], section: Section, parallel: bool = False,
                     yield_for: set[tuple[int, int]] | None = None) -> int:
        """Run a program; with ``parallel`` its direct runs go through the reader pool at once (casts share the
        staging area, so they run one after the other here). ``yield_for`` (a prediction's experts being written):
        the runs are read in pieces of at most ``prediction_piece`` bytes, one per reader thread at a time, and the
        on-demand jobs that arrive meanwhile are served between them (:meth:`_serve_urgent`). Errors name the file
        and the tensor."""
        n = 0
        runs = [op for op in prog if isinstance(op, ReadRun)]
        if parallel and yield_for is not None:
            runs = split_runs(runs, self.prediction_piece)
        if parallel and runs and self.pool.threads > 1:  # (pool.run reads a single run in this thread)
            step = self.pool.threads if yield_for is not None else len(runs)
            for i in range(0, len(runs), step):
                try:
                    n += self.pool.run(runs[i:i + step])
                except (OSError, ValueError) as e:
                    raise _named(e, [r for run in runs[i:i + step] for r in run.parts]) from e
                if yield_for is not None and i + step < len(runs):  # (its errors name their own reads)
                    self._serve_urgent(yield_for)
            prog = [op for op in prog if not isinstance(op, ReadRun)]
            if self.drop_page_cache:
                self._drops.extend((op.reader, op.offset, op.nbytes, section.index) for op in runs)
        for op in prog:
            try:
                if isinstance(op, ReadRun):
                    n += op.read()
                    reader, offset, nbytes = op.reader, op.offset, op.nbytes
                else:
                    _, reader, offset, nbytes, src_dtype, typed, (raw, raw_view), _ = op
                    n += reader.readv(offset, [raw_view])
                    typed.copy_(raw.view(src_dtype))
            except (OSError, ValueError) as e:
                raise _named(e, op.parts if isinstance(op, ReadRun) else [op[-1]]) from e
            if self.drop_page_cache:
                self._drops.append((reader, offset, nbytes, section.index))
        return n

    def _read_section(self, section: Section, slot: int, target: torch.Tensor, mode: str = "full") -> int:
        if mode == "full" and section.experts:
            return self._run_program(self._program(section, slot, target), section)
        with self._dense_lock:
            hit = self.dense_cache.get(section.index) if self.dense_capacity else None
        ranges = self.dense_slot_ranges(section)
        if hit is not None:  # a copy from memory instead of a read
            pos = 0
            for off, n in ranges:
                target[off:off + n].copy_(hit[pos:pos + n])
                pos += n
            self.stats.dense_cache_bytes += pos
            return 0
        reads = section.reads if mode == "full" else section.dense_reads
        n = self._run_program(self._program(section, slot, target, mode, reads), section)
        size = sum(m for _, m in ranges)
        with self._dense_lock:
            if self.dense_capacity and self.dense_bytes + size <= self.dense_capacity:
                buf, pos = torch.empty(size, dtype=torch.uint8, device=self.device), 0
                for off, m in ranges:
                    buf[pos:pos + m].copy_(target[off:off + m])
                    pos += m
                self.dense_cache[section.index] = buf
        return n

    def dense_slot_ranges(self, section: Section) -> list[tuple[int, int]]:
        """(slot byte offset, bytes) of ``section``'s dense part in its slot (in the compute dtype), adjacent
        ranges merged."""
        out = self._dense_ranges.get(section.index)
        if out is None:
            regions = {r.key: r for r in section.regions}
            item = self.plan.dtype.itemsize
            out = []
            for off, n in sorted((regions[rd.region].byte_offset + rd.elem_offset * item, rd.numel * item)
                                 for rd in section.dense_reads):
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((off, n))
            self._dense_ranges[section.index] = out
        return out

    @property
    def dense_bytes(self) -> int:
        """Bytes the dense cache holds."""
        return sum(b.numel() for b in self.dense_cache.values())

    def set_dense_capacity(self, nbytes: int) -> None:
        """Let the dense cache hold up to ``nbytes`` (entries beyond it are dropped, the last sections first)."""
        with self._dense_lock:
            self.dense_capacity = max(0, int(nbytes))
            while self.dense_cache and self.dense_bytes > self.dense_capacity:
                self.dense_cache.pop(max(self.dense_cache))

    def _load_experts(self, job: _Job) -> None:
        """Experts of one ticket into its slot: from the cache (a copy) or from disk (then offered to the cache)."""
        t0 = time.perf_counter()
        if job.to_cache:
            return self._read_into_cache(job)
        if job.place:
            return self._place_experts(job)
        slot, xl, section = job.ticket % self.K, job.layer, job.section
        target = self.slots[slot]
        table = self.experts.get(job.ticket, {})
        rows = job.positions if job.positions is not None else job.experts  # the slot row of each expert
        disk: list[tuple[int, int]] = []
        copied = 0
        for e, p in zip(job.experts, rows):
            buf = self.cache.get((xl.layer, e)) if self.cache is not None else None
            if buf is None:
                disk.append((e, p))
                continue
            pos = 0
            for off, n in xl.slot_ranges[p]:
                target[off:off + n].copy_(buf[pos:pos + n])
                pos += n
            copied += pos
            table[(xl.layer, e)].source = "cache"
        t1 = time.perf_counter()
        if copied:
            self.bw_cache.add(copied, t1 - t0)
        if not disk:
            return
        self._drop_pending_reads()
        y0 = self._yield_s
        prog = [op for e, p in disk
                for op in self._program(section, slot, target, ("expert", xl.layer, e, p), xl.reads_at(e, p))]
        n = self._run_program(prog, section, parallel=True,
                              yield_for={(xl.layer, e) for e, _ in disk} if job.prediction else None)
        t2 = time.perf_counter()
        self.bw_expert.add(n, t2 - t1 - (self._yield_s - y0))
        for e, p in disk:
            table[(xl.layer, e)].source = "disk"
            buf = self.cache.admit((xl.layer, e)) if self.cache is not None else None
            if buf is not None:
                pos = 0
                for off, m in xl.slot_ranges[p]:
                    buf[pos:pos + m].copy_(target[off:off + m])
                    pos += m
        self._count_expert_read(n, t0, y0)

    def _place_experts(self, job: _Job) -> None:
        """The picked experts of a compact layout, in place: a cached one stays in its entry (pinned for the
        ticket's compute), one on disk is read into a cache entry when the policy admits it (pinned), else into the
        next free row of the slot. No copies: the compute takes views where they lie (:meth:`placements`).

        Whole-layer slots (``positions == num_experts``): the same, except that a miss the cache does not admit is
        read into its own row ``e`` of the slot, and the misses are read one whole expert per reader thread, as many
        at a time as there are threads, each group placed when its reads are done (on the 2-core EPYC two whole
        experts at once read at 1.01-1.14 GB/s, one spread over both threads at 0.82-0.94: at T k >= E the pass is
        bound by these reads, not by the compute that one-at-a-time placement would start earlier).

        The hits are marked placed at once; the misses are read one after the other in the order of ``job.experts``
        (ascending ids: the order the compute takes the groups not ready), each spread over the reader threads
        (:meth:`_spread`), and each is marked placed as soon as its own reads are done, so the compute of its group
        starts while the later misses are read. A failed read leaves the experts not read yet unplaced (their cache
        entries discarded) and raises; the compute waiting for one of them gets the error (:meth:`placement`)."""
        t0 = time.perf_counter()
        slot, xl, section = job.ticket % self.K, job.layer, job.section
        target = self.slots[slot]
        table = self.experts.get(job.ticket, {})
        cache, pins = self.cache, self._pins.setdefault(job.ticket, [])
        sizes = [per * self.plan.dtype.itemsize for _, per in xl.row_numel]
        entry_ranges = tuple(zip(itertools.accumulate([0, *sizes[:-1]]), sizes))
        misses: list[tuple[tuple[int, int], list[ReadRun | tuple[Any, ...]]]] = []  # (key, its reads), in order
        admitted: set[tuple[int, int]] = set()
        whole = xl.positions == xl.num_experts
        row = 0
        for e in job.experts:
            key = (xl.layer, e)
            x = table[key]
            buf = cache.pin(key) if cache is not None else None
            if buf is not None:
                pins.append(key)
                x.source, x.where = "cache", (buf, entry_ranges)
                continue
            buf = cache.admit(key, pin=True) if cache is not None else None
            if buf is None and not whole and row == xl.positions and cache is not None:  # more picks than rows:
                buf = cache.admit(key, force=True, pin=True)  # into the cache
            if buf is not None:
                pins.append(key)
                admitted.add(key)
                misses.append((key, self._entry_program(xl, section, e, buf)))
                x.where = (buf, entry_ranges)
            elif whole or row < xl.positions:
                r = e if whole else row  # (whole layers: expert e's own row)
                misses.append((key, self._program(section, slot, target, ("expert", xl.layer, e, r),
                                                  xl.reads_at(e, r))))
                x.where = (target, xl.slot_ranges[r])
                row += not whole
            else:  # invariant: the engine checks that the slot and the cache hold every pick
                raise RuntimeError(f"layer {xl.layer}: no room for expert {e}: {xl.positions} slot rows and "
                                   f"{cache.capacity if cache is not None else 0} cache entries, all in use")
            x.source = "disk"
        with self.cv:  # the hits can be computed from while the misses are read
            for e in job.experts:
                x = table[(xl.layer, e)]
                if x.source == "cache":
                    x.in_slot = True
            self.cv.notify_all()
        if not misses:
            return
        self._drop_pending_reads()
        t1 = time.perf_counter()
        n, placed = 0, 0
        # whole-layer slots: one whole expert per reader thread at a time (as many in flight as threads: this disk
        # reads two whole experts at once faster than one spread over both), each group placed when it is in
        step = self.pool.threads if whole else 1
        try:
            for i in range(0, len(misses), step):
                group = misses[i:i + step]
                prog = [op for _, p in group for op in p] if whole else self._spread(group[0][1])
                n += self._run_program(prog, section, parallel=True)
                with self.cv:  # these misses can be computed from while the next ones are read
                    for key, _ in group:
                        table[key].in_slot = True
                    self.cv.notify_all()
                placed += len(group)
        except BaseException:
            for key, _ in misses[placed:]:
                if key in admitted:
                    cache.discard(key)  # type: ignore[union-attr]
            raise
        self.bw_expert.add(n, time.perf_counter() - t1)
        self._count_expert_read(n, t0)

    def _spread(self, prog: list[ReadRun | tuple[Any, ...]]) -> list[ReadRun | tuple[Any, ...]]:
        """One expert's reads with its runs cut into about one piece per reader thread (page-aligned sizes), so that
        the threads read it together and it is in before the next one is started (the pool reads a program's runs
        at once)."""
        threads = self.pool.threads
        runs = [op for op in prog if isinstance(op, ReadRun)]
        total = sum(r.nbytes for r in runs)
        if threads <= 1 or total < 2 * SPREAD_MIN:
            return prog
        piece = max(SPREAD_MIN, -(-total // threads))
        piece = -(-piece // 4096) * 4096
        return [*split_runs(runs, piece), *(op for op in prog if not isinstance(op, ReadRun))]

    def _count_expert_read(self, n: int, t0: float, y0: float | None = None) -> None:
        """``n`` expert bytes read from disk by a job that began at ``t0`` (``y0``: ``_yield_s`` then, for a prediction:
        the on-demand jobs it served meanwhile count their own time)."""
        st = self.stats
        st.bytes_read += n
        st.expert_bytes_read += n
        st.load_s += time.perf_counter() - t0 - (self._yield_s - y0 if y0 is not None else 0.0)

    def _read_into_cache(self, job: _Job) -> None:
        """A prediction in a compact layout: each expert not cached yet is read from disk straight into an expert
        cache entry (admitted over the lowest-scored entry: it is about to be used), to be copied into the slot once
        a router picks it."""
        t0, y0 = time.perf_counter(), self._yield_s
        xl, section = job.layer, job.section
        assert self.cache is not None
        table = self.experts.get(job.ticket, {})
        n = 0
        for e in job.experts:
            key = (xl.layer, e)
            # (pinned while it is written: an on-demand job served between its pieces must not evict it)
            buf = self.cache.admit(key, force=True, pin=True) if key not in self.cache else None
            if buf is None:
                continue
            try:
                n += self._run_program(self._entry_program(xl, section, e, buf), section, parallel=True,
                                       yield_for={key})
            except BaseException:
                self.cache.discard(key)
                raise
            self.cache.unpin([key])
            if key in table:
                table[key].source = "disk"
        if n:
            self.bw_expert.add(n, time.perf_counter() - t0 - (self._yield_s - y0))
            self._count_expert_read(n, t0, y0)

    def _entry_program(self, xl: ExpertLayer, section: Section, e: int, buf: torch.Tensor
                       ) -> list[ReadRun | tuple[Any, ...]]:
        """Expert ``e``'s reads into a cache entry (its rows of the stacked regions end to end, as ``slot_ranges``
        lays them out); built per call (an entry's buffer changes with evictions)."""
        shapes = {r.key: r.shape for r in section.regions}
        regions, pos = [], 0
        for key, per in xl.row_numel:
            regions.append(Region(key, (1, *shapes[key][1:]), pos, per * self.plan.dtype.itemsize))
            pos += per * self.plan.dtype.itemsize
        entry = Section(-1, (), tuple(regions), (), xl.reads_at(e, 0), pos)
        return self._program(entry, -1, buf, None, None, memo=False)

    def set_layout(self, sections: tuple[Section, ...], sizes: list[int]) -> None:
        """Lay the slots out anew (whole layers, or compact ones for routed passes): the old slots are freed before the
        new ones are allocated. Only between passes, with no ticket outstanding and the loader idle."""
        with self.cv:
            assert not self.requests and self.released == self.next_ticket - 1 and not self.urgent \
                and self.busy_ticket is None, "set_layout needs an idle ring"
            self.prefetch.clear()
            self._programs.clear()  # (their byte views hold the old slots: dropped before the new ones exist)
            self._dense_ranges.clear()
            self.slots = []
            trim_heap()
            with torch.inference_mode(False):  # (called from generate: the loader thread writes these)
                self.slots = [torch.zeros(n, dtype=torch.uint8, device=self.device) for n in sizes]
            self.sections = sections
            self.content = [-1] * self.K

    def _drop_one(self) -> bool:
        """Drop the page-cache pages of the oldest read still pending; False when none is."""
        try:
            reader, offset, nbytes, _ = self._drops.popleft()
        except IndexError:
            return False
        if reader.fd >= 0:
            reader.drop_cache(offset, nbytes)
        return True

    def _drop_pending_reads(self) -> None:
        """At most a few hundred page-cache drops stay pending (each section's are done before it is read again)."""
        while len(self._drops) > 256:
            self._drop_one()

    def _drop_pending(self, section_idx: int) -> None:
        """Before ``section_idx`` is read again: its pages of the last read must be gone (each read from
        disk, the cache kept cold), and at most K sections' drops stay pending."""
        while len(self._drops) > self.K or any(d[3] == section_idx for d in list(self._drops)):
            self._drop_one()

    def _load(self, ticket: int, section_idx: int, mode: str = "full") -> None:
        slot = ticket % self.K
        if self.content[slot] == section_idx:  # still there, all of it (resident mode)
            return
        t0 = time.perf_counter()
        section = self.sections[section_idx]
        self._drop_pending(section_idx)
        self.content[slot] = -1
        if not self.cuda:
            n = self._read_section(section, slot, self.slots[slot], mode)
            if mode == "full" and n:
                self.bw_section.add(n, time.perf_counter() - t0)
        else:
            assert mode == "full", "routed-only loading runs on a CPU device"
            p = self.pin_next
            self.pin_next ^= 1
            self.ev_pinned[p].synchronize()  # the previous copy out of this pinned buffer is done
            n = self._read_section(section, -1 - p, self.pinned[p])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.ev_free[slot])  # the slot's previous section is computed
                start.record(self.copy_stream)
                self.slots[slot][:section.nbytes].copy_(self.pinned[p][:section.nbytes], non_blocking=True)
                end.record(self.copy_stream)
                self.ev_loaded[slot].record(self.copy_stream)
                self.ev_pinned[p].record(self.copy_stream)
            with self.cv:
                self._copy_events.append((start, end, section.nbytes))
        self.content[slot] = section_idx if mode == "full" else -1
        if mode == "full":
            self.stats.full_layer_loads += len(section.experts)
        else:
            self.stats.routed_layer_loads += len(section.experts)
        self.stats.loads += 1
        self.stats.bytes_read += n
        self.stats.load_s += time.perf_counter() - t0

    def _hint(self, section_idx: int) -> None:
        """Start the kernel's read-ahead of a section that will be loaded next (fills the page cache only)."""
        runs: list[list[Any]] = []  # [path, start, end] of each run of consecutive bytes (a section's
        # tensors may lie far apart, e.g. lm_head first and the final norm last in an HF file: one range
        # from the lowest to the highest offset would hint the whole file)
        for rd in sorted(self.sections[section_idx].reads, key=lambda r: (str(r.path), r.offset)):
            if runs and runs[-1][0] == rd.path and runs[-1][2] == rd.offset:
                runs[-1][2] += rd.nbytes
            else:
                runs.append([rd.path, rd.offset, rd.offset + rd.nbytes])
        for path, lo, hi in runs:
            self.readers[path].will_need(lo, hi - lo)

    def views(self, section: Section, slot: int) -> dict[str, torch.Tensor]:
        """Parameter name -> view of the slot (names prefixed "model." for the runner)."""
        buf, dtype = self.slots[slot], self.plan.dtype
        regions = {r.key: buf[r.byte_offset:r.byte_offset + r.nbytes].view(dtype).view(r.shape)
                   for r in section.regions}
        return {f"model.{v.param}": v.apply(regions[v.region]) for v in section.views}
