"""Dimension 1 of the 2D prefetch: dense parameters sharded over the data-parallel ranks with FSDP2.

:func:`apply_fsdp` wraps every transformer block, then the root, with ``fully_shard`` over a 1-D mesh of
the world (``semoe.parallel.mesh.dense_mesh``: every rank is a data-parallel replica of the dense part).
Each block's parameters are stored as 1/world shards; the block's all-gather runs before its forward and
its gradients are reduce-scattered (averaged over the world, the trainer's dense rule) after its backward.
Explicit prefetch: block L+1's all-gather is issued while block L computes in forward
(``set_modules_to_forward_prefetch``), block L-1's in backward (``set_modules_to_backward_prefetch``).
Expert parameters are left out (``ignored_params``): they are sharded over ``ep`` already and reduced
over their replicas by ``semoe.parallel.grads`` (or kept in the expert store).
The Trainer calls it when ``parallel.fsdp`` is true (docs/storage.md, "Dimension 1").
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from semoe.parallel.grads import is_expert_param

__all__ = ["apply_fsdp"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
               prefetch: bool = True) -> nn.Module:
    """Shard ``model``'s dense parameters over ``mesh`` (1-D) in place; returns ``model``. ``model.layers``
    (a ModuleList of blocks) get one FSDP unit each; the rest (embeddings, final norm, head) the root's."""
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp needs a 1-D mesh over the data-parallel ranks, got {mesh.ndim} dims")
    ignored = {p for n, p in model.named_parameters() if is_expert_param(n)}
    blocks = list(getattr(model, "layers", []))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    if prefetch and len(blocks) > 1:
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                block.set_modules_to_forward_prefetch([blocks[i + 1]])
            if i > 0:
                block.set_modules_to_backward_prefetch([blocks[i - 1]])
    return model
