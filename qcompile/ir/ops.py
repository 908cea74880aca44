"""Operator schemas: attributes with defaults, shape/type inference and MAC counts.

Layouts are NCHW; semantics follow ONNX unless stated.  Conventions:

* ``conv2d(x, w[, b])``: ``w`` is (C_out, C_in/group, kH, kW); ``pads`` is
  (top, left, bottom, right).  MACs = N * C_out * H_out * W_out * (C_in/group) * kH * kW.
* ``linear(x, w[, b])``: y = x @ w^T + b with ``w`` (out, in) — torch's layout.
  MACs = prod(x.shape[:-1]) * out * in.
* ``matmul(a, b)``: numpy ``matmul`` broadcasting; MACs = prod(batch) * M * K * N.
* ``batch_norm(x, scale, bias, mean, var)``: y = scale * (x - mean) / sqrt(var + epsilon) + bias
  over channel axis 1 (inference form).
* ``layer_norm(x, scale[, bias])``: y = (x - m) / sqrt(v + epsilon) * scale + bias with m, v the
  mean and biased variance of x over ``axes`` (any increasing set, e.g. (1,) for the channels of an
  NCHW map, (rank-1,) for the last axis); scale / bias have shape ``(x.shape[a] for a in axes)``.
* pools: ``kernel``, ``strides``, ``pads`` (t, l, b, r), ``ceil_mode``;
  ``avg_pool2d`` has ``count_include_pad``.
* ``clip(x)`` with attributes ``min``/``max`` (None = unbounded);
  ``hardsigmoid``: max(0, min(1, alpha*x + beta)); ``hardswish``: x * hardsigmoid(x; 1/6, 1/2).
* ``reshape`` takes a fully static target ``shape`` attribute (no -1 / 0 after import).
* ``conv_transpose2d(x, w[, b])``: ONNX ConvTranspose / torch ``conv_transpose2d``; ``w`` is
  (C_in, C_out/group, kH, kW); ``pads`` (t, l, b, r) crop the full output, ``output_padding``
  (h, w) extends it at the end (bottom / right) and is below max(stride, dilation) (as in torch and
  onnxruntime), so H_out = (H - 1) * s - p_t - p_b + d * (kH - 1) + 1 + op_h.
  MACs = N * C_in * H * W * (C_out/group) * kH * kW (every input pixel meets a kernel).
* ``resize(x)``: ONNX Resize of H and W of an NCHW tensor to ``sizes`` (H_out, W_out);
  ``scales`` (s_h, s_w) are the factors the source coordinates are computed with (ONNX: the
  given scales, or sizes / input size); ``sizes`` must be ``floor(in * scale)`` or ``scale`` must
  be ``float32(out) / float32(in)``.  ``mode`` nearest | linear (bilinear, edge clamped);
  ``coordinate_transformation_mode`` and ``nearest_mode`` as ONNX (see
  :func:`resize_source_coords`).  MACs: 0 (nearest), 4 per output element (linear).
* ``slice(x)``: ONNX Slice with static, normalised ``starts``/``ends``/``axes``/``steps``
  (:func:`normalize_slice`): axes distinct in [0, rank); step > 0: 0 <= start < end <= dim;
  step < 0: -1 <= end < start <= dim - 1 (end -1 means "through index 0"); never empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from qcompile.errors import IRVerificationError, ShapeError
from qcompile.ir.graph import Node, TensorType

REQUIRED = object()

InferFn = Callable[[list, dict, Node], list]
MacsFn = Callable[[list, list, dict], int]


@dataclass(frozen=True)
class OpSchema:
    name: str
    min_inputs: int
    max_inputs: int
    attrs: dict[str, Any]
    infer_fn: InferFn
    macs_fn: MacsFn | None = None
    doc: str = ""
    num_outputs: int = 1
    elementwise: bool = False
    weight_inputs: tuple[int, ...] = field(default=())

    def complete_attrs(self, attrs: dict[str, Any], node_name: str = "") -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRVerificationError(f"op '{self.name}' (node '{node_name}') has unknown attributes {sorted(unknown)}")
        out = {}
        for k, default in self.attrs.items():
            if k in attrs:
                v = attrs[k]
                out[k] = tuple(v) if isinstance(v, list) else v
            elif default is REQUIRED:
                raise IRVerificationError(f"op '{self.name}' (node '{node_name}') needs attribute '{k}'")
            else:
                out[k] = default
        return out

    def infer(self, in_types: list[TensorType | None], attrs: dict[str, Any], node: Node) -> list[TensorType]:
        n = len(in_types)
        if not self.min_inputs <= n <= self.max_inputs:
            raise IRVerificationError(
                f"op '{self.name}' (node '{node.name}') takes {self.min_inputs}..{self.max_inputs} inputs, got {n}")
        for i in range(self.min_inputs):
            if in_types[i] is None:
                raise IRVerificationError(f"op '{self.name}' (node '{node.name}') input {i} is required")
        try:
            return list(self.infer_fn(in_types, attrs, node))
        except (ShapeError, IRVerificationError):
            raise
        except Exception as e:  # shape arithmetic failed: name the node
            raise ShapeError(f"shape inference failed for op '{self.name}' at node '{node.name}' "
                             f"with inputs {[str(t) for t in in_types]}: {e}") from e

    def macs(self, in_types: list, out_types: list, attrs: dict[str, Any]) -> int:
        return int(self.macs_fn(in_types, out_types, attrs)) if self.macs_fn else 0


_REGISTRY: dict[str, OpSchema] = {}


def register(schema: OpSchema) -> OpSchema:
    if schema.name in _REGISTRY:
        raise ValueError(f"op '{schema.name}' registered twice")
    _REGISTRY[schema.name] = schema
    return schema


def get(name: str) -> OpSchema:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRVerificationError(f"unknown IR op '{name}'; known: {sorted(_REGISTRY)}") from None


def all_ops() -> dict[str, OpSchema]:
    return dict(_REGISTRY)


# --------------------------------------------------------------------- helpers
def _check(cond: bool, node: Node, msg: str) -> None:
    if not cond:
        raise ShapeError(f"node '{node.name}' ({node.op}): {msg}")


def broadcast_shapes(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(tuple(a), tuple(b)))


def conv_out_size(size: int, k: int, stride: int, pad_begin: int, pad_end: int, dilation: int,
                  ceil_mode: bool = False) -> int:
    eff = dilation * (k - 1) + 1
    num = size + pad_begin + pad_end - eff
    out = (math.ceil(num / stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # last window must start inside the input or left padding (ONNX/torch rule)
    return out


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------- conv / linear
def _conv2d_infer(t, a, node):
    x, w = t[0], t[1]
    _check(x.rank == 4 and w.rank == 4, node, f"expects 4-D input and weight, got {x} and {w}")
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    g = a["group"]
    _check(c % g == 0 and co % g == 0, node, f"channels {c}->{co} not divisible by group {g}")
    _check(cig * g == c, node, f"weight expects {cig * g} input channels, input has {c}")
    if len(t) > 2 and t[2] is not None:
        _check(t[2].shape == (co,), node, f"bias shape {t[2].shape} != ({co},)")
    st, pd, dl = a["strides"], a["pads"], a["dilations"]
    ho = conv_out_size(h, kh, st[0], pd[0], pd[2], dl[0])
    wo = conv_out_size(wd, kw, st[1], pd[1], pd[3], dl[1])
    _check(ho > 0 and wo > 0, node, f"output spatial size {ho}x{wo} is empty")
    return [TensorType((n, co, ho, wo), x.dtype)]


def _conv2d_macs(t, o, a):
    co, cig, kh, kw = t[1].shape
    n, _, ho, wo = o[0].shape
    return n * co * ho * wo * cig * kh * kw


register(OpSchema(
    "conv2d", 2, 3,
    {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1},
    _conv2d_infer, _conv2d_macs, weight_inputs=(1, 2),
    doc="2-D convolution, NCHW / OIHW, pads (t,l,b,r)."))


def _conv_transpose2d_infer(t, a, node):
    x, w = t[0], t[1]
    _check(x.rank == 4 and w.rank == 4, node, f"expects 4-D input and weight, got {x} and {w}")
    n, c, h, wd = x.shape
    ci, cog, kh, kw = w.shape
    g = a["group"]
    _check(g >= 1 and c % g == 0, node, f"input channels {c} not divisible by group {g}")
    _check(ci == c, node, f"weight expects {ci} input channels (C_in, C_out/group, kH, kW), input has {c}")
    co = cog * g
    if len(t) > 2 and t[2] is not None:
        _check(t[2].shape == (co,), node, f"bias shape {t[2].shape} != ({co},)")
    st, pd, dl, op = a["strides"], a["pads"], a["dilations"], a["output_padding"]
    _check(len(st) == 2 and len(dl) == 2 and len(pd) == 4 and len(op) == 2, node,
           f"strides {st}, dilations {dl}, output_padding {op} need 2 values and pads {pd} 4")
    _check(min(st) >= 1 and min(dl) >= 1 and min(pd) >= 0 and min(op) >= 0, node,
           f"strides {st} / dilations {dl} must be >= 1, pads {pd} / output_padding {op} >= 0")
    _check(all(o < max(s, d) for o, s, d in zip(op, st, dl)), node,
           f"output_padding {op} must be below max(stride, dilation) per axis (strides {st}, dilations {dl})")
    ho = (h - 1) * st[0] - pd[0] - pd[2] + dl[0] * (kh - 1) + 1 + op[0]
    wo = (wd - 1) * st[1] - pd[1] - pd[3] + dl[1] * (kw - 1) + 1 + op[1]
    _check(ho > 0 and wo > 0, node, f"output spatial size {ho}x{wo} is empty")
    return [TensorType((n, co, ho, wo), x.dtype)]


def _conv_transpose2d_macs(t, o, a):
    _, cog, kh, kw = t[1].shape
    return t[0].numel * cog * kh * kw


register(OpSchema(
    "conv_transpose2d", 2, 3,
    {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1, "output_padding": (0, 0)},
    _conv_transpose2d_infer, _conv_transpose2d_macs, weight_inputs=(1, 2),
    doc="2-D transposed convolution, NCHW / (C_in, C_out/group, kH, kW), pads (t,l,b,r) crop the "
        "output, output_padding (h, w) extends it at the end."))


def _linear_infer(t, a, node):
    x, w = t[0], t[1]
    _check(w.rank == 2, node, f"weight must be 2-D (out, in), got {w}")
    _check(x.rank >= 1 and x.shape[-1] == w.shape[1], node, f"input {x} does not match weight {w}")
    if len(t) > 2 and t[2] is not None:
        _check(t[2].shape == (w.shape[0],), node, f"bias shape {t[2].shape} != ({w.shape[0]},)")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


register(OpSchema(
    "linear", 2, 3, {}, _linear_infer,
    lambda t, o, a: int(np.prod(t[0].shape[:-1], dtype=np.int64)) * t[1].shape[0] * t[1].shape[1],
    weight_inputs=(1, 2), doc="y = x @ w^T + b, w is (out, in)."))


def _matmul_infer(t, a, node):
    x, y = t
    _check(x.rank >= 2 and y.rank >= 2, node, f"matmul needs rank >= 2 operands, got {x}, {y}")
    _check(x.shape[-1] == y.shape[-2], node, f"inner dimensions differ: {x} @ {y}")
    batch = broadcast_shapes(x.shape[:-2], y.shape[:-2])
    return [TensorType(batch + (x.shape[-2], y.shape[-1]), x.dtype)]


register(OpSchema(
    "matmul", 2, 2, {}, _matmul_infer,
    lambda t, o, a: int(np.prod(o[0].shape, dtype=np.int64)) * t[0].shape[-1],
    doc="numpy-style batched matrix multiply."))


def _bn_infer(t, a, node):
    x = t[0]
    _check(x.rank >= 2, node, f"batch_norm needs rank >= 2, got {x}")
    for p in t[1:]:
        _check(p.shape == (x.shape[1],), node, f"parameter shape {p.shape} != ({x.shape[1]},)")
    return [x]


register(OpSchema("batch_norm", 5, 5, {"epsilon": 1e-5}, _bn_infer,
                  lambda t, o, a: t[0].numel, weight_inputs=(1, 2, 3, 4),
                  doc="inference batch norm over axis 1."))


def layer_norm_param_shape(x_shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """Shape of ``layer_norm``'s scale and bias: the normalised dims of ``x``, in axis order."""
    return tuple(int(x_shape[ax]) for ax in axes)


def _layer_norm_infer(t, a, node):
    x = t[0]
    axes = tuple(a["axes"])
    _check(len(axes) >= 1 and list(axes) == sorted(set(axes)) and all(0 <= ax < x.rank for ax in axes), node,
           f"axes {axes} must be distinct, increasing and in [0, {x.rank}) for {x}")
    want = layer_norm_param_shape(x.shape, axes)
    for p, what in zip(t[1:], ("scale", "bias")):
        if p is not None:
            _check(p.shape == want and p.dtype == x.dtype, node,
                   f"{what} {p} must be {x.dtype} of shape {want} (x's dims at axes {axes})")
    _check(float(a["epsilon"]) >= 0, node, f"epsilon {a['epsilon']} must be >= 0")
    return [x]


register(OpSchema(
    "layer_norm", 2, 3, {"axes": REQUIRED, "epsilon": 1e-5}, _layer_norm_infer,
    lambda t, o, a: 2 * t[0].numel, weight_inputs=(1, 2),
    doc="y = (x - m) / sqrt(v + epsilon) * scale + bias, m and v the mean and biased variance over "
        "`axes` (keepdims); scale / bias have the shape of x's dims at `axes` and broadcast along them."))


# --------------------------------------------------------------------- elementwise
def _same(t, a, node):
    return [t[0]]


UNARY_OPS = {
    "relu": {}, "sigmoid": {}, "tanh": {}, "exp": {}, "sqrt": {}, "erf": {}, "neg": {},
    "abs": {}, "reciprocal": {}, "identity": {}, "hardswish": {}, "silu": {},
    "hardsigmoid": {"alpha": 0.2, "beta": 0.5},
    "clip": {"min": None, "max": None},
    "leaky_relu": {"alpha": 0.01},
    "gelu": {"approximate": "none"},
}
for _name, _attrs in UNARY_OPS.items():
    register(OpSchema(_name, 1, 1, _attrs, _same, elementwise=True))


def _binary_infer(t, a, node):
    x, y = t
    try:
        shape = broadcast_shapes(x.shape, y.shape)
    except ValueError:
        raise ShapeError(f"node '{node.name}' ({node.op}): cannot broadcast {x} with {y}") from None
    _check(x.dtype == y.dtype, node, f"dtype mismatch {x.dtype} vs {y.dtype}")
    return [TensorType(shape, x.dtype)]


BINARY_OPS = ("add", "sub", "mul", "div", "pow", "max", "min")
for _name in BINARY_OPS:
    register(OpSchema(_name, 2, 2, {}, _binary_infer, elementwise=True,
                      doc="numpy broadcasting elementwise binary op."))


# --------------------------------------------------------------------- pooling
def _pool_infer(t, a, node):
    x = t[0]
    _check(x.rank == 4, node, f"expects NCHW input, got {x}")
    n, c, h, w = x.shape
    k, st, pd = a["kernel"], a["strides"], a["pads"]
    dl = a.get("dilations", (1, 1))
    ceil = bool(a["ceil_mode"])
    ho = conv_out_size(h, k[0], st[0], pd[0], pd[2], dl[0], ceil)
    wo = conv_out_size(w, k[1], st[1], pd[1], pd[3], dl[1], ceil)
    _check(ho > 0 and wo > 0, node, f"output spatial size {ho}x{wo} is empty")
    return [TensorType((n, c, ho, wo), x.dtype)]


_POOL = {"kernel": REQUIRED, "strides": (1, 1), "pads": (0, 0, 0, 0), "ceil_mode": 0}
register(OpSchema("max_pool2d", 1, 1, {**_POOL, "dilations": (1, 1)}, _pool_infer,
                  lambda t, o, a: o[0].numel * a["kernel"][0] * a["kernel"][1]))
register(OpSchema("avg_pool2d", 1, 1, {**_POOL, "count_include_pad": 0}, _pool_infer,
                  lambda t, o, a: o[0].numel * a["kernel"][0] * a["kernel"][1]))


def _gap_infer(t, a, node):
    x = t[0]
    _check(x.rank == 4, node, f"expects NCHW input, got {x}")
    return [TensorType(x.shape[:2] + (1, 1), x.dtype)]


register(OpSchema("global_avg_pool", 1, 1, {}, _gap_infer, lambda t, o, a: t[0].numel,
                  doc="mean over H and W, keeps dims: (N,C,H,W) -> (N,C,1,1)."))


def _reduce_infer(t, a, node):
    x = t[0]
    axes = sorted(_norm_axis(ax, x.rank) for ax in a["axes"])
    _check(all(0 <= ax < x.rank for ax in axes), node, f"axes {a['axes']} out of range for {x}")
    if a["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return [TensorType(shape, x.dtype)]


register(OpSchema("reduce_mean", 1, 1, {"axes": REQUIRED, "keepdims": 1}, _reduce_infer,
                  lambda t, o, a: t[0].numel))


# --------------------------------------------------------------------- layout
def _concat_infer(t, a, node):
    r = t[0].rank
    ax = _norm_axis(a["axis"], r)
    _check(0 <= ax < r, node, f"axis {a['axis']} out of range for rank {r}")
    for x in t[1:]:
        _check(x.rank == r and all(x.shape[i] == t[0].shape[i] for i in range(r) if i != ax),
               node, f"operands {[str(x) for x in t]} disagree off axis {ax}")
    shape = list(t[0].shape)
    shape[ax] = sum(x.shape[ax] for x in t)
    return [TensorType(tuple(shape), t[0].dtype)]


register(OpSchema("concat", 1, 1 << 16, {"axis": REQUIRED}, _concat_infer))


def _reshape_infer(t, a, node):
    shape = tuple(int(d) for d in a["shape"])
    _check(all(d >= 0 for d in shape), node, f"reshape target {shape} must be static (no -1/0)")
    _check(int(np.prod(shape, dtype=np.int64)) == t[0].numel, node, f"cannot reshape {t[0]} to {shape}")
    return [TensorType(shape, t[0].dtype)]


register(OpSchema("reshape", 1, 1, {"shape": REQUIRED}, _reshape_infer))


def _flatten_infer(t, a, node):
    x = t[0]
    ax = _norm_axis(a["axis"], x.rank)
    lead = int(np.prod(x.shape[:ax], dtype=np.int64))
    return [TensorType((lead, x.numel // max(lead, 1) if lead else 0), x.dtype)]


register(OpSchema("flatten", 1, 1, {"axis": 1}, _flatten_infer))


def _transpose_infer(t, a, node):
    x = t[0]
    perm = tuple(a["perm"])
    _check(sorted(perm) == list(range(x.rank)), node, f"perm {perm} invalid for {x}")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


register(OpSchema("transpose", 1, 1, {"perm": REQUIRED}, _transpose_infer))


def normalize_slice(shape: Sequence[int], starts: Sequence[int], ends: Sequence[int],
                    axes: Sequence[int] | None = None, steps: Sequence[int] | None = None
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """ONNX Slice parameters made static and canonical for ``shape`` (the ``slice`` op's form).

    Negative starts / ends count from the end of the axis; then, for a positive step, start and end
    are clamped to [0, dim]; for a negative step start to [0, dim - 1] and end to [-1, dim - 1]
    (so ``INT64_MAX`` / ``INT64_MIN`` ends mean "to the end" / "through index 0").  Axes default
    to 0..len(starts)-1 and steps to 1.  Raises ValueError for a zero step, an axis out of range or
    repeated, or mismatched lengths; the result may describe an empty slice (callers refuse it)."""
    rank = len(shape)
    k = len(starts)
    axes = list(range(k)) if axes is None else [int(x) for x in axes]
    steps = [1] * k if steps is None else [int(x) for x in steps]
    if not (len(ends) == len(axes) == len(steps) == k):
        raise ValueError(f"starts {list(starts)}, ends {list(ends)}, axes {axes} and steps {steps} "
                         "must have the same length")
    out_s, out_e, out_a, out_st = [], [], [], []
    for start, end, ax, st in zip(starts, ends, axes, steps):
        if not -rank <= ax < rank:
            raise ValueError(f"axis {ax} is out of range for rank {rank}")
        ax = _norm_axis(ax, rank)
        if ax in out_a:
            raise ValueError(f"axis {ax} is sliced twice")
        if st == 0:
            raise ValueError("a slice step cannot be 0")
        dim = int(shape[ax])
        start, end = int(start), int(end)
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if st > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        out_s.append(start)
        out_e.append(end)
        out_a.append(ax)
        out_st.append(st)
    return tuple(out_s), tuple(out_e), tuple(out_a), tuple(out_st)


def slice_length(start: int, end: int, step: int) -> int:
    """Number of elements a normalised slice (see :func:`normalize_slice`) selects on its axis."""
    return max(0, -(-(end - start) // step))


def _slice_infer(t, a, node):
    x = t[0]
    starts, ends, axes, steps = (tuple(a[k]) for k in ("starts", "ends", "axes", "steps"))
    _check(len(starts) == len(ends) == len(axes) == len(steps) >= 1, node,
           f"starts {starts}, ends {ends}, axes {axes}, steps {steps} must be non-empty and of equal length")
    _check(len(set(axes)) == len(axes) and all(0 <= ax < x.rank for ax in axes), node,
           f"axes {axes} must be distinct and in [0, {x.rank}) for {x}")
    shape = list(x.shape)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        dim = x.shape[ax]
        ok = (0 <= s < e <= dim) if st > 0 else (st < 0 and -1 <= e < s <= dim - 1)
        _check(ok, node, f"slice {s}:{e}:{st} of axis {ax} (size {dim}) is not normalised and non-empty "
                         "(use ops.normalize_slice)")
        shape[ax] = slice_length(s, e, st)
    return [TensorType(tuple(shape), x.dtype)]


register(OpSchema("slice", 1, 1, {"starts": REQUIRED, "ends": REQUIRED, "axes": REQUIRED, "steps": REQUIRED},
                  _slice_infer, doc="ONNX Slice with static normalised parameters (normalize_slice)."))


RESIZE_MODES = ("nearest", "linear")
RESIZE_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                           "asymmetric")
"""ONNX's coordinate modes qcompile implements; not tf_crop_and_resize (needs roi) nor
tf_half_pixel_for_nearest (onnxruntime implements it only under the non-standard name
tf_half_pixel_for_nn, so no reference runs it)."""
RESIZE_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def resize_output_size(size: int, scale: float) -> int:
    """ONNX / onnxruntime output length for a scale: floor(float32(scale) * size)."""
    return int(math.floor(float(np.float32(scale) * np.float32(size))))


def resize_source_coords(in_len: int, out_len: int, scale: float, mode: str) -> np.ndarray:
    """Source coordinate (float32) of each of ``out_len`` output positions, ONNX Resize's
    ``coordinate_transformation_mode`` ``mode`` with ``scale``, computed in float32 in
    onnxruntime's order:

    * half_pixel: (x + 0.5) / s - 0.5;  pytorch_half_pixel: the same, or 0 when out_len == 1;
    * half_pixel_symmetric: offset + (x + 0.5) / s - 0.5 with offset = in/2 * (1 - out / (s * in))
      (the last sum in double, as onnxruntime does);
    * align_corners: x * (in - 1) / (out - 1) (0 when out_len == 1);
    * asymmetric: x / s.
    """
    f = np.float32
    x = np.arange(out_len, dtype=f)
    s = f(scale)
    half = f(0.5)
    if mode == "half_pixel":
        return (x + half) / s - half
    if mode == "pytorch_half_pixel":
        return (x + half) / s - half if out_len > 1 else np.zeros(out_len, f)
    if mode == "half_pixel_symmetric":
        adjustment = f(out_len) / (s * f(in_len))
        offset = f(in_len) / f(2.0) * (f(1.0) - adjustment)
        return (np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(f)
    if mode == "align_corners":
        return x * f(in_len - 1) / f(out_len - 1) if out_len > 1 else np.zeros(out_len, f)
    if mode == "asymmetric":
        return x / s
    raise ValueError(f"unknown coordinate_transformation_mode {mode!r}; known: {RESIZE_COORDINATE_MODES}")


def resize_nearest_indices(in_len: int, out_len: int, scale: float, coord_mode: str,
                           nearest_mode: str) -> np.ndarray:
    """Source index (int64) of each output position for ``mode="nearest"``, clamped to [0, in_len)."""
    c = resize_source_coords(in_len, out_len, scale, coord_mode)
    fl = np.floor(c)
    frac = c - fl
    if nearest_mode == "floor":
        idx = fl
    elif nearest_mode == "ceil":
        idx = np.ceil(c)
    elif nearest_mode == "round_prefer_floor":
        idx = fl + (frac > 0.5)
    elif nearest_mode == "round_prefer_ceil":
        idx = fl + (frac >= 0.5)
    else:
        raise ValueError(f"unknown nearest_mode {nearest_mode!r}; known: {RESIZE_NEAREST_MODES}")
    return np.clip(idx, 0, in_len - 1).astype(np.int64)


def resize_linear_weights(in_len: int, out_len: int, scale: float, coord_mode: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) for ``mode="linear"``: output k = w0[k] * x[i0[k]] + w1[k] * x[i1[k]], the
    source coordinate clamped to [0, in_len - 1] (onnxruntime's edge handling)."""
    c = np.clip(resize_source_coords(in_len, out_len, scale, coord_mode), np.float32(0), np.float32(in_len - 1))
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_len - 1)
    w1 = (c - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def _resize_infer(t, a, node):
    x = t[0]
    _check(x.rank == 4, node, f"expects an NCHW input, got {x}")
    _check(a["mode"] in RESIZE_MODES, node, f"mode {a['mode']!r} is not one of {RESIZE_MODES}")
    _check(a["coordinate_transformation_mode"] in RESIZE_COORDINATE_MODES, node,
           f"coordinate_transformation_mode {a['coordinate_transformation_mode']!r} is not one of "
           f"{RESIZE_COORDINATE_MODES}")
    _check(a["nearest_mode"] in RESIZE_NEAREST_MODES, node,
           f"nearest_mode {a['nearest_mode']!r} is not one of {RESIZE_NEAREST_MODES}")
    sizes, scales = tuple(a["sizes"]), tuple(a["scales"])
    _check(len(sizes) == 2 and len(scales) == 2 and min(sizes) >= 1 and min(scales) > 0, node,
           f"sizes {sizes} must be 2 positive ints and scales {scales} 2 positive numbers")
    for n_in, n_out, s in zip(x.shape[2:], sizes, scales):
        _check(resize_output_size(n_in, s) == n_out or np.float32(s) == np.float32(n_out) / np.float32(n_in),
               node, f"sizes {sizes} do not follow from scales {scales} for input {x} (need floor(in * scale) "
                     "== size, or scale == size / in)")
    return [TensorType(x.shape[:2] + sizes, x.dtype)]


register(OpSchema(
    "resize", 1, 1,
    {"sizes": REQUIRED, "scales": REQUIRED, "mode": "nearest", "coordinate_transformation_mode": "half_pixel",
     "nearest_mode": "round_prefer_floor"},
    _resize_infer, lambda t, o, a: o[0].numel * 4 if a["mode"] == "linear" else 0,
    doc="ONNX Resize of H, W (nearest / bilinear); see the module docstring."))


def _softmax_infer(t, a, node):
    ax = _norm_axis(a["axis"], t[0].rank)
    _check(0 <= ax < t[0].rank, node, f"axis {a['axis']} out of range for {t[0]}")
    return [t[0]]


register(OpSchema("softmax", 1, 1, {"axis": -1}, _softmax_infer,
                  lambda t, o, a: t[0].numel))


# --------------------------------------------------------------------- quantization (ONNX QDQ semantics)
def quant_range(dtype: str, bits: int) -> tuple[int, int]:
    """Saturation range of a ``bits``-wide integer stored in ``dtype`` (int4 lives in int8 storage)."""
    if dtype == "uint8":
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_qparams(t, a, node, quantized) -> None:
    x, s = t[0], t[1]
    ax = _norm_axis(a["axis"], x.rank) if x.rank else 0
    _check(s.dtype == "float32", node, f"scale must be float32, got {s}")
    if s.rank == 1 and s.shape[0] != 1:
        _check(0 <= ax < x.rank and s.shape == (x.shape[ax],), node,
               f"per-axis scale {s} must have {x.shape[ax] if 0 <= ax < x.rank else '?'} entries (axis {a['axis']})")
    else:
        _check(s.numel == 1, node, f"scale must be a scalar or 1-D along axis {a['axis']}, got {s}")
    if len(t) > 2 and t[2] is not None:
        _check(t[2].shape == s.shape, node, f"zero point {t[2]} must have the scale's shape {s}")
        _check(t[2].dtype == quantized, node, f"zero point dtype {t[2].dtype} != quantized dtype {quantized}")
    _check(quantized in ("int8", "uint8"), node, f"quantized dtype must be int8 or uint8, got {quantized}")
    _check(a["bits"] in (4, 8), node, f"bits must be 4 or 8, got {a['bits']}")


def _quantize_infer(t, a, node):
    _check(t[0].dtype == "float32", node, f"quantize_linear input must be float32, got {t[0]}")
    _check_qparams(t, a, node, a["dtype"])
    return [TensorType(t[0].shape, a["dtype"])]


def _dequantize_infer(t, a, node):
    _check_qparams(t, a, node, t[0].dtype)
    return [TensorType(t[0].shape, "float32")]


register(OpSchema(
    "quantize_linear", 2, 3, {"axis": 1, "dtype": "int8", "bits": 8}, _quantize_infer,
    doc="q = saturate(round_half_even(x / scale) + zero_point) to the signed (unsigned for uint8) "
        "`bits`-bit range; scale scalar (per tensor) or 1-D along `axis`; zero point optional (0). "
        "ONNX QuantizeLinear; bits=4 keeps int4 values in int8 storage."))
register(OpSchema(
    "dequantize_linear", 2, 3, {"axis": 1, "bits": 8}, _dequantize_infer,
    doc="x = (q - zero_point) * scale, float32 (ONNX DequantizeLinear); `bits` records the width "
        "the integers were quantized to (4: int4 values in int8 storage)."))
