"""``dead-code``: remove computation that cannot reach a graph output.

A node is live iff one of its outputs is a graph output or is read by a live
node.  ``identity`` nodes are bypassed (their readers read the identity's input)
unless the identity defines a graph output.  Constants no live node reads are dropped.
"""

from __future__ import annotations

from qcompile.ir.graph import Graph
from qcompile.passes.base import Pass, PassContext, PassResult


class DeadCode(Pass):
    name = "dead-code"
    summary = "remove nodes and constants that do not reach an output; bypass identities"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed_identity = 0
        for n in list(graph.nodes):
            if n.op == "identity" and n.outputs[0] not in graph.outputs:
                graph.replace_all_uses(n.outputs[0], n.inputs[0])
                graph.remove_node(n)
                removed_identity += 1
        live_values = set(graph.outputs)
        live_ids: set[int] = set()
        for n in reversed(graph.nodes):
            if any(o in live_values for o in n.outputs):
                live_ids.add(id(n))
                live_values.update(i for i in n.inputs if i)
        dead = [n for n in graph.nodes if id(n) not in live_ids]
        for n in dead:
            graph.remove_node(n)
        consts = graph.remove_unused_constants()
        stats = {"nodes_removed": len(dead), "identities_bypassed": removed_identity, "constants_removed": consts}
        return PassResult(graph, bool(dead or consts or removed_identity), stats)
