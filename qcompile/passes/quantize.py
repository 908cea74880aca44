"""``quantize``: post-training quantization of conv / linear layers into the ONNX QDQ form.

For each selected layer ``y = conv(x, W) + b``:

* weights, per output channel ``c``: ``W_c ~ s_c * q_c`` with ``q_c = clip(round(W_c / s_c), -Q, Q)``,
  ``s_c = max|W_c| / Q`` and ``Q = 2^(b-1) - 1`` (int8: 127, int4: 7), stored as an int8 constant
  read through ``dequantize_linear(axis=0)``;
* activations, per tensor: ``x ~ s_x * clip(round(x / s_x), -128, 127)`` with ``s_x`` from an
  observer over the calibration data (``minmax``, ``percentile`` or ``mse``; see
  :mod:`qcompile.quantize.numerics`), as ``quantize_linear -> dequantize_linear`` on the layer's
  input.  A value read by several layers gets one pair; other readers keep the float value;
* bias correction (Nagel et al. 2019): the weight rounding error shifts the mean output by
  ``E[conv(x, W_q)] - E[conv(x, W)] = -E[conv(x, W - W_q)]``; that is measured per output channel
  on the calibration inputs and added back through the bias (a bias is added if the layer had
  none);
* mixed precision: ``int4=PATTERN`` forces 4-bit weights on matching layers; ``size=F`` picks 4-bit
  layers automatically so that the weights take at most ``F`` times their all-int8 bytes: layers are
  taken in increasing order of output-error increase per byte saved (the relative output error of
  int4 vs int8 weights, measured on calibration inputs).

Layers whose weight is already ``dequantize_linear`` of constants (fitted on the grid by ``qaf``)
keep that weight: only their activation gets the QDQ pair (and no bias correction: there is no
float weight whose rounding shift to correct); they are not candidates for ``int4`` / ``size``.

The result is a standard QDQ graph: the torch reference runs it in float (exactly what the integers
mean), onnxruntime runs it as QDQ, and the TVM backend lowers each ``dequantize -> conv`` to
int8 x int8 -> int32 arithmetic.  Factorized layers are quantized factor by factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import PreconditionError
from qcompile.factorize.layers import matches, capture, targets, weight_and_bias
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import Pass, PassContext, PassResult
from qcompile.quantize import numerics as qn

CALIBRATION_LIMIT = 256
"""At most this many calibration feeds are used for observers and bias correction."""


@dataclass(frozen=True)
class QuantizeOptions:
    weight_bits: int = field(default=8, metadata={"doc": "weight bits for layers not chosen for int4 (8 or 4)"})
    act_bits: int = field(default=8, metadata={"doc": "activation bits (8), or 0 for weight-only quantization"})
    observer: str = field(default="percentile", metadata={"doc": "activation range: minmax, percentile or mse"})
    percentile: float = field(default=99.99, metadata={"doc": "clipping percentile of |x| for observer=percentile"})
    layers: str = field(default="*", metadata={"doc": "fnmatch pattern(s, '|'-separated) of layers to quantize"})
    exclude: str = field(default="", metadata={"doc": "pattern of layers to leave in float"})
    int4: str = field(default="", metadata={"doc": "pattern of layers whose weights get 4 bits"})
    size: float = field(default=0.0, metadata={
        "doc": "mixed precision: weight bytes at most this fraction of all-int8 (0.5..1; 0 = off)"})
    bias_correction: bool = field(default=True, metadata={"doc": "correct the mean output shift of rounded weights"})
    reduce_range: bool = field(default=False, metadata={
        "doc": "8-bit weights on a 7-bit grid (+-63), for int8 kernels that add byte products in int16 "
               "(onnxruntime's u8s8 kernels on CPUs without VNNI saturate otherwise)"})


class Quantize(Pass):
    name = "quantize"
    Options = QuantizeOptions
    exact = False
    summary = "post-training int8/int4 quantization (per-channel weights, calibrated activations) as QDQ"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        self._check_options()
        nodes = targets(graph, ("conv2d", "linear"), o.layers, o.exclude)
        kept = _weight_quantized(graph, o.layers, o.exclude) if o.act_bits else []
        if not nodes and not kept:
            return PassResult(graph, False, {"quantized": 0})
        needs_data = o.act_bits or o.bias_correction or o.size
        if needs_data and not ctx.calibration:
            raise PreconditionError(
                f"pass '{self.name}' calibrates activation ranges and bias corrections on real inputs and needs "
                f"calibration data: pass --calib FILE, use a model with calibration_data(), or set act_bits=0, "
                f"bias_correction=false")
        feeds = list(ctx.calibration or [])[:CALIBRATION_LIMIT]
        inputs = sorted({n.inputs[0] for n in nodes + kept})
        acts = capture(graph, feeds, inputs) if needs_data else {}
        bits = self._weight_bits(graph, nodes, acts)
        scales = {v: self._act_scale(acts[v]) for v in inputs} if o.act_bits else {}
        kept_bits = {n.name: _kept_weight_bits(graph, n) for n in kept}
        qdq: dict[str, str] = {}
        for node in [n for n in graph.nodes if n.name in bits or n.name in kept_bits]:  # graph order
            x = node.inputs[0]
            if o.act_bits and x not in qdq:
                qdq[x] = _insert_qdq(graph, node, x, scales[x], o.act_bits)
            if node.name in kept_bits:
                node.inputs[0] = qdq[x]
                node.add_provenance(**{"pass": self.name, "weight_bits": kept_bits[node.name], "weights": "kept",
                                       "act_bits": o.act_bits, "act_scale": float(scales[x]),
                                       "observer": o.observer})
                continue
            self._quantize_layer(graph, node, bits[node.name], acts.get(x), qdq.get(x), scales.get(x))
        graph.remove_unused_constants()
        int4 = sorted(n for n, b in bits.items() if b == 4)
        w_bytes = sum(graph.types[n.inputs[1]].numel * bits[n.name] / 8 for n in nodes) + \
            sum(graph.types[n.inputs[1]].numel * kept_bits[n.name] / 8 for n in kept)
        return PassResult(graph, True, {"quantized": len(nodes) + len(kept), "weights_kept": len(kept),
                                        "int4_layers": int4, "weight_bytes": int(w_bytes),
                                        "activation_tensors": len(qdq)})

    # ------------------------------------------------------------------ choices
    def _check_options(self) -> None:
        o = self.options
        if o.weight_bits not in (4, 8):
            raise PreconditionError(f"quantize: weight_bits must be 4 or 8, got {o.weight_bits}")
        if o.act_bits not in (0, 8):
            raise PreconditionError(f"quantize: act_bits must be 8 or 0 (weight-only), got {o.act_bits}")
        if o.observer not in ("minmax", "percentile", "mse"):
            raise PreconditionError(f"quantize: unknown observer '{o.observer}' (minmax, percentile, mse)")
        if o.size and not 0.5 <= o.size <= 1.0:
            raise PreconditionError(
                f"quantize: size={o.size} is impossible: int4 weights take half the bytes of int8, so the "
                f"weight size can only be 0.5 .. 1.0 of all-int8")

    def _act_scale(self, x: np.ndarray) -> float:
        obs = qn.Observer(self.options.observer, 8, self.options.percentile)
        obs.observe(x)
        return obs.scale()

    def _weight_bits(self, graph: Graph, nodes: list[Node], acts: dict) -> dict[str, int]:
        o = self.options
        bits = {n.name: (4 if o.int4 and matches(n.name, o.int4) else o.weight_bits) for n in nodes}
        if not o.size:
            return bits
        numel = {n.name: graph.types[n.inputs[1]].numel for n in nodes}
        budget = o.size * sum(numel.values())  # bytes; all-int8 = one byte per weight
        used = sum(numel[k] * b / 8 for k, b in bits.items())
        cost = []
        for n in nodes:
            if bits[n.name] == 8:
                e8, e4 = (_output_error(graph, n, acts[n.inputs[0]], b) for b in (8, 4))
                cost.append(((e4 - e8) / (numel[n.name] / 2), n.name))
        for _, name in sorted(cost):
            if used <= budget:
                break
            bits[name] = 4
            used -= numel[name] / 2
        return bits

    # ------------------------------------------------------------------ rewrite
    def _quantize_layer(self, graph: Graph, node: Node, bits: int, x: np.ndarray | None,
                        x_dq: str | None, x_scale: float | None) -> None:
        w, b = weight_and_bias(graph, node)
        grid = 7 if bits == 8 and self.options.reduce_range else bits
        q, s = _per_channel(w, grid)
        entry = {"pass": self.name, "weight_bits": grid, "act_bits": self.options.act_bits}
        if self.options.bias_correction and x is not None:
            shift = _mean_output(node, x, w - qn.dequantize(q, s, axis=0))
            b = (np.zeros(w.shape[0], np.float32) if b is None else b) + shift
            entry["bias_correction_max"] = round(float(np.abs(shift).max()), 6)
        if x_scale is not None:
            entry.update(act_scale=float(x_scale), observer=self.options.observer)
        ins = [x_dq or node.inputs[0], dequantized_weight(graph, node, q, s, bits)]
        if b is not None:
            ins.append(graph.add_constant(node.inputs[2] if len(node.inputs) > 2 and node.inputs[2]
                                          else node.name + ".bias", np.asarray(b, np.float32)))
        node.inputs = ins
        node.add_provenance(**entry)


def _weight_quantized(graph: Graph, layers: str, exclude: str) -> list[Node]:
    """Selected conv / linear layers whose weight is already ``dequantize_linear`` of constants
    (e.g. fitted on the grid by ``qaf``) and whose input is not quantized yet: their weights are
    kept as they are; only their activation is quantized (no bias correction: there is no float
    weight to correct towards)."""
    prod = graph.producers()
    out = []
    for n in graph.nodes:
        if n.op not in ("conv2d", "linear") or not matches(n.name, layers) or (exclude and matches(n.name, exclude)):
            continue
        dq, x = prod.get(n.inputs[1]), prod.get(n.inputs[0])
        if dq is None or dq.op != "dequantize_linear" or not all(v in graph.constants for v in dq.inputs if v):
            continue
        if any(v and v not in graph.constants for v in n.inputs[2:]) or (x is not None and x.op == "dequantize_linear"):
            continue
        out.append(n)
    return out


def _kept_weight_bits(graph: Graph, node: Node) -> int:
    """The grid width of an already quantized weight: as recorded by the pass that quantized it
    (e.g. 6 for ``qaf{bits=6}``), else the ``dequantize_linear`` storage width."""
    for entry in reversed(node.meta.get("provenance", [])):
        if "weight_bits" in entry:
            return int(entry["weight_bits"])
    return int(graph.producers()[node.inputs[1]].attrs["bits"])


def dequantized_weight(graph: Graph, node: Node, q: np.ndarray, s: np.ndarray, bits: int) -> str:
    """Store ``q`` (int8) and ``s`` (one scale per output channel) as constants and insert
    ``dequantize_linear(q, s, axis=0, bits)`` before ``node``; returns the value to use as its weight."""
    wq = graph.add_constant(node.inputs[1] + "_q", q)
    ws = graph.add_constant(node.inputs[1] + "_scale", np.asarray(s, np.float32))
    dq = graph.make_node("dequantize_linear", [wq, ws], {"axis": 0, "bits": bits}, name=node.name + "/dequantize_w")
    graph.insert_before(node, [dq])
    return dq.outputs[0]


def _per_channel(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, s)``: ``w`` on the symmetric ``bits``-bit grid with one scale per output channel."""
    s = qn.per_channel_scales(w, bits)
    return qn.quantize(w, s, bits, axis=0).astype(np.int8), s


def _insert_qdq(graph: Graph, first_reader: Node, x: str, scale: float, bits: int) -> str:
    s = graph.add_constant(x + "_act_scale", np.array(scale, np.float32))
    q = graph.make_node("quantize_linear", [x, s], {"dtype": "int8", "bits": bits}, name=x + "/quantize")
    dq = graph.make_node("dequantize_linear", [q.outputs[0], s], {"bits": bits}, name=x + "/dequantize")
    graph.insert_before(first_reader, [q, dq])
    return dq.outputs[0]


def _apply(node: Node, x, w):
    """The layer's linear part (no bias) on float64 torch tensors."""
    import torch
    import torch.nn.functional as F

    from qcompile.backends.torch_backend import _conv2d

    x = torch.as_tensor(x, dtype=torch.float64)
    w = torch.as_tensor(np.asarray(w), dtype=torch.float64)
    if node.op == "conv2d":
        return _conv2d([x, w], node.attrs)
    return F.linear(x, w)


def _mean_output(node: Node, x: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """``E[layer(x; dW)]`` per output channel over batch and positions.  The layer is linear in
    ``x``, so the batch mean goes inside: one evaluation on the mean input."""
    import torch

    with torch.no_grad():
        y = _apply(node, x.mean(axis=0, keepdims=True), dw)
    axes = tuple(i for i in range(y.dim()) if i != (1 if node.op == "conv2d" else y.dim() - 1))
    return y.mean(dim=axes).numpy().astype(np.float32)


def _output_error(graph: Graph, node: Node, x: np.ndarray, bits: int, samples: int = 32) -> float:
    """Relative L2 error of the layer's output with ``bits``-bit per-channel weights."""
    import torch

    w, _ = weight_and_bias(graph, node)
    wq = qn.dequantize(*_per_channel(w, bits), axis=0)
    with torch.no_grad():
        ref, got = _apply(node, x[:samples], w), _apply(node, x[:samples], wq)
    return float(torch.linalg.norm(ref - got) / max(float(torch.linalg.norm(ref)), 1e-30))
