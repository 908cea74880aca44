"""IR -> Relax (NCHW), one Relax op (or a tiny composition) per IR op.

Constants become ``relax.const`` (embedded in the built library).  Batch norm is
emitted as its affine form ``x * s + t`` with ``s = scale / sqrt(var + eps)`` and
``t = bias - mean * s`` precomputed in float64.  Layout changes (NHWC for fast
CPU convolutions) are done afterwards by Relax's own ``ConvertLayout``.

* ``conv_transpose2d`` with stride == kernel (non-overlapping taps: the usual learned 2x upsampling)
  -> a 1x1 ``conv2d`` + depth-to-space (reshape / permute) + crop, so the conv schedules apply
  (TOPI's transposed convolution, unscheduled, took 150 of PP-OCR det's 177 ms); otherwise
  ``relax.op.nn.conv2d_transpose`` (IOHW weights, TOPI's default lowering); an output_padding TOPI
  cannot take (>= stride) is first traded for less end padding, any rest is zero padding of the
  output (before the bias).
* ``resize`` -> ``relax.op.image.resize2d`` where TVM computes the same source pixels as
  onnxruntime: linear with scale == out / in, and nearest with a power-of-two integer up-scale
  (TVM multiplies by in / out where onnxruntime divides by the scale; only then are both exact,
  so ties and floors agree) or an untouched axis.  Other resizes gather with the indices / weights
  :mod:`qcompile.ir.ops` computes (``take``), exactly the reference's.
* ``slice`` -> ``relax.op.strided_slice`` (positive steps) or ``take`` of the selected indices
  (negative steps).
* ``layer_norm`` -> ``relax.op.nn.layer_norm``; TOPI takes the variance in one pass (E[x²] − E[x]²),
  so its error grows with mean² / variance: 1.5e-5 absolute at mean 100, std 1 (measured).
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


def _conv_transpose2d_as_conv(b: _Builder, n: Node, v: list) -> relax.Expr | None:
    """stride == kernel, dilation 1, no output_padding, constant weight (the usual learned 2x / 4x
    upsampling, e.g. PP-OCR's detector head): every output pixel receives exactly one kernel tap, so
    the layer is a 1x1 convolution to C_out*kH*kW channels (scheduled like any conv) followed by a
    depth-to-space rearrangement and the pads' crop.  None when it does not apply."""
    a = n.attrs
    w = b.g.constants.get(n.inputs[1])
    if w is None or tuple(a["dilations"]) != (1, 1) or tuple(a["output_padding"]) != (0, 0) \
            or tuple(a["strides"]) != tuple(w.shape[2:]):
        return None
    ci, cog, kh, kw = w.shape
    g = a["group"]
    nb, _, h, wd = b.g.types[n.inputs[0]].shape
    # w[ci, co_local, i, j] per group -> 1x1 weight [(group, co_local, i, j), ci_local, 1, 1]
    w1 = w.reshape(g, ci // g, cog, kh, kw).transpose(0, 2, 3, 4, 1).reshape(g * cog * kh * kw, ci // g, 1, 1)
    y = b.bb.emit(relax.op.nn.conv2d(v[0], b.const(np.ascontiguousarray(w1)), groups=g))
    y = b.bb.emit(relax.op.reshape(y, (nb, g * cog, kh, kw, h, wd)))
    y = b.bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
    y = relax.op.reshape(y, (nb, g * cog, h * kh, wd * kw))
    t, l, bo, r = a["pads"]
    if (t, l, bo, r) != (0, 0, 0, 0):
        y = relax.op.strided_slice(b.bb.emit(y), axes=[2, 3], begin=[t, l], end=[h * kh - bo, wd * kw - r],
                                   assume_inbound=True)
    return y


def _conv_transpose2d(b: _Builder, n: Node, v: list) -> relax.Expr:
    a = n.attrs
    y = _conv_transpose2d_as_conv(b, n, v)
    if y is not None:
        if len(v) > 2:
            y = relax.op.add(b.bb.emit(y), b.channel_vec(b.g.constants[n.inputs[2]], 4)
                             if n.inputs[2] in b.g.constants else relax.op.reshape(v[2], (1, -1, 1, 1)))
        return y
    t, l, bo, r = a["pads"]
    (oph, opw), (sh, sw) = a["output_padding"], a["strides"]
    # output_padding only extends the end: trade it for end padding first (the same output), keep what
    # TOPI accepts (< stride), and zero-pad the rest
    cut_b, cut_r = min(bo, oph), min(r, opw)
    bo, r, oph, opw = bo - cut_b, r - cut_r, oph - cut_b, opw - cut_r
    keep_h, keep_w = (oph if oph < sh else 0), (opw if opw < sw else 0)
    y = relax.op.nn.conv2d_transpose(v[0], v[1], strides=a["strides"], padding=(t, l, bo, r),
                                     output_padding=(keep_h, keep_w), dilation=a["dilations"], groups=a["group"])
    if (oph - keep_h, opw - keep_w) != (0, 0):
        y = relax.op.nn.pad(b.bb.emit(y), (0, 0, 0, 0, 0, oph - keep_h, 0, opw - keep_w))
    if len(v) > 2:
        y = b.bb.emit(y)
        y = relax.op.add(y, b.channel_vec(b.g.constants[n.inputs[2]], 4) if n.inputs[2] in b.g.constants
                         else relax.op.reshape(v[2], (1, -1, 1, 1)))
    return y


def _resize_native(n: Node, in_hw: tuple[int, int]) -> bool:
    """Whether ``relax.op.image.resize2d`` computes exactly the IR's source pixels (module docstring)."""
    a = n.attrs
    ctm = a["coordinate_transformation_mode"]
    if ctm not in ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners"):
        return False  # modes TVM's resize2d does not have (half_pixel_symmetric)
    for n_in, n_out, s in zip(in_hw, a["sizes"], a["scales"]):
        s32 = np.float32(s)
        if a["mode"] == "linear":
            if s32 != np.float32(n_out) / np.float32(n_in):
                return False
        elif n_out == n_in and s32 == 1:
            continue
        elif not (float(s32).is_integer() and n_out == n_in * int(s32) and int(s32) & (int(s32) - 1) == 0):
            return False
        elif ctm == "align_corners" and n_in > 1:
            return False  # (in - 1) / (out - 1) is not a power of two: TVM and onnxruntime round it differently
    return True


def _resize(b: _Builder, n: Node, v: list) -> relax.Expr:
    from qcompile.ir import ops

    a = n.attrs
    in_hw = b.g.types[n.inputs[0]].shape[2:]
    ctm = a["coordinate_transformation_mode"]
    if _resize_native(n, in_hw):
        nearest = a["mode"] == "nearest"
        return relax.op.image.resize2d(
            v[0], tuple(a["sizes"]), layout="NCHW", method="nearest_neighbor" if nearest else "linear",
            coordinate_transformation_mode=ctm, rounding_method=a["nearest_mode"] if nearest else "round")
    x = v[0]
    for axis, n_in, n_out, s in zip((2, 3), in_hw, a["sizes"], a["scales"]):
        if a["mode"] == "nearest":
            idx = ops.resize_nearest_indices(n_in, n_out, s, ctm, a["nearest_mode"])
            if n_in != n_out or not np.array_equal(idx, np.arange(n_in)):
                x = b.bb.emit(relax.op.take(x, b.const(idx.astype(np.int32)), axis=axis))
            continue
        i0, i1, w0, w1 = ops.resize_linear_weights(n_in, n_out, s, ctm)
        if n_in == n_out and np.array_equal(i0, np.arange(n_in)) and not np.any(w1):
            continue
        shape = [1, 1, 1, 1]
        shape[axis] = n_out
        lo = b.bb.emit(relax.op.multiply(relax.op.take(x, b.const(i0.astype(np.int32)), axis=axis),
                                         b.const(w0.reshape(shape))))
        hi = b.bb.emit(relax.op.multiply(relax.op.take(x, b.const(i1.astype(np.int32)), axis=axis),
                                         b.const(w1.reshape(shape))))
        x = b.bb.emit(relax.op.add(lo, hi))
    return x


def _slice(b: _Builder, n: Node, v: list) -> relax.Expr:
    a = n.attrs
    pos = [(s, e, ax, st) for s, e, ax, st in zip(a["starts"], a["ends"], a["axes"], a["steps"]) if st > 0]
    x = v[0]
    if pos:
        x = relax.op.strided_slice(x, axes=[p[2] for p in pos], begin=[p[0] for p in pos], end=[p[1] for p in pos],
                                   strides=[p[3] for p in pos], assume_inbound=True)
    for s, e, ax, st in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        if st < 0:
            x = relax.op.take(b.bb.emit(x), b.const(np.arange(s, e, st, dtype=np.int32)), axis=ax)
    return x


PAD_COLUMNS = 16
"""Dense layers whose constant weights have an output count ``N`` that 8 does not divide (a text
recognizer's 6625 classes) get zero columns up to a multiple of this (every target's fp32 vector width
divides it), and the result is sliced back: the dense schedule then runs full vectors with
compile-time-packed weights instead of a bound-checked scalar tail (measured 40 x 120 @ 120 x 6625:
26.9 -> 1.9 ms of CPU on one AVX2 core)."""


def _pad_columns(w: np.ndarray | None, axis: int) -> np.ndarray | None:
    """``w`` with zero slices appended along ``axis`` up to a multiple of PAD_COLUMNS, or None when
    not needed (not a 2-D constant, or 8 already divides the axis, or fewer than 64 columns)."""
    if w is None or w.ndim != 2 or w.shape[axis] % 8 == 0 or w.shape[axis] < 64:
        return None
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, -w.shape[axis] % PAD_COLUMNS)
    return np.pad(w, pad)


def _slice_last(b: _Builder, n: Node, y: relax.Expr, count: int) -> relax.Expr:
    rank = b.g.types[n.outputs[0]].rank
    return relax.op.strided_slice(b.bb.emit(y), axes=[rank - 1], begin=[0], end=[count], assume_inbound=True)


def _linear(b: _Builder, n: Node, v: list) -> relax.Expr:
    w = b.g.constants.get(n.inputs[1])
    padded = _pad_columns(w, 0)  # (out, in): pad the outputs
    if padded is not None and (len(n.inputs) < 3 or n.inputs[2] in b.g.constants):
        bias = None
        if len(n.inputs) > 2:
            bias = b.const(np.pad(b.g.constants[n.inputs[2]], (0, padded.shape[0] - w.shape[0])))
        return _slice_last(b, n, relax.op.linear(v[0], b.const(padded), bias), w.shape[0])
    return relax.op.linear(v[0], v[1], v[2] if len(v) > 2 else None)


def _matmul(b: _Builder, n: Node, v: list) -> relax.Expr:
    w = b.g.constants.get(n.inputs[1])
    padded = _pad_columns(w, 1)  # (K, N): pad the columns
    if padded is not None:
        return _slice_last(b, n, relax.op.matmul(v[0], b.const(padded)), w.shape[1])
    return relax.op.matmul(v[0], v[1])


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


def _layer_norm(b: _Builder, n: Node, v: list) -> relax.Expr:
    """``relax.op.nn.layer_norm`` over the node's axes (gamma / beta have the normalised shape, as in
    the IR); a missing bias is zeros."""
    beta = v[2] if len(v) > 2 else b.const(np.zeros(b.g.types[n.inputs[1]].shape, b.g.types[n.inputs[0]].dtype))
    return relax.op.nn.layer_norm(v[0], v[1], beta, axes=list(n.attrs["axes"]), epsilon=float(n.attrs["epsilon"]))


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
    "conv2d": _conv2d, "conv_transpose2d": _conv_transpose2d, "resize": _resize, "slice": _slice,
    "linear": _linear, "matmul": _matmul,
    "batch_norm": _batch_norm, "layer_norm": _layer_norm,
    "clip": _clip, "hardsigmoid": _hardsigmoid, "hardswish": _hardswish,
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
