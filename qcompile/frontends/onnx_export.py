"""IR -> standard ONNX (opset 17), deterministic bytes, provenance kept in metadata.

Every IR op maps to standard ONNX operators (``linear`` -> Gemm(transB=1) for
rank-2 inputs, else MatMul + Add; ``clip`` -> Clip with constant bounds;
``silu`` -> Sigmoid * x; ``gelu`` -> its erf / tanh formula).  Node ``meta``
(provenance, costs) is stored as JSON under the node's ``qcompile.meta``
metadata key and ``graph.meta`` under the model's ``qcompile.graph_meta``, so
:func:`~qcompile.frontends.onnx_frontend.load_onnx` restores them.
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

_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8,
          "uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
          "bool": TensorProto.BOOL}


class _Emitter:
    def __init__(self, graph: Graph):
        self.g = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, hint: str, value: np.ndarray) -> str:
        self._n += 1
        name = f"{hint}__c{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def tmp(self, hint: str) -> str:
        self._n += 1
        return f"{hint}__t{self._n}"

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.nodes.append(n)
        return n


def _json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _pool_attrs(a: dict) -> dict:
    return {"kernel_shape": list(a["kernel"]), "strides": list(a["strides"]),
            "pads": [a["pads"][0], a["pads"][1], a["pads"][2], a["pads"][3]], "ceil_mode": int(a["ceil_mode"])}


def _emit_conv2d(e: _Emitter, n: Node) -> None:
    a = n.attrs
    w = e.g.types[n.inputs[1]].shape
    e.node("Conv", [i for i in n.inputs if i], n.outputs, n.name, kernel_shape=list(w[2:]),
           strides=list(a["strides"]), pads=list(a["pads"]), dilations=list(a["dilations"]), group=a["group"])


def _emit_linear(e: _Emitter, n: Node) -> None:
    x = e.g.types[n.inputs[0]]
    has_bias = len(n.inputs) > 2 and bool(n.inputs[2])
    if x.rank == 2:
        e.node("Gemm", [i for i in n.inputs if i], n.outputs, n.name, transB=1)
        return
    wt = e.g.constants.get(n.inputs[1])
    if wt is None:
        t = e.tmp(n.name)
        e.node("Transpose", [n.inputs[1]], [t], n.name + "/transpose_w", perm=[1, 0])
    else:
        t = e.const(n.inputs[1] + "_T", np.ascontiguousarray(wt.T))
    if not has_bias:
        e.node("MatMul", [n.inputs[0], t], n.outputs, n.name)
        return
    mm = e.tmp(n.name)
    e.node("MatMul", [n.inputs[0], t], [mm], n.name + "/matmul")
    e.node("Add", [mm, n.inputs[2]], n.outputs, n.name)


def _emit_clip(e: _Emitter, n: Node) -> None:
    dt = np.dtype(e.g.types[n.inputs[0]].dtype)
    lo = e.const(n.name + "_min", np.array(n.attrs["min"], dt)) if n.attrs["min"] is not None else ""
    hi = e.const(n.name + "_max", np.array(n.attrs["max"], dt)) if n.attrs["max"] is not None else ""
    ins = [n.inputs[0], lo, hi]
    while ins and ins[-1] == "":
        ins.pop()
    e.node("Clip", ins, n.outputs, n.name)


def _emit_gelu(e: _Emitter, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    c = lambda v: e.const(n.name, np.array(v, np.float32))  # noqa: E731
    if n.attrs["approximate"] == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3, inner, th = e.tmp(n.name), e.tmp(n.name), e.tmp(n.name)
        e.node("Mul", [x, x], [x3 + "sq"], n.name + "/sq")
        e.node("Mul", [x3 + "sq", x], [x3], n.name + "/cube")
        a = e.tmp(n.name)
        e.node("Mul", [x3, c(0.044715)], [a], n.name + "/a")
        b = e.tmp(n.name)
        e.node("Add", [x, a], [b], n.name + "/b")
        e.node("Mul", [b, c(math.sqrt(2 / math.pi))], [inner], n.name + "/inner")
        e.node("Tanh", [inner], [th], n.name + "/tanh")
        s = th
    else:
        # 0.5 x (1 + erf(x / sqrt(2)))
        d, s = e.tmp(n.name), e.tmp(n.name)
        e.node("Mul", [x, c(1 / math.sqrt(2))], [d], n.name + "/scale")
        e.node("Erf", [d], [s], n.name + "/erf")
    one, half = e.tmp(n.name), e.tmp(n.name)
    e.node("Add", [s, c(1.0)], [one], n.name + "/one")
    e.node("Mul", [x, one], [half], n.name + "/mul")
    e.node("Mul", [half, c(0.5)], [y], n.name)


def _emit_silu(e: _Emitter, n: Node) -> None:
    s = e.tmp(n.name)
    e.node("Sigmoid", [n.inputs[0]], [s], n.name + "/sigmoid")
    e.node("Mul", [n.inputs[0], s], n.outputs, n.name)


def _simple(op_type: str, **fixed: Any) -> Callable[[_Emitter, Node], None]:
    def emit(e: _Emitter, n: Node) -> None:
        e.node(op_type, [i for i in n.inputs if i], n.outputs, n.name, **fixed)
    return emit


def _with_attrs(op_type: str, conv: Callable[[dict], dict]) -> Callable[[_Emitter, Node], None]:
    def emit(e: _Emitter, n: Node) -> None:
        e.node(op_type, [i for i in n.inputs if i], n.outputs, n.name, **conv(n.attrs))
    return emit


def _emit_reshape(e: _Emitter, n: Node) -> None:
    shape = e.const(n.name + "_shape", np.array(n.attrs["shape"], np.int64))
    e.node("Reshape", [n.inputs[0], shape], n.outputs, n.name)


def _emit_reduce_mean(e: _Emitter, n: Node) -> None:
    # opset 17: axes is an attribute of ReduceMean (it became an input in opset 18)
    e.node("ReduceMean", [n.inputs[0]], n.outputs, n.name, axes=list(n.attrs["axes"]),
           keepdims=int(n.attrs["keepdims"]))


EMITTERS: dict[str, Callable[[_Emitter, Node], None]] = {
    "conv2d": _emit_conv2d,
    "linear": _emit_linear,
    "matmul": _simple("MatMul"),
    "batch_norm": _with_attrs("BatchNormalization", lambda a: {"epsilon": float(a["epsilon"])}),
    "relu": _simple("Relu"), "sigmoid": _simple("Sigmoid"), "tanh": _simple("Tanh"), "exp": _simple("Exp"),
    "sqrt": _simple("Sqrt"), "erf": _simple("Erf"), "neg": _simple("Neg"), "abs": _simple("Abs"),
    "reciprocal": _simple("Reciprocal"), "identity": _simple("Identity"), "hardswish": _simple("HardSwish"),
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
    "softmax": _with_attrs("Softmax", lambda a: {"axis": int(a["axis"])}),
}


def _value_info(g: Graph, name: str) -> onnx.ValueInfoProto:
    t = g.types[name]
    return helper.make_tensor_value_info(name, _DTYPE[t.dtype], list(t.shape))


def to_onnx(graph: Graph, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``graph`` to an ONNX model (checker-valid; same graph -> same bytes)."""
    e = _Emitter(graph)
    for cname, arr in graph.constants.items():
        e.inits.append(numpy_helper.from_array(np.asarray(arr), cname))
    for n in graph.nodes:
        emit = EMITTERS.get(n.op)
        if emit is None:
            raise IRVerificationError(f"ONNX export has no mapping for op '{n.op}' (node '{n.name}')")
        before = len(e.nodes)
        emit(e, n)
        if n.meta:
            text = json.dumps(n.meta, sort_keys=True, default=_json)
            for proto in e.nodes[before:]:
                helper.set_metadata_props(proto, {"qcompile.meta": text})
    g = helper.make_graph(e.nodes, graph.name, [_value_info(graph, i) for i in graph.inputs],
                          [_value_info(graph, o) for o in graph.outputs], initializer=e.inits,
                          value_info=[_value_info(graph, o) for n in graph.nodes for o in n.outputs
                                      if o not in graph.outputs])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="qcompile",
                              ir_version=10)
    from qcompile import __version__

    model.producer_version = __version__
    if graph.meta:
        helper.set_model_props(model, {"qcompile.graph_meta": json.dumps(graph.meta, sort_keys=True, default=_json)})
    return model


def save_onnx(graph: Graph, path: str | Path) -> Path:
    """Export and write ``graph``; the model passes ``onnx.checker`` (full check) first."""
    model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path
