"""``annotate-costs``: record shape, MACs and parameter counts on every node.

Writes ``node.meta["macs"]``, ``["params"]``, ``["out_shape"]`` and
``graph.meta["costs"]`` (totals).  Changes no computation.
"""

from __future__ import annotations

from qcompile.ir.costs import graph_costs, totals
from qcompile.ir.graph import Graph
from qcompile.passes.base import Pass, PassContext, PassResult


class AnnotateCosts(Pass):
    name = "annotate-costs"
    summary = "annotate every node with output shape, MACs and parameter count"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        costs = graph_costs(graph)
        modified = False
        for n, c in zip(graph.nodes, costs):
            new = {"macs": c.macs, "params": c.params, "out_shape": list(c.out_shape)}
            if any(n.meta.get(k) != v for k, v in new.items()):
                n.meta.update(new)
                modified = True
        tot = totals(costs)
        if graph.meta.get("costs") != tot:
            graph.meta["costs"] = tot
            modified = True
        return PassResult(graph, modified, stats=tot)
