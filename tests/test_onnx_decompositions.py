"""Written-out layer norm, hard-swish and GELU in ONNX files become one IR op each
(:mod:`qcompile.frontends.onnx_fusions`), only when every constant is exactly right.

Every model is built with ``onnx.helper`` in the node order real exporters write (the CNN mirrors
what ``torch.onnx.export(dynamo=True)`` of torch 2.13 writes for a ConvNeXt-style channel layer norm,
``x * relu6(x + 3) / 6`` and ``x * 0.5 * (1 + erf(x / sqrt 2))``).  Each test checks the imported IR
(fused op present, none of its pieces left) and compares the reference interpreter (and, once, TVM
x86) with onnxruntime on the *original* file at the project's fp32 tolerance
|y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref| (``compiler.FP32_ATOL_REL``, ``compiler.FP32_RTOL``).
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL, CompileOptions, compile_model
from qcompile.frontends.onnx_export import save_onnx, to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.frontends.torch_frontend import load_torch
from qcompile.ir import verify
from qcompile.passes.manager import run_reference, within_fp32_tolerance

F32 = np.float32
RNG = np.random.default_rng(0)
PIECES = {"reduce_mean", "sub", "pow", "sqrt", "div", "reciprocal", "mul", "add", "clip", "hardsigmoid", "erf",
          "tanh"}
"""IR ops a fused pattern is made of: none may be left in a fully fused model."""


# ---------------------------------------------------------------------------- helpers
def _model(nodes, inits, x_shape, opset=17, dynamic_batch=False, outputs=("y",)):
    dims = ["N", *x_shape[1:]] if dynamic_batch else list(x_shape)
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    inferred = {vi.name: vi.type for vi in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        o.type.CopyFrom(inferred[o.name])
    onnx.checker.check_model(m, full_check=True)
    return m


def _close(out, ref):
    return within_fp32_tolerance(out, ref, FP32_RTOL, FP32_ATOL_REL)


def _import_and_compare(tmp_path, model, x_shape, name="m.onnx"):
    """load_onnx -> verify; the reference interpreter and onnxruntime on to_onnx(IR) against
    onnxruntime on the original file.  Returns (graph, feed, reference outputs)."""
    path = tmp_path / name
    onnx.save(model, path)
    g = load_onnx(path)
    verify(g)
    feed = {"x": (RNG.standard_normal(x_shape) * 2).astype(F32)}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    out = [o[0] for o in run_reference(g, [feed])]
    assert _close(out, ref), [float(np.abs(o - r).max()) for o, r in zip(out, ref)]
    exported = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert _close(exported, ref), [float(np.abs(o - r).max()) for o, r in zip(exported, ref)]
    return g, feed, ref


def _node(op, ins, out, **attrs):
    return helper.make_node(op, ins, [out], name=out, **attrs)


def _layer_norm(x, out, axes, opset, gamma, beta, square="Pow", normalise="Div", gamma_first=True, twice=False):
    """ReduceMean -> Sub -> Pow(2) | Mul(d, d) -> ReduceMean -> Add(eps) -> Sqrt -> Div | Reciprocal+Mul
    -> Mul(gamma) [-> Add(beta)], axes as attribute (opset < 18) or input; ``twice``: the numerator's
    x - mean is a second Sub node (the TorchScript exporter does not merge the two)."""
    ax = {"axes": axes} if opset < 18 else {}
    ax_in = [f"{out}_axes"] if opset >= 18 else []
    nodes = [_node("ReduceMean", [x, *ax_in], f"{out}_mean", **ax),
             _node("Sub", [x, f"{out}_mean"], f"{out}_d"),
             _node("Pow", [f"{out}_d", "two"], f"{out}_sq") if square == "Pow"
             else _node("Mul", [f"{out}_d", f"{out}_d"], f"{out}_sq"),
             _node("ReduceMean", [f"{out}_sq", *ax_in], f"{out}_var", **ax),
             _node("Add", [f"{out}_var", f"{out}_eps"], f"{out}_ve"),
             _node("Sqrt", [f"{out}_ve"], f"{out}_std")]
    num = f"{out}_d"
    if twice:
        nodes.append(_node("Sub", [x, f"{out}_mean"], f"{out}_d2"))
        num = f"{out}_d2"
    if normalise == "Div":
        nodes.append(_node("Div", [num, f"{out}_std"], f"{out}_n"))
    else:
        nodes += [_node("Reciprocal", [f"{out}_std"], f"{out}_inv"),
                  _node("Mul", [num, f"{out}_inv"], f"{out}_n")]
    scaled = f"{out}_scaled" if beta else out
    nodes.append(_node("Mul", [gamma, f"{out}_n"] if gamma_first else [f"{out}_n", gamma], scaled))
    if beta:
        nodes.append(_node("Add", [scaled, beta], out))
    inits = {f"{out}_axes": np.array(axes, np.int64)} if opset >= 18 else {}
    return nodes, inits


def _hardswish_relu6(x, out, six="six"):
    """x * Clip(x + 3, 0, 6) / 6 as torch writes ``x * F.relu6(x + 3) / 6``."""
    return [_node("Add", [x, "three"], f"{out}_a"), _node("Clip", [f"{out}_a", "zero", "six"], f"{out}_r6"),
            _node("Mul", [x, f"{out}_r6"], f"{out}_m"), _node("Div", [f"{out}_m", six], out)]


def _gelu_erf(x, out, sqrt2="sqrt2"):
    """(x * 0.5) * (Erf(x / sqrt 2) + 1) as torch writes ``x * 0.5 * (1 + erf(x / sqrt(2)))``."""
    return [_node("Mul", [x, "half"], f"{out}_h"), _node("Div", [x, sqrt2], f"{out}_s"),
            _node("Erf", [f"{out}_s"], f"{out}_e"), _node("Add", [f"{out}_e", "one"], f"{out}_p"),
            _node("Mul", [f"{out}_h", f"{out}_p"], out)]


CONSTS = {"two": F32(2), "three": F32(3), "zero": F32(0), "six": F32(6), "sixth": F32(1 / 6), "half": F32(0.5),
          "one": F32(1), "sqrt2": F32(math.sqrt(2)), "inv_sqrt2": F32(1 / math.sqrt(2)),
          "c_tanh": F32(math.sqrt(2 / math.pi)), "k_tanh": F32(0.044715), "three_i": np.array(3, np.int64)}


def _cnn(opset=13, dynamic_batch=False):
    """conv -> channel layer norm (eps 1e-6, gamma / beta (8, 1, 1); x - mean twice below opset 18)
    -> hard-swish -> 1x1 conv -> GELU (erf)
    -> NHWC transpose -> layer norm over the last axis (Mul(d, d), Reciprocal, gamma (8,), beta (8,) below
    opset 18, none from 18)."""
    nodes = [_node("Conv", ["x", "w1", "b1"], "c1", pads=[1, 1, 1, 1])]
    ln1, i1 = _layer_norm("c1", "ln1", [1], opset, "g1", "be1", twice=opset < 18)
    ln2, i2 = _layer_norm("t", "y", [3], opset, "g2", "be2" if opset < 18 else None, square="Mul",
                          normalise="Reciprocal", gamma_first=False)
    nodes += ln1 + _hardswish_relu6("ln1", "hs") + [_node("Conv", ["hs", "w2", "b2"], "c2")] \
        + _gelu_erf("c2", "ge") + [_node("Transpose", ["ge"], "t", perm=[0, 2, 3, 1])] + ln2
    inits = {**CONSTS, **i1, **i2, "ln1_eps": F32(1e-6), "y_eps": F32(1e-5),
             "w1": RNG.standard_normal((8, 3, 3, 3)).astype(F32) * 0.4, "b1": RNG.standard_normal(8).astype(F32),
             "g1": (RNG.random((8, 1, 1)) + 0.5).astype(F32), "be1": RNG.standard_normal((8, 1, 1)).astype(F32),
             "w2": RNG.standard_normal((8, 8, 1, 1)).astype(F32) * 0.4, "b2": RNG.standard_normal(8).astype(F32),
             "g2": (RNG.random(8) + 0.5).astype(F32), "be2": RNG.standard_normal(8).astype(F32)}
    return _model(nodes, inits, (1, 3, 6, 7), opset, dynamic_batch)


# ---------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("opset", [13, 18])
def test_cnn_with_written_out_layer_norms_hardswish_and_gelu(tmp_path, opset):
    g, _, _ = _import_and_compare(tmp_path, _cnn(opset), (1, 3, 6, 7))
    assert g.op_counts() == {"conv2d": 2, "layer_norm": 2, "hardswish": 1, "gelu": 1, "transpose": 1}
    assert g.meta["fusions"] == {"layer_norm": 2, "hardswish": 1, "gelu": 1}
    ln1, ln2 = (g.node(n) for n in ("ln1", "y"))
    assert (ln1.op, ln1.attrs["axes"], ln1.attrs["epsilon"]) == ("layer_norm", (1,), 1e-6)
    assert (ln2.op, ln2.attrs["axes"], ln2.attrs["epsilon"]) == ("layer_norm", (3,), 1e-5)
    assert [g.types[i].shape for i in ln1.inputs[1:]] == [(8,), (8,)] and len(ln2.inputs) == (3 if opset < 18 else 2)
    assert g.node("hs").op == "hardswish" and g.node("ge").attrs["approximate"] == "none"
    back = load_onnx(save_onnx(g, tmp_path / "exported.onnx"))  # channel norm written out, fused again
    assert back.op_counts() == g.op_counts() and back.node("ln1").attrs == ln1.attrs


def test_onnx_layer_normalization_op_and_its_bias_free_form(tmp_path):
    nodes = [_node("LayerNormalization", ["x", "s", "b"], "l1", axis=-2, epsilon=1e-3),
             _node("LayerNormalization", ["l1", "s1"], "y", axis=3)]
    m = _model(nodes, {"s": RNG.standard_normal((5, 6)).astype(F32), "b": RNG.standard_normal((5, 6)).astype(F32),
                       "s1": RNG.standard_normal(6).astype(F32)}, (2, 4, 5, 6))
    g, _, _ = _import_and_compare(tmp_path, m, (2, 4, 5, 6))
    assert g.op_counts() == {"layer_norm": 2} and g.meta["fusions"] == {}
    assert g.node("l1").attrs == {"axes": (2, 3), "epsilon": 1e-3} and len(g.node("y").inputs) == 2


def test_layer_norm_without_affine_and_with_scalar_gamma(tmp_path):
    """The core alone gets a ones scale; a scalar gamma is broadcast to the normalised shape."""
    ln, inits = _layer_norm("x", "y", [1], 13, "g", "b")
    core = ln[:-2]
    core[-1].output[0] = "n"
    nodes = core + [_node("Mul", ["n", "g"], "ng"), _node("Add", ["ng", "b"], "y")]
    m = _model(nodes, {**CONSTS, **inits, "y_eps": F32(1e-5), "g": F32(1.5), "b": F32(-0.25)}, (1, 4, 3, 3))
    g, _, _ = _import_and_compare(tmp_path, m, (1, 4, 3, 3))
    assert g.op_counts() == {"layer_norm": 1}
    m2 = _model(core, {**CONSTS, **inits, "y_eps": F32(1e-5)}, (1, 4, 3, 3), outputs=("n",))
    g2, _, _ = _import_and_compare(tmp_path, m2, (1, 4, 3, 3), "core.onnx")
    assert g2.op_counts() == {"layer_norm": 1}
    assert np.all(g2.constants[g2.nodes[0].inputs[1]] == 1)


# ---------------------------------------------------------------------------- hard-swish / GELU forms
HARDSWISH_FORMS = {
    "hardsigmoid": [_node("HardSigmoid", ["x"], "hs", alpha=1 / 6, beta=0.5), _node("Mul", ["x", "hs"], "y")],
    "relu6_div_last": _hardswish_relu6("x", "y"),
    "relu6_mul_sixth_last": [_node("Add", ["three", "x"], "a"), _node("Clip", ["a", "zero", "six"], "r"),
                             _node("Mul", ["r", "x"], "m"), _node("Mul", ["m", "sixth"], "y")],
    "hardsigmoid_written_out": [_node("Add", ["x", "three"], "a"), _node("Clip", ["a", "zero", "six"], "r"),
                                _node("Div", ["r", "six"], "hsig"), _node("Mul", ["hsig", "x"], "y")],
    "hardsigmoid_times_sixth": [_node("Add", ["x", "three"], "a"), _node("Clip", ["a", "zero", "six"], "r"),
                                _node("Mul", ["sixth", "r"], "hsig"), _node("Mul", ["x", "hsig"], "y")],
}
GELU_FORMS = {
    "erf_x_half": (_gelu_erf("x", "y"), "none"),
    "erf_p_half_mul_inv_sqrt2": ([_node("Mul", ["x", "inv_sqrt2"], "s"), _node("Erf", ["s"], "e"),
                                  _node("Add", ["one", "e"], "p"), _node("Mul", ["p", "half"], "ph"),
                                  _node("Mul", ["x", "ph"], "y")], "none"),
    "erf_product_half": ([_node("Div", ["x", "sqrt2"], "s"), _node("Erf", ["s"], "e"), _node("Add", ["e", "one"], "p"),
                          _node("Mul", ["x", "p"], "xp"), _node("Mul", ["half", "xp"], "y")], "none"),
    "erf_product_div2": ([_node("Div", ["x", "sqrt2"], "s"), _node("Erf", ["s"], "e"), _node("Add", ["e", "one"], "p"),
                          _node("Mul", ["p", "x"], "xp"), _node("Div", ["xp", "two"], "y")], "none"),
    "tanh_pow": ([_node("Pow", ["x", "three"], "x3"), _node("Mul", ["k_tanh", "x3"], "kx3"),
                  _node("Add", ["x", "kx3"], "in"), _node("Mul", ["c_tanh", "in"], "u"), _node("Tanh", ["u"], "t"),
                  _node("Add", ["t", "one"], "p"), _node("Mul", ["x", "half"], "h"), _node("Mul", ["h", "p"], "y")],
                 "tanh"),
    "tanh_cube_by_muls": ([_node("Mul", ["x", "x"], "x2"), _node("Mul", ["x2", "x"], "x3"),
                                    _node("Mul", ["x3", "k_tanh"], "kx3"), _node("Add", ["kx3", "x"], "in"),
                                    _node("Mul", ["in", "c_tanh"], "u"), _node("Tanh", ["u"], "t"),
                                    _node("Add", ["one", "t"], "p"), _node("Mul", ["x", "p"], "xp"),
                                    _node("Mul", ["xp", "half"], "y")], "tanh"),
    "tanh_pow_int_exponent": ([_node("Pow", ["x", "three_i"], "x3"), _node("Mul", ["x3", "k_tanh"], "kx3"),
                               _node("Add", ["x", "kx3"], "in"), _node("Mul", ["in", "c_tanh"], "u"),
                               _node("Tanh", ["u"], "t"), _node("Add", ["t", "one"], "p"),
                               _node("Mul", ["p", "half"], "ph"), _node("Mul", ["ph", "x"], "y")], "tanh"),
}


@pytest.mark.parametrize("form", list(HARDSWISH_FORMS))
def test_hardswish_forms_fuse(tmp_path, form):
    g, _, _ = _import_and_compare(tmp_path, _model(HARDSWISH_FORMS[form], CONSTS, (2, 3, 4, 5)), (2, 3, 4, 5))
    assert g.op_counts() == {"hardswish": 1} and g.meta["fusions"] == {"hardswish": 1}
    assert g.nodes[0].name == "y"  # named after the pattern's last node


@pytest.mark.parametrize("form", list(GELU_FORMS))
def test_gelu_forms_fuse(tmp_path, form):
    nodes, approximate = GELU_FORMS[form]
    g, _, _ = _import_and_compare(tmp_path, _model(nodes, CONSTS, (2, 3, 4, 5)), (2, 3, 4, 5))
    assert g.op_counts() == {"gelu": 1} and g.meta["fusions"] == {"gelu": 1}
    assert g.nodes[0].attrs["approximate"] == approximate


# ---------------------------------------------------------------------------- near misses
NEAR_MISSES = {
    "hardsigmoid_alpha_0.2": ([_node("HardSigmoid", ["x"], "hs"), _node("Mul", ["x", "hs"], "y")], {}),
    "relu6_divided_by_6.5": (_hardswish_relu6("x", "y", six="six5"), {"six5": F32(6.5)}),
    "gelu_sqrt2_rounded": (_gelu_erf("x", "y", sqrt2="s2r"), {"s2r": F32(1.4142)}),
    "gelu_tanh_wrong_coefficient": (
        [_node("Pow", ["x", "three"], "x3"), _node("Mul", ["k5", "x3"], "kx3"), _node("Add", ["x", "kx3"], "in"),
         _node("Mul", ["c_tanh", "in"], "u"), _node("Tanh", ["u"], "t"), _node("Add", ["t", "one"], "p"),
         _node("Mul", ["x", "half"], "h"), _node("Mul", ["h", "p"], "y")], {"k5": F32(0.0447)}),
    "gelu_per_channel_half": (_gelu_erf("x", "y"), {"half": np.full((3, 1, 1), 0.5, F32)}),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_are_left_alone_and_still_match(tmp_path, case):
    nodes, extra = NEAR_MISSES[case]
    g, _, _ = _import_and_compare(tmp_path, _model(nodes, {**CONSTS, **extra}, (2, 3, 4, 5)), (2, 3, 4, 5))
    assert g.meta["fusions"] == {} and not {"hardswish", "gelu"} & set(g.op_counts())
    assert len(g.nodes) == len(nodes)
    assert [(n.name, list(n.inputs)) for n in g.nodes if n.op in ("add", "mul")] == \
        [(n.name, list(n.input)) for n in nodes if n.op_type in ("Add", "Mul")]  # operand order kept


def test_layer_norm_near_misses(tmp_path):
    """Different axes in the two means, a gamma varying along a non-normalised axis, and a
    normalised value also used elsewhere: no layer_norm (the core may still fuse where exact)."""
    ln, inits = _layer_norm("x", "y", [1], 13, "g", "b")
    ln[3] = _node("ReduceMean", ["y_sq"], "y_var", axes=[1, 2])
    m = _model(ln, {**CONSTS, **inits, "y_eps": F32(1e-5), "g": F32(2), "b": F32(0)}, (1, 4, 3, 3))
    g, _, _ = _import_and_compare(tmp_path, m, (1, 4, 3, 3), "axes.onnx")
    assert "layer_norm" not in g.op_counts() and g.meta["fusions"] == {}

    ln, inits = _layer_norm("x", "y", [1], 13, "g", "b")
    m = _model(ln, {**CONSTS, **inits, "y_eps": F32(1e-5), "g": RNG.standard_normal((3, 1)).astype(F32),
                    "b": F32(0)}, (1, 4, 3, 3))
    g, _, _ = _import_and_compare(tmp_path, m, (1, 4, 3, 3), "gamma.onnx")
    assert g.op_counts().get("layer_norm") == 1 and g.op_counts().get("mul") == 1  # gamma stays a mul

    ln, inits = _layer_norm("x", "y", [1], 13, "g", "b")
    m = _model(ln, {**CONSTS, **inits, "y_eps": F32(1e-5), "g": F32(2), "b": F32(0)}, (1, 4, 3, 3),
               outputs=("y", "y_d"))
    g, _, _ = _import_and_compare(tmp_path, m, (1, 4, 3, 3), "shared.onnx")
    assert "layer_norm" not in g.op_counts() and g.meta["fusions"] == {}


# ---------------------------------------------------------------------------- torch, manifest, TVM
def test_torch_layer_norm_maps_to_layer_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.ln = nn.LayerNorm((7, 6), eps=1e-4)
            self.ln_plain = nn.LayerNorm(6, elementwise_affine=False)

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 3, 1)
            return self.ln_plain(self.ln(h))

    net = Net().eval()
    with torch.no_grad():
        net.ln.weight.uniform_(0.5, 1.5)
        net.ln.bias.normal_()
    x = torch.randn(2, 3, 6, 9)
    g = load_torch(net, (x,))
    assert g.op_counts() == {"conv2d": 1, "transpose": 1, "layer_norm": 2}
    assert [n.attrs for n in g.nodes if n.op == "layer_norm"] == [{"axes": (2, 3), "epsilon": 1e-4},
                                                                   {"axes": (3,), "epsilon": 1e-5}]
    with torch.no_grad():
        ref = net(x).numpy()
    assert _close([run_reference(g, [{"x": x.numpy()}])[0][0]], [ref])


def test_manifest_records_fusions_and_input_shapes(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(_cnn(dynamic_batch=True), path)
    res = compile_model(str(path), "fold-bn,dead-code", "onnxruntime", tmp_path / "out",
                        CompileOptions(input_shapes={"x": (2, 3, 6, 7)}))
    src = res.manifest["source"]
    assert src["spec"] == str(path) and src["input_shapes"] == {"x": [2, 3, 6, 7]}  # spec: `finetune OUT` reloads it
    assert src["fusions"] == {"layer_norm": 2, "hardswish": 1, "gelu": 1}
    assert res.manifest["verification"]["within_fp32_tolerance"]


def test_tvm_runs_the_fused_cnn_like_onnxruntime(tmp_path):
    from qcompile.backends.tvm.backend import TvmBackend

    g, feed, ref = _import_and_compare(tmp_path, _cnn(18), (1, 3, 6, 7))
    out = TvmBackend("x86").runner(g).run(feed)
    assert _close(out, ref), [float(np.abs(o - r).max()) for o, r in zip(out, ref)]
