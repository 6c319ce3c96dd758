"""Offline multi-task data: scikit-learn's bundled sets and generated tasks, each with a held-out split.

Every sample is a short sequence of feature vectors (``tokens`` x ``features``): digits' 8x8 image is four
4x4 patches, a tabular row is cut into equal pieces, a generated task has as many tokens as asked for. The
tokens per sample are a task's cost per sample (the backbone works per token). Features are standardised
with the training split's mean and std.

Batches are layout independent: the global batch of task t at step s is positions ``s*B_t .. (s+1)*B_t`` of
an endless stream of per-epoch permutations of t's training split (seeded by task and epoch); a rank of the
elastic plan takes its slice of it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from semoe.models.multitask import TaskSpec


@dataclass(frozen=True)
class TaskData:
    """One task: ``x_*`` float32 [N, tokens, features], ``y_*`` int64 [N]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def tokens(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def features(self) -> int:
        return int(self.x_train.shape[2])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _split(name: str, x: np.ndarray, y: np.ndarray, tokens: int, seed: int, test_fraction: float = 0.25) -> TaskData:
    """Stratified shuffle split, standardise on train, cut each row into ``tokens`` pieces (zero-padded)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:max(1, round(test_fraction * len(idx)))]] = True
    x = x.astype(np.float64)
    mean, std = x[~test].mean(0), x[~test].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    feat = -(-x.shape[1] // tokens)
    x = np.pad(x, ((0, 0), (0, feat * tokens - x.shape[1]))).reshape(len(x), tokens, feat).astype(np.float32)
    y = y.astype(np.int64)
    return TaskData(name, x[~test], y[~test], x[test], y[test], int(y.max()) + 1)


def _digits(seed: int) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    # four 4x4 patches of the 8x8 image: [N, 2, 4, 2, 4] -> [N, 4, 16]
    x = d.images.reshape(-1, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 64)
    return _split("digits", x, d.target, 4, seed)


def _sklearn(loader: str, tokens: int) -> Callable[[int], TaskData]:
    def make(seed: int) -> TaskData:
        import sklearn.datasets

        d = getattr(sklearn.datasets, loader)()
        return _split(loader.removeprefix("load_").replace("breast_", ""), d.data, d.target, tokens, seed)
    return make


def synthetic(name: str, n_samples: int, tokens: int, features: int, classes: int) -> Callable[[int], TaskData]:
    """A generated task of controlled size (``n_samples``) and cost (``tokens`` per sample):
    ``sklearn.datasets.make_classification`` with ``tokens * features`` features."""
    def make(seed: int) -> TaskData:
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=n_samples, n_features=tokens * features,
                                   n_informative=min(tokens * features, 3 * classes), n_redundant=0,
                                   n_classes=classes, n_clusters_per_class=1, class_sep=2.0, random_state=seed)
        return _split(name, x, y, tokens, seed)
    return make


# name -> builder(seed). "synth" is large and costly per sample (8 tokens), "synth2" small and cheap.
TASKS: dict[str, Callable[[int], TaskData]] = {
    "digits": _digits,
    "cancer": _sklearn("load_breast_cancer", 2),
    "wine": _sklearn("load_wine", 1),
    "iris": _sklearn("load_iris", 1),
    "synth": synthetic("synth", 8000, 8, 8, 4),
    "synth2": synthetic("synth2", 2000, 2, 8, 3),
}


def load_tasks(names: list[str], seed: int = 0) -> dict[str, TaskData]:
    """The named tasks (in the given order); an unknown name raises ValueError listing the known ones."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    return {n: TASKS[n](seed) for n in names}


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, task_index: int, epoch: int) -> np.ndarray:
    """The training-set order of a task's ``epoch`` (cached: a step reads it again; read-only)."""
    perm = np.random.default_rng([seed, task_index, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def batch_indices(n: int, batch: int, step: int, seed: int, task_index: int) -> np.ndarray:
    """Training-set indices of a task's global batch at ``step`` (endless per-epoch permutations)."""
    start = step * batch
    out = []
    pos = start
    while pos < start + batch:
        epoch, off = divmod(pos, n)
        perm = _permutation(n, seed, task_index, epoch)
        take = min(n - off, start + batch - pos)
        out.append(perm[off:off + take])
        pos += take
    return np.concatenate(out)


def task_batch(task: TaskData, batch: int, step: int, seed: int, task_index: int, lo: int = 0, hi: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``lo:hi`` of the global batch of ``task`` at ``step``: (x [n, tokens, features], y [n])."""
    idx = batch_indices(len(task.y_train), batch, step, seed, task_index)[lo:hi]
    return torch.from_numpy(task.x_train[idx]), torch.from_numpy(task.y_train[idx])


def task_specs(data: dict[str, TaskData]) -> list[TaskSpec]:
    """The model's view of the tasks: shapes and classes."""
    return [TaskSpec(t.name, t.tokens, t.features, t.num_classes) for t in data.values()]
