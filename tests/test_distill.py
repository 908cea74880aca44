"""Output distillation (qcompile.distill, pass ``distill``) on the bundled digits model with real digits.

Labels are never given to the training: the damaged model learns from the original's outputs on
unlabelled real digits, and held-out labelled digits only judge the result.  Each output loss
(softmax -> KL, sigmoid -> BCE, otherwise MSE) must repair the damage; a graph that cannot run
batched (per-feed gradient accumulation) must train exactly like the batched one; the input graph
is untouched; bad inputs are named.
"""

import numpy as np
import pytest
import torch

from graphs import damaged
from qcompile.backends.torch_backend import to_torch
from qcompile.data.digits import load_digits_split
from qcompile.distill import DistillResult, distill, output_losses
from qcompile.errors import InputError, PreconditionError, ShapeError
from qcompile.frontends import load_model
from qcompile.passes import PassContext, PassManager, parse_pipeline

MAX_DROP = 4.0
"""Test accuracy after 4 label-free epochs on 600 digits stays within this many points of the original's
(the damage costs ~60 points)."""
FP32_RTOL = 1e-4
"""Batched vs per-feed accumulated training: the same sums in another order (fp32)."""


def _acc(graph, x, y) -> float:
    with torch.no_grad():
        pred = to_torch(graph, trainable=False).eval()(torch.from_numpy(x)).argmax(-1).numpy()
    return float((pred == y).mean() * 100)


def _feeds(x):
    return [{"image": x[i:i + 1]} for i in range(len(x))]


def _with_head(g, op):
    """``g`` with ``op`` (softmax / sigmoid) applied to its logits."""
    g = g.clone()
    attrs = {"axis": -1} if op == "softmax" else {}
    g.outputs = [g.append(g.make_node(op, [g.outputs[0]], attrs, name=op)).outputs[0]]
    return g


@pytest.fixture(scope="module")
def digits():
    g = PassManager(parse_pipeline("fold-bn,dead-code")).run(load_model("qcompile.models.digits:digits_cnn").graph)
    return g, load_digits_split()


@pytest.mark.parametrize("head,loss", [(None, "mse"), ("softmax", "kl"), ("sigmoid", "bce")])
def test_distillation_repairs_a_damaged_model_without_labels(digits, head, loss):
    g, split = digits
    teacher = _with_head(g, head) if head else g
    bad = damaged(teacher, noise=1.5)
    (xtr, _), (xva, _), (xte, yte) = split.train, split.val, split.test
    assert output_losses(bad) == {bad.outputs[0]: (loss, -1 if loss == "kl" else 0,
                                                   bad.nodes[-1].inputs[0] if head else bad.outputs[0])}
    acc_orig, acc_bad = _acc(teacher, xte, yte), _acc(bad, xte, yte)
    assert acc_bad < acc_orig - 5, (acc_orig, acc_bad)
    frozen = {k: v.tobytes() for k, v in bad.constants.items()}
    res = distill(bad, teacher, _feeds(xtr[:600]), val_feeds=_feeds(xva[:100]), epochs=4, lr=1e-3, batch_size=16,
                  patience=4, progress=False)
    assert isinstance(res, DistillResult) and res.losses == {bad.outputs[0]: loss}
    acc_after = _acc(res.graph, xte, yte)
    assert acc_after > acc_bad + 5 and acc_after >= acc_orig - MAX_DROP, (acc_orig, acc_bad, acc_after)
    assert res.best_epoch > 0 and res.best_val_loss == min(h["val_loss"] for h in res.history)
    assert res.best_val_loss < res.history[0]["val_loss"]
    assert {k: v.tobytes() for k, v in bad.constants.items()} == frozen  # the input graph is untouched


def test_dice_term_measures_foreground_overlap():
    """BCE + dice * (1 - soft dice): zero extra cost where the student's map equals a binary teacher's,
    the full weight where the foregrounds are disjoint, and a repaired model with it on."""
    from qcompile.distill import _loss

    t = torch.zeros(2, 1, 8, 8)
    t[:, :, 2:4, 2:6] = 1
    same, apart = (t * 2 - 1) * 40, torch.roll(t, 4, dims=2) * 80 - 40  # logits of t / of a shifted map
    base = _loss("bce", 0, same, t, 1.0)
    assert abs(float(_loss("bce", 0, same, t, 1.0, dice=2.0) - base)) < 1e-5
    assert abs(float(_loss("bce", 0, apart, t, 1.0, dice=2.0) - _loss("bce", 0, apart, t, 1.0)) - 2.0) < 1e-4


def test_per_feed_accumulation_trains_like_one_batch(digits, monkeypatch):
    """Graphs whose reshapes fix the batch (e.g. a recogniser's attention) run one feed at a time; the
    accumulated gradient of a batch is the batched one, so both paths give the same weights."""
    from qcompile.factorize import layers

    g, split = digits
    teacher = _with_head(g, "softmax")
    bad = damaged(teacher, noise=1.0)
    feeds = _feeds(split.train[0][:48])
    batched = distill(bad, teacher, feeds, epochs=1, lr=1e-3, batch_size=16, progress=False)
    monkeypatch.setattr(layers, "_batch_free", lambda graph: False)
    single = distill(bad, teacher, feeds, epochs=1, lr=1e-3, batch_size=16, progress=False)
    for name, w in batched.graph.constants.items():
        np.testing.assert_allclose(single.graph.constants[name], w, rtol=FP32_RTOL,
                                   atol=FP32_RTOL * max(float(np.abs(w).max()), 1e-6))
    assert not np.array_equal(batched.graph.constants[bad.nodes[0].inputs[1]],
                              bad.constants[bad.nodes[0].inputs[1]])  # it did train


def test_distill_pass_uses_calibration_and_the_original(digits):
    g, split = digits
    bad = damaged(g, noise=1.5)
    xtr = split.train[0][:200]
    ctx = PassContext(calibration=_feeds(xtr), original=g)
    out = PassManager(parse_pipeline("distill{epochs=2,lr=1e-3,batch_size=16}")).run(bad, ctx)
    (xte, yte) = split.test
    assert _acc(out, xte, yte) > _acc(bad, xte, yte) + 5
    with pytest.raises(PreconditionError, match="distill.*calibration"):
        PassManager(parse_pipeline("distill")).run(bad, PassContext(original=g))


def test_bad_feeds_and_teachers_are_named(digits):
    g, split = digits
    x = split.train[0][:4]
    with pytest.raises(InputError, match="training set is empty"):
        distill(g, g, [], progress=False)
    with pytest.raises(ShapeError, match=r"feed 0 input 'image' has shape \(2, 1, 8, 8\)"):
        distill(g, g, [{"image": x[:2]}], progress=False)
    with pytest.raises(InputError, match="lacks graph input"):
        distill(g, g, [{"y": x[:1]}], progress=False)
    nan = x[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        distill(g, g, [{"image": nan}], progress=False)
    with pytest.raises(ShapeError, match="teacher's outputs"):
        distill(g, lambda feed: [np.zeros((1, 3), np.float32)], _feeds(x), progress=False)
    with pytest.raises(InputError, match="lr"):
        distill(g, g, _feeds(x), lr=-1.0, progress=False)


def test_search_space_recovers_pruned_models_by_distillation_on_recovery_feeds(digits):
    """``SearchSpace(prune_recovery="distill{...}", recovery_feeds=...)``: the pruned model is recovered
    on the recovery feeds (not the 8 calibration feeds), label-free, and its pipeline text says how."""
    from qcompile.search import SearchSpace

    g, split = digits
    (xtr, _), (xte, yte) = split.train, split.test
    calib = _feeds(xtr[:8])
    kw = dict(prune_ratios=(1.0, 0.4), bits=(), ranks_per_layer=0, prune_options={"min_keep": 0.1})
    plain = SearchSpace(g, calib, **kw)
    text = "distill{epochs=4,lr=0.003,batch_size=16}"
    rec = SearchSpace(g, calib, **kw, prune_recovery=text, recovery_feeds=_feeds(xtr[:600]), teacher=g)
    assert rec.prune_pipeline(0.4) == plain.prune_pipeline(0.4) + "," + text
    assert "min_keep=0.1" in plain.prune_pipeline(0.4)
    assert [r.name for r in rec.prune_records[0.4]] == ["prune-channels", "distill"]
    assert rec.prune_records[0.4][1].stats["train_feeds"] + rec.prune_records[0.4][1].stats["val_feeds"] == 600
    before, after = (_acc(s.pruned_graph(0.4), xte, yte) for s in (plain, rec))
    assert after > before + 30, (before, after)  # measured: 22.5 -> 87.2 % (original 98.9 %) at 0.28 of the MACs
    with pytest.raises(Exception, match="no-such-pass"):
        SearchSpace(g, calib, prune_ratios=(1.0, 0.4), prune_recovery="no-such-pass")


def test_progressive_pruning_steps_from_the_previous_recovered_model_and_replays(digits):
    """``prune_progressive``: 0.3 is cut from 0.6's *recovered* model (only the rest of the MACs), and its
    pipeline text (both steps) replays from the original model to the same network."""
    from qcompile.passes.manager import run_reference, within_fp32_tolerance
    from qcompile.search import SearchSpace

    g, split = digits
    xtr = split.train[0]
    calib, feeds = _feeds(xtr[:8]), _feeds(xtr[:300])
    text = "distill{epochs=2,lr=0.003,batch_size=16}"
    kw = dict(prune_ratios=(1.0, 0.6, 0.3), bits=(), ranks_per_layer=0, prune_options={"min_keep": 0.1},
              prune_recovery=text, recovery_feeds=feeds, teacher=g)
    space = SearchSpace(g, calib, **kw, prune_progressive=True)
    p6, p3 = space.prune_pipeline(0.6), space.prune_pipeline(0.3)
    assert p3.startswith(p6 + ",prune-channels{macs=") and p3.count(text) == 2, p3
    assert space.prune_stats[0.3]["from_ratio"] == 0.6 and space.prune_stats[0.3]["mac_ratio"] <= 0.3 + 1e-9
    assert [r.name for r in space.prune_records[0.3]] == ["prune-channels", "distill"]  # only the second step
    for la in space.layers:  # the 0.3 model keeps a subset of the 0.6 model's channels
        narrow, wide = space.layer(la.name, 0.3).weight_shape, space.layer(la.name, 0.6).weight_shape
        assert all(a <= b for a, b in zip(narrow, wide))
    replayed = PassManager(parse_pipeline(p3)).run(g, PassContext(calibration=feeds, original=g))
    x = calib[:4]
    assert within_fp32_tolerance(run_reference(replayed, x), run_reference(space.pruned_graph(0.3), x), 1e-4, 1e-5)
    with pytest.raises(ValueError, match="prune_progressive.*needs prune_recovery"):
        SearchSpace(g, calib, prune_ratios=(1.0, 0.5), prune_progressive=True)
