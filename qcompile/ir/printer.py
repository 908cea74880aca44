"""Readable text form of a :class:`~qcompile.ir.graph.Graph`.

Example::

    graph digits_cnn(%x: f32[1,1,8,8]) -> (%logits)
      %c1 = conv2d(%x, @conv1.weight, @conv1.bias) {pads=(1,1,1,1)} : f32[1,16,8,8]  # conv1 macs=9.2K
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qcompile.ir.graph import Graph, Node


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _ref(g: "Graph", v: str) -> str:
    if not v:
        return "_"
    return f"@{v}" if v in g.constants else f"%{v}"


def format_node(g: "Graph", n: "Node") -> str:
    from qcompile.ir import ops

    defaults = ops.get(n.op).attrs
    attrs = {k: v for k, v in n.attrs.items() if defaults.get(k) != v}
    attr_txt = (" {" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "}") if attrs else ""
    outs = ", ".join(f"%{o}" for o in n.outputs)
    types = ", ".join(str(g.types[o]) for o in n.outputs)
    line = f"  {outs} = {n.op}({', '.join(_ref(g, i) for i in n.inputs)}){attr_txt} : {types}"
    notes = [f"# {n.name}"]
    if "macs" in n.meta:
        notes.append(f"macs={human(n.meta['macs'])}")
    for p in n.meta.get("provenance", []):
        notes.append("[" + " ".join(f"{k}={v}" for k, v in p.items()) + "]")
    return line + "  " + " ".join(notes)


def format_graph(g: "Graph", *, constants: bool = False) -> str:
    ins = ", ".join(f"%{i}: {g.types[i]}" for i in g.inputs)
    outs = ", ".join(f"%{o}" for o in g.outputs)
    lines = [f"graph {g.name}({ins}) -> ({outs})"]
    if constants:
        for c, a in g.constants.items():
            lines.append(f"  @{c} : {g.types[c]}")
    lines += [format_node(g, n) for n in g.nodes]
    return "\n".join(lines)
