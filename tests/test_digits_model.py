"""The bundled default model: real data, real trained weights, no pickle, deterministic split."""

import numpy as np
import torch

from qcompile.data.digits import accuracy, calibration_batch, load_digits_split
from qcompile.frontends.torch_frontend import load_torch
from qcompile.models.digits import WEIGHTS, DigitsNet, digits_cnn, predict_fn
from qcompile.backends.torch_backend import to_torch

MIN_TEST_ACCURACY = 0.96


def test_split_is_deterministic_disjoint_and_complete():
    a, b = load_digits_split(), load_digits_split()
    ids = a.indices
    assert all(np.array_equal(ids[k], b.indices[k]) for k in ids)
    assert not (set(ids["train"]) & set(ids["val"]) or set(ids["train"]) & set(ids["test"])
                or set(ids["val"]) & set(ids["test"]))
    assert sum(len(v) for v in ids.values()) == 1797
    x, y = a.train
    assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))


def test_bundled_weights_are_plain_arrays_matching_the_model():
    with np.load(WEIGHTS, allow_pickle=False) as data:
        stored = {k: data[k].shape for k in data.files}
    expected = {k: tuple(v.shape) for k, v in DigitsNet().state_dict().items()}
    assert stored == expected


def test_bundled_model_accuracy_on_held_out_digits():
    model = digits_cnn()
    x, y = load_digits_split().test
    acc = accuracy(predict_fn(model), x, y)
    assert acc >= MIN_TEST_ACCURACY, acc


def test_imported_ir_keeps_accuracy():
    model = digits_cnn()
    g = load_torch(model, model.example_inputs, input_names=["image"])
    gm = to_torch(g, trainable=False)
    x, y = load_digits_split().test
    with torch.no_grad():
        preds = [int(gm(torch.from_numpy(x[i:i + 1])).argmax()) for i in range(len(x))]
    ref = np.argmax(predict_fn(model)(x), axis=-1)
    assert np.array_equal(np.array(preds), ref)


def test_calibration_batch_comes_from_train_split():
    c = calibration_batch(32)
    train_x, _ = load_digits_split().train
    assert c.shape == (32, 1, 8, 8) and c.dtype == np.float32
    flat = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert all(row.tobytes() in flat for row in c.reshape(32, -1))
