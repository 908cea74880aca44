"""The onnxruntime backend (build / load / in-memory runner / options) and run_onnx_file, the
runner for a user's ORIGINAL ONNX file.

Numerics: onnxruntime vs the torch reference interpreter, with the project's fp32 tolerance
|y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref| (``compiler.FP32_ATOL_REL``, ``compiler.FP32_RTOL``).
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompile.backends.base import Backend
from qcompile.backends.onnxruntime_backend import OnnxRuntimeBackend, run_onnx_file
from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL
from qcompile.errors import InputError, ModelLoadError
from qcompile.ir import Graph, TensorType
from qcompile.passes.manager import run_reference, within_fp32_tolerance


def small_cnn(seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("small_cnn")
    x = g.add_input("x", TensorType((2, 3, 8, 8)))
    w = g.add_constant("conv.w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3)
    h = g.append(g.make_node("conv2d", [x, w], {"pads": (1, 1, 1, 1)}, name="conv")).outputs[0]
    h = g.append(g.make_node("relu", [h], name="relu")).outputs[0]
    h = g.append(g.make_node("global_avg_pool", [h], name="gap")).outputs[0]
    h = g.append(g.make_node("flatten", [h], name="flat")).outputs[0]
    fw = g.add_constant("fc.w", rng.standard_normal((5, 4)).astype(np.float32))
    g.outputs = [g.append(g.make_node("linear", [h, fw], name="fc")).outputs[0]]
    return g


def _feed(seed: int = 1, shape=(2, 3, 8, 8)):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_build_load_and_runner_match_reference(tmp_path):
    g = small_cnn()
    backend = OnnxRuntimeBackend()
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    files = backend.build(g, tmp_path)
    assert files == ["model.onnx"]
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    loaded = backend.load(tmp_path, {"files": files})
    in_memory = backend.runner(g)
    assert loaded.input_names == in_memory.input_names == ["x"] and loaded.output_names == g.outputs
    feed = _feed()
    ref = [o[0] for o in run_reference(g, [feed])]
    for runner in (loaded, in_memory):
        assert within_fp32_tolerance(runner.run(feed), ref, FP32_RTOL, FP32_ATOL_REL)
    first = (tmp_path / "model.onnx").read_bytes()
    backend.build(g, tmp_path)
    assert (tmp_path / "model.onnx").read_bytes() == first  # deterministic artifact


def test_options_and_versions():
    default = OnnxRuntimeBackend().runner(small_cnn())
    assert default.session.get_session_options().intra_op_num_threads == os.cpu_count()
    two = OnnxRuntimeBackend(intra_op_num_threads=2).runner(small_cnn())
    opts = two.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert OnnxRuntimeBackend().versions() == {"onnxruntime": ort.__version__, "onnx": onnx.__version__}


def test_missing_input_is_named():
    with pytest.raises(InputError, match=r"missing model input\(s\) \['x'\]"):
        OnnxRuntimeBackend().runner(small_cnn()).run({"image": np.zeros((2, 3, 8, 8), np.float32)})


def _dynamic_model(out_channels: int) -> onnx.ModelProto:
    """Conv with a dynamic batch dimension, as user files often have."""
    w = np.random.default_rng(out_channels).standard_normal((out_channels, 3, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "dyn",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", out_channels, 4, 4])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_run_onnx_file_runs_the_original_and_notices_changes(tmp_path):
    path = tmp_path / "user.onnx"
    onnx.save(_dynamic_model(2), path)
    for batch in (1, 3):  # dynamic dims are fine: the file runs as-is
        (y,) = run_onnx_file(path, _feed(shape=(batch, 3, 4, 4)))
        assert y.shape == (batch, 2, 4, 4)
    onnx.save(_dynamic_model(5), path)  # rewritten in place: a new session is made
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    (y,) = run_onnx_file(path, _feed(shape=(1, 3, 4, 4)))
    assert y.shape == (1, 5, 4, 4)


def test_run_onnx_file_errors_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="absent.onnx"):
        run_onnx_file(tmp_path / "absent.onnx", _feed())
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"definitely not onnx")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load .*garbage.onnx"):
        run_onnx_file(bad, _feed())
