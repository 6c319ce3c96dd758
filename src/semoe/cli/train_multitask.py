"""``semoe train --recipe multitask``: elastic multi-task training (``semoe.elastic``), 1 process or N ranks
under torchrun, restarted by torchrun after a lost rank (``--max-restarts``)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from semoe.cli.train import strip_launcher_flags
from semoe.config import MultiTaskRunConfig, apply_overrides, replace
from semoe.elastic.data import TASKS
from semoe.elastic.planner import Plan, load_plan
from semoe.models.recipes import get_recipe
from semoe.parallel.mesh import launched_by_torchrun, torchrun_env
from semoe.storage import checkpoint as ckpt

log = logging.getLogger(__name__)


def build_config(args: argparse.Namespace) -> MultiTaskRunConfig:
    run: MultiTaskRunConfig = apply_overrides(get_recipe("multitask"), list(args.overrides))
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        run = replace(run, train=replace(run.train, steps=args.steps))
    if args.max_restarts is not None:
        run = replace(run, elastic=replace(run.elastic, max_restarts=args.max_restarts))  # validates >= 0
    return run


def preflight(run: MultiTaskRunConfig, args: argparse.Namespace, out: Path, world: int) -> Plan | None:
    """Everything that must fail before a process starts or a file is written; returns the plan file's plan."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    batches = run.elastic.task_batches()
    unknown = [t for t in batches if t not in TASKS]
    if unknown:
        raise ValueError(f"elastic.tasks names unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    if not run.elastic.share_ranks and len(batches) > world:
        raise ValueError(f"{len(batches)} tasks but {world} ranks and elastic.share_ranks=false: every task needs a "
                         "rank of its own; use more ranks (--nproc), fewer tasks or --set elastic.share_ranks=true")
    plan = load_plan(args.plan, world, batches) if args.plan is not None else None
    existing = ckpt.find_latest(out / "checkpoints") if (out / "checkpoints").exists() else None
    if existing is not None:
        if args.resume == "none":
            raise ValueError(f"{out} already holds checkpoint {existing}; choose another --out or --resume auto")
        from semoe.elastic.checkpoint import check_task_set

        check_task_set(ckpt.read_manifest(existing, verify=False), batches, existing)
    return plan


def run_multitask(args: argparse.Namespace, argv: list[str]) -> int:
    run = build_config(args)
    out = args.out if args.out is not None else Path("runs") / "multitask"
    env = torchrun_env()
    under_torchrun = env["world_size"] > 1 or launched_by_torchrun()
    world = env["world_size"] if under_torchrun else args.nproc
    plan = preflight(run, args, out, world)
    if not under_torchrun and (args.nproc > 1 or run.elastic.max_restarts > 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               f"--max-restarts={run.elastic.max_restarts}", "-m", "semoe", "train",
               *strip_launcher_flags(argv[argv.index("train") + 1:])]
        log.info("starting %d ranks (max %d restarts): %s", args.nproc, run.elastic.max_restarts, " ".join(cmd))
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"semoe train: {args.nproc} ranks failed (exit {rc}); see the messages above", file=sys.stderr)
        return rc
    from semoe.training.elastic_trainer import ElasticTrainer

    trainer = ElasticTrainer(run, out, resume=None if args.resume == "none" else args.resume, plan=plan)
    result = trainer.fit()
    if trainer.rank != 0:
        return 0
    print(result.plan.describe())
    print("held-out accuracy per task (chance):")
    for t, acc in result.accuracy.items():
        print(f"  {t:>8}: {acc:.3f} ({1 / trainer.data[t].num_classes:.3f})")
    stall = max(result.stalls_s) if result.stalls_s else 0.0
    step = sorted(result.step_s)[len(result.step_s) // 2] if result.step_s else 0.0
    write = max(trainer.checkpointer.write_s) if trainer.checkpointer.write_s else 0.0
    print(f"checkpoint stall per save: max {1e3 * stall:.1f} ms (median step {1e3 * step:.1f} ms; the write itself, "
          f"in the background: up to {1e3 * write:.1f} ms)")
    print(f"metrics:    {out / 'metrics.csv'}\nplots:      {out / 'task_loss.png'}, {out / 'task_accuracy.png'}\n"
          f"checkpoint: {result.checkpoint}")
    return 0
