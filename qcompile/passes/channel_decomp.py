"""``channel-decomp``: a conv as (conv with d filters) -> (1x1 conv), fitted to real responses.

Zhang et al. 2015, "Accelerating Very Deep Convolutional Networks for Classification and
Detection".  The layer's responses ``y = W x + b0`` (O channels) are approximated by
``M y_hat + b`` with ``rank(M) = d``, where ``y_hat`` is the response of the original weights to
the input produced by the *already-approximated* network and the target ``y`` comes from the
*original* network (asymmetric reconstruction), fitted on calibration data.  When the layer's
only consumer is a ReLU the fit is to the post-ReLU responses (nonlinear reconstruction); see
:mod:`qcompile.factorize.reconstruct` for the math.  With ``M = P Q^T``::

    conv(x; Q^T W, Q^T b0)  ->  conv1x1(.; P, b)      ==  M (W x + b0) + b

MACs per output pixel: ``d (I k^2 + O)`` instead of ``O I k^2``.  Ranks are allocated across
layers (the default ``macs`` budget) by the PCA energy of each layer's original responses, as in
the paper.  Needs calibration data (``--calib`` / the model's ``calibration_data()``); layers are
processed in graph order so each sees the approximated network before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import PipelineError, PreconditionError
from qcompile.factorize import reconstruct as R
from qcompile.factorize.layers import Step, capture, weight_and_bias
from qcompile.passes.factorize_base import FactorizeOptions, FactorizePass


@dataclass(frozen=True)
class ChannelDecompOptions(FactorizeOptions):
    nonlinear: bool = field(default=True, metadata={"doc": "fit post-ReLU responses when a ReLU follows"})
    asymmetric: bool = field(default=True, metadata={
        "doc": "inputs from the approximated network (False: from the original, i.e. symmetric)"})
    samples: int = field(default=4096, metadata={"doc": "response positions sampled per layer"})
    fit: str = field(default="responses", metadata={
        "doc": "'responses' (Zhang et al., needs calibration data) or 'weights' (plain SVD of the weight "
               "matrix, data-free baseline)"})


class ChannelDecomposition(FactorizePass):
    name = "channel-decomp"
    summary = "factorize convs into d-filter conv + 1x1, fitted to calibration responses (Zhang et al. 2015)"
    Options = ChannelDecompOptions
    method = "channel-decomp"

    # -- responses of the original network, sampled once ----------------------
    def prepare(self, graph, nodes, ctx):
        if self.options.fit not in ("responses", "weights"):
            raise PipelineError(f"pass '{self.name}': fit must be 'responses' or 'weights', got "
                                f"'{self.options.fit}'")
        if self.options.fit == "weights":
            return
        if not ctx.calibration:
            raise PreconditionError(f"pass '{self.name}' fits layers to real responses and needs calibration "
                                    f"data: pass --calib FILE or use a model with calibration_data()")
        self._feeds = list(ctx.calibration)
        values = [n.outputs[0] for n in nodes]
        if not self.options.asymmetric:  # symmetric: inputs from the original network, captured now
            values += [n.inputs[0] for n in nodes]
        got = capture(graph, self._feeds, values)
        self._y, self._idx, self._x_orig = {}, {}, {}
        for k, n in enumerate(nodes):
            out = got[n.outputs[0]]
            rng = np.random.default_rng(k)
            total = out.shape[0] * out.shape[2] * out.shape[3]
            idx = np.sort(rng.choice(total, size=min(self.options.samples, total), replace=False))
            self._idx[n.name] = idx
            self._y[n.name] = self._columns(out)[:, idx]
            if not self.options.asymmetric:
                self._x_orig[n.name] = got[n.inputs[0]]

    @staticmethod
    def _columns(t: np.ndarray) -> np.ndarray:
        return t.transpose(1, 0, 2, 3).reshape(t.shape[1], -1).astype(np.float64)

    def full_rank(self, graph, node):
        return graph.types[node.inputs[1]].shape[0]

    def singular_values(self, graph, node, ctx):
        if self.options.fit == "weights":
            w, _ = weight_and_bias(graph, node)
            return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
        y = self._y[node.name]
        return np.linalg.svd(y - y.mean(axis=1, keepdims=True), compute_uv=False)

    def macs_of(self, graph, node, rank):
        o, i, kh, kw = graph.types[node.inputs[1]].shape
        n, _, ho, wo = graph.types[node.outputs[0]].shape
        return n * ho * wo * rank * (i * kh * kw + o)

    def timing_steps(self, graph, node, rank, ctx):
        w, b0 = weight_and_bias(graph, node)
        return self._weight_svd(node, w, b0, rank)[0]  # same shapes as the fitted chain

    def _followed_by_relu(self, graph, node) -> bool:
        uses = graph.consumers().get(node.outputs[0], [])
        return len(uses) == 1 and uses[0].op == "relu" and node.outputs[0] not in graph.outputs

    def factorize(self, graph, node, rank, ctx):
        import torch

        w, b0 = weight_and_bias(graph, node)
        if self.options.fit == "weights":
            return self._weight_svd(node, w, b0, rank)
        if self.options.asymmetric:
            x_hat = capture(graph, self._feeds, [node.inputs[0]])[node.inputs[0]]
        else:
            x_hat = self._x_orig[node.name]
        a = node.attrs
        (pt, pl, pb, pr) = a["pads"]
        xt = torch.nn.functional.pad(torch.from_numpy(x_hat.astype(np.float64)), (pl, pr, pt, pb))
        y_hat_full = torch.nn.functional.conv2d(
            xt, torch.from_numpy(w), None if b0 is None else torch.from_numpy(b0),
            stride=tuple(a["strides"]), dilation=tuple(a["dilations"])).numpy()
        y_hat = self._columns(y_hat_full)[:, self._idx[node.name]]
        y = self._y[node.name]
        nonlinear = self.options.nonlinear and self._followed_by_relu(graph, node)
        rec = (R.nonlinear_reconstruction(y, y_hat, rank) if nonlinear
               else R.reduced_rank_regression(y, y_hat, rank))
        approx = rec.apply(y_hat)
        err = R.relu_error(y, approx) if nonlinear else R.linear_error(y, approx)
        o = w.shape[0]
        w1 = (rec.q.T @ w.reshape(o, -1)).reshape((rank,) + w.shape[1:])
        b1 = rec.q.T @ (b0 if b0 is not None else np.zeros(o))
        steps = [Step("conv2d", w1, b1, {k: a[k] for k in ("strides", "pads", "dilations")}, role="reduced"),
                 Step("conv2d", rec.p[:, :, None, None], rec.b, role="expand")]
        return steps, {"nonlinear": nonlinear, "asymmetric": self.options.asymmetric,
                       "response_rel_error": round(err, 6)}

    @staticmethod
    def _weight_svd(node, w, b0, rank):
        """Plain SVD of ``W (O, I k k) ~ U_d S_d V_d^T``: conv ``V_d^T`` then 1x1 ``U_d S_d`` (bias last)."""
        o = w.shape[0]
        u, s, vt = np.linalg.svd(w.reshape(o, -1), full_matrices=False)
        w1 = vt[:rank].reshape((rank,) + w.shape[1:])
        w2 = (u[:, :rank] * s[:rank])[:, :, None, None]
        err = float(np.sqrt(np.sum(s[rank:] ** 2) / max(np.sum(s ** 2), 1e-30)))
        a = node.attrs
        return ([Step("conv2d", w1, None, {k: a[k] for k in ("strides", "pads", "dilations")}, role="reduced"),
                 Step("conv2d", w2, b0, role="expand")], {"fit": "weights", "weight_rel_error": round(err, 6)})
