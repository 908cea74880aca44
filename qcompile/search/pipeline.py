"""One search across the several models of a pipeline: one latency budget, one end-to-end metric.

After "Automated Heterogeneous Low-Bit Quantization of Multi-Model Deep Learning Inference
Pipelines": the models of a pipeline (detector -> classifier -> recognizer, an ensemble, a cascade)
are not compressed one by one against per-model budgets; their layers form **one genome**, so bits,
ranks and factorizations are allocated heterogeneously across models where the end-to-end
accuracy tolerates it and the end-to-end latency gains most.

* :class:`PipelineSpace` joins per-model :class:`~qcompile.search.space.SearchSpace`\\ s: layer ``m/l``
  is layer ``l`` of model ``m``; a (layer, configuration) pair is timed alone on the target through the
  shared workload-keyed cache, exactly as for one model.  A model whose space has several prune ratios
  gets a prune-ratio gene of its own (each ratio pruned, and recovered, once by its space), so a point
  prunes the models of the pipeline by different amounts: its ``prune`` is the tuple of per-model
  ratios in model order (the pairs of model ``m`` carry ``m``'s ratio).
* The proxy error is end to end: ``run(models)`` — the pipeline's own host code (the *glue*), given one
  callable per model (``feed batch -> outputs``) — returns the pipeline's outputs on its calibration
  inputs, compared with the original pipeline's (relative L2).
* Latency objective: the sum over models of their per-layer latencies (models run one after the
  other); memory: the weight bytes of all models.
* Models that run several times per pipeline call (a recognizer once per detected line) and the
  quantize/dequantize boundaries a layer timed alone pays (a whole integer model does not):
  :class:`WeightedLatencyCache` multiplies each measured pair by a per-model factor — calls per
  pipeline run times, for quantized layers, that model's anchor scale (:func:`anchor_factors`).
* Finalists (:func:`evaluate`): every front point's end-to-end ``metric`` (e.g. accuracy on labelled
  validation data, computed by the glue with the compressed models); of those within
  ``max_metric_drop``, a few are timed end to end — by default every model once per pipeline call, in
  sequence; with ``time_run``, the pipeline's real glue over real inputs — on the target, interleaved
  with the original pipeline on the target and on onnxruntime.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from qcompile.errors import SearchError
from qcompile.factorize.latency import timing_clock
from qcompile.ir.graph import Graph
from qcompile.search.finalists import PREPARE, Finalist, pick, time_finalists
from qcompile.search.nsga import Point, SearchResult
from qcompile.search.space import FP32, Decoded, Layer, LayerConfig, SearchSpace

ModelFn = Callable[[Mapping[str, np.ndarray]], list]
Glue = Callable[[Mapping[str, ModelFn]], Sequence[np.ndarray]]
Metric = Callable[[Mapping[str, ModelFn]], float]
SEP = "/"


def reference_fn(graph: Graph) -> ModelFn:
    """``feed batch -> outputs`` of ``graph`` by the reference interpreter (any batch size)."""
    import torch

    from qcompile.backends.torch_backend import to_torch

    module = to_torch(graph, trainable=False).eval()

    def run(feed: Mapping[str, np.ndarray]) -> list:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[n], dtype=np.float32)) for n in graph.inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outs]
    return run


def target_fn(graph: Graph, backend: str, threads: int | None = None) -> ModelFn:
    """``feed batch -> outputs`` of ``graph`` compiled for ``backend`` (onnxruntime or tvm-*), at the graph's
    static shapes, with ``threads`` runtime threads (default: every core this process may use)."""
    from qcompile.factorize.latency import compiled_runner

    runner = compiled_runner(graph, backend, threads)

    def run(feed: Mapping[str, np.ndarray]) -> list:
        return runner.run({n: np.ascontiguousarray(feed[n], dtype=np.float32) for n in graph.inputs})
    return run


class PipelineSpace:
    """The per-model prune ratios and per-layer choices of every model of a pipeline as one space (the
    protocol nsga.search uses).

    Genome: one ratio index per model that has more than one prune ratio (model order), then one choice
    index per layer (``layers``: every model's layers, unpruned, in model order).  A "ratio" of this
    space is either a float (what a pair carries: the ratio of the layer's own model) or a tuple of
    per-model ratios (``prune_ratios``: every combination; ``Decoded.prune`` and ``Point.prune``)."""

    def __init__(self, spaces: Mapping[str, SearchSpace], run: Glue):
        if not spaces:
            raise ValueError("a pipeline needs at least one model")
        for m in spaces:
            if SEP in m:
                raise ValueError(f"pipeline model name '{m}' must not contain '{SEP}'")
        self.spaces = dict(spaces)
        self.models = list(self.spaces)
        self.run = run
        self.layers = [Layer(f"{m}{SEP}{la.name}", la.op, la.choices, la.macs, la.weight_shape)
                       for m, sp in self.spaces.items() for la in sp.layers]
        self._by_name = {la.name: la for la in self.layers}
        self._genes = [m for m in self.models if len(self.spaces[m].prune_ratios) > 1]
        self.pruning = any(sp.prune_ratios != (1.0,) for sp in self.spaces.values())
        self.prune_ratios = (tuple(itertools.product(*(self.spaces[m].prune_ratios for m in self.models)))
                             if self.pruning else (1.0,))

    def _split(self, name: str) -> tuple[str, str]:
        model, _, layer = name.partition(SEP)
        return model, layer

    def ratio_of(self, model: str, ratio) -> float:
        """Model ``model``'s prune ratio in ``ratio`` (a per-model tuple, or one float for every model)."""
        return float(ratio[self.models.index(model)]) if isinstance(ratio, (tuple, list)) else float(ratio)

    def _layer_args(self, name: str, ratio) -> tuple[SearchSpace, str, float]:
        model, layer = self._split(name)
        return self.spaces[model], layer, self.ratio_of(model, ratio)

    # ------------------------------------------------------------------ genome
    def layer(self, name: str, ratio=1.0) -> Layer:
        sp, layer, r = self._layer_args(name, ratio)
        if r == 1.0:
            return self._by_name[name]
        la = sp.layer(layer, r)
        return Layer(name, la.op, la.choices, la.macs, la.weight_shape)

    def pairs(self) -> list[tuple[str, LayerConfig, float]]:
        return [(f"{m}{SEP}{name}", c, r) for m, sp in self.spaces.items() for name, c, r in sp.pairs()]

    @property
    def size(self) -> int:
        return len(self.pairs())

    @property
    def upper(self) -> np.ndarray:
        return np.array([len(self.spaces[m].prune_ratios) - 1 for m in self._genes]
                        + [len(la.choices) - 1 for la in self.layers], dtype=int)

    def genome(self, ratio, choices: Sequence[int]) -> tuple[int, ...]:
        head = tuple(self.spaces[m].prune_ratios.index(self.ratio_of(m, ratio)) for m in self._genes)
        return head + tuple(int(i) for i in choices)

    def decode(self, genome: Sequence[int]) -> Decoded:
        genome = [int(v) for v in genome]
        head, rest = genome[:len(self._genes)], genome[len(self._genes):]
        ratios, configs, k = [], {}, 0
        for m, sp in self.spaces.items():
            sub = ([head[self._genes.index(m)]] if m in self._genes else []) + rest[k:k + len(sp.layers)]
            k += len(sp.layers)
            d = sp.decode(sub)
            ratios.append(d.prune)
            configs.update({f"{m}{SEP}{n}": c for n, c in d.configs.items()})
        return PipelineDecoded(tuple(ratios) if self.pruning else 1.0, configs, self)

    def per_model(self, configs: Mapping[str, LayerConfig]) -> dict[str, dict[str, LayerConfig]]:
        out: dict[str, dict[str, LayerConfig]] = {m: {} for m in self.spaces}
        for name, cfg in configs.items():
            model, layer = self._split(name)
            out[model][layer] = cfg
        return out

    # ------------------------------------------------------------------ models, costs
    def build_models(self, configs: Mapping[str, LayerConfig], ratio=1.0) -> dict[str, Graph]:
        return {m: self.spaces[m].build(c, self.ratio_of(m, ratio)) for m, c in self.per_model(configs).items()}

    def outputs(self, decoded: Decoded | None) -> list[np.ndarray]:
        graphs = ({m: sp.graph for m, sp in self.spaces.items()} if decoded is None
                  else self.build_models(decoded.configs, decoded.prune))
        return [np.asarray(o) for o in self.run({m: reference_fn(g) for m, g in graphs.items()})]

    def layer_graph(self, name: str, cfg: LayerConfig, ratio=1.0) -> Graph:
        sp, layer, r = self._layer_args(name, ratio)
        return sp.layer_graph(layer, cfg, r)

    def features(self, name: str, cfg: LayerConfig, ratio=1.0) -> np.ndarray:
        sp, layer, r = self._layer_args(name, ratio)
        return sp.features(layer, cfg, r)

    def weight_bytes(self, name: str, cfg: LayerConfig, ratio=1.0) -> float:
        sp, layer, r = self._layer_args(name, ratio)
        return sp.weight_bytes(layer, cfg, r)

    def other_bytes(self, ratio=1.0) -> float:
        return sum(sp.other_bytes(self.ratio_of(m, ratio)) for m, sp in self.spaces.items())

    def pipelines(self, point: Point) -> dict[str, str]:
        """Per model, the pipeline text that rebuilds it as in ``point`` (a pruned model's text includes its
        prune and recovery passes: replay those with the space's calibration / recovery feeds)."""
        from qcompile.passes.layer_config import format_configs, option_text

        ratio = getattr(point, "prune", 1.0)
        out = {}
        for m, configs in self.per_model({n: LayerConfig.parse(c) for n, c in point.configs.items()}).items():
            text = format_configs(configs)
            act = option_text(self.spaces[m].act_bits, self.spaces[m].reduce_range)
            prune = self.spaces[m].prune_pipeline(self.ratio_of(m, ratio))
            out[m] = (PREPARE + (f",{prune}" if prune else "")
                      + (f',layer-config{{configs="{text}"{act}}}' if text else ""))
        return out


class PipelineDecoded(NamedTuple):
    """A pipeline genome decoded: ``prune`` (per-model ratios, or 1.0 when no model prunes) and every layer's
    configuration; its pairs carry each layer's own model's ratio (what the latency cache is keyed by)."""

    prune: tuple | float
    configs: dict[str, LayerConfig]
    space: "PipelineSpace"

    def pairs(self) -> list[tuple[str, LayerConfig, float]]:
        return [(name, cfg, self.space.ratio_of(name.partition(SEP)[0], self.prune))
                for name, cfg in self.configs.items()]


class WeightedLatencyCache:
    """A :class:`~qcompile.search.latency_cache.LatencyCache` whose ``measure`` returns, for keys that are
    (layer ``m/l``, configuration, ratio) pairs of a :class:`PipelineSpace`, the measured seconds times
    ``factors[(m, bits)]`` (missing: ``factors[(m, 32)]``, else 1).  The file keeps the raw per-layer times.

    Used as ``search(..., space=pipeline_space, cache=WeightedLatencyCache(raw, factors))``: the latency
    objective then is the per-layer sum *per pipeline run*, each model's layers counted as often as the
    glue calls it, quantized layers scaled to what they add inside a whole integer model."""

    def __init__(self, cache, factors: Mapping[tuple[str, int], float]):
        self.raw = cache
        self.factors = dict(factors)

    def factor(self, key) -> float:
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[1], LayerConfig)):
            return 1.0
        model = str(key[0]).partition(SEP)[0]
        return self.factors.get((model, key[1].bits), self.factors.get((model, 32), 1.0))

    def measure(self, graphs):
        return {k: t * self.factor(k) for k, t in self.raw.measure(graphs).items()}

    def __getattr__(self, name):  # hits, misses, path, backend, ... of the underlying cache
        return getattr(self.raw, name)


def anchor_factors(space: PipelineSpace, cache, calls: Mapping[str, float] | None = None
                   ) -> tuple[dict[tuple[str, int], float], dict]:
    """Per model ``m`` and weight bit-width ``b`` of the space: ``calls[m]`` (runs per pipeline call, default
    1) times, for ``b < 32``, the anchor scale ``(T_b / T_32) / (S_b / S_32)`` — T: the whole model with
    every searched layer in ``b`` bits (and fp32) timed on ``cache``'s backend, S: the sum of those layers
    timed alone (as :func:`qcompile.search.nsga._anchor_scales` does for one model).  Returns (factors, the
    measurements behind them)."""
    calls = dict(calls or {})
    factors: dict[tuple[str, int], float] = {}
    info: dict = {}
    for m, sp in space.spaces.items():
        c = float(calls.get(m, 1.0))
        factors[(m, 32)] = c
        bits = sorted({cfg.bits for la in sp.layers for cfg in la.choices if cfg.bits != 32 and not cfg.rank})
        if not sp.layers or not bits:
            continue
        uniform = {b: {la.name: LayerConfig(b) for la in sp.layers if LayerConfig(b) in la.choices} for b in bits}
        alone = cache.measure({(la.name, cfg): sp.layer_graph(la.name, cfg) for la in sp.layers
                               for cfg in [FP32] + [LayerConfig(b) for b in bits] if cfg in la.choices})
        whole = cache.measure({32: sp.build({}), **{b: sp.build(uniform[b]) for b in bits}})
        s32 = {b: sum(alone[(n, FP32)] for n in uniform[b]) for b in bits}
        for b in bits:
            sb = sum(alone[(n, cfg)] for n, cfg in uniform[b].items())
            factors[(m, b)] = c * (whole[b] / whole[32]) / (sb / s32[b])
        info[m] = {"whole_s": {str(k): v for k, v in whole.items()}, "calls": c,
                   "layers_alone_s": {"32": sum(alone[(la.name, FP32)] for la in sp.layers),
                                      **{str(b): sum(alone[(n, cfg)] for n, cfg in uniform[b].items()) for b in bits}}}
    return factors, info


def allocation(space: PipelineSpace, point: Point) -> dict[str, dict[str, int]]:
    """How ``point`` spends its choices per model: its prune ratio, layers per bit-width and factorized layers."""
    out: dict[str, dict] = {}
    for name, label in point.configs.items():
        cfg = LayerConfig.parse(label)
        model = name.partition(SEP)[0]
        row = out.setdefault(model, {"prune": space.ratio_of(model, getattr(point, "prune", 1.0)),
                                     "fp32": 0, "int8": 0, "int4": 0, "tucker2": 0})
        row["fp32" if cfg.bits == 32 else f"int{cfg.bits}"] += 1
        row["tucker2"] += bool(cfg.rank)
    return out


@dataclass
class PipelineModels:
    """The original models of a pipeline: ``graphs`` prepared (``fold-bn,dead-code``), per-model calibration
    feeds (for quantization and timing)."""

    graphs: dict[str, Graph]
    calibration: dict[str, list]


def evaluate(space: PipelineSpace, models: PipelineModels, result: SearchResult, target: str, metric: Metric, *,
             max_metric_drop: float, count: int = 4, max_points: int = 12, rounds: int = 5, number: int = 10,
             time_run: Callable[[Mapping[str, ModelFn]], object] | None = None, threads: int | None = None,
             onnxruntime_fns: Mapping[str, ModelFn] | None = None, progress: Callable[[str], None] | None = None,
             ) -> tuple[list[Finalist], float, dict, list[float | None]]:
    """(finalists, original metric, timing of the original pipeline, metric of each front point).

    ``metric(models)`` is the pipeline's end-to-end quality (higher is better, e.g. accuracy in percent)
    with the given model callables.  It runs whole pipelines, so it is computed for at most ``max_points``
    front points spread over the predicted latency (None for the others).  ``Finalist.pipeline`` holds the
    per-model pipeline texts as JSON.

    Timing: ``time_run(fns)`` — one timed call, given one callable per model compiled for the target (e.g.
    the real glue over a few real inputs, so a model runs as often as the pipeline calls it); by default
    every model once on its first calibration feed.  ``threads``: runtime threads of every compiled model
    (default: the backends' own).  ``onnxruntime_fns``: the original models as run on onnxruntime (default:
    the prepared graphs exported to ONNX)."""
    if not result.front:
        raise SearchError(f"the search found no feasible point: {result.message}")
    base = metric({m: reference_fn(g) for m, g in models.graphs.items()})
    built = {}
    checked = pick(result.front, max_points)
    for k, p in enumerate(checked):
        graphs = space.build_models({n: LayerConfig.parse(c) for n, c in p.configs.items()}, p.prune)
        built[id(p)] = (graphs, metric({m: reference_fn(g) for m, g in graphs.items()}))
        if progress:
            progress(f"end-to-end metric of front point {k + 1}/{len(checked)}: {built[id(p)][1]:.2f}")
    front_metric = [built[id(p)][1] if id(p) in built else None for p in result.front]
    within = [p for p in result.front if id(p) in built and base - built[id(p)][1] <= max_metric_drop]
    if not within:
        best = max(v for v in front_metric if v is not None)
        raise SearchError(f"no point of the pipeline's front keeps the end-to-end metric within {max_metric_drop:g} "
                          f"of the original's {base:.2f}: the best front point reaches {best:.2f}")
    chosen = pick(within, count)

    def timed(fns: Mapping[str, ModelFn]):
        if time_run is not None:
            return lambda: time_run(fns)
        return lambda: [fns[m](models.calibration[m][0]) for m in fns]

    def pipeline_run(graphs: Mapping[str, Graph], backend: str):
        if progress:
            progress(f"building the pipeline for {backend}")
        return timed({m: target_fn(g, backend, threads) for m, g in graphs.items()})

    values = [built[id(p)][1] for p in chosen]
    runs = [pipeline_run(built[id(p)][0], target) for p in chosen]
    original_target = pipeline_run(models.graphs, target)
    original_ort = (timed(onnxruntime_fns) if onnxruntime_fns is not None
                    else pipeline_run(models.graphs, "onnxruntime"))
    if progress:
        progress(f"timing {len(chosen)} finalist(s) and the original pipeline end to end, interleaved")
    out, timing = time_finalists(chosen, runs, original_target, original_ort,
                                 [json.dumps(space.pipelines(p), sort_keys=True) for p in chosen], values, base,
                                 result.budget, rounds=rounds, number=number,
                                 clock=timing_clock(target, threads) if threads else None)
    return out, base, timing, front_metric
