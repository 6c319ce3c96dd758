"""``semoe train --recipe multitask``: a short run (plan, per-task accuracy, metrics, plots, checkpoint) and
every bad input it refuses before writing anything."""

from __future__ import annotations

import pytest

from semoe.cli.main import main
from semoe.elastic.planner import plan_tasks
from semoe.storage import checkpoint as ckpt
from semoe.training.metrics import read_metrics

FAST = ["--set", "train.eval_every=2", "--set", "train.ckpt_every=2", "--set", "model.d_model=16",
        "--set", "model.token_moe.d_model=16", "--set", "elastic.tasks=synth2=8,digits=4,cancer=2,wine=2"]


def test_short_run_then_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--recipe", "multitask", "--steps", "4", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "elastic plan for 1 ranks" in text and "held-out accuracy per task" in text
    m = read_metrics(out / "metrics.csv")
    assert list(m["step"]) == [1, 2, 3, 4]
    assert {"loss_synth2", "acc_digits", "val_acc_wine", "val_loss_cancer"} <= set(m)
    assert (out / "task_loss.png").stat().st_size > 0 and (out / "task_accuracy.png").stat().st_size > 0
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and latest.name == "step_00000004"
    before = sorted(p.name for p in (out / "checkpoints").iterdir())

    # a checkpoint of another task set
    other = [*FAST[:-1], "elastic.tasks=synth2=8,digits=4,iris=2"]
    assert main(["train", "--recipe", "multitask", "--steps", "6", "--out", str(out), *other]) == 2
    err = capsys.readouterr().err
    assert "trained on tasks" in err and "elastic.tasks" in err
    # --max-restarts below 0
    assert main(["train", "--recipe", "multitask", "--max-restarts", "-1", "--out", str(out), *FAST]) == 2
    assert "--max-restarts must be >= 0" in capsys.readouterr().err
    # a task with batch 0
    bad = [*FAST[:-1], "elastic.tasks=synth2=8,digits=0"]
    assert main(["train", "--recipe", "multitask", "--out", str(tmp_path / "b0"), *bad]) == 2
    assert "global batch 0" in capsys.readouterr().err
    # more tasks than ranks with sharing disabled
    assert main(["train", "--recipe", "multitask", "--nproc", "2", "--out", str(tmp_path / "ns"), *FAST,
                 "--set", "elastic.share_ranks=false"]) == 2
    assert "share_ranks=false" in capsys.readouterr().err
    # a plan file for another world size
    plan = tmp_path / "plan.json"
    plan_tasks({"synth2": (8, 2.0), "digits": (4, 4.0), "cancer": (2, 2.0), "wine": (2, 1.0)}, 4).save(plan)
    assert main(["train", "--recipe", "multitask", "--plan", str(plan), "--out", str(tmp_path / "pf"), *FAST]) == 2
    assert "is for 4 ranks but this run has 1" in capsys.readouterr().err
    # nothing was written by the refused runs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not any((tmp_path / d).exists() for d in ("b0", "ns", "pf"))
    # the resume goes on from step 4
    assert main(["train", "--recipe", "multitask", "--steps", "6", "--out", str(out), *FAST]) == 0
    assert list(read_metrics(out / "metrics.csv")["step"]) == [1, 2, 3, 4, 5, 6]


def test_plan_only_with_multitask_and_max_restarts_checked(tmp_path) -> None:
    """--plan belongs to the multi-task trainer; --max-restarts (both trainers) must be a number >= 0."""
    with pytest.raises(SystemExit):
        main(["train", "--max-restarts"])
    assert main(["train", "--recipe", "tiny", "--plan", str(tmp_path / "plan.json")]) == 2
    assert main(["train", "--recipe", "tiny", "--max-restarts", "-1", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
