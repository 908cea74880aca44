"""``tucker2``: a k x k convolution as 1x1 (I -> R_i), k x k core (R_i -> R_o), 1x1 (R_o -> O).

Kim et al. 2016.  Tucker-2 decomposition of ``W (O, I, kh, kw)`` over the two channel modes::

    W[o, i, h, w] ~ sum_(a, c) U_o[o, a] * G[a, c, h, w] * U_i[i, c]

fitted by tensorly's ``partial_tucker`` (HOSVD initialisation, then up to 20 HOOI sweeps).  The first 1x1 conv
has weights ``U_i^T``, the core conv ``G`` keeps the layer's stride/padding/dilation, the last
1x1 conv has weights ``U_o`` and the bias.  Exact when ``R_o = O`` and ``R_i = I``.
Ranks: ``R_o`` in multiples of ``multiple`` with ``R_i`` scaled by ``I/O``; the retained energy of
a pair is the product of the two mode-unfolding energies (HOSVD bound).  Groups must be 1.
"""

from __future__ import annotations

import warnings

import numpy as np

from qcompile.factorize.layers import Step, node_macs, weight_and_bias
from qcompile.factorize.ranks import Candidate, cumulative_energy, round_up
from qcompile.passes.factorize_base import FactorizePass


class Tucker2(FactorizePass):
    name = "tucker2"
    summary = "factorize convs into 1x1 -> k x k core -> 1x1 by Tucker-2 (tensorly)"
    method = "tucker2"

    def full_rank(self, graph, node):
        o, i, _, _ = graph.types[node.inputs[1]].shape
        return (o, i)

    def fixed_rank(self, graph, node, rank):
        o, i = self.full_rank(graph, node)
        return (min(rank, o), min(rank, i))

    def macs_of(self, graph, node, rank):
        r_o, r_i = rank
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        n, _, h, w = graph.types[node.inputs[0]].shape
        _, _, ho, wo = graph.types[node.outputs[0]].shape
        return n * (h * w * r_i * i + ho * wo * r_o * r_i * kh * kw + ho * wo * o * r_o)

    def candidates(self, graph, node, ctx):
        w, _ = weight_and_bias(graph, node)
        o, i = w.shape[:2]
        e_o = cumulative_energy(np.linalg.svd(w.reshape(o, -1), compute_uv=False))
        e_i = cumulative_energy(np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(i, -1), compute_uv=False))
        orig = node_macs(graph, node)
        m = self.options.multiple
        cands = [Candidate(None, orig, 1.0)]
        for r_o in range(min(m, o), o + 1, m):
            r_i = min(i, round_up(r_o * i / o, m))
            macs = self.macs_of(graph, node, (r_o, r_i))
            if macs < orig:
                energy = float(e_o[min(r_o, len(e_o)) - 1] * e_i[min(r_i, len(e_i)) - 1])
                cands.append(Candidate((r_o, r_i), macs, energy))
        return cands

    def factorize(self, graph, node, rank, ctx):
        from tensorly.decomposition import partial_tucker

        w, b = weight_and_bias(graph, node)
        r_o, r_i = rank
        with warnings.catch_warnings():  # HOOI asks for more singular vectors than a small core mode has
            warnings.filterwarnings("ignore", message="Trying to compute SVD")
            (core, (u_o, u_i)), _ = partial_tucker(w, rank=[r_o, r_i], modes=[0, 1], init="svd",
                                                   n_iter_max=20, random_state=0)
        core, u_o, u_i = np.asarray(core), np.asarray(u_o), np.asarray(u_i)
        approx = np.einsum("oa,achw,ic->oihw", u_o, core, u_i, optimize=True)
        err = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30))
        return [Step("conv2d", u_i.T[:, :, None, None], None, role="tucker_in"),
                Step("conv2d", core, None, {k: node.attrs[k] for k in ("strides", "pads", "dilations")},
                     role="tucker_core"),
                Step("conv2d", u_o[:, :, None, None], b, role="tucker_out")], {"weight_rel_error": round(err, 6)}
