"""Recipes: plain functions returning a RunConfig. ``semoe train --recipe NAME`` picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from semoe.config import (
    ElasticConfig,
    ModelConfig,
    MoEConfig,
    MultiTaskModelConfig,
    MultiTaskRunConfig,
    ParallelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
)


def tiny() -> RunConfig:
    """Seconds on a CPU: for tests and smoke runs."""
    moe = MoEConfig(d_model=64, d_ff=128, num_experts=4, activation="swiglu",
                    router=RouterConfig(top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0))
    model = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, dense_d_ff=128, moe=moe)
    train = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=20,
                        eval_batches=2, ckpt_every=20, keep_last=2)
    return RunConfig(model=model, train=train, parallel=ParallelConfig())


def small() -> RunConfig:
    """The demo: ~5M parameters (3.7M in experts), 8 experts top-2, trains on Shakespeare in a few
    minutes on 2 CPU cores with 2 expert-parallel ranks."""
    moe = MoEConfig(d_model=128, d_ff=256, num_experts=8, activation="swiglu",
                    router=RouterConfig(top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0))
    model = ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=128, dense_d_ff=512,
                        moe=moe)
    train = TrainConfig(steps=250, batch_size=16, seq_len=128, lr=4e-3, min_lr=4e-4, warmup_steps=25,
                        eval_every=50, eval_batches=8, ckpt_every=125, keep_last=2)
    return RunConfig(model=model, train=train, parallel=ParallelConfig())


def base100m() -> RunConfig:
    """About 100M parameters (8 experts of 1024 x 512 SwiGLU in 6 layers): a GPU recipe."""
    moe = MoEConfig(d_model=512, d_ff=1024, num_experts=8, activation="swiglu",
                    router=RouterConfig(top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0))
    model = ModelConfig(vocab_size=16384, d_model=512, n_layers=6, n_heads=8, max_seq_len=512, dense_d_ff=2048,
                        moe=moe)
    train = TrainConfig(steps=5000, batch_size=64, seq_len=512, lr=1e-3, min_lr=1e-4, warmup_steps=200,
                        eval_every=250, eval_batches=20, ckpt_every=500, keep_last=3)
    return RunConfig(model=model, train=train, parallel=ParallelConfig())


def finetune() -> RunConfig:
    """Training settings for fine-tuning a pretrained checkpoint (``semoe train --init-from HF_DIR``): its
    model config replaces this recipe's (a placeholder); a small learning rate, no weight decay, bf16 autocast
    where the machine has fast bf16 ("auto")."""
    train = TrainConfig(steps=200, batch_size=16, seq_len=512, lr=2e-5, min_lr=2e-6, warmup_steps=20,
                        weight_decay=0.0, eval_every=50, eval_batches=4, ckpt_every=100, keep_last=2)
    return RunConfig(model=tiny().model, train=train, parallel=ParallelConfig())


def multitask() -> MultiTaskRunConfig:
    """The elastic multi-task demo (``semoe.elastic``): 4 offline tasks with global batches 8:4:2:1 (synth 64 x
    8 tokens, digits 32 x 4, cancer 16 x 2, wine 8 x 1), a 2-block MLP backbone with a task-routed MoE layer
    per block and a token-gated MoE layer (4 experts, top-2, dropless); a couple of minutes on 2 CPU ranks."""
    moe = MoEConfig(d_model=64, d_ff=64, num_experts=4, activation="gelu",
                    router=RouterConfig(top_k=2, capacity_factor=None, eval_capacity_factor=None))
    model = MultiTaskModelConfig(d_model=64, n_blocks=2, d_ff=128, task_expert_d_ff=128, token_moe=moe)
    train = TrainConfig(steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.01, eval_every=50,
                        ckpt_every=50, keep_last=2, dtype="float32")
    return MultiTaskRunConfig(model=model, train=train, elastic=ElasticConfig())


RECIPES: dict[str, Callable[[], Any]] = {"tiny": tiny, "small": small, "base100m": base100m,
                                         "finetune": finetune, "multitask": multitask}


def get_recipe(name: str) -> Any:
    """The recipe called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()
