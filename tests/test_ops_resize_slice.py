"""IR ops ``resize``, ``conv_transpose2d`` and ``slice``: ONNX / torch import, the reference
interpreter, ONNX export (onnxruntime backend) and TVM against onnxruntime on the original file,
named refusals, and the RapidOCR detector / recognizer that need them.

Tolerance: the project's fp32 tolerance |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|
(``compiler.FP32_ATOL_REL``, ``compiler.FP32_RTOL``) everywhere; resize indices and weights are
computed as onnxruntime computes them, so nearest resizes and slices match bit for bit.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL, CompileOptions, compile_model
from qcompile.errors import IRVerificationError, ShapeError, UnsupportedOpError
from qcompile.frontends.onnx_export import save_onnx, to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.frontends.torch_frontend import load_torch
from qcompile.ir import Graph, TensorType, ops, verify
from qcompile.ir.costs import graph_costs
from qcompile.passes.manager import run_reference, within_fp32_tolerance

RNG = np.random.default_rng(0)
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


# ---------------------------------------------------------------------------- helpers
def _model(nodes, x_shape, inits, outputs=("y",), opset=17, extra_inputs=()):
    """A checked ONNX model with float input ``x``; output shapes come from shape inference."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *extra_inputs]
    g = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                               for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset < 19 else 9)
    inferred = {vi.name: vi.type for vi in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        o.type.CopyFrom(inferred[o.name])
    onnx.checker.check_model(m, full_check=True)
    return m


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _ort(model_or_path, feed):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)


def _close(out, ref):
    return within_fp32_tolerance(out, ref, FP32_RTOL, FP32_ATOL_REL)


def _errors(out, ref):
    return [float(np.max(np.abs(np.asarray(o, np.float64) - r))) for o, r in zip(out, ref)]


def _check(tmp_path, model, x_shape, name="m.onnx"):
    """load_onnx -> verify -> reference interpreter and onnxruntime on to_onnx(IR), both against
    onnxruntime on the original file.  Returns (graph, feed, reference outputs)."""
    path = _save(tmp_path, model, name)
    g = load_onnx(path)
    verify(g)
    feed = {"x": RNG.standard_normal(x_shape).astype(np.float32)}
    ref = _ort(path, feed)
    out = [o[0] for o in run_reference(g, [feed])]
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert _close(out, ref), _errors(out, ref)
    exported = _ort(to_onnx(g), feed)
    assert _close(exported, ref), _errors(exported, ref)
    return g, feed, ref


def _resize_node(scales=None, sizes=None, name="rs", inp="x", out="y", **attrs):
    ins = [inp, "", "scales" if scales is not None else ""] + (["sizes"] if sizes is not None else [])
    return helper.make_node("Resize", ins, [out], name=name, **attrs)


def _resize_inits(scales=None, sizes=None):
    inits = {}
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
    if sizes is not None:
        inits["sizes"] = np.array(sizes, np.int64)
    return inits


# ---------------------------------------------------------------------------- resize
RESIZE_CASES = [
    # (x shape, scales, sizes, attributes) -- the first is PP-OCR's detector neck
    ((1, 3, 5, 6), [1, 1, 2, 2], None, dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                            nearest_mode="floor")),
    ((1, 2, 3, 4), [1, 1, 8, 4], None, dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                            nearest_mode="floor")),
    ((1, 2, 4, 5), [1, 1, 3, 3], None, dict(mode="nearest")),  # half_pixel, round_prefer_floor
    ((1, 2, 9, 7), None, [1, 2, 4, 5], dict(mode="nearest", nearest_mode="round_prefer_ceil")),
    ((1, 2, 5, 6), None, [1, 2, 9, 11], dict(mode="nearest", coordinate_transformation_mode="align_corners")),
    ((1, 2, 4, 6), [1, 1, 1.5, 0.5], None, dict(mode="nearest", coordinate_transformation_mode="pytorch_half_pixel",
                                                nearest_mode="ceil")),
    ((1, 2, 4, 6), [1, 1, 2, 2], None, dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                                            nearest_mode="floor")),
    ((1, 2, 4, 6), [1, 1, 2, 2], None, dict(mode="linear")),  # half_pixel
    ((1, 2, 4, 6), None, [1, 2, 7, 3], dict(mode="linear", coordinate_transformation_mode="align_corners")),
    ((1, 2, 3, 5), [1, 1, 2.5, 0.6], None, dict(mode="linear", coordinate_transformation_mode="asymmetric")),
    ((1, 2, 5, 4), None, [1, 2, 1, 9], dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")),
    ((1, 2, 5, 4), None, [1, 2, 5, 4], dict(mode="linear")),  # identity resize
]


@pytest.mark.parametrize("x_shape,scales,sizes,attrs", RESIZE_CASES)
def test_resize_variants_match_onnxruntime(tmp_path, x_shape, scales, sizes, attrs):
    m = _model([_resize_node(scales, sizes, **attrs)], x_shape, _resize_inits(scales, sizes))
    g, _, ref = _check(tmp_path, m, x_shape)
    (n,) = g.nodes
    assert n.op == "resize" and n.name == "rs" and n.attrs["mode"] == attrs["mode"]
    assert g.types[n.outputs[0]].shape == ref[0].shape
    if attrs["mode"] == "nearest":  # indices are onnxruntime's: bit-exact
        np.testing.assert_array_equal(run_reference(g, [{"x": np.arange(np.prod(x_shape), dtype=np.float32)
                                                         .reshape(x_shape)}])[0][0],
                                      _ort(m, {"x": np.arange(np.prod(x_shape), dtype=np.float32).reshape(x_shape)})[0])


def test_resize_opset18_axes_and_opset19_half_pixel_symmetric(tmp_path):
    m18 = _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="rs", mode="linear", axes=[3, 2])],
                 (1, 2, 4, 5), {"sizes": np.array([8, 3], np.int64)}, opset=18)
    g, _, _ = _check(tmp_path, m18, (1, 2, 4, 5), "a.onnx")
    assert g.nodes[0].attrs["sizes"] == (3, 8)
    m19 = _model([_resize_node([1, 1, 1.7, 0.6], mode="linear", coordinate_transformation_mode="half_pixel_symmetric")],
                 (1, 2, 5, 7), _resize_inits([1, 1, 1.7, 0.6]), opset=19)
    g, _, _ = _check(tmp_path, m19, (1, 2, 5, 7), "b.onnx")
    assert to_onnx(g).opset_import[0].version == 19
    with pytest.raises(IRVerificationError, match="half_pixel_symmetric.*opset >= 19"):
        to_onnx(g, 17)


@pytest.mark.parametrize("mode,opset", [("nearest", 9), ("linear", 9), ("linear", 7)])
def test_old_upsample_keeps_asymmetric_coordinates(tmp_path, mode, opset):
    """Upsample-7/9 (and Resize-10) are asymmetric; onnx's version converter drops that when upgrading."""
    if opset == 9:
        node, inits = helper.make_node("Upsample", ["x", "s"], ["y"], name="up", mode=mode), \
            {"s": np.array([1, 1, 2, 3], np.float32)}
    else:
        node, inits = helper.make_node("Upsample", ["x"], ["y"], name="up", mode=mode, scales=[1.0, 1.0, 2.0, 3.0]), {}
    g, _, _ = _check(tmp_path, _model([node], (1, 2, 3, 4), inits, opset=opset), (1, 2, 3, 4))
    assert g.nodes[0].attrs["coordinate_transformation_mode"] == "asymmetric"


@pytest.mark.parametrize("scale", [0.6, 1.5])
def test_opset10_nearest_resize_floors_up_and_ceils_down(tmp_path, scale):
    m = _model([helper.make_node("Resize", ["x", "s"], ["y"], name="r10", mode="nearest")], (1, 1, 5, 5),
               {"s": np.array([1, 1, scale, scale], np.float32)}, opset=10)
    g, _, _ = _check(tmp_path, m, (1, 1, 5, 5))
    assert g.nodes[0].attrs["nearest_mode"] == ("ceil" if scale < 1 else "floor")


def test_resize_output_size_follows_onnxruntime_not_shape_inference(tmp_path):
    """floor(0.7 * 10): onnxruntime multiplies in float32 (7), ONNX shape inference in double (6).  The IR
    follows onnxruntime, and the export writes sizes so the exported model is consistent."""
    assert ops.resize_output_size(10, 0.7) == 7
    g = Graph("r")
    x = g.add_input("x", TensorType((1, 1, 10, 4)))
    g.outputs = [g.append(g.make_node("resize", [x], {"sizes": (7, 4), "scales": (0.7, 1.0)}, name="rs")).outputs[0]]
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    assert [n.input[3] != "" for n in model.graph.node if n.op_type == "Resize"] == [True]
    feed = {"x": RNG.standard_normal((1, 1, 10, 4)).astype(np.float32)}
    assert _close(_ort(model, feed), [run_reference(g, [feed])[0][0]])


# ---------------------------------------------------------------------------- conv_transpose2d
CONV_T_CASES = [
    # (x shape, weight shape, bias, attributes) -- the first is PP-OCR's detector head
    ((1, 4, 5, 5), (4, 4, 2, 2), False, dict(strides=[2, 2])),
    ((1, 3, 4, 5), (3, 2, 3, 3), True, dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    ((2, 4, 3, 4), (4, 3, 3, 2), True, dict(strides=[2, 3], pads=[0, 1, 2, 0], dilations=[2, 1], group=2,
                                            output_padding=[1, 2])),
    ((1, 2, 4, 4), (2, 3, 2, 2), True, dict(dilations=[3, 1], strides=[3, 1], pads=[1, 0, 0, 0],
                                            output_padding=[2, 0])),
    ((1, 6, 3, 3), (6, 1, 3, 3), False, dict(group=6, strides=[2, 2], pads=[1, 1, 1, 1])),  # depthwise
    ((1, 2, 3, 3), (2, 2, 3, 3), True, dict(auto_pad="VALID", output_shape=[7, 7], strides=[2, 2])),
]


@pytest.mark.parametrize("x_shape,w_shape,bias,attrs", CONV_T_CASES)
def test_conv_transpose_variants_match_onnxruntime(tmp_path, x_shape, w_shape, bias, attrs):
    inits = {"w": RNG.standard_normal(w_shape).astype(np.float32)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = RNG.standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32)
        ins.append("b")
    m = _model([helper.make_node("ConvTranspose", ins, ["y"], name="up", **attrs)], x_shape, inits)
    g, _, _ = _check(tmp_path, m, x_shape)
    (n,) = g.nodes
    assert n.op == "conv_transpose2d" and n.name == "up"
    (cost,) = graph_costs(g)
    assert cost.macs == int(np.prod(x_shape)) * w_shape[1] * w_shape[2] * w_shape[3]


# ---------------------------------------------------------------------------- slice
SLICE_CASES = [
    # (x shape, starts, ends, axes, steps) -- the first is PP-OCR's recognizer (q, k, v of a fused qkv)
    ((3, 1, 2, 5, 4), [1], [2], [0], [1]),
    ((2, 5, 6, 7), [1, -3], [4, INT64_MAX], [1, 3], [1, 1]),
    ((2, 5, 6, 7), [0, 1], [INT64_MAX, 100], [2, -1], [2, 3]),
    ((2, 5, 6, 7), [-1, 4], [INT64_MIN, 0], [1, 2], [-1, -2]),
    ((2, 5, 6, 7), [3, -2, 1], [1, -100, 6], [-3, 3, 2], [-1, -2, 1]),
    ((4, 6), [1, 2], [3, 5], None, None),  # axes and steps omitted
]


@pytest.mark.parametrize("x_shape,starts,ends,axes,steps", SLICE_CASES)
def test_slice_variants_match_onnxruntime(tmp_path, x_shape, starts, ends, axes, steps):
    inits = {"st": np.array(starts, np.int64), "en": np.array(ends, np.int64)}
    ins = ["x", "st", "en"]
    if axes is not None:
        inits["ax"], inits["sp"] = np.array(axes, np.int64), np.array(steps, np.int64)
        ins += ["ax", "sp"]
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Slice", ["r", *ins[1:]], ["y"], name="cut")], x_shape, inits)
    g, feed, ref = _check(tmp_path, m, x_shape)
    assert g.op_counts() == {"relu": 1, "slice": 1}
    np.testing.assert_array_equal(run_reference(g, [feed])[0][0], ref[0])


def test_normalize_slice_follows_onnx_clamping():
    assert ops.normalize_slice((5, 7), [-2, 0], [INT64_MAX, -1], [1, 0], [1, 1]) == ((5, 0), (7, 4), (1, 0), (1, 1))
    assert ops.normalize_slice((5,), [INT64_MAX], [INT64_MIN], None, [-2]) == ((4,), (-1,), (0,), (-2,))
    assert ops.normalize_slice((5,), [10], [-10], [0], [-1]) == ((4,), (-1,), (0,), (-1,))
    for bad in ([0], [1], [0], [0]), ([0], [1], [2], [1]), ([0, 0], [1, 1], [0, -2], [1, 1]):
        with pytest.raises(ValueError):
            ops.normalize_slice((5, 3), *bad)


# ---------------------------------------------------------------------------- refusals
def _refused(tmp_path, node, inits, x_shape=(1, 2, 4, 4), opset=17, extra_inputs=()):
    m = _model([node], x_shape, inits, opset=opset, extra_inputs=extra_inputs)
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(_save(tmp_path, m))
    assert e.value.op_type == node.op_type and e.value.node_name == node.name
    return str(e.value)


@pytest.mark.parametrize("attrs,opset,expect", [
    (dict(mode="cubic"), 17, "mode='cubic'"),
    (dict(mode="nearest", coordinate_transformation_mode="tf_crop_and_resize"), 17,
     "coordinate_transformation_mode='tf_crop_and_resize'"),
    (dict(mode="nearest", coordinate_transformation_mode="half_pixel_symmetric"), 19,
     "coordinate_transformation_mode='half_pixel_symmetric'"),
    (dict(mode="linear", antialias=1), 18, "antialias=1"),
])
def test_resize_refuses_unsupported_attributes(tmp_path, attrs, opset, expect):
    text = _refused(tmp_path, _resize_node([1, 1, 0.5, 0.5], name="odd_resize", **attrs),
                    _resize_inits([1, 1, 0.5, 0.5]), opset=opset)
    assert expect in text and "'odd_resize'" in text


def test_resize_refuses_channel_scaling_aspect_policy_and_runtime_scales(tmp_path):
    text = _refused(tmp_path, _resize_node([1, 2, 1, 1], name="ch"), _resize_inits([1, 2, 1, 1]))
    assert "batch or channel axis" in text
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="keep", keep_aspect_ratio_policy="not_larger")
    assert "keep_aspect_ratio_policy='not_larger'" in _refused(tmp_path, node, {"sizes": np.array([1, 2, 8, 6],
                                                                                                   np.int64)}, opset=18)
    dyn = helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], name="dyn")
    assert "computed at run time" in _refused(tmp_path, node, {}, extra_inputs=[dyn])


@pytest.mark.parametrize("attrs,expect", [
    (dict(auto_pad="SAME_LOWER", strides=[2, 2]), "auto_pad='SAME_LOWER'"),
    (dict(strides=[2, 2], output_shape=[9, 9]), "output_shape=[9, 9]"),
    (dict(dilations=[3, 3], output_padding=[2, 0]), "output_padding=[2, 0]"),
])
def test_conv_transpose_refuses_unsupported_attributes(tmp_path, attrs, expect):
    text = _refused(tmp_path, helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", **attrs),
                    {"w": np.ones((2, 2, 2, 2), np.float32)})
    assert expect in text and "'deconv'" in text


def test_slice_refuses_runtime_bounds_and_empty_results(tmp_path):
    st = helper.make_tensor_value_info("st", TensorProto.INT64, [1])
    text = _refused(tmp_path, helper.make_node("Slice", ["x", "st", "en"], ["y"], name="dyn_slice"),
                    {"en": np.array([2], np.int64)}, extra_inputs=[st])
    assert "starts" in text and "computed at run time" in text
    node = helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="empty_slice")
    text = _refused(tmp_path, node, {"st": np.array([3], np.int64), "en": np.array([1], np.int64),
                                     "ax": np.array([2], np.int64)})
    assert "empty" in text


def test_ir_rules_for_the_new_ops():
    g = Graph("bad")
    x = g.add_input("x", TensorType((1, 2, 4, 6)))
    with pytest.raises(ShapeError, match="not normalised"):
        g.make_node("slice", [x], {"starts": (-1,), "ends": (4,), "axes": (2,), "steps": (1,)})
    with pytest.raises(ShapeError, match="do not follow from scales"):
        g.make_node("resize", [x], {"sizes": (9, 12), "scales": (2.0, 2.0)})
    with pytest.raises(ShapeError, match="nearest_mode"):
        g.make_node("resize", [x], {"sizes": (8, 12), "scales": (2.0, 2.0), "nearest_mode": "round"})
    w = g.add_constant("w", np.ones((2, 3, 3, 3), np.float32))
    with pytest.raises(ShapeError, match="output_padding"):
        g.make_node("conv_transpose2d", [x, w], {"strides": (2, 2), "output_padding": (2, 0)})
    n = g.make_node("resize", [x], {"sizes": (8, 12), "scales": (2.0, 2.0), "mode": "linear"})
    assert n.attrs["coordinate_transformation_mode"] == "half_pixel"


def _dilated_conv_transpose(g: Graph, x: str, bias: bool = True) -> str:
    """output_padding 2 >= stride 1 (allowed below the dilation 3, as in torch): onnxruntime and TVM refuse
    it in their ConvTranspose, so the exporter and the TVM builder trade it for padding."""
    w = g.add_constant("dil.w", RNG.standard_normal((g.types[x].shape[1], 3, 2, 2)).astype(np.float32))
    ins = [x, w] + ([g.add_constant("dil.b", RNG.standard_normal(3).astype(np.float32))] if bias else [])
    return g.append(g.make_node("conv_transpose2d", ins, {"dilations": (3, 1), "pads": (1, 0, 0, 0),
                                                          "output_padding": (2, 0)}, name="dil")).outputs[0]


@pytest.mark.parametrize("bias", [True, False])
def test_output_padding_beyond_stride_exports_for_onnxruntime(bias):
    g = Graph("dil")
    g.outputs = [_dilated_conv_transpose(g, g.add_input("x", TensorType((1, 2, 4, 4))), bias)]
    assert g.types[g.outputs[0]].shape == (1, 3, 8, 5)
    feed = {"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    out, ref = _ort(to_onnx(g), feed), [run_reference(g, [feed])[0][0]]
    assert _close(out, ref), _errors(out, ref)
    want = F.conv_transpose2d(torch.from_numpy(feed["x"]), torch.from_numpy(np.array(g.constants["dil.w"])),
                              torch.from_numpy(np.array(g.constants["dil.b"])) if bias else None,
                              dilation=(3, 1), output_padding=(2, 0))[:, :, 1:]
    np.testing.assert_allclose(ref[0], want.numpy(), rtol=1e-5, atol=1e-5)


def test_ir_onnx_ir_round_trip_keeps_the_new_ops(tmp_path):
    g = Graph("plain")
    x = g.add_input("x", TensorType((1, 4, 5, 6)))
    w = g.add_constant("up.w", RNG.standard_normal((4, 2, 3, 3)).astype(np.float32))
    b = g.add_constant("up.b", RNG.standard_normal(4).astype(np.float32))
    h = g.append(g.make_node("conv_transpose2d", [x, w, b], {"strides": (2, 2), "pads": (1, 0, 1, 2), "group": 2,
                                                             "output_padding": (1, 0)}, name="up")).outputs[0]
    h = g.append(g.make_node("resize", [h], {"sizes": (12, 5), "scales": (1.2, 0.5), "mode": "linear",
                                             "coordinate_transformation_mode": "align_corners"}, name="rs")).outputs[0]
    h = g.append(g.make_node("slice", [h], {"starts": (2, 4), "ends": (-1, 0), "axes": (1, 3), "steps": (-1, -2)},
                             name="cut")).outputs[0]
    g.outputs = [h]
    g2 = load_onnx(save_onnx(g, tmp_path / "plain.onnx"))
    assert [(n.op, n.name, n.attrs) for n in g2.nodes] == [(n.op, n.name, n.attrs) for n in g.nodes]
    feed = {"x": RNG.standard_normal((1, 4, 5, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run_reference(g2, [feed])[0], run_reference(g, [feed])[0])


# ---------------------------------------------------------------------------- torch frontend
class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.grp = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2, bias=False, dilation=2)

    def forward(self, x):
        a = F.interpolate(x, scale_factor=2, mode="nearest")
        b = F.interpolate(x, size=(9, 7), mode="bilinear", align_corners=False)
        c = F.interpolate(x, scale_factor=3, mode="nearest-exact")
        d = F.interpolate(x, size=(8, 11), mode="bilinear", align_corners=True)
        return a, b, c, d, self.up(x), self.grp(x)


class Slicer(nn.Module):
    def forward(self, x):
        q, k, v = torch.split(x, [1, 2, 1], dim=1)
        return (x[:, 1:3, ::2, -3:], x[:, 0], q * v, k.chunk(2, dim=1)[1], torch.narrow(x, 2, 1, 2),
                x[..., 1:], x[:, :])


def _torch_matches(module, shape, expect):
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(*shape)
    g = load_torch(module, (x,))
    verify(g)
    counts = g.op_counts()
    assert all(counts.get(k, 0) == v for k, v in expect.items()), counts
    with torch.no_grad():
        want = [t.numpy() for t in module(x)]
    got = [o[0] for o in run_reference(g, [{"x": x.numpy()}])]
    assert _close(got, want), _errors(got, want)
    return g


def test_torch_interpolate_and_conv_transpose():
    g = _torch_matches(Upsampler(), (1, 4, 5, 6), {"resize": 4, "conv_transpose2d": 2})
    modes = sorted((n.attrs["mode"], n.attrs["coordinate_transformation_mode"]) for n in g.nodes if n.op == "resize")
    assert modes == [("linear", "align_corners"), ("linear", "half_pixel"), ("nearest", "asymmetric"),
                     ("nearest", "half_pixel")]


def test_torch_slicing_select_split_chunk():
    g = _torch_matches(Slicer(), (2, 4, 6, 5), {"slice": 10, "reshape": 1, "identity": 1})
    assert "x" in g.inputs and len(g.outputs) == 7


# ---------------------------------------------------------------------------- TVM
def _tvm_model():
    """One model holding every TVM code path of the new ops (one compile): resize2d (native) and the
    gather fallback, conv_transpose2d as a 1x1 conv + depth-to-space (stride == kernel, with and without
    pads / groups) and as conv2d_transpose with each output_padding form, strided_slice and take; plus a
    conv -> resize -> conv_transpose -> conv chain, so ConvertLayout runs NHWC around them."""
    nodes, inits, outs = [], {}, []

    def add(node, **arrays):
        nodes.append(node)
        inits.update(arrays)
        outs.append(node.output[0])

    for k, (scales, sizes, attrs) in enumerate([
            ([1, 1, 2, 4], None, dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                      nearest_mode="floor")),
            ([1, 1, 3, 3], None, dict(mode="nearest")),
            (None, [1, 4, 3, 5], dict(mode="nearest", coordinate_transformation_mode="align_corners")),
            ([1, 1, 2, 2], None, dict(mode="linear")),
            (None, [1, 4, 9, 5], dict(mode="linear", coordinate_transformation_mode="align_corners")),
            ([1, 1, 2.5, 0.6], None, dict(mode="linear", coordinate_transformation_mode="asymmetric"))]):
        extra = {f"s{k}": np.array(scales, np.float32)} if scales else {f"z{k}": np.array(sizes, np.int64)}
        ins = ["x", "", f"s{k}" if scales else ""] + ([] if scales else [f"z{k}"])
        add(helper.make_node("Resize", ins, [f"rs{k}"], name=f"rs{k}", **attrs), **extra)
    for k, (w_shape, attrs) in enumerate([((4, 4, 2, 2), dict(strides=[2, 2])),
                                          ((4, 3, 3, 2), dict(strides=[3, 2], pads=[1, 0, 0, 1], group=2)),
                                          ((4, 3, 3, 2), dict(strides=[2, 3], pads=[0, 1, 2, 0], dilations=[2, 1],
                                                              group=2, output_padding=[1, 2])),
                                          ((4, 2, 2, 2), dict(dilations=[3, 1], strides=[3, 1], pads=[1, 0, 0, 0],
                                                              output_padding=[2, 0]))]):
        add(helper.make_node("ConvTranspose", ["x", f"w{k}", f"b{k}"], [f"ct{k}"], name=f"ct{k}", **attrs),
            **{f"w{k}": RNG.standard_normal(w_shape).astype(np.float32),
               f"b{k}": RNG.standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32)})
    add(helper.make_node("Slice", ["x", "a0", "e0", "x0", "p0"], ["sl0"], name="sl0"),
        a0=np.array([1, -3], np.int64), e0=np.array([3, INT64_MAX], np.int64), x0=np.array([1, 3], np.int64),
        p0=np.array([1, 2], np.int64))
    add(helper.make_node("Slice", ["x", "a1", "e1", "x1", "p1"], ["sl1"], name="sl1"),
        a1=np.array([-1, 0], np.int64), e1=np.array([INT64_MIN, 6], np.int64), x1=np.array([2, 3], np.int64),
        p1=np.array([-2, 2], np.int64))
    chain = [helper.make_node("Conv", ["x", "cw0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c0", "", "s_chain"], ["c1"], name="c1", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("ConvTranspose", ["c1", "cw1"], ["c2"], name="c2", strides=[2, 2]),
             helper.make_node("Conv", ["c2", "cw2"], ["chain"], name="c3", pads=[1, 1, 1, 1])]
    nodes += chain
    inits.update(cw0=RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
                 s_chain=np.array([1, 1, 2, 2], np.float32),
                 cw1=RNG.standard_normal((8, 8, 2, 2)).astype(np.float32) * 0.3,
                 cw2=RNG.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3)
    outs.append("chain")
    return _model(nodes, (1, 4, 5, 6), inits, outputs=outs)


def test_tvm_runs_the_new_ops_like_onnxruntime(tmp_path):
    from qcompile.backends.tvm.backend import TvmBackend
    from qcompile.backends.tvm.relax_builder import _resize_native

    m = _tvm_model()
    g, feed, ref = _check(tmp_path, m, (1, 4, 5, 6))
    native = {n.name: _resize_native(n, g.types[n.inputs[0]].shape[2:]) for n in g.nodes if n.op == "resize"}
    assert native == {"rs0": True, "rs1": False, "rs2": False, "rs3": True, "rs4": True, "rs5": False, "c1": True}
    g.outputs.append(_dilated_conv_transpose(g, "x"))  # output_padding >= stride: checked against the reference
    ref = ref + [run_reference(g, [feed])[-1][0]]
    out = TvmBackend("x86").runner(g).run(feed)
    assert _close(out, ref), _errors(out, ref)


# ---------------------------------------------------------------------------- RapidOCR detector / recognizer
DET, REC = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"
ORT_SIGMOID_ATOL = 4 * 2.0 ** -24
"""onnxruntime's Sigmoid is accurate to a few float32 steps *at 0.5*, not relative to its output
(Sigmoid(-16) = 5.96e-8 = 2^-24 where it is 1.13e-7; Sigmoid(-20) = 0).  On random images the
detector's probability map is ~1e-4 at most, so its output is compared with this absolute floor
added; its logits (the Sigmoid's input) are held to the plain fp32 tolerance."""


def _with_outputs(path, tmp_path, names):
    """A copy of the ONNX file at ``path`` that also outputs the values ``names``."""
    m = onnx.load(path)
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return _save(tmp_path, m, "with_outputs.onnx")


@pytest.mark.network
@pytest.mark.parametrize("name,shape,expect", [
    (DET, (1, 3, 320, 320), {"resize": 6, "conv_transpose2d": 2}),
    (REC, (1, 3, 48, 320), {"slice": 6}),
])
def test_real_rapidocr_detector_and_recognizer(rapidocr_models, tmp_path, name, shape, expect):
    """PP-OCRv4 det (nearest x2/x4/x8 Resize, ConvTranspose head) and rec (SVTR attention: Slice of the
    fused qkv) import, and the reference interpreter matches onnxruntime on the original file; the
    onnxruntime target compiles them (verifying its own numerics)."""
    path = rapidocr_models[name]
    g = load_onnx(path, {"x": shape})
    verify(g)
    counts = g.op_counts()
    assert all(counts.get(k) == v for k, v in expect.items()), counts
    x = np.random.default_rng(5).uniform(-1, 1, shape).astype(np.float32)
    sigmoid_in = [n.inputs[0] for n in g.nodes if n.op == "sigmoid" and n.outputs[0] in g.outputs]
    ref = _ort(_with_outputs(path, tmp_path, sigmoid_in) if sigmoid_in else path, {"x": x})
    g.outputs += sigmoid_in
    out = [o[0] for o in run_reference(g, [{"x": x}])]
    assert _close(out[1:], ref[1:]), _errors(out, ref)
    atol = (ORT_SIGMOID_ATOL if sigmoid_in else 0.0) + FP32_ATOL_REL * np.abs(ref[0]).max()
    assert np.all(np.abs(out[0] - ref[0]) <= atol + FP32_RTOL * np.abs(ref[0])), _errors(out, ref)
    res = compile_model(str(path), "fold-bn,dead-code", "onnxruntime", tmp_path / "out",
                        CompileOptions(input_shapes={"x": shape}))
    assert res.manifest["verification"]["within_fp32_tolerance"]
