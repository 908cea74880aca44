"""scikit-learn's handwritten digits (1797 real 8x8 images, shipped inside the scikit-learn wheel).

Images are scaled to [0, 1] (pixel / 16) and shaped (N, 1, 8, 8) float32; labels int64.
The split is stratified and fixed by ``seed``: 60 % train, 20 % validation, 20 % test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DigitsSplit:
    train: Split
    val: Split
    test: Split
    indices: dict[str, np.ndarray]


@lru_cache(maxsize=4)
def load_digits_split(seed: int = 0) -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    for a in (x, y):
        a.flags.writeable = False
    return DigitsSplit((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]),
                       {"train": np.sort(tr), "val": np.sort(va), "test": np.sort(te)})


def calibration_batch(n: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` real training images (N, 1, 8, 8) float32, a fixed random choice."""
    x, _ = load_digits_split().train
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(x[rng.choice(len(x), size=min(n, len(x)), replace=False)])


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of ``predict`` (returns logits (B, classes)) over (x, y)."""
    correct = 0
    for i in range(0, len(x), batch):
        correct += int(np.sum(np.argmax(predict(x[i:i + batch]), axis=-1) == y[i:i + batch]))
    return correct / len(x)
