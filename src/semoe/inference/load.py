"""Load a model (all experts, one process) and its tokenizer from a semoe checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from semoe.config import RunConfig, from_dict
from semoe.models.transformer import MoETransformer
from semoe.storage import checkpoint as ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A step folder, a run's ``checkpoints`` folder or a run folder -> the newest checkpoint in it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    for cand in (path, path / "checkpoints"):
        found = ckpt.find_latest(cand)
        if found is not None:
            return found
    raise ckpt.CheckpointError(f"no semoe checkpoint under {path}; pass a run's --out folder or a step_* folder")


def load_checkpoint_model(path: Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> tuple[MoETransformer, Tokenizer | None, RunConfig]:
    """(model in eval mode, tokenizer or None, run config) from a checkpoint; sizes and hashes are checked."""
    path = resolve_checkpoint(path)
    manifest = ckpt.read_manifest(path)
    run = from_dict(RunConfig, manifest["config"])
    with torch.device("meta"):
        model = MoETransformer(run.model)
    model = model.to_empty(device=device).to(dtype)
    ckpt.load_model(path, model)
    tok_path = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
    return model.eval(), tokenizer, run
