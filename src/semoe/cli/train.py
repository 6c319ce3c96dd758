"""``semoe train``: train an MoE language model (1 process, or N expert-parallel ranks via torchrun)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from semoe.config import RunConfig, apply_overrides, replace, to_dict
from semoe.models.recipes import RECIPES, get_recipe
from semoe.parallel.mesh import launched_by_torchrun, torchrun_env
from semoe.storage import checkpoint as ckpt
from semoe.training.data import default_cache_dir

if TYPE_CHECKING:
    from semoe.training.init import PretrainedInit

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an MoE language model",
                       description="Train a decoder-only MoE transformer. With --nproc N > 1 this starts torchrun "
                       "for you (N expert-parallel ranks); `torchrun ... -m semoe train ...` works directly too, "
                       "multi-node included.")
    p.add_argument("--recipe", default=None, help=f"model+training recipe: {', '.join(sorted(RECIPES))} "
                   "(default: small; with --init-from: finetune, whose model is replaced by the checkpoint's)")
    p.add_argument("--init-from", type=Path, default=None, metavar="HF_DIR",
                   help="fine-tune an HF checkpoint folder (Mixtral, Qwen2-MoE, OLMoE): model config from its "
                   "config.json, weights from its safetensors (each rank reads only its experts), tokenizer from "
                   "its tokenizer.json; --set overrides apply on top; export with `semoe convert --to-hf`")
    p.add_argument("--data", default=None, help="text file, folder of .txt/.md, or JSONL with a 'text' field or "
                   "'prompt'/'completion' fields (loss on the completion only; examples packed whole into "
                   "sequences) (default: Shakespeare, fetched once into the cache)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the recipe)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<recipe>)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (expert-parallel ranks)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-3 --set model.moe.router.top_k=1")
    p.add_argument("--resume", default="auto", help="'auto' (continue from the newest checkpoint in --out if any), "
                   "'none' (refuse if --out has checkpoints), or a checkpoint path")
    p.add_argument("--cache-dir", type=Path, default=None, help="data/tokenizer cache (default: ~/.cache/semoe)")
    p.add_argument("--sample", default="ROMEO:", help="prompt for the sample printed at the end ('' to skip)")
    p.add_argument("--max-restarts", type=int, default=None, help="restarts of the whole job after a lost rank "
                   "(torchrun elastic; the ranks resume from the last checkpoint in --out, --recipe multitask "
                   "re-plans on a new world size); multi-node: run torchrun --nnodes MIN:MAX yourself, see "
                   "docs/elastic.md")
    p.add_argument("--plan", type=Path, default=None, help="--recipe multitask: a plan file (JSON) to use instead "
                   "of the planner's")
    p.set_defaults(func=run)


def recipe_name(args: argparse.Namespace) -> str:
    if args.recipe is not None:
        return args.recipe
    return "finetune" if getattr(args, "init_from", None) is not None else "small"


def build_run_config(args: argparse.Namespace, init: PretrainedInit | None = None) -> RunConfig:
    """The recipe; with ``init`` its model is the pretrained checkpoint's; then the ``--set`` overrides."""
    run = get_recipe(recipe_name(args))
    if init is not None:
        run = replace(run, model=init.model_config)
    run = apply_overrides(run, list(args.overrides))
    if args.data is not None:
        run = replace(run, data=args.data)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        run = replace(run, train=replace(run.train, steps=args.steps))
    return run


def preflight(run: RunConfig, args: argparse.Namespace, out: Path, init: PretrainedInit | None = None) -> None:
    """Checks that must fail before any process starts or anything is written."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    env = torchrun_env()
    world = env["world_size"] if env["world_size"] > 1 else args.nproc
    ep = run.parallel.resolve_ep(world)
    if world % ep:
        raise ValueError(f"{world} ranks are not divisible by parallel.ep_size={ep}")
    if run.model.moe.num_experts % ep:
        raise ValueError(f"--nproc {args.nproc} does not divide num_experts={run.model.moe.num_experts}; "
                         f"use --nproc in {[d for d in range(1, 9) if run.model.moe.num_experts % d == 0]} "
                         "or set parallel.ep_size")
    if run.data is not None and not Path(run.data).exists():
        raise FileNotFoundError(f"--data {run.data} does not exist; pass a text file, a folder or a .jsonl file")
    existing = ckpt.find_latest(out / "checkpoints") if (out / "checkpoints").exists() else None
    if existing is not None:
        if args.resume == "none":
            raise ValueError(f"{out} already holds checkpoint {existing}; choose another --out or --resume auto")
        if args.resume == "auto":
            manifest = ckpt.read_manifest(existing, verify=False)
            from semoe.training.init import RandomInit
            from semoe.training.trainer import config_mismatch

            problem = (init if init is not None else RandomInit()).resume_problem(manifest)
            if problem:
                raise ckpt.CheckpointError(f"{out} holds checkpoint {existing}, which cannot be resumed: {problem}; "
                                           "use another --out (nothing was written)")

            diff = config_mismatch(to_dict(run.model), manifest["config"]["model"])
            diff = [d for d in diff if not d.startswith("vocab_size")]  # the tokenizer may shrink the vocab
            if diff:
                raise ckpt.CheckpointError(
                    f"{out} holds a checkpoint of a different model config ({'; '.join(diff[:4])}); "
                    "use another --out, or the same recipe and overrides to resume")


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """The worker's argv: without --nproc and --max-restarts (torchrun handles those)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        out.append(a)
    return out


def check_restarts(args: argparse.Namespace) -> int:
    """--max-restarts as a number (0 when not given); a restarted job must be able to resume from --out."""
    restarts = 0 if args.max_restarts is None else args.max_restarts
    if restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0 (got {restarts}): how many times torchrun restarts the job "
                         "after a lost rank")
    if restarts > 0 and args.resume != "auto":
        raise ValueError(f"--max-restarts {restarts} with --resume {args.resume!r}: a restarted job continues from "
                         "the newest checkpoint in --out, so use --resume auto (the default)")
    return restarts


def print_sample(ckpt_path: Path, prompt: str) -> None:
    import torch

    from semoe.inference.generate import generate
    from semoe.inference.load import load_checkpoint_model

    model, tok, _ = load_checkpoint_model(ckpt_path)
    if tok is None or not prompt:
        return
    ids = tok.encode(prompt).ids
    g = torch.Generator().manual_seed(0)
    eos = tok.token_to_id("<|endoftext|>")
    room = model.cfg.max_seq_len - len(ids)
    if room < 1:
        return
    new = generate(model, [ids], max_new_tokens=min(80, room), temperature=0.8, top_p=0.95, eos_id=eos, generator=g)[0]
    print("\n--- sample ---\n" + tok.decode(ids + new) + "\n--------------")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if recipe_name(args) == "multitask":
        from semoe.cli.train_multitask import run_multitask

        return run_multitask(args, argv)
    if args.plan is not None:
        raise ValueError("--plan belongs to elastic multi-task training: use --recipe multitask")
    restarts = check_restarts(args)
    init = None
    if args.init_from is not None:
        from semoe.training.init import PretrainedInit

        init = PretrainedInit.from_hf(args.init_from)
    run_cfg = build_run_config(args, init)
    out = args.out if args.out is not None else Path("runs") / recipe_name(args)
    preflight(run_cfg, args, out, init)
    cache_dir = args.cache_dir or default_cache_dir()
    env = torchrun_env()
    if (args.nproc > 1 or restarts > 0) and env["world_size"] == 1 and not launched_by_torchrun():
        sub_argv = strip_launcher_flags(argv[argv.index("train") + 1:])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               f"--max-restarts={restarts}", "-m", "semoe", "train", *sub_argv, "--sample", ""]
        log.info("starting %d ranks (max %d restarts): %s", args.nproc, restarts, " ".join(cmd))
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"semoe train: {args.nproc} ranks failed (exit {rc}); see the messages above", file=sys.stderr)
            return rc
        result_ckpt = ckpt.find_latest(out / "checkpoints")
    else:
        from semoe.training.trainer import Trainer

        resume = None if args.resume == "none" else args.resume
        trainer = Trainer(run_cfg, out, cache_dir, resume=resume, init=init)
        result = trainer.fit()
        result_ckpt = result.checkpoint
        if trainer.rank != 0:
            return 0
        if result.first_val_loss is not None:
            print(f"validation loss: {result.first_val_loss:.3f} -> {result.last_val_loss:.3f}")
        if env["world_size"] > 1 or launched_by_torchrun():  # a worker: `semoe train --nproc N` prints the rest
            return 0
    print(f"metrics:    {out / 'metrics.csv'}\nplots:      {out / 'loss.png'}, {out / 'expert_load.png'}\n"
          f"checkpoint: {result_ckpt}")
    if args.sample and result_ckpt is not None:
        print_sample(result_ckpt, args.sample)
    return 0
