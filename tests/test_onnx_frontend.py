"""ONNX frontend + exporter: op coverage vs onnxruntime, shape specialisation and folding,
named errors, determinism, metadata round-trip, the real third-party model.

fp32 tolerance: |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref| (see compiler.FP32_*).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompile.errors import ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.frontends.onnx_export import to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.ir import verify
from qcompile.passes.manager import run_reference, within_fp32_tolerance

RTOL, ATOL_REL = 1e-4, 1e-5
RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.3


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = {vi.name: vi.type for vi in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:  # outputs were declared without shapes: take them from shape inference
        if not o.type.tensor_type.HasField("shape") and o.name in inferred:
            o.type.CopyFrom(inferred[o.name])
    onnx.checker.check_model(m)
    return m


def _inp(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _out(name, shape=None):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def check(tmp_path, model, shapes, n_feeds=2):
    """IR (torch reference) and exported ONNX (onnxruntime) both match onnxruntime on the original."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    g = load_onnx(path, shapes)
    verify(g)
    sess = ort.InferenceSession(str(path))
    exported = ort.InferenceSession(to_onnx(g).SerializeToString())
    for _ in range(n_feeds):
        feed = {k: RNG.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        ref = sess.run(None, feed)
        ours = [o[0] for o in run_reference(g, [feed])]
        assert within_fp32_tolerance(ours, ref, RTOL, ATOL_REL), [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
        assert within_fp32_tolerance(exported.run(None, feed), ref, RTOL, ATOL_REL)
    return g


@pytest.mark.parametrize("conv_attrs", [
    dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[0, 1, 2, 1]), dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(group=4, pads=[1, 1, 1, 1]), dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER"), dict(auto_pad="VALID"),
])
def test_conv_variants(tmp_path, conv_attrs):
    group = conv_attrs.get("group", 1)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **conv_attrs)],
               [_inp("x", [1, 8, 11, 10])], [_out("y")], {"w": _w(8, 8 // group, 3, 3), "b": _w(8)})
    g = check(tmp_path, m, {"x": (1, 8, 11, 10)})
    assert g.op_counts() == {"conv2d": 1}


@pytest.mark.parametrize("attrs", [dict(), dict(transB=1), dict(transA=1, alpha=0.5, beta=2.0)])
def test_gemm_variants(tmp_path, attrs):
    a_shape = [6, 2] if attrs.get("transA") else [2, 6]
    b = _w(4, 6) if attrs.get("transB") else _w(6, 4)
    m = _model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", **attrs)],
               [_inp("a", a_shape)], [_out("y")], {"b": b, "c": _w(4)})
    g = check(tmp_path, m, {"a": tuple(a_shape)})
    assert g.op_counts().get("linear") == 1


def test_pools_activations_and_friends(tmp_path):
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "bb", "mu", "var"], ["bn"], name="bn", epsilon=1e-3),
        helper.make_node("HardSigmoid", ["bn"], ["hs"], name="hs", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["bn", "hs"], ["m"], name="mul"),
        helper.make_node("Clip", ["m", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("HardSwish", ["c"], ["hw"], name="hswish"),
        helper.make_node("MaxPool", ["hw"], ["mp"], name="mp", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], ceil_mode=1),
        helper.make_node("AveragePool", ["hw"], ["ap"], name="ap", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=0, ceil_mode=1),
        helper.make_node("AveragePool", ["hw"], ["ap2"], name="ap2", kernel_shape=[2, 2], strides=[2, 2],
                         pads=[0, 0, 1, 1], count_include_pad=1),
        helper.make_node("Concat", ["mp", "ap"], ["cat"], name="cat", axis=1),
        helper.make_node("ReduceMean", ["cat"], ["rm"], name="rm", axes=[2, 3], keepdims=1),
        helper.make_node("GlobalAveragePool", ["ap2"], ["gap"], name="gap"),
        helper.make_node("Sigmoid", ["rm"], ["sg"], name="sg"),
        helper.make_node("LeakyRelu", ["gap"], ["lr"], name="lr", alpha=0.1),
        helper.make_node("Flatten", ["sg"], ["f"], name="flat"),
        helper.make_node("Softmax", ["f"], ["sm"], name="sm", axis=1),
        helper.make_node("Tanh", ["lr"], ["th"], name="th"),
    ]
    inits = {"s": np.abs(_w(4)) + 0.5, "bb": _w(4), "mu": _w(4), "var": np.abs(_w(4)) + 0.5,
             "lo": np.array(-1.0, np.float32), "hi": np.array(2.0, np.float32)}
    m = _model(nodes, [_inp("x", [1, 4, 9, 8])], [_out("sm", [1, 8]), _out("th", [1, 4, 1, 1])], inits)
    g = check(tmp_path, m, {"x": (1, 4, 9, 8)})
    assert g.op_counts()["avg_pool2d"] == 2


def test_shape_subgraph_folds_after_specialisation(tmp_path):
    """Shape -> Gather -> Concat -> Reshape with a dynamic batch, as PyTorch/Paddle exporters write it."""
    m = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 3, 3] x) => (float[N, 10] y) {
            s = Shape(x)
            i0 = Constant <value = int64[1] {0}> ()
            n = Gather <axis = 0> (s, i0)
            m1 = Constant <value = int64[1] {-1}> ()
            shp = Concat <axis = 0> (n, m1)
            f = Reshape(x, shp)
            w = Constant <value = float[36, 10] {""" + ",".join(["0.01"] * 360) + """}> ()
            y = MatMul(f, w)
        }""")
    with pytest.raises(ShapeError, match=r"input 'x' has dynamic dimension.*--input-shape x=1x4x3x3"):
        onnx.save(m, tmp_path / "dyn.onnx")
        load_onnx(tmp_path / "dyn.onnx")
    g = check(tmp_path, m, {"x": (2, 4, 3, 3)})
    assert g.op_counts() == {"reshape": 1, "linear": 1}
    assert g.types[g.outputs[0]].shape == (2, 10)


def test_input_shape_errors(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_inp("x", [1, 3, "H", "W"])], [_out("y")], {})
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ShapeError, match="dimension 1 is fixed to 3"):
        load_onnx(tmp_path / "m.onnx", {"x": (1, 4, 8, 8)})
    with pytest.raises(ShapeError, match="rank 4"):
        load_onnx(tmp_path / "m.onnx", {"x": (1, 3, 8)})
    with pytest.raises(ShapeError, match=r"model's inputs are \['x'\]"):
        load_onnx(tmp_path / "m.onnx", {"image": (1, 3, 8, 8)})
    g = load_onnx(tmp_path / "m.onnx", {"x": (1, 3, 5, 7)})
    assert g.meta["input_shapes"] == {"x": [1, 3, 5, 7]}


def test_corrupt_truncated_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx' does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not a protobuf at all \x00\x01")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        load_onnx(bad)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [_inp("x", [1, 3, 8, 8])], [_out("y")],
               {"w": _w(16, 3, 3, 3)})
    data = m.SerializeToString()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="trunc.onnx"):
        load_onnx(trunc)


def test_external_data_escaping_folder_is_refused(tmp_path):
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [_inp("x", [1, 3, 8, 8])], [_out("y")],
               {"w": _w(16, 3, 3, 3)})
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    (tmp_path / "sub").mkdir()
    onnx.save(m, tmp_path / "sub" / "m.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_onnx(tmp_path / "sub" / "m.onnx")


def test_unsupported_ops_are_named(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu1"),
                helper.make_node("ConvTranspose", ["r", "w"], ["y"], name="upsample_3")],
               [_inp("x", [1, 3, 8, 8])], [_out("y")], {"w": _w(3, 3, 2, 2)})
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(tmp_path / "m.onnx")
    assert e.value.op_type == "ConvTranspose" and e.value.node_name == "upsample_3"
    assert "not supported yet" in str(e.value)
    m2 = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.microsoft")], "t",
                          [_inp("x", [1, 3])], [_out("y", [1, 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(m2, tmp_path / "ms.onnx")
    with pytest.raises(UnsupportedOpError, match="com.microsoft::Relu"):
        load_onnx(tmp_path / "ms.onnx")


def test_export_is_deterministic_and_keeps_metadata(tmp_path):
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["c"], ["y"], name="relu")],
               [_inp("x", [1, 3, 8, 8])], [_out("y")], {"w": _w(4, 3, 3, 3), "b": _w(4)})
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    g = load_onnx(path)
    g.node("conv").add_provenance(**{"pass": "unit-test", "rank": 2})
    g.meta["note"] = "kept"
    a, b = to_onnx(g).SerializeToString(deterministic=True), to_onnx(g).SerializeToString(deterministic=True)
    assert a == b
    onnx.checker.check_model(to_onnx(g), full_check=True)
    (tmp_path / "rt.onnx").write_bytes(a)
    g2 = load_onnx(tmp_path / "rt.onnx")
    assert g2.node("conv").meta["provenance"] == [{"pass": "unit-test", "rank": 2}]
    assert g2.meta["note"] == "kept"


def test_opset_11_model_is_upgraded(tmp_path):
    m = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")], [_inp("x", [2, 3])], [_out("y")],
               {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}, opset=11)
    g = check(tmp_path, m, {"x": (2, 3)})
    assert g.meta["source"]["opset"] == 11 and g.op_counts() == {"clip": 1}


@pytest.mark.network
def test_real_pretrained_rapidocr_classifier(tmp_path, rapidocr_models):
    """A third-party PaddleOCR MobileNetV3 classifier (opset 11, dynamic dims, Shape->Reshape subgraph)."""
    path = rapidocr_models["ch_ppocr_mobile_v2.0_cls_infer.onnx"]
    g = load_onnx(path, {"x": (1, 3, 48, 192)})
    verify(g)
    counts = g.op_counts()
    assert counts["conv2d"] == 53 and counts["hardsigmoid"] == 9 and counts["batch_norm"] == 35
    sess = ort.InferenceSession(str(path))
    exported = ort.InferenceSession(to_onnx(g).SerializeToString())
    rng = np.random.default_rng(3)
    for _ in range(2):
        x = rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
        ref = sess.run(None, {"x": x})
        assert within_fp32_tolerance(run_reference(g, [{"x": x}])[0], [ref[0][None]][0], RTOL, ATOL_REL)
        assert within_fp32_tolerance(exported.run(None, {"x": x}), ref, RTOL, ATOL_REL)
