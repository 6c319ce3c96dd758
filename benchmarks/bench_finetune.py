"""One fine-tuning step (forward, backward, clipping, AdamW) of the same HF Mixtral checkpoint and batch: semoe
(``semoe train --init-from``'s model and ``Trainer.train_step``) against transformers' own model in a plain
PyTorch loop and against DeepSpeed with the HF model (ZeRO-2, and ZeRO-3 with the MoE block as leaf module).

Run from the repository root (timing under the exclusive lock):

    flock -x /tmp/semoe-cpu.lock .venv/bin/python benchmarks/bench_finetune.py          # all contenders
    .venv/bin/python benchmarks/bench_finetune.py --impls semoe,transformers --dtype float32,bfloat16  # best of each
    .venv/bin/python benchmarks/bench_finetune.py --impls semoe,transformers --rounds 3
    .venv/bin/python benchmarks/bench_finetune.py --smoke                              # tiny, seconds (CI)

Contenders (``--impls``, each in its own process so that its peak RSS is its own, rounds alternate the order):

    semoe               PretrainedInit.from_hf (the --init-from path) + Trainer.train_step: HF's routing (dropless,
                        renormalised top-2) and HF's load-balancing loss at router_aux_loss_coef
    transformers        AutoModelForCausalLM.from_pretrained, output_router_logits=True, the experts
                        implementation transformers picks by default (5.x: "grouped_mm"), torch AdamW (fused:
                        HF Trainer's default optimizer with torch >= 2.8, as semoe's Trainer uses)
    transformers-eager  the same with experts_implementation="eager" (the per-expert Python loop)
    deepspeed-zero2     deepspeed.initialize(HF model, torch AdamW, ZeRO stage 2), gloo, 1 process
    deepspeed-zero3     the same with ZeRO stage 3 and deepspeed.utils.set_z3_leaf_modules(model,
                        [MixtralSparseMoeBlock]) (the setup LLaMA-Factory / accelerate use for HF MoE blocks)

Every contender: the same weights (one HF folder written at the start), the same batch every step (random tokens,
seed 0), loss = cross-entropy + router_aux_loss_coef * aux loss, gradient clipping at 1.0, AdamW (lr 1e-5, betas
0.9/0.95, no weight decay), float32 (``--dtype bfloat16``: every contender under CPU autocast, float32 master
weights; ``--dtype float32,bfloat16``: every contender in both, one row each, and the summary's ``speedup_vs_X`` /
``peak_rss_ratio_vs_X`` compare each contender's fastest row, ``..._vs_X@dtype`` the same dtype).
``warmup`` steps, then ``steps`` timed steps; a contender's step time is the median over rounds of each
round's median. ``peak_rss_mb``: the peak resident set while training (``/proc/self/clear_refs`` resets the peak
after loading), ``load_peak_rss_mb``: the peak while loading. ``loss0``: the first step's cross-entropy (equal
across contenders up to float32 rounding: same model, same data). A contender that fails records its error.

``--interleave N``: semoe and the transformers contenders also run in one process (each at its fastest dtype), one
step each in turn (order reversed every step), N steps; ``interleaved_speedup_vs_X`` is the median over those steps
of X's step time over semoe's, the ratio least disturbed by other load on a shared machine.

Output: JSON lines on stdout, one per contender (``impl``, ``tokens_per_s``, ``step_ms``, ``peak_rss_mb``,
``load_peak_rss_mb``, ``loss0``, ``error``), then a summary line (ratios against transformers and DeepSpeed, the
targets of issue #12: >= 1.5x transformers' tokens/s at equal or lower peak memory, ahead of DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import cpu_model, deepspeed_hf_moe_engine, stdout_to_stderr

HERE = Path(__file__).resolve().parent
ALL_IMPLS = ("semoe", "transformers", "transformers-eager", "deepspeed-zero2", "deepspeed-zero3")
LR, BETAS = 1e-5, (0.9, 0.95)  # semoe's recipe betas, given to every contender's AdamW


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="semoe", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma-separated subset of {', '.join(ALL_IMPLS)}")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024, help="expert hidden size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per contender (0: all cores)")
    ap.add_argument("--dtype", default="float32",
                    help="float32, bfloat16 (CPU autocast over float32 weights) or both, comma-separated: each "
                    "contender then runs in each, and the summary compares each one's fastest")
    ap.add_argument("--workdir", type=Path, default=None, help="where the HF folder is written (default: a temp dir)")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="also run semoe and the transformers contenders in one process, N steps each, alternating "
                    "step by step (robust ratios on a noisy machine: interleaved_speedup_vs_*)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 round, semoe and transformers only")
    args = ap.parse_args(argv)
    bad = [d for d in args.dtype.split(",") if d not in ("float32", "bfloat16")]
    if bad:
        ap.error(f"--dtype {bad}: choose float32, bfloat16 or float32,bfloat16")
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.experts, args.heads, args.kv_heads = 2, 64, 96, 4, 4, 2
        args.vocab, args.seq_len, args.batch, args.warmup, args.steps, args.rounds = 256, 32, 4, 1, 2, 1
        if args.impls == ",".join(ALL_IMPLS):
            args.impls = "semoe,transformers"
    return args



# ============================================================================ the model
def write_folder(args: argparse.Namespace, folder: Path) -> Path:
    """A random HF Mixtral (non-trivial norms and routers) + a word-level tokenizer, saved once."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq_len,
        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight"):
                p.normal_(std=0.3)
    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(args.vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2", "bos_token": "w1"}))
    return folder


# ============================================================================ worker
def _reset_peak_rss() -> None:
    """Linux: make VmHWM (the peak RSS) restart from the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    from semoe.inference.ring import process_memory

    return process_memory()["peak_rss"]


def build_step(impl: str, args: argparse.Namespace, folder: Path, rows, info: dict):
    """The training step of contender ``impl`` on the batch ``rows`` [B, S + 1] (a closure returning the loss)."""
    import torch
    import torch.nn.functional as F

    from semoe.precision import autocast

    if impl == "semoe":
        return _semoe_step(args, folder, rows)
    import transformers

    S = args.seq_len
    x, y = rows[:, :S].contiguous(), rows[:, 1:].contiguous()
    dev, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    kwargs = {"experts_implementation": "eager"} if impl == "transformers-eager" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model.config.output_router_logits = True
    model.train()
    coef = model.config.router_aux_loss_coef
    info["experts_implementation"] = model.config._experts_implementation
    # fused: HF Trainer's default optimizer with torch >= 2.8 ("adamw_torch_fused"), semoe's too
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0, fused=True)

    def loss_of(out) -> tuple[torch.Tensor, torch.Tensor]:
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        return ce, ce + coef * out.aux_loss

    if impl.startswith("deepspeed"):
        return _deepspeed_step(impl, model, opt, args.batch, loss_of, x, dev, dtype)

    def step() -> float:
        with autocast(dev, dtype):
            out = model(input_ids=x)
        ce, loss = loss_of(out)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(ce)

    return step


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    impl = args.impl
    result: dict = {"impl": impl, "threads": torch.get_num_threads()}
    try:
        if impl.startswith("interleave:"):  # several contenders in this process, one step each in turn
            names = impl.split(":", 1)[1].split(",")  # impl@dtype: each at its own dtype
            steps = {n: build_step(n.split("@")[0], argparse.Namespace(**{**vars(args), "dtype": n.split("@")[1]}),
                                   args.folder, rows, {}) for n in names}
            for n in names:
                for _ in range(args.warmup):
                    steps[n]()
            times: dict[str, list[float]] = {n: [] for n in names}
            for i in range(args.steps):
                for n in names if i % 2 == 0 else names[::-1]:
                    t0 = time.perf_counter()
                    steps[n]()
                    times[n].append(time.perf_counter() - t0)
            result["times"] = times
        else:
            step = build_step(impl, args, args.folder, rows, result)
            result["load_peak_rss_mb"] = _peak_rss_mb()
            _reset_peak_rss()
            losses = [step() for _ in range(args.warmup)]
            times_s = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                losses.append(step())
                times_s.append(time.perf_counter() - t0)
            result.update(step_s=statistics.median(times_s), peak_rss_mb=_peak_rss_mb(), loss0=losses[0],
                          loss_last=losses[-1])
    except Exception as e:  # a contender that cannot run reports why (DeepSpeed ZeRO-3 on CPU, ...)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-3000:]
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed can abort at interpreter exit (see the shared notes on peers)


def _semoe_step(args: argparse.Namespace, folder: Path, rows):
    import numpy as np

    from semoe.config import replace
    from semoe.models.recipes import finetune
    from semoe.training.data import Corpus, GlobalBatchLoader
    from semoe.training.init import PretrainedInit
    from semoe.training.trainer import Trainer

    init = PretrainedInit.from_hf(folder)
    S, B = args.seq_len, args.batch
    tc = replace(finetune().train, steps=10**6, batch_size=B, seq_len=S, lr=LR, min_lr=LR, warmup_steps=0, betas=BETAS,
                 weight_decay=0.0, grad_clip=1.0, dtype=args.dtype, eval_batches=1, val_fraction=0.4)
    run = replace(finetune(), model=init.model_config, train=tc)
    # a corpus of the batch's rows (its validation windows are never used here), then the trainer's loader on
    # exactly those B rows: every step trains on the same batch as the other contenders
    tokens = rows.reshape(-1).numpy().astype(np.int32)
    tokens = np.concatenate([tokens] * 5)
    corpus = Corpus(tokens=tokens, tokenizer_path=folder / "tokenizer.json", fingerprint="bench", vocab_size=args.vocab,
                    eos_id=2)
    work = Path(tempfile.mkdtemp(prefix="semoe-bench-ft-"))
    trainer = Trainer(run, work / "run", work / "cache", resume=None, corpus=corpus, init=init)
    trainer.loader = GlobalBatchLoader(tokens, np.arange(B, dtype=np.int64) * (S + 1), S, B, seed=0)
    state = {"step": 0}

    def step() -> float:
        loss = trainer.train_step(state["step"])["loss"]
        state["step"] += 1
        return loss

    return step


def _deepspeed_step(impl: str, model, opt, B: int, loss_of, x, dev, dtype):
    from semoe.precision import autocast

    stage = 3 if impl == "deepspeed-zero3" else 2  # at 3 the MoE block is a leaf module
    engine = deepspeed_hf_moe_engine(model, B, {"stage": stage}, optimizer=opt, config={"gradient_clipping": 1.0})

    def step() -> float:
        with autocast(dev, dtype):
            out = engine(input_ids=x)
        ce, loss = loss_of(out)
        engine.backward(loss)
        engine.step()
        return float(ce)

    return step


# ============================================================================ driver
def _launch(args: argparse.Namespace, impl: str, folder: Path, dtype: str) -> dict:
    args = argparse.Namespace(**{**vars(args), "dtype": dtype})
    cmd = [sys.executable, str(HERE / "bench_finetune.py"), "--worker", "--impl", impl, "--folder", str(folder),
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
               "layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "vocab", "seq_len",
               "batch", "warmup", "steps", "threads", "dtype")]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            if "error" in res:
                print(f"[bench_finetune] {impl} failed: {res['error']}\n{res.get('traceback', '')}", file=sys.stderr)
            return res
    print(f"[bench_finetune] {impl} exited {p.returncode} without a result:\n{p.stderr[-3000:]}", file=sys.stderr)
    return {"impl": impl, "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr else ''}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import importlib.util

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in ALL_IMPLS]
    if unknown:
        print(f"unknown --impls {unknown}; choose from {list(ALL_IMPLS)}", file=sys.stderr)
        return 2
    if any(i.startswith("deepspeed") for i in impls) and importlib.util.find_spec("deepspeed") is None:
        print("[bench_finetune] deepspeed is not installed (pip install -e '.[bench]'): its rows are skipped",
              file=sys.stderr)
        impls = [i for i in impls if not i.startswith("deepspeed")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="semoe-bench-ft-"))
    folder = work / "hf"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with stdout_to_stderr():  # transformers' import may print (DeepSpeed's accelerator notice)
            write_folder(args, folder)
    meta = {"cpu": cpu_model(), "dtype": args.dtype, "tokens_per_step": args.batch * args.seq_len,
            "model": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "experts", "top_k", "vocab",
                                                    "seq_len", "batch")}}
    dtypes = args.dtype.split(",")
    meta["dtype"] = args.dtype
    cases = [(i, d) for i in impls for d in dtypes]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        order = cases if r % 2 == 0 else cases[::-1]
        for impl, dtype in order:
            print(f"[bench_finetune] round {r + 1}/{args.rounds}: {impl} {dtype}", file=sys.stderr, flush=True)
            runs[impl, dtype].append(_launch(args, impl, folder, dtype))
    every: dict[tuple[str, str], dict] = {}
    for (impl, dtype), results in runs.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            row = {"impl": impl, "error": results[0].get("error"), **meta, "dtype": dtype}
        else:
            step_s = statistics.median(x["step_s"] for x in ok)
            row = {"impl": impl, "tokens_per_s": args.batch * args.seq_len / step_s, "step_ms": 1e3 * step_s,
                   "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in ok),
                   "load_peak_rss_mb": statistics.median(x["load_peak_rss_mb"] for x in ok),
                   "loss0": ok[0]["loss0"], "loss_last": ok[0]["loss_last"], "rounds": len(ok),
                   "threads": ok[0]["threads"],
                   "experts_implementation": ok[0].get("experts_implementation"), **meta, "dtype": dtype}
        every[impl, dtype] = row
        print(json.dumps(row), flush=True)
    # each contender at its best configuration: its fastest dtype
    rows = {}
    for impl in impls:
        ran = [every[impl, d] for d in dtypes if "tokens_per_s" in every[impl, d]]
        rows[impl] = max(ran, key=lambda x: x["tokens_per_s"]) if ran else every[impl, dtypes[0]]
    sem = rows.get("semoe", {})
    summary: dict = {"summary": True, "smoke": args.smoke, **meta,
                     "best_dtype": {i: r.get("dtype") for i, r in rows.items() if "tokens_per_s" in r}}
    for peer in impls:
        for d in dtypes if len(dtypes) > 1 else ():  # the same dtype on both sides
            a, b = every["semoe", d] if "semoe" in impls else {}, every[peer, d]
            if peer != "semoe" and "tokens_per_s" in a and "tokens_per_s" in b:
                summary[f"speedup_vs_{peer}@{d}"] = a["tokens_per_s"] / b["tokens_per_s"]
                summary[f"peak_rss_ratio_vs_{peer}@{d}"] = a["peak_rss_mb"] / b["peak_rss_mb"]
    for peer in impls:
        if peer == "semoe" or "tokens_per_s" not in rows[peer] or "tokens_per_s" not in sem:
            continue
        summary[f"speedup_vs_{peer}"] = sem["tokens_per_s"] / rows[peer]["tokens_per_s"]
        summary[f"peak_rss_ratio_vs_{peer}"] = sem["peak_rss_mb"] / rows[peer]["peak_rss_mb"]
    spreads = []
    for d in dtypes:  # the same model and batch: the same first loss within a dtype
        losses = [v["loss0"] for (_, dd), v in every.items() if dd == d and "loss0" in v]
        spreads += [max(losses) - min(losses)] if losses else []
    summary["loss0_spread"] = max(spreads) if spreads else None
    tf, ds = rows.get("transformers", {}), [rows[i] for i in impls if i.startswith("deepspeed")]
    if "tokens_per_s" in sem and "tokens_per_s" in tf:
        summary["target_1.5x_transformers_at_le_memory"] = (summary["speedup_vs_transformers"] >= 1.5
                                                            and sem["peak_rss_mb"] <= tf["peak_rss_mb"])
    ran = [d for d in ds if "tokens_per_s" in d]
    if "tokens_per_s" in sem and ran:
        summary["target_ahead_of_deepspeed"] = all(sem["tokens_per_s"] > d["tokens_per_s"] for d in ran)
    inter = [i for i in impls if i == "semoe" or i.startswith("transformers")]
    inter = [i for i in inter if "tokens_per_s" in rows[i]]
    if args.interleave and "semoe" in inter and len(inter) > 1:
        tags = [f"{i}@{rows[i]['dtype']}" for i in inter]  # each at its fastest dtype
        print(f"[bench_finetune] interleaved: {', '.join(tags)}", file=sys.stderr, flush=True)
        res = _launch(argparse.Namespace(**{**vars(args), "steps": args.interleave}), "interleave:" + ",".join(tags),
                      folder, dtypes[0])
        if "times" in res:
            t = {k.split("@")[0]: v for k, v in res["times"].items()}
            for peer in inter[1:]:
                summary[f"interleaved_speedup_vs_{peer}"] = statistics.median(
                    b / a for a, b in zip(t["semoe"], t[peer]))
            summary["interleaved_step_ms"] = {k: 1e3 * statistics.median(v) for k, v in res["times"].items()}
    summary["errors"] = {f"{k}@{d}": v["error"] for (k, d), v in every.items() if "error" in v} or None
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
