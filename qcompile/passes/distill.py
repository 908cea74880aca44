"""``distill``: recover a compressed graph by matching the original's outputs on calibration inputs.

No labels are needed: the teacher is ``ctx.original`` (the graph the pipeline started from) and the
training inputs are the pipeline's calibration feeds (``--calib``), every ``VAL_EVERY``-th of them held
out for validation (the epoch with the lowest validation loss is kept).  The loss per output follows
the op producing it -- KL divergence for a softmax, binary cross-entropy for a sigmoid, variance-
normalised MSE otherwise (:mod:`qcompile.distill`) -- so detectors, recognisers and any other
multi-output model can be recovered after ``prune-channels``, a factorization or ``quantize``
(quantized graphs train through fake-quantized shadows and keep their integer grids).  So
``fold-bn,prune-channels{macs=0.5},distill{epochs=5}`` replays from its text and the calibration
file alone.  Deterministic for a given ``seed`` on one machine.  Lossy: the artifact is verified
against the distilled IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.errors import PreconditionError
from qcompile.ir.graph import Graph
from qcompile.passes.base import PassContext, PassResult
from qcompile.passes.training import TrainingPass
from qcompile.passes.training import finite as _finite

VAL_EVERY = 5
"""Every VAL_EVERY-th calibration feed (0, 5, 10, ...) is held out for validation."""


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = field(default=5, metadata={"doc": "maximum epochs"})
    lr: float = field(default=1e-4, metadata={"doc": "Adam learning rate (also for quantization scales)"})
    batch_size: int = field(default=8, metadata={"doc": "feeds per optimizer step"})
    patience: int = field(default=2, metadata={"doc": "stop after this many epochs without validation gain"})
    dice: float = field(default=0.0, metadata={
        "doc": "sigmoid outputs: weight of a soft-dice term added to the BCE (foreground overlap of probability maps)"})
    learn_scales: bool = field(default=True, metadata={"doc": "quantized graphs: learn the scales (LSQ)"})
    seed: int = field(default=0, metadata={"doc": "batch order seed"})


class Distill(TrainingPass):
    """Distils ``ctx.original`` (or ``teacher``) into the graph on the calibration feeds."""

    name = "distill"
    Options = DistillOptions
    exact = False
    summary = "label-free recovery: train the outputs to match the original's on calibration inputs"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        from qcompile.distill import distill

        o = self.options
        teacher = self.teacher if self.teacher is not None else ctx.original
        feeds = list(ctx.calibration or [])
        if teacher is None or len(feeds) < 2:
            raise PreconditionError(
                "pass 'distill' trains the graph to match the original model's outputs on real inputs and "
                f"needs calibration data (at least 2 feeds, got {len(feeds)}) and the original graph: pass "
                "--calib FILE or use a model with calibration_data()")
        val = feeds[::VAL_EVERY]
        train = [f for k, f in enumerate(feeds) if k % VAL_EVERY]
        res = distill(graph, teacher, train, val_feeds=val, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                      patience=o.patience, seed=o.seed, learn_scales=o.learn_scales, dice=o.dice,
                      progress=self.progress)
        stats = {"losses": res.losses, "train_feeds": len(train), "val_feeds": len(val),
                 "best_epoch": res.best_epoch, "epochs_run": len(res.history) - 1,
                 "stopped_early": res.stopped_early, "diverged": res.diverged,
                 "val_loss_before": _finite(res.history[0]["val_loss"]), "val_loss_after": _finite(res.best_val_loss),
                 "history": [{k: _finite(v) for k, v in h.items()} for h in res.history]}
        return PassResult(res.graph, res.best_epoch > 0, stats)
