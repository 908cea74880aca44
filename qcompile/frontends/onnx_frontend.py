"""ONNX -> IR.

Steps, each failing with a named error:

1. read the file (``ModelLoadError`` naming the file: missing, truncated, not a
   protobuf, fails ``onnx.checker``); external-data locations must stay inside the
   model's folder;
2. upgrade opsets below 13 with ``onnx.version_converter``; non-standard domains
   are rejected naming the node;
3. specialise dynamic input dimensions to ``input_shapes`` (``ShapeError`` when a
   dynamic dimension is left or a given shape contradicts the model);
4. fold everything that became constant (shape subgraphs ``Shape -> Slice ->
   Concat -> Reshape``, ``Constant`` nodes, casts of constants) with the
   maintained ``onnxscript`` optimizer and ONNX shape inference;
5. map each ONNX node to IR ops; anything else raises ``UnsupportedOpError``
   naming the op, the node and what to do.

Node names are kept (made unique), so provenance and reports speak the user's
names.  Metadata written by our exporter (``qcompile.meta``) is restored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.errors import ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.ir.graph import Graph, TensorType

MIN_OPSET = 13

_ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT8: "int8",
         onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
         onnx.TensorProto.BOOL: "bool"}


# ----------------------------------------------------------------------------- reading
def _check_external_data(model: onnx.ModelProto, base: Path, path: Path) -> None:
    base = base.resolve()
    for t in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 - the helper's own walker
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise ModelLoadError(f"'{path}': tensor '{t.name}' has external data at '{loc}', which is outside "
                                 f"the model's folder '{base}'; refusing to read it")
        if not target.is_file():
            raise ModelLoadError(f"'{path}': external data file '{loc}' for tensor '{t.name}' is missing")


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is a ModelLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise ModelLoadError(f"'{path}' is not a readable ONNX model (truncated or corrupt?): {e}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"'{path}' parsed as an empty ONNX model (not an ONNX file, or truncated)")
    _check_external_data(model, path.parent, path)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"'{path}' fails the ONNX checker: {str(e).strip().splitlines()[0]}") from e
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _reject_foreign_domains(model: onnx.ModelProto) -> None:
    for i, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{n.domain}::{n.op_type}", n.name or f"node {i}",
                                     "only standard ONNX (default domain) operators are supported; "
                                     "export without vendor-specific fusions", frontend="onnx")


def _specialise_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    inits = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in real_inputs]
    unknown = set(input_shapes) - set(names)
    if unknown:
        raise ShapeError(f"input shapes given for {sorted(unknown)}, but the model's inputs are {names}")
    # initializers listed as graph inputs are constants, not inputs
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    real_inputs = list(model.graph.input)  # extend() copied: edit the messages now in the model
    final: dict[str, tuple] = {}
    for vi in real_inputs:
        dims = vi.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        given = input_shapes.get(vi.name)
        if given is not None:
            if len(given) != len(declared):
                raise ShapeError(f"input '{vi.name}' has rank {len(declared)} ({_fmt(declared)}), "
                                 f"but the given shape {'x'.join(map(str, given))} has rank {len(given)}")
            for k, (d, gv) in enumerate(zip(declared, given)):
                if d is not None and d != gv:
                    raise ShapeError(f"input '{vi.name}' dimension {k} is fixed to {d} in the model, "
                                     f"but the given shape says {gv}")
            shape = tuple(given)
        else:
            missing = [k for k, d in enumerate(declared) if d is None]
            if missing:
                raise ShapeError(
                    f"input '{vi.name}' has dynamic dimension(s) {missing} ({_fmt(declared)}); qcompile compiles "
                    f"static shapes: pass --input-shape {vi.name}=" + "x".join(
                        str(d) if d is not None else ("1" if k == 0 else "N") for k, d in enumerate(declared)))
            shape = tuple(declared)  # type: ignore[arg-type]
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = int(v)
        final[vi.name] = shape
    # symbolic dims elsewhere refer to the input symbols just fixed: let shape inference redo them
    del model.graph.value_info[:]
    for vo in model.graph.output:
        for d in vo.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    return final


def _fmt(dims: list) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _fold_constants(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Fold shape arithmetic and constant subgraphs with the onnxscript optimizer."""
    import onnxscript.optimizer

    try:
        model = onnxscript.optimizer.optimize(model, num_iterations=4, input_size_limit=1 << 22,
                                              output_size_limit=1 << 26)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"'{path}': constant folding / shape inference failed: {e}") from e


# ----------------------------------------------------------------------------- mapping
class _Importer:
    def __init__(self, model: onnx.ModelProto, path: Path):
        self.model = model
        self.path = path
        self.g = Graph(model.graph.name or path.stem)
        self.alias: dict[str, str] = {}   # onnx value -> IR value (for eliminated nodes)
        self.consts: dict[str, np.ndarray] = {}

    # values ---------------------------------------------------------------
    def v(self, name: str) -> str:
        if not name:
            return ""
        name = self.alias.get(name, name)
        if name in self.consts and name not in self.g.constants:
            self.g.add_constant(name, self.consts[name], exact_name=True)
        if name not in self.g.types:
            raise ShapeError(f"'{self.path}': value '{name}' is used before it is defined")
        return name

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        return self.consts.get(self.alias.get(name, name))

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str], attrs: dict | None = None,
             output: str | None = None, suffix: str = "") -> str:
        out = output if output is not None else self.g.fresh_name(f"{node.output[0]}{suffix}")
        n = self.g.make_node(op, inputs, attrs or {}, name=(self.node_name(node) + suffix), output_names=[out])
        if suffix == "":
            meta = self.meta_of(node)
            if meta:
                n.meta.update(meta)
        self.g.append(n)
        return out

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}_{self.index}"

    @staticmethod
    def meta_of(node: onnx.NodeProto) -> dict:
        for p in node.metadata_props:
            if p.key == "qcompile.meta":
                return json.loads(p.value)
        return {}

    def unsupported(self, node: onnx.NodeProto, alternative: str) -> UnsupportedOpError:
        return UnsupportedOpError(node.op_type, self.node_name(node), alternative, frontend="onnx")

    # main loop ------------------------------------------------------------
    def run(self, input_shapes: dict[str, tuple]) -> Graph:
        mg = self.model.graph
        elem_of = {vi.name: vi.type.tensor_type.elem_type for vi in mg.input}
        for name, shape in input_shapes.items():
            dtype = _ELEM.get(elem_of[name])
            if dtype is None:
                raise ShapeError(f"input '{name}' has unsupported element type {elem_of[name]}")
            self.g.add_input(name, TensorType(shape, dtype))
        for t in mg.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        for self.index, node in enumerate(mg.node):
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise self.unsupported(node, _ALTERNATIVES.get(node.op_type, _DEFAULT_ALTERNATIVE))
            handler(self, node, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        outs = []
        for o in mg.output:
            name = self.alias.get(o.name, o.name)
            if name in self.consts and name not in self.g.types:
                raise self.unsupported(mg.node[-1], f"graph output '{o.name}' is a constant; nothing to compile")
            outs.append(self.v(name))
        if len(set(outs)) != len(outs) or any(o in self.g.inputs for o in outs):
            # an output aliasing an input or another output needs a distinct value
            fixed = []
            for o in outs:
                if o in fixed or o in self.g.inputs:
                    n = self.g.append(self.g.make_node("identity", [o], name=f"{o}_out"))
                    o = n.outputs[0]
                fixed.append(o)
            outs = fixed
        self.g.outputs = outs
        return self.g


_DEFAULT_ALTERNATIVE = ("qcompile supports standard CNN operators (see `qcompile passes` / README); "
                        "replace this op in the model or cut the graph before it")
_ALTERNATIVES = {
    "ConvTranspose": "transposed convolution is not supported yet; cut the model before it",
    "Resize": "Resize/Upsample is not supported yet; cut the model before it",
    "Shape": "its input shape must be static so it folds: pass --input-shape for every dynamic input",
    "Loop": "control flow is not supported; export the model with static unrolling",
    "If": "control flow is not supported; export the model with static unrolling",
    "LSTM": "recurrent layers are not supported (qcompile targets CNNs)",
    "GRU": "recurrent layers are not supported (qcompile targets CNNs)",
    "QuantizeLinear": "pre-quantized models are not accepted as input; give the fp32 model and use the quantize pass",
    "DequantizeLinear": "pre-quantized models are not accepted as input; give the fp32 model and use the quantize pass",
}


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _conv(imp: _Importer, node, a) -> None:
    w = imp.g.types[imp.v(node.input[1])]
    if w.rank != 4:
        raise imp.unsupported(node, f"only 2-D convolution is supported (weight {w})")
    x = imp.g.types[imp.v(node.input[0])]
    k = w.shape[2:]
    strides = _ints(a.get("strides", (1, 1)))
    dil = _ints(a.get("dilations", (1, 1)))
    pads = _auto_pads(imp, node, a, x.shape[2:], k, strides, dil)
    ins = [imp.v(i) for i in node.input]
    imp.emit(node, "conv2d", ins, {"strides": strides, "pads": pads, "dilations": dil,
                                   "group": int(a.get("group", 1))}, output=node.output[0])


def _auto_pads(imp, node, a, spatial, k, strides, dil) -> tuple[int, int, int, int]:
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = _ints(a.get("pads", (0, 0, 0, 0)))
        return (p[0], p[1], p[2], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    out = []
    for size, kk, s, d in zip(spatial, k, strides, dil):
        total = max(0, (-(-size // s) - 1) * s + (kk - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def _gemm(imp: _Importer, node, a) -> None:
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    x = imp.v(node.input[0])
    if ta:
        x = imp.emit(node, "transpose", [x], {"perm": (1, 0)}, suffix="/transA")
    bconst = imp.const(node.input[1])
    cconst = imp.const(node.input[2]) if len(node.input) > 2 else None
    if bconst is not None and (len(node.input) < 3 or not node.input[2] or cconst is not None):
        w = (bconst if tb else bconst.T) * alpha
        ins = [x, imp.g.add_constant(f"{node.input[1]}", w.astype(bconst.dtype))]
        if cconst is not None:
            bias = np.broadcast_to(cconst * beta, (w.shape[0],)).astype(bconst.dtype)
            ins.append(imp.g.add_constant(f"{node.input[2]}", bias))
        imp.emit(node, "linear", ins, output=node.output[0])
        return
    b = imp.v(node.input[1])
    if tb:
        b = imp.emit(node, "transpose", [b], {"perm": (1, 0)}, suffix="/transB")
    y = imp.emit(node, "matmul", [x, b], suffix="/matmul")
    if alpha != 1.0:
        y = imp.emit(node, "mul", [y, imp.g.add_constant(node.name + "_alpha", np.array(alpha, np.float32))],
                     suffix="/alpha")
    if len(node.input) > 2 and node.input[2]:
        c = imp.v(node.input[2])
        if beta != 1.0:
            c = imp.emit(node, "mul", [c, imp.g.add_constant(node.name + "_beta", np.array(beta, np.float32))],
                         suffix="/beta")
        y = imp.emit(node, "add", [y, c], suffix="/bias")
    imp.alias[node.output[0]] = y


def _matmul(imp: _Importer, node, a) -> None:
    w = imp.const(node.input[1])
    if w is not None and w.ndim == 2 and imp.g.types[imp.v(node.input[0])].rank >= 1:
        wt = imp.g.add_constant(f"{node.input[1]}_T", np.ascontiguousarray(w.T))
        imp.emit(node, "linear", [imp.v(node.input[0]), wt], output=node.output[0])
        return
    imp.emit(node, "matmul", [imp.v(node.input[0]), imp.v(node.input[1])], output=node.output[0])


def _bn(imp: _Importer, node, a) -> None:
    if len(node.output) > 1 and any(node.output[1:]) or int(a.get("training_mode", 0)):
        raise imp.unsupported(node, "training-mode batch norm; export the model in eval mode")
    imp.emit(node, "batch_norm", [imp.v(i) for i in node.input], {"epsilon": float(a.get("epsilon", 1e-5))},
             output=node.output[0])


def _unary(op: str, attr_map: Callable[[dict], dict] | None = None):
    def h(imp: _Importer, node, a) -> None:
        imp.emit(node, op, [imp.v(node.input[0])], attr_map(a) if attr_map else {}, output=node.output[0])
    return h


def _binary(op: str):
    def h(imp: _Importer, node, a) -> None:
        if len(node.input) != 2:
            raise imp.unsupported(node, f"{node.op_type} with {len(node.input)} inputs; only 2 are supported")
        x, y = imp.v(node.input[0]), imp.v(node.input[1])
        tx, ty = imp.g.types[x], imp.g.types[y]
        if tx.dtype != ty.dtype:
            for name, t, other in ((x, tx, ty), (y, ty, tx)):
                if name in imp.g.constants and t.dtype != other.dtype:
                    cast = imp.g.add_constant(f"{name}_{other.dtype}", imp.g.constants[name].astype(other.dtype))
                    x, y = (cast, y) if name == x else (x, cast)
        imp.emit(node, op, [x, y], output=node.output[0])
    return h


def _clip(imp: _Importer, node, a) -> None:
    lo = imp.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("min")
    hi = imp.const(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("max")
    for name, val in (("min", 1), ("max", 2)):
        if len(node.input) > val and node.input[val] and imp.const(node.input[val]) is None:
            raise imp.unsupported(node, f"Clip {name} must be a constant")
    imp.emit(node, "clip", [imp.v(node.input[0])],
             {"min": None if lo is None else float(np.asarray(lo)), "max": None if hi is None else float(np.asarray(hi))},
             output=node.output[0])


def _pool(op: str):
    def h(imp: _Importer, node, a) -> None:
        if int(a.get("storage_order", 0)) or (len(node.output) > 1 and node.output[1]):
            raise imp.unsupported(node, "MaxPool indices output / storage_order=1 are not supported")
        k = _ints(a["kernel_shape"])
        if len(k) != 2:
            raise imp.unsupported(node, f"only 2-D pooling is supported (kernel {k})")
        x = imp.g.types[imp.v(node.input[0])]
        strides = _ints(a.get("strides", (1, 1)))
        dil = _ints(a.get("dilations", (1, 1)))
        attrs = {"kernel": k, "strides": strides, "pads": _auto_pads(imp, node, a, x.shape[2:], k, strides, dil),
                 "ceil_mode": int(a.get("ceil_mode", 0))}
        if op == "max_pool2d":
            attrs["dilations"] = dil
        else:
            if dil != (1, 1):
                raise imp.unsupported(node, "dilated average pooling is not supported")
            attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
        imp.emit(node, op, [imp.v(node.input[0])], attrs, output=node.output[0])
    return h


def _axes(imp: _Importer, node, a, rank: int) -> tuple[int, ...] | None:
    if len(node.input) > 1 and node.input[1]:
        c = imp.const(node.input[1])
        if c is None:
            raise imp.unsupported(node, "axes must be constant")
        ax = c.reshape(-1).tolist()
    elif "axes" in a:
        ax = list(a["axes"])
    else:
        return None
    return tuple(int(x) % rank for x in ax)


def _reduce_mean(imp: _Importer, node, a) -> None:
    x = imp.v(node.input[0])
    rank = imp.g.types[x].rank
    axes = _axes(imp, node, a, rank)
    if axes is None:
        if int(a.get("noop_with_empty_axes", 0)):
            imp.alias[node.output[0]] = x
            return
        axes = tuple(range(rank))
    imp.emit(node, "reduce_mean", [x], {"axes": axes, "keepdims": int(a.get("keepdims", 1))}, output=node.output[0])


def _to_reshape(imp: _Importer, node, shape: tuple[int, ...]) -> None:
    imp.emit(node, "reshape", [imp.v(node.input[0])], {"shape": shape}, output=node.output[0])


def _reshape(imp: _Importer, node, a) -> None:
    target = imp.const(node.input[1])
    if target is None:
        raise imp.unsupported(node, "the target shape is computed at run time and did not fold; pass "
                                    "--input-shape for every dynamic input so shape subgraphs become constant")
    x = imp.g.types[imp.v(node.input[0])]
    shape = [int(d) for d in target.reshape(-1)]
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1]))
        shape[shape.index(-1)] = x.numel // max(known, 1)
    _to_reshape(imp, node, tuple(shape))


def _squeeze(imp: _Importer, node, a) -> None:
    x = imp.g.types[imp.v(node.input[0])]
    axes = _axes(imp, node, a, x.rank)
    if axes is None:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    _to_reshape(imp, node, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def _unsqueeze(imp: _Importer, node, a) -> None:
    x = imp.g.types[imp.v(node.input[0])]
    out_rank = x.rank + (len(imp.const(node.input[1]).reshape(-1)) if len(node.input) > 1
                         else len(a.get("axes", ())))
    axes = _axes(imp, node, a, out_rank) or ()
    it = iter(x.shape)
    _to_reshape(imp, node, tuple(1 if i in axes else next(it) for i in range(out_rank)))


def _eliminate(imp: _Importer, node, a) -> None:
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
        raise imp.unsupported(node, "Dropout mask output is not supported")
    src = imp.alias.get(node.input[0], node.input[0])
    imp.alias[node.output[0]] = src


def _constant(imp: _Importer, node, a) -> None:
    value = next(iter(a.values())) if a else None
    if isinstance(value, onnx.TensorProto):
        imp.consts[node.output[0]] = numpy_helper.to_array(value)
    elif value is not None:
        imp.consts[node.output[0]] = np.asarray(value)
    else:
        raise imp.unsupported(node, "Constant without a value")


def _sum(imp: _Importer, node, a) -> None:
    if len(node.input) == 1:
        imp.alias[node.output[0]] = imp.alias.get(node.input[0], node.input[0])
        return
    acc = imp.v(node.input[0])
    for k, i in enumerate(node.input[1:]):
        last = k == len(node.input) - 2
        acc = imp.emit(node, "add", [acc, imp.v(i)], output=node.output[0] if last else None,
                       suffix="" if last else f"/add{k}")


def _softmax(imp: _Importer, node, a) -> None:
    imp.emit(node, "softmax", [imp.v(node.input[0])], {"axis": int(a.get("axis", -1))}, output=node.output[0])


HANDLERS: dict[str, Callable[[_Importer, onnx.NodeProto, dict], None]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _bn,
    "Relu": _unary("relu"), "Sigmoid": _unary("sigmoid"), "Tanh": _unary("tanh"), "Exp": _unary("exp"),
    "Sqrt": _unary("sqrt"), "Erf": _unary("erf"), "Neg": _unary("neg"), "Abs": _unary("abs"),
    "Reciprocal": _unary("reciprocal"), "HardSwish": _unary("hardswish"),
    "HardSigmoid": _unary("hardsigmoid", lambda a: {"alpha": float(a.get("alpha", 0.2)),
                                                     "beta": float(a.get("beta", 0.5))}),
    "LeakyRelu": _unary("leaky_relu", lambda a: {"alpha": float(a.get("alpha", 0.01))}),
    "Gelu": _unary("gelu", lambda a: {"approximate": (a.get("approximate", b"none").decode()
                                                      if isinstance(a.get("approximate", "none"), bytes)
                                                      else a.get("approximate", "none"))}),
    "Clip": _clip,
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Pow": _binary("pow"), "Max": _binary("max"), "Min": _binary("min"), "Sum": _sum,
    "MaxPool": _pool("max_pool2d"), "AveragePool": _pool("avg_pool2d"),
    "GlobalAveragePool": _unary("global_avg_pool"), "ReduceMean": _reduce_mean,
    "Concat": lambda imp, n, a: imp.emit(n, "concat", [imp.v(i) for i in n.input], {"axis": int(a["axis"])},
                                         output=n.output[0]),
    "Reshape": _reshape, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Flatten": lambda imp, n, a: imp.emit(n, "flatten", [imp.v(n.input[0])], {"axis": int(a.get("axis", 1))},
                                          output=n.output[0]),
    "Transpose": lambda imp, n, a: imp.emit(
        n, "transpose", [imp.v(n.input[0])],
        {"perm": _ints(a["perm"]) if "perm" in a else tuple(reversed(range(imp.g.types[imp.v(n.input[0])].rank)))},
        output=n.output[0]),
    "Softmax": _softmax, "Identity": _eliminate, "Dropout": _eliminate, "Constant": _constant,
}


def load_onnx(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Load an ONNX CNN into the IR with static shapes (see module docstring)."""
    path = Path(path)
    model = read_onnx(path)
    _reject_foreign_domains(model)
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"'{path}': cannot upgrade opset {opset} to {MIN_OPSET}: {e}") from e
    shapes = _specialise_inputs(model, dict(input_shapes or {}))
    model = _fold_constants(model, path)
    graph = _Importer(model, path).run(shapes)
    graph.remove_unused_constants()
    for p in model.metadata_props:
        if p.key == "qcompile.graph_meta":
            graph.meta.update(json.loads(p.value))
    graph.meta["source"] = {"format": "onnx", "path": str(path), "opset": opset,
                            "producer": f"{model.producer_name} {model.producer_version}".strip()}
    graph.meta["input_shapes"] = {k: list(v) for k, v in shapes.items()}
    return graph
