"""Low-level tensor file I/O: positional reads of byte ranges into caller-owned buffers, page-cache control,
runs of consecutive bytes, and a small pool of reader threads.

Legend: a *run* is a range of consecutive file bytes read by one system call into one or more destination
buffers (a scatter read).

No memory map: a mapped file's touched pages count in the process's resident set (``RssFile``) until it is
unmapped, so streaming a model larger than memory through a map makes RSS grow towards the model size. Here
bytes are read with ``os.preadv`` (no shared file position, so any number of threads may read one file
descriptor at once) straight into the destination: they pass through the kernel's page cache, which is no
process's RSS, and :meth:`PositionalReader.drop_cache` tells the kernel to forget exactly those byte ranges
(``posix_fadvise(POSIX_FADV_DONTNEED)``). ``O_DIRECT`` (no page cache at all) would need every offset, length
and buffer aligned to the device's block size, i.e. a bounce buffer and a copy for the unaligned tensors of a
safetensors file; pread + DONTNEED reads the same bytes without that copy, so it is the one path here.

Used by the ring engine (:mod:`semoe.inference.loader`: whole sections, single experts) and the training
expert store. Format-specific code (safetensors headers) lives in :mod:`semoe.storage.safetensors_io`, whose
reader is a :class:`PositionalReader` with a header.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["IOV_MAX", "PositionalReader", "ReadPool", "ReadRun", "ShortReadError", "byte_view", "coalesce",
           "evict_file_cache"]

IOV_MAX = 512  # buffers per preadv call (Linux allows 1024)


class ShortReadError(ValueError):
    """A file ended before a read was complete (truncated, or changed while it was read)."""


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable buffer over a contiguous CPU tensor's bytes (no copy). Building one takes a few torch
    calls; a caller that reads into the same buffers again and again (the ring) builds them once and
    passes the views to :meth:`PositionalReader.readv`."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("read buffers must be contiguous CPU tensors")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class PositionalReader:
    """An open file descriptor for positional reads of one file. Thread-safe (``preadv`` has no shared file
    position). Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> PositionalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def short_read_error(self, offset: int, want: int) -> ValueError:
        """The error of a read that met the end of the file at ``offset`` with ``want`` bytes still to come
        (subclasses word it for their format)."""
        return ShortReadError(f"{self.path}: unexpected end of file at byte {offset} (wanted {want} more bytes); "
                              "the file is truncated or was changed while it was read")

    def readv(self, offset: int, buffers: Sequence[torch.Tensor | memoryview]) -> int:
        """Fill ``buffers`` (contiguous CPU tensors of any dtype, or writable byte views from
        :func:`byte_view`) with the consecutive file bytes starting at ``offset`` (absolute), in one or a
        few ``preadv`` calls. Returns the number of bytes read.

        With views the call runs no torch code: a loader thread then needs the interpreter lock only
        around the system call, not for the several torch calls per buffer that building views takes
        (with a compute thread holding the lock most of the time, each of those waits for a hand-off)."""
        views = [b if isinstance(b, memoryview) else byte_view(b) for b in buffers]
        views = [v for v in views if v.nbytes]
        total = sum(v.nbytes for v in views)
        done = 0
        while views:
            batch = views[:IOV_MAX]
            want = sum(v.nbytes for v in batch)
            got = os.preadv(self.fd, batch, offset + done)
            if got <= 0:
                raise self.short_read_error(offset + done, want)
            done += got
            # drop the fully filled buffers, shorten a partly filled one
            while got and views:
                if got >= views[0].nbytes:
                    got -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][got:]
                    got = 0
        return total

    def drop_cache(self, offset: int = 0, nbytes: int = 0) -> None:
        """Ask the kernel to drop this byte range of this file from the page cache (0 = to the end)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def will_need(self, offset: int, nbytes: int) -> None:
        """Start the kernel's read-ahead of a byte range (asynchronous; fills the page cache, not RSS)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)


@dataclass
class ReadRun:
    """``nbytes`` consecutive bytes of ``reader``'s file from ``offset``, scattered over ``views`` in order.
    ``tag``: whatever the caller wants to know about the run (e.g. the tensor it reads, for an error)."""

    reader: PositionalReader
    offset: int
    views: list[memoryview]
    nbytes: int
    tag: Any = None
    parts: list[Any] = field(default_factory=list)  # the tags of the pieces merged into this run

    def read(self) -> int:
        return self.reader.readv(self.offset, self.views)


def coalesce(pieces: Iterable[tuple[PositionalReader, int, memoryview, Any]]) -> list[ReadRun]:
    """Runs from ``(reader, file offset, destination view, tag)`` pieces, in the given order: a piece that
    continues the previous one in the same file joins its run (one system call for both)."""
    runs: list[ReadRun] = []
    for reader, offset, view, tag in pieces:
        last = runs[-1] if runs else None
        if last is not None and last.reader is reader and last.offset + last.nbytes == offset:
            last.views.append(view)
            last.nbytes += view.nbytes
            last.parts.append(tag)
        else:
            runs.append(ReadRun(reader, offset, [view], view.nbytes, tag, [tag]))
    return runs


class ReadPool:
    """``threads`` reader threads that run independent reads concurrently (a deeper I/O queue on an SSD;
    ``preadv`` releases the interpreter lock). With ``threads <= 1`` reads run in the calling thread."""

    def __init__(self, threads: int = 1, name: str = "semoe-read") -> None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"reader threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None

    def run(self, runs: Sequence[ReadRun]) -> int:
        """Read every run (in parallel when there are threads); bytes read. The first error is raised after
        every submitted read has finished (no read is left writing into a buffer the caller reuses)."""
        if self._pool is None or len(runs) <= 1:
            return sum(r.read() for r in runs)
        futures = [self._pool.submit(r.read) for r in runs]
        total, error = 0, None
        for f in futures:
            try:
                total += f.result()
            except BaseException as e:  # the first error, raised once all reads are done
                error = error or e
        if error is not None:
            raise error
        return total

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def evict_file_cache(paths: Iterable[str | Path]) -> None:
    """Drop these files' pages from the kernel page cache (``POSIX_FADV_DONTNEED``; dirty pages are
    written first by ``fdatasync``). Pages that a process has mapped stay; other files are untouched."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if hasattr(os, "fdatasync"):
                os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- writes (the training expert store)
class PositionalFile(PositionalReader):
    """A file opened for positional reads *and* writes (created if missing): the expert store's disk tier.
    Reads are :meth:`PositionalReader.readv` (+ :meth:`drop_cache`); :meth:`write` puts a buffer's bytes at
    an offset with ``os.pwrite`` (no shared file position: IO threads may write one descriptor at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def write(self, offset: int, buf: torch.Tensor | memoryview) -> int:
        """Write all of ``buf`` (a contiguous CPU tensor or a byte view) at ``offset``; returns the bytes written.
        ``OSError`` (e.g. ``ENOSPC``) propagates."""
        view = buf if isinstance(buf, memoryview) else byte_view(buf)
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    def sync(self) -> None:
        """Make the written bytes durable (``fdatasync``)."""
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)
