"""storage/tensor_io: positional scatter reads, runs of consecutive bytes, the reader pool, short reads."""

from __future__ import annotations

import pytest
import torch

from semoe.storage.tensor_io import (
    PositionalReader,
    ReadPool,
    ShortReadError,
    byte_view,
    coalesce,
    evict_file_cache,
)


def _file(tmp_path, n: int = 4096):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(data.tolist()))
    return path, data


def test_coalesce_joins_consecutive_pieces_only(tmp_path) -> None:
    path, data = _file(tmp_path)
    out = torch.zeros(4096, dtype=torch.uint8)
    with PositionalReader(path) as r, PositionalReader(path) as other:
        pieces = [(r, 0, byte_view(out[100:200]), "a"), (r, 100, byte_view(out[0:50]), "b"),  # joins a
                  (r, 1000, byte_view(out[500:600]), "c"),  # a gap: new run
                  (other, 1100, byte_view(out[600:700]), "d")]  # another reader: new run
        runs = coalesce(pieces)
        assert [(run.offset, run.nbytes, run.parts) for run in runs] == [(0, 150, ["a", "b"]), (1000, 100, ["c"]),
                                                                         (1100, 100, ["d"])]
        for threads in (1, 3):
            out.zero_()
            pool = ReadPool(threads)
            try:
                assert pool.run(runs) == 350
            finally:
                pool.close()
            assert torch.equal(out[100:200], data[0:100]) and torch.equal(out[0:50], data[100:150])
            assert torch.equal(out[500:600], data[1000:1100]) and torch.equal(out[600:700], data[1100:1200])
            assert int(out[200:500].sum()) == 0 and int(out[700:].sum()) == 0  # nothing else written
        r.drop_cache(0, 100)
        r.will_need(0, 100)
    evict_file_cache([path])
    assert path.read_bytes() == bytes(data.tolist())


def test_short_read_names_the_file_and_pool_waits_for_all(tmp_path) -> None:
    path, _ = _file(tmp_path, 1000)
    out = torch.zeros(2000, dtype=torch.uint8)
    with PositionalReader(path) as r:
        with pytest.raises(ShortReadError, match=r"blob\.bin: unexpected end of file at byte 1000"):
            r.readv(900, [out[:200]])
        runs = coalesce([(r, 0, byte_view(out[:10]), 0), (r, 990, byte_view(out[100:150]), 1),
                         (r, 500, byte_view(out[200:300]), 2)])
        pool = ReadPool(2)
        with pytest.raises(ShortReadError, match=r"blob\.bin"):
            pool.run(runs)
        pool.close()
        # every read that could complete did (the error came after all finished)
        assert torch.equal(out[200:300], torch.tensor(list(path.read_bytes()[500:600]), dtype=torch.uint8))
    with pytest.raises(ValueError, match="reader threads must be an integer >= 1"):
        ReadPool(0)
