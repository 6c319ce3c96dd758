"""Distributed parts: mesh and groups, all-to-all (flat, hierarchical, chunked), expert-parallel comms,
gradient rules and gradient fusion."""

from semoe.parallel.expert_parallel import EPComm, HierarchicalEPComm, apply_expert_parallel, expert_comm
from semoe.parallel.grads import clip_grad_norm_, grad_norm, sync_gradients
from semoe.parallel.mesh import ParallelDims, build_mesh, init_distributed, shutdown_distributed

__all__ = ["EPComm", "HierarchicalEPComm", "ParallelDims", "apply_expert_parallel", "build_mesh",
           "clip_grad_norm_", "expert_comm", "grad_norm", "init_distributed", "shutdown_distributed",
           "sync_gradients"]
