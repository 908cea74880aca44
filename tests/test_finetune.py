"""Fine-tuning (qcompile.finetune) on the bundled digits model with real digits.

A copy of the trained model with one conv's weights damaged by noise must recover accuracy on
held-out real digits; early stopping keeps the best epoch; the input graph is never changed; bad
inputs get errors naming the problem.
"""

import numpy as np
import pytest
import torch

from qcompile.backends.torch_backend import to_torch
from qcompile.data.digits import load_digits_split
from qcompile.errors import InputError
from qcompile.finetune import finetune
from qcompile.frontends import load_model
from qcompile.passes import PassManager, parse_pipeline


def _acc(graph, x, y) -> float:
    with torch.no_grad():
        pred = to_torch(graph, trainable=False).eval()(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean() * 100)


@pytest.fixture(scope="module")
def digits():
    lm = load_model("qcompile.models.digits:digits_cnn")
    g = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
    return g, load_digits_split()


def _damaged(g):
    bad = g.clone()
    conv = [n for n in bad.nodes if n.op == "conv2d"][1]
    w = bad.constants[conv.inputs[1]]
    rng = np.random.default_rng(0)
    noisy = (w + rng.standard_normal(w.shape).astype(np.float32) * 1.5 * w.std()).astype(np.float32)
    noisy.flags.writeable = False
    bad.constants[conv.inputs[1]] = noisy
    return bad


def test_finetune_recovers_a_damaged_model_and_keeps_the_input(digits):
    g, split = digits
    bad = _damaged(g)
    before_bytes = {k: v.tobytes() for k, v in bad.constants.items()}
    (xtr, ytr), (xva, yva), (xte, yte) = split.train, split.val, split.test
    acc_orig, acc_bad = _acc(g, xte, yte), _acc(bad, xte, yte)
    assert acc_bad < acc_orig - 5, (acc_orig, acc_bad)  # the damage is real
    res = finetune(bad, xtr, ytr, val_images=xva, val_labels=yva, teacher=g, epochs=4, progress=False)
    acc_ft = _acc(res.graph, xte, yte)
    assert acc_ft > acc_bad + 5 and acc_ft >= acc_orig - 3, (acc_orig, acc_bad, acc_ft)
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[-1] < losses[0]
    assert {k: v.tobytes() for k, v in bad.constants.items()} == before_bytes  # input graph untouched
    best = max(res.history, key=lambda h: h["val_acc"])
    assert res.history[res.best_epoch]["val_acc"] == best["val_acc"]


def test_early_stopping_keeps_the_best_epoch(digits):
    g, split = digits
    (xtr, ytr), (xva, yva) = split.train, split.val
    # a learning rate this large wrecks an already trained model: epoch 0 (the input) stays best
    res = finetune(g, xtr, ytr, val_images=xva, val_labels=yva, epochs=6, lr=1.0, patience=2, progress=False)
    assert res.best_epoch == 0 and len(res.history) <= 1 + 2
    assert _acc(res.graph, xva, yva) == res.history[0]["val_acc"]


@pytest.mark.parametrize("images,labels,match", [
    (np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), "empty"),
    (np.zeros((4, 1, 9, 9), np.float32), np.zeros(4, np.int64), "expects"),
    (np.zeros((4, 1, 8, 8), np.float32), np.full(4, 12), "labels must lie"),
    (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64), "labels"),
])
def test_bad_training_data_is_named(digits, images, labels, match):
    g, _ = digits
    with pytest.raises(InputError, match=match):
        finetune(g, images, labels, epochs=1, progress=False)
