"""Forward+backward tokens/s of the semoe MoE layer and of DeepSpeed-MoE, in the same run.

Run (from the repository root):

    python benchmarks/bench_moe_layer.py                                      # 1 process, torch's default threads
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_moe_layer.py    # expert parallel, 1 thread per rank
    python benchmarks/bench_moe_layer.py --dropless                           # semoe dropless vs DeepSpeed capacity
    python benchmarks/bench_moe_layer.py --smoke                              # tiny, seconds, no peers (CI)
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_moe_layer.py --smoke

Both layers: d_model 512, d_ff 2048, GELU experts (two matrices), 8 experts, top-2, capacity factor 1.25,
4096 tokens per step in total (each of W ranks gets 4096/W), float32 (``--dtype bfloat16``: both under
``torch.autocast("cpu", bfloat16)`` over float32 weights), experts sharded over all ranks
(expert parallelism = world size). Each step: grads cleared, forward, loss = mean(out^2) + aux term
(semoe: ``router_loss`` with aux_loss_coef 0.01 and z_loss_coef 0; DeepSpeed: 0.01 * l_aux), backward
with an input that requires grad. A step lasts as long as its slowest rank (all_reduce MAX). The
contenders alternate: warm-up of each, then rounds of a few steps each (the order flips every round);
the report is the median step. A matmul probe (in the compute dtype) runs in every round too.

Same routing: DeepSpeed's gate and experts get copies of semoe's initial router and expert weights
(biases zero), no noisy gate, ``top2_2nd_expert_sampling=False`` (no Gumbel noise on the 2nd expert),
``use_rts=False``; semoe renormalises the top-k weights for k >= 2 as DeepSpeed does. In one process both
then choose the same experts and keep the same assignments (first choices before second choices, tokens
in order); the only difference is that DeepSpeed renormalises after dropping, semoe before.
DeepSpeed's experts are ``nn.Sequential(Linear(d, ff), GELU(), Linear(ff, d))``: their biases add
(d + ff) per row, < 0.1% of the FLOPs. For k > 2 DeepSpeed drops by probability, not position.

Capacity: semoe defines it over the whole expert-parallel batch, C = max(min_capacity, ceil(cf * k * T / E))
with T the tokens of all ranks; DeepSpeed per rank, C_r = max(min_capacity, ceil(k * cf * T_r / E)). With
equal tokens per rank (as here) both give the same number of slots per expert in total (e.g. 1280 = 2 x 640
at 2 ranks); semoe lets any rank fill them. ``--dropless``: semoe without capacity, DeepSpeed unchanged.

Output (stdout, JSON lines; human text goes to stderr): one line per contender with ``impl``, ``world``,
``mode``, ``tokens_per_s``, ``step_ms`` and
  peak_rss_mb       the process's peak RSS (max over ranks) read after that contender's warm-up; both live in
                    one process and semoe warms up first, so DeepSpeed's figure also holds semoe's weights and
                    its earlier peak: compare the contenders' memory with the fields below, not with this one
  param_mb          parameters (+ grads are the same size again) on the busiest rank
  activation_mb     bytes autograd saves for backward in one forward (distinct storages, parameters and the
                    input left out), max over ranks
  step_rss_delta_mb RSS growth during one forward+backward over the RSS before it (glibc free memory trimmed
                    first, sampled every 0.5 ms), max over ranks
  minor_faults_per_step  minor page faults per timed step (median over rounds, max over ranks): the kernel
                    zero-filling fresh pages; glibc serves blocks above its mmap threshold (at most 32 MiB by
                    default) with fresh mmap pages, so every big tensor allocated per step costs ~1 fault per 4 KiB
  drop_rate         dropped assignments / routed assignments, whole group
  rows              expert rows computed per step, whole group (semoe: kept assignments; DeepSpeed: E x C x W
                    slots, padding included)
  rows_per_rank     expert rows each rank computes (semoe: its experts' kept assignments; DeepSpeed: E x C)
  gemm_fraction     tokens_per_s / (GEMM bound for that contender's rows on the busiest rank)
then one summary line:
  ratio_vs_deepspeed         {semoe mode: {world: semoe tokens/s / DeepSpeed tokens/s}}; null without a peer
  ratio_vs_deepspeed_paired  the same from the median over rounds of neighbouring blocks' ratios (less
                             sensitive to load that changes during the run)
  gemm_bound_tokens_per_s    tokens per step / (FLOPs of semoe's real rows / measured matmul rate), the rows
                             being W x the busiest rank's rows, since a step waits for that rank
  gemm_bound_balanced_tokens_per_s  the same with the total rows (as if the ranks were perfectly balanced)
  matmul_gflops, step_gflops, malloc, env, targets
FLOPs per step = 3 x forward (backward = 2 x forward), forward = 2 x rows x d x ff x 2 matrices + the router's
2 x T x d x E. The matmul rate: median over rounds of the six GEMM shapes of the experts' forward and backward
at [tokens per rank, d] x [d, ff], timed on every rank at once, times the world size.

Targets on a 2-core CPU (same run, same routing): capacity mode >= 1.05x DeepSpeed at 1 and 2 ranks and
>= 90% of the GEMM bound; dropless >= 1.3x DeepSpeed's capacity-mode tokens/s.

Allocator: results depend on how big tensors get their memory (see minor_faults_per_step); the summary line
(``env``) records THP_MEM_ALLOC_ENABLE (torch: 2 MiB huge pages for big CPU tensors), MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ (glibc: keep big blocks in the heap) and OMP_NUM_THREADS when set. Both contenders share
the setting; ``--malloc heap`` sets glibc's thresholds from inside the process (recorded as ``malloc``).

DeepSpeed's first ``init_distributed`` JIT-compiles a C++ op (about 60 s, cached afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from torch import nn

from common import (
    MatmulProbe,
    RssPeakSampler,
    emit_json,
    keep_big_blocks_in_heap,
    linear_gemm_shapes,
    log,
    median,
    minor_faults,
    peak_rss_mb,
    saved_tensor_bytes,
    stdout_to_stderr,
)
from semoe.config import MoEConfig, RouterConfig
from semoe.layers import MoELayer
from semoe.layers.experts import expert_flops
from semoe.parallel import apply_expert_parallel, build_mesh, init_distributed
from semoe.precision import autocast, dtype_name, resolve_dtype

# environment that changes the speed of both contenders: threads, and how big CPU tensors get their memory
RECORDED_ENV = ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "LD_PRELOAD", "OMP_NUM_THREADS")
TARGETS = {"capacity": {"ratio_vs_deepspeed": 1.05, "gemm_fraction": 0.90}, "dropless": {"ratio_vs_deepspeed": 1.3}}


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--d-ff", type=int, default=2048, help="expert FFN width (default 2048)")
    ap.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--capacity-factor", type=float, default=1.25, help="capacity factor per route (default 1.25)")
    ap.add_argument("--min-capacity", type=int, default=4, help="minimum slots per expert (default 4)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step over all ranks (default 4096)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence; input is [tokens/W/seq, seq, d]")
    ap.add_argument("--dropless", action="store_true",
                    help="semoe runs without capacity (no drops); DeepSpeed stays in capacity mode")
    ap.add_argument("--expert-impl", default="grouped_mm", choices=["grouped_mm", "loop", "padded"],
                    help="semoe expert kernel (default grouped_mm)")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight for both (default 0.01)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="compute dtype of both contenders: bfloat16 = autocast over float32 weights (mixed "
                         "precision, as train.dtype=bfloat16 trains); auto = semoe.precision's choice for this CPU; "
                         "the GEMM bound uses the matmul rate measured in that dtype (default float32)")
    ap.add_argument("--peers", default="auto", choices=["auto", "deepspeed", "none"],
                    help="peer to compare with: auto = deepspeed when importable (none with --smoke)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per contender (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="alternation rounds (default 5)")
    ap.add_argument("--steps-per-round", type=int, default=2, help="timed steps per contender per round (default 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per rank; 0 keeps torch's default (all cores in one process, "
                         "1 under torchrun, which sets OMP_NUM_THREADS=1)")
    ap.add_argument("--malloc", default="default", choices=["default", "heap"],
                    help="heap: glibc keeps big freed blocks in the heap (mallopt), for both contenders, so per-step "
                         "activations reuse pages instead of page-faulting fresh ones (default: glibc's defaults)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    ap.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run for CI: d_model 64, d_ff 128, 4 experts, 256 tokens, 2 warm-up + 3 steps, "
                         "no peers, 1 thread per rank")
    args = ap.parse_args(argv)
    if args.smoke:
        args.d_model, args.d_ff, args.experts, args.tokens, args.seq = 64, 128, 4, 256, 64
        args.warmup, args.rounds, args.steps_per_round = 2, 3, 1
        # one thread: two OpenMP threads on a loaded 2-core CI machine can be ~100x slower at these sizes
        args.threads = args.threads or 1
        if args.peers == "auto":
            args.peers = "none"
    if min(args.warmup, args.rounds, args.steps_per_round) < 1:
        ap.error("--warmup, --rounds and --steps-per-round must be >= 1")
    if args.top_k < 1 or args.top_k > args.experts:
        ap.error(f"--top-k must be in 1..{args.experts}")
    return args


# ------------------------------------------------------------------------------------------ distributed
class Dist:
    """Rank, world and the few collectives the harness needs (no-ops for one process without a group)."""

    def __init__(self) -> None:
        self.on = dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on and self.world > 1:
            dist.barrier()

    def reduce(self, values: list[float], op: str) -> list[float]:
        if not (self.on and self.world > 1) or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
        return t.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(want_peer: bool, timeout_s: float) -> bool:
    """Initialise the default group under torchrun; in a plain single process only when a peer needs one
    (DeepSpeed wants a process group even for one rank). Returns whether this runs under torchrun."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun:
        init_distributed(timeout_s)
    elif want_peer:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return under_torchrun


# ------------------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    impl: str
    mode: str
    module: nn.Module
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (out, weighted aux loss)
    routing: Callable[[], dict[str, Any]]  # after a step: drop_rate, rows, expert_slots of the whole group
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per step, per block (this rank)
    round_s: list[float] = field(default_factory=list)  # median step of each round's block
    info: dict[str, Any] = field(default_factory=dict)


def semoe_config(args: argparse.Namespace) -> MoEConfig:
    cf = None if args.dropless else args.capacity_factor
    router = RouterConfig(kind="topk", top_k=args.top_k, capacity_factor=cf, eval_capacity_factor=cf,
                          min_capacity=args.min_capacity, drop_policy="position", normalize_topk=args.top_k > 1,
                          aux_loss_coef=args.aux_coef, z_loss_coef=0.0)
    return MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, activation="gelu",
                     router=router, expert_impl=args.expert_impl)


def build_semoe(args: argparse.Namespace, world: int) -> tuple[Contender, dict[str, torch.Tensor]]:
    """The semoe layer (experts sharded over all ranks when world > 1) and a copy of its full initial
    weights (same on every rank: built from the same seed) for the peer."""
    torch.manual_seed(args.seed)
    layer = MoELayer(semoe_config(args))
    full = {"router": layer.router.weight.detach().clone(), "w1": layer.experts.w1.detach().clone(),
            "w2": layer.experts.w2.detach().clone()}
    if world > 1:
        apply_expert_parallel(layer, build_mesh(ep_size=world))
    layer.train()
    last: dict[str, Any] = {}

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = layer(x)
        last["stats"] = o.stats
        return o.out, o.router_loss

    def routing() -> dict[str, Any]:
        s = last["stats"]  # already whole-group numbers
        slots = None if s.capacity is None else s.capacity * args.experts
        per_rank = s.tokens_per_expert.view(world, -1).sum(1).tolist()  # rank r owns experts r*L..r*L+L-1
        return {"drop_rate": s.drop_rate, "rows": s.assignments - s.dropped, "rows_per_rank": per_rank,
                "expert_slots": slots, "capacity_per_expert": s.capacity}

    mode = "dropless" if args.dropless else "capacity"
    return Contender("semoe", mode, layer, forward, routing), full


def deepspeed_capacity(tokens_per_rank: int, args: argparse.Namespace) -> int:
    """DeepSpeed's per-rank slots per expert, computed as ``sharded_moe._capacity`` does (float32 factor)."""
    c = torch.ceil((tokens_per_rank / args.experts) * torch.tensor(args.capacity_factor * args.top_k))
    return max(int(c.to(torch.int64)), args.min_capacity)


def build_deepspeed(args: argparse.Namespace, d: Dist, full: dict[str, torch.Tensor]) -> Contender:
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing torch.distributed group
    D, F, E, W = args.d_model, args.d_ff, args.experts, d.world
    expert = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))
    moe = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=W, k=args.top_k,
              capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
              min_capacity=args.min_capacity, noisy_gate_policy=None, drop_tokens=True, use_rts=False,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()  # creates the expert / data groups "ep_size_{W}"
    # DeepSpeed deep-copies one expert into every slot; give every expert semoe's initial weights instead
    L = E // W
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(full["router"])
        for l, ex in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            g = d.rank * L + l  # rank r owns global experts r*L .. r*L+L-1, as in semoe
            ex[0].weight.copy_(full["w1"][g].t())
            ex[2].weight.copy_(full["w2"][g].t())
            ex[0].bias.zero_()
            ex[2].bias.zero_()
    moe.train()
    tokens_per_rank = args.tokens // W
    cap = deepspeed_capacity(tokens_per_rank, args)
    last: dict[str, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, l_aux, exp_counts = moe(x)
        last["counts"] = exp_counts
        return out, args.aux_coef * l_aux

    def routing() -> dict[str, Any]:
        counts = last["counts"].double()  # routes per expert before dropping, this rank's tokens
        dropped = (counts - cap).clamp(min=0).sum().item()
        routed, dropped = d.reduce([counts.sum().item(), dropped], "sum")
        return {"drop_rate": dropped / max(routed, 1.0), "rows": E * cap * W, "rows_per_rank": [E * cap] * W,
                "expert_slots": E * cap * W, "capacity_per_expert": cap * W, "capacity_per_expert_per_rank": cap}

    return Contender("deepspeed", "capacity", moe, forward, routing)


def try_build_peer(args: argparse.Namespace, d: Dist, full: dict[str, torch.Tensor]) -> Contender | None:
    """The DeepSpeed contender, or None (with a message on stderr) when it cannot be imported or built on
    some rank. Every rank gets the same answer."""
    if args.peers == "none":
        return None
    peer, error = None, ""
    try:
        with stdout_to_stderr(), warnings.catch_warnings():  # DeepSpeed prints to stdout; keep it for JSON
            warnings.simplefilter("ignore")
            peer = build_deepspeed(args, d, full)
    except Exception as e:  # ImportError, a failing JIT build, ...
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    ok = d.reduce([1.0 if peer is not None else 0.0], "min")[0] > 0
    if not ok:
        log(f"[bench_moe_layer] peer deepspeed skipped: {error or 'failed on another rank'}", enabled=d.rank == 0)
        return None
    return peer


# ------------------------------------------------------------------------------------------ measurement
COMPUTE_DTYPE = torch.float32  # set by main() from --dtype; both contenders step under the same autocast


def train_step(c: Contender, x: torch.Tensor) -> torch.Tensor:
    c.module.zero_grad(set_to_none=False)  # as a trainer does between steps (both contenders alike)
    x.grad = None
    with autocast("cpu", COMPUTE_DTYPE):
        out, aux = c.forward(x)
    loss = out.float().pow(2).mean() + aux
    loss.backward()
    return loss.detach()


def run_block(c: Contender, x: torch.Tensor, steps: int, d: Dist) -> list[float]:
    """Step times (slowest rank) of ``steps`` steps; ranks start every step together."""
    times = []
    faults0 = minor_faults()
    for _ in range(steps):
        d.barrier()
        t0 = time.perf_counter()
        loss = train_step(c, x)
        times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"{c.impl}: non-finite loss {float(loss)}")
    c.faults.append((minor_faults() - faults0) / max(steps, 1))
    return d.reduce(times, "max")


def measure_memory(c: Contender, x: torch.Tensor, d: Dist) -> None:
    """One untimed step: saved-for-backward bytes and RSS growth, max over ranks."""
    params = list(c.module.parameters())
    c.module.zero_grad(set_to_none=True)
    x.grad = None
    d.barrier()
    with RssPeakSampler() as rss:
        with saved_tensor_bytes(exclude=[*params, x]) as saved, autocast("cpu", COMPUTE_DTYPE):
            out, aux = c.forward(x)
        (out.float().pow(2).mean() + aux).backward()
    param_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    act, delta, pmb = d.reduce([saved[0] / 2**20, rss.delta_mb, param_mb], "max")
    c.info.update(activation_mb=act, step_rss_delta_mb=delta, param_mb=pmb)


def routing_check(sem: Contender, peer: Contender, x: torch.Tensor, d: Dist) -> None:
    """Stderr only: on how many tokens the two layers' outputs agree (same weights, same routing)."""
    with torch.no_grad(), autocast("cpu", COMPUTE_DTYPE):
        a, _ = sem.forward(x)
        b, _ = peer.forward(x)
    diff = (a.float() - b.float()).abs().amax(-1).reshape(-1)
    scale = b.float().abs().amax().clamp_min(1e-12)
    tol = 1e-4 if COMPUTE_DTYPE == torch.float32 else 2e-2  # bf16: a few roundings of 2^-8
    agree = (diff <= tol * scale).double().mean().item()
    agree_min, = d.reduce([agree], "min")
    log(f"[bench_moe_layer] outputs agree (|diff| <= {tol:g} x max|out|) on {100 * agree_min:.1f}% of tokens "
        "(tokens with a dropped route differ: DeepSpeed renormalises after dropping; at W > 1 DeepSpeed's "
        "capacity is per rank)", enabled=d.rank == 0)


def main(argv: list[str] | None = None) -> int:
    global COMPUTE_DTYPE
    args = parse_args(argv)
    COMPUTE_DTYPE = resolve_dtype(args.dtype, "cpu")
    if args.malloc == "heap" and not keep_big_blocks_in_heap():
        log("[bench_moe_layer] --malloc heap: mallopt not available (not glibc?); using the default allocator")
        args.malloc = "default"
    importable = importlib.util.find_spec("deepspeed") is not None
    want_peer = args.peers == "deepspeed" or (args.peers == "auto" and importable)
    if args.peers == "auto" and not want_peer:
        log("[bench_moe_layer] deepspeed is not importable: running semoe alone (pip install deepspeed==0.19.8)")
    if want_peer:
        args.peers = "deepspeed"
    under_torchrun = setup_distributed(want_peer, args.timeout)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    d = Dist()
    say = d.rank == 0
    W = d.world
    if args.tokens % W or args.experts % W:
        raise SystemExit(f"--tokens ({args.tokens}) and --experts ({args.experts}) must be divisible by {W} ranks")
    local = args.tokens // W
    seq = min(args.seq, local)
    if local % seq:
        raise SystemExit(f"tokens per rank ({local}) must be a multiple of --seq ({seq})")

    sem, full = build_semoe(args, W)
    peer = try_build_peer(args, d, full)
    del full
    contenders = [sem] + ([peer] if peer is not None else [])
    threads = torch.get_num_threads()
    log(f"[bench_moe_layer] world={W} threads/rank={threads} d_model={args.d_model} d_ff={args.d_ff} "
        f"experts={args.experts} top_k={args.top_k} cf={args.capacity_factor} dropless={args.dropless} "
        f"dtype={dtype_name(COMPUTE_DTYPE)} "
        f"tokens={args.tokens} contenders={[c.impl for c in contenders]}", enabled=say)

    gx = torch.Generator().manual_seed(args.seed * 1000 + 1 + d.rank)
    x = torch.randn(local // seq, seq, args.d_model, generator=gx).requires_grad_(True)

    # warm-up, in order; the peak RSS after each warm-up (cumulative: both live in this process)
    for c in contenders:
        run_block(c, x, args.warmup, d)
        c.info["peak_rss_mb"] = d.reduce([peak_rss_mb()], "max")[0]
    for c in contenders:
        measure_memory(c, x, d)
    if peer is not None:
        routing_check(sem, peer, x, d)
    probe = MatmulProbe(linear_gemm_shapes(local, args.d_model, args.d_ff)
                        + linear_gemm_shapes(local, args.d_ff, args.d_model), dtype=COMPUTE_DTYPE)
    probe.run()
    probe_times: list[float] = []

    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            block = run_block(c, x, args.steps_per_round, d)
            c.times += block
            c.round_s.append(median(block))
        d.barrier()
        probe_times += d.reduce([probe.run()], "max")
        med = {c.impl: f"{median(c.times[-args.steps_per_round:]) * 1e3:.0f} ms" for c in contenders}
        log(f"[bench_moe_layer] round {r + 1}/{args.rounds}: {med}", enabled=say)

    # GEMM bound: every rank runs its own rows at the probe's rate, all at once; the busiest rank sets the pace
    matmul_flops_per_s = W * probe.flops / median(probe_times)
    router_flops = 3 * 2.0 * args.tokens * args.d_model * args.experts

    def step_flops(rows: int) -> float:
        return 3 * expert_flops(rows, args.d_model, args.d_ff, "gelu") + router_flops

    def bound(rows: int) -> float:
        return args.tokens * matmul_flops_per_s / step_flops(rows)

    def critical_rows(info: dict[str, Any]) -> int:
        return W * max(info["rows_per_rank"])

    results: dict[str, dict[str, Any]] = {}
    for c in contenders:
        c.info.update(c.routing())
        c.info["minor_faults_per_step"] = d.reduce([median(c.faults[1:])], "max")[0]  # [0] is the warm-up
        step_s = median(c.times)
        tps = args.tokens / step_s
        rec = {"impl": c.impl, "world": W, "mode": c.mode, "tokens_per_s": tps, "step_ms": step_s * 1e3,
               "peak_rss_mb": c.info["peak_rss_mb"], "step_ms_min": min(c.times) * 1e3, "steps": len(c.times),
               "threads_per_rank": threads, "param_mb": c.info["param_mb"], "activation_mb": c.info["activation_mb"],
               "step_rss_delta_mb": c.info["step_rss_delta_mb"],
               "minor_faults_per_step": c.info["minor_faults_per_step"], "drop_rate": c.info["drop_rate"],
               "rows": c.info["rows"], "rows_per_rank": c.info["rows_per_rank"], "expert_slots": c.info["expert_slots"],
               "capacity_per_expert": c.info["capacity_per_expert"],
               "gemm_fraction": tps / bound(critical_rows(c.info)),
               "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
               "top_k": args.top_k, "capacity_factor": None if c.mode == "dropless" else args.capacity_factor,
               "dtype": dtype_name(COMPUTE_DTYPE)}
        if "capacity_per_expert_per_rank" in c.info:
            rec["capacity_per_expert_per_rank"] = c.info["capacity_per_expert_per_rank"]
        if c.impl == "semoe":
            rec["expert_impl"] = args.expert_impl
        results[c.impl] = rec
        emit_json(rec, enabled=say)

    s = results["semoe"]
    ratio = paired = None
    targets: dict[str, Any] = {}
    if "deepspeed" in results:
        rv = s["tokens_per_s"] / results["deepspeed"]["tokens_per_s"]
        ratio = {s["mode"]: {str(W): rv}}
        # the same from neighbouring blocks only: robust to load that drifts during the run
        paired = median([b / a for a, b in zip(contenders[0].round_s, contenders[1].round_s)])
        tgt = TARGETS[s["mode"]]
        targets["ratio_vs_deepspeed"] = {"min": tgt["ratio_vs_deepspeed"], "met": rv >= tgt["ratio_vs_deepspeed"]}
    if "gemm_fraction" in TARGETS[s["mode"]]:
        gf = TARGETS[s["mode"]]["gemm_fraction"]
        targets["gemm_fraction"] = {"min": gf, "met": s["gemm_fraction"] >= gf}
    emit_json({"world": W, "mode": s["mode"], "ratio_vs_deepspeed": ratio,
               "ratio_vs_deepspeed_paired": None if ratio is None else {s["mode"]: {str(W): paired}},
               "gemm_bound_tokens_per_s": bound(critical_rows(s)),
               "gemm_bound_balanced_tokens_per_s": bound(s["rows"]), "matmul_gflops": matmul_flops_per_s / 1e9,
               "step_gflops": step_flops(s["rows"]) / 1e9, "threads_per_rank": threads, "malloc": args.malloc,
               "dtype": dtype_name(COMPUTE_DTYPE),
               "targets": targets, "peers": [c.impl for c in contenders if c.impl != "semoe"],
               "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}}, enabled=say)

    if dist.is_initialized():
        d.barrier()
        dist.destroy_process_group()
    if under_torchrun or peer is not None:
        # DeepSpeed (and gloo teardown) sometimes abort at interpreter exit after all results are out
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
