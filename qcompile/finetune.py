"""Short recovery training of a compressed graph, with knowledge distillation from the original.

Loss per batch, with student logits ``s``, teacher logits ``t``, labels ``y``, ``a = kd_weight``
and temperature ``T``::

    L = (1 - a) * CE(y, s) + a * T^2 * KL(softmax(t / T) || softmax(s / T))

(without a teacher, ``L = CE(y, s)``).  Adam, fixed seed and batch order; validation accuracy after
every epoch, the best epoch's weights kept, early stop after ``patience`` epochs without
improvement.  The input graph is never changed: a new graph with the best weights is returned.
The graph is trained through the reference interpreter (``to_torch(graph, trainable=True)``), so
any pass's output — factor chains included — is trainable as it stands.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompile.backends.torch_backend import to_torch, write_back
from qcompile.errors import InputError
from qcompile.ir.graph import Graph


@dataclass
class FinetuneResult:
    graph: Graph
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train_loss, val_acc


def _check(graph: Graph, images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise InputError(f"finetune needs a graph with one input and one (logits) output; '{graph.name}' has "
                         f"{len(graph.inputs)} inputs and {len(graph.outputs)} outputs")
    if len(images) == 0:
        raise InputError(f"finetune: the {what} set is empty")
    if len(images) != len(labels):
        raise InputError(f"finetune: {len(images)} {what} images but {len(labels)} labels")
    want = graph.types[graph.inputs[0]].shape[1:]
    if tuple(images.shape[1:]) != tuple(want):
        raise InputError(f"finetune: {what} images have shape {tuple(images.shape[1:])} per sample, the graph "
                         f"input '{graph.inputs[0]}' expects {tuple(want)}")
    classes = graph.types[graph.outputs[0]].shape[-1]
    if labels.min() < 0 or labels.max() >= classes:
        raise InputError(f"finetune: {what} labels must lie in [0, {classes}) (the graph has {classes} outputs), "
                         f"got [{labels.min()}, {labels.max()}]")


def _logits(module: Any, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def finetune(graph: Graph, train_images: np.ndarray, train_labels: np.ndarray, *,
             val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
             teacher: Graph | nn.Module | None = None, epochs: int = 5, lr: float = 1e-3,
             batch_size: int = 64, kd_weight: float = 0.5, temperature: float = 4.0, patience: int = 2,
             seed: int = 0, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``graph`` (see module docstring); returns the best weights as a new graph."""
    train_images = np.ascontiguousarray(train_images, dtype=np.float32)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    _check(graph, train_images, train_labels, "training")
    if val_images is not None:
        val_images = np.ascontiguousarray(val_images, dtype=np.float32)
        val_labels = np.asarray(val_labels, dtype=np.int64)
        _check(graph, val_images, val_labels, "validation")
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= kd_weight <= 1 or temperature <= 0:
        raise InputError(f"finetune: invalid settings epochs={epochs} batch_size={batch_size} lr={lr} "
                         f"kd_weight={kd_weight} temperature={temperature}")
    torch.manual_seed(seed)
    student = to_torch(graph.clone(), trainable=True)
    x, y = torch.from_numpy(train_images), torch.from_numpy(train_labels)
    t_logits = None
    if teacher is not None:
        tmod = to_torch(teacher, trainable=False) if isinstance(teacher, Graph) else teacher
        was_training = getattr(tmod, "training", False)
        if hasattr(tmod, "eval"):
            tmod.eval()
        t_logits = _logits(tmod, x, 256)
        if was_training:
            tmod.train()

    def val_acc() -> float:
        if val_images is None:
            return float("nan")
        student.eval()
        pred = _logits(student, torch.from_numpy(val_images), 256).argmax(-1).numpy()
        return float((pred == val_labels).mean() * 100)

    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_state, best_epoch, stale = val_acc(), copy.deepcopy(student.state_dict()), 0, 0
    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"), "val_acc": best_acc}]
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("fine-tuning", total=epochs)
    try:
        for epoch in range(1, epochs + 1):
            student.train()
            perm = torch.randperm(len(x), generator=gen)
            total, count = 0.0, 0
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                s = student(x[idx])
                loss = nn.functional.cross_entropy(s, y[idx])
                if t_logits is not None:
                    kd = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, -1),
                                              nn.functional.softmax(t_logits[idx] / temperature, -1),
                                              reduction="batchmean") * temperature ** 2
                    loss = (1 - kd_weight) * loss + kd_weight * kd
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            acc = val_acc()
            history.append({"epoch": epoch, "train_loss": total / count, "val_acc": acc})
            if bar is not None:
                bar.update(task, advance=1, description=f"fine-tuning: epoch {epoch} val {acc:.2f} %")
            if val_images is None or acc > best_acc:
                best_acc, best_state, best_epoch, stale = acc, copy.deepcopy(student.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    finally:
        if bar is not None:
            bar.stop()
    student.load_state_dict(best_state)
    return FinetuneResult(write_back(graph, student), best_epoch, history)
