"""``lowrank-svd``: a linear layer as two thinner ones, by truncated SVD.

``W (out x in) = U S V^T``; keeping the ``r`` largest singular values,
``W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)``, so ``y = W x + b`` becomes ``y = W2 (W1 x) + b`` with
``W1 = S_r^1/2 V_r^T`` (r x in) and ``W2 = U_r S_r^1/2`` (out x r).  Eckart-Young: the best rank-r
approximation in Frobenius norm; exact at ``r = rank(W)``.  MACs per row: ``r (in + out)``
instead of ``in * out``.
"""

from __future__ import annotations

import numpy as np

from qcompile.factorize.layers import Step, node_macs, weight_and_bias
from qcompile.passes.factorize_base import FactorizePass


class LowRankSVD(FactorizePass):
    name = "lowrank-svd"
    summary = "factorize linear layers W ~ W2 W1 by truncated SVD"
    ops = ("linear",)
    method = "svd"

    def full_rank(self, graph, node):
        return min(graph.types[node.inputs[1]].shape)

    def singular_values(self, graph, node, ctx):
        return np.linalg.svd(weight_and_bias(graph, node)[0], compute_uv=False)

    def macs_of(self, graph, node, rank):
        out, inp = graph.types[node.inputs[1]].shape
        rows = node_macs(graph, node) // (out * inp)
        return rows * rank * (inp + out)

    def factorize(self, graph, node, rank, ctx):
        w, b = weight_and_bias(graph, node)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s[:rank])
        w1 = root[:, None] * vt[:rank]
        w2 = u[:, :rank] * root[None, :]
        err = float(np.linalg.norm(w - w2 @ w1) / max(np.linalg.norm(w), 1e-30))
        return [Step("linear", w1, None, role="svd_in"), Step("linear", w2, b, role="svd_out")], \
            {"weight_rel_error": round(err, 6)}
