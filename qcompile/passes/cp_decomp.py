"""``cp``: a k x k convolution as 1x1 (I -> R), depthwise k x 1, depthwise 1 x k, 1x1 (R -> O).

Lebedev et al. 2015.  Rank-R CP (CANDECOMP/PARAFAC) decomposition of ``W (O, I, kh, kw)``::

    W[o, i, h, w] ~ sum_r lambda_r * A[o, r] * B[i, r] * C[h, r] * D[w, r]

fitted by tensorly's ``parafac`` (ALS, SVD initialisation, fixed seed).  Chain: 1x1 conv with
``B^T``; depthwise conv (R groups) with ``C`` (vertical stride/padding/dilation); depthwise conv
with ``D`` (horizontal); 1x1 conv with ``A * lambda`` and the bias.  Energy used for rank
allocation is the output-channel unfolding's (a proxy: CP has no nested spectrum).  ALS is not
guaranteed to converge; the relative weight error is recorded, and a short fine-tune is the
usual cure.  Groups must be 1.
"""

from __future__ import annotations

import warnings

import numpy as np

from qcompile.factorize.layers import Step, weight_and_bias
from qcompile.passes.factorize_base import FactorizePass


class CPDecomposition(FactorizePass):
    name = "cp"
    summary = "factorize convs into 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1 by CP (tensorly)"
    method = "cp"

    def full_rank(self, graph, node):
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        return min(o * i, i * kh * kw, o * kh * kw)

    def singular_values(self, graph, node, ctx):
        w, _ = weight_and_bias(graph, node)
        return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)

    def macs_of(self, graph, node, rank):
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        n, _, h, w = graph.types[node.inputs[0]].shape
        _, _, ho, wo = graph.types[node.outputs[0]].shape
        return n * rank * (h * w * i + ho * w * kh + ho * wo * kw + ho * wo * o)

    def timing_steps(self, graph, node, rank, ctx):
        """Random factors of the fitted chain's shapes (ALS per probed rank would cost minutes)."""
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        rng = np.random.default_rng(0)
        b = weight_and_bias(graph, node)[1]
        return self._chain(node, rng.standard_normal((o, rank)), rng.standard_normal((i, rank)),
                           rng.standard_normal((kh, rank)), rng.standard_normal((kw, rank)), b, rank)

    @staticmethod
    def _chain(node, a, bb, c, d, b, rank):
        (sh, sw), (pt, pl, pb, pr), (dh, dw) = node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]
        kh, kw = c.shape[0], d.shape[0]
        return [Step("conv2d", bb.T[:, :, None, None], None, role="cp_in"),
                Step("conv2d", c.T.reshape(rank, 1, kh, 1), None,
                     {"strides": (sh, 1), "pads": (pt, 0, pb, 0), "dilations": (dh, 1), "group": rank},
                     role="cp_vertical"),
                Step("conv2d", d.T.reshape(rank, 1, 1, kw), None,
                     {"strides": (1, sw), "pads": (0, pl, 0, pr), "dilations": (1, dw), "group": rank},
                     role="cp_horizontal"),
                Step("conv2d", a[:, :, None, None], b, role="cp_out")]

    def factorize(self, graph, node, rank, ctx):
        from tensorly.decomposition import parafac

        w, b = weight_and_bias(graph, node)
        with warnings.catch_warnings():  # SVD init pads with random columns when rank > a mode's size
            warnings.filterwarnings("ignore", message="Trying to compute SVD")
            cp = parafac(w, rank=rank, init="svd", n_iter_max=300, tol=1e-9, random_state=0)
        lam = np.asarray(cp.weights)
        a, bb, c, d = (np.asarray(f) for f in cp.factors)
        approx = np.einsum("r,or,ir,hr,wr->oihw", lam, a, bb, c, d, optimize=True)
        err = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30))
        return self._chain(node, a * lam, bb, c, d, b, rank), {"weight_rel_error": round(err, 6)}
