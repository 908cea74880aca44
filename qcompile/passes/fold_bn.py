"""``fold-bn``: fold inference batch norm into the preceding conv2d / linear.

For ``y = BN(conv(x; W, b))`` with per-channel ``s = scale / sqrt(var + eps)``::

    W'[o] = W[o] * s[o]
    b'[o] = (b[o] - mean[o]) * s[o] + bias[o]

so ``conv(x; W', b') == BN(conv(x; W, b))`` exactly in real arithmetic.  Applies
when the conv/linear output feeds only the batch norm and all parameters are
constants; for ``linear`` the BN channel axis must be the last (rank-2 output).
"""

from __future__ import annotations

import numpy as np

from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import Pass, PassContext, PassResult


def _why_not_foldable(g: Graph, bn: Node, producer: Node | None, uses: dict) -> str | None:
    """None when ``bn`` can be folded into ``producer``, else the reason."""
    if producer is None or producer.op not in ("conv2d", "linear"):
        return "input is not produced by conv2d/linear"
    if len(uses.get(bn.inputs[0], [])) != 1 or bn.inputs[0] in g.outputs:
        return f"'{producer.name}' output has other users"
    if not all(v in g.constants for v in bn.inputs[1:]):
        return "batch-norm parameters are not constants"
    if not all(v in g.constants for v in producer.inputs[1:] if v):
        return f"'{producer.name}' weights are not constants"
    if producer.op == "linear" and g.types[bn.inputs[0]].rank != 2:
        return "linear output is not rank 2"
    return None


class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold inference batch norm into the preceding conv2d/linear weights"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded, skipped = 0, {}
        for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
            producers, uses = graph.producers(), graph.consumers()
            prod = producers.get(bn.inputs[0])
            reason = _why_not_foldable(graph, bn, prod, uses)
            if reason:
                skipped[bn.name] = reason
                continue
            self._fold(graph, bn, prod)
            folded += 1
        if folded:
            graph.remove_unused_constants()
        return PassResult(graph, folded > 0, {"folded": folded, "skipped": skipped})

    @staticmethod
    def _fold(g: Graph, bn: Node, prod: Node) -> None:
        scale, bias, mean, var = (g.constants[v].astype(np.float64) for v in bn.inputs[1:])
        s = scale / np.sqrt(var + bn.attrs["epsilon"])
        w = g.constants[prod.inputs[1]].astype(np.float64)
        b = (g.constants[prod.inputs[2]].astype(np.float64)
             if len(prod.inputs) > 2 and prod.inputs[2] else np.zeros(w.shape[0]))
        w_new = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b_new = (b - mean) * s + bias
        dtype = g.constants[prod.inputs[1]].dtype
        w_name = g.add_constant(prod.inputs[1], w_new.astype(dtype))
        b_name = g.add_constant(prod.inputs[2] if len(prod.inputs) > 2 and prod.inputs[2]
                                else f"{prod.name}.bias", b_new.astype(dtype))
        prod.inputs = [prod.inputs[0], w_name, b_name]
        prod.add_provenance(**{"pass": "fold-bn", "folded": bn.name})
        g.replace_all_uses(bn.outputs[0], prod.outputs[0])
        g.remove_node(bn)
