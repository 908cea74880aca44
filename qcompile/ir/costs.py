"""Cost analysis: MACs, parameter count and activation bytes per node.

MACs follow each op schema's formula (``conv2d``: N*C_out*H_out*W_out*C_in/g*kH*kW,
``linear``: rows*out*in, elementwise ops: 0).  ``params`` counts the elements of
the node's constant inputs; ``weight_bytes`` their storage size.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.ir import ops
from qcompile.ir.graph import Graph, Node
from qcompile.ir.printer import human


@dataclass(frozen=True)
class NodeCost:
    node: str
    op: str
    out_shape: tuple[int, ...]
    macs: int
    params: int
    weight_bytes: int
    act_bytes: int


def node_cost(g: Graph, n: Node) -> NodeCost:
    schema = ops.get(n.op)
    in_t = [g.types[i] if i else None for i in n.inputs]
    out_t = [g.types[o] for o in n.outputs]
    consts = [g.constants[i] for i in n.inputs if i in g.constants]
    return NodeCost(n.name, n.op, out_t[0].shape, schema.macs(in_t, out_t, n.attrs),
                    int(sum(c.size for c in consts)), int(sum(c.nbytes for c in consts)),
                    int(sum(t.nbytes for t in out_t)))


def graph_costs(g: Graph) -> list[NodeCost]:
    return [node_cost(g, n) for n in g.nodes]


def totals(costs: list[NodeCost]) -> dict[str, int]:
    return {"macs": sum(c.macs for c in costs), "params": sum(c.params for c in costs),
            "weight_bytes": sum(c.weight_bytes for c in costs), "nodes": len(costs)}


def format_cost_table(g: Graph, *, only_heavy: bool = False) -> str:
    costs = graph_costs(g)
    tot = totals(costs)
    rows = [c for c in costs if c.macs or c.params] if only_heavy else costs
    w = max([len(c.node) for c in rows] + [4])
    lines = [f"{'node':<{w}}  {'op':<16} {'output':<20} {'MACs':>9} {'%MACs':>6} {'params':>9}"]
    for c in rows:
        share = 100 * c.macs / tot["macs"] if tot["macs"] else 0.0
        lines.append(f"{c.node:<{w}}  {c.op:<16} {str(list(c.out_shape)):<20} {human(c.macs):>9} "
                     f"{share:6.1f} {human(c.params):>9}")
    lines.append(f"{'total':<{w}}  {'':<16} {'':<20} {human(tot['macs']):>9} {100.0 if tot['macs'] else 0:6.1f} "
                 f"{human(tot['params']):>9}")
    return "\n".join(lines)
