"""Multi-task MoE model (UFO style): per-task stems and heads, task-routed MoE layers, token-gated MoE.

Legend: N rows (tokens of all local samples), D d_model, P tokens per sample, F features per token.

* Task-routed MoE (``TaskMoE``): a shared (common) expert plus one expert per task; the rows of task t get
  ``p_t[0] * shared(h) + p_t[1] * expert_t(h)`` with ``p_t = softmax(policy_t)`` a learned per-task policy.
* Token-gated MoE (``config.token_moe``): the standard ``semoe.layers.moe.MoELayer`` over all rows of all
  tasks (expert parallel when the caller applies ``apply_expert_parallel``).

A model holds the modules of ``local_tasks`` only (an elastic rank holds the tasks of its plan); every
parameter is initialised from the seed and its own name, so any subset of tasks and any layout start from
the same weights. ``param_task(name)`` tells a task parameter's task (None for shared parameters).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from semoe.config import MultiTaskModelConfig
from semoe.layers.moe import MoELayer, MoEStats

TASK_CONTAINERS = ("stems", "pos", "heads", "task_experts", "policy")


@dataclass(frozen=True)
class TaskSpec:
    """A task's shapes: ``tokens`` x ``features`` per sample, ``num_classes`` outputs."""

    name: str
    tokens: int
    features: int
    num_classes: int


def param_task(name: str) -> str | None:
    """The task a parameter belongs to (``stems.digits.weight`` -> ``digits``), None for shared ones."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in TASK_CONTAINERS:
            return parts[i + 1]
    return None


class FFN(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_ND)))


class TaskMoE(nn.Module):
    """Shared expert + per-task experts, mixed by a learned per-task policy (softmax over 2 logits)."""

    def __init__(self, d: int, d_ff: int, tasks: list[str], shared_d_ff: int | None = None) -> None:
        super().__init__()
        self.shared = FFN(d, d_ff if shared_d_ff is None else shared_d_ff)
        self.task_experts = nn.ModuleDict({t: FFN(d, d_ff) for t in tasks})
        self.policy = nn.ParameterDict({t: nn.Parameter(torch.zeros(2)) for t in tasks})

    def mix(self, task: str) -> torch.Tensor:
        """[2]: the weights of (shared, task expert) for ``task``."""
        return torch.softmax(self.policy[task], 0)

    def forward(self, x_ND: torch.Tensor, spans: list[tuple[str, int, int]]) -> torch.Tensor:
        shared_ND = self.shared(x_ND)
        parts = []
        for task, lo, hi in spans:
            p = self.mix(task).to(x_ND.dtype)
            parts.append(p[0] * shared_ND[lo:hi] + p[1] * self.task_experts[task](x_ND[lo:hi]))
        return torch.cat(parts)


class Block(nn.Module):
    def __init__(self, cfg: MultiTaskModelConfig, tasks: list[str], task_moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.mlp = FFN(cfg.d_model, cfg.d_ff)
        self.norm2 = nn.LayerNorm(cfg.d_model) if task_moe else None
        self.task_moe = (TaskMoE(cfg.d_model, cfg.task_expert_d_ff, tasks, cfg.shared_expert_d_ff) if task_moe
                         else None)

    def forward(self, h_ND: torch.Tensor, spans: list[tuple[str, int, int]]) -> torch.Tensor:
        h_ND = h_ND + self.mlp(self.norm1(h_ND))
        if self.task_moe is not None:
            h_ND = h_ND + self.task_moe(self.norm2(h_ND), spans)
        return h_ND


@dataclass
class MultiTaskOutput:
    logits: dict[str, torch.Tensor]  # task -> [n, num_classes]
    router_loss: torch.Tensor  # the token-gated layer's (0 without one)
    aux_loss: torch.Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)


class MultiTaskMoE(nn.Module):
    """``forward({task: x [n, P_t, F_t]}) -> MultiTaskOutput``; tasks in ``specs`` order."""

    def __init__(self, cfg: MultiTaskModelConfig, specs: list[TaskSpec], local_tasks: list[str] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.specs = cfg, {s.name: s for s in specs}
        local = [s.name for s in specs] if local_tasks is None else list(local_tasks)
        unknown = [t for t in local if t not in self.specs]
        if unknown:
            raise ValueError(f"local task(s) {unknown} are not among the model's tasks {list(self.specs)}")
        self.task_names = [s.name for s in specs if s.name in local]  # global order
        D = cfg.d_model
        self.stems = nn.ModuleDict({t: nn.Linear(self.specs[t].features, D) for t in self.task_names})
        self.pos = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.specs[t].tokens, D)) for t in self.task_names})
        self.blocks = nn.ModuleList(Block(cfg, self.task_names, (i + 1) % cfg.task_moe_every == 0)
                                    for i in range(cfg.n_blocks))
        self.token_norm = nn.LayerNorm(D) if cfg.token_moe is not None else None
        self.token_moe = MoELayer(cfg.token_moe) if cfg.token_moe is not None else None
        self.norm_f = nn.LayerNorm(D)
        self.heads = nn.ModuleDict({t: nn.Linear(D, self.specs[t].num_classes) for t in self.task_names})
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Each parameter from its own generator seeded by ``seed`` and its name: layout independent."""
        norms = {f"{m}.{k}" for m, mod in self.named_modules() if isinstance(mod, nn.LayerNorm)
                 for k in ("weight", "bias")}
        for name, p in self.named_parameters():
            g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:12], 16))
            if name in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() >= 2:  # matrices, positions, stacked token experts
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * self.cfg.init_std)
            else:  # biases, policies (an even mix at the start)
                p.zero_()

    def forward(self, xs: dict[str, torch.Tensor]) -> MultiTaskOutput:
        missing = [t for t in xs if t not in self.stems]
        if missing:
            raise ValueError(f"this model holds tasks {self.task_names}, not {missing}")
        tasks = [t for t in self.task_names if t in xs]
        rows, spans, off = [], [], 0
        for t in tasks:
            x = xs[t]
            h = self.stems[t](x) + self.pos[t].to(x.dtype)  # [n, P, D]
            rows.append(h.reshape(-1, h.shape[-1]))
            spans.append((t, off, off + rows[-1].shape[0]))
            off += rows[-1].shape[0]
        h_ND = torch.cat(rows)
        for block in self.blocks:
            h_ND = block(h_ND, spans)
        zero = h_ND.new_zeros(())
        router_loss = aux = zero
        stats: list[MoEStats] = []
        if self.token_moe is not None:
            assert self.token_norm is not None
            mo = self.token_moe(self.token_norm(h_ND))
            h_ND = h_ND + mo.out
            router_loss, aux, stats = mo.router_loss, mo.aux_loss, [mo.stats]
        h_ND = self.norm_f(h_ND)
        logits = {}
        for t, lo, hi in spans:
            n = xs[t].shape[0]
            logits[t] = self.heads[t](h_ND[lo:hi].reshape(n, -1, h_ND.shape[-1]).mean(1))
        return MultiTaskOutput(logits, router_loss, aux, stats)
