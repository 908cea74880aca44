"""The bundled default model: real data, real trained weights, no pickle, deterministic split."""

import numpy as np
import torch

from qcompile.data.digits import accuracy, calibration_batch, load_digits_split
from qcompile.models.digits import WEIGHTS, DigitsNet, digits_cnn, predict_fn, train_digits

MIN_TEST_ACCURACY = 0.96


def test_split_is_deterministic_disjoint_and_complete():
    a, b = load_digits_split(), load_digits_split()
    ids = a.indices
    assert all(np.array_equal(ids[k], b.indices[k]) for k in ids)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
               for p, q in ((a.train, b.train), (a.val, b.val), (a.test, b.test)))
    tr, va, te = (set(ids[k].tolist()) for k in ("train", "val", "test"))
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(range(1797))
    assert (len(tr), len(va), len(te)) == (1078, 359, 360)
    for (x, y), n in ((a.train, 1078), (a.val, 359), (a.test, 360)):
        assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (n,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))


def test_split_indices_point_at_the_rows():
    from sklearn.datasets import load_digits

    d = load_digits()
    s = load_digits_split()
    for name, (x, y) in (("train", s.train), ("val", s.val), ("test", s.test)):
        idx = s.indices[name]
        assert np.array_equal(y, d.target[idx])
        assert np.array_equal(x[:, 0] * 16, d.images[idx].astype(np.float32))


def test_split_arrays_are_fresh_copies():
    s = load_digits_split()
    s.train[0][:] = -1.0
    assert load_digits_split().train[0].min() >= 0


def test_bundled_weights_are_plain_arrays_matching_the_model():
    with np.load(WEIGHTS, allow_pickle=False) as data:  # would raise on pickled objects
        stored = {k: (data[k].shape, data[k].dtype) for k in data.files}
    expected = {k: (tuple(v.shape), v.numpy().dtype) for k, v in DigitsNet().state_dict().items()}
    assert stored == expected
    assert all(dt != np.dtype(object) for _, dt in stored.values())
    assert WEIGHTS.stat().st_size < 500_000


def test_bundled_model_accuracy_on_held_out_digits():
    model = digits_cnn()
    assert not model.training
    x, y = load_digits_split().test
    acc = accuracy(predict_fn(model), x, y)
    assert acc >= MIN_TEST_ACCURACY, acc
    # eval mode: dropout is inactive, so predictions are repeatable
    assert np.array_equal(predict_fn(model)(x[:32]), predict_fn(model)(x[:32]))


def test_model_compiler_hooks():
    model = digits_cnn()
    assert model.input_names == ["image"]
    (ex,) = model.example_inputs
    assert tuple(ex.shape) == (1, 1, 8, 8) and ex.dtype == torch.float32
    assert model(ex).shape == (1, 10)
    calib = model.calibration_data()
    assert isinstance(calib, np.ndarray) and calib.dtype == np.float32 and calib.shape[1:] == (1, 8, 8)
    assert len(calib) > 0


def test_calibration_batch_comes_from_train_split():
    split = load_digits_split()
    train_rows = {row.tobytes() for row in split.train[0].reshape(len(split.train[0]), -1)}
    held_out = {row.tobytes() for part in (split.val, split.test) for row in part[0].reshape(len(part[0]), -1)}
    for n, seed in ((32, 0), (64, 1)):
        c = calibration_batch(n, seed=seed)
        assert c.shape == (n, 1, 8, 8) and c.dtype == np.float32
        assert 0 <= c.min() and c.max() <= 1 and c.max() > 0
        rows = [row.tobytes() for row in c.reshape(n, -1)]
        assert all(r in train_rows for r in rows)
        # the digits data set has no duplicated images across parts, so this is strict
        assert not any(r in held_out and r not in train_rows for r in rows)
    assert np.array_equal(calibration_batch(16), calibration_batch(16))
    calib = digits_cnn().calibration_data()
    assert all(row.tobytes() in train_rows for row in calib.reshape(len(calib), -1))


def test_training_is_deterministic_and_restores_thread_settings():
    threads = torch.get_num_threads()
    a, ma = train_digits(epochs=1, seed=0)
    b, mb = train_digits(epochs=1, seed=0)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["val_acc"] == mb["val_acc"] and not a.training


def test_imported_ir_keeps_accuracy():
    from qcompile.backends.torch_backend import to_torch
    from qcompile.frontends.torch_frontend import load_torch

    model = digits_cnn()
    g = load_torch(model, model.example_inputs, input_names=["image"])
    gm = to_torch(g, trainable=False)
    x, _ = load_digits_split().test
    with torch.no_grad():
        preds = [int(gm(torch.from_numpy(x[i:i + 1])).argmax()) for i in range(len(x))]
    ref = np.argmax(predict_fn(model)(x), axis=-1)
    assert np.array_equal(np.array(preds), ref)
