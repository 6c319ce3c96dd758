"""safetensors files read and written without memory mapping.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets
relative to the data area), then the data area, which the tensors cover exactly.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a read touches becomes a
file-backed page of this process's resident set (``RssFile``) until the map is closed, so streaming a
model larger than memory through a mapped file makes the process's RSS grow towards the model size.
Here tensors are read with ``os.preadv`` straight into caller-owned buffers (a slot of the ring, a
staging area) by :class:`~semoe.storage.tensor_io.PositionalReader` (the byte-level I/O, shared with the
training expert store): the bytes pass through the kernel's page cache, which is not part of any process's
RSS, and :meth:`SafetensorsReader.drop_cache` can tell the kernel to forget them
(``posix_fadvise(POSIX_FADV_DONTNEED)``, only those byte ranges of only that file). ``byte_view`` and
``evict_file_cache`` are re-exported from there.

Errors: a missing, truncated or corrupt file raises :class:`SafetensorsFormatError` (a
``ValueError``) whose message names the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semoe.storage.tensor_io import PositionalReader, byte_view, evict_file_cache

__all__ = ["DTYPES", "SafetensorsFormatError", "SafetensorsHeader", "SafetensorsReader", "SafetensorsWriter",
           "TensorInfo", "byte_view", "dtype_name", "evict_file_cache", "load_file", "read_header", "read_tensor"]

#: safetensors dtype names -> torch dtypes (the ones torch has).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class SafetensorsFormatError(ValueError):
    """A safetensors file that cannot be read as such (missing, truncated, corrupt header)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32", "BF16", ...)."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors; use one of {sorted(_NAMES.values())}")
    return _NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``offset`` is absolute in the file, ``nbytes`` its length."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: tensors by name (in file order), metadata, file size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0
    file_size: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self.tensors[name]


def _bad(path: Path, what: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{path} is not a valid safetensors file: {what}; the file is corrupt or "
                                  "truncated, re-download or re-convert it")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and check the header of ``path``: JSON well formed, known dtypes, ``nbytes`` equal to
    shape x item size, tensors that tile the data area without gaps or overlaps, and a file long enough
    to hold them (a truncated download is caught here, before anything is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"safetensors file {path} does not exist; is the checkpoint complete?") from e
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not JSON ({e})") from e
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    data_start = 8 + n
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            dt, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(path, f"entry {name!r} lacks dtype/shape/data_offsets") from e
        if dt not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt!r}, which torch cannot hold; "
                             f"supported: {sorted(DTYPES)}")
        if any(s < 0 for s in shape) or not (isinstance(begin, int) and isinstance(end, int)) or end < begin:
            raise _bad(path, f"entry {name!r} has shape {shape} and offsets {[begin, end]}")
        want = math.prod(shape) * DTYPES[dt].itemsize
        if end - begin != want:
            raise _bad(path, f"tensor {name!r} spans {end - begin} bytes, its dtype and shape need {want}")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, DTYPES[dt], tuple(shape), data_start + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise _bad(path, f"tensor {name!r} starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if data_start + pos > size:
        raise _bad(path, f"the header describes {pos} data bytes but the file holds {size - data_start}")
    ordered = {name: tensors[name] for _, _, name in spans}
    return SafetensorsHeader(path, ordered, dict(meta), data_start, size)


class SafetensorsReader(PositionalReader):
    """An open file descriptor for positional reads of one safetensors file, with its checked header.
    Thread-safe (``preadv`` has no shared file position). Use as a context manager or call :meth:`close`.
    :meth:`readv`, :meth:`drop_cache` and :meth:`will_need` come from
    :class:`~semoe.storage.tensor_io.PositionalReader`."""

    def __init__(self, path: str | Path, header: SafetensorsHeader | None = None) -> None:
        self.header = header if header is not None else read_header(path)
        super().__init__(self.header.path)

    def __enter__(self) -> SafetensorsReader:
        return self

    def short_read_error(self, offset: int, want: int) -> ValueError:
        return _bad(self.path, f"unexpected end of file at byte {offset} (wanted {want} more bytes)")

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Read tensor ``info``'s bytes into ``out`` (contiguous CPU, exactly ``info.nbytes`` bytes)."""
        if out.numel() * out.element_size() != info.nbytes:
            raise ValueError(f"buffer of {out.numel() * out.element_size()} bytes for {info.name!r} "
                             f"({info.nbytes} bytes)")
        self.readv(info.offset, [out])

    def read(self, name: str) -> torch.Tensor:
        """A new tensor with the contents of ``name``."""
        info = self.header[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(info, out)
        return out


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read without memory mapping."""
    with SafetensorsReader(path) as r:
        return r.read(name)


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file (like ``safetensors.torch.load_file``, without memory mapping)."""
    with SafetensorsReader(path) as r:
        return {name: r.read(name) for name in r.header.tensors}


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in any order, holding one tensor at a time.

    The header is written first from ``specs`` (name -> (dtype, shape)), so sizes must be known in
    advance; :meth:`write` puts a tensor's bytes at its place with ``pwrite``. :meth:`close` checks that
    every tensor was written and fsyncs. Tensors are laid out in name order, like ``save_file``.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        pos = 0
        for name in sorted(specs):
            dtype, shape = specs[name]
            shape = tuple(int(s) for s in shape)
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.slots[name] = (pos, n, dtype, shape)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data area 8-byte aligned, as the reference writer does
        self.data_start = 8 + len(raw)
        self.data_bytes = pos
        self.written: set[str] = set()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(self.fd, self.data_start + pos)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self.fd)
            self.fd = -1

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write tensor ``name`` (its dtype and shape must match the spec)."""
        if name not in self.slots:
            raise KeyError(f"{name!r} is not among the tensors declared for {self.path}")
        pos, n, dtype, shape = self.slots[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name!r}: got {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
        buf = byte_view(t.detach().cpu().contiguous())
        done = 0
        while done < n:
            done += os.pwrite(self.fd, buf[done:], self.data_start + pos + done)
        self.written.add(name)

    def close(self) -> None:
        """Check completeness, fsync and close."""
        if self.fd < 0:
            return
        missing = sorted(set(self.slots) - self.written)
        try:
            if missing:
                raise ValueError(f"{self.path}: tensors declared but never written: {missing[:5]}")
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
