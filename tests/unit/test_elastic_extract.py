"""``semoe extract``: the single-task model computes the multi-task model's logits for its task (float64,
1e-10), hence the same held-out accuracy, holds only that task's parameters, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from semoe.cli.main import main
from semoe.elastic.extract import accuracy, load_multitask_model, load_single_task
from semoe.storage import checkpoint as ckpt
from tests.unit.test_elastic_cli import FAST


@pytest.mark.numerics
def test_extract_equals_multitask_model(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--recipe", "multitask", "--steps", "6", "--out", str(out), *FAST,
                 "--set", "train.dtype=float64"]) == 0
    capsys.readouterr()
    path = ckpt.find_latest(out / "checkpoints")
    assert main(["extract", "--checkpoint", str(out / "checkpoints"), "--task", "digits",
                 "--out", str(tmp_path / "digits")]) == 0
    text = capsys.readouterr().out
    full, data = load_multitask_model(path)
    single = load_single_task(tmp_path / "digits")
    acc_full, logits_full = accuracy(full, data["digits"])
    acc_one, logits_one = accuracy(single, data["digits"])
    torch.testing.assert_close(logits_one, logits_full, rtol=1e-10, atol=1e-10)
    assert acc_one == acc_full and f"held-out accuracy {acc_one:.4f} (multi-task model: {acc_full:.4f})" in text
    names = [n for n, _ in single.named_parameters()]
    assert any(".task_experts.digits." in n for n in names) and any(".shared." in n for n in names)
    assert not any(t in n for n in names for t in ("synth2", "cancer", "wine"))
    n_one, n_full = sum(p.numel() for p in single.parameters()), sum(p.numel() for p in full.parameters())
    assert n_one < n_full and f"{n_one:,} parameters" in text
    # bad input: unknown task, non-empty --out, no checkpoint
    assert main(["extract", "--checkpoint", str(path), "--task", "iris", "--out", str(tmp_path / "x")]) == 2
    assert "not in checkpoint" in capsys.readouterr().err
    assert main(["extract", "--checkpoint", str(path), "--task", "wine", "--out", str(tmp_path / "digits")]) == 2
    assert "not empty" in capsys.readouterr().err
    missing = tmp_path / "none"
    assert main(["extract", "--checkpoint", str(missing), "--task", "wine", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
