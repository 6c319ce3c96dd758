"""bfloat16 on the wire: half the all-to-all bytes, results within bfloat16 rounding of float32.

The tolerance comes from the rounding: a bfloat16 value is within 2^-9 (0.2%) of its float32 value;
a dispatched row, an expert output on its way back and each of their gradients are rounded once each, so
outputs and gradients move by a few 0.2% of the largest magnitude involved. 2% of the largest value
leaves a margin of ~3x over the worst case of four roundings, whatever the CPU's kernels (they change the
float32 result only in its last bits, 2^-24)."""

from __future__ import annotations

import pytest
import torch

from semoe.config import ParallelConfig
from semoe.layers import MoELayer
from semoe.parallel import apply_expert_parallel, build_mesh
from semoe.parallel.expert_parallel import expert_comm
from tests.dist.launcher import run_ranks
from tests.dist.test_ep_parity import make_batch, make_cfg, make_layer

pytestmark = pytest.mark.numerics  # rerun under other CPU kernels by `make test` (tests/other_kernels.py)


def _run(rank: int, world: int, wire: str, comm: str) -> dict:
    cfg = make_cfg("top2_dropless_renorm")
    layer: MoELayer = make_layer(cfg).float().train()  # the float32 path (make_layer builds float64)
    mesh = build_mesh(world)
    pc = ParallelConfig(a2a_wire_dtype=wire)
    apply_expert_parallel(layer, mesh, comm=comm, ranks_per_node=2, wire_dtype=pc.wire_dtype())
    x, c = (t.float() for t in make_batch(32))
    x = x[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    o = layer(x)
    (o.out * c[rank * 8:(rank + 1) * 8]).sum().backward()
    return {"out": o.out.detach(), "gx": x.grad, "gw1": layer.experts.w1.grad,
            "bytes": expert_comm(layer).reset_counters()["inter_node_bytes"]}


@pytest.mark.parametrize("comm", ["flat", "hierarchical"])
def test_bf16_wire_halves_bytes_and_stays_close(tmp_path, comm: str) -> None:
    full = run_ranks(_run, 4, tmp_path, "same", comm)
    half = run_ranks(_run, 4, tmp_path, "bfloat16", comm)
    for f, h in zip(full, half):
        assert 0 < h["bytes"] <= 0.52 * f["bytes"]  # rows halve; small int32 metadata (hierarchical) does not
        for key in ("out", "gx", "gw1"):
            torch.testing.assert_close(h[key], f[key], atol=2e-2 * float(f[key].abs().max()), rtol=2e-2)
        assert not torch.equal(h["out"], f["out"])  # it really was rounded


def test_bad_wire_dtype() -> None:
    with pytest.raises(ValueError, match="a2a_wire_dtype"):
        ParallelConfig(a2a_wire_dtype="int8")
