"""Written-out layer norm, hard-swish and GELU in an ONNX model -> one op each.

Run by :func:`~qcompile.frontends.onnx_frontend.load_onnx` on the folded model (constants are
initializers, shapes inferred), before the model is mapped to IR.  The rules are onnxscript
pattern-rewriter rules (pattern + check with a reason + rewrite), matched with the operands of
every Add / Mul in either order (constant operands are first moved second, exactly, and moved back
where nothing fused; rules exist for both orders of two computed operands).  Only the families
whose op types occur in the model run.  A rule fires only when

* ``x`` is float32 of known rank, every intermediate value is used only inside the pattern, and
* every constant is a float32 scalar (one element, rank <= rank(x), so no broadcast changes the
  shape) equal to the float32 rounding of its exact value (1/6 is ``float32(1/6)``, sqrt 2 is
  ``float32(sqrt 2)``, ...).  Any near miss (``HardSigmoid`` alpha 0.2, ``0.7978`` for
  sqrt(2/pi)) leaves the nodes as they are.

The fused op computes the same function; results differ from the written-out graph only by
float32 rounding (operation order).  Fused nodes are written in the private domain
:data:`FUSED_DOMAIN`, named after the pattern's last node, with op types the importer maps:

``LayerNormalization(X, Scale[, B]; axes, epsilon)`` -> IR ``layer_norm``, from
    m = ReduceMean(x; A), d = x - m, v = ReduceMean(d * d | Pow(d, 2); A),
    n = d / Sqrt(v + eps) | d * Reciprocal(Sqrt(v + eps)), then optionally y = n * gamma (+ beta);
    both ReduceMeans keepdims=1 over the same axes A (attribute or opset-18 input), eps any
    constant >= 0 (recorded), gamma / beta constants that vary only along A (e.g. (C, 1, 1) for the
    channel axis of an NCHW map, (C,) for the last axis; stored with shape x.shape[A]).
``HardSwish(X)`` -> IR ``hardswish`` (x * min(max(x + 3, 0), 6) / 6), from
    x * HardSigmoid(x; alpha=1/6, beta=0.5); x * (r / 6); x * (r * 1/6); (x * r) / 6;
    (x * r) * 1/6 with r = Clip(x + 3, 0, 6).
``Gelu(X; approximate)`` -> IR ``gelu``, from p = 1 + Erf(x / sqrt 2 | x * 1/sqrt 2)
    (approximate "none") or p = 1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)), x^3 = Pow(x, 3) |
    x * x * x (approximate "tanh"), in the forms (x * 0.5) * p, x * (p * 0.5), (x * p) * 0.5,
    (x * p) / 2.

:func:`fuse_decompositions` returns how many of each IR op it made (``{"layer_norm": 2, ...}``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompile.errors import ModelLoadError

FUSED_DOMAIN = "qcompile"
"""ONNX domain of the fused nodes (the importer maps them by op type)."""

FUSED_OPS = {"LayerNormalization": "layer_norm", "HardSwish": "hardswish", "Gelu": "gelu"}
"""Fused ONNX op type -> the IR op it becomes (the keys of the counts)."""

MAX_ROUNDS = 4
"""Rewrite sweeps (a layer norm's affine parts fuse in the sweeps after its core)."""

_F32 = np.float32


# ---------------------------------------------------------------------------- constant checks
def _array(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    try:
        return v.const_value.numpy()
    except Exception:  # noqa: BLE001 - external data that is not loaded
        return None


def _rank(x: ir.Value) -> int | None:
    return None if x.shape is None else len(x.shape)


def _is_scalar(v: ir.Value | None, exact: float, rank: int, float_only: bool = True) -> bool:
    """``v`` is a constant with one element equal to float32(``exact``) and rank <= ``rank``
    (float32, unless ``float_only`` is False: Pow's exponent may be any numeric type)."""
    a = _array(v)
    if a is None or a.size != 1 or a.ndim > rank:
        return False
    if float_only and a.dtype != np.float32:
        return False
    return bool(_F32(a.reshape(-1)[0]) == _F32(exact)) if a.dtype.kind in "fiu" else False


def _float32_input(x: ir.Value) -> pattern.MatchResult:
    r = pattern.MatchResult()
    if x.dtype != ir.DataType.FLOAT:
        return r.fail(f"'{x.name}' is {x.dtype}, only float32 is fused", x)
    if _rank(x) is None:
        return r.fail(f"'{x.name}' has no known rank", x)
    return r


def _expect(result: pattern.MatchResult, checks: Sequence[tuple[bool, str]]) -> pattern.MatchResult:
    for ok, reason in checks:
        if not ok:
            return result.fail(reason)
    return result


class _Fusion(pattern.RewriteRuleClassBase):
    """Base of the rules.  Operand order: a constant operand of Add / Mul is second (the driver
    puts it there first, see :func:`_constants_second`); for Add / Mul nodes with two computed
    operands a rule exists once per order, ``swaps[i]`` saying whether node i is swapped.  The fused
    node is named after the matched pattern's last (root) node; new constants get unused names."""

    def __init__(self, name: str, swaps: tuple[bool, ...] = ()):
        super().__init__(name=name + "".join("_swapped" if s else "_kept" for s in swaps))
        self.swaps = swaps

    def _pair(self, i: int, a, b):
        return (b, a) if self.swaps[i] else (a, b)

    def _keep_root_name(self, context) -> None:
        self._root_name = context.root.name
        self._graph = context.graph_or_function

    def _constant(self, op, array: np.ndarray, hint: str) -> ir.Value:
        taken = set(self._graph.initializers) | {v.name for n in self._graph for v in n.outputs}
        name, k = hint, 0
        while name in taken:
            k += 1
            name = f"{hint}_{k}"
        return op.initializer(ir.tensor(array, name=name))

    def _emit(self, op, op_type: str, *inputs, **attrs):
        return op.op(op_type, *inputs, _domain=FUSED_DOMAIN, _version=1, _name=self._root_name or None, **attrs)


# ---------------------------------------------------------------------------- hard-swish
class HardSwishFromHardSigmoid(_Fusion):
    """x * HardSigmoid(x; alpha=float32(1/6), beta=0.5)."""

    def __init__(self, swaps: tuple[bool]):
        super().__init__("HardSwishFromHardSigmoid", swaps)

    def pattern(self, op, x):
        return op.Mul(*self._pair(0, x, op.HardSigmoid(x, _allow_other_attributes=True, _outputs=["hs"])))

    def check(self, context, x, hs, **_):
        self._keep_root_name(context)
        a = hs.producer().attributes
        return _expect(_float32_input(x), [
            (_F32(a.get_float("alpha", 0.2)) == _F32(1 / 6), "HardSigmoid alpha is not 1/6"),
            (_F32(a.get_float("beta", 0.5)) == _F32(0.5), "HardSigmoid beta is not 0.5")])

    def rewrite(self, op, x, **_):
        return self._emit(op, "HardSwish", x)


class HardSwishFromClip(_Fusion):
    """r = Clip(x + 3, 0, 6) and ``form`` "scale_first": x * (r / 6) | x * (r * 1/6); "div_last":
    (x * r) / 6; "mul_last": (x * r) * 1/6."""

    def __init__(self, form: str, swaps: tuple[bool]):
        super().__init__(f"HardSwishFromClip_{form}", swaps)
        self.form = form

    def pattern(self, op, x, three, lo, hi, six, sixth):
        r = op.Clip(op.Add(x, three), lo, hi)
        if self.form == "div_last":
            return op.Div(op.Mul(*self._pair(0, x, r)), six)
        if self.form == "mul_last":
            return op.Mul(op.Mul(*self._pair(0, x, r)), sixth)
        return op.Mul(*self._pair(0, x, pattern.OrValue([op.Div(r, six), op.Mul(r, sixth)])))

    def check(self, context, x, three, lo, hi, six=None, sixth=None, **_):
        self._keep_root_name(context)
        r = _float32_input(x)
        if not r:
            return r
        rank = _rank(x)
        return _expect(r, [
            (_is_scalar(three, 3.0, rank), "the added constant is not 3"),
            (_is_scalar(lo, 0.0, rank) and _is_scalar(hi, 6.0, rank), "the Clip bounds are not (0, 6)"),
            (_is_scalar(six, 6.0, rank) if six is not None else _is_scalar(sixth, 1 / 6, rank),
             "the scale is not / 6 or * float32(1/6)")])

    def rewrite(self, op, x, **_):
        return self._emit(op, "HardSwish", x)


# ---------------------------------------------------------------------------- GELU
_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715


class GeluFusion(_Fusion):
    """0.5 x (1 + Erf(x / sqrt 2)) (``kind="erf"``) or 0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    (``kind="tanh"``), the halving in one of the ``form``s "x_half" ((x * 0.5) * p), "p_half"
    (x * (p * 0.5)), "product_half" ((x * p) * 0.5) or "product_div2" ((x * p) / 2)."""

    def __init__(self, kind: str, form: str, swaps: tuple[bool, ...]):
        super().__init__(f"Gelu_{kind}_{form}", swaps)
        self.kind, self.form = kind, form

    def pattern(self, op, x, one, half, two, s2, inv_s2, c, k, three):
        if self.kind == "erf":
            s = op.Erf(pattern.OrValue([op.Div(x, s2), op.Mul(x, inv_s2)]))
        else:
            x2 = op.Mul(x, x)
            cube = pattern.OrValue([op.Pow(x, three), op.Mul(x2, x), op.Mul(x, x2)])
            s = op.Tanh(op.Mul(op.Add(*self._pair(1, x, op.Mul(cube, k))), c))
        p = op.Add(s, one)
        if self.form == "x_half":
            return op.Mul(*self._pair(0, op.Mul(x, half), p))
        if self.form == "p_half":
            return op.Mul(*self._pair(0, x, op.Mul(p, half)))
        if self.form == "product_half":
            return op.Mul(op.Mul(*self._pair(0, x, p)), half)
        return op.Div(op.Mul(*self._pair(0, x, p)), two)

    def check(self, context, x, one, half=None, two=None, s2=None, inv_s2=None, c=None, k=None, three=None, **_):
        self._keep_root_name(context)
        r = _float32_input(x)
        if not r:
            return r
        rank = _rank(x)
        checks = [(_is_scalar(one, 1.0, rank), "the added constant is not 1"),
                  (_is_scalar(half, 0.5, rank) if half is not None else _is_scalar(two, 2.0, rank),
                   "the halving is not * 0.5 or / 2")]
        if self.kind == "erf":
            checks.append((_is_scalar(s2, _SQRT2, rank) if s2 is not None else _is_scalar(inv_s2, 1 / _SQRT2, rank),
                           "Erf's argument is not x / float32(sqrt 2) or x * float32(1/sqrt 2)"))
        else:
            checks += [(_is_scalar(c, _SQRT_2_OVER_PI, rank), "Tanh's factor is not float32(sqrt(2/pi))"),
                       (_is_scalar(k, _TANH_CUBIC, rank), "the cubic coefficient is not float32(0.044715)"),
                       (three is None or _is_scalar(three, 3.0, rank, float_only=False), "Pow's exponent is not 3")]
        return _expect(r, checks)

    def rewrite(self, op, x, **_):
        return self._emit(op, "Gelu", x, approximate="none" if self.kind == "erf" else "tanh")


# ---------------------------------------------------------------------------- layer norm
def _reduce_axes(node: ir.Node, rank: int) -> tuple[int, ...] | None:
    """Normalised, sorted axes of a keepdims=1 ReduceMean (attribute or opset-18 input), else None."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        a = _array(node.inputs[1])
        if a is None:
            return None
        axes = [int(v) for v in a.reshape(-1)]
    else:
        axes = list(node.attributes.get_ints("axes", []))
    if not axes:
        return None if node.attributes.get_int("noop_with_empty_axes", 0) else tuple(range(rank))
    if any(not -rank <= ax < rank for ax in axes):
        return None
    norm = sorted({ax % rank for ax in axes})
    return tuple(norm) if len(norm) == len(axes) else None


def _affine_param(v: ir.Value | None, x_shape: Sequence[int], axes: Sequence[int]) -> np.ndarray | None:
    """A constant float32 gamma / beta that varies only along ``axes`` (rank <= rank(x)), broadcast to
    the normalised shape ``x.shape[axes]``; None otherwise."""
    a = _array(v)
    rank = len(x_shape)
    if a is None or a.dtype != np.float32 or a.ndim > rank:
        return None
    full = a.reshape((1,) * (rank - a.ndim) + a.shape)
    for i, (d, n) in enumerate(zip(full.shape, x_shape)):
        if d != 1 and (i not in axes or d != n):
            return None
    return np.ascontiguousarray(np.broadcast_to(full, [x_shape[i] if i in axes else 1 for i in range(rank)])
                                .reshape([x_shape[i] for i in axes]))


def _static_shape(x: ir.Value) -> tuple[int, ...] | None:
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    return tuple(int(d) for d in x.shape)


class LayerNormCore(_Fusion):
    """(x - m) / Sqrt(v + eps) (``reciprocal=False``) or (x - m) * Reciprocal(Sqrt(v + eps)) (True),
    m = ReduceMean(x; A), v = ReduceMean((x - m)^2; A) -> LayerNormalization(x, ones; axes=A,
    epsilon=eps).  With ``twice`` the numerator's x - m is a second Sub node (code that writes
    ``x - m`` twice, exported without common-subexpression elimination)."""

    def __init__(self, reciprocal: bool, twice: bool, swaps: tuple[bool, ...] = ()):
        super().__init__(f"LayerNormCore{'_reciprocal' if reciprocal else ''}{'_twice' if twice else ''}", swaps)
        self.reciprocal, self.twice = reciprocal, twice

    def pattern(self, op, x, two, eps):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = pattern.OrValue([op.Mul(d, d), op.Pow(d, two)])
        var = op.ReduceMean(sq, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        num = op.Sub(x, mean) if self.twice else d
        return op.Mul(*self._pair(0, num, op.Reciprocal(std))) if self.reciprocal else op.Div(num, std)

    def check(self, context, x, mean, var, eps, two=None, **_):
        self._keep_root_name(context)
        r = _float32_input(x)
        if not r:
            return r
        shape = _static_shape(x)
        if shape is None:
            return r.fail(f"'{x.name}' has no static shape", x)
        rank = len(shape)
        self._axes = _reduce_axes(mean.producer(), rank)
        e = _array(eps)
        ok_eps = e is not None and e.dtype == np.float32 and e.size == 1 and e.ndim <= rank \
            and np.isfinite(e).all() and float(e.reshape(-1)[0]) >= 0
        self._eps = float(str(_F32(e.reshape(-1)[0]))) if ok_eps else 0.0
        return _expect(r, [
            (self._axes is not None, "the mean's ReduceMean is not keepdims=1 over constant axes"),
            (_reduce_axes(var.producer(), rank) == self._axes, "mean and variance reduce different axes"),
            (two is None or _is_scalar(two, 2.0, rank, float_only=False), "Pow's exponent is not 2"),
            (ok_eps, "epsilon is not a float32 scalar constant >= 0")])

    def rewrite(self, op, x, **_):
        shape = _static_shape(x)
        ones = self._constant(op, np.ones([shape[i] for i in self._axes], np.float32),
                              f"{self._root_name or 'layer_norm'}_scale")
        return self._emit(op, "LayerNormalization", x, ones, axes=list(self._axes), epsilon=self._eps)


class LayerNormAffine(_Fusion):
    """LayerNormalization(x, ones) * gamma -> LayerNormalization(x, gamma) (``part="scale"``), or
    LayerNormalization(x, s) + beta -> LayerNormalization(x, s, beta) (``part="bias"``), for fused
    nodes whose scale is still all ones / that have no bias yet."""

    def __init__(self, part: str):
        super().__init__(f"LayerNorm_{part}")
        self.part = part

    def pattern(self, op, x, s, p):
        y = op.LayerNormalization(x, s, _domain=FUSED_DOMAIN, _allow_other_attributes=True, _outputs=["ln"])
        return op.Mul(y, p) if self.part == "scale" else op.Add(y, p)

    def check(self, context, x, s, p, ln, **_):
        self._keep_root_name(context)
        r = pattern.MatchResult()
        node = ln.producer()
        self._attrs = {"axes": list(node.attributes.get_ints("axes")), "epsilon": node.attributes.get_float("epsilon")}
        shape = _static_shape(x)
        self._param = None if shape is None else _affine_param(p, shape, self._attrs["axes"])
        scale = _array(s)
        return _expect(r, [
            (self._param is not None, f"'{p.name}' is not a float32 constant varying only along the normalised axes"),
            (self.part == "bias" or (scale is not None and bool(np.all(scale == 1))), "the scale is already set")])

    def rewrite(self, op, x, s, p, **_):
        param = self._constant(op, self._param, f"{p.name}_{self.part}")
        ins = [x, param] if self.part == "scale" else [x, s, param]
        return self._emit(op, "LayerNormalization", *ins, **self._attrs)


# ---------------------------------------------------------------------------- driver
_BOTH = (False, True)


def _families() -> list[tuple[frozenset[str], list[pattern.RewriteRule]]]:
    """(ONNX op types a model must contain, rules) per kind of fusion."""
    pairs = [(s,) for s in _BOTH]
    return [
        (frozenset({"ReduceMean", "Sqrt"}),
         [LayerNormCore.rule(False, twice) for twice in _BOTH]
         + [LayerNormCore.rule(True, twice, sw) for twice in _BOTH for sw in pairs]
         + [LayerNormAffine.rule("scale"), LayerNormAffine.rule("bias")]),
        (frozenset({"HardSigmoid"}), [HardSwishFromHardSigmoid.rule(sw) for sw in pairs]),
        (frozenset({"Clip"}), [HardSwishFromClip.rule(form, sw) for form in ("scale_first", "div_last", "mul_last")
                               for sw in pairs]),
        (frozenset({"Erf"}), [GeluFusion.rule("erf", form, sw) for form in _GELU_FORMS for sw in pairs]),
        (frozenset({"Tanh"}), [GeluFusion.rule("tanh", form, (a, b)) for form in _GELU_FORMS
                               for a in _BOTH for b in _BOTH]),
    ]


_GELU_FORMS = ("x_half", "p_half", "product_half", "product_div2")


def fusion_rules(op_types: set[str] | None = None) -> pattern.RewriteRuleSet | None:
    """The rules that can fire in a model with these ONNX ``op_types`` (all rules if None); None if none can."""
    rules = [r for need, family in _families() if op_types is None or need <= op_types for r in family]
    return pattern.RewriteRuleSet(rules) if rules else None


def _constants_second(graph: ir.Graph) -> list[ir.Node]:
    """Swap the operands of every Add / Mul whose first operand is a constant and second is not (exact:
    float addition and multiplication commute); returns the swapped nodes."""
    swapped = []
    for node in graph:
        if node.op_type in ("Add", "Mul") and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            a, b = node.inputs
            if a is not None and b is not None and a.const_value is not None and b.const_value is None:
                node.replace_input_with(0, b)
                node.replace_input_with(1, a)
                swapped.append(node)
    return swapped


def fuse_onnx(model: onnx.ModelProto, path: Path | str) -> tuple[onnx.ModelProto, dict[str, int]]:
    """:func:`fuse_decompositions` on a ModelProto: (fused model, counts); the model itself when no
    rule can fire.  A failure of the rewriter is a :class:`ModelLoadError` naming ``path``."""
    if fusion_rules({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}) is None:
        return model, {}
    try:
        m = ir.serde.deserialize_model(model)
        counts = fuse_decompositions(m)
        return (ir.serde.serialize_model(m) if counts else model), counts
    except Exception as e:  # noqa: BLE001 - rewriter errors come in many types
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"'{path}': fusing written-out layer norm / hard-swish / GELU failed: "
                             f"{type(e).__name__}: {text}") from e


def fuse_decompositions(model: ir.Model) -> dict[str, int]:
    """Rewrite ``model`` in place until no rule fires (at most :data:`MAX_ROUNDS` sweeps); returns the
    number of fused nodes per IR op (only those that occur).  Add / Mul nodes that were not fused keep
    their operand order."""
    rules = fusion_rules({n.op_type for n in model.graph if n.domain in ("", "ai.onnx")})
    if rules is None:
        return {}
    swapped = _constants_second(model.graph)
    for _ in range(MAX_ROUNDS):
        if not rules.apply_to_model(model):
            break
    for node in swapped:
        if node.graph is model.graph:
            a, b = node.inputs
            node.replace_input_with(0, b)
            node.replace_input_with(1, a)
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.domain == FUSED_DOMAIN:
            op = FUSED_OPS[node.op_type]
            counts[op] = counts.get(op, 0) + 1
    return counts
