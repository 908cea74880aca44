"""ONNX -> IR.

:func:`load_onnx` runs these steps, each failing with a named error:

1. **read** (:func:`read_onnx`): the file must exist, be non-empty and parse as
   an ONNX protobuf (a torch checkpoint or pickle is recognised by its header
   and named as such; nothing is ever unpickled); no constant may *declare*
   more elements than :func:`qcompile.frontends.max_tensor_elements`
   (ShapeError, checked on dims before any data is read); external-data
   locations must be relative, stay inside the model's folder and hold exactly
   the bytes the tensor declares (checked on file sizes *before* anything is
   read from them); the model must pass
   ``onnx.checker.check_model(full_check=True)``.  Failures are
   :class:`ModelLoadError` naming the file and the cause.
2. **opsets**: a node outside the default ONNX domain (e.g. ``com.microsoft``)
   is an :class:`UnsupportedOpError` naming it; a default-domain opset newer
   than the installed onnx knows or older than :data:`OLDEST_OPSET` is a
   ModelLoadError naming it; opsets below 13 are upgraded with
   ``onnx.version_converter``.
3. **static shapes**: declared-dynamic input dimensions are specialised to
   ``input_shapes`` (:class:`ShapeError` naming the input when a dynamic dim is
   left, a given shape contradicts the model, or an unknown input is named).
   Initializers that are also listed as graph inputs are constants.
4. **folding**: ``onnx.shape_inference.infer_shapes(strict_mode=True,
   data_prop=True)`` checks the specialised shapes (ShapeError naming them),
   and no inferred value may exceed ``max_tensor_elements`` (ShapeError naming
   the value and its node: an Expand / Resize / ConstantOfShape to a huge
   shape fails before anything folds or runs it); then
   ``onnxscript.optimizer.fold_constants_ir`` and a fixed set of *exact*
   onnxscript rewrite rules (no-op removal, Pad-into-Conv, shape
   materialisation; see :func:`_exact_rewrite_rules`), iterated to a fixed
   point, fold everything that became constant: shape subgraphs
   (``Shape -> Gather/Slice -> Concat -> Reshape``), ``Constant`` nodes, casts
   of constants.  Nothing numerically inexact (BatchNorm fusion etc.) happens
   here: those are qcompile passes, with provenance.
4b. **fusion** (:mod:`qcompile.frontends.onnx_fusions`): written-out layer norm, hard-swish and
   GELU become one node each (``layer_norm``, ``hardswish``, ``gelu``), only when every constant
   is exactly right; ``graph.meta["fusions"]`` counts them per IR op.
5. **mapping** (:data:`HANDLERS`): every remaining ONNX node becomes IR ops;
   anything else raises :class:`UnsupportedOpError` naming op, node and what to do.

Names: IR node names are the ONNX node names (made unique; ``<OpType>_<index>``,
the node's position in the file, when empty), IR value names are the ONNX value names, graph outputs keep their
ONNX names.  Metadata written by our exporter is restored: node
``metadata_props["qcompile.meta"]`` -> ``node.meta``, model
``metadata_props["qcompile.graph_meta"]`` -> ``graph.meta``.
``graph.meta["source"]`` records format, path, original opset and producer;
``graph.meta["input_shapes"]`` the specialised input shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.errors import ModelLoadError, ShapeError, UnsupportedOpError
from qcompile.ir.graph import Graph, TensorType

MIN_OPSET = 13
"""Default-domain opset the importer works at; older models are upgraded to it."""
OLDEST_OPSET = 7
"""Oldest default-domain opset accepted: onnxruntime, which runs the original file as the reference
every artifact is verified against, implements nothing older (ONNX's version converter does not
reliably upgrade it either)."""

FOLD_INPUT_SIZE_LIMIT = 1 << 22
"""Largest constant input (elements) the folder evaluates (e.g. a weight transpose)."""
FOLD_OUTPUT_SIZE_LIMIT = 1 << 24
"""Largest folded result (elements) the folder materialises."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT8: "int8",
         onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
         onnx.TensorProto.BOOL: "bool"}


# ============================================================================ 1. reading
def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto stored in ``graph``: initializers, sparse initializers, tensor
    attributes, recursively through subgraphs."""
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield s.values
        yield s.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for sub in a.graphs:
                yield from _all_tensors(sub)


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _data_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes the declared dims and type of ``t`` need as raw data (None: variable-size, e.g. strings)."""
    n = 1
    for d in t.dims:
        n *= int(d)
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    except Exception:  # noqa: BLE001 - an unknown or undefined data type: the checker names it
        return None
    return None if dtype.kind == "O" else n * dtype.itemsize


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that are absolute or resolve outside the model's folder
    (symlinks resolved), missing external-data files, and external data whose size (``length``, or
    the file's size past ``offset``) is not what the tensor's declared dims and type need: checked
    on file sizes, so nothing is read and no declared size is allocated."""
    base = path.parent.resolve()
    for t in _all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc:
            raise ModelLoadError(f"'{path}': tensor '{t.name}' is marked external but names no location")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise ModelLoadError(f"'{path}': tensor '{t.name}' has external data at '{loc}', which is outside "
                                 f"the model's folder '{base}'; refusing to read it")
        if not target.is_file():
            raise ModelLoadError(f"'{path}': external data file '{loc}' for tensor '{t.name}' is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise ModelLoadError(f"'{path}': tensor '{t.name}' has a non-integer external data offset/length "
                                 f"({info.get('offset')!r}, {info.get('length')!r})") from None
        available = target.stat().st_size - offset
        if offset < 0 or (length is not None and (length < 0 or length > available)):
            raise ModelLoadError(f"'{path}': tensor '{t.name}' asks for {length if length is not None else 'the'} "
                                 f"bytes at offset {offset} of '{loc}', which holds {target.stat().st_size} bytes")
        need, have = _data_bytes(t), (length if length is not None else available)
        if need is not None and have != need:
            dims = "x".join(str(int(d)) for d in t.dims) or "scalar"
            raise ModelLoadError(f"'{path}': tensor '{t.name}' declares shape {dims} ({need:,} bytes of data) but "
                                 f"its external data in '{loc}' is {have:,} bytes; the model and its data file do "
                                 "not belong together (truncated or replaced file?)")


def _sniff(path: Path) -> str:
    """What a file that is not an ONNX protobuf looks like, from its first bytes ("" if unknown).
    Never unpickles anything: a torch checkpoint is recognised by its zip / pickle header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04") and (b"data.pkl" in head or b"/data/" in head or b"version" in head):
        return ("it looks like a zipped torch checkpoint (torch.save); qcompile never unpickles files: give "
                "`module:factory` or export the model to ONNX")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("it looks like a Python pickle (a torch checkpoint?); qcompile never unpickles files: give "
                "`module:factory` or export the model to ONNX")
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive, not an ONNX protobuf"
    return ""


def _check_constant_sizes(model: onnx.ModelProto, path: Path) -> None:
    """ShapeError naming the tensor when a constant's *declared* dims exceed
    :func:`qcompile.frontends.max_tensor_elements`: checked on the dims alone, before the checker or
    anything else reads (or allocates) its data, which may not even be there."""
    from qcompile.frontends import check_tensor_size

    for t in _all_tensors(model.graph):
        try:
            check_tensor_size(f"constant '{t.name}'", list(t.dims), _ELEM.get(t.data_type, "float32"),
                              hint="the model declares a weight larger than qcompile accepts")
        except ShapeError as e:
            raise ShapeError(f"'{path}': {e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Read ``path`` (with its external data, if any, from inside its folder) and run the
    full ONNX checker.  Every failure is a :class:`ModelLoadError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"ONNX file '{path}' does not exist")
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"ONNX file '{path}' is empty (0 bytes)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf / OS errors come in several types
        raise ModelLoadError(f"'{path}' is not a readable ONNX model ({_sniff(path) or 'truncated or corrupt?'}): "
                             f"{type(e).__name__}: {_first_line(e)}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"'{path}' parsed as an empty ONNX model "
                             f"({_sniff(path) or 'not an ONNX file, or truncated'})")
    _check_constant_sizes(model, path)
    _check_external_data(model, path)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))
    try:
        if has_external:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            onnx.checker.check_model(str(path), full_check=True)  # by path: works past the 2 GB proto limit
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker / shape-inference / OS errors
        raise ModelLoadError(f"'{path}' fails the ONNX checker: {_first_line(e)}") from e
    return model


# ============================================================================ 2. opsets
def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return o.version
    return 0


def _reject_foreign_domains(model: onnx.ModelProto) -> None:
    """UnsupportedOpError on the first node outside the default ONNX domain."""
    for i, n in enumerate(model.graph.node):
        if n.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOpError(f"{n.domain}::{n.op_type}", n.name or f"{n.op_type}_{i}",
                                     "only standard ONNX (default domain) operators are supported; export the "
                                     "model without vendor-specific fusions (e.g. before onnxruntime's "
                                     "transformer optimizer)", frontend="onnx")


def _check_opset(model: onnx.ModelProto, opset: int, path: Path) -> None:
    """ModelLoadError naming the opset when it is newer than this onnx release knows (onnxruntime
    follows it) or older than :data:`OLDEST_OPSET`, or when no default-domain opset is imported."""
    newest = onnx.defs.onnx_opset_version()
    if not any(o.domain in _DEFAULT_DOMAINS for o in model.opset_import):
        raise ModelLoadError(f"'{path}' imports no default-domain ONNX opset (opset_import has "
                             f"{[o.domain for o in model.opset_import]}); re-export it as standard ONNX")
    if opset > newest:
        raise ModelLoadError(f"'{path}' uses ONNX opset {opset}, newer than the newest this installation "
                             f"supports (opset {newest}, onnx {onnx.__version__}); re-export it with "
                             f"opset <= {newest}")
    if opset < OLDEST_OPSET:
        raise ModelLoadError(f"'{path}' uses ONNX opset {opset}, older than the oldest supported (opset "
                             f"{OLDEST_OPSET}: onnxruntime, which runs the original model for verification, "
                             f"implements nothing older); re-export it with opset >= {MIN_OPSET}")


def _upgrade_opset(model: onnx.ModelProto, opset: int, path: Path) -> onnx.ModelProto:
    if opset >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"'{path}': cannot upgrade opset {opset} to {MIN_OPSET}: {_first_line(e)}") from e


# ============================================================================ 3. static shapes
def _fmt(dims: list) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Declared dims of a graph input: int (fixed), str (named dynamic), None (anonymous
    dynamic: no value, or a non-positive value such as Paddle's -1); None if the rank is unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _shape_hint(name: str, declared: list, example: bool = False) -> str:
    """An ``--input-shape`` value for input ``name``: fixed dims as declared, a dynamic batch
    (dim 0) as 1, other dynamic dims as a placeholder (their dim_param, or D<k>) — or, with
    ``example``, as 224 (a concrete, copy-pasteable example)."""
    parts = []
    for k, d in enumerate(declared):
        if isinstance(d, int):
            parts.append(str(d))
        elif k == 0:
            parts.append("1")
        elif example:
            parts.append("224")
        else:
            parts.append(d if isinstance(d, str) and d.isidentifier() else f"D{k}")
    return f"{name}=" + "x".join(parts)


def _resolve_input_shape(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The static shape for graph input ``vi``: ``given`` validated against the declaration, or the
    declared shape if fully static.  ShapeError (naming the input) otherwise."""
    declared = _declared_dims(vi)
    if given is not None:
        given = tuple(int(d) for d in given)
        if any(d <= 0 for d in given):
            raise ShapeError(f"input '{vi.name}': the given shape {given} has non-positive dimensions")
        if declared is None:
            return given
        if len(given) != len(declared):
            raise ShapeError(f"input '{vi.name}' has rank {len(declared)} "
                             f"({_fmt([d if isinstance(d, int) else None for d in declared])}), but the given "
                             f"shape {'x'.join(map(str, given))} has rank {len(given)}")
        for k, (d, gv) in enumerate(zip(declared, given)):
            if isinstance(d, int) and d != gv:
                raise ShapeError(f"input '{vi.name}' dimension {k} is fixed to {d} in the model, "
                                 f"but the given shape says {gv}")
        return given
    if declared is None:
        raise ShapeError(f"input '{vi.name}' has no declared shape (unknown rank); qcompile compiles static "
                         f"shapes: pass --input-shape {vi.name}=D0xD1x... (for example {vi.name}=1x3x224x224)")
    dynamic = [k for k, d in enumerate(declared) if not isinstance(d, int)]
    if dynamic:
        what = ", ".join(f"{k} ('{declared[k]}')" if isinstance(declared[k], str) and declared[k] != "?"
                         else f"{k}" for k in dynamic)
        raise ShapeError(
            f"input '{vi.name}' has dynamic dimension(s) {what} in shape "
            f"{_fmt([d if isinstance(d, int) else None for d in declared])}; qcompile compiles static shapes: "
            f"pass --input-shape {_shape_hint(vi.name, declared)} with the sizes you will run "
            f"(for example --input-shape {_shape_hint(vi.name, declared, example=True)})")
    return tuple(declared)  # type: ignore[arg-type]


def _specialise_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Fix every graph input's shape in ``model`` (in place); return ``{input: shape}`` in input order.

    Initializers listed as graph inputs are dropped from the inputs (they are constants).
    Symbolic shapes recorded for other values are cleared so shape inference redoes them."""
    inits = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    names = [vi.name for vi in keep]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise ShapeError(f"input shapes given for {unknown}, but the model's inputs are {names}")
    del model.graph.input[:]
    model.graph.input.extend(keep)
    final: dict[str, tuple] = {}
    for vi in model.graph.input:  # extend() copied: edit the messages that are now in the model
        shape = _resolve_input_shape(vi, input_shapes.get(vi.name))
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        for v in shape:
            tt.shape.dim.add().dim_value = int(v)
        final[vi.name] = shape
    del model.graph.value_info[:]
    for vo in model.graph.output:
        for d in vo.type.tensor_type.shape.dim:
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
    return final


# ============================================================================ 4. folding
def _exact_rewrite_rules() -> list:
    """onnxscript rewrite rules that are exact (bit-identical results) and only remove or merge
    ops we could not otherwise import; deliberately NOT its BatchNorm fusions (a qcompile pass)."""
    from onnxscript.rewriter.rules import common as r

    return [r.add_0_rule, r.sub_0_rule, r.mul_by_1_rule, r.div_by_1_rule,
            r.dropout_inference_rule, r.dropout_zero_rule,
            r.no_op_cast_rule, r.no_op_expand_rule, r.no_op_transpose_rule,
            r.collapse_slice_rule, r.collapse_slice2_rule,
            r.materialize_reshape_shape_rule, r.reshape_reshape_rule,
            r.normalize_pad_format_conv_rule, r.fuse_pad_into_conv_rule,
            *r.expand_before_binary_op_rules]


def _check_shapes(model: onnx.ModelProto, path: Path, shapes: dict[str, tuple]) -> onnx.ModelProto:
    """Strict ONNX shape inference with data propagation: the specialised shapes must be consistent."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001 - InferenceError and friends
        raise ShapeError(f"'{path}': the input shapes ({_fmt_shapes(shapes)}) are inconsistent with the model: "
                         f"{_first_line(e)}") from e


def _check_value_sizes(model: onnx.ModelProto, path: Path) -> None:
    """ShapeError (naming the value and its node) for any input or inferred value over
    :func:`qcompile.frontends.max_tensor_elements`, before folding or any feed allocates it."""
    from qcompile.frontends import check_tensor_size

    producer = {o: n.name for n in model.graph.node for o in n.output}
    for kind, values in (("input", model.graph.input), ("value", model.graph.value_info),
                         ("output", model.graph.output)):
        for vi in values:
            tt = vi.type.tensor_type
            if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
                continue
            where = f" (output of node '{producer[vi.name]}')" if vi.name in producer else ""
            dtype = _ELEM.get(tt.elem_type, "float32")
            try:
                check_tensor_size(f"{kind} '{vi.name}'{where}", [d.dim_value for d in tt.shape.dim], dtype)
            except ShapeError as e:
                raise ShapeError(f"'{path}': {e}") from None


def _fmt_shapes(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


FOLD_MAX_ROUNDS = 8
"""Fold + rewrite rounds before giving up on reaching a fixed point (real models need 2-3)."""


def _fold_constants(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Fold every subgraph whose value became constant, with onnxscript's public optimizer API:
    functions are inlined, then ``onnxscript.optimizer.fold_constants_ir`` (with node-level ONNX
    shape inference, so ``Shape`` of a now-static tensor folds) and the exact rewrite rules
    alternate until neither changes the model; finally Constant nodes become initializers."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    try:
        m = ir.serde.deserialize_model(model)
        common.InlinePass()(m)
        rewrite = rewriter.RewritePass(_exact_rewrite_rules())
        for _ in range(FOLD_MAX_ROUNDS):
            folded = optimizer.fold_constants_ir(m, onnx_shape_inference=True,
                                                 input_size_limit=FOLD_INPUT_SIZE_LIMIT,
                                                 output_size_limit=FOLD_OUTPUT_SIZE_LIMIT,
                                                 should_fold=_fold_policy)
            rewritten = rewrite(m)
            common.RemoveUnusedNodesPass()(m)
            if not (folded.modified or rewritten.modified):
                break
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)
        common.RemoveUnusedNodesPass()(m)
        return ir.serde.serialize_model(m)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"'{path}': constant folding failed: {type(e).__name__}: {_first_line(e)}") from e


def _fold_policy(node) -> bool | None:
    """Fold-constants policy: a DequantizeLinear of a constant stays (its integer weights are the
    point of a quantized model); a ConstantOfShape of a constant shape folds (onnxscript keeps it by
    default to keep files small, but the IR has no such op: YOLOv8's anchor grid is built with it);
    everything else is the optimizer's call."""
    if node.op_type == "DequantizeLinear":
        return False
    return True if node.op_type == "ConstantOfShape" else None


# ============================================================================ 5. mapping
def _unique_node_names(nodes) -> list[str]:
    """ONNX node names made unique; ``<OpType>_<index>`` for unnamed nodes."""
    seen: set[str] = set()
    out = []
    for i, n in enumerate(nodes):
        base = n.name or f"{n.op_type}_{i}"
        name, k = base, 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        out.append(name)
    return out


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node of ``model`` a unique name in place (``<OpType>_<index>`` in the user's
    file for unnamed ones), before folding renames or drops anything."""
    for node, name in zip(model.graph.node, _unique_node_names(model.graph.node)):
        node.name = name


def _all_value_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


class _Importer:
    """Walks the folded ONNX graph once, in order, building the IR graph."""

    def __init__(self, model: onnx.ModelProto, path: Path, legacy_resize: set[str] | frozenset[str] = frozenset()):
        self.model = model
        self.path = path
        self.legacy_resize = legacy_resize  # outputs of Resize-10 / Upsample nodes (see _resize)
        self.g = Graph(model.graph.name or path.stem)
        self.alias: dict[str, str] = {}   # onnx value -> IR value (for eliminated nodes)
        self.consts: dict[str, np.ndarray] = {}
        self.names = _unique_node_names(model.graph.node)
        self.index = 0
        for v in sorted(_all_value_names(model.graph)):
            self.g.fresh_name(v)  # reserve: names we synthesise never take a later ONNX value's name

    # values ---------------------------------------------------------------
    def v(self, name: str) -> str:
        """The IR value for ONNX value ``name`` (constants are added to the graph on first use)."""
        if not name:
            return ""
        name = self.alias.get(name, name)
        if name in self.consts and name not in self.g.constants:
            self.g.add_constant(name, self.consts[name], exact_name=True)
        if name not in self.g.types:
            raise ModelLoadError(f"'{self.path}': value '{name}' is used before it is defined")
        return name

    def const(self, name: str) -> np.ndarray | None:
        """The array of ONNX value ``name`` if it is constant, else None."""
        if not name:
            return None
        return self.consts.get(self.alias.get(name, name))

    def type(self, name: str) -> TensorType:
        return self.g.types[self.v(name)]

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str], attrs: dict | None = None,
             output: str | None = None, suffix: str = "") -> str:
        """Append IR node ``op``; the node's main part (``suffix == ""``) is named like the ONNX
        node and gets its restored ``qcompile.meta``; helper parts are named ``<name><suffix>``."""
        out = output if output is not None else self.g.fresh_name(f"{node.output[0]}{suffix}")
        meta = self.meta_of(node) if suffix == "" else {}
        n = self.g.make_node(op, inputs, attrs or {}, name=self.node_name() + suffix, output_names=[out],
                             meta=meta)
        self.g.append(n)
        return out

    def node_name(self) -> str:
        return self.names[self.index]

    @staticmethod
    def meta_of(node: onnx.NodeProto) -> dict:
        for p in node.metadata_props:
            if p.key == "qcompile.meta":
                return json.loads(p.value)
        return {}

    def unsupported(self, node: onnx.NodeProto, alternative: str) -> UnsupportedOpError:
        return UnsupportedOpError(node.op_type, self.node_name(), alternative, frontend="onnx")

    # main loop ------------------------------------------------------------
    def run(self, input_shapes: dict[str, tuple]) -> Graph:
        mg = self.model.graph
        elem_of = {vi.name: vi.type.tensor_type.elem_type for vi in mg.input}
        for name, shape in input_shapes.items():
            dtype = _ELEM.get(elem_of[name])
            if dtype is None:
                raise ShapeError(f"input '{name}' has element type "
                                 f"{onnx.TensorProto.DataType.Name(elem_of[name])}, which qcompile does not "
                                 f"support (supported: {sorted(set(_ELEM.values()))})")
            self.g.add_input(name, TensorType(shape, dtype))
        self.int4: set[str] = set()
        for t in mg.initializer:
            arr = numpy_helper.to_array(t)
            if t.data_type == onnx.TensorProto.INT4:  # int4 values kept in int8 storage (bits=4 on their DQ)
                arr = arr.astype(np.int8)
                self.int4.add(t.name)
            self.consts[t.name] = arr
        for self.index, node in enumerate(mg.node):
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise self.unsupported(node, _ALTERNATIVES.get(node.op_type, _DEFAULT_ALTERNATIVE))
            handler(self, node, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        self.g.outputs = self._outputs([o.name for o in mg.output])
        return self.g

    def _outputs(self, onnx_outputs: list[str]) -> list[str]:
        """IR outputs named like the ONNX outputs.  When Identity elimination made an output an alias
        of a node's value, that value is renamed to the output's name; an output that is an input,
        a constant or another output gets its own ``identity`` node."""
        produced = {o for n in self.g.nodes for o in n.outputs}
        outs: list[str] = []
        for o in onnx_outputs:
            src = self.v(o)
            if src != o and src in produced and src not in outs and src not in onnx_outputs \
                    and o not in self.g.types:
                self._rename_value(src, o)
                src = o
            if src in outs or src in self.g.inputs or src in self.g.constants:
                out_name = o if o not in self.g.types else self.g.fresh_name(o)
                n = self.g.make_node("identity", [src], name=f"{o}_out", output_names=[out_name])
                self.g.append(n)
                src = out_name
            outs.append(src)
        return outs

    def _rename_value(self, old: str, new: str) -> None:
        """Rename node output ``old`` to ``new`` (a name no IR value has yet)."""
        for n in self.g.nodes:
            n.outputs = [new if o == old else o for o in n.outputs]
        self.g.replace_all_uses(old, new)
        self.g.types[new] = self.g.types.pop(old)
        self.alias = {k: (new if v == old else v) for k, v in self.alias.items()}


_DEFAULT_ALTERNATIVE = ("qcompile supports standard CNN operators (see the README's op list); "
                        "replace this op in the model or cut the graph before it")
_RUNTIME_DATA = ("operates on run-time tensor data here (it is not part of a shape computation, which would "
                 "have folded away once every input shape is static); ")
_ALTERNATIVES = {
    "Shape": "Shape should have folded: pass --input-shape for every dynamic input so shape subgraphs "
             "become constant",
    "Size": "Size should have folded: pass --input-shape for every dynamic input so it becomes constant",
    "ConstantOfShape": "ConstantOfShape should have folded: pass --input-shape for every dynamic input",
    "Range": "Range should have folded: pass --input-shape for every dynamic input",
    "Gather": "Gather " + _RUNTIME_DATA + "indexing activations is not supported",
    "Cast": "Cast " + _RUNTIME_DATA + "qcompile graphs compute in float; remove the cast",
    "Expand": "Expand " + _RUNTIME_DATA + "broadcast explicitly in the model instead",
    "Pad": "Pad is supported only when it is constant zero padding directly before a Conv (it is then merged "
           "into the Conv); other padding is not supported yet",
    "PRelu": "PRelu is not supported yet; export with ReLU/LeakyReLU",
    "TopK": "TopK is post-processing, not a CNN layer: cut the model before it and run it on the host",
    "NonMaxSuppression": "NonMaxSuppression is post-processing: cut the model before it and run it on the host",
    "ArgMax": "ArgMax is post-processing: cut the model before it and take the argmax on the host",
    "Loop": "control flow is not supported; export the model with static unrolling",
    "If": "control flow is not supported; export the model with static unrolling",
    "Scan": "control flow is not supported; export the model with static unrolling",
    "LSTM": "recurrent layers are not supported (qcompile targets CNNs)",
    "GRU": "recurrent layers are not supported (qcompile targets CNNs)",
    "RNN": "recurrent layers are not supported (qcompile targets CNNs)",
    "QLinearConv": "pre-quantized models are not accepted as input; give the fp32 model and use the quantize pass",
}


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _f32(v: Any) -> float:
    """A float32 value (ONNX float attributes / scalars) as the shortest python float that rounds to
    it, e.g. 1e-5 rather than 9.999999747378752e-06, so IR -> ONNX -> IR keeps attributes equal."""
    return float(str(np.float32(v)))


def _str_attr(a: dict, key: str, default: str) -> str:
    v = a.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------- conv / pools
def _auto_pads(imp: _Importer, node, a, spatial, k, strides, dil) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) pads from ``pads`` or ``auto_pad``.  ONNX ``pads`` is
    [x1_begin, x2_begin, x1_end, x2_end], i.e. already (top, left, bottom, right).  SAME_UPPER puts
    the odd extra pixel at the end, SAME_LOWER at the beginning; output = ceil(size / stride)."""
    auto = _str_attr(a, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = _ints(a.get("pads", (0, 0, 0, 0)))
        if len(p) != 4:
            raise imp.unsupported(node, f"pads {p} are not 2-D (expected 4 values)")
        return (p[0], p[1], p[2], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise imp.unsupported(node, f"auto_pad '{auto}' is not a valid ONNX value")
    out = []
    for size, kk, s, d in zip(spatial, k, strides, dil):
        total = max(0, (-(-size // s) - 1) * s + (kk - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def _conv_weight(imp: _Importer, node, a, what: str):
    """The 4-D weight type of a Conv/ConvTranspose node, its ``kernel_shape`` checked against it."""
    w = imp.type(node.input[1])
    if w.rank != 4:
        raise imp.unsupported(node, f"only 2-D {what} is supported (weight {w})")
    if "kernel_shape" in a and _ints(a["kernel_shape"]) != w.shape[2:]:
        raise imp.unsupported(node, f"kernel_shape {_ints(a['kernel_shape'])} disagrees with the weight {w}")
    return w


def _present_inputs(imp: _Importer, node) -> list:
    """The node's input values with trailing omitted optional inputs ("") dropped."""
    ins = [imp.v(i) for i in node.input]
    while ins and not ins[-1]:
        ins.pop()
    return ins


def _conv(imp: _Importer, node, a) -> None:
    w = _conv_weight(imp, node, a, "convolution")
    x = imp.type(node.input[0])
    k = w.shape[2:]
    strides = _ints(a.get("strides", (1, 1)))
    dil = _ints(a.get("dilations", (1, 1)))
    pads = _auto_pads(imp, node, a, x.shape[2:], k, strides, dil)
    imp.emit(node, "conv2d", _present_inputs(imp, node), {"strides": strides, "pads": pads, "dilations": dil,
                                   "group": int(a.get("group", 1))}, output=node.output[0])


def _conv_transpose(imp: _Importer, node, a) -> None:
    """ConvTranspose (2-D): explicit ``pads`` or ``auto_pad=VALID``; ``output_shape`` only when it is
    the shape those pads give (SAME_* auto padding and pad-deriving output_shape are refused)."""
    w = _conv_weight(imp, node, a, "transposed convolution")
    x = imp.type(node.input[0])
    strides = _ints(a.get("strides", (1, 1)))
    dil = _ints(a.get("dilations", (1, 1)))
    opad = _ints(a.get("output_padding", (0, 0)))
    auto = _str_attr(a, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = _ints(a.get("pads", (0, 0, 0, 0)))
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    else:
        raise imp.unsupported(node, f"attribute auto_pad='{auto}' is not supported for ConvTranspose; export the "
                                    "model with explicit pads")
    if len(pads) != 4 or len(strides) != 2 or len(dil) != 2 or len(opad) != 2:
        raise imp.unsupported(node, f"pads {pads} / strides {strides} / dilations {dil} / output_padding {opad} "
                                    "are not 2-D")
    if min(pads) < 0:
        raise imp.unsupported(node, f"attribute pads={list(pads)}: negative pads are not supported")
    if any(not 0 <= o < s_ for o, s_ in zip(opad, strides)):  # onnxruntime refuses the rest too
        raise imp.unsupported(node, f"attribute output_padding={list(opad)} must be >= 0 and below the stride "
                                    f"{list(strides)} per axis")
    attrs = {"strides": strides, "pads": pads, "dilations": dil, "group": int(a.get("group", 1)),
             "output_padding": opad}
    ins = _present_inputs(imp, node)
    if "output_shape" in a:
        want = _ints(a["output_shape"])[-2:]
        got = tuple((n - 1) * s - pb - pe + d * (k - 1) + 1 + o for n, s, pb, pe, d, k, o in zip(
            x.shape[2:], strides, pads[:2], pads[2:], dil, w.shape[2:], opad))
        if want != got:
            raise imp.unsupported(node, f"attribute output_shape={list(_ints(a['output_shape']))} asks for padding "
                                        f"derived from the output size (the given pads give {list(got)}); export "
                                        "the model with explicit pads")
    imp.emit(node, "conv_transpose2d", ins, attrs, output=node.output[0])


def _pool(op: str):
    def h(imp: _Importer, node, a) -> None:
        if int(a.get("storage_order", 0)) or (len(node.output) > 1 and node.output[1]):
            raise imp.unsupported(node, "MaxPool indices output / storage_order=1 are not supported")
        k = _ints(a["kernel_shape"])
        if len(k) != 2:
            raise imp.unsupported(node, f"only 2-D pooling is supported (kernel {k})")
        x = imp.type(node.input[0])
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


def _global_max_pool(imp: _Importer, node, a) -> None:
    x = imp.type(node.input[0])
    if x.rank != 4:
        raise imp.unsupported(node, f"only NCHW input is supported (got {x})")
    imp.emit(node, "max_pool2d", [imp.v(node.input[0])], {"kernel": x.shape[2:]}, output=node.output[0])


# ---------------------------------------------------------------------------- gemm / matmul
def _gemm(imp: _Importer, node, a) -> None:
    """Y = alpha * A' @ B' + beta * C.  Constant B -> ``linear`` (w in (out, in) layout, alpha folded
    into w; a constant C that is a per-column bias folded into the bias with beta).  Otherwise
    transpose / matmul / mul / add."""
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    has_c = len(node.input) > 2 and bool(node.input[2])
    x = imp.v(node.input[0])
    if ta:
        x = imp.emit(node, "transpose", [x], {"perm": (1, 0)}, suffix="/transA")
    bconst = imp.const(node.input[1])
    if bconst is not None:
        n_out = bconst.shape[0] if tb else bconst.shape[1]
        if tb and alpha == 1.0:  # already (out, in): keep the user's constant
            ins = [x, imp.v(node.input[1])]
        else:
            w = (bconst if tb else bconst.T) * np.asarray(alpha, bconst.dtype)
            ins = [x, imp.g.add_constant(f"{node.input[1]}_w", np.ascontiguousarray(w.astype(bconst.dtype)))]
        cconst = imp.const(node.input[2]) if has_c else None
        bias_like = cconst is not None and (cconst.ndim <= 1 or cconst.shape[0] == 1) \
            and cconst.size in (1, n_out)
        if bias_like and cconst.shape == (n_out,) and beta == 1.0 and cconst.dtype == bconst.dtype:
            ins.append(imp.v(node.input[2]))
        elif bias_like:
            bias = np.broadcast_to(cconst.reshape(-1) * np.asarray(beta, cconst.dtype), (n_out,))
            ins.append(imp.g.add_constant(f"{node.input[2]}_bias", bias.astype(bconst.dtype)))
        if not has_c or bias_like:
            imp.emit(node, "linear", ins, output=node.output[0])
            return
        y = imp.emit(node, "linear", ins, suffix="/linear")
    else:
        b = imp.v(node.input[1])
        if tb:
            b = imp.emit(node, "transpose", [b], {"perm": (1, 0)}, suffix="/transB")
        if not has_c and alpha == 1.0:
            imp.emit(node, "matmul", [x, b], output=node.output[0])
            return
        y = imp.emit(node, "matmul", [x, b], suffix="/matmul")
        if alpha != 1.0:
            alpha_c = imp.g.add_constant(f"{node.output[0]}_alpha", np.array(alpha, imp.g.types[y].dtype))
            if not has_c:
                imp.emit(node, "mul", [y, alpha_c], output=node.output[0])
                return
            y = imp.emit(node, "mul", [y, alpha_c], suffix="/alpha")
    c = imp.v(node.input[2])
    if beta != 1.0:
        beta_c = imp.g.add_constant(f"{node.output[0]}_beta", np.array(beta, imp.g.types[c].dtype))
        c = imp.emit(node, "mul", [c, beta_c], suffix="/beta")
    imp.emit(node, "add", [y, c], output=node.output[0])


def _matmul(imp: _Importer, node, a) -> None:
    """Constant 2-D right operand -> ``linear`` with w = B^T; otherwise ``matmul``."""
    w = imp.const(node.input[1])
    if w is not None and w.ndim == 2 and imp.type(node.input[0]).rank >= 1:
        wt = imp.g.add_constant(f"{node.input[1]}_T", np.ascontiguousarray(w.T))
        imp.emit(node, "linear", [imp.v(node.input[0]), wt], output=node.output[0])
        return
    x, y = imp.type(node.input[0]), imp.type(node.input[1])
    if x.rank < 2 or y.rank < 2:
        raise imp.unsupported(node, f"MatMul with a 1-D operand ({x} @ {y}) is not supported; reshape to 2-D")
    imp.emit(node, "matmul", [imp.v(node.input[0]), imp.v(node.input[1])], output=node.output[0])


def _bn(imp: _Importer, node, a) -> None:
    if (len(node.output) > 1 and any(node.output[1:])) or int(a.get("training_mode", 0)):
        raise imp.unsupported(node, "training-mode batch norm; export the model in eval mode")
    imp.emit(node, "batch_norm", [imp.v(i) for i in node.input], {"epsilon": _f32(a.get("epsilon", 1e-5))},
             output=node.output[0])


def _layer_norm(imp: _Importer, node, a) -> None:
    """LayerNormalization -> ``layer_norm``: ONNX's (axes ``axis`` .. rank-1; a constant Scale / B that
    only broadcasts to them is expanded) or a fused one (:mod:`onnx_fusions`, explicit ``axes``)."""
    from qcompile.ir.ops import layer_norm_param_shape

    x = imp.type(node.input[0])
    if any(node.output[1:]):
        raise imp.unsupported(node, "the Mean / InvStdDev outputs of LayerNormalization are not supported")
    if x.dtype != "float32":
        raise imp.unsupported(node, f"only float32 LayerNormalization is supported (input {x})")
    if "axes" in a:  # fused (domain qcompile)
        axes = _ints(a["axes"])
    else:
        axis = int(a.get("axis", -1))
        if not -x.rank <= axis < x.rank:
            raise imp.unsupported(node, f"axis {axis} is out of range for {x}")
        axes = tuple(range(axis % x.rank, x.rank))
    want = layer_norm_param_shape(x.shape, axes)
    ins = [imp.v(node.input[0])]
    for i, what in ((1, "scale"), (2, "bias")):
        if len(node.input) <= i or not node.input[i]:
            continue
        if imp.type(node.input[i]).shape == want:
            ins.append(imp.v(node.input[i]))
            continue
        c = imp.const(node.input[i])
        try:
            full = np.ascontiguousarray(np.broadcast_to(c, want)) if c is not None else None
        except ValueError:
            full = None
        if full is None:
            raise imp.unsupported(node, f"{what} {imp.type(node.input[i])} must be a constant that broadcasts to "
                                        f"the normalised shape {want}")
        ins.append(imp.g.add_constant(f"{node.input[i]}_{what}", full))
    imp.emit(node, "layer_norm", ins, {"axes": axes, "epsilon": _f32(a.get("epsilon", 1e-5))}, output=node.output[0])


# ---------------------------------------------------------------------------- elementwise
def _unary(op: str, attr_map: Callable[[dict], dict] | None = None):
    def h(imp: _Importer, node, a) -> None:
        imp.emit(node, op, [imp.v(node.input[0])], attr_map(a) if attr_map else {}, output=node.output[0])
    return h


def _match_dtypes(imp: _Importer, x: str, y: str) -> tuple[str, str]:
    """If a constant operand's dtype differs from the other operand's, cast the constant."""
    tx, ty = imp.g.types[x], imp.g.types[y]
    if tx.dtype == ty.dtype:
        return x, y
    if y in imp.g.constants:
        return x, imp.g.add_constant(f"{y}_{tx.dtype}", imp.g.constants[y].astype(tx.dtype))
    if x in imp.g.constants:
        return imp.g.add_constant(f"{x}_{ty.dtype}", imp.g.constants[x].astype(ty.dtype)), y
    return x, y


def _binary(op: str):
    """Binary broadcasting op; Sum/Max/Min with more than two inputs become a chain."""
    def h(imp: _Importer, node, a) -> None:
        ins = [i for i in node.input]
        if len(ins) == 1:
            imp.alias[node.output[0]] = imp.alias.get(ins[0], ins[0])
            return
        acc = imp.v(ins[0])
        for k, i in enumerate(ins[1:]):
            last = k == len(ins) - 2
            x, y = _match_dtypes(imp, acc, imp.v(i))
            acc = imp.emit(node, op, [x, y], output=node.output[0] if last else None,
                           suffix="" if last else f"/{op}{k}")
    return h


def _clip(imp: _Importer, node, a) -> None:
    bounds = {}
    for key, idx in (("min", 1), ("max", 2)):
        if len(node.input) > idx and node.input[idx]:
            c = imp.const(node.input[idx])
            if c is None:
                raise imp.unsupported(node, f"Clip {key} must be a constant")
            bounds[key] = _f32(np.asarray(c).reshape(-1)[0])
        elif key in a:  # opset < 11 attribute form
            bounds[key] = _f32(a[key])
        else:
            bounds[key] = None
    imp.emit(node, "clip", [imp.v(node.input[0])], bounds, output=node.output[0])


# ---------------------------------------------------------------------------- reductions / layout
def _axes(imp: _Importer, node, a, rank: int) -> tuple[int, ...] | None:
    """Axes from the ``axes`` input (opset 13+/18+) or attribute, normalised to [0, rank); None if absent."""
    if len(node.input) > 1 and node.input[1]:
        c = imp.const(node.input[1])
        if c is None:
            raise imp.unsupported(node, "axes must be constant")
        ax = c.reshape(-1).tolist()
    elif "axes" in a:
        ax = list(a["axes"])
    else:
        return None
    for x in ax:
        if not -rank <= int(x) < rank:
            raise imp.unsupported(node, f"axis {x} is out of range for rank {rank}")
    return tuple(int(x) % rank for x in ax)


def _reduce_mean(imp: _Importer, node, a) -> None:
    x = imp.v(node.input[0])
    rank = imp.g.types[x].rank
    axes = _axes(imp, node, a, rank)
    if axes is None or axes == ():
        if int(a.get("noop_with_empty_axes", 0)):
            imp.alias[node.output[0]] = x
            return
        axes = tuple(range(rank))
    imp.emit(node, "reduce_mean", [x], {"axes": axes, "keepdims": int(a.get("keepdims", 1))}, output=node.output[0])


def _to_reshape(imp: _Importer, node, shape: tuple[int, ...]) -> None:
    imp.emit(node, "reshape", [imp.v(node.input[0])], {"shape": shape}, output=node.output[0])


def _reshape(imp: _Importer, node, a) -> None:
    """Constant target shape; 0 copies the input dim (unless allowzero), -1 is inferred."""
    target = imp.const(node.input[1])
    if target is None:
        raise imp.unsupported(node, "the target shape is computed at run time and did not fold; pass "
                                    "--input-shape for every dynamic input so shape subgraphs become constant")
    x = imp.type(node.input[0])
    shape = [int(d) for d in target.reshape(-1)]
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    if shape.count(-1) > 1:
        raise imp.unsupported(node, f"target shape {shape} has more than one -1")
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        shape[shape.index(-1)] = x.numel // known if known else 0
    _to_reshape(imp, node, tuple(shape))


def _squeeze(imp: _Importer, node, a) -> None:
    x = imp.type(node.input[0])
    axes = _axes(imp, node, a, x.rank)
    if axes is None:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    if any(x.shape[i] != 1 for i in axes):
        raise imp.unsupported(node, f"cannot squeeze axes {axes} of {x}: they are not 1")
    _to_reshape(imp, node, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def _unsqueeze(imp: _Importer, node, a) -> None:
    x = imp.type(node.input[0])
    if len(node.input) > 1 and node.input[1]:
        c = imp.const(node.input[1])
        if c is None:
            raise imp.unsupported(node, "axes must be constant")
        n_new = c.size
    else:
        n_new = len(a.get("axes", ()))
    out_rank = x.rank + n_new
    axes = _axes(imp, node, a, out_rank) or ()
    it = iter(x.shape)
    _to_reshape(imp, node, tuple(1 if i in axes else next(it) for i in range(out_rank)))


def _transpose(imp: _Importer, node, a) -> None:
    rank = imp.type(node.input[0]).rank
    perm = _ints(a["perm"]) if "perm" in a else tuple(reversed(range(rank)))
    imp.emit(node, "transpose", [imp.v(node.input[0])], {"perm": perm}, output=node.output[0])


def _const_ints(imp: _Importer, node, i: int, what: str) -> list[int] | None:
    """Constant int input ``i`` of ``node`` as a list (None if absent or empty)."""
    if len(node.input) <= i or not node.input[i]:
        return None
    c = imp.const(node.input[i])
    if c is None:
        raise imp.unsupported(node, f"{what} (input '{node.input[i]}') is computed at run time; only constant "
                                    f"{what} are supported (pass --input-shape for every dynamic input so shape "
                                    "subgraphs fold)")
    return [int(v) for v in np.asarray(c).reshape(-1)]


def _slice(imp: _Importer, node, a) -> None:
    """Slice with constant starts / ends / axes / steps (normalised by ``ops.normalize_slice``)."""
    from qcompile.ir.ops import normalize_slice, slice_length

    x = imp.type(node.input[0])
    starts, ends = _const_ints(imp, node, 1, "starts"), _const_ints(imp, node, 2, "ends")
    if starts is None or ends is None:
        raise imp.unsupported(node, "Slice needs starts and ends")
    axes, steps = _const_ints(imp, node, 3, "axes"), _const_ints(imp, node, 4, "steps")
    try:
        st, en, ax, sp = normalize_slice(x.shape, starts, ends, axes, steps)
    except ValueError as e:
        raise imp.unsupported(node, f"invalid Slice of {x}: {e}") from None
    lengths = [slice_length(*t) for t in zip(st, en, sp)]
    if not st or min(lengths) == 0:
        raise imp.unsupported(node, f"Slice of {x} with starts {starts}, ends {ends}, axes {axes}, steps {steps} "
                                    "is empty; qcompile does not represent empty tensors")
    imp.emit(node, "slice", [imp.v(node.input[0])], {"starts": st, "ends": en, "axes": ax, "steps": sp},
             output=node.output[0])


def _split(imp: _Importer, node, a) -> None:
    """Split along one axis into constant sizes (the ``split`` input, or equal parts with a smaller
    last one as ONNX defines it): one ``slice`` per output (parts after the first are named ``<name>_<k>``)."""
    x = imp.type(node.input[0])
    axis = int(a.get("axis", 0))
    if not -x.rank <= axis < x.rank:
        raise imp.unsupported(node, f"axis {axis} is out of range for {x}")
    axis %= x.rank
    dim, n = int(x.shape[axis]), len(node.output)
    sizes = _const_ints(imp, node, 1, "split sizes")
    if sizes is None:
        part = -(-dim // n)
        sizes = [min(part, dim - k * part) for k in range(n)]
    if len(sizes) != n or sum(sizes) != dim or min(sizes) <= 0:
        raise imp.unsupported(node, f"Split of {x} along axis {axis} into sizes {sizes} for {n} outputs is invalid "
                                    "or has an empty part; qcompile does not represent empty tensors")
    start = 0
    for k, (out, size) in enumerate(zip(node.output, sizes)):
        imp.emit(node, "slice", [imp.v(node.input[0])],
                 {"starts": (start,), "ends": (start + size,), "axes": (axis,), "steps": (1,)},
                 output=out, suffix="" if k == 0 else f"_{k}")
        start += size


def _resize(imp: _Importer, node, a) -> None:
    """Resize of H and W of an NCHW tensor: nearest or linear with constant scales or sizes; attribute
    values the IR cannot express are refused by name.  Resize-10 and Upsample (which the opset upgrade
    turns into Resize, dropping their semantics) are asymmetric, nearest truncating when up-sampling
    and rounding up when down-sampling (onnxruntime's rule)."""
    from qcompile.ir.ops import RESIZE_COORDINATE_MODES, RESIZE_NEAREST_MODES, resize_output_size

    x = imp.type(node.input[0])
    if x.rank != 4:
        raise imp.unsupported(node, f"only 4-D (NCHW) Resize is supported, the input is {x}")
    mode = _str_attr(a, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise imp.unsupported(node, f"attribute mode='{mode}' is not supported (nearest and linear are)")
    legacy = node.output[0] in imp.legacy_resize
    ctm = "asymmetric" if legacy else _str_attr(a, "coordinate_transformation_mode", "half_pixel")
    if ctm not in RESIZE_COORDINATE_MODES:
        raise imp.unsupported(node, f"attribute coordinate_transformation_mode='{ctm}' is not supported "
                                    f"(supported: {', '.join(RESIZE_COORDINATE_MODES)})")
    if mode == "nearest" and ctm == "half_pixel_symmetric":
        # onnxruntime's float rounding of this mode's ties is not reproduced (linear is continuous: fine)
        raise imp.unsupported(node, "attribute coordinate_transformation_mode='half_pixel_symmetric' is supported "
                                    "for linear Resize only, not with mode='nearest'")
    nearest = "floor" if legacy else _str_attr(a, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest not in RESIZE_NEAREST_MODES:
        raise imp.unsupported(node, f"attribute nearest_mode='{nearest}' is not supported "
                                    f"(supported: {', '.join(RESIZE_NEAREST_MODES)})")
    if mode == "linear" and int(a.get("antialias", 0)):
        raise imp.unsupported(node, "attribute antialias=1 is not supported for linear Resize")
    if mode == "linear" and int(a.get("exclude_outside", 0)):
        raise imp.unsupported(node, "attribute exclude_outside=1 is not supported for linear Resize")
    rank = x.rank
    axes = list(range(rank)) if "axes" not in a else [int(v) % rank for v in a["axes"]]
    scales_in: list[float] | None = None
    if len(node.input) > 2 and node.input[2]:
        c = imp.const(node.input[2])
        if c is None:
            raise imp.unsupported(node, f"scales (input '{node.input[2]}') are computed at run time; only "
                                        "constant scales or sizes are supported")
        scales_in = [float(v) for v in np.asarray(c, np.float32).reshape(-1)] or None
    sizes_in = None if scales_in is not None else _const_ints(imp, node, 3, "sizes")
    if scales_in is None and sizes_in is None:
        raise imp.unsupported(node, "Resize needs constant scales or sizes")
    given = scales_in if scales_in is not None else sizes_in
    if len(given) != len(axes):
        raise imp.unsupported(node, f"{'scales' if scales_in is not None else 'sizes'} {given} do not match "
                                    f"axes {axes}")
    if sizes_in is not None and _str_attr(a, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise imp.unsupported(node, f"attribute keep_aspect_ratio_policy="
                                    f"'{_str_attr(a, 'keep_aspect_ratio_policy', 'stretch')}' is not supported")
    scales = {ax: 1.0 for ax in range(rank)}
    sizes = dict(enumerate(x.shape))
    for ax, v in zip(axes, given):
        if scales_in is not None:
            if not v > 0:
                raise imp.unsupported(node, f"scales {given} must be positive")
            scales[ax], sizes[ax] = _f32(v), resize_output_size(x.shape[ax], v)
        else:
            if v <= 0:
                raise imp.unsupported(node, f"sizes {given} must be positive")
            sizes[ax] = int(v)
            scales[ax] = _f32(np.float32(v) / np.float32(x.shape[ax]))
    if sizes[0] != x.shape[0] or sizes[1] != x.shape[1] or scales[0] != 1.0 or scales[1] != 1.0:
        raise imp.unsupported(node, f"Resize of the batch or channel axis (input {x}, output "
                                    f"{[sizes[i] for i in range(rank)]}) is not supported; only H and W")
    if min(sizes[2], sizes[3]) <= 0:
        raise imp.unsupported(node, f"Resize of {x} gives an empty output {[sizes[i] for i in range(rank)]}")
    if legacy and mode == "nearest":  # opset < 11: truncate when up-sampling an axis, ceil when down-sampling
        down = {np.float32(scales[ax]) < 1 for ax in (2, 3) if np.float32(scales[ax]) != 1}
        if len(down) > 1:
            raise imp.unsupported(node, f"opset < 11 nearest Resize that up-samples one axis and down-samples the "
                                        f"other (scales {[scales[i] for i in range(rank)]}) is not supported")
        nearest = "ceil" if down == {True} else "floor"
    imp.emit(node, "resize", [imp.v(node.input[0])],
             {"sizes": (sizes[2], sizes[3]), "scales": (scales[2], scales[3]), "mode": mode,
              "coordinate_transformation_mode": ctm, "nearest_mode": nearest if mode == "nearest"
              else "round_prefer_floor"}, output=node.output[0])


# ---------------------------------------------------------------------------- plumbing
def _eliminate(imp: _Importer, node, a) -> None:
    """Identity / inference Dropout: rewire consumers to the input."""
    if node.op_type == "Dropout":
        if len(node.output) > 1 and node.output[1]:
            raise imp.unsupported(node, "Dropout mask output is not supported")
        if len(node.input) > 2 and node.input[2]:
            mode = imp.const(node.input[2])
            if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                raise imp.unsupported(node, "training-mode Dropout; export the model in eval mode")
    imp.alias[node.output[0]] = imp.alias.get(node.input[0], node.input[0])


def _constant(imp: _Importer, node, a) -> None:
    """A Constant node the folder did not lift: record its value."""
    if len(a) != 1:
        raise imp.unsupported(node, "Constant without exactly one value attribute")
    key, value = next(iter(a.items()))
    if isinstance(value, onnx.TensorProto):
        imp.consts[node.output[0]] = numpy_helper.to_array(value)
    elif key in ("value_float", "value_int"):
        imp.consts[node.output[0]] = np.array(value, np.float32 if key == "value_float" else np.int64)
    elif key in ("value_floats", "value_ints"):
        imp.consts[node.output[0]] = np.array(value, np.float32 if key == "value_floats" else np.int64)
    else:
        raise imp.unsupported(node, f"Constant with a '{key}' value is not supported")


def _qdq(op: str):
    """QuantizeLinear / DequantizeLinear with constant scale (scalar or per-axis) and zero point.
    Without a zero point QuantizeLinear produces uint8 (ONNX default) unless ``output_dtype`` says
    otherwise; int4 initializers are kept as int8 storage with ``bits=4``."""
    def h(imp: _Importer, node, a) -> None:
        if int(a.get("block_size", 0)):
            raise imp.unsupported(node, "blocked quantization (block_size) is not supported; use per-axis scales")
        for i in node.input[1:3]:
            if i and imp.const(i) is None:
                raise imp.unsupported(node, f"scale and zero point must be constants ('{i}' is computed)")
        ins = [imp.v(i) for i in node.input[:3] if i]
        if imp.g.types[ins[1]].dtype != "float32":
            raise imp.unsupported(node, f"scale must be float32, got {imp.g.types[ins[1]].dtype}")
        attrs = {"axis": int(a.get("axis", 1))}
        if op == "dequantize_linear" and imp.alias.get(node.input[0], node.input[0]) in imp.int4:
            attrs["bits"] = 4
        if op == "quantize_linear":
            if len(ins) > 2:
                attrs["dtype"] = imp.g.types[ins[2]].dtype
            else:
                out = int(a.get("output_dtype", 0)) or onnx.TensorProto.UINT8
                if out not in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
                    raise imp.unsupported(node, "only int8 / uint8 quantization is supported")
                attrs["dtype"] = _ELEM[out]
        imp.emit(node, op, ins, attrs, output=node.output[0])
    return h


HANDLERS: dict[str, Callable[[_Importer, onnx.NodeProto, dict], None]] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _bn,
    "LayerNormalization": _layer_norm,
    "Relu": _unary("relu"), "Sigmoid": _unary("sigmoid"), "Tanh": _unary("tanh"), "Exp": _unary("exp"),
    "Sqrt": _unary("sqrt"), "Erf": _unary("erf"), "Neg": _unary("neg"), "Abs": _unary("abs"),
    "Reciprocal": _unary("reciprocal"), "HardSwish": _unary("hardswish"),
    "HardSigmoid": _unary("hardsigmoid", lambda a: {"alpha": _f32(a.get("alpha", 0.2)),
                                                     "beta": _f32(a.get("beta", 0.5))}),
    "LeakyRelu": _unary("leaky_relu", lambda a: {"alpha": _f32(a.get("alpha", 0.01))}),
    "Gelu": _unary("gelu", lambda a: {"approximate": _str_attr(a, "approximate", "none")}),
    "Clip": _clip,
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Pow": _binary("pow"), "Max": _binary("max"), "Min": _binary("min"), "Sum": _binary("add"),
    "MaxPool": _pool("max_pool2d"), "AveragePool": _pool("avg_pool2d"),
    "GlobalAveragePool": _unary("global_avg_pool"), "GlobalMaxPool": _global_max_pool,
    "ReduceMean": _reduce_mean,
    "Concat": lambda imp, n, a: imp.emit(n, "concat", [imp.v(i) for i in n.input], {"axis": int(a["axis"])},
                                         output=n.output[0]),
    "Reshape": _reshape, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Flatten": lambda imp, n, a: imp.emit(n, "flatten", [imp.v(n.input[0])], {"axis": int(a.get("axis", 1))},
                                          output=n.output[0]),
    "Transpose": _transpose, "Slice": _slice, "Split": _split, "Resize": _resize,
    "Softmax": lambda imp, n, a: imp.emit(n, "softmax", [imp.v(n.input[0])], {"axis": int(a.get("axis", -1))},
                                          output=n.output[0]),
    "Identity": _eliminate, "Dropout": _eliminate, "Constant": _constant,
    "QuantizeLinear": _qdq("quantize_linear"), "DequantizeLinear": _qdq("dequantize_linear"),
}
"""ONNX op type -> handler(importer, node, attributes)."""


# ============================================================================ entry point
def _restore_graph_meta(graph: Graph, model: onnx.ModelProto) -> None:
    for p in model.metadata_props:
        if p.key == "qcompile.graph_meta":
            graph.meta.update(json.loads(p.value))


def load_onnx(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Load an ONNX CNN into a static-shape IR graph (steps and errors: module docstring).

    ``input_shapes`` maps graph input names to the static shapes to compile for; inputs whose
    declared shape is fully static may be omitted."""
    path = Path(path)
    model = read_onnx(path)
    _reject_foreign_domains(model)
    opset = _default_opset(model)
    _check_opset(model, opset, path)
    # Upsample / Resize-10 are asymmetric; the version converter's Resize-11 drops that (half_pixel default)
    legacy_resize = {n.output[0] for n in model.graph.node if n.op_type in ("Upsample", "Resize")} \
        if opset < 11 else set()
    model = _upgrade_opset(model, opset, path)
    shapes = _specialise_inputs(model, dict(input_shapes or {}))
    _name_nodes(model)
    model = _check_shapes(model, path, shapes)
    _check_value_sizes(model, path)
    model = _fold_constants(model, path)
    from qcompile.frontends.onnx_fusions import fuse_onnx  # imports onnxscript's rewriter: only when loading

    model, fusions = fuse_onnx(model, path)
    try:
        graph = _Importer(model, path, legacy_resize).run(shapes)
    except ShapeError as e:  # an IR shape rule failed: say which specialisation it was
        raise ShapeError(f"'{path}' with input shapes ({_fmt_shapes(shapes)}): {e}") from e
    graph.remove_unused_constants()
    _restore_graph_meta(graph, model)
    graph.meta["source"] = {"format": "onnx", "path": str(path), "opset": opset,
                            "producer": f"{model.producer_name} {model.producer_version}".strip()}
    graph.meta["input_shapes"] = {k: list(v) for k, v in shapes.items()}
    graph.meta["fusions"] = fusions
    return graph
