"""IR -> ONNX export: every IR op maps to standard ONNX at every supported opset, the model passes
the full checker, bytes are deterministic, and node / graph meta round-trips through load_onnx.

Numerics: onnxruntime on ``to_onnx(g)`` vs the torch reference interpreter on ``g``, with the
project's fp32 tolerance |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|
(``compiler.FP32_ATOL_REL``, ``compiler.FP32_RTOL``).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL
from qcompile.errors import IRVerificationError
from qcompile.frontends.onnx_export import EMITTERS, save_onnx, to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.ir import Graph, Node, TensorType, ops, verify
from qcompile.passes.manager import run_reference, within_fp32_tolerance


def _graph_builder(g: Graph, rng):
    def node(op, ins, attrs=None, name=None):
        return g.append(g.make_node(op, ins, attrs or {}, name=name or op)).outputs[0]

    def const(name, *shape, scale=0.3, positive=False):
        arr = rng.standard_normal(shape).astype(np.float32) * scale
        return g.add_constant(name, np.abs(arr) + 0.5 if positive else arr)
    return node, const


def all_ops_graph(seed: int = 0) -> Graph:
    """One graph that uses every IR op (some twice, with different attributes)."""
    rng = np.random.default_rng(seed)
    g = Graph("all_ops")
    node, const = _graph_builder(g, rng)
    x = g.add_input("x", TensorType((2, 4, 6, 6)))
    w_act = g.add_input("w_act", TensorType((7, 3)))
    h = node("conv2d", [x, const("conv.w", 8, 4, 3, 3), const("conv.b", 8)], {"pads": (1, 0, 2, 1)}, "conv")
    h = node("conv2d", [h, const("dw.w", 8, 1, 3, 3)], {"pads": (1, 2, 1, 2), "group": 8, "dilations": (1, 2)}, "dw")
    h = node("batch_norm", [h, const("bn.s", 8, positive=True), const("bn.b", 8), const("bn.m", 8),
                            const("bn.v", 8, positive=True)], {"epsilon": 1e-3}, "bn")
    h = node("layer_norm", [h, const("lnc.s", 8, positive=True), const("lnc.b", 8)], {"axes": (1,), "epsilon": 1e-3},
             "ln_channels")                                                      # written out at every opset
    h = node("hardswish", [h])
    h = node("silu", [h])
    h = node("gelu", [h], name="gelu_erf")
    h = node("gelu", [h], {"approximate": "tanh"}, "gelu_tanh")
    h = node("leaky_relu", [h], {"alpha": 0.1})
    h = node("clip", [h], {"max": 2.5}, "clip_max")
    h = node("clip", [h], {"min": -1.0, "max": 1.0}, "clip")
    h = node("hardsigmoid", [h], {"alpha": 0.3, "beta": 0.4})
    h = node("relu", [node("sub", [h, const("shift", scale=0.0)])])
    mp = node("max_pool2d", [h], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "ceil_mode": 1})
    ap = node("avg_pool2d", [h], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "ceil_mode": 1})
    cat = node("concat", [mp, ap], {"axis": 1})                                        # (2, 16, 4, 3)
    one = g.add_constant("one", np.array(1.0, np.float32))
    two = g.add_constant("two", np.array(2.0, np.float32))
    a = node("abs", [cat])
    e = node("exp", [node("neg", [node("sqrt", [a])])])
    r = node("reciprocal", [node("add", [node("mul", [cat, cat]), one])])
    mx = node("max", [e, r])
    mn = node("min", [node("tanh", [cat]), node("sigmoid", [cat])])
    d = node("div", [node("sub", [mx, mn], name="sub2"), two])
    p = node("pow", [node("erf", [d]), two])
    h = node("identity", [p])
    qs = g.add_constant("act.s", np.array(0.02, np.float32))                       # per-tensor int8 QDQ
    h = node("dequantize_linear", [node("quantize_linear", [h, qs]), qs])
    cs = g.add_constant("ch.s", np.linspace(0.01, 0.05, 16).astype(np.float32))     # per-channel uint8 QDQ
    cz = g.add_constant("ch.zp", np.full(16, 128, np.uint8))
    h = node("dequantize_linear", [node("quantize_linear", [h, cs, cz], {"dtype": "uint8"}), cs, cz])
    f = node("flatten", [node("global_avg_pool", [h])])                               # (2, 16)
    sm = node("softmax", [node("linear", [f, const("fc.w", 10, 16), const("fc.b", 10)], name="fc")])
    rs = node("reshape", [cat], {"shape": (2, 16, 12)})
    tr = node("transpose", [rs], {"perm": (0, 2, 1)})
    tr = node("layer_norm", [tr, const("lnl.s", 16, positive=True)], {"axes": (2,)}, "ln_last")  # ONNX op at >= 17
    l3 = node("linear", [tr, const("l3.w", 5, 16), const("l3.b", 5)], name="fc3d")      # (2, 12, 5)
    mm = node("matmul", [l3, const("mm.b", 5, 3)])                                    # (2, 12, 3)
    rm = node("reduce_mean", [mm], {"axes": (1,), "keepdims": 0})                     # (2, 3)
    la = node("linear", [mm, w_act], name="fc_act3d")                                 # non-constant weight
    lb = node("linear", [rm, w_act], name="fc_act2d")
    ct = node("conv_transpose2d", [x, const("ct.w", 4, 3, 3, 3), const("ct.b", 6)],
              {"strides": (2, 2), "pads": (1, 0, 2, 1), "output_padding": (1, 0), "group": 2})  # (2, 6, 11, 12)
    rz = node("resize", [ct], {"sizes": (22, 18), "scales": (2.0, 1.5), "mode": "linear"}, "resize_linear")
    rz = node("resize", [rz], {"sizes": (7, 9), "scales": (0.31818181, 0.5), "coordinate_transformation_mode":
                               "asymmetric", "nearest_mode": "floor"}, "resize_nearest")
    sl = node("slice", [rz], {"starts": (1, 8), "ends": (6, -1), "axes": (2, 3), "steps": (2, -3)})  # (2, 6, 3, 3)
    g.outputs = [sm, rm, la, lb, sl]
    verify(g)
    return g


def _feeds(g: Graph, n: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [{i: rng.standard_normal(g.types[i].shape).astype(np.float32) for i in g.inputs} for _ in range(n)]


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_every_ir_op_has_an_emitter():
    assert set(EMITTERS) == set(ops.all_ops())
    assert set(all_ops_graph().op_counts()) == set(ops.all_ops())


@pytest.mark.parametrize("opset", [13, 17, 18, 20])
def test_export_matches_reference_at_each_opset(opset):
    g = all_ops_graph()
    model = to_onnx(g, opset)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    op_types = {n.op_type for n in model.graph.node}
    assert ("HardSwish" in op_types) == (opset >= 14) and ("Gelu" in op_types) == (opset >= 20)
    assert all(n.domain == "" for n in model.graph.node)
    sess = _ort(model)
    for feed in _feeds(g):
        ref = [o[0] for o in run_reference(g, [feed])]
        out = sess.run(None, feed)
        assert within_fp32_tolerance(out, ref, FP32_RTOL, FP32_ATOL_REL), \
            [float(np.abs(a - b).max()) for a, b in zip(out, ref)]


def test_linear_mapping_depends_on_rank():
    model = to_onnx(all_ops_graph())
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["fc"].op_type == "Gemm" and by_name["fc_act2d"].op_type == "Gemm"
    assert {a.name: a.i for a in by_name["fc"].attribute} == {"transB": 1}
    assert by_name["fc3d"].op_type == "Add" and by_name["fc_act3d"].op_type == "MatMul"
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == 2  # transpose op + non-constant weight


def test_export_is_deterministic_and_checker_valid(tmp_path):
    g = all_ops_graph()
    g.node("conv").add_provenance(**{"pass": "unit", "rank": np.int64(3)})
    g.meta["tags"] = {"b", "a", "c"}
    a = to_onnx(g).SerializeToString(deterministic=True)
    b = to_onnx(g.clone()).SerializeToString(deterministic=True)
    assert a == b
    p1, p2 = save_onnx(g, tmp_path / "a.onnx"), save_onnx(all_ops_graph(), tmp_path / "b.onnx")
    onnx.checker.check_model(str(p1), full_check=True)
    c = onnx.load(p2)
    assert c.producer_name == "qcompile"
    assert p1.read_bytes() == a


def test_meta_round_trips_through_load_onnx(tmp_path):
    g = all_ops_graph()
    g.node("conv").add_provenance(**{"pass": "lowrank-svd", "rank": np.int64(8), "err": np.float32(0.5)})
    g.node("conv").meta["macs"] = np.int64(1234)
    g.node("fc").add_provenance(**{"pass": "fold-bn", "from": ("bn1", "bn2")})
    g.meta["pipeline"] = "fold-bn,dead-code"
    g2 = load_onnx(save_onnx(g, tmp_path / "m.onnx"))
    verify(g2)
    assert g2.node("conv").meta == {"provenance": [{"pass": "lowrank-svd", "rank": 8, "err": 0.5}], "macs": 1234}
    assert g2.node("fc").meta == {"provenance": [{"pass": "fold-bn", "from": ["bn1", "bn2"]}]}
    assert g2.meta["pipeline"] == "fold-bn,dead-code"
    assert g2.meta["source"]["path"] == str(tmp_path / "m.onnx")
    assert g2.meta["source"]["producer"].startswith("qcompile")


def test_ir_onnx_ir_round_trip_keeps_structure(tmp_path):
    """Ops with a one-to-one ONNX mapping come back as the same IR: ops, node names, values, constants."""
    rng = np.random.default_rng(0)
    g = Graph("plain")
    node, const = _graph_builder(g, rng)
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    h = node("conv2d", [x, const("c.w", 6, 3, 3, 3), const("c.b", 6)],
             {"strides": (2, 2), "pads": (1, 1, 1, 1)}, "c")
    h = node("batch_norm", [h, const("s", 6, positive=True), const("b", 6), const("m", 6), const("v", 6, positive=True)],
             name="bn")
    h = node("clip", [h], {"min": 0.0, "max": 6.0}, "relu6")
    h = node("max_pool2d", [h], {"kernel": (2, 2), "strides": (2, 2)}, "pool")
    h = node("reduce_mean", [h], {"axes": (2, 3), "keepdims": 1}, "rm")
    h = node("reshape", [h], {"shape": (1, 6)}, "rs")
    g.outputs = [node("linear", [h, const("fc.w", 4, 6), const("fc.b", 4)], name="fc")]
    g2 = load_onnx(save_onnx(g, tmp_path / "plain.onnx"))
    assert [(n.op, n.name, n.inputs, n.outputs, n.attrs) for n in g2.nodes] == \
           [(n.op, n.name, n.inputs, n.outputs, n.attrs) for n in g.nodes]
    assert g2.inputs == g.inputs and g2.outputs == g.outputs and g2.name == g.name
    assert set(g2.constants) == set(g.constants)
    for k, v in g.constants.items():
        np.testing.assert_array_equal(g2.constants[k], v)


def test_export_errors():
    g = all_ops_graph()
    with pytest.raises(ValueError, match="opsets 13"):
        to_onnx(g, 11)
    g.nodes.append(Node("not_an_op", [g.outputs[0]], ["zz"], "mystery"))
    with pytest.raises(IRVerificationError, match="no mapping for op 'not_an_op' \\(node 'mystery'\\)"):
        to_onnx(g)
