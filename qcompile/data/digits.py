"""scikit-learn's handwritten digits (1797 real 8x8 images, shipped inside the scikit-learn wheel).

Images are scaled to [0, 1] (pixel / 16) and shaped (N, 1, 8, 8) float32; labels int64.
The split is stratified and fixed by ``seed``: 60 % train (1078), 20 % validation (359),
20 % test (360).  Nothing is downloaded: ``sklearn.datasets.load_digits`` reads a file
that is part of the installed scikit-learn package.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

Split = tuple[np.ndarray, np.ndarray]
"""``(x, y)``: images float32 (N, 1, 8, 8) in [0, 1] and labels int64 (N,)."""


@dataclass(frozen=True)
class DigitsSplit:
    """The train / validation / test parts of the digits data set.

    ``train``, ``val`` and ``test`` are ``(x, y)`` pairs (see ``Split``).  ``indices[name]``
    holds, for each row of that part, its row number in ``sklearn.datasets.load_digits()``
    (same order as the part's rows), so the parts can be checked for overlap.
    """

    train: Split
    val: Split
    test: Split
    indices: dict[str, np.ndarray]


@lru_cache(maxsize=1)
def _all_digits() -> Split:
    """Every digit image (1797, 1, 8, 8) float32 in [0, 1] and its label, read-only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # reshape (not [:, None]) gives canonical C strides; a size-1 channel axis with stride 1
    # looks channels-last to torch, which then picks different conv kernels.
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def stratified_split(y: np.ndarray, holdout: float, test_of_holdout: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only row numbers (train, val, test): ``holdout`` of the rows are held out, and
    ``test_of_holdout`` of those go to test; both cuts stratified by label, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=holdout, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=test_of_holdout, stratify=y[rest], random_state=seed)
    for a in (tr, va, te):
        a.flags.writeable = False
    return tr, va, te


@lru_cache(maxsize=8)
def _split_indices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of the train, val and test parts (stratified 60/20/20, fixed by ``seed``)."""
    return stratified_split(_all_digits()[1], 0.4, 0.5, seed)


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """The digits data set split 60/20/20 (stratified by label, deterministic for a ``seed``).

    Every call returns fresh (writeable) arrays, so callers may modify them freely.  The
    bundled model (``qcompile.models.digits``) is trained and evaluated on ``seed=0``.
    """
    x, y = _all_digits()
    parts = dict(zip(("train", "val", "test"), _split_indices(seed)))
    # Fancy indexing copies, so the cached arrays are never handed out.
    return DigitsSplit(*((x[i], y[i]) for i in parts.values()),
                       indices={k: i.copy() for k, i in parts.items()})


def calibration_batch(n: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` real images of the training split (seed 0) as (n, 1, 8, 8) float32 in [0, 1].

    ``seed`` picks which images (a fixed random choice without replacement); ``n`` is capped
    at the size of the training split.  Meant for compiler calibration: never val/test data.
    """
    x, _ = load_digits_split().train
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(x[rng.choice(len(x), size=min(n, len(x)), replace=False)])


def accuracy(predict_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
             batch: int = 256) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``predict_fn`` over ``(x, y)``.

    ``predict_fn`` maps a batch of at most ``batch`` images to logits or scores
    (B, classes); the predicted class is the argmax over the last axis.
    """
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    correct = 0
    for i in range(0, len(x), batch):
        scores = np.asarray(predict_fn(x[i:i + batch]))
        correct += int(np.sum(np.argmax(scores, axis=-1) == y[i:i + batch]))
    return correct / len(x)
