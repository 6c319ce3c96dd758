"""Distributed parts: mesh and groups, all-to-all, expert-parallel comm, gradient rules."""

from semoe.parallel.expert_parallel import EPComm, apply_expert_parallel
from semoe.parallel.grads import clip_grad_norm_, grad_norm, sync_gradients
from semoe.parallel.mesh import ParallelDims, build_mesh, init_distributed

__all__ = ["EPComm", "ParallelDims", "apply_expert_parallel", "build_mesh", "clip_grad_norm_", "grad_norm",
           "init_distributed", "sync_gradients"]
