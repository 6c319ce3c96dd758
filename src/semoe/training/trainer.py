"""The trainer: thin, built from a RunConfig. One process or many under torchrun (expert parallel).

Per optimizer step: ``grad_accum`` micro-batches (forward, loss + router loss, backward), gradient
sync (dense over the world, experts over their replicas), global-norm clipping, AdamW, LR schedule.
Rank 0 shows progress, writes ``metrics.csv``, checkpoints and, at the end, ``loss.png`` and
``expert_load.png``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from semoe.config import RunConfig, TrainConfig, from_dict, replace, to_dict
from semoe.models.transformer import MoETransformer
from semoe.parallel import apply_expert_parallel, build_mesh, clip_grad_norm_, init_distributed, sync_gradients
from semoe.parallel.fsdp import apply_fsdp
from semoe.parallel.fusion import GradFusion
from semoe.parallel.grads import sync_router_bias
from semoe.parallel.mesh import default_device, dense_mesh, resolve_ranks_per_node
from semoe.precision import autocast, dtype_name, resolve_dtype
from semoe.storage import checkpoint as ckpt
from semoe.storage.offload import ExpertOffload, offload_from_config
from semoe.training.data import Batch, Corpus, GlobalBatchLoader, prepare_corpus
from semoe.training.init import ModelInit, RandomInit
from semoe.training.metrics import MetricsWriter, plot_expert_load, plot_loss
from semoe.training.step import optimizer_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    first_val_loss: float | None
    last_val_loss: float | None
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """The AdamW of every trainer (``Trainer``, ``ElasticTrainer``): the groups of ``param_groups``, torch's fused
    kernel (one pass per tensor, no temporaries of the parameters' size; the expert offload's streamed update
    uses the same kernel, so the two stay bit-identical)."""
    return torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=tc.betas, fused=True)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices; none on norms, biases and the router unless configured. Under FSDP the sharded
    (DTensor) parameters get groups of their own: foreach AdamW does not mix DTensors and plain tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or name.endswith(".bias") or ".router." in f".{name}"
        (no_decay if skip and not cfg.decay_norms_biases_router else decay).append(p)
    groups = []
    for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        sharded = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        if sharded:
            groups.append({"params": sharded, "weight_decay": wd})
        if plain or not sharded:
            groups.append({"params": plain, "weight_decay": wd})
    return groups


def config_mismatch(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Paths where two config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_mismatch(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {vb!r} vs now {va!r}")
    return out


class Trainer:
    """Build everything from ``run`` and train: ``Trainer(run, out_dir).fit()``.

    ``init`` is where the model and its initial weights come from (``semoe.training.init``): random from the
    seed (default), or a pretrained checkpoint (``PretrainedInit``, which also brings the tokenizer).
    ``offload``: the experts live in an expert store (``semoe.storage.offload``); built from ``run.storage``
    when that is enabled and none is given."""

    def __init__(self, run: RunConfig, out_dir: Path, cache_dir: Path, resume: str | None = "auto",
                 corpus: Corpus | None = None, init: ModelInit | None = None,
                 offload: ExpertOffload | None = None) -> None:
        self.out_dir, self.cache_dir = Path(out_dir), Path(cache_dir)
        self.init = init if init is not None else RandomInit()
        self.distributed = init_distributed()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.ep_size = run.parallel.resolve_ep(self.world)
        tc = run.train
        if tc.batch_size % (self.world * tc.grad_accum):
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by world size {self.world} x "
                             f"grad_accum {tc.grad_accum}; change batch_size or the number of ranks")
        if run.model.moe.num_experts % self.ep_size:
            raise ValueError(f"num_experts={run.model.moe.num_experts} is not divisible by ep_size={self.ep_size}; "
                             "choose a number of ranks (--nproc) or parallel.ep_size that divides it")
        self.mesh = build_mesh(self.ep_size)
        self.device = default_device()
        self.corpus = corpus if corpus is not None else self._prepare_corpus(run)
        if self.init.tokenizer is None:  # a tokenizer trained on the data: the vocabulary follows it
            if self.corpus.vocab_size != run.model.vocab_size:
                run = replace(run, model=replace(run.model, vocab_size=self.corpus.vocab_size))
        elif self.corpus.vocab_size > run.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.corpus.vocab_size} tokens but the model's vocabulary is "
                             f"{run.model.vocab_size}; use the model's own tokenizer.json")
        if tc.seq_len > run.model.max_seq_len:
            raise ValueError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
        self.run = run
        torch.manual_seed(tc.seed)  # identical init on every rank, then each keeps its experts
        self.model: MoETransformer = self.init.build(run.model)
        pc = run.parallel
        apply_expert_parallel(self.model, self.mesh, comm="hierarchical" if pc.hierarchical_a2a else "flat",
                              ranks_per_node=pc.ranks_per_node, chunks=pc.a2a_chunks, wire_dtype=pc.wire_dtype())
        # compute precision: bf16 autocast over float32 master weights, or everything in float32 / float64
        self.compute_dtype = resolve_dtype(tc.dtype, self.device)
        param_dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        self.ckpt_root = self.out_dir / "checkpoints"
        resume_from = self._resume_path(resume)
        load = resume_from is None
        if offload is None and run.storage.enabled and getattr(self.init, "streams_experts", False):
            # the experts go from the files straight into the store, expert by expert: never all in memory
            self.model.to(dtype=param_dtype)  # still on the meta device: no memory
            self.offload = offload_from_config(self.model, self.mesh, run, self.out_dir, self.rank, self.device)
            self.init.materialize(self.model, self.device, param_dtype, load_weights=load,
                                  experts=self.offload.sink())
        else:
            self.init.materialize(self.model, self.device, param_dtype, load_weights=load)
            self.offload = offload if offload is not None else offload_from_config(self.model, self.mesh, run,
                                                                                   self.out_dir, self.rank)
        self.fsdp = pc.fsdp and self.distributed  # dense parameters sharded over all ranks (experts left out)
        if self.fsdp:
            apply_fsdp(self.model, dense_mesh())
        if self.rank == 0:
            log.info("compute dtype %s (train.dtype=%s), parameters and optimizer state %s",
                     dtype_name(self.compute_dtype), tc.dtype, dtype_name(param_dtype))
        self.optimizer = build_optimizer(self.model, tc)
        # with an offload: the dense parameters only; under FSDP: off (FSDP reduce-scatters the dense gradients)
        use_fusion = pc.grad_fusion and self.mesh is not None and not self.fsdp
        rpn = resolve_ranks_per_node(pc.ranks_per_node) if pc.hierarchical_grads else None
        self.fusion = GradFusion(self.model, self.mesh, pc.bucket_mb, rpn) if use_fusion else None
        win = self.corpus.windows(tc.seq_len, tc.val_fraction)
        masks = {"loss_mask": win.loss_mask, "doc_start": win.doc_start}
        self.loader = GlobalBatchLoader(win.tokens, win.train_starts, tc.seq_len, tc.batch_size, tc.seed,
                                        dp_rank=self.rank, dp_size=self.world, grad_accum=tc.grad_accum, **masks)
        self.val_loader = GlobalBatchLoader(win.tokens, win.val_starts, tc.seq_len, tc.batch_size, tc.seed,
                                            dp_rank=self.rank, dp_size=self.world, grad_accum=1, **masks)
        self.start_step = 0
        self.expert_load: list[np.ndarray] = []
        self.load_steps: list[int] = []
        self.last_checkpoint: Path | None = None
        if resume_from is not None:
            self._resume(resume_from)

    # ------------------------------------------------------------------ setup
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _prepare_corpus(self, run: RunConfig) -> Corpus:
        path = Path(run.data) if run.data else None
        tok = self.init.tokenizer
        if self.rank == 0:
            corpus = prepare_corpus(path, self.cache_dir, run.model.vocab_size, tok)
        self._barrier()
        if self.rank != 0:
            corpus = prepare_corpus(path, self.cache_dir, run.model.vocab_size, tok)  # cached by rank 0
        return corpus

    def _resume_path(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from (None: start afresh)."""
        if resume is None:
            return None
        path = ckpt.find_latest(self.ckpt_root) if resume == "auto" else ckpt.find_latest(Path(resume))
        if path is None and resume != "auto":
            raise ckpt.CheckpointError(f"no checkpoint found at {resume}")
        return path

    def _resume(self, path: Path) -> None:
        manifest = ckpt.read_manifest(path)
        problem = self.init.resume_problem(manifest)
        if problem:
            raise ckpt.CheckpointError(f"checkpoint {path} cannot be resumed: {problem}. Use another --out "
                                       "directory to start afresh.")
        diff = config_mismatch(to_dict(self.run.model), manifest["config"]["model"])
        if diff:
            raise ckpt.CheckpointError(
                f"checkpoint {path} is from a different model config ({'; '.join(diff[:5])}). "
                f"Use the same recipe/overrides, or another --out directory to start afresh.")
        if manifest["data"]["fingerprint"] != self.corpus.fingerprint:
            log.warning("resuming on different data than the checkpoint was trained on")
        ckpt.load_model(path, self.model)
        ckpt.load_optimizer(path, self.model, self.optimizer)
        if self.offload is not None:
            self.offload.load_checkpoint(path)
        ckpt.set_rng_state(manifest.get("rng", {}))
        self.start_step = int(manifest["data"]["step"])
        self.last_checkpoint = path
        load_file = self.out_dir / "expert_load.npz"
        if load_file.exists():
            z = np.load(load_file)
            keep = z["steps"] < self.start_step
            self.load_steps = list(z["steps"][keep])
            self.expert_load = list(z["load"][keep])
        if self.rank == 0:
            log.info("resumed from %s at step %d (world %d, ep %d; it was written with world %s, ep %s)", path,
                     self.start_step, self.world, self.ep_size, manifest.get("world_size"), manifest.get("ep_size"))

    # ------------------------------------------------------------------ steps
    def _mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def _forward_loss(self, batch: Batch):
        doc = batch.doc.to(self.device) if batch.doc is not None else None
        with autocast(self.device, self.compute_dtype):
            out = self.model(batch.x.to(self.device), doc_ids=doc)
        # logits: >= float32; targets without loss (prompts, padding) carry F.cross_entropy's ignore_index
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch.y.to(self.device).flatten())
        return loss, out

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (``semoe.training.step.optimizer_step``); returns logged scalars (averaged over ranks)."""
        self.model.train()
        tc = self.run.train
        lr = lr_at(step, tc)

        def objective(batch: Batch):
            loss, out = self._forward_loss(batch)
            # keep scalars and stats only: holding `out` would keep every micro-batch's logits until the step ends
            return (loss + out.router_loss) / tc.grad_accum, (float(loss.detach()), float(out.aux_loss.detach()),
                                                              out.moe_stats)

        def sync() -> None:
            if self.fusion is not None:
                self.fusion.finish()
            else:
                sync_gradients(self.model, self.mesh)

        loss_mean = math.nan

        def check(kept: list, norm: float) -> None:
            nonlocal loss_mean
            loss_mean = self._mean(sum(k[0] for k in kept) / tc.grad_accum)
            if not math.isfinite(loss_mean) or not math.isfinite(norm):
                raise TrainingDiverged(
                    f"loss became {loss_mean} (grad norm {norm}) at step {step}; the last good checkpoint is "
                    f"{self.last_checkpoint or 'none (no checkpoint was written yet)'}. Lower train.lr, raise "
                    "train.warmup_steps or set train.grad_clip, then resume from it.")

        def clip() -> torch.Tensor:
            expert_sq = self.offload.expert_sq() if self.offload is not None else None  # offloaded experts' part
            return clip_grad_norm_(self.model, tc.grad_clip, self.mesh, expert_sq)

        def after() -> None:
            if self.offload is not None:  # the experts' AdamW, streamed through the store, same clip scale
                self.offload.step(lr, clip_norm, tc.grad_clip)
            sync_router_bias(self.model, self.mesh)

        def check_and_keep(kept: list, norm: float) -> None:
            nonlocal clip_norm
            clip_norm = norm
            check(kept, norm)

        clip_norm = math.nan
        kept, norm = optimizer_step(
            self.optimizer, self.loader.get(step), objective, lr=lr, sync=sync, clip=clip, check=check_and_keep,
            after=after,
            no_sync=self.fusion.no_sync if self.fusion is not None else None,
            set_to_none=self.fusion is None)  # fusion: grads are views into its buckets
        aux_sum, dropped, assigned = 0.0, 0, 0
        loads = None
        for _, aux, moe_stats in kept:
            aux_sum += aux / tc.grad_accum / max(1, len(moe_stats))
            dropped += sum(s.dropped for s in moe_stats)
            assigned += sum(s.assignments for s in moe_stats)
            cur = np.stack([s.tokens_per_expert.numpy() for s in moe_stats]) if moe_stats else None
            loads = cur if loads is None else loads + cur
        if loads is not None:
            self.expert_load.append(loads / np.maximum(loads.sum(-1, keepdims=True), 1))
            self.load_steps.append(step)
        # aux_loss: mean over MoE layers
        io = self.offload.step_stats() if self.offload is not None else {}
        return {"loss": loss_mean, "aux_loss": self._mean(aux_sum), "lr": lr, "grad_norm": norm,
                "drop_rate": self._mean(dropped / max(assigned, 1)), **io}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        tc = self.run.train
        total, n = 0.0, 0
        for i in range(tc.eval_batches):
            for batch in self.val_loader.get(i):
                loss, _ = self._forward_loss(batch)
                total += float(loss)
                n += 1
        return self._mean(total / max(n, 1))

    def save(self, step: int) -> Path:
        dp_index, ep_rank = divmod(self.rank, self.ep_size)
        manifest = {
            "config": to_dict(self.run),
            "data": {"step": step, "fingerprint": self.corpus.fingerprint, "global_batch": self.run.train.batch_size},
            "rng": ckpt.rng_state(), "world_size": self.world, "ep_size": self.ep_size, **self.init.manifest(),
        }
        path = ckpt.save_checkpoint(self.ckpt_root, step, self.model, self.optimizer, manifest, rank=self.rank,
                                    ep_rank=ep_rank, dp_index=dp_index, barrier=self._barrier,
                                    keep_last=self.run.train.keep_last,
                                    extra_files={"tokenizer.json": self.corpus.tokenizer_path,
                                                 **self.init.extra_files()},
                                    expert_writer=None if self.offload is None else
                                    lambda folder: self.offload.write_checkpoint(folder, ep_rank))
        if self.rank == 0 and self.expert_load:
            np.savez(self.out_dir / "expert_load.npz", steps=np.array(self.load_steps), load=np.stack(self.expert_load))
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        tc = self.run.train
        is_main = self.rank == 0
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        # rows are logged as step + 1: the checkpoint of start_step holds the steps of rows 1..start_step
        metrics = MetricsWriter(self.out_dir / "metrics.csv", resume_step=self.start_step) if is_main else None
        tokens_per_step = tc.batch_size * tc.seq_len
        first_val = last_val = None
        if self.start_step == 0:
            first_val = last_val = self.evaluate()
            if metrics:
                metrics.log({"step": 0, "val_loss": first_val})
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps, disable=not is_main,
                   desc="train", unit="step", dynamic_ncols=True)
        losses: list[float] = []
        for step in bar:
            t0 = time.perf_counter()
            row = self.train_step(step)
            dt = time.perf_counter() - t0
            losses.append(row["loss"])
            row = {"step": step + 1, **row, "tokens_per_s": tokens_per_step / dt, "step_ms": 1e3 * dt}
            done = step + 1
            if done % tc.eval_every == 0 or done == tc.steps:
                last_val = row["val_loss"] = self.evaluate()
                first_val = first_val if first_val is not None else last_val
            if metrics and (done % tc.log_every == 0 or "val_loss" in row):
                metrics.log(row)
            io = {"io_mb": f"{row['io_mb']:.1f}", "stall_ms": f"{row['stall_ms']:.0f}"} if "io_mb" in row else {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            drop=f"{row['drop_rate']:.1%}", **io, refresh=False)
            if done % tc.ckpt_every == 0 or done == tc.steps:
                self.save(done)
        bar.close()
        if metrics:
            metrics.close()
            plot_loss(self.out_dir / "metrics.csv", self.out_dir / "loss.png")
            if self.expert_load:
                plot_expert_load(np.stack(self.expert_load), self.out_dir / "expert_load.png",
                                 steps=np.array(self.load_steps))
        return TrainResult(self.out_dir, tc.steps, first_val, last_val, self.last_checkpoint, losses)


def load_run_config(checkpoint: Path) -> RunConfig:
    """The RunConfig stored in a checkpoint's manifest."""
    manifest = ckpt.read_manifest(checkpoint, verify=False)
    return from_dict(RunConfig, manifest["config"])
