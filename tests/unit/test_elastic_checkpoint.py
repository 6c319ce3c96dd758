"""The asynchronous checkpointer: the step's copy is a snapshot (training may go on while the thread writes),
the committed checkpoint verifies and loads back bit for bit, ``latest`` moves only on commit, and a failed write
is reported by the next save/wait instead of being lost."""

from __future__ import annotations

import pytest
import torch

from semoe.config import MultiTaskModelConfig
from semoe.elastic.checkpoint import AsyncCheckpointer, clean_partial, owned_tensors
from semoe.models.multitask import MultiTaskMoE, TaskSpec
from semoe.storage import checkpoint as ckpt

SPECS = [TaskSpec("a", 2, 3, 4), TaskSpec("b", 1, 5, 2)]


def _model(seed: int) -> MultiTaskMoE:
    return MultiTaskMoE(MultiTaskModelConfig(d_model=8, d_ff=8, task_expert_d_ff=8), SPECS, seed=seed)


def test_snapshot_commit_and_reload(tmp_path) -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters())
    model({"a": torch.randn(3, 2, 3), "b": torch.randn(2, 1, 5)}).logits["a"].sum().backward()
    opt.step()
    model_t, optim_t = owned_tensors(model, opt, lambda k: True, write_experts=True)
    want = {k: v.clone() for k, v in model_t.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next steps go on while the thread writes: the snapshot must not move
    root = tmp_path / "ck"
    w = AsyncCheckpointer(root, rank=0, world=1, attempt="x")
    path = w.save(5, model_t, optim_t, {"tasks": {"a": 1, "b": 1}})
    w.wait()
    assert w.stalls_s and w.write_s
    assert ckpt.find_latest(root) == path and (root / "latest").read_text() == path.name
    ckpt.read_manifest(path, verify=True)
    fresh = _model(1)
    ckpt.load_model(path, fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    ckpt.load_optimizer(path, fresh, fresh_opt)
    assert 0 < len(fresh_opt.state) == len(opt.state)  # head b had no gradient: no state, as in the original
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p in opt.state:
            assert torch.equal(fresh_opt.state[q]["exp_avg"], optim_t[f"{name}.exp_avg"]), name


def test_partial_folders_are_never_latest_and_errors_surface(tmp_path) -> None:
    root = tmp_path / "ck"
    model = _model(0)
    m, o = owned_tensors(model, None, lambda k: True, write_experts=True)
    w = AsyncCheckpointer(root, rank=0, world=2, attempt="y", timeout_s=0.5)  # rank 1 never writes
    w.save(1, m, o, {})
    with pytest.raises(RuntimeError, match="did not finish writing"):
        w.wait()
    assert ckpt.find_latest(root) is None and not (root / "latest").exists()  # nothing committed
    assert list(root.glob(".tmp-*"))
    clean_partial(root)
    assert not list(root.glob(".tmp-*"))
    (tmp_path / "file").write_text("x")
    bad = AsyncCheckpointer(tmp_path / "file" / "ck", rank=0, world=1, attempt="z")
    bad.save(1, m, o, {})
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        bad.wait()


def test_exact_loss_log_continues_at_the_resume_step(tmp_path) -> None:
    """``losses.jsonl`` on resume: rows after the checkpoint's step go (they are trained again), and a last line
    that a kill cut short is dropped instead of breaking the restart."""
    from semoe.training.elastic_trainer import _ExactLog, read_losses

    path = tmp_path / "losses.jsonl"
    log = _ExactLog(path, 0)
    for s in range(1, 8):
        log.log(s, 0.1 * s)
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the kill landed in the middle of a write
    log = _ExactLog(path, 5)
    assert read_losses(tmp_path) == {s: pytest.approx(0.1 * s, abs=0) for s in range(1, 6)}
    log.log(6, 0.25)
    log.close()
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4, 5, 6] and read_losses(tmp_path)[6] == 0.25
    assert not list(tmp_path.glob("*.tmp"))
