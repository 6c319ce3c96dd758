"""Metrics CSV writer and headless plots."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from semoe.training.metrics import MetricsWriter, plot_expert_load, plot_loss, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def test_writer_rows_new_columns_and_continue(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "run")  # a folder -> run/metrics.csv
    assert w.path == tmp_path / "run" / "metrics.csv"
    w.log({"step": 1, "loss": np.float32(5.25), "lr": 1e-3})
    assert rows(w.path) == [{"step": "1", "loss": "5.25", "lr": "0.001"}]  # flushed before close
    w.log({"step": 2, "loss": 4.5, "lr": 2e-3, "val_loss": 4.75})  # new column extends the header
    w.log({"step": 3, "loss": 4.0})
    w.close()
    got = rows(w.path)
    assert [r["step"] for r in got] == ["1", "2", "3"]
    assert got[0]["val_loss"] == "" and got[1]["val_loss"] == "4.75" and got[2]["lr"] == ""
    with MetricsWriter(w.path) as w2:  # continuing an existing file keeps its rows and header
        w2.log({"step": 4, "loss": 3.5, "val_loss": 3.75})
    got = rows(w.path)
    assert len(got) == 4 and got[3] == {"step": "4", "loss": "3.5", "lr": "", "val_loss": "3.75"}
    assert w.path.read_text().count("step") == 1  # one header line


def test_writer_resume_drops_later_rows(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    with MetricsWriter(p) as w:
        for s in range(1, 6):
            w.log({"step": s, "loss": 1.0 / s})
    with MetricsWriter(p, resume_step=3) as w:
        w.log({"step": 4, "loss": 0.1})
    assert [r["step"] for r in rows(p)] == ["1", "2", "3", "4"] and rows(p)[-1]["loss"] == "0.1"


def test_plot_loss(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    with MetricsWriter(p) as w:
        for s in range(1, 41):
            row = {"step": s, "loss": 5.0 * np.exp(-s / 20)}
            if s % 10 == 0:
                row["val_loss"] = row["loss"] + 0.2
            w.log(row)
    cols = read_metrics(p)
    assert np.isnan(cols["val_loss"]).sum() == 36
    out = plot_loss(p, tmp_path / "plots" / "loss.png")
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == PNG_MAGIC
    with MetricsWriter(tmp_path / "bad.csv") as w:
        w.log({"step": 1, "acc": 0.5})
    with pytest.raises(ValueError, match="no 'loss' column"):
        plot_loss(tmp_path / "bad.csv", tmp_path / "x.png")


@pytest.mark.parametrize("n_layers", [1, 3, 12])
def test_plot_expert_load_array(tmp_path: Path, n_layers: int) -> None:
    rng = np.random.default_rng(0)
    load = rng.integers(0, 100, size=(25, n_layers, 8))
    out = plot_expert_load(load, tmp_path / f"load{n_layers}.png", steps=list(range(0, 250, 10)))
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == PNG_MAGIC


def test_plot_expert_load_dict_and_errors(tmp_path: Path) -> None:
    load = {1: np.full((5, 4), 0.25), 3: np.eye(4)[[0, 1, 2, 3, 0]]}
    out = plot_expert_load(load, tmp_path / "d.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="steps, layers, experts"):
        plot_expert_load(np.ones((3, 4)), tmp_path / "e.png")
    with pytest.raises(ValueError, match="one step per row"):
        plot_expert_load(np.ones((3, 1, 4)), tmp_path / "e.png", steps=[1, 2])
