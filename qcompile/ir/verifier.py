"""Structural verifier: the invariants every pass must preserve.

Checked: known ops with complete attributes; every read value is a graph input,
a constant or an earlier node output (topological order, hence acyclic); every
value is defined exactly once; recorded types equal freshly inferred types;
graph outputs exist; constants' recorded types match their arrays.
"""

from __future__ import annotations

from qcompile.errors import IRVerificationError
from qcompile.ir import ops
from qcompile.ir.graph import Graph, TensorType


def verify(g: Graph) -> None:
    """Raise :class:`IRVerificationError` naming the first broken invariant."""
    problems = collect_problems(g)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IRVerificationError(f"graph '{g.name}' is invalid: {problems[0]}{more}")


def collect_problems(g: Graph) -> list[str]:
    problems: list[str] = []
    defined: set[str] = set()
    for i in g.inputs:
        if i in defined:
            problems.append(f"input '{i}' listed twice")
        defined.add(i)
        if i not in g.types:
            problems.append(f"input '{i}' has no type")
    for c, arr in g.constants.items():
        if c in defined:
            problems.append(f"constant '{c}' shadows another value")
        defined.add(c)
        if g.types.get(c) != TensorType.of(arr):
            problems.append(f"constant '{c}' type {g.types.get(c)} != array {TensorType.of(arr)}")
    node_names: set[str] = set()
    for n in g.nodes:
        if n.name in node_names:
            problems.append(f"node name '{n.name}' used twice")
        node_names.add(n.name)
        try:
            schema = ops.get(n.op)
        except IRVerificationError as e:
            problems.append(f"node '{n.name}': {e}")
            continue
        for v in n.inputs:
            if v and v not in defined:
                problems.append(f"node '{n.name}' ({n.op}) reads '{v}' before it is defined")
        if set(n.attrs) != set(schema.attrs):
            problems.append(f"node '{n.name}' ({n.op}) attributes {sorted(n.attrs)} != schema {sorted(schema.attrs)}")
            continue
        if any(v and v not in g.types for v in n.inputs):
            continue
        try:
            inferred = schema.infer([g.types[v] if v else None for v in n.inputs], n.attrs, n)
        except Exception as e:  # noqa: BLE001 - report, do not crash the verifier
            problems.append(str(e))
            inferred = None
        if inferred is not None:
            if len(inferred) != len(n.outputs):
                problems.append(f"node '{n.name}' has {len(n.outputs)} outputs, op yields {len(inferred)}")
            for o, t in zip(n.outputs, inferred):
                if g.types.get(o) != t:
                    problems.append(f"node '{n.name}' output '{o}' recorded {g.types.get(o)}, inferred {t}")
        for o in n.outputs:
            if o in defined:
                problems.append(f"value '{o}' defined twice (node '{n.name}')")
            defined.add(o)
    for o in g.outputs:
        if o not in defined:
            problems.append(f"graph output '{o}' is not defined")
    if not g.outputs:
        problems.append("graph has no outputs")
    return problems
