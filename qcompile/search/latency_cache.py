"""Per-layer latency, measured once per *workload* and cached on disk.

A workload is what decides a layer's run time: the ops of its (single-layer or factor-chain)
graph in order, their attributes, the shapes and dtypes of every input, output and constant, the
bit-widths recorded on quantize/dequantize nodes, the backend and the target (LLVM target string
for ``tvm-*``, the onnxruntime version for ``onnxruntime``; plus the CPU model and thread count).
Weight *values* and node / value names are not part of it: two layers with the same shapes share
one measurement, and re-running a search on another checkpoint of the same architecture measures
nothing.

The cache is one JSON file per backend, ``cache_dir()/latency/<backend>.json``::

    {"version": 1, "backend": "onnxruntime",
     "entries": {"<sha256 of the workload>": {"seconds": 1.2e-05, "workload": "conv2d f32[1,16,8,8]...",
                                             "target": "...", "rounds": 3, "time": 1718000000.0}}}

Writes are atomic (a unique temporary file beside it, then ``os.replace``) and merge: the writer
takes an advisory lock, re-reads the file, adds its entries and replaces it, so two processes
measuring at once both keep their results.  Readers never see a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping

from qcompile.cache import atomic_write
from qcompile.ir.graph import Graph

VERSION = 1

MeasureFn = Callable[[Mapping[Hashable, Graph], str], Mapping[Hashable, float]]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_target(backend: str, threads: int | None = None) -> str:
    """What besides the graph decides a measurement: backend build + CPU + threads (+ the clock, when
    it is the calling thread's CPU time: :func:`qcompile.factorize.latency.timing_clock`)."""
    threads = threads or len(os.sched_getaffinity(0))
    if backend == "onnxruntime":
        import onnxruntime

        build = f"onnxruntime {onnxruntime.__version__}"
    elif backend.startswith("tvm-"):
        from qcompile.backends.tvm.lowering import resolve

        build = str(resolve(backend[4:]).tvm_target())
    else:
        build = backend
    from qcompile.factorize.latency import timing_clock

    cpu = " | cpu-time" if timing_clock(backend, threads) is time.thread_time else ""
    return f"{build} | {_cpu_model()} | threads={threads}{cpu}"


def workload(graph: Graph) -> list:
    """The graph with names replaced by positions and constants by their type (JSON-able)."""
    ids: dict[str, str] = {}

    def ref(v: str) -> str:
        if not v:
            return "-"
        if v not in ids:
            kind = "c" if v in graph.constants else "v"
            ids[v] = f"{kind}{len(ids)}"
        return f"{ids[v]}:{graph.types[v]}"

    desc: list = [["in"] + [ref(v) for v in graph.inputs]]
    for n in graph.nodes:
        attrs = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in sorted(n.attrs.items())}
        desc.append([n.op, [ref(v) for v in n.inputs], [ref(v) for v in n.outputs], attrs])
    desc.append(["out"] + [ref(v) for v in graph.outputs])
    return desc


def workload_text(graph: Graph) -> str:
    """A short human-readable summary (ops and shapes) stored beside each entry."""
    parts = [f"{n.op} {' '.join(str(graph.types[v]) for v in n.inputs if v)}" for n in graph.nodes]
    return " ; ".join(parts)


def workload_key(graph: Graph, backend: str, target: str) -> str:
    blob = json.dumps({"backend": backend, "target": target, "graph": workload(graph)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_path(backend: str) -> Path:
    from qcompile.cache import cache_dir

    return cache_dir() / "latency" / f"{backend}.json"


def _measure_interleaved(graphs: Mapping[Hashable, Graph], backend: str,
                         threads: int | None = None) -> Mapping[Hashable, float]:
    from qcompile.factorize.latency import measure

    return measure(graphs, backend, threads=threads)


class LatencyCache:
    """``measure({key: graph}) -> {key: seconds}`` timing only workloads not in the cache.

    ``hits`` / ``misses`` count requested graphs found in the cache / workloads actually measured
    (over this object's life); ``measure_fn`` (default: interleaved timing on ``backend``,
    :func:`qcompile.factorize.latency.measure`) can be replaced, e.g. by a remote board fleet.
    ``threads``: runtime threads of the default measurement (part of every entry's target; default every
    usable core).
    """

    def __init__(self, backend: str = "onnxruntime", path: str | Path | None = None, *,
                 target: str | None = None, measure_fn: MeasureFn | None = None, threads: int | None = None):
        self.backend = backend
        self.path = Path(path) if path else default_path(backend)
        self.target = target if target is not None else default_target(backend, threads)
        self.measure_fn = measure_fn or (lambda graphs, b: _measure_interleaved(graphs, b, threads))
        self.hits = 0
        self.misses = 0
        self.entries: dict[str, dict] = {}
        self.reload()

    # ------------------------------------------------------------------ file
    def reload(self) -> None:
        """Merge what other processes wrote since (entries already known are kept)."""
        for k, v in _read(self.path).items():
            self.entries.setdefault(k, v)

    def key(self, graph: Graph) -> str:
        return workload_key(graph, self.backend, self.target)

    def lookup(self, graph: Graph) -> float | None:
        e = self.entries.get(self.key(graph))
        return None if e is None else float(e["seconds"])

    def record(self, new: Mapping[str, dict]) -> None:
        """Add entries (workload key -> {"seconds": ..., ...}) and write the merged file atomically."""
        self.entries.update(new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            merged = _read(self.path)
            merged.update(new)
            self.entries = {**merged, **self.entries}
            doc = {"version": VERSION, "backend": self.backend, "entries": merged}
            atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ measuring
    def measure(self, graphs: Mapping[Hashable, Graph]) -> dict[Hashable, float]:
        """key -> median seconds; only workloads missing from the cache are timed (interleaved, one
        run per distinct workload), and the cache file is updated."""
        self.reload()
        wkeys = {k: self.key(g) for k, g in graphs.items()}
        todo: dict[str, Graph] = {}
        for k, wk in wkeys.items():
            if wk in self.entries:
                self.hits += 1
            elif wk not in todo:
                todo[wk] = graphs[k]
        if todo:
            timed = self.measure_fn(todo, self.backend)
            now = time.time()
            self.misses += len(todo)
            self.record({wk: {"seconds": float(timed[wk]), "workload": workload_text(g), "target": self.target,
                              "time": now} for wk, g in todo.items()})
        return {k: float(self.entries[wk]["seconds"]) for k, wk in wkeys.items()}

    @property
    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries)}


def _read(path: Path) -> dict[str, dict]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError):  # a damaged cache is only lost time: start afresh
        return {}
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), dict):
        return {}
    return {k: v for k, v in doc["entries"].items() if isinstance(v, dict) and "seconds" in v}


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An advisory exclusive lock (POSIX ``flock``) around read-merge-replace; where flock is not
    available the merge still runs, only the window between re-read and replace is unguarded."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
