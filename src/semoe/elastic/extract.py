"""Task extraction for deployment: a standalone single-task model from a multi-task checkpoint.

It keeps the shared parts (backbone blocks, each task-routed layer's shared expert, the token-gated layer
with all its experts), the task's stem, positions, head, its expert in every task-routed layer and its policy
(a soft mix of the shared and the task expert, so both stay), and drops every other task. The result is the
same ``MultiTaskMoE`` class holding one task: ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semoe.config import MultiTaskModelConfig, from_dict
from semoe.elastic.checkpoint import load_multitask_config
from semoe.elastic.data import TaskData, load_tasks, task_specs
from semoe.models.multitask import MultiTaskMoE, TaskSpec
from semoe.storage import checkpoint as ckpt


def load_multitask_model(checkpoint: Path, tasks: list[str] | None = None) -> tuple[MultiTaskMoE, dict[str, TaskData]]:
    """The multi-task model of an elastic checkpoint in one process (``tasks``: only those; None: all)."""
    run = load_multitask_config(checkpoint)
    data = load_tasks(list(run.elastic.task_batches()), seed=0)
    dtype = torch.float64 if run.train.dtype == "float64" else torch.float32
    model = MultiTaskMoE(run.model, task_specs(data), tasks, seed=run.train.seed).to(dtype)
    ckpt.load_model(checkpoint, model)
    return model.eval(), data


def extract_task(checkpoint: Path, task: str, out: Path) -> dict:
    """Write the single-task model of ``task`` to ``out``; returns sizes (parameters and bytes, vs the whole
    multi-task model)."""
    run = load_multitask_config(checkpoint)
    names = list(run.elastic.task_batches())
    if task not in names:
        raise ValueError(f"task {task!r} is not in checkpoint {checkpoint} (its tasks: {names})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new folder (nothing was written)")
    model, _ = load_multitask_model(checkpoint, [task])
    full, _ = load_multitask_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    spec = model.specs[task]
    (out / "config.json").write_text(json.dumps({"format": "semoe-single-task", "model": asdict(run.model),
                                                 "task": asdict(spec), "seed": run.train.seed,
                                                 "source": str(checkpoint)}, indent=1))
    n_full = sum(p.numel() for p in full.parameters())
    n_task = sum(p.numel() for p in model.parameters())
    return {"task": task, "params": n_task, "params_multitask": n_full, "fraction": n_task / n_full,
            "bytes": (out / "model.safetensors").stat().st_size}


def load_single_task(folder: Path) -> MultiTaskMoE:
    """A model written by ``extract_task``."""
    meta = json.loads((Path(folder) / "config.json").read_text())
    if meta.get("format") != "semoe-single-task":
        raise ValueError(f"{folder} is not an extracted single-task model (config.json format)")
    cfg = from_dict(MultiTaskModelConfig, meta["model"])
    model = MultiTaskMoE(cfg, [TaskSpec(**meta["task"])], seed=meta["seed"])
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    model = model.to(tensors["norm_f.weight"].dtype)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: MultiTaskMoE, task: TaskData) -> tuple[float, torch.Tensor]:
    """(held-out accuracy, logits) of ``model`` on ``task``'s test split."""
    dtype = next(model.parameters()).dtype
    logits = model({task.name: torch.from_numpy(task.x_test).to(dtype)}).logits[task.name]
    return float((logits.argmax(-1) == torch.from_numpy(task.y_test)).double().mean()), logits
