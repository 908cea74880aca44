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


def compiled_runner(graph: Graph, backend: str, threads: int | None = None):
    """``graph`` compiled for ``backend`` (onnxruntime or tvm-*) at ``threads`` runtime threads (default:
    every usable core): a :class:`~qcompile.backends.base.Runner` (``run(feed) -> outputs``)."""
    threads = threads or len(os.sched_getaffinity(0))
    if backend == "onnxruntime":
        from qcompile.backends.onnxruntime_backend import OrtRunner
        from qcompile.frontends.onnx_export import to_onnx

        return OrtRunner(to_onnx(graph).SerializeToString(), threads)
    if backend.startswith("tvm-"):
        from qcompile.backends.tvm.backend import TvmBackend

        return TvmBackend(backend[4:], threads=threads).runner(graph)
    raise ValueError(f"latency measurement supports onnxruntime and tvm-* backends, not '{backend}'")


def runner_for(graph: Graph, backend: str, threads: int | None = None,
               feed: Mapping[str, np.ndarray] | None = None) -> Callable[[], object]:
    """A no-argument callable running ``graph`` once on ``backend`` (onnxruntime or tvm-*) with
    ``feed``, by default a fixed random input."""
    r = compiled_runner(graph, backend, threads)
    feed = _random_feed(graph) if feed is None else feed
    return lambda: r.run(feed)


def timing_clock(backend: str, threads: int | None) -> Callable[[], float]:
    """The clock latency is measured with: with exactly one runtime thread on this machine (onnxruntime
    or a local tvm-* target) the runtime computes in the calling thread, so that thread's CPU time
    (``time.thread_time``) is the work itself and excludes waiting for a core — wall-clock medians on a
    loaded machine disagreed 2x between runs, CPU time did not.  Otherwise (several threads, a remote
    board) wall time (``time.perf_counter``)."""
    import time

    return time.thread_time if threads == 1 and not _remote(backend) else time.perf_counter


def _remote(backend: str) -> bool:
    """Whether ``backend`` runs on a remote board (a tvm-* target reached over RPC)."""
    if not backend.startswith("tvm-"):
        return False
    from qcompile.backends.tvm.lowering import resolve

    return resolve(backend[4:]).remote


def _random_feed(graph: Graph) -> dict[str, np.ndarray]:
    x = graph.inputs[0]
    return {x: np.random.default_rng(0).standard_normal(graph.types[x].shape).astype(np.float32)}


def measure(graphs: Mapping[Hashable, Graph], backend: str, rounds: int = 3, number: int = 10,
            threads: int | None = None) -> dict:
    """key -> median seconds of each graph on ``backend`` at ``threads`` runtime threads (default: every
    usable core), all timed interleaved (on a remote target with a fleet of boards: :func:`measure_on_fleet`)."""
    from qcompile.bench import interleaved

    if _remote(backend):
        return measure_on_fleet(graphs, backend, rounds, number)
    runs = {k: runner_for(g, backend, threads) for k, g in graphs.items()}
    # layers take micro- to milliseconds: a short settle pause keeps probing a whole model quick
    got = interleaved(runs, rounds, number, settle=0.02, clock=timing_clock(backend, threads))
    return {k: float(np.median(v)) for k, v in got.items()}


def measure_on_fleet(graphs: Mapping[Hashable, Graph], backend: str, rounds: int = 3, number: int = 10,
                     boards: int | None = None) -> dict:
    """:func:`measure` on remote boards: every graph is compiled and exported here first, then the keys
    are dealt round-robin into one chunk per board (``boards``, default the fleet behind the tracker,
    :func:`qcompile.backends.tvm.remote.fleet_size`), and each chunk is uploaded and timed interleaved in
    its own thread and session — so N boards measure N times as many layers in the same wall time.
    Graphs timed on different boards are compared as if on one: a fleet holds boards of one kind."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from qcompile.backends.tvm.backend import TvmBackend
    from qcompile.backends.tvm.remote import RemoteTvmRunner, fleet_size
    from qcompile.bench import interleaved

    be = TvmBackend(backend[4:])
    libs = {k: be.export_for_remote(g) for k, g in graphs.items()}
    keys = list(libs)
    n = max(1, min(boards or fleet_size(), len(keys)))

    def work(chunk: list) -> dict:
        runs = {}
        for k in chunk:
            g = graphs[k]
            r, feed = RemoteTvmRunner(libs[k], list(g.inputs), list(g.outputs)), _random_feed(g)
            runs[k] = (lambda r=r, feed=feed: r.run(feed))
        got = interleaved(runs, rounds, number, settle=0.02)
        runs.clear()
        gc.collect()  # the runners' session may sit in a reference cycle: free the board for the next chunk
        return {k: float(np.median(v)) for k, v in got.items()}

    out: dict = {}
    with ThreadPoolExecutor(n) as pool:
        for part in pool.map(work, [keys[i::n] for i in range(n)]):
            out.update(part)
    return out
