"""Gradient rules of an elastic plan (see ``semoe.elastic.planner``): each rank's loss is its share of the
objective, so gradients are *summed*: shared parameters over the world, task t's parameters over t's ranks,
token-gated experts over their replicas (the expert-parallel all-to-all already brought every rank's
contribution to the expert's owner). Norms count every parameter once. Each gradient sum's CPU time on this
rank is kept (``comm_s``) for the planner's model of what a task held by several ranks costs them.

Gradients that are summed live in persistent flat buffers, one per class (shared, each task held by several
ranks, token-gated experts with replicas): ``prepare_`` zeroes them and makes every ``p.grad`` a view of its
buffer, so backward adds into them in place and each sum is one all-reduce of a buffer, with no packing,
unpacking or allocation per step. A task held by every rank (its group is the world) is summed with the
shared parameters, in the shared buffer: one collective less. The shared buffer has a tail: this rank's part
of the squared norm and the caller's statistics ride the shared sum, so a step has one world collective (the
task and expert sums, within their groups, go first). The tail is in the gradients' dtype: in float32 the norm
and the statistics are summed to float32 rounding (counts below 2^24 exactly)."""

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


class _Flat:
    """One class's gradients as views of one buffer (``tail`` more elements after them)."""

    def __init__(self, params: list[nn.Parameter], tail: int = 0) -> None:
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"one gradient class holds parameters of dtypes {sorted(map(str, dtypes))}; cast the "
                             "model to one dtype (model.to(dtype)) before training it elastically")
        dtype = dtypes.pop() if dtypes else torch.get_default_dtype()
        self.params, self.numel = params, sum(p.numel() for p in params)
        self.buf = torch.zeros(self.numel + tail, dtype=dtype)
        self.views, off = [], 0
        for p in params:
            self.views.append(self.buf[off:off + p.numel()].view_as(p))
            off += p.numel()
        self.tail = self.buf[self.numel:]

    def attach_(self) -> None:
        """Zero the buffer and make every gradient its view (a step's start)."""
        self.buf.zero_()
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                p.grad = v

    def adopt_(self) -> None:
        """Gradients made without ``attach_`` (or set to None since) moved into the buffer."""
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                if p.grad is None:
                    v.zero_()
                else:
                    v.copy_(p.grad)
                p.grad = v


class ElasticLayout:
    """This rank's view of a plan: its groups and the gradient sync / norm of its model."""

    def __init__(self, plan: Plan, rank: int, mesh: DeviceMesh | None, distributed: bool) -> None:
        self.plan, self.rank, self.mesh, self.distributed = plan, rank, mesh, distributed
        self.groups = task_groups([list(r) for r in plan.experts_on]) if distributed else [None] * len(plan.tasks)
        self._classes_of: tuple[int, tuple] | None = None  # (id of the model, its classes): named once
        self._flat_of: tuple[int, int, dict[str, _Flat]] | None = None  # (id of the model, tail, buffers)
        self._summed: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the last sync's (norm, extra)
        self.comm_s: dict[str, float] = {}  # the last sync's CPU seconds per gradient sum: task name, "" shared
        # tasks held by every rank: their gradients ride the shared buffer (summed over the world with it)
        self.world_tasks = tuple(t for t, on in zip(plan.tasks, plan.experts_on)
                                 if distributed and plan.world > 1 and len(on) == plan.world)

    def numel(self, model: nn.Module) -> tuple[int, dict[str, int]]:
        """Gradient elements of (the shared parameters, each task's parameters held here)."""
        shared, tasks, _ = self._classes(model)
        return sum(p.numel() for p in shared), {t: sum(p.numel() for p in ps) for t, ps in tasks.items() if ps}

    def _world_summed(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters summed over the world in the shared buffer: shared ones, then those of every task
        held by every rank (task order)."""
        shared, tasks, _ = self._classes(model)
        return shared + [p for t in self.world_tasks for p in tasks[t]]

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

    def _flats(self, model: nn.Module, tail: int = 0) -> dict[str, _Flat]:
        """The gradient buffers of the classes of ``model`` that are summed ("" shared, with ``tail`` more
        elements; each task held by more than one rank; "experts" with replicas), built once per model (again
        when the tail grows); none in one process. A class summed by no one keeps its gradients as autograd
        makes them (zeroing and adding into a buffer would only cost)."""
        if self._flat_of is None or self._flat_of[0] != id(model) or self._flat_of[1] < tail:
            _, tasks, experts = self._classes(model)
            flats: dict[str, _Flat] = {}
            if self.distributed:
                flats[""] = _Flat(self._world_summed(model), tail)
                flats.update({t: _Flat(tasks[t]) for t, g in zip(self.plan.tasks, self.groups)
                              if tasks[t] and g is not None and 1 < dist.get_world_size(g)
                              and t not in self.world_tasks})
                if experts and self.mesh is not None and self.mesh.size(0) > 1:
                    flats["experts"] = _Flat(experts)
            if self._flat_of is not None and self._flat_of[0] == id(model):
                for f in flats.values():  # gradients already in the old buffers move over
                    f.adopt_()
            self._flat_of = (id(model), tail, flats)
        return self._flat_of[2]

    def prepare_(self, model: nn.Module, tail: int = 0) -> None:
        """Before a step's backward: every gradient a zeroed view of its class's buffer (``tail``: the length of
        the statistics vector the step's ``sync_gradients`` will send along)."""
        self._summed = None
        for f in self._flats(model, tail + 1).values():  # + 1: this rank's part of the squared norm
            f.attach_()

    def sync_gradients(self, model: nn.Module, extra: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                         torch.Tensor | None]:
        """Sum the gradients by the rules, in place in their buffers (token-gated experts over their replicas and
        each task over its ranks first, then the shared ones over the world, with the tasks every rank holds), and
        take the global L2 norm (shared once, each task once (its first rank), each token expert once (dp index
        0)). ``extra``, a vector of
        this rank's, and this rank's part of the squared norm ride the shared all-reduce. Returns (the norm,
        ``extra`` summed over the world in float64, or None); ``clip_`` clips by that norm."""
        n = 1 if extra is None else 1 + extra.numel()
        flats = self._flats(model, n)
        for f in flats.values():  # gradients made without prepare_ (a no-op after it)
            f.adopt_()
        _, tasks, experts = self._classes(model)
        self.comm_s = {}
        if self.distributed:
            if "experts" in flats:
                dist.all_reduce(flats["experts"].buf, group=dp_group(self.mesh))
            for t in self.plan.tasks:  # task order: the same collective order on every rank
                if t in flats:
                    g = self.groups[self.plan.index(t)]
                    c0 = time.process_time()
                    dist.all_reduce(flats[t].buf, group=g)
                    self.comm_s[t] = time.process_time() - c0
        own = self._own_sq(tasks, experts)  # after the task and expert sums
        if self.distributed:
            sf = flats[""]
            tail = sf.tail[:n]
            tail[0] = own
            if extra is not None:
                tail[1:] = extra.reshape(-1)
            c0 = time.process_time()
            dist.all_reduce(sf.buf[:sf.numel + n])
            self.comm_s[""] = time.process_time() - c0
            summed = tail.to(torch.float64)
        else:  # one process: nothing to send, nothing rounded to the gradients' dtype
            summed = torch.cat([own.reshape(1), torch.zeros(0, dtype=torch.float64) if extra is None
                                else extra.to(torch.float64).reshape(-1)])
        norm = (_sq([p.grad for p in self._world_summed(model)]) + summed[0]).sqrt()
        self._summed = (norm, None if extra is None else summed[1:].view_as(extra))
        return self._summed

    def _own_sq(self, tasks: dict[str, list[nn.Parameter]], experts: list[nn.Parameter]) -> torch.Tensor:
        """This rank's share of the squared norm: task t's on t's first rank (a task every rank holds: after the
        shared sum, on every rank), token-gated experts at dp 0."""
        mine = [p.grad for i, t in enumerate(self.plan.tasks) if self.plan.experts_on[i][0] == self.rank
                and t not in self.world_tasks for p in tasks[t]]  # a world task: counted with the shared ones
        if self.mesh is None or self.mesh.get_local_rank("dp") == 0:
            mine += [p.grad for p in experts]
        return _sq(mine)

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global L2 norm of the last ``sync_gradients`` (run here when there was none since ``prepare_``)."""
        if self._summed is None:
            self.sync_gradients(model)
        assert self._summed is not None
        return self._summed[0]

    def clip_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (<= 0: no clipping) by the norm of the last ``sync_gradients`` (run here when
        there was none since ``prepare_``); returns the norm before clipping."""
        total = self.grad_norm(model)
        if max_norm > 0 and math.isfinite(float(total)):
            coef = max_norm / (float(total) + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
        return total


def _sq(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Sum of the squared norms (float64) of ``grads`` (None: 0), each norm taken in its dtype (``_foreach_norm``)."""
    grads = [g.detach() for g in grads if g is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(grads)).double().square().sum()
