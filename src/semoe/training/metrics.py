"""Training metrics: an append-only CSV log and headless plots (loss curves, expert-load heatmaps).

Plots use matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no display is needed and
no global matplotlib state (backend, current figure) is touched.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append rows to a CSV file (``path``, or ``path/metrics.csv`` when ``path`` is a folder or has no
    ``.csv`` suffix). The header comes from the first row's keys; a key first seen later extends the header
    (the file is rewritten once, earlier rows get empty cells). Every row is flushed.

    Opening an existing file continues it. ``resume_step``: drop rows whose ``step`` is greater (they were
    logged after the checkpoint a resumed run restarts from), so steps are not duplicated.
    """

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        path = Path(path)
        self.path = path if path.suffix == ".csv" and not path.is_dir() else path / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] = []
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                rows = list(reader)
            if resume_step is not None:
                kept = [r for r in rows if not r.get("step") or float(r["step"]) <= resume_step]
                if len(kept) != len(rows):
                    log.info("%s: dropped %d rows after step %d", self.path, len(rows) - len(kept), resume_step)
                    self._rewrite(kept)
        self._file = open(self.path, "a", newline="")  # closed in close()
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, restval="")

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns are left empty) and flush it to disk."""
        new = [k for k in row if k not in self.fields]
        if new:
            self._file.close()
            old_rows = []
            if self.fields:
                with open(self.path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self.fields += new
            self._rewrite(old_rows)
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields, restval="")
        self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy / torch scalars
        v = v.item()
    return f"{v:.6g}" if isinstance(v, float) else v


def read_metrics(csv_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Columns of a metrics CSV as float arrays (empty cells are NaN)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0].keys()) if rows else []
    out: dict[str, np.ndarray] = {}
    for c in cols:
        try:
            out[c] = np.array([float(r[c]) if r[c] not in ("", None) else math.nan for r in rows])
        except ValueError:
            continue  # non-numeric column
    return out


def plot_loss(csv_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Plot train ``loss`` per step and ``val_loss`` (rows where present) from a metrics CSV to a PNG."""
    cols = read_metrics(csv_path)
    if "loss" not in cols:
        raise ValueError(f"{csv_path} has no 'loss' column; it must be a metrics.csv written by MetricsWriter")
    step = cols.get("step", np.arange(len(cols["loss"]), dtype=float))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = ~np.isnan(cols["loss"])
    ax.plot(step[ok], cols["loss"][ok], lw=1.0, alpha=0.85, label="train loss")
    if "val_loss" in cols and (vok := ~np.isnan(cols["val_loss"])).any():
        ax.plot(step[vok], cols["val_loss"][vok], "o-", ms=4, lw=1.5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_expert_load(load: np.ndarray | Mapping[Any, np.ndarray], out_png: str | os.PathLike[str],
                     steps: Sequence[float] | None = None) -> Path:
    """Heatmap per MoE layer of the share of routed tokens each expert got, over training steps.

    ``load``: ``[steps, layers, experts]`` (titles "layer i" for i = 0..), or a dict layer id -> ``[steps,
    experts]`` (titles use the ids). Counts or fractions; each step is normalised to sum to 1. ``steps``:
    the optimizer step of each row (x axis), default 0..n-1. One shared colour bar.
    """
    if isinstance(load, Mapping):
        layers = [(f"layer {k}", np.asarray(v, dtype=float)) for k, v in load.items()]
    else:
        arr = np.asarray(load, dtype=float)
        if arr.ndim != 3:
            raise ValueError(f"load must be [steps, layers, experts] or a dict layer -> [steps, experts], got "
                             f"shape {arr.shape}")
        layers = [(f"layer {i}", arr[:, i, :]) for i in range(arr.shape[1])]
    if not layers or any(a.ndim != 2 or a.size == 0 for _, a in layers):
        raise ValueError("plot_expert_load needs at least one layer of non-empty [steps, experts] loads")
    if steps is not None and any(len(steps) != a.shape[0] for _, a in layers):
        raise ValueError(f"steps has {len(steps)} entries but the loads have {layers[0][1].shape[0]} rows; pass one "
                         "step per row")
    fracs = [a / np.where(a.sum(1, keepdims=True) > 0, a.sum(1, keepdims=True), 1.0) for _, a in layers]
    n = len(layers)
    ncols = min(4, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols + 1.2, 2.8 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    vmax = max(float(f.max()) for f in fracs) or 1.0
    im = None
    for ax, (title, _), frac in zip(axes.flat, layers, fracs):
        n_steps, n_exp = frac.shape
        x = np.asarray(steps, dtype=float) if steps is not None else np.arange(n_steps, dtype=float)
        x0, x1 = (x[0], x[-1]) if n_steps > 1 else (x[0] - 0.5, x[0] + 0.5)
        im = ax.imshow(frac.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       vmin=0.0, vmax=vmax, extent=(x0, x1, -0.5, n_exp - 0.5))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, label="fraction of routed tokens", shrink=0.9)
    fig.suptitle(f"Expert load ({n} MoE layer{'s' if n > 1 else ''}, uniform = {1 / fracs[0].shape[1]:.3g})")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
