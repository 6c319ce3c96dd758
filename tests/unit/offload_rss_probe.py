"""Subprocess probe for tests/unit/test_offload.py: train a few steps and print peak RSS numbers as JSON.

Usage: python -m tests.unit.offload_rss_probe CORPUS OUT CACHE BUDGET_MB [DTYPE [N_LAYERS]] (budget 0 = all in
memory; DTYPE float32 (default) or bfloat16: autocast over float32 masters; N_LAYERS default 2).
Peak RSS is VmHWM (anonymous + file-backed + shmem resident) from /proc/self/status, reset with
``/proc/self/clear_refs`` once the trainer is built (model construction materialises the random initial
weights once, before they go to the store), so the peak covers the training steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    import torch

    from semoe.config import apply_overrides, replace
    from semoe.models.recipes import tiny
    from semoe.training.trainer import Trainer

    torch.set_num_threads(1)
    corpus, out, cache, budget = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    n_layers = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    run = tiny()
    run = replace(run, data=corpus, model=replace(run.model, vocab_size=320))
    run = apply_overrides(run, ["model.moe.d_ff=1024", "model.moe.num_experts=8", f"train.dtype={dtype}",
                                f"model.n_layers={n_layers}",
                                "train.steps=6", "train.ckpt_every=100", "train.eval_every=100",
                                f"storage.budget_mb={budget}"])
    t = Trainer(run, out, cache, resume=None)
    expert_state = 0
    if t.offload is not None:
        expert_state = t.offload.store.total_bytes()
        t.offload.store.evict_all()
    else:
        expert_state = 4 * sum(p.numel() * p.element_size() for n, p in t.model.named_parameters()
                               if ".experts." in n)
    import gc
    gc.collect()
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for s in range(6):
        t.train_step(s)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "rss_file": status("RssFile"),
                      "expert_state": expert_state,
                      "store_peak": t.offload.store.stats.peak_resident if t.offload else 0}))


if __name__ == "__main__":
    main()
