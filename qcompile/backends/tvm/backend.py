"""The TVM backends: ``tvm-x86`` (host) and ``tvm-arm64`` (cross-compiled, run over TVM RPC).

Artifact: ``model.so`` — a shared library holding the Relax VM executable and all
kernels with the weights embedded; a board needs only the TVM runtime to load it.
For arm64 the library is linked with ``aarch64-linux-gnu-g++`` and executed on a
remote device reached through TVM RPC: ``QCOMPILE_RPC=host:port`` (a server) or
``QCOMPILE_RPC_TRACKER=host:port`` plus ``QCOMPILE_RPC_KEY`` (a tracker with a fleet
of boards; :mod:`qcompile.backends.tvm.remote`).  The same code drives a physical board or the
emulated one (``python -m qcompile.board``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qcompile.backends.base import Backend, Runner
from qcompile.backends.tvm.remote import RemoteTvmRunner
from qcompile.ir.graph import Graph

ARTIFACT = "model.so"


def set_threads(n: int | None = None) -> None:
    """Ask for ``n`` runtime threads (see the package docstring: the pool reads
    ``TVM_NUM_THREADS`` when it starts; an already running pool is resized)."""
    import tvm

    if n is None or str(n) == os.environ.get("TVM_NUM_THREADS"):
        return
    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def _outputs(obj) -> list[np.ndarray]:
    if hasattr(obj, "numpy"):
        return [obj.numpy()]
    return [o.numpy() for o in obj]


class LocalTvmRunner(Runner):
    def __init__(self, lib, graph_inputs: list[str], graph_outputs: list[str], threads: int | None = None):
        import tvm
        from tvm import relax

        set_threads(threads)
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(lib, self.device)
        self.input_names = graph_inputs
        self.output_names = graph_outputs

    def tensors(self, inputs: Mapping[str, np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.device) for n in self.input_names]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return _outputs(self.vm["main"](*self.tensors(inputs)))

    def time(self, inputs: Mapping[str, np.ndarray], number: int = 10, repeat: int = 5) -> list[float]:
        """Per-run seconds (``repeat`` medians of ``number`` calls), measured by TVM's evaluator."""
        f = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
        return list(f(*self.tensors(inputs)).results)


class TvmBackend(Backend):
    """Apache TVM (Relax) for a CPU target; ``target_name``: x86 | arm64 | arm64-dotprod."""

    def __init__(self, target_name: str = "x86", threads: int | None = None):
        from qcompile.backends.tvm.lowering import resolve

        self.cpu = resolve(target_name)
        self.name = f"tvm-{target_name}"
        self.threads = threads

    def compile(self, graph: Graph, tune_trials: int = 0):
        """Executable for ``graph``; ``tune_trials > 0`` tunes kernels with MetaSchedule first (database in
        the cache folder: layers tuned before cost nothing)."""
        import sys

        from qcompile.backends.tvm.lowering import build

        return build(graph, self.cpu, tune_trials, log=lambda msg: print(msg, file=sys.stderr, flush=True))

    def export(self, executable, path: Path) -> None:
        if self.cpu.cross_cc:
            from tvm.support import cc

            executable.export_library(str(path), fcompile=cc.cross_compiler(self.cpu.cross_cc))
        else:
            executable.export_library(str(path))

    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        options = options or {}
        if options.get("mcpu"):
            from qcompile.backends.tvm.lowering import resolve

            self.cpu = resolve(self.name.removeprefix("tvm-"), options["mcpu"])
        tune_trials = int(options.get("tune_trials", 0))
        self.export(self.compile(graph, tune_trials), Path(out_dir) / ARTIFACT)
        return [ARTIFACT]

    def _io(self, manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        ins = [i["name"] if isinstance(i, dict) else i for i in manifest.get("inputs", [])]
        outs = [o["name"] if isinstance(o, dict) else o for o in manifest.get("outputs", [])]
        return ins, outs

    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        ins, outs = self._io(manifest)
        path = Path(out_dir) / ARTIFACT
        if self.cpu.remote:
            return RemoteTvmRunner(path, ins, outs)
        import tvm

        return LocalTvmRunner(tvm.runtime.load_module(str(path)), ins, outs, self.threads)

    def export_for_remote(self, graph: Graph) -> Path:
        """Compile ``graph`` and export the library into a fresh temporary folder (to upload)."""
        tmp = Path(tempfile.mkdtemp(prefix="qcompile-tvm-"))
        self.export(self.compile(graph), tmp / ARTIFACT)
        return tmp / ARTIFACT

    def runner(self, graph: Graph) -> Runner:
        if self.cpu.remote:
            return RemoteTvmRunner(self.export_for_remote(graph), list(graph.inputs), list(graph.outputs))
        return LocalTvmRunner(self.compile(graph), list(graph.inputs), list(graph.outputs), self.threads)

    def versions(self) -> dict[str, str]:
        import tvm

        return {"tvm": tvm.__version__, "tvm_target": self.cpu.description}


def profile_kernels(runner: LocalTvmRunner, inputs: Mapping[str, np.ndarray], runs: int = 5) -> list[tuple[str, float]]:
    """Median milliseconds per VM call (kernel), in call order, via the VM's instrument hook."""
    import time

    import tvm

    stamps: dict[str, list[float]] = {}
    order: list[str] = []
    state: dict[str, float] = {}

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            state[name] = time.perf_counter()
        else:
            stamps.setdefault(name, []).append(time.perf_counter() - state.pop(name, time.perf_counter()))
            if name not in order:
                order.append(name)
        return 0

    runner.vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    args = runner.tensors(inputs)
    try:
        for _ in range(runs):
            runner.vm["main"](*args)
    finally:
        runner.vm.set_instrument(None)
    calls_per_run = {n: len(v) // runs for n, v in stamps.items()}
    return [(n, 1e3 * float(np.median(stamps[n])) * max(calls_per_run[n], 1)) for n in order]
