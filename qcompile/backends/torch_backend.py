"""The reference interpreter (IR -> ``torch.nn.Module``) and the ``torch`` backend.

:class:`GraphModule` executes IR nodes in graph order with ``torch.nn.functional``.
Its semantics *are* the IR's reference semantics (:mod:`qcompile.ir.ops`), which
follow ONNX where torch differs:

* ``conv2d`` pads are (top, left, bottom, right); asymmetric pads are applied with
  ``F.pad`` before an unpadded convolution;
* pools: explicit pads may be asymmetric; ``max_pool2d`` pads with ``-inf``;
  ``ceil_mode`` adds end padding up to the ONNX/torch output size (a last window
  must start inside the input or the begin padding); ``avg_pool2d`` divides by the
  number of window positions inside the input (``count_include_pad=0``) or inside
  input + explicit pads (``=1``) -- positions added only by ``ceil_mode`` never count;
* ``batch_norm`` is the inference formula y = scale * (x - mean) / sqrt(var + eps) + bias;
* ``flatten`` is ONNX Flatten (2-D result), ``clip`` bounds may be ``None``;
* ``conv_transpose2d``: symmetric pads (and output_padding below stride or dilation) go to
  ``F.conv_transpose2d``; otherwise the full (unpadded) output is computed, extended by
  output_padding with zeros and cropped by the pads, then the bias is added;
* ``resize``: gathers with the source indices (nearest) or the two-tap weights (linear, one axis
  after the other) that :mod:`qcompile.ir.ops` computes exactly as onnxruntime does;
* ``slice``: a view for positive steps, ``index_select`` for negative ones;
* a module may run a larger batch than the graph's static one (fine-tuning, batched
  evaluation): ``reshape`` targets that keep the batch axis leading follow the batch.

Floating constants become trainable ``nn.Parameter`` objects (other dtypes become
buffers), so a compressed graph can be fine-tuned directly; :func:`write_back`
copies the trained values into a clone of the graph.  Quantized graphs train too: in training
mode ``quantize_linear`` rounds with a straight-through estimator and scales get learned-step-size
(LSQ) gradients, integer weights can train through float shadows (:class:`GraphModule`); eval
mode is always the exact inference semantics above.

:class:`TorchBackend` (target ``torch``) runs graphs in memory with this
interpreter; its artifact is ``model.onnx``, loaded back through the ONNX
frontend and run with the same interpreter.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.backends.base import Backend, Runner
from qcompile.errors import InputError, IRVerificationError, ShapeError, UnsupportedOpError
from qcompile.ir.graph import Graph
from qcompile.ir.ops import conv_out_size

Impl = Callable[[list, dict], Any]
"""An op implementation: (input tensors with absent optional inputs dropped, attrs) -> tensor."""


# ============================================================================ op implementations
def _pad_nchw(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad H and W of an NCHW tensor by (top, left, bottom, right) with ``value``."""
    t, l, b, r = pads
    if t == l == b == r == 0:
        return x
    return F.pad(x, (l, r, t, b), value=value)


def _conv2d(v: list, a: dict) -> torch.Tensor:
    """2-D cross-correlation; symmetric pads go to ``F.conv2d``, asymmetric ones through ``F.pad``."""
    x, w = v[0], v[1]
    b = v[2] if len(v) > 2 else None
    t, l, bo, r = a["pads"]
    if t == bo and l == r:
        return F.conv2d(x, w, b, a["strides"], (t, l), a["dilations"], a["group"])
    return F.conv2d(_pad_nchw(x, a["pads"]), w, b, a["strides"], 0, a["dilations"], a["group"])


def _conv_transpose2d(v: list, a: dict) -> torch.Tensor:
    """ONNX ConvTranspose: pads (t, l, b, r) crop the full output, output_padding extends its end."""
    x, w = v[0], v[1]
    b = v[2] if len(v) > 2 else None
    t, l, bo, r = a["pads"]
    st, dl, op = a["strides"], a["dilations"], a["output_padding"]
    if t == bo and l == r and all(o < max(s, d) for o, s, d in zip(op, st, dl)):
        return F.conv_transpose2d(x, w, b, st, (t, l), op, a["group"], dl)
    y = F.conv_transpose2d(x, w, None, st, 0, 0, a["group"], dl)
    y = F.pad(y, (0, op[1], 0, op[0]))
    y = y[:, :, t:y.shape[2] - bo, l:y.shape[3] - r]
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def _resize(v: list, a: dict) -> torch.Tensor:
    """Nearest: gather rows then columns; linear: w0 * x[i0] + w1 * x[i1] along H, then along W."""
    from qcompile.ir import ops

    x = v[0]
    ctm = a["coordinate_transformation_mode"]
    for axis, n_out, scale in ((2, a["sizes"][0], a["scales"][0]), (3, a["sizes"][1], a["scales"][1])):
        n_in = x.shape[axis]
        same = np.arange(n_in)
        if a["mode"] == "nearest":
            idx = ops.resize_nearest_indices(n_in, n_out, scale, ctm, a["nearest_mode"])
            if n_in != n_out or not np.array_equal(idx, same):
                x = x.index_select(axis, torch.from_numpy(idx).to(x.device))
            continue
        i0, i1, w0, w1 = ops.resize_linear_weights(n_in, n_out, scale, ctm)
        if n_in == n_out and np.array_equal(i0, same) and not np.any(w1):
            continue  # this axis is not resized
        shape = [1] * x.dim()
        shape[axis] = n_out
        w0t = torch.from_numpy(w0).to(x.device, x.dtype).reshape(shape)
        w1t = torch.from_numpy(w1).to(x.device, x.dtype).reshape(shape)
        x = x.index_select(axis, torch.from_numpy(i0).to(x.device)) * w0t \
            + x.index_select(axis, torch.from_numpy(i1).to(x.device)) * w1t
    return x


def _slice(v: list, a: dict) -> torch.Tensor:
    """Normalised ONNX Slice (see ``ops.normalize_slice``)."""
    x = v[0]
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        if st > 0:
            index[ax] = slice(s, e, st)
    x = x[tuple(index)]
    for s, e, ax, st in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        if st < 0:
            x = x.index_select(ax, torch.arange(s, e, st, device=x.device))
    return x


def _axis_view(s: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """A scale / zero point shaped to broadcast along ``axis`` (per-axis) or as a scalar."""
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return s.reshape(shape)


def _quantize_linear(v: list, a: dict) -> torch.Tensor:
    """saturate(round_half_even(x / s) + zp); torch.round rounds half to even, like ONNX."""
    from qcompile.ir.ops import quant_range

    x = v[0]
    s = _axis_view(v[1], x.dim(), a["axis"])
    zp = _axis_view(v[2], x.dim(), a["axis"]).to(torch.float32) if len(v) > 2 else 0.0
    lo, hi = quant_range(a["dtype"], a["bits"])
    q = torch.clamp(torch.round(x / s) + zp, lo, hi)
    return q.to(torch.int8 if a["dtype"] == "int8" else torch.uint8)


def _dequantize_linear(v: list, a: dict) -> torch.Tensor:
    q = v[0]
    s = _axis_view(v[1], q.dim(), a["axis"])
    zp = _axis_view(v[2], q.dim(), a["axis"]).to(torch.float32) if len(v) > 2 else 0.0
    return (q.to(torch.float32) - zp) * s


# ---------------------------------------------------------------- quantization-aware training
class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward (half to even, bit-identical), identity backward (straight through)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward (the same values), gradient multiplied by ``g`` backward (LSQ)."""

    @staticmethod
    def forward(ctx, s, g):  # noqa: D102
        ctx.g = g
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * ctx.g, None


def _lsq_scale(s: torch.Tensor, x: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    """``s`` shaped to broadcast over ``x``, its gradient scaled by LSQ's ``1 / sqrt(N * Qp)``.

    ``Qp = 2^(bits-1) - 1``; ``N`` is the number of elements one scale entry quantizes per sample:
    ``numel / len(s)`` for a per-axis scale (a weight's output channels), ``numel / batch`` for a
    per-tensor scale (an activation).  The quantize and the dequantize reading one scale compute
    the same factor.  It is a constant factor: Adam (invariant to a constant gradient scale per
    parameter) is unaffected; with SGD it keeps the scale's steps on the weights' scale
    (Esser et al. 2020).
    """
    qp = 2 ** (bits - 1) - 1
    if s.requires_grad and qp > 0:
        per = x.numel() / (s.numel() if s.numel() > 1 else max(x.shape[0] if x.dim() else 1, 1))
        s = _GradScale.apply(s, 1.0 / math.sqrt(max(per, 1.0) * qp))
    return _axis_view(s, x.dim(), axis)


def fake_quantize(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int, bits: int, axis: int = 1,
                  zp: torch.Tensor | None = None) -> torch.Tensor:
    """The integers ``clamp(round(x / s) + zp, lo, hi)`` as float32, differentiable.

    Rounding passes gradients straight through (STE); ``clamp`` passes them where
    ``lo <= round(x/s) + zp <= hi`` and gives zero outside.  Values are bit-identical to
    :func:`_quantize_linear` (same ops in the same order), only the dtype is float.  With the
    dequantize ``(q - zp) * s`` that reads the same scale, the gradient reaching ``s`` is LSQ's
    ``q - x/s`` inside the range and ``lo - zp`` / ``hi - zp`` outside (times :func:`_lsq_scale`).
    """
    sv = _lsq_scale(s, x, axis, bits)
    zpv = _axis_view(zp, x.dim(), axis).to(torch.float32) if zp is not None else 0.0
    return torch.clamp(_RoundSTE.apply(x / sv) + zpv, lo, hi)


def _dequantize_ste(q: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None, axis: int, bits: int) -> torch.Tensor:
    zpv = _axis_view(zp, q.dim(), axis).to(torch.float32) if zp is not None else 0.0
    return (q.to(torch.float32) - zpv) * _lsq_scale(s, q, axis, bits)


def _quantize_linear_ste(v: list, a: dict) -> torch.Tensor:
    """Training form of ``quantize_linear``: :func:`fake_quantize` (float integers, STE)."""
    from qcompile.ir.ops import quant_range

    lo, hi = quant_range(a["dtype"], a["bits"])
    return fake_quantize(v[0], v[1], lo, hi, a["bits"], a["axis"], v[2] if len(v) > 2 else None)


def _dequantize_linear_ste(v: list, a: dict) -> torch.Tensor:
    """Training form of ``dequantize_linear``: ``(q - zp) * s`` with the scale's gradient LSQ-scaled."""
    return _dequantize_ste(v[0], v[1], v[2] if len(v) > 2 else None, a["axis"], a["bits"])


def _fake_quantized_weight(v: list, a: dict) -> torch.Tensor:
    """A weight ``dequantize_linear(q, s)`` trained through a float shadow ``w`` of ``q``:
    ``(fq(w) - zp) * s`` with ``fq(w) = clamp(round(w / s) + zp, lo, hi)`` (STE) on the layer's
    integer grid ``a["grid"] = (lo, hi)``."""
    lo, hi = a["grid"]
    zp = v[2] if len(v) > 2 else None
    return _dequantize_ste(fake_quantize(v[0], v[1], lo, hi, a["bits"], a["axis"], zp), v[1], zp, a["axis"], a["bits"])


def _ceil_extra(size: int, k: int, s: int, pb: int, pe: int, d: int) -> int:
    """End padding that makes floor-mode pooling produce the ceil_mode output size."""
    out = conv_out_size(size, k, s, pb, pe, d, True)
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (size + pb + pe))


def _pool_pads(x: torch.Tensor, a: dict) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """((top, left, bottom, right) explicit pads, (bottom, right) extra pads from ceil_mode)."""
    t, l, b, r = a["pads"]
    k, s = a["kernel"], a["strides"]
    d = a.get("dilations", (1, 1))
    if not a["ceil_mode"]:
        return (t, l, b, r), (0, 0)
    return (t, l, b, r), (_ceil_extra(x.shape[2], k[0], s[0], t, b, d[0]),
                          _ceil_extra(x.shape[3], k[1], s[1], l, r, d[1]))


def _max_pool2d(v: list, a: dict) -> torch.Tensor:
    """Max over each (dilated) window; padding (explicit and ceil_mode) never wins: it is -inf."""
    (t, l, b, r), (eb, er) = _pool_pads(v[0], a)
    xp = _pad_nchw(v[0], (t, l, b + eb, r + er), value=-math.inf)
    return F.max_pool2d(xp, a["kernel"], a["strides"], 0, a["dilations"])


def _avg_pool2d(v: list, a: dict) -> torch.Tensor:
    """ONNX AveragePool: window sum / number of counted positions.

    Counted positions are the real elements (``count_include_pad=0``) or real elements
    plus explicit padding (``=1``); positions added only by ``ceil_mode`` never count.
    """
    x = v[0]
    (t, l, b, r), (eb, er) = _pool_pads(x, a)
    k, s = tuple(a["kernel"]), tuple(a["strides"])
    explicit = (t, l, b, r) != (0, 0, 0, 0)
    if eb == er == 0 and (not explicit or a["count_include_pad"]):
        return F.avg_pool2d(_pad_nchw(x, (t, l, b, r)), k, s, 0)  # every window is full: plain mean
    summed = F.avg_pool2d(_pad_nchw(x, (t, l, b + eb, r + er)), k, s, 0, divisor_override=1)
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    if a["count_include_pad"]:
        ones = _pad_nchw(_pad_nchw(ones, (t, l, b, r), value=1.0), (0, 0, eb, er))
    else:
        ones = _pad_nchw(ones, (t, l, b + eb, r + er))
    count = F.avg_pool2d(ones, k, s, 0, divisor_override=1)
    return summed / count


def _batch_norm(v: list, a: dict) -> torch.Tensor:
    """y = scale * (x - mean) / sqrt(var + epsilon) + bias, parameters broadcast over axis 1."""
    x, scale, bias, mean, var = v
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a["epsilon"])
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layer_norm(v: list, a: dict) -> torch.Tensor:
    """y = (x - m) / sqrt(var + epsilon) * scale + bias over ``axes`` (biased variance); trailing axes
    by ``F.layer_norm``, others (e.g. the channels of NCHW) written out, parameters broadcast along them."""
    x, scale, bias = v[0], v[1], v[2] if len(v) > 2 else None
    axes = tuple(a["axes"])
    if axes == tuple(range(x.dim() - len(axes), x.dim())):
        return F.layer_norm(x, scale.shape, scale, bias, a["epsilon"])
    shape = [x.shape[i] if i in axes else 1 for i in range(x.dim())]
    d = x - x.mean(dim=axes, keepdim=True)
    y = d / torch.sqrt((d * d).mean(dim=axes, keepdim=True) + a["epsilon"]) * scale.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _flatten(v: list, a: dict) -> torch.Tensor:
    """ONNX Flatten: (prod(shape[:axis]), prod(shape[axis:]))."""
    x = v[0]
    axis = a["axis"] + x.dim() if a["axis"] < 0 else a["axis"]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _clip(v: list, a: dict) -> torch.Tensor:
    """min(max(x, min), max); a ``None`` bound is absent."""
    if a["min"] is None and a["max"] is None:
        return v[0]
    return torch.clamp(v[0], a["min"], a["max"])


def _hardsigmoid(v: list, a: dict) -> torch.Tensor:
    """max(0, min(1, alpha * x + beta))."""
    return torch.clamp(a["alpha"] * v[0] + a["beta"], 0.0, 1.0)


def _reshape(x: torch.Tensor, shape) -> torch.Tensor:
    """Static reshape; for a batch larger than the graph's (training, batched evaluation) a target
    that keeps the batch axis leading is rescaled along that axis."""
    shape = tuple(shape)
    if x.numel() != math.prod(shape) and shape and x.shape[0] != shape[0] and shape[0] > 0:
        rest = math.prod(shape[1:])
        if rest and x.numel() == x.shape[0] * rest and x.numel() // x.shape[0] * shape[0] == math.prod(shape):
            shape = (x.shape[0],) + shape[1:]
    return x.reshape(shape)


def _linear(v: list, a: dict) -> torch.Tensor:
    """y = x @ w^T + b with w (out, in)."""
    return F.linear(v[0], v[1], v[2] if len(v) > 2 else None)


def _reduce_mean(v: list, a: dict) -> torch.Tensor:
    return v[0].mean(dim=tuple(a["axes"]), keepdim=bool(a["keepdims"]))


IMPLS: dict[str, Impl] = {
    "conv2d": _conv2d,
    "conv_transpose2d": _conv_transpose2d,
    "linear": _linear,
    "matmul": lambda v, a: torch.matmul(v[0], v[1]),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "relu": lambda v, a: F.relu(v[0]),
    "sigmoid": lambda v, a: torch.sigmoid(v[0]),
    "tanh": lambda v, a: torch.tanh(v[0]),
    "exp": lambda v, a: torch.exp(v[0]),
    "sqrt": lambda v, a: torch.sqrt(v[0]),
    "erf": lambda v, a: torch.erf(v[0]),
    "neg": lambda v, a: torch.neg(v[0]),
    "abs": lambda v, a: torch.abs(v[0]),
    "reciprocal": lambda v, a: torch.reciprocal(v[0]),
    "identity": lambda v, a: v[0],
    "hardswish": lambda v, a: F.hardswish(v[0]),
    "silu": lambda v, a: F.silu(v[0]),
    "hardsigmoid": _hardsigmoid,
    "clip": _clip,
    "leaky_relu": lambda v, a: F.leaky_relu(v[0], a["alpha"]),
    "gelu": lambda v, a: F.gelu(v[0], approximate=a["approximate"]),
    "add": lambda v, a: torch.add(v[0], v[1]),
    "sub": lambda v, a: torch.sub(v[0], v[1]),
    "mul": lambda v, a: torch.mul(v[0], v[1]),
    "div": lambda v, a: torch.div(v[0], v[1]),
    "pow": lambda v, a: torch.pow(v[0], v[1]),
    "max": lambda v, a: torch.maximum(v[0], v[1]),
    "min": lambda v, a: torch.minimum(v[0], v[1]),
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "global_avg_pool": lambda v, a: v[0].mean(dim=(2, 3), keepdim=True),
    "reduce_mean": _reduce_mean,
    "concat": lambda v, a: torch.cat(v, dim=a["axis"]),
    "reshape": lambda v, a: _reshape(v[0], a["shape"]),
    "flatten": _flatten,
    "transpose": lambda v, a: v[0].permute(*a["perm"]),
    "slice": _slice,
    "resize": _resize,
    "softmax": lambda v, a: torch.softmax(v[0], dim=a["axis"]),
    "quantize_linear": _quantize_linear,
    "dequantize_linear": _dequantize_linear,
}
"""IR op -> torch implementation.  Covers every op of :mod:`qcompile.ir.ops` (tested)."""

TRAIN_IMPLS: dict[str, Impl] = {
    "quantize_linear": _quantize_linear_ste,
    "dequantize_linear": _dequantize_linear_ste,
}
"""Ops whose implementation differs while a trainable module is in training mode: the same values
(bit for bit), but quantized integers stay float32 so gradients pass (STE, LSQ scale gradients)."""


# ============================================================================ the module
def _attr_name(const: str, taken: set[str]) -> str:
    """A valid, unused ``nn.Module`` attribute name for IR constant ``const``: always prefixed, so
    user tensor names such as 'half', 'to' or 'train' cannot collide with ``nn.Module`` attributes."""
    base = "c_" + (re.sub(r"[^A-Za-z0-9_]", "_", const) or "const")
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


class GraphModule(nn.Module):
    """Executes an IR graph with torch ops (reference semantics: module docstring).

    Floating constants are ``nn.Parameter`` (``requires_grad=trainable``), other
    constants are buffers; both live under sanitized attribute names.
    ``param_names`` maps IR constant name -> attribute name; :meth:`constant` looks
    a constant up by its IR name.  The module runs a snapshot (clone) of the graph.  ``forward(*inputs)`` takes the graph inputs in
    order and returns one tensor for a single output, else a tuple in graph order.

    Quantization-aware training.  A trainable module in training mode (``.train()``) runs
    ``quantize_linear`` / ``dequantize_linear`` in their training form (:data:`TRAIN_IMPLS`):
    identical values, but the integers are float32 tensors, rounding passes gradients straight
    through inside the saturation range (zero outside) and scales receive LSQ gradients.  In
    eval mode, or when not trainable, the ops are exactly the inference ones (int8/uint8 outputs).

    ``fake_quant`` maps names of ``dequantize_linear`` nodes that read an *integer constant*
    (weights ``W = (q - zp) * s``) to the integer grid ``(lo, hi)`` of that weight.  Each such
    constant gets a float32 shadow parameter ``w`` initialised to its dequantized value
    ``(q - zp) * s``, and the node computes
    ``(clamp(round(w / s) + zp, lo, hi) - zp) * s`` (STE) in training *and* eval mode, so
    validation sees the weights exactly as :func:`write_back` will store them
    (``q = clamp(round(w / s) + zp, lo, hi)``).  ``shadows`` maps the integer constant's IR name
    to the shadow parameter's attribute name.
    """

    def __init__(self, graph: Graph, trainable: bool = True,
                 fake_quant: Mapping[str, tuple[int, int]] | None = None):
        super().__init__()
        for n in graph.nodes:
            if n.op not in IMPLS:
                raise UnsupportedOpError(n.op, n.name, "the torch reference interpreter has no implementation "
                                                       "of this op (qcompile bug: every IR op needs one)")
        self.graph = graph.clone()  # a snapshot: later edits of ``graph`` do not change this module
        self.trainable = bool(trainable)
        self.param_names: dict[str, str] = {}
        taken: set[str] = set()
        for cname, arr in graph.constants.items():
            attr = _attr_name(cname, taken)
            self.param_names[cname] = attr
            tensor = torch.from_numpy(np.array(arr, copy=True))
            if arr.dtype.kind == "f":
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=trainable))
            else:
                self.register_buffer(attr, tensor)
        self.shadows: dict[str, str] = {}
        self._shadow_nodes: dict[str, tuple[list[str], dict]] = {}  # integer constant -> (node inputs, attrs)
        fake_quant = dict(fake_quant or {})
        by_name = {n.name: n for n in self.graph.nodes}
        unknown = sorted(set(fake_quant) - set(by_name))
        if unknown:
            raise InputError(f"fake_quant names node(s) {unknown} that graph '{graph.name}' does not have")
        self._plan = []
        for n in self.graph.nodes:
            inputs: list = [i for i in n.inputs if i]
            if n.name in fake_quant:
                attrs = {**n.attrs, "grid": tuple(int(v) for v in fake_quant[n.name])}
                inputs[0] = self._add_shadow(n, attrs, taken)
                self._plan.append((_fake_quantized_weight, _fake_quantized_weight, inputs, attrs, n.outputs))
            else:
                impl = IMPLS[n.op]
                self._plan.append((impl, TRAIN_IMPLS.get(n.op, impl), inputs, n.attrs, n.outputs))

    def _add_shadow(self, node, attrs: dict, taken: set[str]) -> tuple[str, str]:
        """Register the float shadow of ``node``'s integer weight; return its key in the environment."""
        g = self.graph
        qname = node.inputs[0]
        if node.op != "dequantize_linear" or qname not in g.constants or g.constants[qname].dtype.kind not in "iu":
            raise InputError(f"fake_quant: node '{node.name}' must be a dequantize_linear of an integer constant "
                             f"(a quantized weight), got {node.op}({', '.join(node.inputs)})")
        lo, hi = attrs["grid"]
        q = g.constants[qname]
        if not lo < hi or q.min() < lo or q.max() > hi:
            raise InputError(f"fake_quant: weight '{qname}' of node '{node.name}' holds integers in "
                             f"[{q.min()}, {q.max()}], outside its grid [{lo}, {hi}]")
        if qname in self.shadows:
            raise InputError(f"fake_quant: integer constant '{qname}' is read by more than one fake-quantized node")
        with torch.no_grad():
            w = _dequantize_linear([self.constant(i) for i in node.inputs if i], node.attrs)
        attr = _attr_name("shadow_" + qname, taken)
        self.register_parameter(attr, nn.Parameter(w.contiguous(), requires_grad=self.trainable))
        self.shadows[qname] = attr
        self._shadow_nodes[qname] = ([i for i in node.inputs if i], attrs)
        return ("shadow", qname)

    def constant(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding IR constant ``name``."""
        return getattr(self, self.param_names[name])

    def quantized_shadow(self, name: str) -> torch.Tensor:
        """Integer constant ``name`` as its shadow now rounds: ``clamp(round(w / s) + zp, lo, hi)``
        (in the constant's dtype), the value :func:`write_back` stores."""
        inputs, attrs = self._shadow_nodes[name]
        lo, hi = attrs["grid"]
        v = [getattr(self, self.shadows[name])] + [self.constant(i) for i in inputs[1:]]
        with torch.no_grad():
            q = fake_quantize(v[0], v[1], lo, hi, attrs["bits"], attrs["axis"], v[2] if len(v) > 2 else None)
        return q.to(self.constant(name).dtype)

    def forward(self, *inputs: torch.Tensor):
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise InputError(f"graph '{g.name}' takes {len(g.inputs)} inputs {g.inputs}, got {len(inputs)}")
        env: dict[Any, torch.Tensor] = dict(zip(g.inputs, inputs))
        for cname in g.constants:
            env[cname] = self.constant(cname)
        for cname, attr in self.shadows.items():
            env[("shadow", cname)] = getattr(self, attr)
        train = self.training and self.trainable
        for infer, trained, names, attrs, outputs in self._plan:
            out = (trained if train else infer)([env[i] for i in names], attrs)
            if len(outputs) == 1:
                env[outputs[0]] = out
            else:
                env.update(zip(outputs, out))
        outs = tuple(env[o] for o in g.outputs)
        return outs[0] if len(outs) == 1 else outs


def to_torch(graph: Graph, trainable: bool = True,
             fake_quant: Mapping[str, tuple[int, int]] | None = None) -> GraphModule:
    """``graph`` as a :class:`GraphModule`; floating constants are trainable if ``trainable``;
    ``fake_quant``: weight dequantize nodes trained through float shadows (see :class:`GraphModule`)."""
    return GraphModule(graph, trainable, fake_quant)


def write_back(graph: Graph, module: GraphModule) -> Graph:
    """A clone of ``graph`` whose constants hold ``module``'s current parameter/buffer values.

    Names, shapes and dtypes are kept (values are cast back to the constant's dtype);
    integer weights trained through a float shadow (``fake_quant``) are stored as the shadow
    rounds on its grid, ``clamp(round(w / s) + zp, lo, hi)``, with the module's current scale;
    new arrays are read-only.  Raises :class:`IRVerificationError` if the module lacks a
    constant of ``graph`` or a parameter's shape changed.
    """
    g = graph.clone()
    for cname, old in graph.constants.items():
        if cname not in module.param_names:
            raise IRVerificationError(f"module has no parameter for constant '{cname}' of graph '{graph.name}'; "
                                      "was it built from this graph?")
        tensor = module.quantized_shadow(cname) if cname in module.shadows else module.constant(cname)
        value = tensor.detach().cpu().numpy()
        if value.shape != old.shape:
            raise IRVerificationError(f"parameter for constant '{cname}' changed shape {old.shape} -> {value.shape}")
        arr = np.array(value, dtype=old.dtype, copy=True)
        arr.flags.writeable = False
        g.constants[cname] = arr
    return g


# ============================================================================ runner and backend
@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(num_threads)`` (if given), then restore."""
    if not num_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_threads(num_threads: Any) -> int | None:
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise InputError(f"torch backend option num_threads must be a positive integer, got {num_threads!r}")
    return int(num_threads)


class TorchRunner(Runner):
    """Runs a graph with :class:`GraphModule` under ``torch.inference_mode()``, numpy in and out.

    Inputs must have the graph's static shapes; a float input of another float dtype
    (e.g. float64) is converted to the declared dtype, other dtype mismatches are errors.
    """

    def __init__(self, graph: Graph, num_threads: int | None = None):
        self.graph = graph
        self.module = GraphModule(graph, trainable=False).eval()
        self.input_names = list(graph.inputs)
        self.output_names = list(graph.outputs)
        self.num_threads = _check_threads(num_threads)

    def _tensor(self, name: str, value: Any) -> torch.Tensor:
        want = self.graph.types[name]
        arr = np.asarray(value)
        if tuple(arr.shape) != want.shape:
            raise ShapeError(f"input '{name}' has shape {tuple(arr.shape)}, the graph expects {want.shape}")
        if arr.dtype != np.dtype(want.dtype):
            if not (arr.dtype.kind == "f" and np.dtype(want.dtype).kind == "f"):
                raise InputError(f"input '{name}' has dtype {arr.dtype}, the graph expects {want.dtype}")
            arr = arr.astype(want.dtype)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"missing model input(s) {missing}; the model's inputs are {self.input_names}")
        args = [self._tensor(n, inputs[n]) for n in self.input_names]
        with torch_threads(self.num_threads), torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return [o.numpy() for o in outs]


class TorchBackend(Backend):
    """PyTorch eager execution of the IR; artifact ``model.onnx`` (re-imported on load).

    Threads: ``num_threads`` from the constructor, overridden by ``options["num_threads"]``
    given to :meth:`build` (remembered by this instance) or by
    ``manifest["options"]["num_threads"]`` given to :meth:`load`.
    """

    name = "torch"
    description = "PyTorch eager execution of the IR (reference semantics); artifact model.onnx"

    def __init__(self, num_threads: int | None = None):
        self.num_threads = _check_threads(num_threads)

    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        """Write ``out_dir/model.onnx``; return ``["model.onnx"]``."""
        from qcompile.frontends.onnx_export import save_onnx

        opts = dict(options or {})
        if "num_threads" in opts:
            self.num_threads = _check_threads(opts["num_threads"])
        save_onnx(graph, Path(out_dir) / "model.onnx")
        return ["model.onnx"]

    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        """Import ``out_dir/model.onnx`` with the ONNX frontend and run it with :class:`GraphModule`."""
        from qcompile.frontends.onnx_frontend import load_onnx

        threads = dict(manifest.get("options") or {}).get("num_threads", self.num_threads)
        return TorchRunner(load_onnx(Path(out_dir) / "model.onnx"), threads)

    def runner(self, graph: Graph) -> Runner:
        return TorchRunner(graph, self.num_threads)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}
