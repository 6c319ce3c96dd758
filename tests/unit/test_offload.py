"""Expert offload: an offloaded run equals the all-in-memory run bit for bit (same ops, same order, on the
same stacked tensors), and the store behaves (budget, router-aware IO, bad input)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from semoe.config import apply_overrides
from semoe.storage.expert_store import ExpertStore, StoreBudgetError
from semoe.training.trainer import Trainer
from tests.unit.test_train import tiny_run

BUDGET_MB = 0.6  # the tiny model's expert state is ~3.1 MiB; one key's W, G, m, v ~0.5 MiB


def offload_run(corpus_file: Path, steps: int, budget_mb: float = BUDGET_MB, **train):
    run = tiny_run(corpus_file, steps=steps, ckpt_every=100, dtype="float32", **train)
    return apply_overrides(run, [f"storage.budget_mb={budget_mb}"])


def params(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, experts read back from the store when offloaded (stacked as in the model)."""
    out = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    if t.offload is not None:
        for k in t.offload.keys:
            out[k.name] = t.offload.store.acquire(f"{k.name}/W").clone()
            t.offload.store.release(f"{k.name}/W")
    return out


@pytest.mark.numerics
def test_offloaded_run_equals_in_memory_bitwise(tmp_path, corpus_file, cache_dir) -> None:
    """20 steps, grad accumulation 2, clipping active, AdamW with weight decay and the LR schedule."""
    run = offload_run(corpus_file, steps=20, grad_accum=2, grad_clip=0.5)
    ref_run = apply_overrides(run, ["storage.budget_mb=0"])
    ref = Trainer(ref_run, tmp_path / "ref", cache_dir, resume=None)
    off = Trainer(run, tmp_path / "off", cache_dir, resume=None)
    assert off.offload is not None and not any(".experts." in n for n, _ in off.model.named_parameters())
    clipped = 0
    for s in range(20):
        a, b = ref.train_step(s), off.train_step(s)
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], s
        clipped += a["grad_norm"] > 0.5
        assert b["io_mb"] > 0  # the state does not fit: it moves every step
    assert clipped >= 5
    pa, pb = params(ref), params(off)
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert off.offload.store.stats.peak_resident <= off.offload.store.budget
    assert ref.evaluate() == off.evaluate()


def test_store_budget_lru_and_zero_experts(tmp_path) -> None:
    st = ExpertStore(tmp_path / "s", 3 * 4 * 16 * 4)  # three [4, 16] float32 tensors
    for i in range(5):
        st.declare(f"k{i}", (4, 16), torch.float32)
    vals = {f"k{i}": torch.randn(4, 16) for i in range(5)}
    for k, v in vals.items():
        st.put(k, v)
    assert st.resident <= st.budget and st.stats.bytes_written > 0
    st.reset_stats()
    for k, v in vals.items():
        assert torch.equal(st.acquire(k), v)
        st.release(k)
    assert st.stats.bytes_read > 0
    st.reset_stats()
    t = st.acquire("k0", experts=[1])  # router-aware: one expert's rows only
    assert torch.equal(t[1], vals["k0"][1])
    st.release("k0")
    assert st.stats.bytes_read in (0, 64)
    st.set_zero("k1")
    st.reset_stats()
    assert torch.equal(st.acquire("k1"), torch.zeros(4, 16)) and st.stats.bytes_read == 0
    st.release("k1")
    held = [st.acquire(f"k{i}") for i in range(3)]
    with pytest.raises(StoreBudgetError, match="at least"):
        st.acquire("k3")
    assert len(held) == 3
    st.close()


def test_budget_below_one_layer_states_minimum(tmp_path, corpus_file, cache_dir) -> None:
    run = offload_run(corpus_file, steps=2, budget_mb=0.1)
    with pytest.raises(StoreBudgetError, match=r"at least 0\.5"):
        Trainer(run, tmp_path / "run", cache_dir, resume=None)


def test_store_of_another_model_is_refused(tmp_path, corpus_file, cache_dir) -> None:
    run = offload_run(corpus_file, steps=2)
    Trainer(run, tmp_path / "run", cache_dir, resume=None)
    meta = next((tmp_path / "run" / "expert_store").glob("*/store.json"))
    before = {p.name: p.read_bytes() for p in meta.parent.iterdir()}
    other = apply_overrides(run, ["model.moe.d_ff=96"])
    with pytest.raises(ValueError, match="another model"):
        Trainer(other, tmp_path / "run", cache_dir, resume=None)
    assert {p.name: p.read_bytes() for p in meta.parent.iterdir()} == before


def test_store_dir_not_writable(tmp_path, corpus_file, cache_dir) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made under a file (root ignores permission bits)
    run = apply_overrides(offload_run(corpus_file, steps=2), [f"storage.dir={blocker / 'store'}"])
    with pytest.raises(OSError, match="not writable"):
        Trainer(run, tmp_path / "run", cache_dir, resume=None)


def test_store_disk_full_keeps_previous_checkpoint(tmp_path, corpus_file, cache_dir, monkeypatch) -> None:
    from semoe.storage import checkpoint as ckpt
    from semoe.storage import expert_store

    run = offload_run(corpus_file, steps=4)
    t = Trainer(run, tmp_path / "run", cache_dir, resume=None)
    t.train_step(0)
    good = t.save(1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(expert_store.os, "pwrite", full)
    with pytest.raises(OSError, match="full"):
        t.train_step(1)
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    ckpt.read_manifest(good)
