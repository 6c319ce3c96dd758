"""``semoe convert``: an HF checkpoint folder (Mixtral, Qwen2-MoE, OLMoE) -> a semoe checkpoint folder, and back."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF MoE checkpoint into a semoe checkpoint, or back",
                       description="--from-hf DIR: convert an HF checkpoint folder (config.json + safetensors, sharded "
                       "or not) of Mixtral, Qwen2-MoE or OLMoE into a semoe checkpoint (one tensor per global expert "
                       "id), one tensor in memory at a time; the result serves `semoe generate --model OUT`. "
                       "--to-hf CKPT: write a semoe checkpoint (a run folder, e.g. a `semoe train --init-from` "
                       "fine-tune, or a step folder) as an HF folder that transformers' from_pretrained loads: "
                       "config.json, safetensors shards with an index (per-expert keys, as the original "
                       "checkpoints), generation_config.json and the tokenizer files.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", type=Path, metavar="DIR", help="HF checkpoint folder to convert into semoe's format")
    way.add_argument("--to-hf", type=Path, metavar="CKPT", help="semoe checkpoint to export as an HF folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new folder for the result")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: --from-hf keeps the stored dtype; --to-hf writes the dtype of "
                   "the HF checkpoint the model came from, else the stored one)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="--to-hf: largest safetensors shard, e.g. 5GB, 500MB (binary units; default 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from semoe.inference.convert import convert_hf_checkpoint, convert_to_hf
    from semoe.inference.ring import MiB, process_memory

    if args.to_hf is not None:
        out = convert_to_hf(args.to_hf, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
        label = "HF checkpoint"
    else:
        out = convert_hf_checkpoint(args.from_hf, args.out, dtype=args.dtype)
        label = "semoe checkpoint"
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{label}: {out} ({size / MiB:.1f} MiB); peak RSS {process_memory().get('peak_rss', 0):.1f} MiB")
    return 0
