"""Fusion communication for gradients: few large buckets, reduced asynchronously during backward.

Parameters are classified as in ``semoe.parallel.grads``, with the router split from the dense class:

* dense  (replicated): all-reduced over the world, scaled by 1/world;
* router (replicated): the same rule, its own buckets and process group (its gradients are ready at a
  different point of backward than its neighbours', so it does not hold a dense bucket back);
* expert (sharded over ep): all-reduced over the expert's replicas (the ``dp`` axis; no
  communication with one replica), scaled by 1/world.

Each class's gradients live in preallocated flat buckets of about ``bucket_mb`` MiB, filled in
reverse registration order (about the order backward produces them); every parameter's ``.grad`` is a
view into its bucket, so backward accumulates in place and the optimizer and clipping use the
reduced values in place. A post-accumulate-grad hook counts the ready parameters of each bucket; a
complete bucket is all-reduced asynchronously at once (buckets of a class go out in index order, so
every rank issues the same sequence, each class on its own process group). :meth:`GradFusion.finish`
launches what is left (buckets with parameters that got no gradient this step: zeros), waits and
scales. The result equals :func:`semoe.parallel.grads.sync_gradients`.

Hierarchical reduction (``ranks_per_node`` given, the SE-MoE topology-aware path for slow inter-node
links): a class whose group spans several nodes with the same number L >= 2 of its ranks on each is
reduced in three steps per bucket: reduce-scatter inside the node (each local rank gets 1/L of the
node's sum), all-reduce of that shard across nodes on its rail (ranks with the same local index),
all-gather inside the node. Every shard crosses the node boundary once, so a ring over the whole world
(which sends 2(n-1)/n of the bucket per rank, and crosses between nodes on as many hops as there are
nodes) moves about 1.5x the inter-node bytes of this path at 2 nodes x 2. The three steps of a bucket
run in order on a background thread per class (collectives are blocking there; the main thread goes
on with backward), buckets in launch order, so every rank issues the same sequence on each group.

Gradient accumulation: run the micro-batches but the last inside :meth:`GradFusion.no_sync`.
A parameter whose gradient accumulates more than once in one backward (reentrant checkpointing)
would complete its bucket early; the layers here never do that (the chunked expert pipeline returns
each expert gradient once).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from semoe.parallel.grads import is_expert_param
from semoe.parallel.mesh import fusion_groups, hierarchical_reduce_groups

log = logging.getLogger(__name__)

CLASSES = ("dense", "router", "expert")


def param_class(name: str) -> str:
    """"expert", "router" or "dense" for a parameter name."""
    if is_expert_param(name):
        return "expert"
    return "router" if ".router." in f".{name}" else "dense"


class _Pending:
    """Completion of one bucket on a :class:`_HierReducer` (duck-types ``dist.Work.wait``)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> bool:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"hierarchical gradient reduction failed: {self.error}") from self.error
        return True


class _HierReducer:
    """Reduce-scatter in the node, all-reduce on the rail, all-gather in the node, for each submitted
    bucket in submission order, on one background thread."""

    def __init__(self, node: dist.ProcessGroup, rail: dist.ProcessGroup, local_size: int) -> None:
        self.node, self.rail, self.local_size = node, rail, local_size
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="semoe-grad-hier", daemon=True)
        self._thread.start()

    def submit(self, flat: torch.Tensor, shard: torch.Tensor) -> _Pending:
        pending = _Pending()
        self._queue.put((flat, shard, pending))
        return pending

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            flat, shard, pending = item
            try:
                dist.reduce_scatter_tensor(shard, flat, group=self.node)  # [L * s] -> this rank's [s] of the node sum
                dist.all_reduce(shard, group=self.rail)  # the world sum of this shard, one copy per node crosses
                dist.all_gather_into_tensor(flat, shard, group=self.node)
            except BaseException as e:  # handed to the waiting main thread
                pending.error = e
            pending.done.set()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)


@dataclass
class _Bucket:
    flat: torch.Tensor
    params: list[nn.Parameter]
    ready: set[int] = field(default_factory=set)
    work: dist.Work | _Pending | None = None
    launched: bool = False
    shard: torch.Tensor | None = None  # hierarchical path: this rank's 1/L of the bucket


@dataclass
class _Class:
    name: str
    group: dist.ProcessGroup | None
    communicate: bool
    buckets: list[_Bucket] = field(default_factory=list)
    next_launch: int = 0
    hier: _HierReducer | None = None


class GradFusion:
    """Bucketed, asynchronous gradient reduction for ``model`` (built after ``apply_expert_parallel``
    and after moving the model to its device). ``bucket_mb``: bucket size in MiB (> 0).
    ``ranks_per_node``: None for flat all-reduces; the ranks on each node (global ranks numbered node
    by node) for the hierarchical reduction of every class whose group spans nodes evenly."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh | None, bucket_mb: float = 25.0,
                 ranks_per_node: int | None = None) -> None:
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0 (MiB per gradient bucket, e.g. 25), got {bucket_mb!r}")
        if mesh is None or not dist.is_initialized():
            raise ValueError("GradFusion needs an initialised process group and a mesh (build_mesh); a single "
                             "process has nothing to reduce: leave parallel.grad_fusion off")
        self.world = dist.get_world_size()
        self.bucket_bytes = int(bucket_mb * 2**20)
        (dense_group, router_group), replica_group = fusion_groups(mesh, 2)
        expert_comm = replica_group is not None
        self.classes = {"dense": _Class("dense", dense_group, self.world > 1),
                        "router": _Class("router", router_group, self.world > 1),
                        "expert": _Class("expert", replica_group, expert_comm)}
        if ranks_per_node is not None:
            if self.world % ranks_per_node:
                raise ValueError(f"ranks_per_node={ranks_per_node} does not divide the world size {self.world}: "
                                 "set parallel.ranks_per_node to the number of ranks on each node")
            world_ranks = [list(range(self.world))]
            replicas = mesh.mesh.reshape(mesh.size(0), -1).t().tolist() if expert_comm else []
            for cname, partition in (("dense", world_ranks), ("router", world_ranks), ("expert", replicas)):
                groups = hierarchical_reduce_groups(partition, ranks_per_node) if partition else None
                if groups is not None:
                    node, rail, size = groups
                    self.classes[cname].hier = _HierReducer(node, rail, size)
        by_class: dict[str, list[nn.Parameter]] = {c: [] for c in CLASSES}
        for name, p in model.named_parameters():
            if p.requires_grad:
                by_class[param_class(name)].append(p)
        self._where: dict[nn.Parameter, tuple[_Class, _Bucket, torch.Tensor]] = {}
        for cname, params in by_class.items():
            self._build(self.classes[cname], list(reversed(params)))
        self._sync = True
        self.launched_by_hook = 0  # buckets launched during backward (the rest by finish)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]
        log.debug("gradient fusion: %s", {c: len(k.buckets) for c, k in self.classes.items()})

    def _build(self, cls: _Class, params: list[nn.Parameter]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), ps in groups.items():
            current: list[nn.Parameter] = []
            size = 0
            for p in [*ps, None]:
                if p is None or (current and (size + p.numel()) * p.element_size() > self.bucket_bytes):
                    if current:
                        self._add_bucket(cls, current, size, dtype, device)
                    current, size = [], 0
                if p is not None:
                    current.append(p)
                    size += p.numel()

    def _add_bucket(self, cls: _Class, params: list[nn.Parameter], size: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        shard = None
        if cls.hier is not None:  # pad to a multiple of the node part: equal shards for reduce-scatter
            per = -(-size // cls.hier.local_size)
            shard = torch.zeros(per, dtype=dtype, device=device)
            flat = torch.zeros(per * cls.hier.local_size, dtype=dtype, device=device)
        else:
            flat = torch.zeros(size, dtype=dtype, device=device)
        bucket = _Bucket(flat, params, shard=shard)
        off = 0
        for p in params:
            view = bucket.flat[off:off + p.numel()].view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
            self._where[p] = (cls, bucket, view)
            off += p.numel()
        cls.buckets.append(bucket)

    # ------------------------------------------------------------------ backward
    @staticmethod
    def _attach(p: nn.Parameter, view: torch.Tensor) -> None:
        """Make ``p.grad`` the bucket view again (after ``zero_grad(set_to_none=True)``)."""
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def _on_grad(self, p: nn.Parameter) -> None:
        cls, bucket, view = self._where[p]
        if bucket.launched:
            raise RuntimeError("a gradient arrived for a bucket already being reduced: call GradFusion.finish() "
                               "after each optimizer step's last backward (and use no_sync() for the others)")
        self._attach(p, view)
        if not self._sync:
            return
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready(cls)

    def _launch(self, cls: _Class, bucket: _Bucket) -> None:
        for p in bucket.params:
            self._attach(p, self._where[p][2])
        if cls.hier is not None:
            bucket.work = cls.hier.submit(bucket.flat, bucket.shard)
        elif cls.communicate:
            bucket.work = dist.all_reduce(bucket.flat, group=cls.group, async_op=True)
        bucket.launched = True
        cls.next_launch += 1

    def _launch_ready(self, cls: _Class) -> None:
        while cls.next_launch < len(cls.buckets):
            bucket = cls.buckets[cls.next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(cls, bucket)
            self.launched_by_hook += 1

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients in the buckets without reducing (all micro-batches but the last)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def finish(self) -> None:
        """Launch the buckets not yet launched, wait for all, scale by 1/world: the gradients now follow
        the rules of ``semoe.parallel.grads``. Call once per optimizer step, after the last backward."""
        for cls in self.classes.values():
            while cls.next_launch < len(cls.buckets):
                self._launch(cls, cls.buckets[cls.next_launch])
        for cls in self.classes.values():
            for bucket in cls.buckets:
                if bucket.work is not None:
                    bucket.work.wait()
                bucket.flat.mul_(1.0 / self.world)
                bucket.ready.clear()
                bucket.work, bucket.launched = None, False
            cls.next_launch = 0

    def zero_grad(self) -> None:
        """Zero every bucket (the gradients) in place."""
        for cls in self.classes.values():
            for bucket in cls.buckets:
                bucket.flat.zero_()
                for p in bucket.params:
                    p.grad = self._where[p][2]

    def remove(self) -> None:
        """Remove the hooks (the gradients stay where they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for cls in self.classes.values():
            if cls.hier is not None:
                cls.hier.close()
                cls.hier = None

    @property
    def num_buckets(self) -> dict[str, int]:
        return {c: len(k.buckets) for c, k in self.classes.items()}

    @property
    def hierarchical(self) -> dict[str, bool]:
        """Which classes take the hierarchical path."""
        return {c: k.hier is not None for c, k in self.classes.items()}
