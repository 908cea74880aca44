"""Relax passes that turn QDQ float arithmetic into integer arithmetic.

TVM 0.27 legalizes ``R.quantize`` / ``R.dequantize`` into float elementwise code, so a QDQ model
runs its convolutions in fp32.  :func:`qdq_to_integer` (before layout conversion) rewrites

    conv2d(dequantize(xq, s_x), dequantize(Wq, s_w, axis=0))
        -> astype(conv2d(xq, Wq, out_dtype=int32), f32) * (s_x * s_w)[c]

because ``sum_k (s_x xq_k)(s_w[c] Wq_ck) = s_x s_w[c] sum_k xq_k Wq_ck`` and the integer sum is
exact in int32 (|xq|, |Wq| <= 128, so up to 2^17 terms cannot overflow).  ``matmul`` against a
(transposed) dequantized constant is rewritten the same way (scale per output column).  The
float epilogue (scale, bias, activation, residual add) and the next layer's ``quantize`` stay
elementwise, so FuseOps fuses them into the integer kernel: the requantization happens while the
int32 accumulators are written back.  Remaining ``quantize`` / ``dequantize`` calls are expanded
into layout-transparent elementwise ops (``round(x / s) + zp`` clamped and cast; ``(q - zp) * s``),
so ConvertLayout can move them to NHWC with the convolutions.  Only symmetric int8 operands with
``groups == 1`` take the integer path; anything else stays float (correct, not faster).

:func:`unsigned_activations` (after ConvertLayout, x86) prepares the integer convolutions for
the instructions that multiply *unsigned* by signed bytes.  With VNNI (``vpdpbusd``, exact for any
bytes): ``x_u = x + 128`` (the input is padded explicitly with 128, i.e. a real zero), and
``sum_k x_k w_k = sum_k x_u,k w_k - 128 sum_k w_k``; the per-channel compensation
``128 sum_k w_k`` is a compile-time constant subtracted from the accumulator.  Without VNNI
(``vpmaddubsw``, exact only for unsigned bytes <= 127): activations that are provably
non-negative (a quantized ReLU / max-pool output: the int8 values are 0..127) are reinterpreted
as uint8 with no shift; the others stay int8 (and use ``vpmaddwd``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_DQ, _Q = tvm.ir.Op.get("relax.dequantize"), tvm.ir.Op.get("relax.quantize")
_CONV, _MATMUL = tvm.ir.Op.get("relax.nn.conv2d"), tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _or(new, old):
    return old if new is None else new


def _const(e) -> np.ndarray | None:
    return e.value.numpy() if isinstance(e, tvm.ir.expr.Constant) else None


def _dtype(e) -> str:
    return str(e.ty.dtype)


def _shape(e) -> tuple[int, ...]:
    return tuple(int(d) for d in e.ty.shape.values)


@relax.expr_functor.mutator
class _QDQToInteger(relax.PyExprMutator):
    def __init__(self, mod, expand: bool):
        super().__init__(mod)
        self.rewritten = 0
        self.expand = expand  # False: integer conv/matmul only (Q/DQ kept to be matched); True: expand Q/DQ

    # ---------------------------------------------------------------- matching
    def _bound(self, e):
        if isinstance(e, relax.Var):
            v = self.lookup_binding(e)
            return v if v is not None else e
        return e

    def _symmetric_dq(self, e, *, weight: bool):
        """(q, scale array) if ``e`` is a symmetric int8 dequantize (of a constant when ``weight``)."""
        call = self._bound(e)
        if not (isinstance(call, relax.Call) and call.op.same_as(_DQ)):
            return None
        q, s, zp = call.args
        q = self._bound(q) if weight else q
        scale, zero = _const(s), _const(zp)
        if scale is None or zero is None or np.any(zero != 0) or _dtype(q) != "int8":
            return None
        if weight and _const(q) is None:
            return None
        return q, scale.astype(np.float64), int(call.attrs.axis)

    # ---------------------------------------------------------------- rewrites
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not self.expand:
            if call.op.same_as(_CONV):
                return _or(self._conv(call), call)
            if call.op.same_as(_MATMUL):
                return _or(self._matmul(call), call)
            return call
        if call.op.same_as(_DQ):
            return self._expand_dq(call)
        if call.op.same_as(_Q):
            return self._expand_q(call)
        return call

    def _conv(self, call):
        a = call.attrs
        x, w = self._symmetric_dq(call.args[0], weight=False), self._symmetric_dq(call.args[1], weight=True)
        if x is None or w is None or int(a.groups) != 1 or str(a.data_layout) != "NCHW" \
                or str(a.kernel_layout) != "OIHW" or x[1].size != 1 or w[2] != 0:
            return None
        (xq, sx, _), (wq, sw, _) = x, w
        co = _shape(wq)[0]
        acc = self.builder_.emit(relax.op.nn.conv2d(
            xq, wq, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=1,
            out_dtype="int32"))
        scale = (float(sx.reshape(-1)[0]) * np.broadcast_to(sw.reshape(-1), (co,))).reshape(1, co, 1, 1)
        self.rewritten += 1
        return relax.op.multiply(self.builder_.emit(relax.op.astype(acc, "float32")),
                                 relax.const(scale.astype(np.float32)))

    def _matmul(self, call):
        x = self._symmetric_dq(call.args[0], weight=False)
        rhs = self._bound(call.args[1])
        transposed = isinstance(rhs, relax.Call) and rhs.op.same_as(_PERMUTE) \
            and (rhs.attrs.axes is None or [int(p) for p in rhs.attrs.axes] == [1, 0])
        w = self._symmetric_dq(rhs.args[0] if transposed else call.args[1], weight=True)
        if x is None or w is None or x[1].size != 1 or len(_shape(w[0])) != 2:
            return None
        (xq, sx, _), (wq, sw, axis) = x, w
        wmat = _const(wq)
        if transposed:  # y = x @ W^T with W (out, in) quantized per row (axis 0)
            if axis != 0:
                return None
            wmat = np.ascontiguousarray(wmat.T)
        elif axis not in (1, -1):  # y = x @ W with W (in, out) quantized per column
            return None
        n = wmat.shape[1]
        acc = self.builder_.emit(relax.op.matmul(xq, relax.const(wmat), out_dtype="int32"))
        scale = float(sx.reshape(-1)[0]) * np.broadcast_to(sw.reshape(-1), (n,))
        self.rewritten += 1
        return relax.op.multiply(self.builder_.emit(relax.op.astype(acc, "float32")),
                                 relax.const(scale.astype(np.float32)))

    # ---------------------------------------------------------------- expansions
    def _per_axis(self, arr: np.ndarray, like, axis: int, dtype: str):
        rank = len(_shape(like))
        if arr.size == 1:
            return relax.const(np.asarray(arr.reshape(()), dtype))
        shape = [1] * rank
        shape[axis % rank] = -1
        return relax.const(np.asarray(arr, dtype).reshape(shape))

    def _expand_dq(self, call):
        q, s, zp = call.args
        scale, zero = _const(s), _const(zp)
        if scale is None or zero is None:
            return call
        axis = int(call.attrs.axis)
        x = self.builder_.emit(relax.op.astype(q, "float32"))
        if np.any(zero != 0):
            x = self.builder_.emit(relax.op.subtract(x, self._per_axis(zero, q, axis, "float32")))
        return relax.op.multiply(x, self._per_axis(scale, q, axis, "float32"))

    def _expand_q(self, call):
        x, s, zp = call.args
        scale, zero = _const(s), _const(zp)
        if scale is None or zero is None:
            return call
        axis, dtype = int(call.attrs.axis), str(call.attrs.out_dtype)
        info = np.iinfo(np.dtype(dtype))
        y = self.builder_.emit(relax.op.round(self.builder_.emit(
            relax.op.divide(x, self._per_axis(scale, x, axis, "float32")))))
        if np.any(zero != 0):
            y = self.builder_.emit(relax.op.add(y, self._per_axis(zero, x, axis, "float32")))
        y = self.builder_.emit(relax.op.maximum(y, relax.const(np.float32(info.min))))
        y = self.builder_.emit(relax.op.minimum(y, relax.const(np.float32(info.max))))
        return relax.op.astype(y, dtype)


def qdq_to_integer(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite every Relax function of ``mod``; returns the module and how many conv / matmul
    calls now compute in integers."""
    count = 0
    for expand in (False, True):
        mod, n = _rewrite(mod, _QDQToInteger(mod, expand))
        count += n
    return mod, count


def _rewrite(mod: tvm.IRModule, rewriter) -> tuple[tvm.IRModule, int]:
    """Run ``rewriter`` over every Relax function of ``mod``, drop what became dead; returns the
    module and the rewriter's count of rewritten calls."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get()), rewriter.rewritten


_PASS_THROUGH = {tvm.ir.Op.get(f"relax.{n}") for n in ("astype", "round", "nn.max_pool2d", "permute_dims",
                                                         "reshape")}
_NONNEG = {tvm.ir.Op.get(f"relax.{n}") for n in ("nn.relu",)}
_POSITIVE_SCALE = {tvm.ir.Op.get(f"relax.{n}") for n in ("divide", "multiply")}
_MAXIMUM, _MINIMUM = tvm.ir.Op.get("relax.maximum"), tvm.ir.Op.get("relax.minimum")


@relax.expr_functor.mutator
class _UnsignedActivations(relax.PyExprMutator):
    def __init__(self, mod, vnni: bool):
        super().__init__(mod)
        self.rewritten = 0
        self.vnni = vnni

    def _nonnegative(self, e, depth: int = 0) -> bool:
        """Whether ``e`` is provably >= 0: a ReLU (or max with a non-negative constant) followed only
        by order-preserving ops (rounding, casts, clamps from above, positive scaling, max-pool,
        layout changes)."""
        if depth > 16 or not isinstance(e, relax.Var):
            return False
        call = self.lookup_binding(e)
        if not isinstance(call, relax.Call):
            return False
        if any(call.op.same_as(op) for op in _NONNEG):
            return True
        if call.op.same_as(_MAXIMUM):
            c = _const(call.args[1])
            return (c is not None and bool(np.all(c >= 0))) or self._nonnegative(call.args[0], depth + 1)
        if call.op.same_as(_MINIMUM):
            c = _const(call.args[1])
            return c is not None and bool(np.all(c >= 0)) and self._nonnegative(call.args[0], depth + 1)
        if any(call.op.same_as(op) for op in _POSITIVE_SCALE):
            c = _const(call.args[1])
            return c is not None and bool(np.all(c > 0)) and self._nonnegative(call.args[0], depth + 1)
        if any(call.op.same_as(op) for op in _PASS_THROUGH):
            return self._nonnegative(call.args[0], depth + 1)
        return False

    def _unsigned(self, x):
        """uint8 view of non-negative int8 activations (values 0..127), or None."""
        if not self._nonnegative(x):
            return None
        return self.builder_.emit(relax.op.astype(x, "uint8"))

    def _shifted(self, x):
        """``x + 128`` as uint8 (int8 -> uint8 keeping order)."""
        wide = self.builder_.emit(relax.op.astype(x, "int32"))
        return self.builder_.emit(relax.op.astype(
            self.builder_.emit(relax.op.add(wide, relax.const(np.int32(128)))), "uint8"))

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op.same_as(_CONV):
            return _or(self._conv(call), call)
        if call.op.same_as(_MATMUL):
            return _or(self._matmul(call), call)
        return call

    def _conv(self, call):
        a = call.attrs
        x, w = call.args
        wv = _const(w)
        if wv is None or _dtype(x) != "int8" or wv.dtype != np.int8 or str(a.out_dtype) != "int32" \
                or str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO" or int(a.groups) != 1:
            return None
        if not self.vnni:
            xu = self._unsigned(x)
            if xu is None:
                return None
            self.rewritten += 1
            return relax.op.nn.conv2d(xu, w, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=1,
                                      data_layout="NHWC", kernel_layout="HWIO", out_layout=a.out_layout,
                                      out_dtype="int32")
        top, left, bottom, right = (int(p) for p in a.padding)
        xu = self._shifted(x)
        if top or left or bottom or right:
            xu = self.builder_.emit(relax.op.nn.pad(xu, [0, 0, top, bottom, left, right, 0, 0], pad_value=128.0))
        acc = self.builder_.emit(relax.op.nn.conv2d(
            xu, w, strides=a.strides, padding=[0, 0, 0, 0], dilation=a.dilation, groups=1,
            data_layout="NHWC", kernel_layout="HWIO", out_layout=a.out_layout, out_dtype="int32"))
        comp = 128 * wv.astype(np.int64).sum(axis=(0, 1, 2))
        self.rewritten += 1
        return relax.op.subtract(acc, relax.const(comp.reshape(1, 1, 1, -1).astype(np.int32)))

    def _matmul(self, call):
        x, w = call.args
        wv = _const(w)
        if wv is None or _dtype(x) != "int8" or wv.dtype != np.int8 or wv.ndim != 2 \
                or str(call.attrs.out_dtype) != "int32":
            return None
        if not self.vnni:
            xu = self._unsigned(x)
            if xu is None:
                return None
            self.rewritten += 1
            return relax.op.matmul(xu, w, out_dtype="int32")
        acc = self.builder_.emit(relax.op.matmul(self._shifted(x), w, out_dtype="int32"))
        self.rewritten += 1
        return relax.op.subtract(acc, relax.const((128 * wv.astype(np.int64).sum(axis=0)).astype(np.int32)))


def unsigned_activations(mod: tvm.IRModule, vnni: bool = True) -> tuple[tvm.IRModule, int]:
    """uint8 activations for integer conv / matmul on x86: shifted by 128 with VNNI, the provably
    non-negative ones as they are without (module docstring)."""
    return _rewrite(mod, _UnsignedActivations(mod, vnni))
