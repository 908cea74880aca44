"""Run a pipeline: clone, run each pass, verify between passes, instrument.

After every pass the structural verifier runs (always, unless disabled for
speed).  With ``ctx.verify_numerics`` the graph is executed by the reference
interpreter on ``ctx.calibration`` and compared with the *input* graph's outputs:

* exact passes must stay within ``|y - y_ref| <= atol_rel * max|y_ref| + rtol * |y_ref|``
  (fp32 rounding only) or :class:`NumericsError` is raised naming the pass;
* lossy passes get their relative error ``max|y - y_ref| / max|y_ref|`` recorded.

Each pass produces a :class:`PassRecord` (time, modified flag, node counts,
numerical error) — the per-pass statistics shown by ``--timing`` and stored in
the manifest.
"""

from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import NumericsError, PostconditionError
from qcompile.ir.graph import Graph
from qcompile.ir.verifier import verify
from qcompile.passes.base import Pass, PassContext, PassResult
from qcompile.passes.pipeline import format_pipeline


@dataclass
class PassRecord:
    name: str
    text: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    rel_error: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def max_rel_error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """max over outputs of max|y - y_ref| / max|y_ref| (0 when both are all-zero)."""
    worst = 0.0
    for y, r in zip(outputs, reference):
        if y.shape != r.shape:
            return float("inf")
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        err = float(np.max(np.abs(y.astype(np.float64) - r))) if r.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def within_fp32_tolerance(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                          rtol: float, atol_rel: float) -> bool:
    for y, r in zip(outputs, reference):
        if y.shape != r.shape:
            return False
        atol = atol_rel * (float(np.max(np.abs(r))) if r.size else 0.0)
        if not np.all(np.abs(y.astype(np.float64) - r) <= atol + rtol * np.abs(r)):
            return False
    return True


def run_feeds(run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]],
              feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Run every feed; output k of the result stacks output k of each call (new axis 0)."""
    per_call = [run(feed) for feed in feeds]
    return [np.stack([np.asarray(outs[k]) for outs in per_call]) for k in range(len(per_call[0]))]


def run_reference(graph: Graph, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Execute ``graph`` on every feed with the reference interpreter (torch eager)."""
    from qcompile.backends.torch_backend import TorchBackend

    return run_feeds(TorchBackend().runner(graph).run, feeds)


class PassManager:
    """Runs a list of passes (itself usable as a pass: see :class:`Sequential`)."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)
        self.records: list[PassRecord] = []

    @property
    def text(self) -> str:
        return format_pipeline(self.passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if ctx.original is None:
            ctx = dataclasses.replace(ctx, original=graph)
        graph = graph.clone()
        if ctx.verify_structure:
            verify(graph)
        reference = None
        if ctx.verify_numerics and ctx.calibration:
            reference = run_reference(graph, ctx.calibration)
        for inst in ctx.instruments:
            inst.run_before_pipeline(graph, self)
        for index, p in enumerate(self.passes):
            for inst in ctx.instruments:
                inst.run_before_pass(graph, p, index)
            n_before = len(graph.nodes)
            t0 = time.perf_counter()
            result = p(graph, ctx)
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise PostconditionError(f"pass '{p.name}' returned {type(result).__name__}, not PassResult")
            graph = result.graph
            if ctx.verify_structure:
                try:
                    verify(graph)
                except Exception as e:
                    raise PostconditionError(f"pass '{p.name}' produced invalid IR: {e}") from e
            record = PassRecord(p.name, p.to_text(), seconds, result.modified, n_before,
                                len(graph.nodes), stats=dict(result.stats))
            if reference is not None:
                outs = run_reference(graph, ctx.calibration)
                record.rel_error = max_rel_error(outs, reference)
                if p.exact and not within_fp32_tolerance(outs, reference, ctx.rtol, ctx.atol_rel):
                    raise NumericsError(
                        f"pass '{p.name}' is declared exact but changed the outputs: max relative error "
                        f"{record.rel_error:.3g} exceeds fp32 tolerance (rtol={ctx.rtol}, atol={ctx.atol_rel}*max|ref|)")
            self.records.append(record)
            for inst in ctx.instruments:
                inst.run_after_pass(graph, p, index, record)
        for inst in ctx.instruments:
            inst.run_after_pipeline(graph, self)
        return graph


class Sequential(Pass):
    """A pipeline is itself a pass: ``Sequential([FoldBatchNorm(), DeadCode()])``."""

    name = "sequential"

    def __init__(self, passes: Sequence[Pass]):
        super().__init__()
        self.passes = list(passes)
        self.exact = all(p.exact for p in self.passes)  # type: ignore[misc]

    def to_text(self) -> str:
        return format_pipeline(self.passes)

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        for p in self.passes:
            r = p(graph, ctx)
            graph, modified = r.graph, modified or r.modified
        return PassResult(graph, modified)
