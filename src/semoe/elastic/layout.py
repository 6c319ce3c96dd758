"""Gradient rules of an elastic plan (see ``semoe.elastic.planner``): each rank's loss is its share of the
objective, so gradients are *summed*: shared parameters over the world, task t's parameters over t's ranks,
token-gated experts over their replicas (the expert-parallel all-to-all already brought every rank's
contribution to the expert's owner). Norms count every parameter once."""

from __future__ import annotations

import math

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
        self._sum_(shared, None)
        for t, g in zip(self.plan.tasks, self.groups):  # task order: the same collective order on every rank
            if g is not None and dist.get_world_size(g) > 1:
                self._sum_(tasks[t], g)
        if self.mesh is not None and self.mesh.size(0) > 1:
            self._sum_(experts, dp_group(self.mesh))

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm: shared once, each task once (its first rank), each token expert once (dp index 0)."""
        shared, tasks, experts = self._classes(model)

        def sq(ps: list[nn.Parameter]) -> torch.Tensor:
            grads = [p.grad.detach() for p in ps if p.grad is not None]
            if not grads:
                return torch.zeros((), dtype=torch.float64)
            return torch.stack(torch._foreach_norm(grads)).double().square().sum()
        own = torch.zeros((), dtype=torch.float64)
        for i, t in enumerate(self.plan.tasks):
            if self.plan.experts_on[i][0] == self.rank:
                own = own + sq(tasks[t])
        if self.mesh is None or self.mesh.get_local_rank("dp") == 0:
            own = own + sq(experts)
        if self.distributed:
            dist.all_reduce(own)
        return (sq(shared) + own).sqrt()

    def clip_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        total = self.grad_norm(model)
        if max_norm > 0 and math.isfinite(float(total)):
            coef = max_norm / (float(total) + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
        return total
