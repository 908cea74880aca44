"""The ``onnxruntime`` backend: the IR exported to standard ONNX, run by onnxruntime (CPU EP).

Also :func:`run_onnx_file`, which runs a user's ORIGINAL ONNX file — the reference
that ONNX-sourced artifacts are verified against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from qcompile.backends.base import Backend, Runner
from qcompile.ir.graph import Graph


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no busy-waiting between runs: spinning workers steal the cores from whatever runs next
    # (another backend in an interleaved benchmark, the rest of a pipeline)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtRunner(Runner):
    def __init__(self, model: bytes | str | Path, threads: int | None = None):
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {n: np.ascontiguousarray(inputs[n]) for n in self.input_names})


_FILE_RUNNERS: dict[str, OrtRunner] = {}


def run_onnx_file(path: str | Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX file as-is (dynamic dims allowed) with onnxruntime; sessions are reused per path."""
    key = str(Path(path).resolve())
    if key not in _FILE_RUNNERS:
        _FILE_RUNNERS[key] = OrtRunner(key)
    return _FILE_RUNNERS[key].run(inputs)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = "onnxruntime CPU execution provider; artifact model.onnx"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        from qcompile.frontends.onnx_export import save_onnx

        save_onnx(graph, Path(out_dir) / "model.onnx")
        return ["model.onnx"]

    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        return OrtRunner(Path(out_dir) / "model.onnx", self.threads)

    def runner(self, graph: Graph) -> Runner:
        from qcompile.frontends.onnx_export import to_onnx

        return OrtRunner(to_onnx(graph).SerializeToString(), self.threads)

    def versions(self) -> dict[str, str]:
        import onnx

        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
