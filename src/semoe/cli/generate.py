"""``semoe generate``: generate text from an HF checkpoint folder or a semoe checkpoint, optionally with a
memory budget (ring-memory inference: the model streams from disk through a ring of slots)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a checkpoint (HF or semoe), within a memory budget",
        description="Generate text from a model folder: an HF checkpoint (Mixtral, Qwen2-MoE, OLMoE: config.json + "
        "safetensors) or a semoe checkpoint (a run folder, its checkpoints folder or a step folder). With "
        "--max-memory the model streams from disk through a ring of slots that fits the budget (SE-MoE ring "
        "memory); all prompts are processed together, each loaded section serving every micro-batch. Prints "
        "the texts, then tokens/s and peak memory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="HF checkpoint folder or semoe checkpoint folder")
    src.add_argument("--checkpoint", type=Path, help="same as --model (kept for `semoe train` checkpoints)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="text to continue")
    prompts.add_argument("--prompts-file", type=Path, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget for weights, KV cache and activations, e.g. 300MB, 2GB (binary units); "
                   "default: no budget, the whole model is loaded")
    p.add_argument("--slots", type=int, default=None, metavar="K", help="ring slots (default 2; >= 2)")
    p.add_argument("--layers-per-section", type=int, default=1, metavar="N",
                   help="units per section; the embedding and the head count as units (default 1)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per micro-batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--kv-device", default=None, help="where the KV cache lives (default: the compute device)")
    p.add_argument("--dtype", default="auto", metavar="{auto,float32,bfloat16,float16}",
                   help="compute dtype (default auto: on a CPU bfloat16 where its matmul is measured fast, else "
                   "float32; on CUDA the checkpoint's 16-bit dtype); a file in another dtype is cast while read")
    p.add_argument("--strategy", default="auto", metavar="{auto,layer,routed}",
                   help="how MoE layers are loaded in the ring: layer (whole layers), routed (the dense part, then "
                   "only the experts the routers pick, predicted ones ahead), auto (default: a cost model per layer "
                   "and pass from the expected routed fraction, the expert cache and measured read rates)")
    p.add_argument("--expert-cache", default="auto", metavar="SIZE",
                   help="memory for routed experts kept between uses (decayed-LFU cache): auto (default: what the "
                   "budget leaves after the ring and the KV caches), a size such as 200MB, or 0 (off)")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="drop each section's file pages from the kernel page cache after reading it")
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt texts of ``--prompt`` or ``--prompts-file``."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give some text to continue")
        return [args.prompt]
    path: Path = args.prompts_file
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts-file {path} has no prompts; write one prompt per line")
    return lines


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch
    from tokenizers import Tokenizer

    from semoe.inference.ring import MiB, RingEngine, parse_size, process_memory
    from semoe.inference.sections import open_model
    from semoe.precision import dtype_name

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.expert_cache not in ("auto", "0", "off"):
        parse_size(args.expert_cache)  # a clear error before anything is loaded
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    budget = parse_size(args.max_memory) if args.max_memory is not None else None
    texts = read_prompts(args)
    source = open_model(args.model if args.model is not None else args.checkpoint)
    if source.tokenizer_file is None:
        raise ValueError(f"{source.path} has no tokenizer.json; put the model's tokenizer.json in that folder "
                         "(HF fast tokenizer format)")
    tok = Tokenizer.from_file(str(source.tokenizer_file))
    ids = [tok.encode(t).ids for t in texts]
    limits = []
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i + 1} is empty after tokenisation")
        room = source.cfg.max_seq_len - len(x)
        if room < 1:
            raise ValueError(f"prompt {i + 1} is {len(x)} tokens; the model's context is {source.cfg.max_seq_len}")
        limits.append(min(args.max_new_tokens, room))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    with RingEngine(source, max_memory=budget, slots=args.slots, layers_per_section=args.layers_per_section,
                    device=device, dtype=args.dtype, kv_device=args.kv_device, batch_size=args.batch_size,
                    drop_page_cache=args.drop_page_cache, strategy=args.strategy,
                    expert_cache=0 if args.expert_cache in ("0", "off") else args.expert_cache) as engine:
        result = engine.generate(ids, limits, eos_id=source.eos_ids or None, temperature=args.temperature,
                                 top_p=args.top_p, generator=g)
        mode = "all sections resident" if engine.resident else f"ring of K={engine.num_slots} slots"
        mode += f", {dtype_name(engine.dtype)}"
    for i, (x, new) in enumerate(zip(ids, result.tokens)):
        text = tok.decode(x + new)
        print(text if len(ids) == 1 else f"[{i + 1}] {text}")
    st = result.stats
    mem = process_memory()
    print(f"tokens/s: {st.tokens_per_s:.2f} ({st.new_tokens} new tokens in {st.wall_s:.2f} s, {st.prompt_tokens} "
          f"prompt tokens, {st.passes} passes, {st.bytes_read / MiB:.1f} MiB read; {mode})")
    line = f"read: {st.bytes_per_token / MiB:.2f} MiB per new token"
    if st.experts_needed:
        line += (f"; routed experts: cache hit rate {100 * st.cache_hit_rate:.0f}%, prediction hit rate "
                 f"{100 * st.prefetch_hit_rate:.0f}% ({st.experts_needed} picked, {st.expert_misses} read on demand; "
                 f"{st.routed_layer_loads} routed / {st.full_layer_loads} whole-layer loads)")
    elif not engine.resident:
        line += f"; cache hit rate 0% (whole layers streamed: {st.full_layer_loads} loads)"
    print(line)
    line = (f"peak memory: {mem.get('peak_rss', st.peak_rss_mb):.1f} MiB RSS (anon {st.peak_anon_mb:.1f} MiB, "
            f"file-backed {st.peak_file_mb:.1f} MiB)")
    if budget is not None:
        line += f"; budget {budget / MiB:.1f} MiB"
    if st.peak_device_mb:
        line += f"; device {st.peak_device_mb:.1f} MiB"
    print(line)
    if st.copy_s > 0:
        print(f"host-to-device: {st.h2d_gb_per_s:.1f} GB/s ({st.copy_bytes / MiB:.1f} MiB in {st.copy_s:.3f} s), "
              f"{100 * st.copy_hidden_share:.0f}% of the copy time hidden under compute")
    return 0
