"""Short recovery training of a compressed graph, with knowledge distillation from the original.

Loss per batch, with student logits ``s``, teacher logits ``t``, labels ``y``, ``a = kd_weight``
and temperature ``T``::

    L = (1 - a) * CE(y, s) + a * T^2 * KL(softmax(t / T) || softmax(s / T))

(without a teacher, ``L = CE(y, s)``).  The ``T^2`` factor keeps the distillation gradients on the
scale of the cross-entropy ones (Hinton et al. 2015).  Teacher logits are computed once, in eval
mode, on the (unaugmented) training images.

Adam over every floating constant of the graph except batch-norm running statistics (mean and
variance stay fixed: a gradient step could make a variance negative), batches in an order fixed by
``seed``.  Validation accuracy is measured before training (epoch 0: the input weights) and after
every epoch; the best epoch's weights are kept (ties keep the earlier epoch) and training stops
after ``patience`` epochs without improvement.  Without validation data the last epoch is kept.
If the loss becomes NaN or infinite, training stops and the best earlier weights are kept.

The graph is trained through the reference interpreter (``to_torch(graph, trainable=True)``), so any
pass's output -- factor chains included -- is trainable as it stands.  The input graph is never
changed: the result holds a new graph (``write_back`` of a clone) with the best weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from qcompile.backends.torch_backend import GraphModule, to_torch, write_back
from qcompile.errors import InputError, ShapeError
from qcompile.ir.graph import Graph

Teacher = Graph | nn.Module | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    ``graph``: a new graph holding the best weights (the input graph is untouched).
    ``best_epoch``: the epoch whose weights ``graph`` holds; 0 means the input weights were never
    beaten on validation.  ``history``: one dict per evaluated epoch, epoch 0 first, with ``epoch``,
    ``train_loss`` (mean loss over that epoch's batches; NaN for epoch 0) and ``val_acc`` (percent;
    NaN without validation data).  ``stopped_early``: training ended before ``epochs`` because of
    ``patience``.  ``diverged``: the loss became NaN or infinite (learning rate too high); that
    epoch is recorded with ``train_loss`` inf and ``val_acc`` NaN, training stops, and the best
    earlier weights are kept.
    """

    graph: Graph
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    diverged: bool = False

    @property
    def best_val_acc(self) -> float:
        """Validation accuracy (percent) of ``graph``; NaN without validation data."""
        return self.history[self.best_epoch]["val_acc"]


def _prepare(graph: Graph, images: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32, labels int64)`` checked against the graph's input and output types."""
    if images is None or labels is None:
        raise InputError(f"finetune: {what} images and labels must be given together "
                         f"(got images={'None' if images is None else 'array'}, "
                         f"labels={'None' if labels is None else 'array'})")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 0 or len(images) == 0:
        raise InputError(f"finetune: the {what} set is empty")
    if labels.ndim != 1:
        raise ShapeError(f"finetune: {what} labels must be a 1-D array of class indices, got shape {labels.shape}")
    if len(images) != len(labels):
        raise ShapeError(f"finetune: {len(images)} {what} images but {len(labels)} labels")
    name = graph.inputs[0]
    want = graph.types[name].shape[1:]
    if tuple(images.shape[1:]) != tuple(want):
        raise ShapeError(f"finetune: {what} images have per-sample shape {tuple(images.shape[1:])}, but graph "
                         f"'{graph.name}' input '{name}' expects {tuple(want)} (type {graph.types[name]})")
    if images.dtype.kind not in "fiu":
        raise InputError(f"finetune: {what} images must be numeric, got dtype {images.dtype}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise InputError(f"finetune: {what} images contain NaN or infinite values")
    if labels.dtype.kind not in "iu":
        raise InputError(f"finetune: {what} labels must be integer class indices, got dtype {labels.dtype}")
    classes = graph.types[graph.outputs[0]].shape[-1]
    if labels.min() < 0 or labels.max() >= classes:
        raise InputError(f"finetune: {what} labels must lie in [0, {classes}) (graph '{graph.name}' has {classes} "
                         f"output classes), got labels in [{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int64)


def _check_graph(graph: Graph) -> None:
    if not isinstance(graph, Graph):
        raise InputError(f"finetune: expected a qcompile IR Graph, got {type(graph).__name__}")
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise InputError(f"finetune needs a graph with one input and one (logits) output; '{graph.name}' has "
                         f"{len(graph.inputs)} inputs and {len(graph.outputs)} outputs")
    out = graph.types[graph.outputs[0]]
    if len(out.shape) != 2 or not out.dtype.startswith("float"):
        raise ShapeError(f"finetune: the output '{graph.outputs[0]}' of graph '{graph.name}' must be float logits "
                         f"(batch, classes), got {out}")


def _logits(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def _teacher_logits(teacher: Teacher, x: torch.Tensor, classes: int) -> torch.Tensor:
    """The teacher's logits for every training image, computed once in eval mode (mode restored)."""
    if isinstance(teacher, Graph):
        _check_graph(teacher)
        want = teacher.types[teacher.inputs[0]].shape[1:]
        if tuple(x.shape[1:]) != tuple(want):
            raise ShapeError(f"finetune: teacher graph '{teacher.name}' expects per-sample input shape "
                             f"{tuple(want)}, the training images have {tuple(x.shape[1:])}")
        module: Any = to_torch(teacher, trainable=False)
    elif callable(teacher):
        module = teacher
    else:
        raise InputError(f"finetune: teacher must be a Graph, a torch module or a callable, got {type(teacher).__name__}")
    was_training = isinstance(module, nn.Module) and module.training
    if isinstance(module, nn.Module):
        module.eval()
    try:
        out = _logits(module, x, 256)
    finally:
        if was_training:
            module.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"finetune: the teacher must give logits ({len(x)}, {classes}) like the student; got {shape}")
    return out.detach().float()


def _freeze_bn_statistics(graph: Graph, module: GraphModule) -> None:
    """Batch-norm running mean and variance are statistics, not weights: no gradient for them."""
    for node in graph.nodes:
        if node.op == "batch_norm":
            for cname in node.inputs[3:5]:
                if cname in module.param_names:
                    module.constant(cname).requires_grad_(False)


def finetune(graph: Graph, train_images: np.ndarray, train_labels: np.ndarray, *,
             val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
             teacher: Teacher | None = None, epochs: int = 5, lr: float = 1e-3,
             batch_size: int = 64, kd_weight: float = 0.5, temperature: float = 4.0, patience: int = 2,
             seed: int = 0, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``graph`` on labelled images; return the best weights as a new graph.

    The loss is ``L = (1-a)·CE(y, s) + a·T²·KL(softmax(t/T) || softmax(s/T))`` with ``a = kd_weight``,
    ``T = temperature``, student logits ``s`` and the logits ``t`` of ``teacher`` (another ``Graph``,
    a torch module or a callable on float32 tensor batches); without a teacher ``L = CE(y, s)``.
    ``graph`` must have one image input (any static batch; training uses ``batch_size``) and one
    logits output (batch, classes).  Images: (N, *input shape without batch), labels: integer class
    indices (N,).  With ``val_images``/``val_labels`` the best epoch by validation accuracy is kept
    and training stops after ``patience`` epochs without improvement (see module docstring).
    ``progress`` shows a ``rich`` progress bar.  Deterministic for a given ``seed`` on one machine
    (the global torch RNG is left as it was).

    Raises ``ShapeError`` (image shape differs from the graph input, label count differs from image
    count, non-logits output) or ``InputError`` (empty data, labels out of range or not integers,
    NaN images, bad settings), both naming the problem.
    """
    _check_graph(graph)
    x_np, y_np = _prepare(graph, train_images, train_labels, "training")
    has_val = val_images is not None or val_labels is not None
    if has_val:
        xv_np, yv_np = _prepare(graph, val_images, val_labels, "validation")
    bad = [f"{k}={v!r}" for k, v, ok in (
        ("epochs", epochs, isinstance(epochs, (int, np.integer)) and epochs >= 1),
        ("batch_size", batch_size, isinstance(batch_size, (int, np.integer)) and batch_size >= 1),
        ("patience", patience, isinstance(patience, (int, np.integer)) and patience >= 1),
        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0),
        ("kd_weight", kd_weight, isinstance(kd_weight, (int, float)) and 0 <= kd_weight <= 1),
        ("temperature", temperature, isinstance(temperature, (int, float)) and math.isfinite(temperature)
         and temperature > 0)) if not ok]
    if bad:
        raise InputError(f"finetune: invalid setting(s) {', '.join(bad)} (epochs, batch_size, patience >= 1; "
                         "lr > 0; 0 <= kd_weight <= 1; temperature > 0)")

    classes = graph.types[graph.outputs[0]].shape[-1]
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    t_logits = _teacher_logits(teacher, x, classes) if teacher is not None else None
    student = to_torch(graph.clone(), trainable=True)
    _freeze_bn_statistics(graph, student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"finetune: graph '{graph.name}' has no trainable floating-point constants")

    def val_acc() -> float:
        if not has_val:
            return float("nan")
        student.eval()
        pred = _logits(student, torch.from_numpy(xv_np), 256).argmax(-1).numpy()
        return float((pred == yv_np).mean() * 100)

    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    best_acc = val_acc()
    best_state, best_epoch, stale, stopped_early = copy.deepcopy(student.state_dict()), 0, 0, False
    diverged = False
    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"), "val_acc": best_acc}]
    steps = (len(x) + batch_size - 1) // batch_size
    bar = task = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       transient=True)
        bar.start()
        task = bar.add_task(f"fine-tuning '{graph.name}' (epoch 0 val {best_acc:.2f} %)", total=epochs * steps)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for epoch in range(1, epochs + 1):
                student.train()
                perm = torch.randperm(len(x), generator=gen)
                total = 0.0
                for i in range(0, len(x), batch_size):
                    idx = perm[i:i + batch_size]
                    s = student(x[idx])
                    loss = nn.functional.cross_entropy(s, y[idx])
                    if t_logits is not None and kd_weight > 0:
                        kd = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, -1),
                                                  nn.functional.log_softmax(t_logits[idx] / temperature, -1),
                                                  reduction="batchmean", log_target=True) * temperature ** 2
                        loss = (1 - kd_weight) * loss + kd_weight * kd
                    if not torch.isfinite(loss):  # diverged: these weights are lost, keep the best so far
                        diverged = True
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                    if bar is not None:
                        bar.advance(task)
                if diverged:
                    history.append({"epoch": epoch, "train_loss": float("inf"), "val_acc": float("nan")})
                    stopped_early = epoch < epochs
                    break
                acc = val_acc()
                history.append({"epoch": epoch, "train_loss": total / len(x), "val_acc": acc})
                if bar is not None:
                    bar.update(task, description=f"fine-tuning '{graph.name}' (epoch {epoch} loss "
                                                 f"{total / len(x):.4f} val {acc:.2f} %)")
                if not has_val or acc > best_acc:
                    best_acc, best_state, best_epoch, stale = acc, copy.deepcopy(student.state_dict()), epoch, 0
                else:
                    stale += 1
                    if stale >= patience and epoch < epochs:
                        stopped_early = True
                        break
    finally:
        if bar is not None:
            bar.stop()
    student.load_state_dict(best_state)
    return FinetuneResult(write_back(graph, student), best_epoch, history, stopped_early, diverged)
