"""The per-layer configuration space of a compression search.

Every conv2d / linear layer with constant weights (``layers`` / ``exclude`` patterns as in the
passes) gets a list of :class:`LayerConfig` choices:

* ``fp32`` — kept as it is;
* ``int8`` / ``int4`` — per-channel weights on the 8/4-bit grid (``quantize``), activations at
  ``act_bits`` (8, or 0 for weight-only);
* ``tucker2[ro x ri]`` — Tucker-2 factor chain (k x k convs only) at a few ranks spread over the
  ranks that reduce MACs (``ranks_per_layer``), optionally followed by ``+int8`` on every factor.

Prune ratio is a *model-level* choice (it changes the shapes every layer sees):
``prune_ratios`` is the hook for it; only ``(1.0,)`` (no pruning) is searched so far.

For timing, :meth:`SearchSpace.layer_graph` builds a layer under a configuration *alone*
(:func:`qcompile.factorize.layers.chain_graph`, the factors spliced in by the ``tucker2`` pass's
own factorization, then the ``quantize`` pass run on that one-layer graph with synthetic
calibration — the activation scale does not change the run time).  :meth:`SearchSpace.build`
makes the whole model under one configuration per layer for the accuracy proxy;
:meth:`SearchSpace.features` describes a (layer, configuration) pair for the latency predictor.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from qcompile.factorize import layers as L
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import PassContext


@dataclass(frozen=True)
class LayerConfig:
    """One layer's choice: weight ``bits`` (32 = float) and an optional Tucker-2 ``rank`` (R_o, R_i)."""

    bits: int = 32
    rank: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.rank:
            parts.append(f"tucker2[{self.rank[0]}x{self.rank[1]}]")
        if self.bits != 32 or not parts:
            parts.append("fp32" if self.bits == 32 else f"int{self.bits}")
        return "+".join(parts)

    @staticmethod
    def parse(label: str) -> "LayerConfig":
        bits, rank = 32, None
        for part in label.split("+"):
            if part.startswith("tucker2["):
                ro, ri = part[len("tucker2["):-1].split("x")
                rank = (int(ro), int(ri))
            elif part.startswith("int"):
                bits = int(part[3:])
        return LayerConfig(bits, rank)


FP32 = LayerConfig()


@dataclass
class Layer:
    name: str
    op: str
    choices: list[LayerConfig]
    macs: int
    weight_shape: tuple[int, ...]
    extra: dict = field(default_factory=dict)

    @property
    def weight_numel(self) -> int:
        return int(np.prod(self.weight_shape))


class SearchSpace:
    """Per-layer choices over ``graph`` (run ``fold-bn`` first so every weight is a layer's)."""

    def __init__(self, graph: Graph, calibration: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                 bits: Sequence[int] = (8, 4), ranks_per_layer: int = 2, tucker_bits: Sequence[int] = (32, 8),
                 act_bits: int = 8, multiple: int = 8, layers: str = "*", exclude: str = "",
                 prune_ratios: Sequence[float] = (1.0,)):
        if tuple(prune_ratios) != (1.0,):
            raise NotImplementedError("model-level prune ratios are a hook of the search space; only 1.0 is "
                                      "searched so far")
        self.graph = graph
        self.calibration = list(calibration or [])
        self.act_bits = act_bits
        self.multiple = multiple
        self.prune_ratios = tuple(prune_ratios)
        self._steps: dict[tuple[str, tuple[int, int]], list[L.Step]] = {}
        self._layer_graphs: dict[tuple[str, LayerConfig], Graph] = {}
        self.layers: list[Layer] = []
        for n in L.targets(graph, ("conv2d", "linear"), layers, exclude):
            w = graph.types[n.inputs[1]].shape
            choices = [FP32] + [LayerConfig(b) for b in bits]
            for rank in self._tucker_ranks(n, ranks_per_layer):
                choices += [LayerConfig(b, rank) for b in tucker_bits]
            self.layers.append(Layer(n.name, n.op, choices, L.node_macs(graph, n), tuple(w)))

    def _tucker_ranks(self, node: Node, count: int) -> list[tuple[int, int]]:
        if count <= 0 or node.op != "conv2d" or node.attrs["group"] != 1:
            return []
        if np.prod(self.graph.types[node.inputs[1]].shape[2:]) == 1:
            return []  # a 1x1 conv factorizes into 1x1 convs: no Tucker core to gain from
        from qcompile.passes.tucker2 import Tucker2

        ranked = [c.rank for c in Tucker2(multiple=self.multiple).candidates(self.graph, node, PassContext())[1:]]
        if not ranked:
            return []
        picks = sorted({int(i) for i in np.linspace(0, len(ranked) - 1, min(count, len(ranked))).round()})
        return [tuple(ranked[i]) for i in picks]

    # ------------------------------------------------------------------ access
    def layer(self, name: str) -> Layer:
        return next(la for la in self.layers if la.name == name)

    @property
    def size(self) -> int:
        """Number of (layer, configuration) pairs: what measuring every candidate would time."""
        return sum(len(la.choices) for la in self.layers)

    def decode(self, genome: Sequence[int]) -> dict[str, LayerConfig]:
        return {la.name: la.choices[int(i)] for la, i in zip(self.layers, genome)}

    # ------------------------------------------------------------------ graphs
    def _factor_steps(self, graph: Graph, node: Node, rank: tuple[int, int]) -> list[L.Step]:
        key = (node.name, rank)
        if key not in self._steps:
            from qcompile.passes.tucker2 import Tucker2

            self._steps[key] = Tucker2(rank=max(rank)).factorize(graph, node, rank, PassContext())[0]
        return self._steps[key]

    def _apply(self, graph: Graph, configs: Mapping[str, LayerConfig], calibration, bias_correction: bool) -> Graph:
        from qcompile.passes.quantize import Quantize

        quant, int4 = [], []
        for name, cfg in configs.items():
            if cfg.rank:
                node = graph.node(name)
                L.splice(graph, node, self._factor_steps(self.graph, self.graph.node(name), cfg.rank),
                         {"pass": "tucker2", "method": "tucker2", "rank": cfg.rank, "search": cfg.label})
            if cfg.bits != 32:
                pat = glob.escape(name) + (".tucker_*" if cfg.rank else "")
                quant.append(pat)
                if cfg.bits == 4:
                    int4.append(pat)
        graph.remove_unused_constants()
        if quant:
            q = Quantize(layers="|".join(quant), int4="|".join(int4), act_bits=self.act_bits,
                         bias_correction=bias_correction and bool(calibration))
            graph = q(graph, PassContext(calibration=calibration)).graph
        return graph

    def layer_graph(self, name: str, cfg: LayerConfig) -> Graph:
        """The layer alone (its input as the graph input) under ``cfg``, for timing."""
        key = (name, cfg)
        if key not in self._layer_graphs:
            from qcompile.frontends import synthetic_feeds

            g = L.chain_graph(self.graph, [self.graph.node(name)])
            self._layer_graphs[key] = self._apply(g, {name: cfg}, synthetic_feeds(g, 2), bias_correction=False)
        return self._layer_graphs[key]

    def build(self, configs: Mapping[str, LayerConfig]) -> Graph:
        """The whole model with every layer under its configuration (missing layers: fp32)."""
        return self._apply(self.graph.clone(), {k: v for k, v in configs.items() if v != FP32}, self.calibration,
                           bias_correction=True)

    # ------------------------------------------------------------------ costs and features
    def weight_bytes(self, name: str, cfg: LayerConfig) -> float:
        la = self.layer(name)
        if cfg.rank:
            o, i = la.weight_shape[:2]
            k = int(np.prod(la.weight_shape[2:]))
            numel = i * cfg.rank[1] + cfg.rank[1] * cfg.rank[0] * k + cfg.rank[0] * o
        else:
            numel = la.weight_numel
        return numel * cfg.bits / 8

    def macs(self, name: str, cfg: LayerConfig) -> int:
        if not cfg.rank:
            return self.layer(name).macs
        return L.compute_macs(self.layer_graph(name, cfg))

    def other_bytes(self) -> float:
        """Bytes of every constant that is not a searched layer's weight (biases, BN, ...)."""
        weights = {self.graph.node(la.name).inputs[1] for la in self.layers}
        return float(sum(self.graph.types[c].nbytes for c in self.graph.constants if c not in weights))

    FEATURES = ("log_macs", "log_weight_bytes", "bits", "rank_ratio", "factor_nodes", "log_in_numel",
                "log_out_numel", "kernel_area", "is_linear", "act_quantized")

    def features(self, name: str, cfg: LayerConfig) -> np.ndarray:
        la = self.layer(name)
        node = self.graph.node(name)
        o, i = la.weight_shape[:2]
        rank_ratio = (cfg.rank[0] * cfg.rank[1]) / (o * i) if cfg.rank else 1.0
        return np.array([
            np.log1p(self.macs(name, cfg)), np.log1p(self.weight_bytes(name, cfg)), cfg.bits, rank_ratio,
            3 if cfg.rank else 1, np.log1p(self.graph.types[node.inputs[0]].numel),
            np.log1p(self.graph.types[node.outputs[0]].numel), int(np.prod(la.weight_shape[2:])) if la.op == "conv2d" else 1,
            float(la.op == "linear"), float(cfg.bits != 32 and self.act_bits > 0)], dtype=np.float64)
