"""``spatial-svd``: a k x k convolution as a k x 1 convolution followed by a 1 x k one.

Jaderberg et al. 2014 (scheme 2).  Reshape ``W (O, I, kh, kw)`` to the matrix
``M[(i, h), (o, w)] = W[o, i, h, w]`` of shape (I*kh, O*kw) and take its truncated SVD
``M ~ U_r S_r V_r^T``.  Then, with ``V1[r, i, h] = (U_r S_r^1/2)[(i, h), r]`` and
``H[o, r, w] = (S_r^1/2 V_r^T)[r, (o, w)]``::

    sum_r H[o, r, w] * sum_(i, h) V1[r, i, h] x[i, y + h, x + w]  =  sum_(i,h,w) M[(i,h),(o,w)] x[...]

so a vertical conv (r filters, kh x 1, the original vertical stride/padding/dilation) followed by
a horizontal conv (O filters, 1 x kw, horizontal stride/padding/dilation, the bias) reproduces
the layer exactly at full rank ``min(I*kh, O*kw)``.  Groups must be 1.
"""

from __future__ import annotations

import numpy as np

from qcompile.factorize.layers import Step, weight_and_bias
from qcompile.passes.factorize_base import FactorizePass


def _spatial_matrix(w: np.ndarray) -> np.ndarray:
    o, i, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


class SpatialSVD(FactorizePass):
    name = "spatial-svd"
    summary = "factorize k x k convs into k x 1 then 1 x k convs by SVD"
    method = "spatial-svd"

    def why_not(self, graph, node):
        _, _, kh, kw = graph.types[node.inputs[1]].shape
        reason = super().why_not(graph, node)
        if reason:
            return reason
        if kh < 2 or kw < 2:
            return f"kernel {kh}x{kw} is not separable into two smaller ones"
        return None

    def full_rank(self, graph, node):
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        return min(i * kh, o * kw)

    def singular_values(self, graph, node, ctx):
        return np.linalg.svd(_spatial_matrix(weight_and_bias(graph, node)[0]), compute_uv=False)

    def macs_of(self, graph, node, rank):
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        n, _, h_in, w_in = graph.types[node.inputs[0]].shape
        _, _, ho, wo = graph.types[node.outputs[0]].shape
        return n * ho * w_in * rank * i * kh + n * ho * wo * o * rank * kw

    def factorize(self, graph, node, rank, ctx):
        w, b = weight_and_bias(graph, node)
        o, i, kh, kw = w.shape
        u, s, vt = np.linalg.svd(_spatial_matrix(w), full_matrices=False)
        root = np.sqrt(s[:rank])
        vert = (u[:, :rank] * root).T.reshape(rank, i, kh, 1)
        horiz = (root[:, None] * vt[:rank]).reshape(rank, o, kw).transpose(1, 0, 2).reshape(o, rank, 1, kw)
        (sh, sw), (pt, pl, pb, pr), (dh, dw) = node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]
        approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
        m = _spatial_matrix(w)
        err = float(np.linalg.norm(m - approx) / max(np.linalg.norm(m), 1e-30))
        return [Step("conv2d", vert, None, {"strides": (sh, 1), "pads": (pt, 0, pb, 0), "dilations": (dh, 1)},
                     role="vertical"),
                Step("conv2d", horiz, b, {"strides": (1, sw), "pads": (0, pl, 0, pr), "dilations": (1, dw)},
                     role="horizontal")], {"weight_rel_error": round(err, 6)}
