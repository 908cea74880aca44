"""Measured latency of layers and of their factor chains, for latency-budgeted rank allocation.

A layer (or factor chain) is built alone — its input as the graph input, its weights as
constants — for one backend (``onnxruntime`` or ``tvm-x86`` / other ``tvm-*``) and all variants
are timed interleaved in the same rounds (:func:`qcompile.bench.interleaved`); medians in
seconds.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Mapping

import numpy as np

from qcompile.ir.graph import Graph


def runner_for(graph: Graph, backend: str, threads: int | None = None,
               feed: Mapping[str, np.ndarray] | None = None) -> Callable[[], object]:
    """A no-argument callable running ``graph`` once on ``backend`` (onnxruntime or tvm-*) with
    ``feed``, by default a fixed random input."""
    threads = threads or len(os.sched_getaffinity(0))
    if feed is None:
        x = graph.inputs[0]
        feed = {x: np.random.default_rng(0).standard_normal(graph.types[x].shape).astype(np.float32)}
    if backend == "onnxruntime":
        from qcompile.backends.onnxruntime_backend import OrtRunner
        from qcompile.frontends.onnx_export import to_onnx

        r = OrtRunner(to_onnx(graph).SerializeToString(), threads)
    elif backend.startswith("tvm-"):
        from qcompile.backends.tvm.backend import TvmBackend

        r = TvmBackend(backend[4:], threads=threads).runner(graph)
    else:
        raise ValueError(f"latency measurement supports onnxruntime and tvm-* backends, not '{backend}'")
    return lambda: r.run(feed)


def measure(graphs: Mapping[Hashable, Graph], backend: str, rounds: int = 3, number: int = 10) -> dict:
    """key -> median seconds of each graph on ``backend``, all timed interleaved."""
    from qcompile.bench import interleaved

    runs = {k: runner_for(g, backend) for k, g in graphs.items()}
    # layers take micro- to milliseconds: a short settle pause keeps probing a whole model quick
    return {k: float(np.median(v)) for k, v in interleaved(runs, rounds, number, settle=0.02).items()}

