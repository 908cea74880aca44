"""ONNX frontend: op coverage against onnxruntime, shape specialisation and folding, names and
metadata, named errors, and a real third-party model.

Numerics.  Each model goes ONNX -> ``load_onnx`` -> IR and is checked twice on random inputs:

* ``to_onnx(IR)`` run by onnxruntime vs onnxruntime on the ORIGINAL file:
  |y - y_ref| <= ATOL_REL * max|y_ref| + RTOL * |y_ref| with RTOL = ATOL_REL = 1e-5
  (same engine on an equivalent graph: only fp32 reassociation differs);
* the IR run by the torch reference interpreter vs the same: the project's fp32 tolerance
  (``compiler.FP32_RTOL`` = 1e-4, ``compiler.FP32_ATOL_REL`` = 1e-5 of max|y_ref|).

Every imported graph passes ``qcompile.ir.verify``.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL
from qcompile.errors import ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.frontends.onnx_export import to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.ir import verify
from qcompile.passes.manager import run_reference, within_fp32_tolerance

ORT_RTOL, ORT_ATOL_REL = 1e-5, 1e-5
RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.3


def _model(nodes, inputs, outputs, inits, opset=17):
    """A checked ONNX model; outputs declared without a shape get it from shape inference."""
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = {vi.name: vi.type for vi in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        if not o.type.tensor_type.HasField("shape") and o.name in inferred:
            o.type.CopyFrom(inferred[o.name])
    onnx.checker.check_model(m, full_check=True)
    return m


def _inp(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _out(name, shape=None):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def check(tmp_path, model, shapes, n_feeds=2):
    """load_onnx -> to_onnx -> onnxruntime, and the IR on the torch reference, both match
    onnxruntime on the original model (tolerances: module docstring)."""
    path = _save(tmp_path, model)
    g = load_onnx(path, shapes)
    verify(g)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(n_feeds):
        feed = {k: RNG.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        ref = original.run(None, feed)
        ours = exported.run(None, feed)
        assert within_fp32_tolerance(ours, ref, ORT_RTOL, ORT_ATOL_REL), \
            [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
        interp = [o[0] for o in run_reference(g, [feed])]
        assert within_fp32_tolerance(interp, ref, FP32_RTOL, FP32_ATOL_REL), \
            [float(np.abs(a - b).max()) for a, b in zip(interp, ref)]
    return g


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("conv_attrs", [
    dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[0, 1, 2, 1]), dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(group=4, pads=[1, 1, 1, 1]), dict(group=8, strides=[1, 2], dilations=[2, 1], pads=[0, 2, 1, 0]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(auto_pad="SAME_LOWER", strides=[2, 3]),
    dict(auto_pad="VALID"),
])
def test_conv_variants(tmp_path, conv_attrs):
    group = conv_attrs.get("group", 1)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **conv_attrs)],
               [_inp("x", [1, 8, 11, 10])], [_out("y")], {"w": _w(8, 8 // group, 3, 3), "b": _w(8)})
    g = check(tmp_path, m, {"x": (1, 8, 11, 10)})
    assert g.op_counts() == {"conv2d": 1}
    if conv_attrs.get("auto_pad") == "SAME_LOWER":  # odd total padding goes to the beginning
        assert g.node("conv").attrs["pads"] == (1, 1, 1, 1)


@pytest.mark.parametrize("attrs,c_shape", [
    (dict(), (4,)), (dict(transB=1), (1, 4)), (dict(transA=1, alpha=0.5, beta=2.0), (4,)),
    (dict(beta=0.5), (2, 4)), (dict(alpha=2.0), ()), (dict(), None),
])
def test_gemm_constant_b_becomes_linear(tmp_path, attrs, c_shape):
    a_shape = [6, 2] if attrs.get("transA") else [2, 6]
    b = _w(4, 6) if attrs.get("transB") else _w(6, 4)
    inits = {"b": b}
    ins = ["a", "b"]
    if c_shape is not None:
        inits["c"] = _w(*c_shape) if c_shape else np.array(0.7, np.float32)
        ins.append("c")
    m = _model([helper.make_node("Gemm", ins, ["y"], name="fc", **attrs)], [_inp("a", a_shape)], [_out("y")], inits)
    g = check(tmp_path, m, {"a": tuple(a_shape)})
    counts = g.op_counts()
    assert counts["linear"] == 1
    assert ("add" in counts) == (c_shape == (2, 4))  # a full (M, N) C is not a bias


def test_gemm_and_matmul_with_activation_operands(tmp_path):
    nodes = [helper.make_node("Gemm", ["a", "bt"], ["g"], name="gemm", transB=1, alpha=0.5),
             helper.make_node("Gemm", ["a", "b2", "c"], ["g2"], name="gemm2", beta=3.0),
             helper.make_node("MatMul", ["x3", "w"], ["mm"], name="mm_const"),
             helper.make_node("MatMul", ["x3", "y3"], ["mm2"], name="mm_act")]
    m = _model(nodes, [_inp("a", [2, 6]), _inp("bt", [4, 6]), _inp("b2", [6, 4]), _inp("c", [2, 4]),
                       _inp("x3", [2, 3, 5]), _inp("y3", [2, 5, 7])],
               [_out("g"), _out("g2"), _out("mm"), _out("mm2")], {"w": _w(5, 7)})
    g = check(tmp_path, m, {"a": (2, 6), "bt": (4, 6), "b2": (6, 4), "c": (2, 4), "x3": (2, 3, 5), "y3": (2, 5, 7)})
    assert g.node("mm_const").op == "linear" and g.node("mm_act").op == "matmul"
    assert g.outputs == ["g", "g2", "mm", "mm2"]


def test_pools_bn_activations_concat_reduce_softmax(tmp_path):
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
    assert g.op_counts()["avg_pool2d"] == 2 and g.op_counts()["batch_norm"] == 1
    assert g.node("clip").attrs["min"] == -1.0 and g.node("clip").attrs["max"] == 2.0
    assert g.node("mp").attrs["ceil_mode"] == 1


def test_elementwise_and_layout_ops(tmp_path):
    nodes = [
        helper.make_node("Abs", ["x"], ["ab"], name="abs"),
        helper.make_node("Sqrt", ["ab"], ["sq"], name="sqrt"),
        helper.make_node("Add", ["sq", "one"], ["sq1"], name="add1"),
        helper.make_node("Reciprocal", ["sq1"], ["rc"], name="recip"),
        helper.make_node("Neg", ["rc"], ["ng"], name="neg"),
        helper.make_node("Exp", ["ng"], ["ex"], name="exp"),
        helper.make_node("Erf", ["x"], ["er"], name="erf"),
        helper.make_node("Sub", ["ex", "er"], ["sb"], name="sub"),
        helper.make_node("Div", ["sb", "two"], ["dv"], name="div"),
        helper.make_node("Pow", ["sq1", "two"], ["pw"], name="pow"),
        helper.make_node("Max", ["dv", "pw", "x"], ["mx"], name="max3"),
        helper.make_node("Min", ["dv", "pw"], ["mn"], name="min"),
        helper.make_node("Sum", ["mx", "mn", "x"], ["sm"], name="sum3"),
        helper.make_node("Identity", ["sm"], ["id"], name="ident"),
        helper.make_node("Dropout", ["id"], ["dr"], name="drop"),
        helper.make_node("Transpose", ["dr"], ["tr"], name="tr", perm=[0, 2, 3, 1]),
        helper.make_node("Unsqueeze", ["tr", "ax0"], ["us"], name="unsq"),
        helper.make_node("Squeeze", ["us", "ax0"], ["sqz"], name="sqz"),
        helper.make_node("GlobalMaxPool", ["x"], ["gmp"], name="gmp"),
        helper.make_node("Squeeze", ["gmp"], ["gsq"], name="sqz_all"),
    ]
    inits = {"one": np.array(1.0, np.float32), "two": np.array([2.0], np.float32), "ax0": np.array([0], np.int64)}
    m = _model(nodes, [_inp("x", [1, 3, 4, 5])], [_out("sqz"), _out("gsq")], inits)
    g = check(tmp_path, m, {"x": (1, 3, 4, 5)})
    counts = g.op_counts()
    assert counts["max"] == 2 and counts["add"] == 3  # Max of 3 and Sum of 3 become chains (+ add1)
    assert "identity" not in counts  # Identity / Dropout are rewired away
    assert g.types["gsq"].shape == (3,)


def test_opset18_reduce_mean_axes_input_and_opset20_gelu(tmp_path):
    m18 = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm", keepdims=0)],
                 [_inp("x", [2, 3, 4])], [_out("y")], {"axes": np.array([-1, 1], np.int64)}, opset=18)
    g = check(tmp_path, m18, {"x": (2, 3, 4)})
    assert g.node("rm").attrs["axes"] == (2, 1) and g.types["y"].shape == (2,)
    m20 = _model([helper.make_node("Gelu", ["x"], ["a"], name="gelu"),
                  helper.make_node("Gelu", ["x"], ["b"], name="gelu_tanh", approximate="tanh")],
                 [_inp("x", [2, 8])], [_out("a"), _out("b")], {}, opset=20)
    g = check(tmp_path, m20, {"x": (2, 8)})
    assert g.node("gelu_tanh").attrs["approximate"] == "tanh"


SHAPE_SUBGRAPH = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 3, 3] x) => (float[N, 10] y) {
        s = Shape(x)
        %s
        m1 = Constant <value = int64[1] {-1}> ()
        shp = Concat <axis = 0> (n, m1)
        f = Reshape(x, shp)
        w = Constant <value = float[36, 10] {%s}> ()
        y = MatMul(f, w)
    }"""
GATHER = "i0 = Constant <value = int64[1] {0}> ()\n n = Gather <axis = 0> (s, i0)"
SLICE = ("st = Constant <value = int64[1] {0}> ()\n en = Constant <value = int64[1] {1}> ()\n"
         " n = Slice(s, st, en)")


@pytest.mark.parametrize("pick", [GATHER, SLICE], ids=["gather", "slice"])
def test_shape_subgraph_folds_after_specialisation(tmp_path, pick):
    """Shape -> Gather/Slice -> Concat -> Reshape with a dynamic batch, as PyTorch/Paddle exporters write it."""
    weights = ",".join(f"{v:.3f}" for v in RNG.standard_normal(360) * 0.1)
    m = onnx.parser.parse_model(SHAPE_SUBGRAPH % (pick, weights))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, tmp_path / "dyn.onnx")
    with pytest.raises(ShapeError, match=r"input 'x' has dynamic dimension.*'N'.*--input-shape x=1x4x3x3"):
        load_onnx(tmp_path / "dyn.onnx")
    g = check(tmp_path, m, {"x": (3, 4, 3, 3)})
    assert g.op_counts() == {"reshape": 1, "linear": 1}
    (reshape,) = [n for n in g.nodes if n.op == "reshape"]
    assert reshape.attrs["shape"] == (3, 36) and reshape.name.startswith("Reshape_")  # unnamed: <OpType>_<index>
    assert g.types["y"].shape == (3, 10) and g.meta["input_shapes"] == {"x": [3, 4, 3, 3]}


def test_opset_11_model_is_upgraded(tmp_path):
    m = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
                helper.make_node("Softmax", ["c"], ["y"], name="sm")], [_inp("x", [2, 3, 4])], [_out("y")],
               {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}, opset=11)
    g = check(tmp_path, m, {"x": (2, 3, 4)})
    assert g.meta["source"]["opset"] == 11
    assert g.op_counts()["clip"] == 1 and g.op_counts()["softmax"] == 1


# ---------------------------------------------------------------------------- names, metadata
def test_names_graph_meta_and_initializer_inputs(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),                       # unnamed
             helper.make_node("Relu", ["c"], ["r"], name="dup"),
             helper.make_node("Relu", ["r"], ["r2"], name="dup"),                # duplicate name
             helper.make_node("Identity", ["r2"], ["out"], name="to_output")]  # output via Identity
    g_proto = helper.make_graph(nodes, "my_net", [_inp("x", [1, 3, 6, 6]), _inp("w", [4, 3, 3, 3])],
                                [_out("out", [1, 4, 4, 4])], [numpy_helper.from_array(_w(4, 3, 3, 3), "w")])
    m = helper.make_model(g_proto, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                          producer_name="unit", producer_version="1.0")
    path = _save(tmp_path, m)
    g = load_onnx(path)
    verify(g)
    assert g.name == "my_net"
    assert g.inputs == ["x"] and "w" in g.constants  # initializer listed as input is a constant
    assert [n.name for n in g.nodes] == ["Conv_0", "dup", "dup_1"]
    assert g.outputs == ["out"]  # the ONNX output name survives Identity elimination
    assert g.meta["source"] == {"format": "onnx", "path": str(path), "opset": 17, "producer": "unit 1.0"}


def test_node_and_graph_meta_are_restored(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_inp("x", [1, 3])], [_out("y")], {})
    helper.set_metadata_props(m.graph.node[0], {"qcompile.meta": '{"provenance": [{"pass": "p"}]}'})
    helper.set_model_props(m, {"qcompile.graph_meta": '{"note": 1, "source": {"format": "torch"}}'})
    g = load_onnx(_save(tmp_path, m))
    assert g.node("r").meta == {"provenance": [{"pass": "p"}]}
    assert g.meta["note"] == 1 and g.meta["source"]["format"] == "onnx"  # new source info wins


# ---------------------------------------------------------------------------- errors
def test_input_shape_errors(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_inp("x", [1, 3, "H", "W"])], [_out("y")], {})
    path = _save(tmp_path, m)
    with pytest.raises(ShapeError, match=r"input 'x' has dynamic dimension\(s\) 2 \('H'\), 3 \('W'\).*"
                                         r"--input-shape x=1x3xHxW"):
        load_onnx(path)
    with pytest.raises(ShapeError, match="input 'x' dimension 1 is fixed to 3"):
        load_onnx(path, {"x": (1, 4, 8, 8)})
    with pytest.raises(ShapeError, match="input 'x' has rank 4"):
        load_onnx(path, {"x": (1, 3, 8)})
    with pytest.raises(ShapeError, match=r"given for \['image'\], but the model's inputs are \['x'\]"):
        load_onnx(path, {"image": (1, 3, 8, 8)})
    g = load_onnx(path, {"x": (1, 3, 5, 7)})
    assert g.meta["input_shapes"] == {"x": [1, 3, 5, 7]} and g.types["y"].shape == (1, 3, 5, 7)


def test_given_shape_inconsistent_with_model_is_a_shape_error(tmp_path):
    m = _model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [_inp("x", [1, "C"])], [_out("y")],
               {"b": _w(4)})
    with pytest.raises(ShapeError, match=r"input shapes \(x=1x5\) are inconsistent with the model"):
        load_onnx(_save(tmp_path, m), {"x": (1, 5)})
    # ONNX shape inference does not check Reshape element counts; the IR does, naming the node
    m = _model([helper.make_node("Reshape", ["x", "shp"], ["y"], name="rs")], [_inp("x", ["N", 4])], [_out("y")],
               {"shp": np.array([2, 4], np.int64)})
    with pytest.raises(ShapeError, match=r"input shapes \(x=3x4\).*node 'rs' \(reshape\): cannot reshape"):
        load_onnx(_save(tmp_path, m, "rs.onnx"), {"x": (3, 4)})


def test_missing_corrupt_truncated_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx' does not exist"):
        load_onnx(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="is not a file"):
        load_onnx(tmp_path)
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


def test_checker_failure_is_a_model_load_error(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_inp("x", [1, 3])], [_out("y")], {})
    m.graph.node[0].input[0] = "undefined_value"
    path = tmp_path / "broken.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError, match="broken.onnx' fails the ONNX checker"):
        load_onnx(path)


def _external_model(tmp_path, location):
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [_inp("x", [1, 3, 8, 8])], [_out("y")],
               {"w": _w(16, 3, 3, 3)})
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    (tmp_path / "sub").mkdir(exist_ok=True)
    return _save(tmp_path / "sub", m)


@pytest.mark.parametrize("location", ["../../etc/passwd", "../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4 * 16 * 27)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_onnx(_external_model(tmp_path, location))


def test_external_data_inside_the_folder_loads(tmp_path):
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [_inp("x", [1, 3, 8, 8])], [_out("y")],
               {"w": _w(16, 3, 3, 3)})
    w = numpy_helper.to_array(m.graph.initializer[0])
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").is_file()
    g = load_onnx(tmp_path / "m.onnx")
    np.testing.assert_array_equal(g.constants["w"], w)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin'.*missing"):
        load_onnx(tmp_path / "m.onnx")


@pytest.mark.parametrize("node,inits,expect", [
    (helper.make_node("TopK", ["r", "k"], ["y", "idx"], name="top_scores", axis=1),
     {"k": np.array([2], np.int64)}, "post-processing"),
    (helper.make_node("ConvTranspose", ["r", "wt"], ["y"], name="upsample_3", auto_pad="SAME_UPPER"),
     {"wt": _w(3, 3, 2, 2)}, "auto_pad='SAME_UPPER'"),
    (helper.make_node("MaxPool", ["r"], ["y"], name="pool_so", kernel_shape=[2, 2], storage_order=1),
     {}, "storage_order"),
    (helper.make_node("Conv", ["r3", "w1"], ["y"], name="conv1d"), {"w1": _w(2, 3, 3)}, "2-D convolution"),
])
def test_unsupported_ops_and_attributes_are_named(tmp_path, node, inits, expect):
    pre = [helper.make_node("Relu", ["x"], ["r"], name="relu1"),
           helper.make_node("Reshape", ["r", "s3"], ["r3"], name="to3d")]
    m = _model(pre + [node], [_inp("x", [1, 3, 8, 8])], [_out("y")],
               {**inits, "s3": np.array([1, 3, 64], np.int64)})
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(_save(tmp_path, m))
    assert e.value.op_type == node.op_type and e.value.node_name == node.name
    assert f"'{node.op_type}'" in str(e.value) and f"'{node.name}'" in str(e.value) and expect in str(e.value)


def test_nms_and_vendor_domain_are_named(tmp_path):
    boxes = helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 5, 4])
    scores = helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 1, 5])
    sel = helper.make_tensor_value_info("sel", onnx.TensorProto.INT64, ["n", 3])
    m = helper.make_model(helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")], "t", [boxes, scores],
        [sel]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match=r"'NonMaxSuppression' at node 'nms'.*post-processing"):
        load_onnx(_save(tmp_path, m))
    m2 = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r"),
                           helper.make_node("FusedGemm", ["y", "y"], ["z"], name="fg", domain="com.microsoft")],
                          "t", [_inp("x", [3, 3])], [_out("z", [3, 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    with pytest.raises(UnsupportedOpError, match=r"'com.microsoft::FusedGemm' at node 'fg'"):
        load_onnx(_save(tmp_path, m2, "ms.onnx"))


# ---------------------------------------------------------------------------- real third-party model
CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"


@pytest.mark.network
def test_real_pretrained_rapidocr_classifier(rapidocr_models):
    """The PaddleOCR text-direction classifier shipped in rapidocr-onnxruntime 1.4.4 (MobileNetV3,
    opset 11, dynamic dims, Shape->Slice->Concat->Reshape subgraphs) imports completely and matches
    onnxruntime on the original file (tolerances: module docstring)."""
    path = rapidocr_models[CLS]
    g = load_onnx(path, {"x": (1, 3, 48, 192)})
    verify(g)
    counts = g.op_counts()
    assert counts["conv2d"] == 53 and counts["batch_norm"] == 35 and counts["hardsigmoid"] == 9
    assert set(counts) <= {"conv2d", "batch_norm", "relu", "hardsigmoid", "hardswish", "add", "mul",
                           "global_avg_pool", "max_pool2d", "reshape", "flatten", "linear", "softmax"}
    assert g.meta["fusions"] == {"hardswish": 18}  # Paddle's x * Clip(x + 3, 0, 6) / 6, every one fused
    assert g.meta["source"]["opset"] == 11 and g.types[g.outputs[0]].shape == (1, 2)
    assert g.outputs == ["save_infer_model/scale_0.tmp_1"]
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for _ in range(2):
        x = rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
        ref = original.run(None, {"x": x})
        assert within_fp32_tolerance(exported.run(None, {"x": x}), ref, ORT_RTOL, ORT_ATOL_REL)
        assert within_fp32_tolerance(run_reference(g, [{"x": x}])[0], ref, FP32_RTOL, FP32_ATOL_REL)


@pytest.mark.network
def test_truncated_real_model_is_a_model_load_error(tmp_path, rapidocr_models):
    data = rapidocr_models[CLS].read_bytes()
    for frac in (0.5, 0.97):
        path = tmp_path / f"cls_{frac}.onnx"
        path.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ModelLoadError, match=f"cls_{frac}.onnx"):
            load_onnx(path, {"x": (1, 3, 48, 192)})


def test_unreachable_registry_raises_registry_unavailable(tmp_path, monkeypatch):
    from qcompile.models.thirdparty import RegistryUnavailable, fetch_rapidocr_models

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: connection refused
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(RegistryUnavailable, match="registry unreachable"):
        fetch_rapidocr_models(tmp_path)
    assert not (tmp_path / "models" / "rapidocr-onnxruntime-1.4.4").exists()


@pytest.mark.network
def test_fetch_into_a_fresh_cache_and_repair_a_corrupt_copy(tmp_path, rapidocr_models):
    from qcompile.models.thirdparty import RAPIDOCR_MODELS, fetch_rapidocr_models

    paths = fetch_rapidocr_models(tmp_path)
    assert set(paths) == set(RAPIDOCR_MODELS)
    assert all(p.read_bytes() == rapidocr_models[k].read_bytes() for k, p in paths.items())
    paths[CLS].write_bytes(b"tampered")
    assert fetch_rapidocr_models(tmp_path)[CLS].read_bytes() == rapidocr_models[CLS].read_bytes()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["rapidocr-onnxruntime-1.4.4"]
