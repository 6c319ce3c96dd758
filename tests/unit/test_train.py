"""Training end to end in one process: loss falls, resume parity, atomic checkpoints, divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from semoe.config import apply_overrides, replace
from semoe.models.recipes import tiny
from semoe.storage import checkpoint as ckpt
from semoe.training.trainer import Trainer, TrainingDiverged, lr_at


def tiny_run(corpus_file: Path, steps: int = 30, **train):
    run = tiny()
    train = {"eval_every": 10, "ckpt_every": 10, **train}
    return replace(run, data=str(corpus_file), model=replace(run.model, vocab_size=320),
                   train=replace(run.train, steps=steps, **train))


def test_loss_falls(tmp_path, corpus_file, cache_dir) -> None:
    result = Trainer(tiny_run(corpus_file, steps=30), tmp_path / "run", cache_dir).fit()
    assert result.last_val_loss < result.first_val_loss - 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "expert_load.png").stat().st_size > 10_000
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step") and len(rows) == 1 + 1 + 30  # header, step-0 validation, 30 steps


@pytest.mark.numerics
def test_resume_same_layout_continues_exactly(tmp_path, corpus_file, cache_dir) -> None:
    """Float32, bit for bit: the resumed run executes the same ops in the same order on the same values."""
    run = tiny_run(corpus_file, steps=8, ckpt_every=100, dtype="float32")
    ref = Trainer(run, tmp_path / "ref", cache_dir, resume=None).fit().losses
    t = Trainer(run, tmp_path / "part", cache_dir, resume=None)
    for s in range(4):
        t.train_step(s)
    t.save(4)
    resumed = Trainer(run, tmp_path / "part", cache_dir, resume="auto")
    assert resumed.start_step == 4
    after = resumed.fit().losses
    assert after == ref[4:]


def test_lr_schedule() -> None:
    tc = tiny().train
    assert lr_at(0, tc) == pytest.approx(tc.lr / tc.warmup_steps)
    assert lr_at(tc.warmup_steps, tc) == pytest.approx(tc.lr)
    assert lr_at(tc.steps, tc) == pytest.approx(tc.min_lr)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, corpus_file, cache_dir, monkeypatch) -> None:
    run = tiny_run(corpus_file, steps=4, ckpt_every=100)
    t = Trainer(run, tmp_path / "run", cache_dir, resume=None)
    t.train_step(0)
    good = t.save(1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    t.train_step(1)
    real_save = ckpt.save_file
    calls = {"n": 0}

    def dying_save(tensors, filename):  # write half a file, then "crash"
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        t.save(2)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    resumed = Trainer(run, tmp_path / "run", cache_dir, resume="auto")
    assert resumed.start_step == 1
    for (n1, p1), (n2, p2) in zip(t.model.named_parameters(), resumed.model.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape


def test_corrupt_and_truncated_checkpoint_files(tmp_path, corpus_file, cache_dir) -> None:
    run = tiny_run(corpus_file, steps=2, ckpt_every=100)
    t = Trainer(run, tmp_path / "run", cache_dir, resume=None)
    path = t.save(0)
    f = path / "model-dense.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.read_manifest(path)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.read_manifest(path)


def test_divergence_stops_and_keeps_last_good(tmp_path, corpus_file, cache_dir) -> None:
    run = tiny_run(corpus_file, steps=6, ckpt_every=100)
    t = Trainer(run, tmp_path / "run", cache_dir, resume=None)
    t.train_step(0)
    good = t.save(1)
    with torch.no_grad():
        t.model.tok_emb.weight.fill_(math.nan)
    with pytest.raises(TrainingDiverged, match=str(good)):
        t.train_step(1)
    ckpt.read_manifest(good)  # still complete and verified


def test_resume_into_different_model_config_refuses(tmp_path, corpus_file, cache_dir) -> None:
    run = tiny_run(corpus_file, steps=2, ckpt_every=100)
    Trainer(run, tmp_path / "run", cache_dir, resume=None).save(0)
    other = apply_overrides(run, ["model.n_layers=3"])
    with pytest.raises(ckpt.CheckpointError, match="different model config"):
        Trainer(other, tmp_path / "run", cache_dir, resume="auto")
