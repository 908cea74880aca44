"""IR -> Relax (NCHW), one Relax op (or a tiny composition) per IR op.

Constants become ``relax.const`` (embedded in the built library).  Batch norm is
emitted as its affine form ``x * s + t`` with ``s = scale / sqrt(var + eps)`` and
``t = bias - mean * s`` precomputed in float64.  Layout changes (NHWC for fast
CPU convolutions) are done afterwards by Relax's own ``ConvertLayout``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from qcompile.errors import UnsupportedOpError
from qcompile.ir.graph import Graph, Node

Emit = Callable[["_Builder", Node, list], relax.Expr]


class _Builder:
    def __init__(self, graph: Graph):
        self.g = graph
        self.bb = relax.BlockBuilder()
        self.env: dict[str, relax.Expr] = {}

    def const(self, value: np.ndarray, dtype: str | None = None) -> relax.Expr:
        arr = np.asarray(value, dtype=dtype) if dtype else np.asarray(value)
        return relax.const(arr)

    def input(self, name: str) -> relax.Expr:
        if name in self.env:
            return self.env[name]
        if name in self.g.constants:
            self.env[name] = self.const(self.g.constants[name])
            return self.env[name]
        raise KeyError(name)

    def scalar(self, v: float, like: str) -> relax.Expr:
        return self.const(np.array(v, dtype=self.g.types[like].dtype))

    def channel_vec(self, vec: np.ndarray, rank: int) -> relax.Expr:
        """(C,) -> (1, C, 1, ..., 1) constant for broadcasting over axis 1."""
        return self.const(vec.reshape((1, -1) + (1,) * (rank - 2)).astype(np.float32))


def _conv2d(b: _Builder, n: Node, v: list) -> relax.Expr:
    a = n.attrs
    y = relax.op.nn.conv2d(v[0], v[1], strides=a["strides"], padding=a["pads"], dilation=a["dilations"],
                           groups=a["group"])
    if len(v) > 2:
        y = b.bb.emit(y)
        y = relax.op.add(y, b.channel_vec(b.g.constants[n.inputs[2]], 4) if n.inputs[2] in b.g.constants
                         else relax.op.reshape(v[2], (1, -1, 1, 1)))
    return y


def _linear(b: _Builder, n: Node, v: list) -> relax.Expr:
    return relax.op.linear(v[0], v[1], v[2] if len(v) > 2 else None)


def _batch_norm(b: _Builder, n: Node, v: list) -> relax.Expr:
    consts = [b.g.constants.get(i) for i in n.inputs[1:]]
    rank = b.g.types[n.inputs[0]].rank
    if all(c is not None for c in consts):
        scale, bias, mean, var = (c.astype(np.float64) for c in consts)
        s = scale / np.sqrt(var + n.attrs["epsilon"])
        t = bias - mean * s
        y = b.bb.emit(relax.op.multiply(v[0], b.channel_vec(s, rank)))
        return relax.op.add(y, b.channel_vec(t, rank))
    shape = (1, -1) + (1,) * (rank - 2)
    scale, bias, mean, var = (relax.op.reshape(x, shape) for x in v[1:])
    inv = relax.op.divide(scale, relax.op.sqrt(relax.op.add(var, b.scalar(n.attrs["epsilon"], n.inputs[0]))))
    return relax.op.add(relax.op.multiply(relax.op.subtract(v[0], mean), inv), bias)


def _clip(b: _Builder, n: Node, v: list) -> relax.Expr:
    """min(max(x, lo), hi) with scalar constants: layout-agnostic broadcasting ops, so ConvertLayout
    keeps NHWC through them (``relax.clip`` has no layout rule and would be wrapped in transposes)."""
    y = v[0]
    if n.attrs["min"] is not None:
        y = b.bb.emit(relax.op.maximum(y, b.scalar(n.attrs["min"], n.inputs[0])))
    if n.attrs["max"] is not None:
        y = relax.op.minimum(y, b.scalar(n.attrs["max"], n.inputs[0]))
    return y


def _bounded(b: _Builder, x: relax.Expr, lo: float, hi: float, like: str) -> relax.Expr:
    return relax.op.minimum(b.bb.emit(relax.op.maximum(x, b.scalar(lo, like))), b.scalar(hi, like))


def _hardsigmoid(b: _Builder, n: Node, v: list) -> relax.Expr:
    x = relax.op.add(relax.op.multiply(v[0], b.scalar(n.attrs["alpha"], n.inputs[0])),
                     b.scalar(n.attrs["beta"], n.inputs[0]))
    return _bounded(b, b.bb.emit(x), 0.0, 1.0, n.inputs[0])


def _hardswish(b: _Builder, n: Node, v: list) -> relax.Expr:
    hs = b.bb.emit(_bounded(b, b.bb.emit(relax.op.add(v[0], b.scalar(3.0, n.inputs[0]))), 0.0, 6.0, n.inputs[0]))
    return relax.op.multiply(v[0], relax.op.multiply(hs, b.scalar(1.0 / 6.0, n.inputs[0])))


def _pool(kind: str):
    def emit(b: _Builder, n: Node, v: list) -> relax.Expr:
        a = n.attrs
        common = dict(pool_size=a["kernel"], strides=a["strides"], padding=a["pads"], ceil_mode=bool(a["ceil_mode"]))
        if kind == "max":
            return relax.op.nn.max_pool2d(v[0], dilation=a["dilations"], **common)
        return relax.op.nn.avg_pool2d(v[0], count_include_pad=bool(a["count_include_pad"]), **common)
    return emit


def _qparams(b: _Builder, n: Node, dtype: str) -> tuple[relax.Expr, relax.Expr]:
    """Scale and zero point (zeros of ``dtype`` when absent) as Relax constants."""
    scale = b.g.constants.get(n.inputs[1])
    zp = b.g.constants.get(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else np.zeros(b.g.types[n.inputs[1]].shape,
                                                                                           dtype)
    if scale is None or zp is None:
        raise UnsupportedOpError(n.op, n.name, "scale and zero point must be constants for TVM", frontend="tvm")
    return b.const(scale.astype(np.float32)), b.const(np.asarray(zp, dtype))


def _quantize(b: _Builder, n: Node, v: list) -> relax.Expr:
    if n.attrs["bits"] != 8:
        raise UnsupportedOpError(n.op, n.name, f"{n.attrs['bits']}-bit activations have no TVM lowering; "
                                 "quantize activations to 8 bits", frontend="tvm")
    s, zp = _qparams(b, n, n.attrs["dtype"])
    return relax.op.quantize(v[0], s, zp, axis=n.attrs["axis"], out_dtype=n.attrs["dtype"])


def _dequantize(b: _Builder, n: Node, v: list) -> relax.Expr:
    s, zp = _qparams(b, n, b.g.types[n.inputs[0]].dtype)
    return relax.op.dequantize(v[0], s, zp, axis=n.attrs["axis"])


def _flatten(b: _Builder, n: Node, v: list) -> relax.Expr:
    return relax.op.reshape(v[0], b.g.types[n.outputs[0]].shape)


_UNARY = {"relu": relax.op.nn.relu, "sigmoid": relax.op.sigmoid, "tanh": relax.op.tanh, "exp": relax.op.exp,
          "sqrt": relax.op.sqrt, "erf": relax.op.erf, "neg": relax.op.negative, "abs": relax.op.abs,
          "silu": relax.op.nn.silu}
_BINARY = {"add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply, "div": relax.op.divide,
           "pow": relax.op.power, "max": relax.op.maximum, "min": relax.op.minimum}

EMITTERS: dict[str, Emit] = {
    "conv2d": _conv2d, "linear": _linear, "matmul": lambda b, n, v: relax.op.matmul(v[0], v[1]),
    "batch_norm": _batch_norm, "clip": _clip, "hardsigmoid": _hardsigmoid, "hardswish": _hardswish,
    "leaky_relu": lambda b, n, v: relax.op.nn.leakyrelu(v[0], float(n.attrs["alpha"])),
    "gelu": lambda b, n, v: (relax.op.nn.gelu_tanh if n.attrs["approximate"] == "tanh" else relax.op.nn.gelu)(v[0]),
    "reciprocal": lambda b, n, v: relax.op.divide(b.scalar(1.0, n.inputs[0]), v[0]),
    "identity": lambda b, n, v: v[0],
    "max_pool2d": _pool("max"), "avg_pool2d": _pool("avg"),
    "global_avg_pool": lambda b, n, v: relax.op.mean(v[0], axis=[2, 3], keepdims=True),
    "reduce_mean": lambda b, n, v: relax.op.mean(v[0], axis=list(n.attrs["axes"]), keepdims=bool(n.attrs["keepdims"])),
    "concat": lambda b, n, v: relax.op.concat(v, axis=n.attrs["axis"]),
    "reshape": lambda b, n, v: relax.op.reshape(v[0], tuple(n.attrs["shape"])),
    "flatten": _flatten,
    "transpose": lambda b, n, v: relax.op.permute_dims(v[0], list(n.attrs["perm"])),
    "softmax": lambda b, n, v: relax.op.nn.softmax(v[0], axis=n.attrs["axis"]),
    "quantize_linear": _quantize, "dequantize_linear": _dequantize,
    **{k: (lambda f: lambda b, n, v: f(v[0]))(f) for k, f in _UNARY.items()},
    **{k: (lambda f: lambda b, n, v: f(v[0], v[1]))(f) for k, f in _BINARY.items()},
}


def to_relax(graph: Graph) -> tvm.IRModule:
    """Build ``main(*inputs) -> output | tuple`` as a Relax IRModule."""
    b = _Builder(graph)
    params = [relax.Var(name, R.Tensor(graph.types[name].shape, graph.types[name].dtype)) for name in graph.inputs]
    with b.bb.function("main", params):
        with b.bb.dataflow():
            for name, p in zip(graph.inputs, params):
                b.env[name] = p
            for n in graph.nodes:
                emit = EMITTERS.get(n.op)
                if emit is None:
                    raise UnsupportedOpError(n.op, n.name, "no TVM lowering for this IR op yet", frontend="tvm")
                b.env[n.outputs[0]] = b.bb.emit(emit(b, n, [b.input(i) for i in n.inputs if i]))
            outs = [b.env[o] for o in graph.outputs]
            result = b.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        b.bb.emit_func_output(result)
    return b.bb.get()
