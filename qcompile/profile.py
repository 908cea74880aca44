"""Per-layer latency of a compiled artifact on its backend (``qcompile compile --profile``).

The artifact itself is run (not a rebuild of it) on one calibration feed at **one thread**, and the
time of every kernel it executes is measured and attributed to the IR node it computes, then to the
original layer that node comes from (:func:`qcompile.report.origin`).  The report shows each layer's
share of the summed kernel time; everything that is not a conv / linear / matmul layer (pools,
activation quantization, layout changes, concatenations, ...) is "other", so the layers' shares plus
"other" are 100 %.

* ``onnxruntime``: a session over ``model.onnx`` with onnxruntime's own profiler
  (``SessionOptions.enable_profiling``): per-node kernel wall time in microseconds, ``runs`` runs after
  ``warmup`` runs, median per layer.  Node names are the exporter's (the IR node name, ``name/...`` for
  the nodes it adds for a layer) or, after onnxruntime's layout (NCHWc) and fusion rewrites, the name
  of a value the node produces; a fused conv / gemm named after its activation's output is traced back
  to the layer that feeds the activation.
* ``tvm-x86``: the library ``model.so`` is loaded into a Relax VM whose instrument hook stops before
  every kernel call and times that kernel, on its real arguments, with TVM's ``time_evaluator``
  (C++ wall clock, ``number`` calls per repeat, median of ``runs`` repeats).  Kernels are named after
  the ops fused into them (``fused_conv2d3_add2_relu1_prepacked``); the VM calls them in graph order, so
  the k-th kernel containing a conv / matmul is the k-th conv / linear / matmul node of the compiled IR
  (checked: same number of them, and an output of the same size where the sizes allow a choice).
* other backends are not measured (the reason is recorded): ``torch`` runs the IR node by node in the
  Python reference interpreter, whose per-node times would be interpreter overhead, and arm64 artifacts
  run on a board over RPC (or under emulation, which is never timed).

Times vary from run to run, so they are only measured when asked (``--profile``) and then make the
artifact's bytes differ between compiles; without it the report says how to get them.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qcompile.ir.graph import Graph, Node
from qcompile.report import format_ms

LAYER_OPS = ("conv2d", "conv_transpose2d", "linear", "matmul")
ORT_LAYER_OPS = {"Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger", "ConvTranspose", "Gemm",
                 "MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "FusedGemm", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul"}
TVM_LAYER_TOKENS = ("conv2d", "matmul", "dense")
OTHER = "(other ops)"


class NotMeasured(Exception):
    """The backend cannot be profiled here; the message says why."""


def machine() -> str:
    """The CPU model, core count and load average: what the times were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average {:.2f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical CPU(s){load}, {platform.system()} {platform.machine()}"


def profile_artifact(backend, out_dir: Path, manifest: Mapping[str, Any], graph: Graph,
                     feed: Mapping[str, np.ndarray], runs: int = 15, warmup: int = 3) -> dict[str, Any]:
    """Measure the artifact in ``out_dir`` (written by ``backend`` for the compiled IR ``graph``) on
    ``feed``; returns the manifest's ``profile`` entry: per-node median milliseconds grouped by original
    layer (``layers``), ``other_ms``, the clock, machine and settings — or ``{"measured": False,
    "reason": ...}`` for a backend that is not profiled."""
    name = getattr(backend, "name", "?")
    try:
        if name == "onnxruntime":
            per_run, clock = _profile_onnxruntime(Path(out_dir) / "model.onnx", graph, feed, runs, warmup)
        elif name.startswith("tvm-") and not getattr(getattr(backend, "cpu", None), "remote", True):
            per_run, clock = _profile_tvm(Path(out_dir), manifest, graph, feed, runs)
        elif name.startswith("tvm-"):
            raise NotMeasured("arm64 artifacts run on a board over TVM RPC (or the emulated board, which is "
                              "never timed); per-layer profiling is implemented for local backends only")
        elif name == "torch":
            raise NotMeasured("the torch target runs the IR node by node in the Python reference interpreter: "
                              "its per-node times would measure interpreter overhead, not a deployed kernel")
        else:
            raise NotMeasured(f"no per-layer profiler for backend '{name}'")
    except NotMeasured as e:
        return {"measured": False, "backend": name, "reason": str(e)}
    medians = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in sorted({k for r in per_run for k in r})}
    layers = {k: v for k, v in medians.items() if k != OTHER}
    total = sum(medians.values())
    return {
        "measured": True,
        "backend": name,
        "threads": 1,
        "runs": len(per_run),
        "clock": clock,
        "machine": machine(),
        "total_ms": total,
        "other_ms": medians.get(OTHER, 0.0),
        "layers": layers,
    }


def _by_layer(graph: Graph, node_ms: Mapping[str, float]) -> dict[str, float]:
    """IR node -> ms summed into original layer -> ms (``OTHER`` for everything not a layer op)."""
    from qcompile.report import origin

    nodes = {n.name: n for n in graph.nodes}
    out: dict[str, float] = {}
    for name, ms in node_ms.items():
        n = nodes.get(name)
        key = origin(n) if n is not None and n.op in LAYER_OPS else OTHER
        out[key] = out.get(key, 0.0) + ms
    return out


# ---------------------------------------------------------------------------------------- onnxruntime
def _ort_node(graph: Graph, event: str, op_type: str) -> str | None:
    """The IR node an onnxruntime profiler node name stands for (module docstring), or None."""
    producers = graph.producers()
    nodes = {n.name: n for n in graph.nodes}
    names: dict[str, Node] = {**{v: p for v, p in producers.items()}, **nodes}
    best = None
    for cand in names:
        if (event == cand or (event.startswith(cand) and not event[len(cand)].isalnum())) and \
                (best is None or len(cand) > len(best)):
            best = cand
    if best is None:
        return None
    node = names[best]
    if op_type in ORT_LAYER_OPS:  # a conv fused with its activation is named after the activation's output
        for _ in range(8):
            if node.op in LAYER_OPS or not node.inputs:
                break
            prev = producers.get(node.inputs[0])
            if prev is None:
                break
            node = prev
    return node.name


def _profile_onnxruntime(path: Path, graph: Graph, feed, runs: int, warmup: int):
    import onnxruntime as ort

    from qcompile.backends.onnxruntime_backend import session_options

    feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
    so = session_options(1)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="qcompile-prof-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    cache: dict[tuple[str, str], str | None] = {}
    per_run = _regroup_ort(events, graph, cache)
    per_run = per_run[warmup:]
    if not per_run:
        raise NotMeasured("onnxruntime's profiler recorded no runs")
    clock = ("onnxruntime's profiler: per-node kernel wall time (µs resolution), 1 intra-op thread, "
             f"median of {len(per_run)} runs after {warmup} warm-up runs")
    return [_by_layer(graph, r) for r in per_run], clock


def _regroup_ort(events: list, graph: Graph, cache) -> list[dict[str, float]]:
    """Node events grouped into runs by their timestamps: a node belongs to the ``model_run`` whose
    interval [ts, ts + dur] holds it."""
    runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [a for a, _ in runs]
    out: list[dict[str, float]] = [{} for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k < 0 or e["ts"] > runs[k][1]:
            continue
        name, op = e["name"][: -len("_kernel_time")], (e.get("args") or {}).get("op_name", "")
        if (name, op) not in cache:
            cache[(name, op)] = _ort_node(graph, name, op)
        node = cache[(name, op)] or ""
        out[k][node] = out[k].get(node, 0.0) + e.get("dur", 0) / 1e3
    return out


# ---------------------------------------------------------------------------------------- TVM
def _tvm_assign(graph: Graph, kernels: list[tuple[str, int]]) -> list[str | None]:
    """For each kernel call (name, output elements), in call order, the IR layer node it computes
    (None: not a layer kernel).  Raises NotMeasured when the kernels and layers do not match up."""
    layers = [n for n in graph.nodes if n.op in LAYER_OPS]
    sizes = {n.name: int(np.prod(graph.types[n.outputs[0]].shape)) for n in layers}
    pending = list(layers)
    out: list[str | None] = []
    for name, size in kernels:
        if not any(t in name for t in TVM_LAYER_TOKENS):
            out.append(None)
            continue
        if not pending:
            raise NotMeasured(f"kernel '{name}' computes a layer but the compiled IR has no layer left to map")
        pick = next((n for n in pending if sizes[n.name] == size), pending[0])
        pending.remove(pick)
        out.append(pick.name)
    if pending:
        raise NotMeasured(f"{len(pending)} layer(s) of the compiled IR ({pending[0].name}, ...) matched no kernel")
    return out


def _profile_tvm(out_dir: Path, manifest: Mapping[str, Any], graph: Graph, feed, runs: int):
    import tvm

    from qcompile.backends.tvm.backend import ARTIFACT, LocalTvmRunner, set_threads

    previous = os.environ.get("TVM_NUM_THREADS")
    lib = tvm.runtime.load_module(str(out_dir / ARTIFACT))
    ins = [i["name"] for i in manifest["inputs"]]
    outs = [o["name"] for o in manifest["outputs"]]
    runner = LocalTvmRunner(lib, ins, outs, threads=1)
    calls: list[tuple[str, int, list[float]]] = []
    nop = tvm.get_global_func("testing.nop")  # a no-op packed function: the loop's own call overhead

    def cpu_loop(f, args, n: int) -> float:
        t = time.thread_time()
        for _ in range(n):
            f(*args)
        return time.thread_time() - t

    def instrument(func, name, before_run, ret_value, *args):
        if before_run and not name.startswith("vm.builtin"):
            # the kernel on its real arguments (DPS: outputs last), ``number`` calls per repeat (~1 ms of
            # CPU), minus the same loop's call overhead measured with a no-op function
            number = max(3, min(5000, int(1e-3 / max(cpu_loop(func, args, 3) / 3, 1e-7))))
            res = [max(cpu_loop(func, args, number) - cpu_loop(nop, args, number), 0.0) / number
                   for _ in range(runs)]
            tensors = [a for a in args if hasattr(a, "shape")]
            calls.append((name, int(np.prod(tensors[-1].shape)) if tensors else 0, [1e3 * r for r in res]))
        return 0

    try:
        expected = runner.run(feed)
        number = max(3, min(1000, int(0.05 / max(cpu_loop(runner.run, (feed,), 3) / 3, 1e-6))))
        whole = statistics.median(cpu_loop(runner.run, (feed,), number) / number for _ in range(5))
        runner.vm.set_instrument(instrument)
        try:
            got = runner.run(feed)
        finally:
            runner.vm.set_instrument(None)
    finally:
        set_threads(int(previous) if previous else os.cpu_count())
    if any(not np.array_equal(a, b) for a, b in zip(expected, got)):
        raise NotMeasured("timing each kernel again changed the model's outputs (a kernel that updates its "
                          "inputs in place); not profiled")
    assigned = _tvm_assign(graph, [(n, s) for n, s, _ in calls])
    per_run = []
    for k in range(runs):
        node_ms: dict[str, float] = {}
        for (_, _, times), node in zip(calls, assigned):
            node_ms[node or ""] = node_ms.get(node or "", 0.0) + times[k]
        per_run.append(_by_layer(graph, node_ms))
    clock = ("CPU time of the calling thread (`time.thread_time`; one runtime thread computes there, so waiting "
             "for a core does not count) per kernel call, each kernel called on its real arguments at its place "
             f"in one inference, call overhead subtracted, median of {runs} repeats of ~1 ms. A whole inference "
             f"took {format_ms(1e3 * whole)} on the same clock; the difference is the VM's work between kernels and "
             "cache misses that a repeated kernel does not have (it finds its weights cached), so layers with "
             "large weights take a larger share of a whole inference than shown")
    return per_run, clock
