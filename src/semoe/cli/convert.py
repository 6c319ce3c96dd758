"""``semoe convert``: an HF checkpoint folder (Mixtral, Qwen2-MoE, OLMoE) -> a semoe checkpoint folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF MoE checkpoint into a semoe checkpoint",
                       description="Convert an HF checkpoint folder (config.json + safetensors, sharded or not) of "
                       "Mixtral, Qwen2-MoE or OLMoE into a semoe checkpoint (one tensor per global expert id), one "
                       "tensor in memory at a time. The result serves `semoe generate --model OUT`.")
    p.add_argument("--from-hf", type=Path, required=True, metavar="DIR", help="HF checkpoint folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new folder for the semoe checkpoint")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: keep the stored dtype)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from semoe.inference.convert import convert_hf_checkpoint
    from semoe.inference.ring import MiB, process_memory

    out = convert_hf_checkpoint(args.from_hf, args.out, dtype=args.dtype)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"semoe checkpoint: {out} ({size / MiB:.1f} MiB); peak RSS {process_memory().get('peak_rss', 0):.1f} MiB")
    return 0
