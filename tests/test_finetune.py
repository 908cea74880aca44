"""Fine-tuning (qcompile.finetune) on the bundled digits model with real digits.

A copy of the trained model with one conv's weights damaged by noise must recover accuracy on
held-out real digits; early stopping keeps the best epoch; runs are deterministic; the input graph
is never changed; batch-norm statistics stay fixed; bad inputs get errors naming the problem.
"""

import numpy as np
import pytest
import torch

from graphs import damaged
from qcompile.backends.torch_backend import to_torch
from qcompile.data.digits import load_digits_split
from qcompile.errors import InputError, ShapeError
from qcompile.finetune import FinetuneResult, finetune
from qcompile.frontends import load_model
from qcompile.passes import PassManager, parse_pipeline


def _acc(graph, x, y) -> float:
    with torch.no_grad():
        pred = to_torch(graph, trainable=False).eval()(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean() * 100)


def _snapshot(g):
    return ([(n.op, n.name, list(n.inputs), list(n.outputs)) for n in g.nodes],
            {k: v.tobytes() for k, v in g.constants.items()})


@pytest.fixture(scope="module")
def loaded():
    return load_model("qcompile.models.digits:digits_cnn")


@pytest.fixture(scope="module")
def digits(loaded):
    g = PassManager(parse_pipeline("fold-bn,dead-code")).run(loaded.graph)
    return g, load_digits_split()


def test_finetune_recovers_a_damaged_model_and_keeps_the_input(digits):
    g, split = digits
    bad = damaged(g)
    before = _snapshot(bad)
    (xtr, ytr), (xva, yva), (xte, yte) = split.train, split.val, split.test
    acc_orig, acc_bad = _acc(g, xte, yte), _acc(bad, xte, yte)
    assert acc_bad < acc_orig - 5, (acc_orig, acc_bad)  # the damage is real
    res = finetune(bad, xtr, ytr, val_images=xva, val_labels=yva, teacher=g, epochs=4, patience=4,
                   progress=False)
    assert isinstance(res, FinetuneResult) and res.graph is not bad
    acc_ft = _acc(res.graph, xte, yte)
    assert acc_ft > acc_bad + 5 and acc_ft >= acc_orig - 3, (acc_orig, acc_bad, acc_ft)
    losses = [h["train_loss"] for h in res.history[1:]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert _snapshot(bad) == before  # input graph untouched: same nodes, same constant bytes
    # the returned weights are the best epoch's, as recorded
    assert [h["epoch"] for h in res.history] == list(range(5))
    assert res.best_val_acc == max(h["val_acc"] for h in res.history) > res.history[0]["val_acc"]
    assert res.history.index(next(h for h in res.history if h["val_acc"] == res.best_val_acc)) == res.best_epoch
    assert _acc(res.graph, xva, yva) == res.best_val_acc
    assert all(not v.flags.writeable for v in res.graph.constants.values())


def test_loss_falls_without_teacher_or_validation(digits):
    g, split = digits
    bad = damaged(g)
    (xtr, ytr), (xte, yte) = split.train, split.test
    res = finetune(bad, xtr, ytr, epochs=3, progress=False)
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[0] > losses[1] > losses[2]
    assert res.best_epoch == 3 and np.isnan(res.best_val_acc)  # no validation: the last epoch is kept
    assert _acc(res.graph, xte, yte) > _acc(bad, xte, yte) + 5


def test_early_stopping_after_patience_keeps_the_best_epoch(digits):
    g, split = digits
    (xtr, ytr), (xva, yva) = split.train, split.val
    # validate on 60 digits the trained model classifies perfectly: no epoch can beat epoch 0
    ok = np.flatnonzero(to_torch(g, trainable=False)(torch.from_numpy(xva)).argmax(-1).numpy() == yva)[:60]
    res = finetune(g, xtr[:256], ytr[:256], val_images=xva[ok], val_labels=yva[ok], epochs=6, lr=1e-3,
                   patience=2, progress=False)
    assert res.history[0]["val_acc"] == 100.0
    assert res.stopped_early and len(res.history) == 1 + 2 and res.best_epoch == 0
    assert _snapshot(res.graph)[1] == _snapshot(g)[1]  # epoch 0 kept: the input's weights exactly


def test_divergence_keeps_the_best_weights(digits):
    g, split = digits
    (xtr, ytr), (xva, yva) = split.train, split.val
    # a learning rate this large wrecks an already trained model: epoch 0 (the input) stays best
    res = finetune(g, xtr[:320], ytr[:320], val_images=xva, val_labels=yva, epochs=6, lr=1.0, patience=2,
                   progress=False)
    assert res.best_epoch == 0 and len(res.history) <= 1 + 2
    assert _acc(res.graph, xva, yva) == res.history[0]["val_acc"]
    res = finetune(g, xtr[:128], ytr[:128], val_images=xva, val_labels=yva, epochs=3, lr=1e6, progress=False)
    assert res.diverged and res.best_epoch == 0 and res.history[-1]["train_loss"] == float("inf")
    assert _snapshot(res.graph)[1] == _snapshot(g)[1]


def test_deterministic_for_a_seed_and_global_rng_untouched(digits):
    g, split = digits
    bad = damaged(g)
    x, y = split.train[0][:200], split.train[1][:200]
    state = torch.random.get_rng_state()
    a = finetune(bad, x, y, teacher=g, epochs=2, seed=0, progress=False)
    b = finetune(bad, x, y, teacher=g, epochs=2, seed=0, progress=False)
    c = finetune(bad, x, y, teacher=g, epochs=2, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _snapshot(a.graph) == _snapshot(b.graph)
    np.testing.assert_array_equal([list(h.values()) for h in a.history], [list(h.values()) for h in b.history])
    assert _snapshot(a.graph)[1] != _snapshot(c.graph)[1]


def test_torch_teacher_and_progress_bar(digits):
    from qcompile.models.digits import digits_cnn

    g, split = digits
    bad = damaged(g)
    teacher = digits_cnn().train()  # given in training mode: used in eval mode, mode restored
    x, y = split.train[0][:256], split.train[1][:256]
    res = finetune(bad, x, y, val_images=split.val[0], val_labels=split.val[1], teacher=teacher,
                   kd_weight=1.0, epochs=2, progress=True)
    assert teacher.training
    assert res.best_val_acc > res.history[0]["val_acc"]
    # the torch original and its IR import are the same teacher
    res2 = finetune(bad, x, y, val_images=split.val[0], val_labels=split.val[1], teacher=g,
                    kd_weight=1.0, epochs=2, progress=False)
    assert [h["train_loss"] for h in res2.history[1:]] == pytest.approx([h["train_loss"] for h in res.history[1:]],
                                                                         rel=1e-3)


def test_batch_norm_statistics_stay_fixed(loaded):
    g = loaded.graph  # not folded: batch_norm nodes with running mean / var constants
    bns = [n for n in g.nodes if n.op == "batch_norm"]
    assert bns
    split = load_digits_split()
    res = finetune(g, split.train[0][:128], split.train[1][:128], epochs=1, lr=1e-2, progress=False)
    for n in bns:
        for stat in n.inputs[3:5]:
            assert res.graph.constants[stat].tobytes() == g.constants[stat].tobytes(), stat
        assert res.graph.constants[n.inputs[1]].tobytes() != g.constants[n.inputs[1]].tobytes()  # scale trains


@pytest.mark.parametrize("images,labels,error,match", [
    (np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), InputError, "training set is empty"),
    (np.zeros((4, 1, 9, 9), np.float32), np.zeros(4, np.int64), ShapeError, r"\(1, 9, 9\).*expects \(1, 8, 8\)"),
    (np.zeros((4, 8, 8), np.float32), np.zeros(4, np.int64), ShapeError, "input 'image' expects"),
    (np.zeros((4, 1, 8, 8), np.float32), np.full(4, 12), InputError, r"labels must lie in \[0, 10\)"),
    (np.zeros((4, 1, 8, 8), np.float32), np.full(4, -1), InputError, "labels must lie"),
    (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64), ShapeError, "4 training images but 3 labels"),
    (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.float32), InputError, "integer class indices"),
    (np.zeros((4, 1, 8, 8), np.float32), np.zeros((4, 1), np.int64), ShapeError, "1-D"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), np.zeros(4, np.int64), InputError, "NaN"),
])
def test_bad_training_data_is_named(digits, images, labels, error, match):
    g, _ = digits
    with pytest.raises(error, match=match):
        finetune(g, images, labels, epochs=1, progress=False)


def test_bad_validation_teacher_and_settings_are_named(digits):
    g, split = digits
    x, y = split.train[0][:32], split.train[1][:32]
    with pytest.raises(InputError, match="validation images and labels must be given together"):
        finetune(g, x, y, val_images=x, progress=False)
    with pytest.raises(ShapeError, match="validation images"):
        finetune(g, x, y, val_images=x[:, :, :4], val_labels=y, progress=False)
    with pytest.raises(ShapeError, match=r"teacher must give logits \(32, 10\).*\(32, 5\)"):
        finetune(g, x, y, teacher=lambda t: torch.zeros(len(t), 5), progress=False)
    with pytest.raises(InputError, match="teacher must be a Graph"):
        finetune(g, x, y, teacher="model.onnx", progress=False)
    with pytest.raises(InputError, match=r"kd_weight=2.*patience=0|patience=0.*kd_weight=2"):
        finetune(g, x, y, kd_weight=2, patience=0, progress=False)
    with pytest.raises(InputError, match="expected a qcompile IR Graph"):
        finetune(to_torch(g), x, y, progress=False)
