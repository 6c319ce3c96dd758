"""Gradient rules under expert parallelism.

Objective: the mean over all ranks of each rank's loss. Dense (replicated) parameters: gradients
averaged over the whole world. Expert parameters: each rank's expert gradient already holds the
contributions of every rank of its ep group (through the all-to-all's backward), so it is summed
over the expert's replicas (``dp`` axis) and divided by the world size. Each class is flattened into
one buffer and reduced with one collective (``semoe.parallel.fusion`` does it bucketed and overlapped).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from semoe.parallel.mesh import dp_group


def is_expert_param(name: str) -> bool:
    """Expert parameters are the stacked weights under an MoE layer's ``experts`` module."""
    return ".experts." in f".{name}"


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters that require grad, in registration order."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def _reduce_(params: list[nn.Parameter], group: dist.ProcessGroup | None, scale: float, communicate: bool) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if communicate:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[off:off + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[off:off + n].view_as(p))
        off += n


def sync_gradients(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Average gradients across ranks following the rules above. No-op without a mesh. Parameters sharded by
    FSDP (``semoe.parallel.fsdp``, DTensors) are skipped: FSDP reduce-scattered (and averaged) them in backward."""
    if mesh is None or not dist.is_initialized():
        return
    world = dist.get_world_size()
    dense, expert = split_params(model)
    dense = [p for p in dense if not isinstance(p, DTensor)]
    _reduce_(dense, None, 1.0 / world, communicate=True)  # None: the whole world
    _reduce_(expert, dp_group(mesh), 1.0 / world, communicate=mesh.size(0) > 1)


def grad_norm(model: nn.Module, mesh: DeviceMesh | None, expert_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Global L2 norm of the (synchronised) gradients, each expert shard counted exactly once:
    dense gradients are identical on every rank and counted once; expert norms are summed over the ep
    group (each rank holds different experts; dp replicas are identical).

    Each parameter's norm is taken in its gradient's dtype (one call, as torch's clip_grad_norm_ does), and
    the squares of those norms are summed in float64: a float64 run is float64 throughout, and the sum over
    parameters and ranks adds no rounding of its own. ``expert_sq``: the experts' part computed elsewhere
    (already summed over the ep group; ``semoe.storage.offload`` keeps the experts out of the model).
    Dense gradients sharded by FSDP (DTensors): each rank's shards' squares, summed over the shards' mesh."""
    dense, expert = split_params(model)

    def sq(ps: list[nn.Parameter]) -> torch.Tensor:
        vals = [torch.linalg.vector_norm(p.grad.detach()).double().square() for p in ps if p.grad is not None]
        return torch.stack(vals).sum() if vals else torch.zeros((), dtype=torch.float64)
    sharded = [p for p in dense if isinstance(p.grad, DTensor)]
    dense_sq = sq([p for p in dense if not isinstance(p.grad, DTensor)])
    if sharded:
        vals = [torch.linalg.vector_norm(p.grad.to_local().detach()).double().square() for p in sharded]
        shard_sq = torch.stack(vals).sum()
        dist.all_reduce(shard_sq, group=sharded[0].grad.device_mesh.get_group())
        dense_sq = dense_sq + shard_sq
    if expert_sq is None:
        expert_sq = sq(expert)
        if mesh is not None and mesh.size(1) > 1:
            dist.all_reduce(expert_sq, group=mesh.get_group("ep"))
    return (dense_sq + expert_sq).sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: DeviceMesh | None,
                    expert_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Scale all gradients so the global norm is at most ``max_norm``; returns the norm before.
    ``expert_sq``: see :func:`grad_norm` (the caller then scales those gradients itself)."""
    total = grad_norm(model, mesh, expert_sq)
    if max_norm > 0 and math.isfinite(float(total)):
        coef = (max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


@torch.no_grad()
def sync_router_bias(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Average the auxiliary-loss-free expert biases over the expert replicas (``dp`` axis).

    Each expert-parallel group moves its routers' biases from its own tokens' load, so without this
    the replicas' biases (and their routing) drift apart. Inside an ep group they are already equal.
    """
    from semoe.layers.router import Router

    if mesh is None or mesh.size(0) == 1:
        return
    biases = [m.expert_bias for m in model.modules() if isinstance(m, Router) and m.cfg.bias_update_rate > 0]
    if not biases:
        return
    flat = torch.cat([b.reshape(-1) for b in biases])
    dist.all_reduce(flat, group=dp_group(mesh))
    flat /= mesh.size(0)
    off = 0
    for b in biases:
        b.copy_(flat[off:off + b.numel()].view_as(b))
        off += b.numel()
