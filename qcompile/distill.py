"""Output distillation: recover a compressed graph on *unlabelled* inputs by matching the original.

``finetune`` needs labels and a logits output.  Detectors, recognisers and other multi-output
models have neither, but the original model is a teacher for any input: the student (the pruned,
factorized or quantized graph) is trained so that every output matches the teacher's on the same
feed.  The loss is a sum over the graph outputs, chosen by the op producing each output:

* ``softmax`` over axis ``a`` (class probabilities, e.g. a CTC recogniser's per-step characters):
  ``KL(t || s) = sum_a t * (log t - log s)``, averaged over every other position;
* ``sigmoid`` (probability maps, e.g. a DB text detector): binary cross-entropy against the
  teacher's probabilities as soft targets, ``-(t log s + (1 - t) log(1 - s))``, averaged, plus
  ``dice * (1 - 2 sum(s t) / (sum s + sum t))`` per sample (soft dice, Milletari et al. 2016): on
  a map whose positives are a few percent of the pixels the averaged BCE is dominated by the
  background, the dice term weighs the foreground's overlap as a whole (``dice=0``: off);
* anything else: mean squared error divided by the teacher output's variance over the training
  set (a scale-free regression loss).

For ``softmax`` and ``sigmoid`` outputs the student is trained on the op's *input* (its logits):
``log s = log_softmax(z)`` and BCE-with-logits, so a saturated probability still has a gradient.
Teacher probabilities are clamped to ``[EPS, 1]`` before the logarithm.  Teacher outputs are
computed once, in eval mode, on every training and validation feed.  Adam over the student's
floating constants except batch-norm statistics (as ``finetune``), the learning rate decaying from
``lr`` to 0 over the planned steps on a cosine (SGDR without restarts, Loshchilov & Hutter 2017);
quantized (QDQ) graphs train
through float shadows fake-quantized on their integer grids, with learned scales (LSQ, see
:mod:`qcompile.finetune`).  Batches of ``batch_size`` feeds run as one batch when no node fixes
the batch size (:func:`qcompile.factorize.layers._batch_free`); otherwise each feed runs alone and
the gradients of a batch are accumulated, which computes the same loss.  The epoch with the
lowest validation loss is kept (epoch 0: the input weights; ties keep the earlier), training stops
after ``patience`` epochs without improvement or when the loss becomes NaN/infinite.  The input
graph is never changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qcompile.errors import InputError, ShapeError
from qcompile.ir.graph import Graph

EPS = 1e-7
"""Probabilities are clamped to [EPS, 1 - EPS] before logarithms."""

Feed = Mapping[str, np.ndarray]


@dataclass
class DistillResult:
    """``graph``: a new graph with the best weights; ``best_epoch`` (0: the input weights were never
    beaten); ``history``: per epoch ``epoch``, ``train_loss`` (NaN for epoch 0) and ``val_loss``;
    ``losses``: the loss used per output; ``stopped_early``, ``diverged`` as in ``finetune``."""

    graph: Graph
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    losses: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False
    diverged: bool = False

    @property
    def best_val_loss(self) -> float:
        return self.history[self.best_epoch]["val_loss"]


def output_losses(graph: Graph) -> dict[str, tuple[str, int, str]]:
    """output name -> (``kl`` | ``bce`` | ``mse``, axis, the value the student is trained on) by the op
    producing it (module docstring): a softmax's or sigmoid's input, else the output itself."""
    producers = graph.producers()
    out = {}
    for o in graph.outputs:
        node = producers.get(o)
        while node is not None and node.op == "reshape" and node.inputs[0] in producers \
                and graph.types[node.inputs[0]].shape[-1:] == graph.types[o].shape[-1:] \
                and producers[node.inputs[0]].op in ("reshape", "softmax"):
            node = producers[node.inputs[0]]  # a softmax over the last axis, reshaped keeping that axis
        if node is not None and node.op == "reshape":
            node = producers.get(o)
        if node is not None and node.op == "softmax" and (node.outputs[0] == o or node.attrs["axis"] in (
                -1, graph.types[node.outputs[0]].rank - 1)):
            out[o] = ("kl", int(node.attrs["axis"]) if node.outputs[0] == o else -1, node.inputs[0])
        elif node is not None and node.op == "sigmoid":
            out[o] = ("bce", 0, node.inputs[0])
        else:
            out[o] = ("mse", 0, o)
    return out


def _loss(kind: str, axis: int, z: torch.Tensor, t: torch.Tensor, var: float, dice: float = 0.0) -> torch.Tensor:
    """Loss of student value ``z`` (logits for kl / bce) against teacher output ``t``."""
    if kind == "kl":  # the class axis last, every other position a row (a reshape may lie between)
        c = z.shape[axis]
        z, t = z.movedim(axis, -1).reshape(-1, c), t.movedim(axis, -1).reshape(-1, c).clamp(EPS, 1.0)
        return (t * (t.log() - torch.log_softmax(z, dim=-1))).sum(dim=-1).mean()
    if kind == "bce":
        t = t.clamp(0.0, 1.0)
        loss = nn.functional.binary_cross_entropy_with_logits(z, t)
        if dice:
            s, dims = torch.sigmoid(z), tuple(range(1, z.dim()))
            overlap = 2 * (s * t).sum(dims) / ((s + t).sum(dims) + EPS)
            loss = loss + dice * (1 - overlap).mean()
        return loss
    return ((z - t) ** 2).mean() / var


def _check_feeds(graph: Graph, feeds: Sequence[Feed], what: str) -> list[dict[str, np.ndarray]]:
    if not feeds:
        raise InputError(f"distill: the {what} set is empty")
    out = []
    for k, f in enumerate(feeds):
        missing = [i for i in graph.inputs if i not in f]
        if missing:
            raise InputError(f"distill: {what} feed {k} lacks graph input(s) {missing} of '{graph.name}'")
        row = {}
        for i in graph.inputs:
            a = np.ascontiguousarray(f[i], dtype=np.float32)
            want = graph.types[i].shape
            if a.shape != tuple(want):
                raise ShapeError(f"distill: {what} feed {k} input '{i}' has shape {a.shape}, graph '{graph.name}' "
                                 f"expects {tuple(want)}")
            if not np.isfinite(a).all():
                raise InputError(f"distill: {what} feed {k} input '{i}' contains NaN or infinite values")
            row[i] = a
        out.append(row)
    return out


def _teacher_outputs(teacher: Graph | Callable[[Feed], Sequence[np.ndarray]], feeds: list[dict],
                     student: Graph) -> list[list[np.ndarray]]:
    if isinstance(teacher, Graph):
        from qcompile.backends.torch_backend import to_torch

        module = to_torch(teacher, trainable=False).eval()
        names = teacher.inputs

        def run(f):
            with torch.no_grad():
                y = module(*[torch.from_numpy(f[i]) for i in names])
            return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]
    elif callable(teacher):
        run = teacher
    else:
        raise InputError(f"distill: teacher must be a Graph or a callable feed -> outputs, got {type(teacher).__name__}")
    outs = []
    for f in feeds:
        y = [np.asarray(a, np.float32) for a in run(f)]
        want = [tuple(student.types[o].shape) for o in student.outputs]
        if [a.shape for a in y] != want:
            raise ShapeError(f"distill: the teacher's outputs {[a.shape for a in y]} differ from the student "
                             f"'{student.name}' outputs {want}")
        outs.append(y)
    return outs


def distill(graph: Graph, teacher: Graph | Callable[[Feed], Sequence[np.ndarray]], feeds: Sequence[Feed], *,
            val_feeds: Sequence[Feed] | None = None, epochs: int = 5, lr: float = 1e-4, batch_size: int = 8,
            patience: int = 2, seed: int = 0, learn_scales: bool = True, dice: float = 0.0,
            progress: bool | Callable[[dict[str, float]], Any] = True) -> DistillResult:
    """Train ``graph`` to reproduce ``teacher``'s outputs on ``feeds`` (see module docstring).

    ``teacher``: the original graph (same inputs and output shapes) or a callable ``feed -> outputs``
    (e.g. onnxruntime on the original file).  ``feeds``/``val_feeds``: dicts of the graph's inputs at
    its static shapes.  Without ``val_feeds`` the last epoch is kept.  Raises ``InputError`` (empty
    or non-finite feeds, bad settings) or ``ShapeError`` (a feed or the teacher's outputs do not
    match the graph), naming the problem.
    """
    from qcompile.backends.torch_backend import write_back
    from qcompile.factorize.layers import _batch_free
    from qcompile.finetune import MIN_SCALE, BestEpoch, _check_settings, _Progress, trainable_student, weight_grids

    if not isinstance(graph, Graph):
        raise InputError(f"distill: expected a qcompile IR Graph, got {type(graph).__name__}")
    _check_settings(epochs, batch_size, patience, lr, None, 0.0, 1.0)
    train = _check_feeds(graph, feeds, "training")
    val = _check_feeds(graph, val_feeds, "validation") if val_feeds else []
    t_train = _teacher_outputs(teacher, train, graph)
    t_val = _teacher_outputs(teacher, val, graph)
    kinds = output_losses(graph)
    var = [max(float(np.var(np.stack([t[k] for t in t_train]))), 1e-12) for k in range(len(graph.outputs))]
    batched = _batch_free(graph)

    trained = graph.clone()
    trained.outputs = [kinds[o][2] for o in graph.outputs]
    student, params, scales = trainable_student(graph, trained, weight_grids(graph), learn_scales, "distill")
    opt = torch.optim.Adam([{"params": params}] + ([{"params": scales}] if scales else []), lr=lr)
    steps = (len(train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)

    def loss_of(idx: Sequence[int], data: list[dict], targets: list[list[np.ndarray]],
                backward: bool) -> float:
        """Mean loss over ``idx`` (one batch, or one feed at a time with accumulated gradients)."""
        chunks = [list(idx)] if batched else [[i] for i in idx]
        total = 0.0
        for chunk in chunks:
            x = [torch.from_numpy(np.concatenate([data[i][n] for i in chunk])) for n in graph.inputs]
            y = student(*x)
            y = y if isinstance(y, tuple) else (y,)
            loss = sum(_loss(*kinds[o][:2], y[k], torch.from_numpy(np.concatenate([targets[i][k] for i in chunk])),
                             var[k], dice) for k, o in enumerate(graph.outputs)) * (len(chunk) / len(idx))
            if backward:
                if not torch.isfinite(loss):
                    return float("inf")
                loss.backward()
            total += float(loss.detach())
        return total

    def val_loss() -> float:
        if not val:
            return float("nan")
        student.eval()
        with torch.no_grad():
            return float(np.mean([loss_of([i], val, t_val, False) for i in range(len(val))]))

    keep = BestEpoch(student, val_loss(), lambda new, best: new < best)
    stopped_early = diverged = False
    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"), "val_loss": keep.score}]
    report = _Progress(progress, f"distilling '{graph.name}'", epochs, steps)
    gen = torch.Generator().manual_seed(int(seed))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for epoch in range(1, epochs + 1):
                student.train()
                perm = torch.randperm(len(train), generator=gen).tolist()
                total = 0.0
                for i in range(0, len(train), batch_size):
                    idx = perm[i:i + batch_size]
                    opt.zero_grad()
                    loss = loss_of(idx, train, t_train, True)
                    if not math.isfinite(loss):
                        diverged = True
                        break
                    opt.step()
                    schedule.step()
                    with torch.no_grad():
                        for sc in scales:
                            sc.clamp_(min=MIN_SCALE)
                    total += loss * len(idx)
                    report.batch()
                if diverged:
                    history.append({"epoch": epoch, "train_loss": float("inf"), "val_loss": float("nan")})
                    report.epoch(history[-1], keep.epoch)
                    stopped_early = epoch < epochs
                    break
                history.append({"epoch": epoch, "train_loss": total / len(train), "val_loss": val_loss()})
                keep.update(epoch, history[-1]["val_loss"], bool(val))
                report.epoch(history[-1], keep.epoch)
                if keep.stale >= patience and epoch < epochs:
                    stopped_early = True
                    break
    finally:
        report.close()
    keep.restore()
    return DistillResult(write_back(graph, student), keep.epoch, history,
                         {o: k[0] for o, k in kinds.items()}, stopped_early, diverged)
