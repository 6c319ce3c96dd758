"""Gradient rules of an elastic plan (see ``semoe.elastic.planner``): each rank's loss is its share of the
objective, so gradients are *summed*: shared parameters over the world, task t's parameters over t's ranks,
token-gated experts over their replicas (the expert-parallel all-to-all already brought every rank's
contribution to the expert's owner). Norms count every parameter once. Each gradient sum's CPU time on this
rank is kept (``comm_s``) for the planner's model of what a task held by several ranks costs them."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from semoe.elastic.planner import Plan
from semoe.models.multitask import param_task
from semoe.parallel.grads import is_expert_param
from semoe.parallel.mesh import dp_group, task_groups


def token_ep_size(world: int, num_experts: int) -> int:
    """The largest expert-parallel size that divides both the world and the token-gated experts."""
    return max(d for d in range(1, world + 1) if world % d == 0 and num_experts % d == 0)


class ElasticLayout:
    """This rank's view of a plan: its groups and the gradient sync / norm of its model."""

    def __init__(self, plan: Plan, rank: int, mesh: DeviceMesh | None, distributed: bool) -> None:
        self.plan, self.rank, self.mesh, self.distributed = plan, rank, mesh, distributed
        self.groups = task_groups([list(r) for r in plan.experts_on]) if distributed else [None] * len(plan.tasks)
        self._classes_of: tuple[int, tuple] | None = None  # (id of the model, its classes): named once
        self._norm_of: tuple[int, tuple] | None = None  # (id of the model, its norm weights): once per model
        self.comm_s: dict[str, float] = {}  # the last sync's CPU seconds per gradient sum: task name, "" shared

    def numel(self, model: nn.Module) -> tuple[int, dict[str, int]]:
        """Gradient elements of (the shared parameters, each task's parameters held here)."""
        shared, tasks, _ = self._classes(model)
        return sum(p.numel() for p in shared), {t: sum(p.numel() for p in ps) for t, ps in tasks.items() if ps}

    def _classes(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[str, list[nn.Parameter]],
                                                   list[nn.Parameter]]:
        """(shared, {task: parameters}, token-gated experts) of ``model``, computed once per model."""
        if self._classes_of is None or self._classes_of[0] != id(model):
            self._classes_of = (id(model), self._name_classes(model))
        return self._classes_of[1]

    def _name_classes(self, model: nn.Module) -> tuple[list[nn.Parameter], dict[str, list[nn.Parameter]],
                                                        list[nn.Parameter]]:
        shared: list[nn.Parameter] = []
        tasks: dict[str, list[nn.Parameter]] = {t: [] for t in self.plan.tasks}
        experts: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            t = param_task(name)
            if t is not None:
                tasks[t].append(p)
            elif is_expert_param(name) and ".token_moe." in f".{name}":
                experts.append(p)
            else:
                shared.append(p)
        return shared, tasks, experts

    @staticmethod
    def _sum_(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        off, views = 0, []
        for g in grads:
            views.append(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        torch._foreach_copy_(grads, views)  # into the gradients in place: no new tensor per parameter

    def sync_gradients(self, model: nn.Module) -> None:
        if not self.distributed:
            return
        shared, tasks, experts = self._classes(model)
        self.comm_s = {}
        c0 = time.process_time()
        self._sum_(shared, None)
        self.comm_s[""] = time.process_time() - c0
        for t, g in zip(self.plan.tasks, self.groups):  # task order: the same collective order on every rank
            if g is not None and dist.get_world_size(g) > 1:
                c0 = time.process_time()
                self._sum_(tasks[t], g)
                self.comm_s[t] = time.process_time() - c0
        if self.mesh is not None and self.mesh.size(0) > 1:
            self._sum_(experts, dp_group(self.mesh))

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm: shared once, each task once (its first rank), each token expert once (dp index 0)."""
        return self.norm_and_sum(model)[0]

    def _norm_weights(self, model: nn.Module) -> tuple[list[nn.Parameter], torch.Tensor, torch.Tensor]:
        """Every parameter of ``model`` with a weight for this rank's share of the norm (task t's on t's first
        rank, token-gated experts at dp index 0) and one for the shared part (counted by every rank alike);
        computed once per model."""
        if self._norm_of is None or self._norm_of[0] != id(model):
            shared, tasks, experts = self._classes(model)
            mine = [p for i, t in enumerate(self.plan.tasks) if self.plan.experts_on[i][0] == self.rank
                    for p in tasks[t]]
            if self.mesh is None or self.mesh.get_local_rank("dp") == 0:
                mine += experts
            params = [p for p in model.parameters() if p.requires_grad]
            ids_mine, ids_shared = {id(p) for p in mine}, {id(p) for p in shared}
            own_w = torch.tensor([1.0 if id(p) in ids_mine else 0.0 for p in params], dtype=torch.float64)
            shared_w = torch.tensor([1.0 if id(p) in ids_shared else 0.0 for p in params], dtype=torch.float64)
            self._norm_of = (id(model), (params, own_w, shared_w))
        return self._norm_of[1]

    def norm_and_sum(self, model: nn.Module, extra: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                        torch.Tensor | None]:
        """(the global L2 norm, ``extra`` (float64) summed over the world): both in one all-reduce. One
        ``_foreach_norm`` over every gradient; a parameter without one counts 0."""
        params, own_w, shared_w = self._norm_weights(model)
        have = [p.grad is not None for p in params]
        if not all(have):
            own_w, shared_w = own_w[have], shared_w[have]
        grads = [p.grad.detach() for p, h in zip(params, have) if h]
        sq = torch.stack(torch._foreach_norm(grads)).double().square() if grads else torch.zeros(0, dtype=torch.float64)
        own = sq @ own_w
        both = own.reshape(1) if extra is None else torch.cat([own.reshape(1), extra.to(torch.float64).reshape(-1)])
        if self.distributed:
            dist.all_reduce(both)
        return (sq @ shared_w + both[0]).sqrt(), None if extra is None else both[1:].view_as(extra)

    def clip_(self, model: nn.Module, max_norm: float, extra: torch.Tensor | None = None):
        """Clip to ``max_norm`` (<= 0: no clipping); the norm before clipping, or (the norm, ``extra`` summed
        over the world) when ``extra`` is given (one all-reduce for both)."""
        total, summed = self.norm_and_sum(model, extra)
        if max_norm > 0 and math.isfinite(float(total)):
            coef = max_norm / (float(total) + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
        return total if extra is None else (total, summed)
