"""``finetune``: short recovery training of a compressed graph on real labelled data.

The training itself is :func:`qcompile.finetune.finetune` (loss, QAT with straight-through rounding
and LSQ scales, early stopping: see that module).  As a pass it distils from ``ctx.original``, the
graph the pipeline started from (the uncompressed model), so a search's chosen point or a user's
pipeline such as ``fold-bn,prune-channels{macs=0.3},quantize,finetune{data=mnist,epochs=3}`` replays
from its text alone.  Deterministic for a given ``seed`` on one machine.

Its stats (recorded in the manifest) hold the validation accuracy before/after (and test accuracy
when the data has a test split) and the per-epoch history.  Lossy: the artifact is verified
against the fine-tuned IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qcompile.ir.graph import Graph
from qcompile.passes.base import PassContext, PassResult
from qcompile.passes.training import TrainingPass
from qcompile.passes.training import finite as _finite


@dataclass(frozen=True)
class FinetuneOptions:
    data: str = field(default="digits", metadata={"doc": "training data: digits, mnist or an .npz file"})
    epochs: int = field(default=5, metadata={"doc": "maximum epochs"})
    lr: float = field(default=1e-3, metadata={"doc": "Adam learning rate (also for scales)"})
    batch_size: int = field(default=64, metadata={"doc": "batch size"})
    patience: int = field(default=2, metadata={"doc": "stop after this many epochs without validation gain"})
    kd_weight: float = field(default=0.5, metadata={"doc": "weight of the distillation loss (0..1)"})
    temperature: float = field(default=4.0, metadata={"doc": "distillation temperature"})
    learn_scales: bool = field(default=True, metadata={"doc": "QAT: learn the quantization scales (LSQ)"})
    seed: int = field(default=0, metadata={"doc": "batch order seed"})


class Finetune(TrainingPass):
    """Fine-tunes the graph it is given (QAT for quantized graphs) on ``data``, distilling from
    ``teacher`` when one is given, else from ``ctx.original`` (the pipeline's input graph)."""

    name = "finetune"
    Options = FinetuneOptions
    exact = False
    summary = "knowledge-distillation / quantization-aware fine-tune on real labelled data"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        from qcompile.finetune import accuracy, finetune, load_training_data, weight_grids

        o = self.options
        data = load_training_data(o.data)
        val = data.val or (None, None)
        qat = bool(weight_grids(graph))
        teacher = self.teacher if self.teacher is not None else ctx.original
        res = finetune(graph, *data.train, val_images=val[0], val_labels=val[1], teacher=teacher,
                       epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, kd_weight=o.kd_weight,
                       temperature=o.temperature, patience=o.patience, seed=o.seed, learn_scales=o.learn_scales,
                       progress=self.progress)
        stats: dict[str, Any] = {"data": data.name, "qat": qat, "teacher": teacher is not None,
                                 "best_epoch": res.best_epoch,
                                 "epochs_run": len(res.history) - 1, "stopped_early": res.stopped_early,
                                 "diverged": res.diverged, "val_acc_before": _finite(res.history[0]["val_acc"]),
                                 "val_acc_after": _finite(res.best_val_acc),
                                 "history": [{k: _finite(v) for k, v in h.items()} for h in res.history]}
        if data.test is not None:
            stats["test_acc_before"] = _finite(accuracy(graph, *data.test))
            stats["test_acc_after"] = _finite(accuracy(res.graph, *data.test))
        return PassResult(res.graph, res.best_epoch > 0, stats)
