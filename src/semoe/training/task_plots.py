"""Per-task plots of an elastic run's ``metrics.csv`` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semoe.training.metrics import read_metrics


def plot_tasks(csv_path: Path, out_dir: Path) -> list[Path]:
    """``task_loss.png`` (training loss per task) and ``task_accuracy.png`` (held-out accuracy per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(csv_path)
    step = m["step"]
    out = []
    for prefix, name, ylabel in (("loss_", "task_loss.png", "training loss"),
                                 ("val_acc_", "task_accuracy.png", "held-out accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted(k for k in m if k.startswith(prefix)):
            ok = ~np.isnan(m[key])
            ax.plot(step[ok], m[key][ok], marker="o" if prefix == "val_acc_" else None, label=key[len(prefix):])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out
