"""The configuration space of a compression search: a model-level prune ratio and per-layer choices.

Every conv2d / linear layer with constant weights (``layers`` / ``exclude`` patterns as in the
passes) gets a list of :class:`LayerConfig` choices:

* ``fp32`` — kept as it is;
* ``int8`` / ``int4`` — per-channel weights on the 8/4-bit grid (``quantize``), activations at
  ``act_bits`` (8, or 0 for weight-only); ``reduce_range`` puts int8 weights on the 7-bit grid (the
  ``layer-config`` option of that name, for onnxruntime on CPUs without VNNI);
* ``tucker2[ro x ri]`` — Tucker-2 factor chain (k x k convs only) at a few ranks spread over the
  ranks that reduce MACs (``ranks_per_layer``), optionally followed by ``+int8`` on every factor.

Prune ratio is a *model-level* choice (it changes the shapes every layer sees).  For every ratio
``r < 1`` of ``prune_ratios`` the model is pruned once, before any per-layer choice, by the
``prune-channels`` pass with ``macs=r`` and ``criterion=prune_criterion`` and the calibration feeds
in its context (``prune_options``: its other options, e.g. ``min_keep``):
:meth:`SearchSpace.prune_pipeline` gives that pass's text, and running it on the same graph with the
same feeds reproduces the pruned model exactly.  The pass keeps at
most ``r`` of the conv/linear MACs with one keep ratio for every channel group, in multiples of its
``multiple``, so on a small model neighbouring ratios may prune to the same model
(:attr:`SearchSpace.prune_stats` has the MAC ratio each reached).  Layer names survive pruning.
With ``prune_recovery`` (pipeline text of a training pass, e.g. ``finetune{data=mnist,epochs=5}`` or
``distill{epochs=8}``) every pruned model is recovered right after pruning by that pass, with
``teacher`` as the pass context's original model (the model before ``fold-bn``, so that replaying
``fold-bn,dead-code,prune-channels{...},finetune{...}`` from the loaded model gives the same weights)
and ``recovery_feeds`` (default: the calibration feeds) as its calibration, which ``distill`` trains
on: pruning then happens *before* the per-layer choices, and the proxy and the accuracy checks see
the recovered model instead of one that lost most of its accuracy to the cut.  ``pruned`` gives
models already made by ``prune_pipeline(ratio)`` (e.g. an earlier run's files), which are used
instead of pruning and training again.

``prune_progressive`` (needs ``prune_recovery``) prunes in steps: each ratio starts from the
*recovered* model of the next larger ratio below 1 and removes only the rest, ``prune-channels`` at
``macs = r_k M_0 / M_{k-1}`` (``M``: MACs of the original and of the previous step's model), then the
recovery.  ``prune_pipeline(r_k)`` is then every step down to ``r_k``, which replays from the loaded
model.  One large cut leaves a model that distillation can no longer train: RapidOCR's detector
pruned to 0.30 of its MACs at once kept a constant output (validation loss 1.21 -> 1.08), while
0.45 recovered first and then cut to 0.30 reached 0.14 (``benchmarks/RESULTS.md``).

With more than one ratio a genome starts with the ratio's index in ``prune_ratios`` (sorted,
largest first), followed by one choice index per layer.  Choices are stated for the *unpruned*
layers; :meth:`SearchSpace.decode` turns a genome into its ratio and each layer's configuration
*of the pruned layer*: bits are kept, and a Tucker-2 rank ``(R_o, R_i)`` chosen for a layer of
``O`` output channels is scaled to the ``O'`` it keeps — ``R_o' = multiple * round(R_o O' / (O
multiple))`` clamped to ``[min(multiple, O'), O']``, ``R_i' = min(I', round_up(R_o' I' / O',
multiple))`` (the ``tucker2`` pass's rank rule) — or dropped (the layer is not factorized) when
that would not reduce the pruned layer's MACs.  At ratio 1 every choice is its own configuration.
:meth:`SearchSpace.layer` with a ratio gives the pruned layer, its ``choices`` being the distinct
configurations the layer takes under that ratio.

For timing, :meth:`SearchSpace.layer_graph` builds a layer of the model pruned at a ratio under a
configuration *alone* (:func:`qcompile.factorize.layers.chain_graph`, the factors spliced in by the
``tucker2`` pass's own factorization of the pruned weights, then the ``quantize`` pass run on that
one-layer graph with synthetic calibration — the activation scale does not change the run time);
pruned shapes are new workloads of the latency cache.  :meth:`SearchSpace.build` makes the whole
pruned model under one configuration per layer for the accuracy proxy; :meth:`SearchSpace.macs`,
:meth:`SearchSpace.weight_bytes`, :meth:`SearchSpace.other_bytes` and :meth:`SearchSpace.features`
(a (layer, configuration) pair for the latency predictor) follow the pruned shapes.  Each pruned
model is held as a :class:`SearchSpace` of its own (no pruning, its layers' ``choices`` set to the
decoded configurations), which does that model's building and costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from qcompile.factorize import layers as L
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import PassContext
from qcompile.passes.layer_config import LayerConfig


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


class Decoded(NamedTuple):
    """A genome decoded: the model-level prune ratio and each layer's configuration of the pruned layer."""

    prune: float
    configs: dict[str, LayerConfig]

    def pairs(self) -> list[tuple[str, LayerConfig, float]]:
        """``(layer, configuration, prune ratio)``: the arguments of the space's per-layer methods."""
        return [(name, cfg, self.prune) for name, cfg in self.configs.items()]


class SearchSpace:
    """Prune ratios and per-layer choices over ``graph`` (run ``fold-bn`` first so every weight is a layer's)."""

    def __init__(self, graph: Graph, calibration: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                 bits: Sequence[int] = (8, 4), ranks_per_layer: int = 2, tucker_bits: Sequence[int] = (32, 8),
                 act_bits: int = 8, reduce_range: bool = False, multiple: int = 8, layers: str = "*",
                 exclude: str = "", prune_ratios: Sequence[float] = (1.0,), prune_criterion: str = "magnitude",
                 prune_options: Mapping[str, object] | None = None, prune_recovery: str = "",
                 teacher: Graph | None = None,
                 recovery_feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
                 pruned: Mapping[float, Graph] | None = None, prune_progressive: bool = False):
        ratios = sorted({float(r) for r in prune_ratios}, reverse=True)
        if not ratios or not all(0 < r <= 1 for r in ratios):
            raise ValueError(f"prune_ratios are MAC fractions in (0, 1], got {tuple(prune_ratios)}")
        self.graph = graph
        self.calibration = list(calibration or [])
        self.act_bits = act_bits
        self.reduce_range = bool(reduce_range)
        self.multiple = multiple
        self.prune_ratios = tuple(ratios)
        self.prune_criterion = prune_criterion
        self.prune_options = dict(prune_options or {})
        if prune_recovery:
            from qcompile.passes import parse_pipeline

            parse_pipeline(prune_recovery)  # a typo fails here, not after the first prune
        self.prune_recovery, self.teacher = prune_recovery, teacher
        if prune_progressive and not prune_recovery:
            raise ValueError("prune_progressive prunes each ratio from the previous ratio's *recovered* model: it "
                             "needs prune_recovery (e.g. 'distill{epochs=8}')")
        self.prune_progressive = bool(prune_progressive)
        self.recovery_feeds = list(recovery_feeds) if recovery_feeds is not None else None
        self._given = {float(r): g for r, g in (pruned or {}).items()}
        if set(self._given) - set(ratios):
            raise ValueError(f"pruned models given for ratios {sorted(set(self._given) - set(ratios))} that are not "
                             f"among prune_ratios {tuple(ratios)}")
        self._steps: dict[tuple[str, tuple[int, int]], list[L.Step]] = {}
        self._layer_graphs: dict[tuple[str, LayerConfig], Graph] = {}
        self.layers: list[Layer] = []
        for n in L.targets(graph, ("conv2d", "linear"), layers, exclude):
            w = graph.types[n.inputs[1]].shape
            choices = [FP32] + [LayerConfig(b) for b in bits]
            for rank in self._tucker_ranks(n, ranks_per_layer):
                choices += [LayerConfig(b, rank) for b in tucker_bits]
            self.layers.append(Layer(n.name, n.op, choices, L.node_macs(graph, n), tuple(w)))
        # per ratio below 1: the pruned model (a space of its own) and, per layer, what each choice becomes
        self._pruned: dict[float, SearchSpace] = {}
        self.prune_stats: dict[float, dict] = {}
        self.prune_records: dict[float, list] = {}  # the PassRecords of each ratio's prune (+ fine-tune) pipeline
        self._decoded: dict[float, list[list[LayerConfig]]] = {1.0: [list(la.choices) for la in self.layers]}
        for r in self.prune_ratios:
            if r < 1.0:
                self._prune(r, act_bits=act_bits, reduce_range=reduce_range, multiple=multiple, layers=layers,
                            exclude=exclude)

    def _prune(self, ratio: float, **options) -> None:
        from qcompile.passes import PassManager, parse_pipeline

        if ratio in self._given:
            graph, records = self._given[ratio], []
            stats = {"mac_ratio": L.compute_macs(graph) / max(L.compute_macs(self.graph), 1), "given": True}
        else:
            prev = self._previous(ratio)
            start = self._pruned[prev].graph if prev else self.graph
            step = self._prune_step(ratio) if prev else self.prune_pipeline(ratio)
            if step:
                pm = PassManager(parse_pipeline(step))
                feeds = self.recovery_feeds if self.recovery_feeds is not None else self.calibration
                ctx = PassContext(calibration=feeds or None, original=self.teacher)
                graph, records = pm.run(start, ctx), list(pm.records)
                stats = {**records[0].stats, "mac_ratio": L.compute_macs(graph) / max(L.compute_macs(self.graph), 1)}
            else:  # the previous step is already within this ratio
                graph, records = start, []
                stats = {"mac_ratio": L.compute_macs(graph) / max(L.compute_macs(self.graph), 1), "same_as": prev}
            if prev:
                stats["from_ratio"] = prev
        pruned = SearchSpace(graph, self.calibration, bits=(), ranks_per_layer=0, **options)
        if [la.name for la in pruned.layers] != [la.name for la in self.layers]:
            raise RuntimeError(f"prune-channels (macs={ratio}) changed the searched layers: "
                               f"{[la.name for la in self.layers]} -> {[la.name for la in pruned.layers]}")
        self._pruned[ratio] = pruned
        self.prune_stats[ratio] = stats
        self.prune_records[ratio] = records
        self._decoded[ratio] = [[self._scaled(c, la, pruned.layer(la.name), pruned.graph) for c in la.choices]
                                for la in self.layers]
        for la, decoded in zip(pruned.layers, self._decoded[ratio]):
            la.choices = list(dict.fromkeys(decoded))

    def _scaled(self, cfg: LayerConfig, full: Layer, pruned: Layer, graph: Graph) -> LayerConfig:
        """``cfg`` of the unpruned layer ``full`` as a configuration of ``pruned`` (module docstring)."""
        if not cfg.rank:
            return cfg
        from qcompile.factorize.ranks import round_up
        from qcompile.passes.tucker2 import Tucker2

        m = self.multiple
        o, i = pruned.weight_shape[:2]
        r_o = min(o, max(min(m, o), m * round(cfg.rank[0] * o / (full.weight_shape[0] * m))))
        rank = (r_o, min(i, round_up(r_o * i / o, m)))
        if Tucker2(multiple=m).macs_of(graph, graph.node(pruned.name), rank) >= pruned.macs:
            return LayerConfig(cfg.bits)
        return LayerConfig(cfg.bits, rank)

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
    def prune_pipeline(self, ratio: float) -> str:
        """The pipeline text that prunes ``graph`` as this space does at ``ratio`` ("" for 1.0), followed by
        its recovery pass when the space has one; run it with the space's recovery feeds (default: its
        calibration feeds) in the pass context, and the loaded model as the pipeline's input (the
        recovery's teacher), to reproduce the pruned model.  With ``prune_progressive``: every step from the
        largest ratio down to ``ratio``."""
        if ratio >= 1.0:
            return ""
        prev = self._previous(ratio)
        if prev:
            return ",".join(t for t in (self.prune_pipeline(prev), self._prune_step(ratio)) if t)
        return self._prune_text(ratio)

    def _prune_text(self, macs: float) -> str:
        """``prune-channels`` keeping ``macs`` of its input's MACs, then the recovery (if any)."""
        from qcompile.passes.pipeline import format_value

        options = {"macs": float(macs), "criterion": self.prune_criterion, **self.prune_options}
        text = "prune-channels{" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + "}"
        return text + ("," + self.prune_recovery if self.prune_recovery else "")

    def _previous(self, ratio: float) -> float | None:
        """With ``prune_progressive``: the next larger ratio below 1 (the model ``ratio`` is pruned from)."""
        if not self.prune_progressive:
            return None
        larger = [r for r in self.prune_ratios if ratio < r < 1.0]
        return min(larger) if larger else None

    def _prune_step(self, ratio: float) -> str:
        """Progressive pruning: the text that takes the previous ratio's model to ``ratio`` ("" when that
        model is already within it); the previous model must exist."""
        prev = self._pruned[self._previous(ratio)].graph
        rel = ratio * L.compute_macs(self.graph) / max(L.compute_macs(prev), 1)
        return self._prune_text(rel) if rel < 1.0 else ""

    def _at(self, ratio: float) -> "SearchSpace":
        """The space whose ``graph`` is the model pruned at ``ratio`` (this one for 1.0)."""
        if ratio == 1.0:
            return self
        if ratio not in self._pruned:
            raise ValueError(f"prune ratio {ratio} is not one of this space's {self.prune_ratios}")
        return self._pruned[ratio]

    def pruned_graph(self, ratio: float) -> Graph:
        """The model pruned at ``ratio`` (``graph`` itself for 1.0; do not mutate)."""
        return self._at(ratio).graph

    def layer(self, name: str, ratio: float = 1.0) -> Layer:
        """The layer as it is in the model pruned at ``ratio`` (shape, MACs, the configurations it can take)."""
        return next(la for la in self._at(ratio).layers if la.name == name)

    def pairs(self) -> list[tuple[str, LayerConfig, float]]:
        """Every distinct ``(layer, configuration, prune ratio)`` the genomes can decode to."""
        return [(la.name, c, r) for r in self.prune_ratios for la in self._at(r).layers for c in la.choices]

    @property
    def size(self) -> int:
        """Number of (layer, configuration) pairs over every prune ratio: what measuring every candidate
        would time."""
        return len(self.pairs())

    @property
    def upper(self) -> np.ndarray:
        """The largest value of each genome variable (the lowest is 0): the prune-ratio index when there
        is more than one ratio, then one choice index per layer."""
        ratio = [len(self.prune_ratios) - 1] if len(self.prune_ratios) > 1 else []
        return np.array(ratio + [len(la.choices) - 1 for la in self.layers], dtype=int)

    def genome(self, ratio: float, choices: Sequence[int]) -> tuple[int, ...]:
        """The genome of prune ``ratio`` with ``choices`` (one index per layer into ``layer(name).choices``)."""
        if ratio not in self.prune_ratios:
            raise ValueError(f"prune ratio {ratio} is not one of this space's {self.prune_ratios}")
        head = (self.prune_ratios.index(ratio),) if len(self.prune_ratios) > 1 else ()
        return head + tuple(int(i) for i in choices)

    def decode(self, genome: Sequence[int]) -> Decoded:
        """The prune ratio of ``genome`` and each layer's configuration of the layer pruned at that ratio."""
        genome = [int(v) for v in genome]
        if len(self.prune_ratios) > 1:
            ratio, genome = self.prune_ratios[genome[0]], genome[1:]
        else:
            ratio = self.prune_ratios[0]
        decoded = self._decoded[ratio]
        return Decoded(ratio, {la.name: decoded[k][i] for k, (la, i) in enumerate(zip(self.layers, genome))})

    # ------------------------------------------------------------------ graphs
    def _factor_steps(self, graph: Graph, node: Node, rank: tuple[int, int]) -> list[L.Step]:
        key = (node.name, rank)
        if key not in self._steps:
            from qcompile.passes.tucker2 import Tucker2

            self._steps[key] = Tucker2(rank=max(rank)).factorize(graph, node, rank, PassContext())[0]
        return self._steps[key]

    def _apply(self, graph: Graph, configs: Mapping[str, LayerConfig], calibration, bias_correction: bool) -> Graph:
        """The ``layer-config`` pass's rewrite, with this space's memoised Tucker-2 factors."""
        from qcompile.passes.layer_config import apply_layer_configs

        return apply_layer_configs(graph, configs, PassContext(calibration=calibration), act_bits=self.act_bits,
                                   bias_correction=bias_correction, reduce_range=self.reduce_range,
                                   factor_steps=lambda g, n, r: self._factor_steps(self.graph, self.graph.node(n.name), r))

    def layer_graph(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> Graph:
        """The layer of the model pruned at ``ratio`` alone (its input as the graph input) under ``cfg``
        (a configuration of that pruned layer), for timing."""
        space = self._at(ratio)
        key = (name, cfg)
        if key not in space._layer_graphs:
            from qcompile.frontends import synthetic_feeds

            g = L.chain_graph(space.graph, [space.graph.node(name)])
            space._layer_graphs[key] = space._apply(g, {name: cfg}, synthetic_feeds(g, 2), bias_correction=False)
        return space._layer_graphs[key]

    def build(self, configs: Mapping[str, LayerConfig], ratio: float = 1.0) -> Graph:
        """The whole model pruned at ``ratio`` with every layer under its configuration (missing layers: fp32)."""
        space = self._at(ratio)
        return space._apply(space.graph.clone(), {k: v for k, v in configs.items() if v != FP32}, self.calibration,
                            bias_correction=True)

    def outputs(self, decoded: Decoded | None) -> list[np.ndarray]:
        """The outputs of the model under ``decoded`` (None: the original) on every calibration feed, by the
        reference interpreter, batched: what the search's proxy error compares."""
        graph = self.graph if decoded is None else self.build(decoded.configs, decoded.prune)
        got = L.capture(graph, self.calibration, graph.outputs)
        return [got[v] for v in graph.outputs]

    # ------------------------------------------------------------------ costs and features
    def weight_bytes(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> float:
        la = self.layer(name, ratio)
        if cfg.rank:
            o, i = la.weight_shape[:2]
            k = int(np.prod(la.weight_shape[2:]))
            numel = i * cfg.rank[1] + cfg.rank[1] * cfg.rank[0] * k + cfg.rank[0] * o
        else:
            numel = la.weight_numel
        return numel * cfg.bits / 8

    def macs(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> int:
        """MACs of the layer under ``cfg`` (Tucker-2: the chain's analytic count; no graph is built)."""
        if not cfg.rank:
            return self.layer(name, ratio).macs
        from qcompile.passes.tucker2 import Tucker2

        graph = self.pruned_graph(ratio)
        return int(Tucker2().macs_of(graph, graph.node(name), cfg.rank))

    def other_bytes(self, ratio: float = 1.0) -> float:
        """Bytes of every constant of the model pruned at ``ratio`` that is not a searched layer's weight
        (biases, BN, ...)."""
        space = self._at(ratio)
        weights = {space.graph.node(la.name).inputs[1] for la in space.layers}
        return float(sum(space.graph.types[c].nbytes for c in space.graph.constants if c not in weights))

    FEATURES = ("log_macs", "log_weight_bytes", "bits", "rank_ratio", "factor_nodes", "log_in_numel",
                "log_out_numel", "kernel_area", "is_linear", "act_quantized")

    def features(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> np.ndarray:
        la = self.layer(name, ratio)
        graph = self.pruned_graph(ratio)
        node = graph.node(name)
        o, i = la.weight_shape[:2]
        rank_ratio = (cfg.rank[0] * cfg.rank[1]) / (o * i) if cfg.rank else 1.0
        return np.array([
            np.log1p(self.macs(name, cfg, ratio)), np.log1p(self.weight_bytes(name, cfg, ratio)), cfg.bits,
            rank_ratio, 3 if cfg.rank else 1, np.log1p(graph.types[node.inputs[0]].numel),
            np.log1p(graph.types[node.outputs[0]].numel), int(np.prod(la.weight_shape[2:])) if la.op == "conv2d" else 1,
            float(la.op == "linear"), float(cfg.bits != 32 and self.act_bits > 0)], dtype=np.float64)
