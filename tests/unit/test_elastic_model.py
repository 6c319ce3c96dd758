"""The multi-task model's shared-expert width (``model.shared_expert_d_ff``) and the elastic layout's clipping in
one process against torch's ``clip_grad_norm_``."""

from __future__ import annotations

import copy

import pytest
import torch

from semoe.config import MultiTaskModelConfig
from semoe.elastic.layout import ElasticLayout
from semoe.elastic.planner import plan_tasks
from semoe.models.multitask import MultiTaskMoE, TaskSpec

SPECS = [TaskSpec("a", 2, 3, 4), TaskSpec("b", 1, 5, 2)]


def test_shared_expert_width() -> None:
    narrow = MultiTaskMoE(MultiTaskModelConfig(d_model=8, d_ff=8, task_expert_d_ff=12, shared_expert_d_ff=6), SPECS)
    layer = narrow.blocks[0].task_moe
    assert layer.shared.fc1.out_features == 6 and layer.shared.fc2.in_features == 6
    assert all(e.fc1.out_features == 12 for e in layer.task_experts.values())
    default = MultiTaskMoE(MultiTaskModelConfig(d_model=8, d_ff=8, task_expert_d_ff=12), SPECS)
    assert default.blocks[0].task_moe.shared.fc1.out_features == 12
    out = narrow({"a": torch.randn(3, 2, 3), "b": torch.randn(2, 1, 5)})
    assert out.logits["a"].shape == (3, 4) and out.logits["b"].shape == (2, 2)


def test_shared_expert_width_bad() -> None:
    with pytest.raises(ValueError, match="shared_expert_d_ff must be a positive integer"):
        MultiTaskModelConfig(shared_expert_d_ff=0)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped / not clipped
def test_layout_clip_matches_torch(max_norm: float) -> None:
    model = MultiTaskMoE(MultiTaskModelConfig(d_model=8, d_ff=8, task_expert_d_ff=12, shared_expert_d_ff=6),
                         SPECS, seed=3).double()
    x = {"a": torch.randn(3, 2, 3, dtype=torch.float64), "b": torch.randn(2, 1, 5, dtype=torch.float64)}
    out = model(x)
    (out.logits["a"].square().sum() + out.logits["b"].sum()).backward()
    ref = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    layout = ElasticLayout(plan_tasks({"a": (3, 2.0), "b": (2, 1.0)}, 1), 0, None, distributed=False)
    got = layout.clip_(model, max_norm)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=0), name
