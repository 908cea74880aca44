"""PyTorch -> IR via ``torch.export``.

``torch.export.export(model.eval(), example_inputs)`` captures the ATen graph;
``run_decompositions({})`` functionalises it while *keeping* high-level ops
(conv2d, linear, batch norm in inference form, pools), which map one-to-one to IR
ops.  Parameters and buffers become IR constants named by their ``state_dict``
key; IR nodes are named by the owning module path (``layer1.0.conv1``), so
provenance and per-layer reports use the names the user knows.

Shapes are static: every value's shape comes from the exported graph's
``meta["val"]`` for the given example inputs.  Any ATen op without a mapping
raises ``UnsupportedOpError`` naming the op, the fx node and the module.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qcompile.errors import ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.ir.graph import Graph, TensorType

_DT = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8", torch.uint8: "uint8",
       torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}


def _args(node: torch.fx.Node) -> dict[str, Any]:
    """Bind an ATen call's args/kwargs to schema names, filling schema defaults."""
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


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


class _Importer:
    def __init__(self, ep: torch.export.ExportedProgram, name: str):
        self.ep = ep
        self.g = Graph(name)
        self.env: dict[str, str] = {}   # fx node name -> IR value
        self.scalars: dict[str, Any] = {}

    def module_path(self, node: torch.fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            return list(stack.values())[-1][0]
        return ""

    def ir_name(self, node: torch.fx.Node) -> str:
        path = self.module_path(node)
        return path or node.name

    def unsupported(self, node: torch.fx.Node, alternative: str) -> UnsupportedOpError:
        path = self.module_path(node)
        where = node.name + (f" in module '{path}'" if path else "")
        return UnsupportedOpError(str(node.target), where, alternative, frontend="torch")

    def val(self, x: Any) -> str:
        if isinstance(x, torch.fx.Node):
            if x.name not in self.env:
                raise ShapeError(f"value '{x.name}' is not a tensor qcompile can represent")
            return self.env[x.name]
        raise TypeError(f"expected a tensor argument, got {x!r}")

    def scalar_const(self, value: float, like: str, hint: str) -> str:
        dtype = self.g.types[like].dtype
        return self.g.add_constant(hint, np.array(value, dtype=dtype))

    def emit(self, node: torch.fx.Node, op: str, inputs: Sequence[str], attrs: dict | None = None) -> str:
        n = self.g.make_node(op, list(inputs), attrs or {}, name=self.ir_name(node),
                             output_names=[self.g.fresh_name(node.name)])
        n.meta["torch_node"] = node.name
        path = self.module_path(node)
        if path:
            n.meta["module"] = path
        self.g.append(n)
        expected = node.meta.get("val")
        if isinstance(expected, torch.Tensor):
            got = self.g.types[n.outputs[0]].shape
            if tuple(expected.shape) != got:
                raise ShapeError(f"internal shape mismatch at {node.name}: torch {tuple(expected.shape)} vs IR {got}")
        self.env[node.name] = n.outputs[0]
        return n.outputs[0]

    def alias(self, node: torch.fx.Node, src: Any) -> None:
        self.env[node.name] = self.val(src)

    def run(self, input_names: Sequence[str] | None) -> Graph:
        sig = self.ep.graph_signature
        state = {**self.ep.state_dict, **getattr(self.ep, "constants", {})}
        param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                    **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
        user_inputs = list(sig.user_inputs)
        names = list(input_names or [])
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in param_of:
                    key = param_of[node.name]
                    tensor = state[key]
                    self.env[node.name] = self.g.add_constant(key, tensor.detach().cpu().numpy(), exact_name=True)
                elif node.name in user_inputs:
                    idx = user_inputs.index(node.name)
                    name = names[idx] if idx < len(names) else node.name
                    v = node.meta.get("val")
                    if not isinstance(v, torch.Tensor) or v.dtype not in _DT:
                        raise ShapeError(f"input '{name}' is not a tensor of a supported dtype")
                    self.env[node.name] = self.g.add_input(name, TensorType(tuple(v.shape), _DT[v.dtype]))
                else:
                    raise ModelLoadError(f"unexpected exported placeholder '{node.name}'")
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                outs = node.args[0]
                flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
                values = []
                for i, o in enumerate(flat):
                    v = self.val(o)
                    if v in values or v in self.g.inputs or v in self.g.constants:
                        v = self.g.append(self.g.make_node("identity", [v], name=f"output_{i}")).outputs[0]
                    values.append(v)
                self.g.outputs = values
        return self.g

    def call(self, node: torch.fx.Node) -> None:
        if node.target is operator.getitem:
            src, idx = node.args
            if src.name in self.env and isinstance(self.env[src.name], tuple):
                picked = self.env[src.name][idx]
                if picked is None:
                    raise self.unsupported(node, "only the first output of this op is supported")
                self.env[node.name] = picked
                return
            raise self.unsupported(node, "indexing into tuples is only supported for batch norm / pool outputs")
        packet = getattr(node.target, "_overloadpacket", None)
        key = packet.__name__ if packet is not None else str(node.target)
        handler = HANDLERS.get(key)
        if handler is None:
            raise self.unsupported(node, _ALTERNATIVE)
        handler(self, node, _args(node))


_ALTERNATIVE = ("qcompile maps standard CNN layers (conv, linear, batch norm, pooling, activations, add/mul/cat, "
                "reshape/flatten/permute, softmax, mean); rewrite this part of the model, or export it to ONNX")


def _conv(imp: _Importer, node, a) -> None:
    if a.get("transposed", False):
        raise imp.unsupported(node, "transposed convolution is not supported yet")
    w = imp.g.types[imp.val(a["weight"])]
    if w.rank != 4:
        raise imp.unsupported(node, f"only 2-D convolution is supported (weight {w})")
    pad = a.get("padding", (0, 0))
    stride, dil = _pair(a.get("stride", 1)), _pair(a.get("dilation", 1))
    if isinstance(pad, str):
        if pad == "valid":
            pads = (0, 0, 0, 0)
        else:  # 'same', stride 1: total = d*(k-1); torch puts the extra element at the end
            tot = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
            pads = (tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)
    else:
        p = _pair(pad)
        pads = (p[0], p[1], p[0], p[1])
    ins = [imp.val(a["input"]), imp.val(a["weight"])]
    if a.get("bias") is not None:
        ins.append(imp.val(a["bias"]))
    imp.emit(node, "conv2d", ins, {"strides": stride, "pads": pads, "dilations": dil, "group": int(a["groups"])})


def _linear(imp: _Importer, node, a) -> None:
    ins = [imp.val(a["input"]), imp.val(a["weight"])]
    if a.get("bias") is not None:
        ins.append(imp.val(a["bias"]))
    imp.emit(node, "linear", ins)


def _addmm(imp: _Importer, node, a) -> None:
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        raise imp.unsupported(node, "addmm with alpha/beta != 1")
    y = imp.emit(node, "matmul", [imp.val(a["mat1"]), imp.val(a["mat2"])])
    imp.emit(node, "add", [y, imp.val(a["self"])])


def _bn(imp: _Importer, node, a) -> None:
    if a.get("training", False):
        raise imp.unsupported(node, "batch norm in training mode; call model.eval() before compiling")
    x = imp.val(a["input"])
    c = imp.g.types[x].shape[1]
    params = []
    for key, default in (("weight", 1.0), ("bias", 0.0), ("running_mean", None), ("running_var", None)):
        v = a.get(key)
        if v is None:
            if default is None:
                raise imp.unsupported(node, "batch norm without running statistics")
            params.append(imp.g.add_constant(f"{imp.ir_name(node)}.{key}", np.full(c, default, np.float32)))
        else:
            params.append(imp.val(v))
    out = imp.emit(node, "batch_norm", [x, *params], {"epsilon": float(a.get("eps", 1e-5))})
    if node.target.__name__.startswith("_native_batch_norm"):
        imp.env[node.name] = (out, None, None)  # type: ignore[assignment]


def _unary(op: str, attrs: Callable[[dict], dict] | None = None):
    def h(imp: _Importer, node, a) -> None:
        imp.emit(node, op, [imp.val(node.args[0])], attrs(a) if attrs else {})
    return h


def _binary(op: str):
    def h(imp: _Importer, node, a) -> None:
        x, y = node.args[0], node.args[1]
        alpha = a.get("alpha", 1)
        if not isinstance(x, torch.fx.Node):
            if op in ("add", "mul"):
                x, y = y, x
            else:
                xv = imp.scalar_const(x, imp.val(y), f"{imp.ir_name(node)}.scalar")
                imp.emit(node, op, [xv, imp.val(y)])
                return
        xv = imp.val(x)
        if isinstance(y, torch.fx.Node):
            yv = imp.val(y)
        else:
            yv = imp.scalar_const(float(y) * (alpha if op in ("add", "sub") else 1), xv, f"{imp.ir_name(node)}.scalar")
            alpha = 1
        if alpha != 1:
            yv = imp.emit(node, "mul", [yv, imp.scalar_const(alpha, yv, f"{imp.ir_name(node)}.alpha")])
        imp.emit(node, op, [xv, yv])
    return h


def _clamp(lo_key: str, hi_key: str, lo_default=None, hi_default=None):
    def h(imp: _Importer, node, a) -> None:
        lo, hi = a.get(lo_key, lo_default), a.get(hi_key, hi_default)
        if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
            raise imp.unsupported(node, "clamp bounds must be numbers")
        imp.emit(node, "clip", [imp.val(a.get("self", node.args[0]))],
                 {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)})
    return h


def _pool_common(imp, node, a, ceil_key="ceil_mode"):
    k = _pair(a["kernel_size"])
    s = _pair(a["stride"]) if a.get("stride") else k
    p = _pair(a.get("padding", 0))
    return {"kernel": k, "strides": s, "pads": (p[0], p[1], p[0], p[1]), "ceil_mode": int(bool(a.get(ceil_key)))}


def _max_pool(imp: _Importer, node, a) -> None:
    attrs = _pool_common(imp, node, a)
    attrs["dilations"] = _pair(a.get("dilation", 1))
    out = imp.emit(node, "max_pool2d", [imp.val(a["self"])], attrs)
    if "with_indices" in node.target.__name__:
        imp.env[node.name] = (out, None)  # type: ignore[assignment]


def _avg_pool(imp: _Importer, node, a) -> None:
    if a.get("divisor_override") is not None:
        raise imp.unsupported(node, "avg_pool2d with divisor_override")
    attrs = _pool_common(imp, node, a)
    attrs["count_include_pad"] = int(bool(a.get("count_include_pad", True)))
    imp.emit(node, "avg_pool2d", [imp.val(a["self"])], attrs)


def _adaptive_avg(imp: _Importer, node, a) -> None:
    x = imp.val(a["self"])
    _, _, h, w = imp.g.types[x].shape
    oh, ow = (a["output_size"][0], a["output_size"][-1])
    oh, ow = oh or h, ow or w
    if (oh, ow) == (1, 1):
        imp.emit(node, "global_avg_pool", [x])
    elif h % oh == 0 and w % ow == 0:
        k = (h // oh, w // ow)
        imp.emit(node, "avg_pool2d", [x], {"kernel": k, "strides": k, "pads": (0, 0, 0, 0), "ceil_mode": 0,
                                           "count_include_pad": 0})
    else:
        raise imp.unsupported(node, f"adaptive pooling {h}x{w} -> {oh}x{ow} is not an exact tiling; "
                                    "use a fixed kernel instead")


def _reshape_to_val(imp: _Importer, node, a) -> None:
    shape = tuple(int(d) for d in node.meta["val"].shape)
    src = imp.val(node.args[0])
    if imp.g.types[src].shape == shape:
        imp.alias(node, node.args[0])
    else:
        imp.emit(node, "reshape", [src], {"shape": shape})


def _permute(imp: _Importer, node, a) -> None:
    x = imp.val(node.args[0])
    rank = imp.g.types[x].rank
    if "dims" in a:
        perm = tuple(int(d) % rank for d in a["dims"])
    else:
        d0, d1 = int(a["dim0"]) % rank, int(a["dim1"]) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        perm = tuple(perm)
    if perm == tuple(range(rank)):
        imp.alias(node, node.args[0])
    else:
        imp.emit(node, "transpose", [x], {"perm": perm})


def _t(imp: _Importer, node, a) -> None:
    x = imp.val(node.args[0])
    if imp.g.types[x].rank < 2:
        imp.alias(node, node.args[0])
    else:
        imp.emit(node, "transpose", [x], {"perm": (1, 0)})


def _mean(imp: _Importer, node, a) -> None:
    x = imp.val(a["self"])
    rank = imp.g.types[x].rank
    dims = a.get("dim")
    axes = tuple(range(rank)) if not dims else tuple(int(d) % rank for d in dims)
    keep = bool(a.get("keepdim", False))
    if sorted(axes) == [2, 3] and rank == 4 and keep:
        imp.emit(node, "global_avg_pool", [x])
    else:
        imp.emit(node, "reduce_mean", [x], {"axes": axes, "keepdims": int(keep)})


def _softmax(imp: _Importer, node, a) -> None:
    if a.get("half_to_float"):
        raise imp.unsupported(node, "half_to_float softmax")
    imp.emit(node, "softmax", [imp.val(a["self"])], {"axis": int(a["dim"])})


def _passthrough(imp: _Importer, node, a) -> None:
    imp.alias(node, node.args[0])


def _dropout(imp: _Importer, node, a) -> None:
    if a.get("train", False):
        raise imp.unsupported(node, "dropout in training mode; call model.eval()")
    imp.alias(node, node.args[0])


def _hardtanh(imp: _Importer, node, a) -> None:
    imp.emit(node, "clip", [imp.val(node.args[0])], {"min": float(a.get("min_val", -1.0)),
                                                     "max": float(a.get("max_val", 1.0))})


def _gelu(imp: _Importer, node, a) -> None:
    imp.emit(node, "gelu", [imp.val(node.args[0])], {"approximate": a.get("approximate", "none")})


HANDLERS: dict[str, Callable[[_Importer, torch.fx.Node, dict], None]] = {
    "conv2d": _conv, "convolution": _conv, "linear": _linear, "addmm": _addmm,
    "mm": lambda imp, n, a: imp.emit(n, "matmul", [imp.val(n.args[0]), imp.val(n.args[1])]),
    "matmul": lambda imp, n, a: imp.emit(n, "matmul", [imp.val(n.args[0]), imp.val(n.args[1])]),
    "bmm": lambda imp, n, a: imp.emit(n, "matmul", [imp.val(n.args[0]), imp.val(n.args[1])]),
    "batch_norm": _bn, "_native_batch_norm_legit_no_training": _bn,
    "relu": _unary("relu"), "relu_": _unary("relu"), "sigmoid": _unary("sigmoid"), "tanh": _unary("tanh"),
    "exp": _unary("exp"), "sqrt": _unary("sqrt"), "erf": _unary("erf"), "neg": _unary("neg"),
    "abs": _unary("abs"), "reciprocal": _unary("reciprocal"),
    "hardswish": _unary("hardswish"), "hardswish_": _unary("hardswish"),
    "hardsigmoid": _unary("hardsigmoid", lambda a: {"alpha": 1.0 / 6.0, "beta": 0.5}),
    "hardsigmoid_": _unary("hardsigmoid", lambda a: {"alpha": 1.0 / 6.0, "beta": 0.5}),
    "silu": _unary("silu"), "silu_": _unary("silu"), "gelu": _gelu,
    "leaky_relu": _unary("leaky_relu", lambda a: {"alpha": float(a.get("negative_slope", 0.01))}),
    "hardtanh": _hardtanh, "hardtanh_": _hardtanh,
    "relu6": _clamp("__none", "__none", 0.0, 6.0),
    "clamp": _clamp("min", "max"), "clip": _clamp("min", "max"),
    "add": _binary("add"), "add_": _binary("add"), "sub": _binary("sub"), "mul": _binary("mul"),
    "mul_": _binary("mul"), "div": _binary("div"), "pow": _binary("pow"),
    "maximum": _binary("max"), "minimum": _binary("min"),
    "max_pool2d": _max_pool, "max_pool2d_with_indices": _max_pool, "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _adaptive_avg, "_adaptive_avg_pool2d": _adaptive_avg,
    "mean": _mean,
    "cat": lambda imp, n, a: imp.emit(n, "concat", [imp.val(t) for t in a["tensors"]],
                                      {"axis": int(a.get("dim", 0)) % imp.g.types[imp.val(a["tensors"][0])].rank}),
    "view": _reshape_to_val, "reshape": _reshape_to_val, "_unsafe_view": _reshape_to_val,
    "flatten": _reshape_to_val, "squeeze": _reshape_to_val, "unsqueeze": _reshape_to_val,
    "permute": _permute, "transpose": _permute, "t": _t,
    "softmax": _softmax, "_softmax": _softmax,
    "clone": _passthrough, "contiguous": _passthrough, "alias": _passthrough, "detach": _passthrough,
    "_assert_tensor_metadata": lambda imp, n, a: None,
    "dropout": _dropout, "native_dropout": _dropout, "feature_dropout": _dropout,
}


def load_torch(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
               input_names: list[str] | None = None, name: str | None = None) -> Graph:
    """Trace ``model`` with ``torch.export`` on ``example_inputs`` and import it into the IR.

    The user's model is not modified (its training flag is restored afterwards).
    """
    if not isinstance(example_inputs, tuple) or not example_inputs or \
            not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ShapeError("load_torch needs a non-empty tuple of example input tensors (static shapes)")
    was_training = model.training
    try:
        model.eval()
        try:
            ep = torch.export.export(model, example_inputs)
            ep = ep.run_decompositions({})
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            raise ModelLoadError(f"torch.export could not capture {type(model).__qualname__}: "
                                 f"{str(e).strip().splitlines()[0]}") from e
        if input_names is None:
            params = list(inspect.signature(model.forward).parameters)
            input_names = params[: len(example_inputs)]
        graph = _Importer(ep, name or type(model).__name__).run(input_names)
    finally:
        model.train(was_training)
    graph.meta["source"] = {"format": "torch", "class": type(model).__qualname__}
    graph.remove_unused_constants()
    return graph
