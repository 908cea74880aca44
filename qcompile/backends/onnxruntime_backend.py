"""The ``onnxruntime`` backend: the IR exported to standard ONNX, run by onnxruntime (CPU EP).

Artifact: ``model.onnx`` (written by :func:`~qcompile.frontends.onnx_export.save_onnx`).
Sessions use ``ORT_ENABLE_ALL`` graph optimizations and ``intra_op_num_threads``
threads (default: ``os.cpu_count()``).

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
from qcompile.errors import InputError, ModelLoadError
from qcompile.ir.graph import Graph


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (default all cores), full graph optimization."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class OrtRunner(Runner):
    """An onnxruntime CPU session over a serialized model (bytes) or a model file (path)."""

    def __init__(self, model: bytes | str | Path, threads: int | None = None):
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"missing model input(s) {missing}; the model's inputs are {self.input_names}")
        return self.session.run(None, {n: np.ascontiguousarray(inputs[n]) for n in self.input_names})


_FILE_RUNNERS: dict[tuple[str, int, int], OrtRunner] = {}


def run_onnx_file(path: str | Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the ONNX file at ``path`` as-is (dynamic dims allowed) with onnxruntime on the CPU and
    return its outputs in graph order.  Sessions are reused while the file is unchanged (same
    resolved path, size and modification time).  A file onnxruntime cannot load is a
    ModelLoadError naming it."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ModelLoadError(f"ONNX file '{path}' cannot be read: {e}") from e
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_RUNNERS:
        try:
            runner = OrtRunner(p)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load '{path}': {str(e).strip()[:500]}") from e
        for stale in [k for k in _FILE_RUNNERS if k[0] == key[0]]:
            del _FILE_RUNNERS[stale]
        _FILE_RUNNERS[key] = runner
    return _FILE_RUNNERS[key].run(inputs)


class OnnxRuntimeBackend(Backend):
    """IR -> ``model.onnx`` -> onnxruntime CPU session."""

    name = "onnxruntime"
    description = "onnxruntime CPU execution provider; artifact model.onnx"

    def __init__(self, intra_op_num_threads: int | None = None):
        self.intra_op_num_threads = intra_op_num_threads

    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        """Write ``out_dir/model.onnx`` (checker-valid, deterministic bytes)."""
        from qcompile.frontends.onnx_export import save_onnx

        save_onnx(graph, Path(out_dir) / "model.onnx")
        return ["model.onnx"]

    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        return OrtRunner(Path(out_dir) / "model.onnx", self.intra_op_num_threads)

    def runner(self, graph: Graph) -> Runner:
        from qcompile.frontends.onnx_export import to_onnx

        model = to_onnx(graph).SerializeToString(deterministic=True)
        return OrtRunner(model, self.intra_op_num_threads)

    def versions(self) -> dict[str, str]:
        import onnx

        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
