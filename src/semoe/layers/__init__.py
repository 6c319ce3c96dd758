"""Single-device MoE math: router, experts, losses, the MoE layer. Never imports torch.distributed."""

from semoe.layers.experts import Experts, SharedExpert
from semoe.layers.moe import MoELayer, MoEOutput, MoEStats
from semoe.layers.router import ExpertChoiceRouter, Router, Routing, TopKRouter, build_router

__all__ = [
           "ExpertChoiceRouter",
           "Experts",
           "MoELayer",
           "MoEOutput",
           "MoEStats",
           "Router",
           "Routing",
           "SharedExpert",
           "TopKRouter",
           "build_router",
]
