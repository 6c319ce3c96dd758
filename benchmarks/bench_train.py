"""Full training step of the same GPT-MoE: semoe (each communication switch) against DeepSpeed.

Run from the repository root:

    python benchmarks/bench_train.py                       # 2 ranks on loopback, semoe features vs DeepSpeed
    python benchmarks/bench_train.py --zero 1              # DeepSpeed with ZeRO stage 1
    sudo python benchmarks/bench_train.py --topology two-node --link-mbit 200 --bucket-mb 2 \
        --features plain,fusion,hgrad,overlap,overlap+hgrad   # 4 ranks, 2 emulated nodes
    python benchmarks/bench_train.py --smoke               # tiny, seconds, semoe only (CI)
    python benchmarks/bench_train.py --device cuda --nproc 1 --features fusion   # one GPU (NCCL), vs DeepSpeed

Each contender runs in its own ``torchrun`` job (so peak RSS is its own), jobs alternate
(A B A B ...), every job warms up and then times steps; a step lasts as long as the slowest rank.
The report per contender is the median over jobs of each job's median step.

Same model for both: the decoder-only transformer of ``semoe.models`` (RMSNorm, RoPE, causal SDPA);
for DeepSpeed each MoE layer is replaced by ``deepspeed.moe.layer.MoE`` with SwiGLU experts of the same
size, same top-2, same capacity factor (DeepSpeed per rank, semoe over the expert-parallel group: the
same number of slots in total), no noise, ``top2_2nd_expert_sampling=False``, ``use_rts=False``; both
train with AdamW (DeepSpeed through ``deepspeed.initialize`` with the ZeRO stage of ``--zero``),
gradient clipping 1.0, aux coefficient 0.01. The batch is random tokens, the same on both. ``--dtype
bfloat16``: both forwards run under ``torch.autocast`` over float32 weights and AdamW state.

Features of semoe (``--features``, comma separated; each is ``ParallelConfig`` switches):
    plain     no fusion, flat all-to-all, no chunking (one synchronous all-reduce per class)
    fusion    gradient buckets reduced asynchronously during backward
    hgrad     + fusion buckets reduced hierarchically (in the node, across nodes per rail, in the node)
    hier      + hierarchical all-to-all with node-level de-duplication
    overlap   + dispatch in 2 chunks, all-to-all overlapped with expert compute
    overlap+hgrad  fusion + overlap + hgrad
    all       fusion + hgrad + hier + overlap
    bf16wire  fusion + tokens and their gradients cross the all-to-all in bfloat16 (lossy; DeepSpeed sends float32)
    hier+bf16wire  fusion + hier + bf16 wire

Output: JSON lines on stdout: one per contender with ``impl``, ``world``, ``features``, ``tokens_per_s``,
``step_ms``, ``peak_rss_mb`` (max over ranks of the job's peak RSS, median over jobs), ``a2a_share`` (time
inside ``all_to_all_single`` / step time, rank 0), then one summary line with ``ratio_vs_deepspeed``
per feature set and ``peak_rss_ratio``.

Topology emulation (``--topology two-node``, root, Linux): ``benchmarks/topology.sh up`` creates two
network namespaces joined by a veth pair rate-limited with ``tc`` (``--link-mbit``); ranks 0-1 run in
namespace 0, ranks 2-3 in namespace 1 (torchrun ``--nnodes 2``, LOCAL_WORLD_SIZE 2); traffic inside a
namespace stays on its loopback, traffic between them crosses the limited link. ``down`` removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import emit_result, forward_args, read_results  # noqa: E402

FEATURES = {
    "plain": {"grad_fusion": False, "hierarchical_a2a": False, "a2a_chunks": 1},
    "fusion": {"grad_fusion": True, "hierarchical_a2a": False, "a2a_chunks": 1},
    "hgrad": {"grad_fusion": True, "hierarchical_grads": True, "a2a_chunks": 1},
    "hier": {"grad_fusion": True, "hierarchical_a2a": True, "a2a_chunks": 1},
    "overlap": {"grad_fusion": True, "hierarchical_a2a": False, "a2a_chunks": 2},
    "overlap+hgrad": {"grad_fusion": True, "hierarchical_grads": True, "a2a_chunks": 2},
    "all": {"grad_fusion": True, "hierarchical_grads": True, "hierarchical_a2a": True, "a2a_chunks": 2},
    "bf16wire": {"grad_fusion": True, "hierarchical_a2a": False, "a2a_chunks": 1, "a2a_wire_dtype": "bfloat16"},
    "hier+bf16wire": {"grad_fusion": True, "hierarchical_a2a": True, "a2a_chunks": 1, "a2a_wire_dtype": "bfloat16"},
}
TARGETS = {"loopback": 1.1, "two-node": 1.33}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="semoe", choices=["semoe", "deepspeed"], help=argparse.SUPPRESS)
    ap.add_argument("--feature", default="fusion", help=argparse.SUPPRESS)
    ap.add_argument("--features", default="plain,fusion,overlap", help="semoe feature sets to run (see above)")
    ap.add_argument("--peers", default="auto", choices=["auto", "deepspeed", "none"])
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="semoe fusion bucket size in MiB")
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    ap.add_argument("--nproc", type=int, default=2, help="ranks on loopback (topology two-node: 4)")
    ap.add_argument("--topology", default="loopback", choices=["loopback", "two-node"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: one GPU per rank, NCCL, peak device memory reported (default cpu: gloo, CUDA hidden)")
    ap.add_argument("--link-mbit", type=float, default=1000.0, help="inter-node link rate for two-node")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per step, all ranks")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per job")
    ap.add_argument("--jobs", type=int, default=2, help="jobs per contender (alternating)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, semoe only, seconds")
    ap.add_argument("--interleave", action="store_true",
                    help="run all semoe feature sets in ONE job per round, a model each, alternating step by step "
                         "(differences between them are then not hidden by drift between jobs; peak RSS is shared "
                         "and not reported); the summary's interleaved_speedup is the median step-time ratio of "
                         "each feature set against the first")
    ap.add_argument("--json", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="compute dtype of both contenders: bfloat16 = torch.autocast over float32 weights and "
                         "AdamW state (train.dtype=bfloat16); auto = semoe.precision's choice (default float32)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.d_ff, args.experts, args.seq_len = 2, 64, 128, 4, 32
        args.global_batch, args.vocab, args.warmup, args.steps, args.jobs = 4, 256, 1, 2, 1
        args.features = "plain,all" if args.topology == "loopback" else args.features
        args.peers = "none"
    if args.topology == "two-node":
        args.nproc = 4
    return args


# ============================================================================ worker (inside torchrun)
def model_config(args: argparse.Namespace):
    from semoe.config import ModelConfig, MoEConfig, RouterConfig

    router = RouterConfig(top_k=args.top_k, capacity_factor=args.capacity_factor,
                          eval_capacity_factor=args.capacity_factor, normalize_topk=args.top_k > 1,
                          aux_loss_coef=0.01, z_loss_coef=0.0)
    moe = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, activation="swiglu",
                    router=router)
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                       max_seq_len=args.seq_len, dense_d_ff=args.d_ff, moe=moe)


class _A2ATimer:
    """Wall time spent inside ``dist.all_to_all_single`` (both contenders call it; CPU/gloo is synchronous)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        real = dist.all_to_all_single

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = real(*a, **k)
            if k.get("async_op"):
                return out
            self.seconds += time.perf_counter() - t0
            return out

        dist.all_to_all_single = timed


def _ds_swap_moe(model, args, world: int) -> None:
    """Replace every semoe MoELayer by DeepSpeed's MoE with SwiGLU experts of the same size."""
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    from semoe.layers.moe import MoEOutput, MoEStats
    from semoe.models.transformer import MLP as SwiGLU  # the model's dense SwiGLU FFN, as DeepSpeed's expert

    class DSMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoE(hidden_size=args.d_model, expert=SwiGLU(args.d_model, args.d_ff), num_experts=args.experts,
                           ep_size=world, k=args.top_k, capacity_factor=args.capacity_factor,
                           eval_capacity_factor=args.capacity_factor, min_capacity=4, noisy_gate_policy=None,
                           drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
            for ex in self.moe.deepspeed_moe.experts.deepspeed_experts:  # DeepSpeed deep-copies one expert
                for lin in (ex.w1, ex.w3, ex.w2):
                    nn.init.normal_(lin.weight, std=0.02)

        def forward(self, x: torch.Tensor) -> MoEOutput:
            out, l_aux, counts = self.moe(x)
            E = args.experts
            stats = MoEStats(tokens=x.shape[0] * x.shape[1], assignments=0, dropped=0,
                             routed_per_expert=counts.detach().cpu(), tokens_per_expert=counts.detach().cpu(),
                             capacity=None)
            zero = l_aux * 0
            return MoEOutput(out=out, aux_loss=l_aux * E / E, z_loss=zero, router_loss=0.01 * l_aux, stats=stats)

    for block in model.layers:
        if getattr(block, "is_moe", False):
            block.moe = DSMoE()


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from semoe.config import ParallelConfig
    from semoe.models.transformer import MoETransformer
    from semoe.parallel import apply_expert_parallel, build_mesh, clip_grad_norm_, init_distributed, sync_gradients
    from semoe.precision import autocast, dtype_name, resolve_dtype

    init_distributed()  # NCCL when CUDA is visible (the driver hides it for --device cpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = args.device == "cuda"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    compute_dtype = resolve_dtype(args.dtype, dev)
    timer = _A2ATimer()
    cfg = model_config(args)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    local = args.global_batch // world
    g = torch.Generator().manual_seed(1234 + rank)
    batches = [torch.randint(0, args.vocab, (local, args.seq_len + 1), generator=g).to(dev) for _ in range(4)]

    if args.impl == "deepspeed":
        import logging

        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        _ds_swap_moe(model, args, world)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "params"})
        opt = torch.optim.AdamW(groups, lr=1e-3)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": local, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9})

        def step(tokens: torch.Tensor) -> float:
            with autocast(dev, compute_dtype):
                out = engine(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            engine.backward(loss + out.router_loss)
            engine.step()
            return float(loss)

        steps = {"deepspeed": step}
    else:
        def semoe_step(feature: str, model: MoETransformer):
            model.to(dev)
            pc = ParallelConfig(ep_size=world, ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                bucket_mb=args.bucket_mb, **FEATURES[feature])
            mesh = build_mesh(pc.ep_size)
            apply_expert_parallel(model, mesh, comm="hierarchical" if pc.hierarchical_a2a else "flat",
                                  ranks_per_node=pc.ranks_per_node, chunks=pc.a2a_chunks, wire_dtype=pc.wire_dtype())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
            fusion = None
            if pc.grad_fusion:
                from semoe.parallel.fusion import GradFusion

                fusion = GradFusion(model, mesh, pc.bucket_mb, pc.ranks_per_node if pc.hierarchical_grads else None)

            def step(tokens: torch.Tensor) -> float:
                with autocast(dev, compute_dtype):
                    out = model(tokens[:, :-1])
                loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
                (loss + out.router_loss).backward()
                if fusion is not None:
                    fusion.finish()
                else:
                    sync_gradients(model, mesh)
                clip_grad_norm_(model, 1.0, mesh)
                opt.step()
                opt.zero_grad(set_to_none=fusion is None)
                return float(loss)

            model.train()
            return step

        # one model per feature set (--interleave runs several in this job, alternating step by step)
        steps = {}
        for k, feature in enumerate(args.feature.split("|")):
            if k:
                torch.manual_seed(0)
                model = MoETransformer(cfg)
            steps[feature] = semoe_step(feature, model)

    model.train()
    for i in range(args.warmup):
        for step in steps.values():
            step(batches[i % len(batches)])
    times: dict[str, list[float]] = {f: [] for f in steps}
    a2a = []
    names = list(steps)
    for i in range(args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):  # the order flips every step
            dist.barrier()
            timer.seconds = 0.0
            t0 = time.perf_counter()
            steps[name](batches[i % len(batches)])
            if cuda:
                torch.cuda.synchronize(dev)
            dt = torch.tensor([time.perf_counter() - t0], device=dev)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[name].append(float(dt))
            a2a.append(timer.seconds)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                        torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else 0.0], device=dev)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        # semoe's all-to-alls are asynchronous (launch, then wait), so only DeepSpeed's share is meaningful
        share = (statistics.median(a / t for a, t in zip(a2a, times["deepspeed"])) if args.impl == "deepspeed"
                 else None)
        for name, ts in times.items():
            emit_result({
                "feature": name, "step_s": statistics.median(ts), "steps_s": ts,
                "peak_rss_mb": float(rss[0]) if len(times) == 1 else None,  # several models share this process
                "a2a_share": share, "dtype": dtype_name(compute_dtype),
                "peak_device_mb": float(rss[1]) if cuda and len(times) == 1 else None})
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DeepSpeed can abort at interpreter exit (see shared notes)


# ============================================================================ driver
def _launch(args: argparse.Namespace, impl: str, feature: str) -> list[dict] | None:
    base = [str(HERE / "bench_train.py"), "--worker", "--impl", impl, "--feature", feature,
            *forward_args(args, ("layers", "d_model", "d_ff", "experts", "top_k", "capacity_factor", "seq_len",
                                 "global_batch", "vocab", "warmup", "steps", "zero", "bucket_mb", "device", "dtype"))]
    env = {**os.environ, "DS_ACCELERATOR": args.device, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":  # gloo and CPU tensors even on a machine with GPUs
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.topology == "loopback":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *base]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        procs = []
        for node in (0, 1):
            cmd = ["ip", "netns", "exec", f"semoe_n{node}", sys.executable, "-m", "torch.distributed.run",
                   "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2", "--master_addr=10.77.0.1",
                   "--master_port=29533", *base]
            node_env = {**env, "GLOO_SOCKET_IFNAME": f"semoe_v{node}"}
            procs.append(subprocess.Popen(cmd, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        results += read_results(out)
        if p.returncode != 0:
            print(f"[bench_train] {impl}/{feature} failed (exit {p.returncode}):\n{err[-3000:]}", file=sys.stderr)
            return None
    return results


def _emit(rec: dict, path: Path | None) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import importlib.util

    feats = [f for f in args.features.split(",") if f]
    unknown = [f for f in feats if f not in FEATURES]
    if unknown:
        raise SystemExit(f"unknown --features {unknown}; choose from {sorted(FEATURES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine; run with --device cpu")
        if args.topology != "loopback" or args.nproc > torch.cuda.device_count():
            raise SystemExit(f"--device cuda runs on this machine's {torch.cuda.device_count()} GPU(s): "
                             "--topology loopback and --nproc <= that")
    if args.global_batch % args.nproc or args.experts % args.nproc:
        raise SystemExit(f"--global-batch and --experts must be divisible by the {args.nproc} ranks")
    want_ds = args.peers == "deepspeed" or (args.peers == "auto" and importlib.util.find_spec("deepspeed"))
    if args.peers == "auto" and not want_ds:
        print("[bench_train] deepspeed not importable: semoe only (pip install -e .[bench])", file=sys.stderr)
    if args.topology == "two-node":
        subprocess.run(["bash", str(HERE / "topology.sh"), "up", str(args.link_mbit)], check=True)
    jobs = [("semoe", "|".join(feats))] if args.interleave else [("semoe", f) for f in feats]
    jobs += [("deepspeed", f"zero{args.zero}")] if want_ds else []
    runs: dict[tuple[str, str], list[dict]] = {("semoe", f): [] for f in feats}
    runs.update({("deepspeed", f"zero{args.zero}"): []} if want_ds else {})
    try:
        for job in range(args.jobs):
            order = jobs if job % 2 == 0 else jobs[::-1]
            for impl, feat in order:
                print(f"[bench_train] job {job + 1}/{args.jobs}: {impl} {feat}", file=sys.stderr)
                for res in _launch(args, impl, feat) or []:
                    runs[(impl, feat if impl == "deepspeed" else res["feature"])].append(res)
    finally:
        if args.topology == "two-node":
            subprocess.run(["bash", str(HERE / "topology.sh"), "down"], check=False)
    tokens = args.global_batch * args.seq_len
    summary: dict[str, dict] = {}
    for (impl, feat), rs in runs.items():
        if not rs:
            continue
        step_s = statistics.median(r["step_s"] for r in rs)
        rss = [r["peak_rss_mb"] for r in rs if r["peak_rss_mb"] is not None]
        rec = {"impl": impl, "world": args.nproc, "features": feat, "topology": args.topology,
               "link_mbit": args.link_mbit if args.topology == "two-node" else None,
               "tokens_per_s": tokens / step_s, "step_ms": 1e3 * step_s,
               "interleaved": args.interleave and impl == "semoe",
               "peak_rss_mb": statistics.median(rss) if rss else None,
               "peak_device_mb": statistics.median(r["peak_device_mb"] for r in rs) if args.device == "cuda" else None,
               "device": args.device, "dtype": rs[0]["dtype"],
               "a2a_share": None if impl == "semoe" else statistics.median(r["a2a_share"] for r in rs),
               "jobs": len(rs)}
        summary[f"{impl}/{feat}"] = rec
        _emit(rec, args.json)
    ds = next((v for k, v in summary.items() if k.startswith("deepspeed/")), None)
    ratios = {k.split("/")[1]: v["tokens_per_s"] / ds["tokens_per_s"] for k, v in summary.items()
              if ds is not None and k.startswith("semoe/")}
    mem = {k.split("/")[1]: v["peak_rss_mb"] / ds["peak_rss_mb"] for k, v in summary.items()
           if ds is not None and k.startswith("semoe/") and v["peak_rss_mb"] is not None}
    paired = None
    if args.interleave and len(feats) > 1:  # step-by-step ratios inside each job: against the first feature set
        base = feats[0]
        paired = {}
        for f in feats[1:]:
            ratios_f = [a / b for ra, rb in zip(runs[("semoe", base)], runs[("semoe", f)])
                        for a, b in zip(ra["steps_s"], rb["steps_s"])]
            paired[f"{f}/{base}"] = statistics.median(ratios_f) if ratios_f else None
    _emit({"summary": True, "topology": args.topology, "world": args.nproc,
           "ratio_vs_deepspeed": ratios or None, "peak_rss_ratio": mem or None,
           "interleaved_speedup": paired,
           "target_ratio": TARGETS[args.topology],
           "deepspeed_a2a_share": None if ds is None else ds["a2a_share"]}, args.json)
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
