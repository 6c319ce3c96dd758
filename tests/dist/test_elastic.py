"""Elastic placement at 2 and 4 ranks equals one process on the same global multi-task batch: forward
(every task's logits), the loss, every gradient after the elastic gradient rules, and the parameters after a
few AdamW steps. Uneven plans, tasks sharing a rank, a task split over ranks, and one rank per task.

The reference is independent of the planner and the layout: one ``MultiTaskMoE`` holding every task, the
objective written out (sum over tasks of the mean cross-entropy + the token-gated router loss), one backward.
Float64 throughout: the layouts sum in other orders, so only rounding (~1e-16 relative) may differ; 1e-10
holds on any CPU. The token-gated layer is dropless (capacity is a property of the batch split, not a bug)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semoe.config import ElasticConfig, MoEConfig, MultiTaskModelConfig, MultiTaskRunConfig, RouterConfig, TrainConfig
from semoe.elastic.data import load_tasks, task_batch, task_specs
from semoe.elastic.planner import Plan, plan_tasks
from semoe.models.multitask import MultiTaskMoE
from semoe.training.elastic_trainer import ElasticTrainer
from semoe.training.trainer import lr_at, param_groups
from tests.dist.launcher import run_ranks

pytestmark = pytest.mark.numerics

TOL = 1e-10
TASKS = "synth2=8,digits=4,cancer=2,wine=1"  # 8:4:2:1


def small_run(tasks: str = TASKS, token_moe: bool = True, steps: int = 3) -> MultiTaskRunConfig:
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, activation="gelu",
                    router=RouterConfig(top_k=2, capacity_factor=None, eval_capacity_factor=None))
    model = MultiTaskModelConfig(d_model=16, n_blocks=2, d_ff=32, task_expert_d_ff=24, shared_expert_d_ff=20,
                                 token_moe=moe if token_moe else None)
    train = TrainConfig(steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=100, ckpt_every=100,
                        dtype="float64", grad_clip=0.5)
    return MultiTaskRunConfig(model=model, train=train, elastic=ElasticConfig(tasks=tasks))


def reference(run: MultiTaskRunConfig, steps: int):
    """One process, every task, the objective written out: (logits of step 0, loss, grads of step 0, params)."""
    batches = run.elastic.task_batches()
    data = load_tasks(list(batches))
    torch.manual_seed(0)
    model = MultiTaskMoE(run.model, task_specs(data), seed=run.train.seed).double()
    tc = run.train
    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, betas=tc.betas)
    first = None
    for step in range(steps):
        xs, ys = {}, {}
        for i, (t, b) in enumerate(batches.items()):
            x, y = task_batch(data[t], b, step, tc.seed, i)
            xs[t], ys[t] = x.double(), y
        out = model(xs)
        loss = sum(F.cross_entropy(out.logits[t], ys[t]) for t in batches) + out.router_loss
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = ({t: v.detach().clone() for t, v in out.logits.items()}, float(loss.detach()),
                     {n: p.grad.clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        opt.step()
    return (*first, {n: p.detach().clone() for n, p in model.named_parameters()})


def _elastic(rank: int, world: int, run: MultiTaskRunConfig, plan_json: dict, out: str, steps: int):
    t = ElasticTrainer(run, Path(out), resume=None, plan=Plan.from_json(plan_json))
    xs, ys = t.local_batch(0)
    value, mo, _ = t.objective(xs, ys)
    value.backward()
    t.layout.sync_gradients(t.model)
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.optimizer.zero_grad()
    for step in range(steps):
        t.train_step(step)
    offsets = {n: m.expert_offset for n, m in t.model.named_modules() if hasattr(m, "expert_offset")}
    return {"logits": {k: v.detach() for k, v in mo.logits.items()}, "value": float(value), "grads": grads,
            "params": {n: p.detach().clone() for n, p in t.model.named_parameters()}, "offsets": offsets,
            "local": t.plan.local(rank)}


def _ref_slice(name: str, ref: torch.Tensor, offsets: dict[str, int], local: torch.Tensor) -> torch.Tensor:
    mod = name.rsplit(".", 1)[0]
    if mod in offsets and ref.dim() == local.dim() and ref.shape[0] != local.shape[0]:
        return ref[offsets[mod]:offsets[mod] + local.shape[0]]
    return ref


def _check(run: MultiTaskRunConfig, plan: Plan, tmp_path: Path, steps: int = 3) -> None:
    logits, loss, grads, params = reference(run, steps)
    got = run_ranks(_elastic, plan.world, tmp_path, run, plan.to_json(), str(tmp_path / "out"), steps)
    assert sum(g["value"] for g in got) == pytest.approx(loss, abs=TOL)  # the ranks' shares sum to the loss
    seen = set()
    for r, g in enumerate(got):
        assert g["local"] == plan.local(r)
        for t, lo, hi in g["local"]:  # forward: this rank's rows of every task it computes
            torch.testing.assert_close(g["logits"][t], logits[t][lo:hi], rtol=TOL, atol=TOL)
        for name, grad in g["grads"].items():  # every gradient this rank holds, after the elastic rules
            torch.testing.assert_close(grad, _ref_slice(name, grads[name], g["offsets"], grad), rtol=TOL, atol=TOL,
                                       msg=lambda m, n=name, r=r: f"rank {r} grad {n}: {m}")
            seen.add(name)
        for name, p in g["params"].items():  # after `steps` AdamW steps with global-norm clipping
            torch.testing.assert_close(p, _ref_slice(name, params[name], g["offsets"], p), rtol=TOL, atol=TOL,
                                       msg=lambda m, n=name, r=r: f"rank {r} param {n}: {m}")
    assert seen == set(grads)  # every parameter of the one-process model is held by some rank


def _costs(run: MultiTaskRunConfig) -> dict[str, tuple[int, float]]:
    data = load_tasks(list(run.elastic.task_batches()))
    return {t: (b, float(data[t].tokens)) for t, b in run.elastic.task_batches().items()}


def test_planned_2_ranks_with_shared_rank(tmp_path) -> None:
    run = small_run()
    plan = plan_tasks(_costs(run), 2)
    assert any(len(plan.holds(r)) > 1 for r in range(2))  # small tasks share a rank
    _check(run, plan, tmp_path)


def test_planned_4_ranks_uneven(tmp_path) -> None:
    run = small_run(tasks="synth2=16,digits=4,cancer=2,wine=1")
    plan = plan_tasks(_costs(run), 4)
    assert max(len(r) for r in plan.ranks) >= 2 and len({len(r) for r in plan.ranks}) > 1  # uneven
    _check(run, plan, tmp_path)


def test_every_task_split_over_ranks_without_token_moe(tmp_path) -> None:
    """Every task on both ranks (its task group has 2 ranks), and one rank per task at 4 ranks."""
    run = small_run(token_moe=False)
    names = tuple(run.elastic.task_batches())
    batches = tuple(run.elastic.task_batches().values())
    both = Plan(2, names, batches, (1.0,) * 4, ((0, 1),) * 3 + ((1,),), ((0, 1),) * 3 + ((1,),))
    _check(run, both, tmp_path)
    own = plan_tasks(_costs(run), 4, share=False)
    assert sorted(r for rs in own.ranks for r in rs) == [0, 1, 2, 3]
    _check(run, own, tmp_path / "own")


def _replan(rank: int, world: int, run: MultiTaskRunConfig, out: str):
    import numpy as np

    t = ElasticTrainer(run, Path(out), resume=None)
    before = t.plan
    losses = [t.train_step(s)["loss"] for s in range(2)]
    comm = t.comm_model()  # measured over the two steps: the shared sum and any task held by both ranks
    loads = before.rank_loads()
    t.busy = [np.where(np.arange(world) == 0, 3.0, 1.0) * loads / loads.max()]  # rank 0's tasks: 3x as costly
    moved = t.maybe_replan(2)
    losses += [t.train_step(s)["loss"] for s in range(2, 4)]
    return {"moved": moved, "before": before.to_json(), "after": t.plan.to_json(), "losses": losses,
            "comm": None if comm is None else (list(comm.numel), comm.rate)}


def test_replan_from_measured_times_moves_tasks_and_training_goes_on(tmp_path) -> None:
    """Re-planning mid-run (from measured per-rank times) moves a task to another rank through a checkpoint;
    the losses go on as in one process that never re-planned (float64)."""
    from dataclasses import replace

    run = small_run(token_moe=False, steps=4)
    run = replace(run, elastic=replace(run.elastic, replan_every=2))
    ref = ElasticTrainer(run, tmp_path / "ref", resume=None)
    want = [ref.train_step(s)["loss"] for s in range(4)]
    got = run_ranks(_replan, 2, tmp_path, run, str(tmp_path / "out"))
    assert got[0]["moved"] and got[0]["after"]["ranks"] != got[0]["before"]["ranks"]
    assert got[0]["after"]["costs"] != got[0]["before"]["costs"]  # measured costs replaced the token counts
    assert got[0]["losses"] == pytest.approx(want, rel=0, abs=TOL)
    numel, rate = got[0]["comm"]
    data = load_tasks(list(run.elastic.task_batches()))
    full = MultiTaskMoE(run.model, task_specs(data), seed=run.train.seed)
    from semoe.models.multitask import param_task

    want_numel = [sum(p.numel() for n, p in full.named_parameters() if param_task(n) == t)
                  for t in got[0]["before"]["tasks"]]
    assert numel == want_numel and rate > 0  # every task's element count reached every rank
