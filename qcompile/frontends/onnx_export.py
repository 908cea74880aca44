"""IR -> standard ONNX: deterministic bytes, provenance kept in metadata.

:func:`to_onnx` maps every IR op (:mod:`qcompile.ir.ops`) to default-domain ONNX
operators at the requested opset (13 .. the installed onnx's newest; default 17):

* ``conv2d`` -> Conv (pads (t,l,b,r) are ONNX's [x1_begin, x2_begin, x1_end, x2_end]);
* ``linear`` -> Gemm(transB=1) for rank-2 inputs, else MatMul with the transposed
  weight (+ Add for the bias);
* ``clip`` -> Clip with constant min/max inputs; ``silu`` -> Sigmoid * x;
  ``hardswish`` -> HardSwish (opset >= 14; below: x * HardSigmoid(1/6, 1/2));
  ``gelu`` -> Gelu at opset >= 20, else its erf (or tanh) formula;
* ``layer_norm`` -> LayerNormalization(axis) when its axes are the trailing ones and opset >= 17,
  else written out (ReduceMean, Sub, Mul, ReduceMean, Add eps, Sqrt, Div, Mul / Add by the scale /
  bias reshaped to broadcast along the axes: the form the ONNX frontend fuses back);
* ``reduce_mean`` -> ReduceMean with ``axes`` as attribute (< 18) or input (>= 18);
* ``reshape`` -> Reshape with an int64 initializer;
* ``conv_transpose2d`` -> ConvTranspose with explicit pads and output_padding (an output_padding
  onnxruntime refuses, >= stride, is traded for end padding, the rest padded with Pad; bias by Add);
* ``resize`` -> Resize with constant scales (1, 1, s_h, s_w) when floor(in * s) gives the IR's sizes
  both in float32 (onnxruntime) and in double (ONNX shape inference), else with constant sizes
  (onnxruntime then takes s = out / in, which is what the IR's scales are in that case, up to the
  rounding of a scale given as such for which the two products disagree);
* ``slice`` -> Slice with int64 starts / ends / axes / steps initializers (an end of -1 with a
  negative step, "through index 0", is written as INT64_MIN); the rest map one to one.

Node ``meta`` (provenance, costs) is stored as JSON (sorted keys, numpy values as
python values) under ``metadata_props["qcompile.meta"]`` of every ONNX node the IR
node became, and ``graph.meta`` under the model's ``qcompile.graph_meta``, so
:func:`~qcompile.frontends.onnx_frontend.load_onnx` restores them.

Determinism: exporting the same graph twice gives identical bytes
(``SerializeToString(deterministic=True)``): no timestamps, helper names derive
from node names plus a counter in graph order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import IRVerificationError
from qcompile.ir.graph import Graph, Node

OPSET = 17
MIN_EXPORT_OPSET = 13

_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8,
          "uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
          "bool": TensorProto.BOOL}


class _Emitter:
    """Collects ONNX nodes and initializers for one export; hands out unused helper names."""

    def __init__(self, graph: Graph, opset: int):
        self.g = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._used: set[str] = set(graph.types) | {n.name for n in graph.nodes}
        self._n = 0

    def fresh(self, hint: str) -> str:
        """A value / node name derived from ``hint`` that nothing in the export uses yet."""
        while True:
            self._n += 1
            name = f"{hint}__{self._n}"
            if name not in self._used:
                self._used.add(name)
                return name

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def scalar(self, hint: str, value: float, like: str) -> str:
        """A scalar initializer with the dtype of value ``like``."""
        return self.const(hint, np.array(value, np.dtype(self.g.types[like].dtype)))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.nodes.append(n)
        return n


def _json_default(o: Any) -> Any:
    """JSON for values ``json`` does not know: numpy scalars/arrays, sets (sorted), paths, the rest str."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    return str(o)


def meta_json(meta: dict) -> str:
    """Canonical JSON of a meta dict (sorted keys, numpy converted): what the exporter stores."""
    return json.dumps(meta, sort_keys=True, default=_json_default)


# ---------------------------------------------------------------------------- emitters
def _present(inputs: list[str]) -> list[str]:
    """Drop trailing absent optional inputs."""
    ins = list(inputs)
    while ins and not ins[-1]:
        ins.pop()
    return ins


def _simple(op_type: str) -> Callable[[_Emitter, Node], None]:
    def emit(e: _Emitter, n: Node) -> None:
        e.node(op_type, _present(n.inputs), n.outputs, n.name)
    return emit


def _with_attrs(op_type: str, conv: Callable[[dict], dict]) -> Callable[[_Emitter, Node], None]:
    def emit(e: _Emitter, n: Node) -> None:
        e.node(op_type, _present(n.inputs), n.outputs, n.name, **conv(n.attrs))
    return emit


def _emit_conv2d(e: _Emitter, n: Node) -> None:
    a = n.attrs
    w = e.g.types[n.inputs[1]].shape
    e.node("Conv", _present(n.inputs), n.outputs, n.name, kernel_shape=list(w[2:]),
           strides=list(a["strides"]), pads=list(a["pads"]), dilations=list(a["dilations"]), group=int(a["group"]))


def _emit_conv_transpose2d(e: _Emitter, n: Node) -> None:
    """ConvTranspose.  onnxruntime refuses output_padding >= stride (the IR allows it below a larger
    dilation, like torch): such output padding is traded for end padding (the same output), and what
    is left becomes a zero Pad of the output before the bias is added."""
    a = n.attrs
    w = e.g.types[n.inputs[1]].shape
    t, l, b, r = a["pads"]
    op = list(a["output_padding"])
    if all(o < s for o, s in zip(op, a["strides"])):
        e.node("ConvTranspose", _present(n.inputs), n.outputs, n.name, kernel_shape=list(w[2:]),
               strides=list(a["strides"]), pads=[t, l, b, r], dilations=list(a["dilations"]), group=int(a["group"]),
               output_padding=op)
        return
    cut = [min(b, op[0]), min(r, op[1])]
    b, r = b - cut[0], r - cut[1]
    rest = [o - c for o, c in zip(op, cut)]
    keep = [o if o < s else 0 for o, s in zip(rest, a["strides"])]
    extra = [o - k for o, k in zip(rest, keep)]
    has_bias = len(n.inputs) > 2 and bool(n.inputs[2])
    last = not has_bias and extra == [0, 0]
    y = n.outputs[0] if last else e.fresh(n.name + "/conv_transpose")
    e.node("ConvTranspose", n.inputs[:2], [y], n.name if last else e.fresh(n.name + "/conv_transpose"),
           kernel_shape=list(w[2:]), strides=list(a["strides"]), pads=[t, l, b, r],
           dilations=list(a["dilations"]), group=int(a["group"]), output_padding=keep)
    if extra != [0, 0]:
        pads = e.const(n.name + "_pads", np.array([0, 0, 0, 0, 0, 0, extra[0], extra[1]], np.int64))
        padded = n.outputs[0] if not has_bias else e.fresh(n.name + "/pad")
        e.node("Pad", [y, pads], [padded], n.name if not has_bias else e.fresh(n.name + "/pad"))
        y = padded
    if has_bias:
        bias = e.g.constants.get(n.inputs[2])
        if bias is not None:
            b4 = e.const(n.inputs[2] + "_nchw", np.ascontiguousarray(bias.reshape(1, -1, 1, 1)))
        else:
            b4 = e.fresh(n.inputs[2] + "_nchw")
            e.node("Reshape", [n.inputs[2], e.const(n.name + "_bias_shape", np.array([1, -1, 1, 1], np.int64))],
                   [b4], e.fresh(n.name + "/bias_reshape"))
        e.node("Add", [y, b4], n.outputs, n.name)


def _emit_resize(e: _Emitter, n: Node) -> None:
    from qcompile.ir.ops import resize_output_size

    a = n.attrs
    x = e.g.types[n.inputs[0]].shape
    if a["coordinate_transformation_mode"] == "half_pixel_symmetric" and e.opset < 19:
        raise IRVerificationError(f"ONNX export: node '{n.name}' resizes with half_pixel_symmetric coordinates, "
                                  f"which need opset >= 19 (asked for opset {e.opset})")
    attrs = {"mode": a["mode"], "coordinate_transformation_mode": a["coordinate_transformation_mode"],
             "nearest_mode": a["nearest_mode"]}
    # onnxruntime sizes the output as floor(float32(s) * in), ONNX shape inference in double: use scales
    # only where both give the IR's sizes, else sizes (onnxruntime then takes s = out / in, as the IR does)
    if all(resize_output_size(i, s) == o == math.floor(float(np.float32(s)) * i)
           for i, s, o in zip(x[2:], a["scales"], a["sizes"])):
        scales = e.const(n.name + "_scales", np.array([1.0, 1.0, *a["scales"]], np.float32))
        e.node("Resize", [n.inputs[0], "", scales], n.outputs, n.name, **attrs)
    else:
        sizes = e.const(n.name + "_sizes", np.array([*x[:2], *a["sizes"]], np.int64))
        e.node("Resize", [n.inputs[0], "", "", sizes], n.outputs, n.name, **attrs)


def _emit_slice(e: _Emitter, n: Node) -> None:
    a = n.attrs
    ends = [np.iinfo(np.int64).min if st < 0 and en == -1 else en for en, st in zip(a["ends"], a["steps"])]
    ins = [e.const(n.name + "_" + k, np.array(v, np.int64))
           for k, v in (("starts", a["starts"]), ("ends", ends), ("axes", a["axes"]), ("steps", a["steps"]))]
    e.node("Slice", [n.inputs[0], *ins], n.outputs, n.name)


def _emit_linear(e: _Emitter, n: Node) -> None:
    """Gemm(transB=1) for a 2-D input; otherwise MatMul by w^T (+ Add bias)."""
    x = e.g.types[n.inputs[0]]
    has_bias = len(n.inputs) > 2 and bool(n.inputs[2])
    if x.rank == 2:
        e.node("Gemm", _present(n.inputs), n.outputs, n.name, transB=1)
        return
    wt = e.g.constants.get(n.inputs[1])
    if wt is None:
        t = e.fresh(n.inputs[1] + "_T")
        e.node("Transpose", [n.inputs[1]], [t], e.fresh(n.name + "/transpose_w"), perm=[1, 0])
    else:
        t = e.const(n.inputs[1] + "_T", np.ascontiguousarray(wt.T))
    if not has_bias:
        e.node("MatMul", [n.inputs[0], t], n.outputs, n.name)
        return
    mm = e.fresh(n.name + "/matmul")
    e.node("MatMul", [n.inputs[0], t], [mm], e.fresh(n.name + "/matmul"))
    e.node("Add", [mm, n.inputs[2]], n.outputs, n.name)


def _emit_clip(e: _Emitter, n: Node) -> None:
    x = n.inputs[0]
    lo = e.scalar(n.name + "_min", n.attrs["min"], x) if n.attrs["min"] is not None else ""
    hi = e.scalar(n.name + "_max", n.attrs["max"], x) if n.attrs["max"] is not None else ""
    e.node("Clip", _present([x, lo, hi]), n.outputs, n.name)


def _emit_hardswish(e: _Emitter, n: Node) -> None:
    if e.opset >= 14:
        e.node("HardSwish", [n.inputs[0]], n.outputs, n.name)
        return
    hs = e.fresh(n.name + "/hardsigmoid")
    e.node("HardSigmoid", [n.inputs[0]], [hs], e.fresh(n.name + "/hardsigmoid"), alpha=1.0 / 6, beta=0.5)
    e.node("Mul", [n.inputs[0], hs], n.outputs, n.name)


def _emit_gelu(e: _Emitter, n: Node) -> None:
    """Gelu (opset >= 20) or 0.5 x (1 + erf(x / sqrt 2)) / 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x, y, approx = n.inputs[0], n.outputs[0], n.attrs["approximate"]
    if e.opset >= 20:
        e.node("Gelu", [x], [y], n.name, approximate=approx)
        return

    def op(op_type: str, *ins: str) -> str:
        out = e.fresh(f"{n.name}/{op_type.lower()}")
        e.node(op_type, list(ins), [out], out)
        return out

    if approx == "tanh":
        x3 = op("Mul", op("Mul", x, x), x)
        inner = op("Mul", op("Add", x, op("Mul", x3, e.scalar(n.name, 0.044715, x))),
                   e.scalar(n.name, math.sqrt(2 / math.pi), x))
        s = op("Tanh", inner)
    else:
        s = op("Erf", op("Mul", x, e.scalar(n.name, 1 / math.sqrt(2), x)))
    half_x = op("Mul", x, e.scalar(n.name, 0.5, x))
    e.node("Mul", [half_x, op("Add", s, e.scalar(n.name, 1.0, x))], [y], n.name)


def _emit_layer_norm(e: _Emitter, n: Node) -> None:
    """LayerNormalization (opset >= 17, trailing axes) or written out: d = x - ReduceMean(x),
    d / Sqrt(ReduceMean(d * d) + eps) * scale + bias with scale / bias reshaped to broadcast along
    the axes (the form the ONNX frontend fuses back)."""
    x, axes, eps = n.inputs[0], [int(v) for v in n.attrs["axes"]], float(n.attrs["epsilon"])
    rank = e.g.types[x].rank
    if e.opset >= 17 and axes == list(range(rank - len(axes), rank)):
        e.node("LayerNormalization", _present(n.inputs), n.outputs, n.name, axis=axes[0], epsilon=eps)
        return

    def op(op_type: str, *ins: str, **attrs: Any) -> str:
        out = e.fresh(f"{n.name}/{op_type.lower()}")
        e.node(op_type, list(ins), [out], out, **attrs)
        return out

    def mean(v: str) -> str:
        if e.opset >= 18:
            return op("ReduceMean", v, e.const(n.name + "_axes", np.array(axes, np.int64)), keepdims=1)
        return op("ReduceMean", v, axes=axes, keepdims=1)

    def along_axes(name: str) -> str:
        shape = [e.g.types[x].shape[i] if i in axes else 1 for i in range(rank)]
        return op("Reshape", name, e.const(n.name + "_shape", np.array(shape, np.int64)))

    d = op("Sub", x, mean(x))
    y = op("Div", d, op("Sqrt", op("Add", mean(op("Mul", d, d)), e.scalar(n.name + "_eps", eps, x))))
    has_bias = len(n.inputs) > 2 and bool(n.inputs[2])
    y_scaled = e.fresh(n.name + "/mul") if has_bias else n.outputs[0]
    e.node("Mul", [y, along_axes(n.inputs[1])], [y_scaled], e.fresh(n.name + "/mul") if has_bias else n.name)
    if has_bias:
        e.node("Add", [y_scaled, along_axes(n.inputs[2])], n.outputs, n.name)


def _emit_silu(e: _Emitter, n: Node) -> None:
    s = e.fresh(n.name + "/sigmoid")
    e.node("Sigmoid", [n.inputs[0]], [s], e.fresh(n.name + "/sigmoid"))
    e.node("Mul", [n.inputs[0], s], n.outputs, n.name)


def _emit_reshape(e: _Emitter, n: Node) -> None:
    shape = e.const(n.name + "_shape", np.array(n.attrs["shape"], np.int64))
    e.node("Reshape", [n.inputs[0], shape], n.outputs, n.name)


def _emit_reduce_mean(e: _Emitter, n: Node) -> None:
    axes, keep = [int(a) for a in n.attrs["axes"]], int(n.attrs["keepdims"])
    if e.opset >= 18:  # axes became an input in opset 18
        e.node("ReduceMean", [n.inputs[0], e.const(n.name + "_axes", np.array(axes, np.int64))], n.outputs,
               n.name, keepdims=keep)
    else:
        e.node("ReduceMean", [n.inputs[0]], n.outputs, n.name, axes=axes, keepdims=keep)


def _zero_point(e: _Emitter, n: Node, scale: str, dtype: str, bits: int) -> str:
    """The node's zero point, or a zero of the scale's shape in the quantized type (ONNX's default
    without one is uint8, so int8 needs it spelled out)."""
    if len(n.inputs) > 2 and n.inputs[2]:
        return n.inputs[2]
    zeros = np.zeros(e.g.types[scale].shape, np.dtype(dtype))
    if bits == 4:
        name = e.fresh(n.name + "_zero_point")
        e.inits.append(helper.make_tensor(name, TensorProto.INT4, zeros.shape, zeros.ravel().tolist()))
        return name
    return e.const(n.name + "_zero_point", zeros)


def _q_axis(e: _Emitter, n: Node) -> dict:
    return {"axis": int(n.attrs["axis"])} if e.g.types[n.inputs[1]].rank == 1 else {}


def _emit_quantize(e: _Emitter, n: Node) -> None:
    if n.attrs["bits"] != 8:
        raise IRVerificationError(f"ONNX export: node '{n.name}' quantizes an activation to "
                                  f"{n.attrs['bits']} bits; only 8-bit activations can be exported")
    zp = _zero_point(e, n, n.inputs[1], n.attrs["dtype"], 8)
    e.node("QuantizeLinear", [n.inputs[0], n.inputs[1], zp], n.outputs, n.name, **_q_axis(e, n))


def _emit_dequantize(e: _Emitter, n: Node) -> None:
    """DequantizeLinear; an int4 (``bits=4``) constant becomes an INT4 initializer (opset >= 21)."""
    q = n.inputs[0]
    if n.attrs["bits"] == 4:
        arr = e.g.constants.get(q)
        if arr is None or e.opset < 21:
            raise IRVerificationError(
                f"ONNX export: node '{n.name}' dequantizes int4 values; that needs a constant input and "
                f"opset >= 21 (asked for opset {e.opset})")
        name = e.fresh(q + "_int4")
        e.inits.append(helper.make_tensor(name, TensorProto.INT4, arr.shape, arr.astype(np.int8).ravel().tolist()))
        q = name
    zp = _zero_point(e, n, n.inputs[1], e.g.types[n.inputs[0]].dtype, n.attrs["bits"])
    e.node("DequantizeLinear", [q, n.inputs[1], zp], n.outputs, n.name, **_q_axis(e, n))


def _pool_attrs(a: dict) -> dict:
    return {"kernel_shape": list(a["kernel"]), "strides": list(a["strides"]), "pads": list(a["pads"]),
            "ceil_mode": int(a["ceil_mode"])}


EMITTERS: dict[str, Callable[[_Emitter, Node], None]] = {
    "conv2d": _emit_conv2d,
    "conv_transpose2d": _emit_conv_transpose2d,
    "linear": _emit_linear,
    "matmul": _simple("MatMul"),
    "batch_norm": _with_attrs("BatchNormalization", lambda a: {"epsilon": float(a["epsilon"])}),
    "layer_norm": _emit_layer_norm,
    "relu": _simple("Relu"), "sigmoid": _simple("Sigmoid"), "tanh": _simple("Tanh"), "exp": _simple("Exp"),
    "sqrt": _simple("Sqrt"), "erf": _simple("Erf"), "neg": _simple("Neg"), "abs": _simple("Abs"),
    "reciprocal": _simple("Reciprocal"), "identity": _simple("Identity"), "hardswish": _emit_hardswish,
    "silu": _emit_silu, "gelu": _emit_gelu, "clip": _emit_clip,
    "hardsigmoid": _with_attrs("HardSigmoid", lambda a: {"alpha": float(a["alpha"]), "beta": float(a["beta"])}),
    "leaky_relu": _with_attrs("LeakyRelu", lambda a: {"alpha": float(a["alpha"])}),
    "add": _simple("Add"), "sub": _simple("Sub"), "mul": _simple("Mul"), "div": _simple("Div"),
    "pow": _simple("Pow"), "max": _simple("Max"), "min": _simple("Min"),
    "max_pool2d": _with_attrs("MaxPool", lambda a: {**_pool_attrs(a), "dilations": list(a["dilations"])}),
    "avg_pool2d": _with_attrs("AveragePool", lambda a: {**_pool_attrs(a),
                                                         "count_include_pad": int(a["count_include_pad"])}),
    "global_avg_pool": _simple("GlobalAveragePool"),
    "reduce_mean": _emit_reduce_mean,
    "concat": _with_attrs("Concat", lambda a: {"axis": int(a["axis"])}),
    "reshape": _emit_reshape,
    "flatten": _with_attrs("Flatten", lambda a: {"axis": int(a["axis"])}),
    "transpose": _with_attrs("Transpose", lambda a: {"perm": list(a["perm"])}),
    "slice": _emit_slice,
    "resize": _emit_resize,
    "softmax": _with_attrs("Softmax", lambda a: {"axis": int(a["axis"])}),
    "quantize_linear": _emit_quantize,
    "dequantize_linear": _emit_dequantize,
}
"""IR op -> emitter(emitter_state, node).  Must cover every op in :mod:`qcompile.ir.ops`."""


# ---------------------------------------------------------------------------- model
def _value_info(g: Graph, name: str) -> onnx.ValueInfoProto:
    t = g.types[name]
    return helper.make_tensor_value_info(name, _DTYPE[t.dtype], list(t.shape))


def _check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_EXPORT_OPSET <= opset <= newest:
        raise ValueError(f"ONNX export supports opsets {MIN_EXPORT_OPSET}..{newest}, got {opset}")


def _int4_only_constants(graph: Graph) -> set[str]:
    """Constants read only by int4 DequantizeLinear nodes."""
    readers: dict[str, set[bool]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.constants:
                readers.setdefault(v, set()).add(n.op == "dequantize_linear" and i == 0 and n.attrs["bits"] == 4)
    return {c for c, kinds in readers.items() if kinds == {True} and c not in graph.outputs}


def needed_opset(graph: Graph, opset: int = OPSET) -> int:
    """``opset``, raised to 21 when the graph holds int4 weights (ONNX INT4 needs opset 21) and to 19
    when a resize uses half_pixel_symmetric coordinates (new in Resize-19)."""
    if any(n.op == "dequantize_linear" and n.attrs["bits"] == 4 for n in graph.nodes):
        return max(opset, 21)
    if any(n.op == "resize" and n.attrs["coordinate_transformation_mode"] == "half_pixel_symmetric"
           for n in graph.nodes):
        return max(opset, 19)
    return opset


def to_onnx(graph: Graph, opset: int | None = None) -> onnx.ModelProto:
    """Export ``graph`` to a standard ONNX model at ``opset`` (default: OPSET, or 21 for int4
    weights; checker-valid; the same graph gives the same bytes).  Raises IRVerificationError for
    an op without a mapping."""
    opset = needed_opset(graph) if opset is None else opset
    _check_opset(opset)
    e = _Emitter(graph, opset)
    int4_only = _int4_only_constants(graph)
    for cname, arr in graph.constants.items():
        if cname not in int4_only:  # those are written as INT4 initializers by their DequantizeLinear
            e.inits.append(numpy_helper.from_array(np.asarray(arr), cname))
    for n in graph.nodes:
        emit = EMITTERS.get(n.op)
        if emit is None:
            raise IRVerificationError(f"ONNX export has no mapping for op '{n.op}' (node '{n.name}')")
        before = len(e.nodes)
        emit(e, n)
        if n.meta:
            text = meta_json(n.meta)
            for proto in e.nodes[before:]:
                helper.set_metadata_props(proto, {"qcompile.meta": text})
    outputs = set(graph.outputs)
    g = helper.make_graph(e.nodes, graph.name, [_value_info(graph, i) for i in graph.inputs],
                          [_value_info(graph, o) for o in graph.outputs], initializer=e.inits,
                          value_info=[_value_info(graph, o) for n in graph.nodes for o in n.outputs
                                      if o not in outputs])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="qcompile",
                              ir_version=helper.find_min_ir_version_for(opsets))
    from qcompile import __version__

    model.producer_version = __version__
    if graph.meta:
        helper.set_model_props(model, {"qcompile.graph_meta": meta_json(graph.meta)})
    return model


def save_onnx(graph: Graph, path: str | Path, opset: int | None = None) -> Path:
    """Export ``graph``, check it with ``onnx.checker`` (full check) and write it to ``path``."""
    model = to_onnx(graph, opset)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path
