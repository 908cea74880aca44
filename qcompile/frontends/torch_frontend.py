"""PyTorch -> IR via ``torch.export``.

Steps of :func:`load_torch`:

1. ``torch.export.export(model, example_inputs)`` with the model (and every
   submodule) in eval mode; the user's per-module training flags are restored
   afterwards and nothing else of the model is touched.
2. ``ep.run_decompositions(table)`` functionalises the program and lowers it to
   core ATen, except for the ops listed in :data:`PRESERVED`: the high-level ops
   qcompile maps one-to-one (conv2d, linear, hardswish, hardsigmoid, silu, relu6,
   adaptive_avg_pool2d, matmul, softmax ...) and layers it cannot map but wants to
   name in errors (LSTM, GRU, upsampling ...).  Inference batch norm arrives as
   ``_native_batch_norm_legit_no_training``.
3. Every fx node is mapped by :data:`HANDLERS` (keyed by the ATen op name) to IR
   nodes; view-like no-ops (clone, dropout in eval, detach, ...) are rewired
   without a node.  Shapes are static: reshape-like ops take their target shape
   from the node's ``meta["val"]``, and every emitted node's inferred type is
   checked against torch's.

Naming: parameters, buffers and lifted tensor constants become IR constants named
by their ``state_dict`` key (``layer1.0.conv1.weight``); an IR node is named by
the path of the module that owns it (``layer1.0.conv1``, made unique by the
graph), falling back to the fx node name for code in the root ``forward``;
``meta["torch_node"]`` keeps the fx node name and ``meta["module"]`` the path.
Graph inputs are named by ``input_names`` or ``forward``'s parameters; outputs
are ``output`` (one) or ``output_0, output_1, ...`` (tuple/list outputs, flattened).

Constant padding (``nn.ZeroPad2d``, ``F.pad``: ``aten.constant_pad_nd``) has no IR op: a zero pad of
H / W is folded into the pads of the conv2d it feeds (and of an avg pool where that is exact, see
:func:`_avg_pool`), so passes and backends see one conv (``meta["folded_pad"]`` names the pad's fx
node).  Any other use of the padded tensor, a non-zero value, a negative (cropping) pad or a pad of
N / C is refused naming the pad node -- the ONNX frontend has the same rule for ONNX Pad.

Anything without a mapping raises :class:`UnsupportedOpError` naming the ATen op,
the fx node, the module path and class, and what to do instead.
"""

from __future__ import annotations

import inspect
import logging
import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from qcompile.errors import InputError, ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.ir.graph import Graph, Node, TensorType

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8", torch.uint8: "uint8",
          torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}
"""torch dtype -> IR dtype."""

Handler = Callable[["_Importer", torch.fx.Node, dict], None]

_ALTERNATIVE = ("qcompile maps standard CNN layers (conv, linear, batch norm, pooling, activations, "
                "add/sub/mul/div, cat, reshape/flatten/permute, softmax, mean); replace this part of the model "
                "with those, or export the model to ONNX and compile the .onnx file")


# ============================================================================ fx helpers
def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """An ATen call's arguments by schema name (args, kwargs, then schema defaults), in schema order."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _op_name(node: torch.fx.Node) -> str:
    """ATen op name without namespace/overload (``aten.conv2d.default`` -> ``conv2d``)."""
    packet = getattr(node.target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else str(node.target)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _out_val(node: torch.fx.Node) -> torch.Tensor | None:
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


# ============================================================================ importer
class _Importer:
    """Walks an ExportedProgram's graph and builds the IR graph (one instance per import)."""

    def __init__(self, ep: torch.export.ExportedProgram, name: str):
        self.ep = ep
        self.g = Graph(name)
        self.env: dict[str, Any] = {}          # fx node name -> IR value (or tuple of values/None)
        self.producer: dict[str, Node] = {}    # IR value -> IR node that defines it

    # ------------------------------------------------------------ naming and errors
    @staticmethod
    def module_entry(node: torch.fx.Node) -> tuple[str, str]:
        """(path, class name) of the innermost module owning ``node``; ("", "") at the root."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        path, cls = list(stack.values())[-1][:2]
        cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        return str(path), cls.rsplit(".", 1)[-1]

    def ir_name(self, node: torch.fx.Node) -> str:
        return self.module_entry(node)[0] or node.name

    def unsupported(self, node: torch.fx.Node, alternative: str = _ALTERNATIVE) -> UnsupportedOpError:
        path, cls = self.module_entry(node)
        where = node.name + (f" in module '{path}' ({cls})" if path else "")
        return UnsupportedOpError(str(node.target), where, alternative, frontend="torch")

    # ------------------------------------------------------------ values
    def val(self, x: Any) -> str:
        """The IR value of fx node ``x``."""
        if not isinstance(x, torch.fx.Node):
            raise TypeError(f"expected a tensor argument, got {x!r}")
        v = self.env.get(x.name)
        if isinstance(v, _PendingPad):  # a zero pad read by anything but a conv / avg pool that folds it
            raise self.unsupported(v.node, _PAD_SUPPORTED + "; here the padded tensor is also used otherwise "
                                           "(or is a model output)")
        if not isinstance(v, str):
            raise ShapeError(f"value '{x.name}' is not a single tensor qcompile can represent")
        return v

    def const(self, hint: str, array: np.ndarray) -> str:
        return self.g.add_constant(hint, array)

    def operand(self, node: torch.fx.Node, x: Any, dtype: str, role: str) -> str:
        """IR value for a tensor argument or a Python scalar, in ``dtype``.

        Scalars become 0-d constants; a constant tensor of another dtype is converted
        (as torch's type promotion does); a computed tensor of another dtype is an error
        because the IR has no cast op.
        """
        if not isinstance(x, torch.fx.Node):
            if not isinstance(x, (bool, int, float)):
                raise self.unsupported(node, f"argument {x!r} is neither a tensor nor a number")
            return self.const(f"{self.ir_name(node)}.{role}", np.array(x, dtype=dtype))
        v = self.val(x)
        if self.g.types[v].dtype == dtype:
            return v
        if v in self.g.constants:
            return self.const(f"{v}.{dtype}", self.g.constants[v].astype(dtype))
        raise self.unsupported(node, f"operand '{x.name}' is {self.g.types[v].dtype} but the result is {dtype}; "
                                     "qcompile has no cast op: make the operand dtypes equal")

    def out_dtype(self, node: torch.fx.Node) -> str:
        v = _out_val(node)
        if v is None or v.dtype not in DTYPES:
            raise self.unsupported(node, f"result {v!r} is not a tensor of a supported dtype {sorted(DTYPES.values())}")
        return DTYPES[v.dtype]

    def emit(self, node: torch.fx.Node, op: str, inputs: Sequence[str], attrs: dict | None = None, *,
             final: bool = True) -> str:
        """Append IR node ``op`` for fx ``node``; a ``final`` node defines the fx node's value and
        its type must equal torch's."""
        name = self.ir_name(node)
        out = self.g.fresh_name(node.name if final else f"{node.name}_{op}")
        path = self.module_entry(node)[0]
        meta = {"torch_node": node.name, **({"module": path} if path else {})}
        n = self.g.make_node(op, list(inputs), attrs or {}, name=name, output_names=[out], meta=meta)
        self.g.append(n)
        self.producer[out] = n
        if final:
            self._check_type(node, out)
            self.env[node.name] = out
        return out

    def _check_type(self, node: torch.fx.Node, value: str) -> None:
        expected = _out_val(node)
        if expected is None:
            return
        got = self.g.types[value]
        if tuple(expected.shape) != got.shape:
            raise ShapeError(f"internal shape mismatch at fx node '{node.name}': torch {tuple(expected.shape)}, "
                             f"IR {got.shape}")
        if DTYPES.get(expected.dtype) != got.dtype:
            raise self.unsupported(node, f"torch computes {expected.dtype} here but the IR value is {got.dtype}; "
                                         "qcompile has no cast op")

    def pending_pad(self, x: Any) -> "_PendingPad | None":
        """The unemitted zero pad fx value ``x`` stands for, if it is one (its consumer folds it)."""
        v = self.env.get(x.name) if isinstance(x, torch.fx.Node) else None
        return v if isinstance(v, _PendingPad) else None

    def alias(self, node: torch.fx.Node, src: Any) -> None:
        """Rewire: fx ``node`` has the same value as ``src`` (no IR node; a pending zero pad stays pending)."""
        self.env[node.name] = self.pending_pad(src) or self.val(src)

    def transposed_constant(self, value: str) -> str | None:
        """``W`` if ``value`` is ``transpose(W, perm=(1, 0))`` of a 2-D constant ``W``, else None."""
        n = self.producer.get(value)
        if n is None or n.op != "transpose" or tuple(n.attrs["perm"]) != (1, 0):
            return None
        return n.inputs[0] if n.inputs[0] in self.g.constants else None

    # ------------------------------------------------------------ walking the program
    def run(self, input_names: Sequence[str]) -> Graph:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self.placeholder(node, input_names)
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                self.outputs(node)
            else:
                raise self.unsupported(node, f"fx '{node.op}' nodes are not expected in an exported program")
        _prune(self.g)
        return self.g

    def placeholder(self, node: torch.fx.Node, input_names: Sequence[str]) -> None:
        sig = self.ep.graph_signature
        state = {**self.ep.state_dict, **self.ep.constants}
        lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        if node.name in lifted:
            key = lifted[node.name]
            if key not in self.g.constants:  # tied weights share one constant
                tensor = state[key]
                if tensor.dtype not in DTYPES:
                    raise ShapeError(f"parameter/buffer '{key}' has dtype {tensor.dtype}; supported: "
                                     f"{sorted(DTYPES.values())}")
                self.g.add_constant(key, tensor.detach().cpu().numpy(), exact_name=True)
            self.env[node.name] = key
            return
        users = list(sig.user_inputs)
        if node.name not in users:
            raise ModelLoadError(f"unexpected exported placeholder '{node.name}' (custom objects or tokens "
                                 "are not supported)")
        name = input_names[users.index(node.name)]
        v = _out_val(node)
        if v is None or v.dtype not in DTYPES:
            raise ShapeError(f"input '{name}' is not a tensor of a supported dtype {sorted(DTYPES.values())}")
        self.env[node.name] = self.g.add_input(name, TensorType(tuple(v.shape), DTYPES[v.dtype]))

    def call(self, node: torch.fx.Node) -> None:
        if node.target is operator.getitem:
            self.getitem(node)
            return
        handler = HANDLERS.get(_op_name(node)) if hasattr(node.target, "_schema") else None
        if handler is None:
            raise self.unsupported(node)
        handler(self, node, _bind(node))

    def getitem(self, node: torch.fx.Node) -> None:
        src, idx = node.args
        packed = self.env.get(src.name) if isinstance(src, torch.fx.Node) else None
        if not isinstance(packed, tuple):
            raise self.unsupported(node, "indexing into tuples is only supported for batch norm and pooling outputs")
        picked = packed[idx]
        if picked is None:
            raise self.unsupported(node, f"output {idx} of '{src.target}' (e.g. pooling indices) is not supported; "
                                         "only the first output is")
        self.env[node.name] = picked

    def outputs(self, node: torch.fx.Node) -> None:
        outs = node.args[0]
        flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        for o in flat:
            if not isinstance(o, torch.fx.Node):
                raise self.unsupported(node, f"model output {o!r} is not a tensor")
        values = [self.val(o) for o in flat]
        names = ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
        renamed: dict[str, str] = {}
        outs = []
        for v, want in zip(values, names):
            if v in renamed:  # the same tensor returned twice: the second copy is an identity
                outs.append(self.identity(renamed[v], want))
            else:
                renamed[v] = self.name_output(v, want)
                outs.append(renamed[v])
        self.g.outputs = outs

    def identity(self, value: str, want: str) -> str:
        n = self.g.make_node("identity", [value], name=want, output_names=[self.g.fresh_name(want)])
        return self.g.append(n).outputs[0]

    def name_output(self, value: str, want: str) -> str:
        """Rename ``value`` (defined by a node) to ``want``; an input or constant gets an
        ``identity`` node instead."""
        n = self.producer.get(value)
        if n is None:
            return self.identity(value, want)
        new = self.g.fresh_name(want)
        n.outputs = [new if o == value else o for o in n.outputs]
        self.g.types[new] = self.g.types.pop(value)
        self.g.replace_all_uses(value, new)
        self.producer[new] = self.producer.pop(value)
        return new


def _prune(g: Graph) -> None:
    """Drop nodes whose outputs nobody reads (e.g. a weight transpose absorbed into linear),
    then unused constants."""
    live = set(g.outputs)
    kept: list[Node] = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(i for i in n.inputs if i)
        else:
            for o in n.outputs:
                g.types.pop(o, None)
    g.nodes = kept[::-1]
    g.remove_unused_constants()


# ============================================================================ handlers
def _conv(imp: _Importer, node, a) -> None:
    """convolution / conv2d: torch padding p (symmetric) -> pads (p0, p1, p0, p1); 'same' puts the
    odd element at the end like torch does."""
    if a.get("transposed", False):
        _conv_transpose(imp, node, a)
        return
    pending = imp.pending_pad(a["input"])
    x = pending.source if pending else imp.val(a["input"])
    w = imp.val(a["weight"])
    wt = imp.g.types[w]
    if wt.rank != 4:
        raise imp.unsupported(node, f"only 2-D convolution is supported (weight {wt})")
    stride, dil = _pair(a.get("stride", 1)), _pair(a.get("dilation", 1))
    pad = a.get("padding", (0, 0))
    if pad == "valid":
        pads = (0, 0, 0, 0)
    elif pad == "same":
        total = [d * (k - 1) for d, k in zip(dil, wt.shape[2:])]
        pads = (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    else:
        p = _pair(pad)
        pads = (p[0], p[1], p[0], p[1])
    if pending:
        pads = tuple(p + q for p, q in zip(pads, pending.pads))
    ins = [x, w] + ([imp.val(a["bias"])] if a.get("bias") is not None else [])
    out = imp.emit(node, "conv2d", ins, {"strides": stride, "pads": pads, "dilations": dil,
                                         "group": int(a["groups"])})
    if pending:
        imp.producer[out].meta["folded_pad"] = pending.node.name


def _conv_transpose(imp: _Importer, node, a) -> None:
    """convolution(transposed=True) (nn.ConvTranspose2d): torch padding p crops p on both sides;
    output_padding extends the end -> conv_transpose2d with pads (p0, p1, p0, p1)."""
    x, w = imp.val(a["input"]), imp.val(a["weight"])
    wt = imp.g.types[w]
    if wt.rank != 4:
        raise imp.unsupported(node, f"only 2-D transposed convolution is supported (weight {wt})")
    p = _pair(a.get("padding", (0, 0)))
    ins = [x, w] + ([imp.val(a["bias"])] if a.get("bias") is not None else [])
    imp.emit(node, "conv_transpose2d", ins, {
        "strides": _pair(a.get("stride", 1)), "pads": (p[0], p[1], p[0], p[1]),
        "dilations": _pair(a.get("dilation", 1)), "group": int(a["groups"]),
        "output_padding": _pair(a.get("output_padding", 0))})


def _linear(imp: _Importer, node, a) -> None:
    """y = x @ w^T + b."""
    ins = [imp.val(a["input"]), imp.val(a["weight"])]
    if a.get("bias") is not None:
        ins.append(imp.val(a["bias"]))
    imp.emit(node, "linear", ins)


def _matmul_like(imp: _Importer, node, x: str, y: str, bias: str | None) -> None:
    """x @ y (+ bias).  When y is the transpose of a constant W (torch's lowered nn.Linear) this is
    linear(x, W[, bias]); a bias that is not 1-D (out,) is added separately."""
    w = imp.transposed_constant(y)
    if w is None:
        out = imp.emit(node, "matmul", [x, y], final=bias is None)
    else:
        n_out = imp.g.types[w].shape[0]
        fused = bias is not None and imp.g.types[bias].shape == (n_out,)
        out = imp.emit(node, "linear", [x, w] + ([bias] if fused else []), final=bias is None or fused)
        if fused:
            return
    if bias is not None:
        imp.emit(node, "add", [out, bias])


def _mm(imp: _Importer, node, a) -> None:
    _matmul_like(imp, node, imp.val(a["self"]), imp.val(a[list(a)[1]]), None)


def _addmm(imp: _Importer, node, a) -> None:
    """addmm(bias, x, y) = bias + x @ y (beta = alpha = 1 only)."""
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        raise imp.unsupported(node, "addmm with alpha/beta != 1 is not supported")
    _matmul_like(imp, node, imp.val(a["mat1"]), imp.val(a["mat2"]), imp.val(a["self"]))


def _bn(imp: _Importer, node, a) -> None:
    """Inference batch norm; a missing affine weight/bias becomes ones/zeros."""
    if a.get("training", False):
        raise imp.unsupported(node, "batch norm in training mode; call model.eval() before compiling")
    x = imp.val(a["input"])
    c = imp.g.types[x].shape[1]
    params = []
    for key, default in (("weight", 1.0), ("bias", 0.0), ("running_mean", None), ("running_var", None)):
        v = a.get(key)
        if v is not None:
            params.append(imp.val(v))
        elif default is None:
            raise imp.unsupported(node, "batch norm without running statistics (track_running_stats=False)")
        else:
            params.append(imp.const(f"{imp.ir_name(node)}.{key}", np.full(c, default, np.float32)))
    out = imp.emit(node, "batch_norm", [x, *params], {"epsilon": float(a.get("eps", 1e-5))})
    if _op_name(node).startswith("_native_batch_norm"):
        imp.env[node.name] = (out, None, None)


def _unary(op: str, attrs: Callable[[dict], dict] | None = None) -> Handler:
    def h(imp: _Importer, node, a) -> None:
        imp.emit(node, op, [imp.val(node.args[0])], attrs(a) if attrs else {})
    return h


def _clip(lo: float | None, hi: float | None, lo_key: str = "", hi_key: str = "") -> Handler:
    """clip with fixed bounds (relu6) or bounds read from arguments ``lo_key``/``hi_key``."""
    def h(imp: _Importer, node, a) -> None:
        mn, mx = a.get(lo_key, lo) if lo_key else lo, a.get(hi_key, hi) if hi_key else hi
        if isinstance(mn, torch.fx.Node) or isinstance(mx, torch.fx.Node):
            raise imp.unsupported(node, "clamp with tensor bounds is not supported; use numbers")
        imp.emit(node, "clip", [imp.val(node.args[0])],
                 {"min": None if mn is None else float(mn), "max": None if mx is None else float(mx)})
    return h


def _binary(op: str, reverse: bool = False) -> Handler:
    """Elementwise ``self (op) alpha*other`` (``reverse``: ``other (op) alpha*self``, i.e. rsub).

    Python scalars become 0-d constants of the result dtype; ``alpha`` (add/sub) is folded
    into a scalar operand or applied with a ``mul`` node."""
    def h(imp: _Importer, node, a) -> None:
        if a.get("rounding_mode") is not None:
            raise imp.unsupported(node, f"division with rounding_mode={a['rounding_mode']!r} is not supported")
        lhs, rhs = list(a.values())[:2]
        if reverse:
            lhs, rhs = rhs, lhs
        dtype = imp.out_dtype(node)
        alpha = a.get("alpha", 1)
        if alpha != 1 and not isinstance(rhs, torch.fx.Node):
            rhs, alpha = rhs * alpha, 1
        rv = imp.operand(node, rhs, dtype, "other" if not reverse else "self")
        if alpha != 1:
            rv = imp.emit(node, "mul", [rv, imp.operand(node, alpha, dtype, "alpha")], final=False)
        imp.emit(node, op, [imp.operand(node, lhs, dtype, "self" if not reverse else "other"), rv])
    return h


def _pool_attrs(a: dict) -> dict:
    k = _pair(a["kernel_size"])
    s = _pair(a["stride"]) if a.get("stride") else k
    p = _pair(a.get("padding", 0))
    return {"kernel": k, "strides": s, "pads": (p[0], p[1], p[0], p[1]), "ceil_mode": int(bool(a.get("ceil_mode")))}


def _max_pool(imp: _Importer, node, a) -> None:
    attrs = {**_pool_attrs(a), "dilations": _pair(a.get("dilation", 1))}
    out = imp.emit(node, "max_pool2d", [imp.val(a["self"])], attrs)
    if _op_name(node).endswith("with_indices"):
        imp.env[node.name] = (out, None)


def _avg_pool(imp: _Importer, node, a) -> None:
    if a.get("divisor_override") is not None:
        raise imp.unsupported(node, "avg_pool2d with divisor_override is not supported")
    attrs = {**_pool_attrs(a), "count_include_pad": int(bool(a.get("count_include_pad", True)))}
    pending = imp.pending_pad(a["self"])
    if pending is None:
        imp.emit(node, "avg_pool2d", [imp.val(a["self"])], attrs)
        return
    # the explicit zeros are input the pool averages over: exact as pool padding counted in the
    # divisor when every window lies inside the padded input (no ceil mode) and the pool's own
    # padding, if any, is counted too; the summed padding must stay below the kernel (ONNX /
    # onnxruntime refuse larger pool padding)
    pads = tuple(p + q for p, q in zip(attrs["pads"], pending.pads))
    if attrs["ceil_mode"] or (attrs["pads"] != (0, 0, 0, 0) and not attrs["count_include_pad"]) \
            or any(p >= attrs["kernel"][i % 2] for i, p in enumerate(pads)):
        raise imp.unsupported(pending.node, _PAD_SUPPORTED + f"; here it feeds avg pool '{node.name}' with "
                                            "ceil_mode, count_include_pad=False padding of its own, or padding "
                                            "that would reach the kernel size")
    attrs.update(pads=pads, count_include_pad=1)
    out = imp.emit(node, "avg_pool2d", [pending.source], attrs)
    imp.producer[out].meta["folded_pad"] = pending.node.name


_PAD_SUPPORTED = ("qcompile supports constant padding (nn.ZeroPad2d / F.pad) only as zero padding of H and W "
                  "(non-negative) feeding conv2d layers (or an avg pool without ceil_mode, padding below the "
                  "kernel), where it is folded into the layer's padding (the IR has no pad op; the ONNX frontend "
                  "has the same rule for Pad): give the conv its own padding= instead")


class _PendingPad:
    """A zero pad of H / W not emitted as a node: its consumers fold ``pads`` (t, l, b, r) into their own."""

    def __init__(self, node: torch.fx.Node, source: str, pads: tuple[int, int, int, int]):
        self.node, self.source, self.pads = node, source, pads


def _constant_pad_nd(imp: _Importer, node, a) -> None:
    """constant_pad_nd(self, pad, value): torch's ``pad`` lists (begin, end) from the last axis on.
    Not emitted: the consumer folds it (a pad of a pad adds up)."""
    before = imp.pending_pad(a["self"])
    x = before.source if before else imp.val(a["self"])
    xt = imp.g.types[x]
    pad = [int(p) for p in a["pad"]]
    value = a.get("value", 0)
    if isinstance(value, torch.fx.Node) or float(value) != 0.0:
        raise imp.unsupported(node, _PAD_SUPPORTED + f"; the pad value here is {value!r}")
    if any(p < 0 for p in pad):
        raise imp.unsupported(node, _PAD_SUPPORTED + f"; pad {tuple(pad)} is negative (crops): slice instead")
    full = [0] * (2 * xt.rank)
    for i in range(len(pad) // 2):  # axis rank-1-i gets (pad[2i], pad[2i+1])
        full[2 * (xt.rank - 1 - i)], full[2 * (xt.rank - 1 - i) + 1] = pad[2 * i], pad[2 * i + 1]
    if xt.rank != 4 or any(full[:4]):
        raise imp.unsupported(node, _PAD_SUPPORTED + f"; pad {tuple(pad)} of a {xt.rank}-D tensor {xt.shape} "
                                                     "pads other axes than H and W of NCHW")
    top, bottom, left, right = full[4:]
    pads = (top, left, bottom, right)
    if before:
        pads = tuple(p + q for p, q in zip(pads, before.pads))
    imp.env[node.name] = _PendingPad(node, x, pads) if any(pads) else x


def _adaptive_pool(op: str) -> Handler:
    """Adaptive pooling: output = input size -> no node; output (1, 1) -> global pool; an exact
    tiling (H % oh == W % ow == 0) -> a pool with kernel = stride = (H/oh, W/ow); other sizes
    are unsupported."""
    def h(imp: _Importer, node, a) -> None:
        x = imp.val(a["self"])
        _, _, hh, ww = imp.g.types[x].shape
        oh, ow = (int(s) if s is not None else d for s, d in zip(_pair(a["output_size"]), (hh, ww)))
        if (oh, ow) == (hh, ww):  # every window is one element: the identity
            imp.alias(node, a["self"])
            out = imp.val(a["self"])
        elif op == "avg_pool2d" and (oh, ow) == (1, 1):
            out = imp.emit(node, "global_avg_pool", [x])
        elif hh % oh == 0 and ww % ow == 0:
            k = (hh // oh, ww // ow)
            attrs = {"kernel": k, "strides": k, "pads": (0, 0, 0, 0), "ceil_mode": 0}
            attrs.update({"count_include_pad": 0} if op == "avg_pool2d" else {"dilations": (1, 1)})
            out = imp.emit(node, op, [x], attrs)
        else:
            raise imp.unsupported(node, f"adaptive pooling {hh}x{ww} -> {oh}x{ow} is not an exact tiling; "
                                        "use a fixed kernel/stride pool or change the input size")
        if op == "max_pool2d":
            imp.env[node.name] = (out, None)
    return h


def _mean(imp: _Importer, node, a) -> None:
    """mean over ``dim`` (all axes if none) -> reduce_mean."""
    x = imp.val(a["self"])
    rank = imp.g.types[x].rank
    dims = a.get("dim")
    axes = tuple(range(rank)) if not dims else tuple(sorted(int(d) % rank for d in dims))
    imp.emit(node, "reduce_mean", [x], {"axes": axes, "keepdims": int(bool(a.get("keepdim", False)))})


def _layer_norm(imp: _Importer, node, a) -> None:
    """layer_norm(input, normalized_shape, weight, bias, eps) over the last len(normalized_shape)
    axes -> ``layer_norm``; a missing weight / bias becomes ones / zeros."""
    x = imp.val(a["input"])
    rank = imp.g.types[x].rank
    shape = tuple(int(d) for d in a["normalized_shape"])
    params = []
    for key, fill in (("weight", 1.0), ("bias", 0.0)):
        v = a.get(key)
        params.append(imp.val(v) if v is not None else
                      imp.const(f"{imp.ir_name(node)}.{key}", np.full(shape, fill, imp.g.types[x].dtype)))
    imp.emit(node, "layer_norm", [x, *params], {"axes": tuple(range(rank - len(shape), rank)),
                                                "epsilon": float(a.get("eps", 1e-5))})


def _cat(imp: _Importer, node, a) -> None:
    ins = [imp.val(t) for t in a["tensors"]]
    imp.emit(node, "concat", ins, {"axis": int(a.get("dim", 0)) % imp.g.types[ins[0]].rank})


def _reshape(imp: _Importer, node, a) -> None:
    """Any view/reshape/flatten/squeeze/unsqueeze -> reshape to torch's static result shape."""
    shape = tuple(int(d) for d in node.meta["val"].shape)
    src = imp.val(node.args[0])
    if imp.g.types[src].shape == shape:
        imp.alias(node, node.args[0])
    else:
        imp.emit(node, "reshape", [src], {"shape": shape})


def _upsample(mode: str) -> Handler:
    """upsample_nearest2d / _upsample_nearest_exact2d / upsample_bilinear2d (``F.interpolate``) ->
    resize.  torch's source coordinates: nearest floor(dst / s) (ONNX asymmetric + floor), nearest-exact
    floor((dst + 0.5) / s) (half_pixel + round_prefer_ceil), bilinear (dst + 0.5) / s - 0.5 clamped
    at 0 (half_pixel) or dst * (in - 1) / (out - 1) with align_corners; ``s`` is the given scale
    factor, else out / in.  (torch multiplies by 1 / s in float32 where ONNX divides by s: for
    factors that are not powers of two a rare output can take the neighbouring source pixel.)"""
    def h(imp: _Importer, node, a) -> None:
        from qcompile.ir.ops import resize_output_size

        x = imp.val(node.args[0])
        xt = imp.g.types[x]
        if xt.rank != 4:
            raise imp.unsupported(node, f"only 4-D (NCHW) upsampling is supported, the input is {xt}")
        out_hw = tuple(int(d) for d in node.meta["val"].shape[2:])
        factors = a.get("scale_factors")
        if factors is None and a.get("scales_h") is not None and a.get("scales_w") is not None:
            factors = (a["scales_h"], a["scales_w"])
        scales = []
        for k, (n_in, n_out) in enumerate(zip(xt.shape[2:], out_hw)):
            f = float(factors[k]) if factors is not None and factors[k] is not None else None
            if f is None or f <= 0 or resize_output_size(n_in, f) != n_out:
                f = np.float32(n_out) / np.float32(n_in)
            scales.append(float(str(np.float32(f))))
        if mode == "linear":
            ctm = "align_corners" if a.get("align_corners") else "half_pixel"
            nearest = "round_prefer_floor"
        else:
            ctm, nearest = ("asymmetric", "floor") if mode == "nearest" else ("half_pixel", "round_prefer_ceil")
        imp.emit(node, "resize", [x], {"sizes": out_hw, "scales": tuple(scales), "mode": "linear" if mode == "linear"
                                        else "nearest", "coordinate_transformation_mode": ctm, "nearest_mode": nearest})
    return h


def _slice_value(imp: _Importer, node, x: str, dim: int, start: int, end: int, step: int, *,
                 final: bool) -> str | None:
    """IR ``slice`` of ``x`` along ``dim`` (torch semantics: negative indices wrap, out-of-range ones
    clamp, step > 0); None when the slice is the whole axis."""
    from qcompile.ir.ops import normalize_slice, slice_length

    shape = imp.g.types[x].shape
    if step <= 0:
        raise imp.unsupported(node, f"slice step {step} is not supported (torch requires positive steps)")
    st, en, ax, sp = normalize_slice(shape, [start], [end], [dim], [step])
    if slice_length(st[0], en[0], sp[0]) == 0:
        raise imp.unsupported(node, f"slice {start}:{end}:{step} of dim {dim} of {shape} is empty; qcompile does "
                                    "not represent empty tensors")
    if (st[0], en[0], sp[0]) == (0, shape[ax[0]], 1):
        return None
    return imp.emit(node, "slice", [x], {"starts": st, "ends": en, "axes": ax, "steps": sp}, final=final)


def _slice(imp: _Importer, node, a) -> None:
    """slice.Tensor(self, dim, start, end, step): ``x[..., start:end:step]`` (also narrow)."""
    start, end = a.get("start"), a.get("end")
    if isinstance(start, torch.fx.Node) or isinstance(end, torch.fx.Node):
        raise imp.unsupported(node, "slice bounds computed at run time are not supported")
    x = imp.val(a["self"])
    out = _slice_value(imp, node, x, int(a.get("dim", 0)), 0 if start is None else int(start),
                       (1 << 63) - 1 if end is None else int(end), int(a.get("step", 1)), final=True)
    if out is None:
        imp.alias(node, a["self"])


def _select(imp: _Importer, node, a) -> None:
    """select.int(self, dim, index) (``x[:, i]``): a one-element slice, then a reshape dropping ``dim``."""
    x = imp.val(a["self"])
    shape = imp.g.types[x].shape
    dim, index = int(a["dim"]) % len(shape), int(a["index"])
    index = index + shape[dim] if index < 0 else index
    if not 0 <= index < shape[dim]:
        raise imp.unsupported(node, f"index {a['index']} is out of range for dim {dim} of {shape}")
    part = _slice_value(imp, node, x, dim, index, index + 1, 1, final=False) or x
    imp.emit(node, "reshape", [part], {"shape": tuple(d for i, d in enumerate(shape) if i != dim)})


def _split(imp: _Importer, node, a) -> None:
    """split.Tensor / split_with_sizes (``torch.split``, ``chunk``): one slice per piece."""
    x = imp.val(a["self"])
    shape = imp.g.types[x].shape
    dim = int(a.get("dim", 0)) % len(shape)
    if "split_sizes" in a:
        sizes = [int(v) for v in a["split_sizes"]]
    else:
        step = int(a["split_size"])
        sizes = [min(step, shape[dim] - k) for k in range(0, shape[dim], step)]
    pieces, begin = [], 0
    for size in sizes:
        out = _slice_value(imp, node, x, dim, begin, begin + size, 1, final=False)
        pieces.append(x if out is None else out)
        begin += size
    imp.env[node.name] = tuple(pieces)


def _permute(imp: _Importer, node, a) -> None:
    """permute(dims) / transpose(dim0, dim1) / t -> transpose with a full permutation."""
    x = imp.val(node.args[0])
    rank = imp.g.types[x].rank
    if "dims" in a:
        perm = [int(d) % rank for d in a["dims"]]
    else:
        perm = list(range(rank))
        if rank >= 2:
            d0, d1 = (int(a["dim0"]) % rank, int(a["dim1"]) % rank) if "dim0" in a else (0, 1)
            perm[d0], perm[d1] = perm[d1], perm[d0]
    if perm == list(range(rank)):
        imp.alias(node, node.args[0])
    else:
        imp.emit(node, "transpose", [x], {"perm": tuple(perm)})


def _softmax(imp: _Importer, node, a) -> None:
    x = imp.val(a["self"])
    if a.get("half_to_float") or (a.get("dtype") is not None and DTYPES.get(a["dtype"]) != imp.g.types[x].dtype):
        raise imp.unsupported(node, "softmax with a dtype conversion is not supported")
    imp.emit(node, "softmax", [x], {"axis": int(a["dim"])})


def _passthrough(imp: _Importer, node, a) -> None:
    imp.alias(node, node.args[0])


def _dropout(imp: _Importer, node, a) -> None:
    if a.get("train", False):
        raise imp.unsupported(node, "dropout in training mode; call model.eval()")
    imp.alias(node, node.args[0])


def _same_dtype_copy(imp: _Importer, node, a) -> None:
    """_to_copy / to: a no-op when dtype is unchanged, otherwise a cast (unsupported)."""
    if imp.out_dtype(node) != imp.g.types[imp.val(node.args[0])].dtype:
        raise imp.unsupported(node, "dtype conversions are not supported (the IR has no cast op)")
    imp.alias(node, node.args[0])


def _filled(imp: _Importer, node, a) -> None:
    """full/zeros/ones/scalar_tensor: a constant of torch's static shape and dtype."""
    value = {"zeros": 0, "ones": 1}.get(_op_name(node), a.get("fill_value", a.get("s")))
    if isinstance(value, torch.fx.Node):
        raise imp.unsupported(node, "a fill value computed at run time is not supported")
    v = _out_val(node)
    arr = np.full(tuple(v.shape), value, dtype=imp.out_dtype(node))
    imp.env[node.name] = imp.const(f"{imp.ir_name(node)}.{_op_name(node)}", arr)


_HARDSIGMOID = {"alpha": 1.0 / 6.0, "beta": 0.5}  # torch: relu6(x + 3) / 6

HANDLERS: dict[str, Handler] = {
    "conv2d": _conv, "convolution": _conv, "linear": _linear, "addmm": _addmm,
    "mm": _mm, "matmul": _mm, "bmm": _mm,
    "batch_norm": _bn, "_native_batch_norm_legit_no_training": _bn,
    "relu": _unary("relu"), "sigmoid": _unary("sigmoid"), "tanh": _unary("tanh"),
    "exp": _unary("exp"), "sqrt": _unary("sqrt"), "erf": _unary("erf"), "neg": _unary("neg"),
    "abs": _unary("abs"), "reciprocal": _unary("reciprocal"), "hardswish": _unary("hardswish"),
    "hardsigmoid": _unary("hardsigmoid", lambda a: dict(_HARDSIGMOID)), "silu": _unary("silu"),
    "gelu": _unary("gelu", lambda a: {"approximate": str(a.get("approximate", "none"))}),
    "leaky_relu": _unary("leaky_relu", lambda a: {"alpha": float(a.get("negative_slope", 0.01))}),
    "hardtanh": _clip(-1.0, 1.0, "min_val", "max_val"), "relu6": _clip(0.0, 6.0),
    "clamp": _clip(None, None, "min", "max"), "clip": _clip(None, None, "min", "max"),
    "clamp_min": _clip(None, None, "min"), "clamp_max": _clip(None, None, "", "max"),
    "add": _binary("add"), "sub": _binary("sub"), "rsub": _binary("sub", reverse=True),
    "mul": _binary("mul"), "div": _binary("div"), "pow": _binary("pow"),
    "maximum": _binary("max"), "minimum": _binary("min"),
    "max_pool2d": _max_pool, "max_pool2d_with_indices": _max_pool, "avg_pool2d": _avg_pool,
    "constant_pad_nd": _constant_pad_nd,
    "adaptive_avg_pool2d": _adaptive_pool("avg_pool2d"), "_adaptive_avg_pool2d": _adaptive_pool("avg_pool2d"),
    "adaptive_max_pool2d": _adaptive_pool("max_pool2d"),
    "mean": _mean, "cat": _cat, "layer_norm": _layer_norm,
    "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape, "flatten": _reshape,
    "squeeze": _reshape, "unsqueeze": _reshape,
    "permute": _permute, "transpose": _permute, "t": _permute,
    "slice": _slice, "select": _select, "split": _split, "split_with_sizes": _split,
    "upsample_nearest2d": _upsample("nearest"), "_upsample_nearest_exact2d": _upsample("nearest_exact"),
    "upsample_bilinear2d": _upsample("linear"),
    "softmax": _softmax, "_softmax": _softmax,
    "clone": _passthrough, "contiguous": _passthrough, "alias": _passthrough, "detach": _passthrough,
    "lift_fresh_copy": _passthrough, "_to_copy": _same_dtype_copy, "to": _same_dtype_copy,
    "dropout": _dropout, "native_dropout": _dropout, "feature_dropout": _dropout,
    "full": _filled, "zeros": _filled, "ones": _filled, "scalar_tensor": _filled,
    "_assert_tensor_metadata": lambda imp, n, a: None,
}
"""ATen op name (overload packet) -> handler(importer, fx node, bound arguments)."""

REPORTED_WHOLE = ("lstm", "gru", "rnn_tanh", "rnn_relu", "upsample_bicubic2d", "_upsample_bilinear2d_aa",
                  "_upsample_bicubic2d_aa", "pixel_shuffle", "group_norm", "instance_norm", "embedding")
"""Layers qcompile cannot map, kept whole so errors name them rather than their pieces."""

PRESERVED = frozenset(HANDLERS) | frozenset(REPORTED_WHOLE)
"""ATen ops (by name) that :func:`decomposition_table` leaves undecomposed."""


def decomposition_table() -> dict:
    """``torch.export.default_decompositions()`` minus every overload of :data:`PRESERVED`."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if op._overloadpacket.__name__ in PRESERVED:
            table.pop(op)
    return table


# ============================================================================ entry point
def _example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ShapeError("load_torch needs example inputs (a tuple of tensors with the static shapes to compile "
                         "for); dynamic shapes are not supported")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"example input {i} is {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in DTYPES:
            raise ShapeError(f"example input {i} has dtype {t.dtype}; supported: {sorted(DTYPES.values())}")
    return tuple(example_inputs)


def _input_names(model: torch.nn.Module, n: int, given: Sequence[str] | None) -> list[str]:
    """``given`` (checked), else the names of ``forward``'s positional parameters.  Raises
    ShapeError if ``n`` example inputs cannot fill ``forward``'s required parameters."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in kinds]
    required = [p.name for p in positional if p.default is inspect.Parameter.empty]
    varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    if n < len(required) or (n > len(positional) and not varargs):
        raise ShapeError(f"{type(model).__qualname__}.forward takes inputs {[p.name for p in positional]} "
                         f"({len(required)} required) but {n} example inputs were given")
    if given is not None:
        names = [str(s) for s in given]
        if len(names) != n or len(set(names)) != n:
            raise InputError(f"input_names {names} must be {n} distinct names, one per example input")
        return names
    names = [p.name for p in positional[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Silence torch's fake-tensor error log while exporting: a failure is re-raised by us with
    a shorter message, the logged traceback only duplicates it."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _export(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Export (model already in eval mode) and decompose; a failure is a ShapeError when the model
    does not even run eagerly on ``example``, else a ModelLoadError."""
    try:
        with _quiet_fake_tensor_log():
            ep = torch.export.export(model, example)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        shapes = [tuple(t.shape) for t in example]
        try:
            with torch.no_grad():
                model(*example)
        except Exception as eager:  # noqa: BLE001
            raise ShapeError(f"{type(model).__qualname__} does not run on example inputs of shapes {shapes}: "
                             f"{_first_line(eager)}") from e
        raise ModelLoadError(f"torch.export could not capture {type(model).__qualname__}: {_first_line(e)}") from e
    try:
        return ep.run_decompositions(decomposition_table())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"decomposing the exported {type(model).__qualname__} failed: {_first_line(e)}") from e


def load_torch(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
               input_names: list[str] | None = None, name: str | None = None) -> Graph:
    """Import ``model`` traced on ``example_inputs`` (static shapes) into an IR graph.

    See the module docstring for the mapping and naming rules.  The model is exported in
    eval mode; every module's training flag is restored afterwards and no parameter or
    buffer is modified.  Raises ShapeError (missing/ill-fitting example inputs),
    UnsupportedOpError (an op without a mapping) or ModelLoadError (export failed).
    """
    example = _example_tuple(example_inputs)
    names = _input_names(model, len(example), input_names)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        ep = _export(model, example)
    finally:
        for m, training in flags:
            m.training = training
    try:
        graph = _Importer(ep, name or type(model).__name__).run(names)
    except ShapeError as e:
        raise ShapeError(f"{type(model).__qualname__} with example inputs "
                         f"{[tuple(t.shape) for t in example]}: {e}") from e
    graph.meta["source"] = {"format": "torch", "class": type(model).__qualname__}
    return graph
