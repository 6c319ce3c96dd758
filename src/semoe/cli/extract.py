"""``semoe extract``: a standalone single-task model from a multi-task (elastic) checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from semoe.storage import checkpoint as ckpt


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract one task's model from a multi-task checkpoint",
                       description="Write a standalone single-task model (shared parts, the task's experts, policy "
                       "and head) and report its held-out accuracy next to the multi-task model's, and its size.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a step_* folder or a run's checkpoints folder")
    p.add_argument("--task", required=True, help="the task to keep")
    p.add_argument("--out", type=Path, required=True, help="a new folder for model.safetensors + config.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from semoe.elastic.extract import accuracy, extract_task, load_multitask_model, load_single_task

    path = ckpt.find_latest(args.checkpoint)
    if path is None:
        raise ValueError(f"no checkpoint at {args.checkpoint}; pass a step_* folder or a run's checkpoints folder")
    size = extract_task(path, args.task, args.out)
    full, data = load_multitask_model(path)
    acc_full, _ = accuracy(full, data[args.task])
    acc_task, _ = accuracy(load_single_task(args.out), data[args.task])
    print(f"task {args.task}: held-out accuracy {acc_task:.4f} (multi-task model: {acc_full:.4f})")
    print(f"size: {size['params']:,} parameters ({100 * size['fraction']:.1f}% of the multi-task model's "
          f"{size['params_multitask']:,}), {size['bytes'] / 1e6:.2f} MB in {args.out / 'model.safetensors'}")
    return 0
