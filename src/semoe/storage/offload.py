"""Expert offload for training: the experts' weights, gradients and AdamW moments live in an ExpertStore.

Legend: L local experts of a layer; a "key" is one stacked expert parameter of one MoE layer
(``layers.3.moe.experts.w1``), stored as four ``[L, ...]`` tensors: ``/W`` (the float32 master weights,
which are the parameters themselves: under bf16 autocast the experts cast them per use), ``/G`` (the
gradient accumulated over the micro-batches), ``/m`` and ``/v`` (AdamW's exp_avg / exp_avg_sq).

:func:`apply_expert_offload` takes the stacked expert parameters out of the model (so the dense optimizer,
gradient sync / fusion and clipping of the trainer see the dense parameters only) and puts a leaf
tensor in their place whose storage is swapped in around each use:

* forward (pre-hook of each ``Experts``): the experts that received tokens are fetched (router-aware:
  an expert without tokens is not read), the layers L+1..L+d are prefetched with the experts that were
  routed to in the previous step (a prediction; a miss is read on demand when the router has decided);
  autograd's saved copy of the weight (the float32 master, or under bf16 autocast its bf16 cast) is replaced
  by a key (``saved_tensors_hooks``), so nothing of the layer stays in memory after its forward;
* backward (unpacking that key): the weights of the routed experts are fetched again (and cast again under
  autocast: the same values as the forward's cast, the master is released at once), layers L-1..L-d
  prefetched with the routing of this micro-batch (exact); the gradient goes into ``/G`` when autograd
  has accumulated it (``register_post_accumulate_grad_hook``: ``G += g``, or the first micro-batch's ``g``
  itself), and the weights are released;
* optimizer (:meth:`ExpertOffload.step`, after the trainer's dense AdamW step): key by key in forward
  order, the next ``d`` keys prefetched, ``W, G, m, v`` are read, the gradient is synchronised and scaled
  exactly as the in-memory trainer does it (sum over the expert's replicas, times 1/world, times the
  clipping coefficient), AdamW runs (torch's own ``AdamW`` with ``fused=True`` on the stacked tensor, the
  same code on the same tensor as the in-memory trainer), and ``W, m, v`` are written back. Every expert
  gets its update every step, with a zero gradient when no token reached it: exact, no lazy catch-up.

The global gradient norm (:meth:`ExpertOffload.expert_sq`) is computed like
``semoe.parallel.grads.grad_norm``: each expert's norm in the gradient's dtype, squares summed in float64 in
registration order, summed over the expert-parallel group. A key's gradient is complete after its
``grad_accum``-th backward: there (still in memory) it is summed over the expert's replicas (one all-reduce
per key, in backward order, the same on every rank) and its norm taken, so the optimizer reads it once.

Checkpoints: :meth:`ExpertOffload.write_checkpoint` streams the experts into the one layout-free format
(``model-experts-*.safetensors`` / ``optim-experts-*.safetensors``, one tensor per global expert id) one
key at a time; :meth:`ExpertOffload.load_checkpoint` reads them back the same way, from any layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim.optimizer import _get_scalar_dtype

from semoe.layers.experts import Experts
from semoe.ops.expert_ffn import FFNWorkspace
from semoe.parallel.grads import expert_grad_sq
from semoe.parallel.mesh import dp_group
from semoe.storage.expert_store import ExpertStore, StoreBudgetError, StoreStats
from semoe.storage.safetensors_io import SafetensorsReader, SafetensorsWriter, read_header

log = logging.getLogger(__name__)

__all__ = ["ExpertOffload", "apply_expert_offload"]

PARAMS = ("w1", "w3", "w2")  # registration order of Experts' parameters


@dataclass
class _Key:
    name: str  # layers.3.moe.experts.w1
    mname: str
    pname: str
    layer: int  # index among the MoE layers
    mod: Experts
    handle: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    step: torch.Tensor | None = None  # AdamW's step count (None before the first update)
    held_bwd: bool = False
    bwd_routed: list[int] | None = None  # experts fetched for this backward
    backwards: int = 0  # gradients received this step (the last of grad_accum completes it)
    sq: torch.Tensor | None = None  # its squared norm once complete (float64)


@dataclass
class _Layer:
    mname: str
    mod: Experts
    index: int
    keys: list[_Key] = field(default_factory=list)
    routed_fwd: list[int] | None = None  # experts that got tokens in the last forward
    routed_prev: list[int] | None = None  # ... in the previous step (prefetch prediction)


_SAVED = object()


class ExpertOffload:
    """The component a :class:`~semoe.training.trainer.Trainer` is given to keep experts in ``store``
    (build it with :func:`apply_expert_offload`)."""

    def __init__(self, model: nn.Module, store: ExpertStore, mesh: DeviceMesh | None, *, lr: float,
                 betas: tuple[float, float], weight_decay: float, depth: int = 1, grad_accum: int = 1,
                 device: torch.device | None = None) -> None:
        self.store, self.mesh, self.depth, self.grad_accum = store, mesh, depth, grad_accum
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.scale = 1.0 / self.world if mesh is not None and dist.is_initialized() else None
        self.dp = mesh.size(0) if mesh is not None else 1
        self.ep = mesh.size(1) if mesh is not None else 1
        self.layers: list[_Layer] = []
        self.keys: list[_Key] = []
        self._acts = _ActivationPool()  # the expert op's activation buffers, shared by the layers
        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
        if not mods:
            raise ValueError("the model has no experts to offload (storage.budget_mb > 0 needs an MoE model)")
        # the tensors one moment needs at once: a layer's weights + one gradient (backward), or W, G, m, v
        # of one key (optimizer); checked before anything is moved
        sizes = [[p.numel() * p.element_size() for p in m.parameters(recurse=False)] for _, m in mods]
        self.min_budget = max(max(4 * max(s) for s in sizes), max(sum(s) + max(s) for s in sizes))
        store.min_budget = self.min_budget
        if store.budget < self.min_budget:
            raise StoreBudgetError(
                f"storage.budget_mb={store.budget / 2**20:.3f} is below one layer's working set: raise it to at "
                f"least {self.min_budget / 2**20:.3f} MiB (the weights of one MoE layer's local experts plus one "
                f"gradient, or weights, gradient and both AdamW moments of one expert parameter)")
        for mname, mod in mods:
            layer = _Layer(mname, mod, len(self.layers))
            for pname in PARAMS:
                p = mod._parameters.get(pname)
                if p is None:
                    continue
                dev = device if device is not None else p.device
                if dev.type == "meta":
                    raise ValueError("the experts are on the meta device: pass the training device (device=...)")
                key = _Key(f"{mname}.{pname}", mname, pname, len(self.layers), mod,
                           torch.empty(0, dtype=p.dtype, device=dev).requires_grad_(),
                           tuple(p.shape), p.dtype)
                for kind in ("W", "G", "m", "v"):
                    store.declare(f"{key.name}/{kind}", key.shape, p.dtype)
                if not p.is_meta:  # meta: the weights come later, expert by expert, through sink()
                    store.put(f"{key.name}/W", p.detach())
                del mod._parameters[pname]
                setattr(mod, pname, key.handle)
                key.handle.register_hook(self._shape_hook(key))
                key.handle.register_post_accumulate_grad_hook(self._grad_hook(key))
                layer.keys.append(key)
                self.keys.append(key)
            # the op's activation buffers come from a pool the layers share; its weight gradients are buffers the
            # store lends (a kept per-layer buffer would hold every layer's gradients for good)
            mod.workspace = _StoreWorkspace(store, {f"g_{k.pname}": f"{k.name}/G" for k in layer.keys}, self._acts)
            mod.register_forward_pre_hook(self._pre_hook(layer))
            mod.register_forward_hook(self._post_hook(layer))
            self.layers.append(layer)
        self._opt_param = nn.Parameter(torch.empty(0, dtype=self.keys[0].dtype))
        self._opt = torch.optim.AdamW([self._opt_param], lr=lr, betas=betas, weight_decay=weight_decay,
                                      fused=True)
        self._ctx: list[Any] = []
        self.last_stats: StoreStats | None = None  # the counters step_stats() reported last
        self.trace: list[tuple[str, str, tuple[int, ...]]] | None = None  # set to [] to record fetches (tests)

    def sink(self) -> ExpertStoreSink:
        """An ``ExpertSink`` (``semoe.training.init``) writing each expert straight into the store's weights:
        ``PretrainedInit.fill`` reads the experts one at a time from the files, none of them is held in the model."""
        return ExpertStoreSink(self.store, {k.name: k for k in self.keys})

    # ------------------------------------------------------------------ forward / backward hooks
    def _pre_hook(self, layer: _Layer) -> Callable:
        def hook(mod: Experts, args: tuple) -> None:
            counts = list(args[1])
            routed = [i for i, c in enumerate(counts) if c]
            layer.routed_fwd = routed
            self.store.phase = "forward"
            for k in layer.keys:
                k.bwd_routed = routed
                k.handle.data = self._to_device(self.store.acquire(f"{k.name}/W", routed), k)
                if self.trace is not None:
                    self.trace.append(("forward", k.name, tuple(routed)))
            nxt = self.layers[layer.index + 1:layer.index + 1 + self.depth] if self.depth else []
            for other in nxt:
                for k in other.keys:
                    self.store.prefetch(f"{k.name}/W", other.routed_prev)
            if torch.is_grad_enabled():
                ctx = torch.autograd.graph.saved_tensors_hooks(self._pack(layer, routed), self._unpack)
                ctx.__enter__()
                self._ctx.append(ctx)
            else:
                self._ctx.append(None)
        return hook

    def _post_hook(self, layer: _Layer) -> Callable:
        def hook(mod: Experts, args: tuple, out: Any) -> None:
            ctx = self._ctx.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)
            for k in layer.keys:
                self.store.release(f"{k.name}/W")
                k.handle.data = torch.empty(0, dtype=k.dtype, device=k.handle.device)
        return hook

    def _pack(self, layer: _Layer, routed: list[int]) -> Callable:
        ptrs = {k.handle.data_ptr(): k for k in layer.keys}
        handles = {id(k.handle): k for k in layer.keys}

        def pack(t: torch.Tensor) -> Any:
            if not t.numel():
                return t
            k = ptrs.get(t.data_ptr())
            if k is not None and tuple(t.shape) == k.shape and t.dtype == k.dtype:
                return (_SAVED, k, routed, None)
            # under autocast the op saves the weights' casts (``Experts._compute_operands``: ``w.to(bf16)`` of
            # the float32 master, a ToCopyBackward node over the master's AccumulateGrad): a key too, the cast
            # is made again from the stored master in backward (same values, so the same gradients)
            fn = t.grad_fn
            if fn is not None and len(fn.next_functions) == 1 and fn.name() == "ToCopyBackward0":
                k = handles.get(id(getattr(fn.next_functions[0][0], "variable", None)))
                if k is not None and tuple(t.shape) == k.shape:
                    return (_SAVED, k, routed, t.dtype)
            return t
        return pack

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not (isinstance(saved, tuple) and len(saved) == 4 and saved[0] is _SAVED):
            return saved
        _, k, routed, cast = saved
        self.store.phase = "backward"
        if cast is not None:  # the cast copy: made from the master, which is released at once
            W = self._to_device(self.store.acquire(f"{k.name}/W", routed), k)
            out = W.to(cast)
            del W
            self.store.release(f"{k.name}/W")
            if self.trace is not None:
                self.trace.append(("backward", k.name, tuple(routed)))
            k.bwd_routed = routed
            self._prefetch_before(k)
            return out
        if not k.held_bwd:
            k.handle.data = self._to_device(self.store.acquire(f"{k.name}/W", routed), k)
            if self.trace is not None:
                self.trace.append(("backward", k.name, tuple(routed)))
            k.held_bwd = True
            k.bwd_routed = routed
            self._prefetch_before(k)
        return k.handle

    def _prefetch_before(self, k: _Key) -> None:
        """Backward: the weights of layers L-1..L-d, with the experts their forward routed to."""
        for other in reversed(self.layers[max(0, k.layer - self.depth):k.layer]):
            for o in other.keys:
                self.store.prefetch(f"{o.name}/W", other.routed_fwd)

    def _shape_hook(self, k: _Key) -> Callable:
        """Before autograd accumulates the gradient into the leaf, the leaf must have its shape: under bf16
        autocast the op saved the bf16 copies, not the leaf (their unpack recasts them from the stored master
        and leaves the leaf empty). A stride-0 expanded scalar gives it the shape without memory (autograd then
        keeps the incoming gradient as it is)."""
        def hook(g: torch.Tensor) -> None:
            if k.handle.numel() == 0:
                k.handle.data = torch.zeros((), dtype=k.dtype, device=k.handle.device).expand(k.shape)
        return hook

    def _grad_hook(self, k: _Key) -> Callable:
        def hook(h: torch.Tensor) -> None:
            g = h.grad
            h.grad = None
            self.store.phase = "backward"
            gkey = f"{k.name}/G"
            entry = self.store.entries[gkey]
            routed = set(range(k.shape[0]) if k.bwd_routed is None else k.bwd_routed)
            unrouted = set(range(k.shape[0])) - routed
            if g.device.type != "cpu":  # CUDA: the gradient goes down to the host tier
                g = g.to("cpu")
            k.backwards += 1
            if len(entry.zero) == k.shape[0]:  # first micro-batch of the step: the gradient itself
                self.store.adopt(gkey, g.contiguous(), zero=unrouted)
                G = None
            else:
                zero_before = set(entry.zero)
                G = self.store.acquire(gkey)
                G.add_(g)  # as autograd accumulates into .grad
                self.store.release(gkey, dirty=set(range(k.shape[0])) - (zero_before & unrouted))
                self.store.give_back(g)
            del g
            if k.backwards == self.grad_accum:  # complete: sync over the replicas, take its norm while in memory
                G = self.store.acquire(gkey)
                if self.dp > 1:  # every rank reaches this key in the same backward order: one all-reduce each
                    dist.all_reduce(G, group=dp_group(self.mesh))
                k.sq = expert_grad_sq(self._final_grad(k, G))
                # complete: it goes to disk on an IO thread now (an eviction before the optimizer needs it then
                # finds it written instead of writing it on the training thread)
                self.store.release(gkey, dirty=range(k.shape[0]) if self.dp > 1 else None,
                                   write_behind=True)
            if k.held_bwd:
                self.store.release(f"{k.name}/W")
                k.held_bwd = False
            h.data = torch.empty(0, dtype=k.dtype, device=h.device)
        return hook

    def _to_device(self, host: torch.Tensor, k: _Key) -> torch.Tensor:
        """The weights where the model computes: the host tensor itself on a CPU; on CUDA a copy made on a
        side stream from pinned memory that the compute stream waits for (not exercised by the CPU tests)."""
        dev = k.handle.device
        if dev.type == "cpu":
            return host
        stream = self._copy_stream = getattr(self, "_copy_stream", None) or torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            out = host.to(dev, non_blocking=True)
        torch.cuda.current_stream(dev).wait_stream(stream)
        out.record_stream(torch.cuda.current_stream(dev))
        return out

    # ------------------------------------------------------------------ optimizer
    def _final_grad(self, k: _Key, G: torch.Tensor) -> torch.Tensor:
        """The gradient as the in-memory trainer has it after its sync (unclipped)."""
        return G.mul(self.scale) if self.scale is not None else G

    def expert_sq(self) -> torch.Tensor:
        """The sum of the expert gradients' squared norms (float64, registration order, summed over the
        expert-parallel group): the expert part of the global gradient norm. Each key's was taken when its
        gradient became complete in backward (synchronised over the replicas there), so this reads nothing."""
        vals = []
        for k in self.keys:
            if k.sq is None or k.backwards != self.grad_accum:
                raise RuntimeError(f"{k.name}: {k.backwards} gradients this step, expected grad_accum="
                                   f"{self.grad_accum} (one backward per micro-batch)")
            vals.append(k.sq)
        total = torch.stack(vals).sum()
        if self.ep > 1:
            dist.all_reduce(total, group=self.mesh.get_group("ep"))
        return total

    @torch.no_grad()
    def step(self, lr: float, norm: float, max_norm: float) -> None:
        """AdamW for every expert key, streamed: read W, G, m, v; update; write W, m, v back."""
        coef = None
        if max_norm > 0 and math.isfinite(norm):
            c = max_norm / (norm + 1e-6)
            coef = c if c < 1.0 else None
        group = self._opt.param_groups[0]
        group["lr"] = lr
        p = self._opt_param
        self.store.reclaim_lent()  # gradient buffers lent in backward and never adopted (none, normally)
        self.store.phase = "optimizer"
        for i, k in enumerate(self.keys):
            names = [f"{k.name}/{kind}" for kind in ("W", "G", "m", "v")]
            # this key first, then the next d keys into what is left of the budget: prefetching them before
            # this key is held would evict their own prefetched tensors when this key is read on demand
            W, G, m, v = (self.store.acquire(n) for n in names)
            for nk in self.keys[i + 1:i + 1 + self.depth]:
                for kind in ("G", "W", "m", "v"):
                    self.store.prefetch(f"{nk.name}/{kind}")
            g = self._final_grad(k, G)
            if coef is not None:
                g.mul_(coef)  # in place, G too: it is forgotten (set_zero) after this update, never written
            if k.step is None:
                k.step = torch.tensor(0.0, dtype=_get_scalar_dtype())
            p.data, p.grad = W, g
            self._opt.state[p] = {"step": k.step, "exp_avg": m, "exp_avg_sq": v}
            self._opt.step()
            self._opt.state.clear()
            p.grad = None
            p.data = torch.empty(0, dtype=k.dtype)
            every = range(k.shape[0])
            # W, m, v go to disk on the IO threads now (write-behind), while the next keys are updated
            self.store.release(names[0], dirty=every, write_behind=True)
            self.store.release(names[1])
            self.store.release(names[2], dirty=every, write_behind=True)
            self.store.release(names[3], dirty=every, write_behind=True)
            self.store.set_zero(names[1])
            k.backwards, k.sq = 0, None
        for layer in self.layers:
            layer.routed_prev = layer.routed_fwd

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_name(self, k: _Key, gid: int) -> str:
        return f"{k.mname}.{gid}.{k.pname}" if k.mname else f"{gid}.{k.pname}"

    def write_checkpoint(self, folder: Path, ep_rank: int) -> list[Path]:
        """Write this rank's experts (weights, and AdamW state once it exists) into ``folder`` in the
        checkpoint format, one key at a time; returns the files written."""
        folder = Path(folder)
        mspecs, ospecs = {}, {}
        for k in self.keys:
            for l_ in range(k.shape[0]):
                n = self._ckpt_name(k, k.mod.expert_offset + l_)
                mspecs[n] = (k.dtype, k.shape[1:])
                if k.step is not None:
                    ospecs[f"{n}.exp_avg"] = (k.dtype, k.shape[1:])
                    ospecs[f"{n}.exp_avg_sq"] = (k.dtype, k.shape[1:])
                    ospecs[f"{n}.step"] = (k.step.dtype, ())
        out = [folder / f"model-experts-{ep_rank:05d}.safetensors"]
        with SafetensorsWriter(out[0], mspecs) as w:
            for k in self.keys:
                self._write_rows(w, k, "W", "")
        if ospecs:
            out.append(folder / f"optim-experts-{ep_rank:05d}.safetensors")
            with SafetensorsWriter(out[1], ospecs) as w:
                for k in self.keys:
                    self._write_rows(w, k, "m", ".exp_avg")
                    self._write_rows(w, k, "v", ".exp_avg_sq")
                    for l_ in range(k.shape[0]):
                        w.write(f"{self._ckpt_name(k, k.mod.expert_offset + l_)}.step", k.step.reshape(()))
        return out

    def _write_rows(self, w: SafetensorsWriter, k: _Key, kind: str, suffix: str) -> None:
        t = self.store.acquire(f"{k.name}/{kind}")
        try:
            for l_ in range(k.shape[0]):
                w.write(f"{self._ckpt_name(k, k.mod.expert_offset + l_)}{suffix}", t[l_])
        finally:
            self.store.release(f"{k.name}/{kind}")

    @torch.no_grad()
    def load_checkpoint(self, path: Path) -> None:
        """Fill the store from a checkpoint folder (any layout that wrote it), one key at a time."""
        from semoe.storage.checkpoint import CheckpointError

        where: dict[str, Any] = {}
        for f in sorted(Path(path).glob("*-experts-*.safetensors")):
            h = read_header(f)
            for name in h.tensors:
                where[name] = h
        readers: dict[Path, SafetensorsReader] = {}
        try:
            for k in self.keys:
                for kind, suffix in (("W", ""), ("m", ".exp_avg"), ("v", ".exp_avg_sq")):
                    names = [f"{self._ckpt_name(k, k.mod.expert_offset + l_)}{suffix}" for l_ in range(k.shape[0])]
                    if kind != "W" and names[0] not in where:
                        continue  # a checkpoint written before the first optimizer step
                    t = self.store.acquire(f"{k.name}/{kind}", experts=[])
                    try:
                        for l_, n in enumerate(names):
                            if n not in where:
                                raise CheckpointError(f"tensor {n!r} is not in the checkpoint {path}; it was "
                                                      "written for a different model")
                            h = where[n]
                            info = h[n]
                            if tuple(info.shape) != k.shape[1:] or info.dtype != k.dtype:
                                raise CheckpointError(
                                    f"tensor {n!r} is {info.dtype} {tuple(info.shape)} in the checkpoint but the "
                                    f"model expects {k.dtype} {k.shape[1:]}: the checkpoint is from a different "
                                    "model config")
                            r = readers.get(h.path)
                            if r is None:
                                r = readers[h.path] = SafetensorsReader(h.path, h)
                            r.read_into(info, t[l_])
                            r.drop_cache(info.offset, info.nbytes)
                    finally:
                        self.store.release(f"{k.name}/{kind}", dirty=range(k.shape[0]))
                sname = f"{self._ckpt_name(k, k.mod.expert_offset)}.step"
                if sname in where:
                    h = where[sname]
                    r = readers.get(h.path) or readers.setdefault(h.path, SafetensorsReader(h.path, h))
                    k.step = r.read(sname).reshape(())
                self.store.set_zero(f"{k.name}/G")
        finally:
            for r in readers.values():
                r.close()
        self.store.evict_all()

    # ------------------------------------------------------------------ progress
    def step_stats(self) -> dict[str, float]:
        """Bytes moved (read + written) and seconds waited for IO since the last call."""
        s = self.last_stats = self.store.reset_stats()  # its ``by``: bytes per phase, tensor kind, read/write
        return {"io_mb": (s.bytes_read + s.bytes_written) / 2**20, "io_read_mb": s.bytes_read / 2**20,
                "io_write_mb": s.bytes_written / 2**20, "stall_ms": 1e3 * s.stall_s,
                "store_peak_mb": s.peak_resident / 2**20}

    def close(self) -> None:
        self.store.close()


class _ActivationPool:
    """The expert op's activation buffers, shared by every MoE layer of the offload (by buffer name).

    A buffer is handed out only while no tensor uses its memory (its storage's use count: the autograd graph
    holds the views it saved until that layer's backward has run), so a layer's saved activations are never
    overwritten, and a buffer a layer's backward has let go serves the next forward: no fresh pages per step
    (on this kind of CPU the 16-bit activations' page faults cost ~20 ms a step, measured), and no more memory
    than fresh tensors would take (every layer's saved activations exist at once either way; the backward's
    temporaries are one layer's). Sizes get 1/16 headroom (the row count moves with the routing); a buffer
    too small for a request is replaced."""

    HEADROOM = 1 / 16

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], list[torch.Tensor]] = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        need = rows * cols
        bufs = self._bufs.setdefault((name, like.dtype, like.device), [])
        free = [i for i, b in enumerate(bufs) if torch._C._storage_Use_Count(b.untyped_storage()._cdata) <= 2]
        fits = [i for i in free if bufs[i].numel() >= need]
        if fits:
            buf = bufs[min(fits, key=lambda i: bufs[i].numel())]
        else:
            if free:  # too small for this request: replaced, so the pool never holds more buffers than in use
                bufs.pop(free[0])
            buf = torch.empty(int(need * (1 + self.HEADROOM)) + cols, dtype=like.dtype, device=like.device)
            bufs.append(buf)
        return buf[:need].view(rows, cols)


class _StoreWorkspace(FFNWorkspace):
    """The expert op's workspace under offload: activation buffers from a pool shared by the layers (see
    :class:`_ActivationPool`), weight gradients in buffers the store lends (spare host memory of evicted tensors,
    counted in the budget; the gradient hook adopts the buffer as ``/G`` without a copy), so no fresh pages per
    step and no gradient kept per layer."""

    def __init__(self, store: ExpertStore, grads: dict[str, str], pool: _ActivationPool) -> None:
        super().__init__()
        self.store, self.grads, self.pool = store, grads, pool  # grads: the op's buffer name ("g_w1") -> /G key

    def grad_like(self, name: str, like: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
        key = self.grads.get(name)
        if key is None or shape is not None or like.device.type != "cpu":
            return super().grad_like(name, like, shape)
        e = self.store.entries[key]
        if len(e.zero) == e.experts:  # the step's first gradient: it becomes /G itself (adopted)
            return self.store.lend(tuple(like.shape), like.dtype)
        # a later micro-batch's gradient is added into /G, which needs its own room then: not from the budget
        return torch.empty_like(like)

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        return self.pool.get(name, rows, cols, like)


class ExpertStoreSink:
    """``ExpertSink`` into an expert store: expert ``e`` of ``param`` becomes row ``e - expert_offset`` of
    ``<param>/W`` (the store's copy casts to the stored dtype, as the in-memory ``copy_`` does)."""

    def __init__(self, store: ExpertStore, keys: dict[str, _Key]) -> None:
        self.store, self.keys = store, keys

    def put(self, param: str, expert: int, value: torch.Tensor) -> None:
        k = self.keys.get(param)
        if k is None:
            raise ValueError(f"{param!r} is not an offloaded expert parameter (offloaded: {sorted(self.keys)[:4]})")
        if tuple(value.shape) != k.shape[1:]:
            raise ValueError(f"{param} expert {expert}: the checkpoint's tensor has shape {tuple(value.shape)}, the "
                             f"model expects {k.shape[1:]}; the model config (with its --set overrides) does not "
                             "match the checkpoint")
        self.store.put_expert(f"{param}/W", expert - k.mod.expert_offset, value)


def apply_expert_offload(model: nn.Module, store: ExpertStore, mesh: DeviceMesh | None, *, lr: float,
                         betas: tuple[float, float], weight_decay: float, depth: int = 1,
                         grad_accum: int = 1, device: torch.device | None = None) -> ExpertOffload:
    """Move every MoE layer's (local) experts of ``model`` into ``store`` (see the module docstring); returns
    the component that runs their forward / backward fetches, their optimizer and their checkpoints.
    Experts on the meta device (a model built for ``PretrainedInit``) are declared, not copied: ``device`` is
    then the training device and the weights arrive through :meth:`ExpertOffload.sink`."""
    return ExpertOffload(model, store, mesh, lr=lr, betas=betas, weight_decay=weight_decay, depth=depth,
                         grad_accum=grad_accum, device=device)


def offload_from_config(model: nn.Module, mesh: DeviceMesh | None, run: Any, out_dir: Path,
                        rank: int, device: torch.device | None = None) -> ExpertOffload | None:
    """The offload ``run.storage`` asks for (None when ``storage.budget_mb`` is 0). The store of this rank
    is ``<storage.dir or out_dir/expert_store>/ep<E>-rank<r>``; it holds ``run.model``'s experts only.
    ``device``: see :func:`apply_expert_offload`."""
    from semoe.config import to_dict

    sc, tc = run.storage, run.train
    if not sc.enabled:
        return None
    if run.parallel.a2a_chunks > 1:
        raise ValueError("storage.budget_mb > 0 (expert offload) runs the experts whole: set parallel.a2a_chunks=1")
    ep = mesh.size(1) if mesh is not None else 1
    root = (Path(sc.dir) if sc.dir else Path(out_dir) / "expert_store") / f"ep{ep}-rank{rank:05d}"
    store = ExpertStore(root, int(sc.budget_mb * 2**20), fingerprint={"model": to_dict(run.model)},
                        io_threads=sc.io_threads)
    off = apply_expert_offload(model, store, mesh, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay,
                               depth=sc.prefetch_depth, grad_accum=tc.grad_accum, device=device)
    log.info("experts offloaded to %s: %.1f MiB of expert state, host budget %.1f MiB", root,
             store.total_bytes() / 2**20, sc.budget_mb)
    return off
