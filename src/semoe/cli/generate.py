"""``semoe generate``: sample text from a trained checkpoint (KV cache)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Generate text from a semoe checkpoint with a KV cache.")
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder, checkpoints folder or step_* folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from semoe.inference.generate import generate
    from semoe.inference.load import load_checkpoint_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tok, _ = load_checkpoint_model(args.checkpoint)
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; it was not written by `semoe train`")
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("--prompt is empty after tokenisation")
    room = model.cfg.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"--prompt is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}")
    g = torch.Generator().manual_seed(args.seed)
    new = generate(model, [ids], max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                   top_p=args.top_p, eos_id=tok.token_to_id("<|endoftext|>"), generator=g)[0]
    print(tok.decode(ids + new))
    return 0
