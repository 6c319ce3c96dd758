"""The mmap-free safetensors reader/writer against the reference ``safetensors`` library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file as ref_load_file
from safetensors.torch import save_file

from semoe.storage.safetensors_io import (
    SafetensorsFormatError,
    SafetensorsReader,
    SafetensorsWriter,
    byte_view,
    evict_file_cache,
    load_file,
    read_header,
    read_tensor,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=g),
        "b16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "h": torch.randn(9, generator=g).to(torch.float16),
        "ids": torch.arange(11, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "f64": torch.randn(2, 2, dtype=torch.float64, generator=g),
    }


def test_load_file_matches_reference(tmp_path) -> None:
    ts = _tensors()
    path = tmp_path / "a.safetensors"
    save_file(ts, str(path), metadata={"format": "pt"})
    ours = load_file(path)
    ref = ref_load_file(str(path))
    assert ours.keys() == ref.keys() == ts.keys()
    for k in ts:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert header.tensors["w"].shape == (7, 5) and header.tensors["w"].nbytes == 7 * 5 * 4
    # offsets are absolute and tile the data area
    infos = sorted(header.tensors.values(), key=lambda i: i.offset)
    assert infos[0].offset == header.data_start
    assert infos[-1].offset + infos[-1].nbytes == header.file_size


def test_scatter_read_into_views(tmp_path) -> None:
    """readv fills several destination views from one contiguous file range (what the ring does)."""
    ts = {"a": torch.randn(100), "b": torch.randn(50)}
    path = tmp_path / "x.safetensors"
    save_file(ts, str(path))
    header = read_header(path)
    first, second = sorted(header.tensors.values(), key=lambda i: i.offset)
    flat = torch.zeros(1000, dtype=torch.uint8)
    dst1, dst2 = flat[8:8 + first.nbytes], flat[600:600 + second.nbytes]
    with SafetensorsReader(path) as r:
        assert r.readv(first.offset, [dst1, dst2]) == first.nbytes + second.nbytes
        r.drop_cache()
    assert torch.equal(dst1.view(torch.float32), ts[first.name])
    assert torch.equal(dst2.view(torch.float32), ts[second.name])
    assert int(flat[:8].sum()) == 0 and int(flat[8 + first.nbytes:600].sum()) == 0  # nothing else touched

    # the same with byte views built once (the ring's loader: no torch call per read)
    flat.zero_()
    views = [byte_view(dst1), byte_view(dst2)]
    with SafetensorsReader(path) as r:
        assert r.readv(first.offset, views) == first.nbytes + second.nbytes
    assert torch.equal(dst1.view(torch.float32), ts[first.name])
    assert torch.equal(dst2.view(torch.float32), ts[second.name])
    assert torch.equal(read_tensor(path, "b"), ts["b"])
    evict_file_cache([path])  # no error, file intact
    assert torch.equal(read_tensor(path, "a"), ts["a"])


def test_writer_roundtrip_any_order(tmp_path) -> None:
    ts = _tensors()
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, {k: (v.dtype, v.shape) for k, v in ts.items()}, metadata={"format": "pt"}) as w:
        for k in reversed(list(ts)):
            w.write(k, ts[k])
    ref = ref_load_file(str(path))
    for k in ts:
        assert torch.equal(ref[k], ts[k]), k
    with pytest.raises(ValueError, match=r"never written: \['b'\]"):
        specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))}
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"declared torch\.float32"):
        with SafetensorsWriter(tmp_path / "y.safetensors", {"a": (torch.float32, (2,))}) as w:
            w.write("a", torch.zeros(3))


@pytest.mark.parametrize("damage,match", [
    ("truncate", "data bytes but the file holds"),
    ("tiny", "shorter than the 8-byte header"),
    ("garbage_header", "header is not JSON"),
    ("huge_length", "does not fit a file"),
    ("bad_span", "spans 4 bytes"),
])
def test_corrupt_files_name_the_file(tmp_path, damage: str, match: str) -> None:
    path = tmp_path / "model-00002-of-00003.safetensors"
    save_file({"a": torch.randn(64), "b": torch.randn(8)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if damage == "truncate":
        path.write_bytes(raw[:-10])
    elif damage == "tiny":
        path.write_bytes(raw[:5])
    elif damage == "garbage_header":
        path.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    elif damage == "huge_length":
        path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    else:
        header = json.loads(raw[8:8 + n])
        header["b"]["data_offsets"][1] = header["b"]["data_offsets"][0] + 4
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        path.write_bytes(raw[:8] + blob + raw[8 + n:])
    with pytest.raises(SafetensorsFormatError, match=match) as e:
        read_header(path)
    assert "model-00002-of-00003.safetensors" in str(e.value) and "re-download" in str(e.value)


def test_missing_file_and_unknown_dtype(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist"):
        read_header(tmp_path / "nope.safetensors")
    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match=r"dtype 'C64'.*supported"):
        read_header(path)


def test_short_read_after_header_check(tmp_path) -> None:
    """A file truncated after its header was read (e.g. while the ring runs) fails with the file's name."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(1000)}, str(path))
    header = read_header(path)
    with SafetensorsReader(path, header) as r:
        with open(path, "r+b") as f:
            f.truncate(header.data_start + 100)
        with pytest.raises(SafetensorsFormatError, match=r"m\.safetensors.*unexpected end of file"):
            r.read("a")
