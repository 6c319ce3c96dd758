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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from semoe.inference.sections import Section, SectionPlan
from semoe.inference.stats import RingStats
from semoe.storage.safetensors_io import SafetensorsReader
from semoe.storage.tensor_io import PositionalReader, ReadPool, ReadRun, byte_view, coalesce

log = logging.getLogger(__name__)

__all__ = ["SlotRing"]


class SlotRing:
    """K slots filled by a loader thread. Ticket t (section ``s``) is loaded into slot ``t % K`` once
    ticket ``t - K`` has been released; the compute acquires tickets in order and releases them in order.
    With ``sizes`` given per slot and K equal to the number of sections, slot i holds section i for good
    (resident mode: each section is read once)."""

    def __init__(self, plan: SectionPlan, device: torch.device, sizes: list[int], stats: RingStats,
                 drop_page_cache: bool, readahead: bool) -> None:
        self.plan, self.device, self.stats = plan, device, stats
        self.K = len(sizes)
        self.drop_page_cache, self.readahead = drop_page_cache, readahead
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
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
        self._programs: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
        # page-cache drops not yet done (reader, offset, nbytes, section): done by whichever thread would
        # otherwise wait (deque append/popleft are atomic), at the latest before the section is read again
        self._drops: deque[tuple[PositionalReader, int, int, int]] = deque()
        self.pool = ReadPool(1)
        self.cv = threading.Condition()
        self.requests: deque[tuple[int, int]] = deque()
        self.done: set[int] = set()
        self.released = -1
        self.next_ticket = 0
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="semoe-ring-loader", daemon=True)
        self.thread.start()

    # compute side ---------------------------------------------------------------------------------
    def request(self, section: int) -> int:
        with self.cv:
            t = self.next_ticket
            self.next_ticket += 1
            self.requests.append((t, section))
            self.cv.notify_all()
            return t

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
        for r in self.readers.values():
            r.close()
        self.readers.clear()

    # loader side ----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while True:
            with self.cv:
                while not self.stopping and not self._ready() and not self._drops:
                    self.cv.wait()
                if self.stopping:
                    return
                job = self.requests.popleft() if self._ready() else None
            if job is None:  # idle, with page-cache drops pending: do one, then look again
                self._drop_one()
                continue
            ticket, section = job
            try:
                self._load(ticket, section)
            except BaseException as e:  # handed to the compute thread, which raises it
                log.debug("ring loader failed on section %d", section, exc_info=True)
                with self.cv:
                    self.error = e
                    self.cv.notify_all()
                return
            with self.cv:
                self.done.add(ticket)
                self.cv.notify_all()
                idle = not self._ready()
            if idle and self.readahead and self.K < len(self.plan.sections):
                self._hint((section + 1) % len(self.plan.sections))

    def _ready(self) -> bool:
        """Whether the next requested ticket's slot is free (call with ``cv`` held)."""
        return bool(self.requests) and self.requests[0][0] - self.K <= self.released

    def _program(self, section: Section, slot: int, target: torch.Tensor) -> list[ReadRun | tuple[Any, ...]]:
        """The reads of ``section`` into ``target``: :class:`~semoe.storage.tensor_io.ReadRun` s of consecutive
        file bytes (each one ``preadv``), or ("cast", reader, offset, nbytes, src dtype, typed destination,
        staging view) through the staging area. The byte views are built here, once per (section, slot): the
        loader's steady state then runs one system call per run and no torch code."""
        key = (section.index, slot)
        if key in self._programs:
            return self._programs[key]
        dtype = self.plan.dtype
        regions = {r.key: r for r in section.regions}
        prog: list[ReadRun | tuple[Any, ...]] = []
        direct: list[tuple[PositionalReader, int, memoryview, Any]] = []
        for rd in section.reads:
            reg = regions[rd.region]
            start = reg.byte_offset + rd.elem_offset * dtype.itemsize
            if rd.src_dtype == dtype:
                direct.append((self.readers[rd.path], rd.offset, byte_view(target[start:start + rd.nbytes]), rd))
                continue
            prog.extend(coalesce(direct))
            direct = []
            assert self.staging is not None
            typed = target[start:start + rd.numel * dtype.itemsize].view(dtype)
            raw = self.staging[:rd.nbytes]
            prog.append(("cast", self.readers[rd.path], rd.offset, rd.nbytes, rd.src_dtype, typed,
                         (raw, byte_view(raw))))
        prog.extend(coalesce(direct))
        self._programs[key] = prog
        return prog

    def _read_section(self, section: Section, slot: int, target: torch.Tensor) -> int:
        n = 0
        for op in self._program(section, slot, target):
            if isinstance(op, ReadRun):
                n += op.read()
                reader, offset, nbytes = op.reader, op.offset, op.nbytes
            else:
                _, reader, offset, nbytes, src_dtype, typed, (raw, raw_view) = op
                n += reader.readv(offset, [raw_view])
                typed.copy_(raw.view(src_dtype))
            if self.drop_page_cache:
                self._drops.append((reader, offset, nbytes, section.index))
        return n

    def _drop_one(self) -> bool:
        """Drop the page-cache pages of the oldest read still pending; False when none is."""
        try:
            reader, offset, nbytes, _ = self._drops.popleft()
        except IndexError:
            return False
        if reader.fd >= 0:
            reader.drop_cache(offset, nbytes)
        return True

    def _drop_pending(self, section_idx: int) -> None:
        """Before ``section_idx`` is read again: its pages of the last read must be gone (each read from
        disk, the cache kept cold), and at most K sections' drops stay pending."""
        while len(self._drops) > self.K or any(d[3] == section_idx for d in list(self._drops)):
            self._drop_one()

    def _load(self, ticket: int, section_idx: int) -> None:
        slot = ticket % self.K
        if self.content[slot] == section_idx:  # still there (resident mode)
            return
        t0 = time.perf_counter()
        section = self.plan.sections[section_idx]
        self._drop_pending(section_idx)
        self.content[slot] = -1
        if not self.cuda:
            n = self._read_section(section, slot, self.slots[slot])
        else:
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
        self.content[slot] = section_idx
        self.stats.loads += 1
        self.stats.bytes_read += n
        self.stats.load_s += time.perf_counter() - t0

    def _hint(self, section_idx: int) -> None:
        """Start the kernel's read-ahead of a section that will be loaded next (fills the page cache only)."""
        runs: list[list[Any]] = []  # [path, start, end] of each run of consecutive bytes (a section's
        # tensors may lie far apart, e.g. lm_head first and the final norm last in an HF file: one range
        # from the lowest to the highest offset would hint the whole file)
        for rd in sorted(self.plan.sections[section_idx].reads, key=lambda r: (str(r.path), r.offset)):
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
