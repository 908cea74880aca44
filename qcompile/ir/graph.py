"""The qcompile IR: a static-shape dataflow graph of CNN operators.

A :class:`Graph` holds

* ``inputs`` / ``outputs``: value names, in order;
* ``nodes``: :class:`Node` objects in topological order; a node reads values by
  name and defines its ``outputs`` (SSA: every value is defined exactly once);
* ``constants``: name -> read-only ``numpy`` array (weights, biases, BN stats);
* ``types``: name -> :class:`TensorType` for *every* value (inputs, constants,
  node outputs).  Shapes are static: frontends specialise dynamic dimensions.

Operator semantics (attributes, shape rules, MAC counts) live in
:mod:`qcompile.ir.ops`; backends give each op an implementation.

Constants are immutable: a pass that changes a weight stores a new array
under a new name (:meth:`Graph.add_constant`), so clones can share arrays.
Per-node ``meta`` carries provenance (``meta["provenance"]``: list of dicts,
one per rewrite, e.g. ``{"pass": "lowrank-svd", "rank": 8}``) and costs
(``meta["macs"]``, ``meta["params"]`` written by ``annotate-costs``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from qcompile.errors import IRVerificationError

DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")


@dataclass(frozen=True)
class TensorType:
    """A static tensor type: shape (tuple of ints >= 0) and dtype name."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize

    def __str__(self) -> str:
        short = {"float32": "f32", "float16": "f16", "int8": "i8", "uint8": "u8",
                 "int32": "i32", "int64": "i64", "bool": "bool"}[self.dtype]
        return f"{short}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(tuple(array.shape), str(array.dtype))


@dataclass
class Node:
    """One operator application. ``inputs`` may contain ``""`` for an absent optional input."""

    op: str
    inputs: list[str]
    outputs: list[str]
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add_provenance(self, **entry: Any) -> None:
        self.meta.setdefault("provenance", []).append(dict(entry))


_NAME_SANITIZE = re.compile(r"[^A-Za-z0-9_.:/\-]")


class Graph:
    """A static-shape CNN dataflow graph (see module docstring)."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}
        self.types: dict[str, TensorType] = {}
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._node_names: set[str] = set()

    # ------------------------------------------------------------------ naming
    def fresh_name(self, hint: str, *, kind: str = "value") -> str:
        """A value (or, with ``kind="node"``, node) name not used yet, derived from ``hint``."""
        taken = self._taken(kind)
        base = _NAME_SANITIZE.sub("_", hint) or "v"
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def _taken(self, kind: str) -> set[str]:
        if kind == "node":
            self._node_names |= {n.name for n in self.nodes}
            return self._node_names
        if not self._names:
            self._names = set(self.types)
        return self._names

    # --------------------------------------------------------------- building
    def add_input(self, name: str, ttype: TensorType) -> str:
        if name in self.types:
            raise IRVerificationError(f"input name '{name}' already defined")
        self.inputs.append(name)
        self.types[name] = ttype
        self._names.add(name)
        return name

    def add_constant(self, hint: str, array: np.ndarray, *, exact_name: bool = False) -> str:
        """Store ``array`` (copied, made read-only) under a fresh name derived from ``hint``."""
        if exact_name:
            if hint in self.types:
                raise IRVerificationError(f"constant name '{hint}' already defined")
            name = hint
            self._names.add(name)
        else:
            name = self.fresh_name(hint)
        arr = np.array(array, copy=True)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        arr.flags.writeable = False
        self.constants[name] = arr
        self.types[name] = TensorType.of(arr)
        return name

    def make_node(self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, *,
                  name: str | None = None, num_outputs: int = 1,
                  output_names: Sequence[str] | None = None,
                  meta: dict[str, Any] | None = None) -> Node:
        """Create a node, infer its output types, register them. Does *not* place it in
        ``nodes``: use :meth:`append`, :meth:`insert_before` or :meth:`replace_node`."""
        from qcompile.ir import ops as _ops

        schema = _ops.get(op)
        full_attrs = schema.complete_attrs(attrs or {}, node_name=name or op)
        node_name = self.fresh_name(name or op, kind="node")
        if output_names is None:
            output_names = [self.fresh_name(node_name if num_outputs == 1 else f"{node_name}_{i}")
                            for i in range(num_outputs)]
        node = Node(op, list(inputs), list(output_names), node_name, full_attrs, dict(meta or {}))
        in_types = [self.types[i] if i else None for i in node.inputs]
        for i, t in zip(node.inputs, in_types):
            if i and t is None:
                raise IRVerificationError(f"node '{node_name}' reads undefined value '{i}'")
        out_types = schema.infer(in_types, full_attrs, node)
        for o, t in zip(node.outputs, out_types):
            self.types[o] = t
            self._names.add(o)
        return node

    def append(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def insert_before(self, anchor: Node, new_nodes: Iterable[Node]) -> None:
        idx = self._index(anchor)
        self.nodes[idx:idx] = list(new_nodes)

    def replace_node(self, old: Node, new_nodes: Sequence[Node], new_outputs: Sequence[str]) -> None:
        """Put ``new_nodes`` where ``old`` was and redirect every use of ``old``'s outputs
        to ``new_outputs`` (same order and types)."""
        if len(new_outputs) != len(old.outputs):
            raise IRVerificationError(
                f"replacement for '{old.name}' has {len(new_outputs)} outputs, expected {len(old.outputs)}")
        for o_old, o_new in zip(old.outputs, new_outputs):
            if self.types[o_old] != self.types[o_new]:
                raise IRVerificationError(
                    f"replacement for '{old.name}' changes type of '{o_old}': "
                    f"{self.types[o_old]} -> {self.types[o_new]}")
        idx = self._index(old)
        self.nodes[idx:idx + 1] = list(new_nodes)
        for o_old, o_new in zip(old.outputs, new_outputs):
            self.replace_all_uses(o_old, o_new)
            del self.types[o_old]

    def remove_node(self, node: Node) -> None:
        self.nodes.pop(self._index(node))
        for o in node.outputs:
            self.types.pop(o, None)

    def _index(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise IRVerificationError(f"node '{node.name}' is not in graph '{self.name}'")

    def replace_all_uses(self, old: str, new: str) -> None:
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    # ---------------------------------------------------------------- queries
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        uses: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    uses.setdefault(i, []).append(n)
        return uses

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named '{name}' in graph '{self.name}'")

    def is_constant(self, value: str) -> bool:
        return value in self.constants

    def remove_unused_constants(self) -> int:
        used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
        dead = [c for c in self.constants if c not in used]
        for c in dead:
            del self.constants[c]
            del self.types[c]
        return len(dead)

    def clone(self) -> "Graph":
        """Structural deep copy; constant arrays (read-only) are shared."""
        g = Graph(self.name)
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.nodes = [Node(n.op, list(n.inputs), list(n.outputs), n.name, copy.deepcopy(n.attrs),
                        copy.deepcopy(n.meta)) for n in self.nodes]
        g.constants = dict(self.constants)
        g.types = dict(self.types)
        g.meta = copy.deepcopy(self.meta)
        return g

    def param_count(self) -> int:
        return int(sum(a.size for a in self.constants.values()))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def __str__(self) -> str:
        from qcompile.ir.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.nodes)} nodes, {len(self.constants)} constants>"
