"""One search across the several models of a pipeline: one latency budget, one end-to-end metric.

After "Automated Heterogeneous Low-Bit Quantization of Multi-Model Deep Learning Inference
Pipelines": the models of a pipeline (detector -> classifier -> recognizer, an ensemble, a cascade)
are not compressed one by one against per-model budgets; their layers form **one genome**, so bits,
ranks and factorizations are allocated heterogeneously across models where the end-to-end
accuracy tolerates it and the end-to-end latency gains most.

* :class:`PipelineSpace` joins per-model :class:`~qcompile.search.space.SearchSpace`\\ s (no pruning
  inside pipelines yet): layer ``m/l`` is layer ``l`` of model ``m``; a (layer, configuration) pair is
  timed alone on the target through the shared workload-keyed cache, exactly as for one model.
* The proxy error is end to end: ``run(models)`` — the pipeline's own host code (the *glue*), given one
  callable per model (``feed batch -> outputs``) — returns the pipeline's outputs on its calibration
  inputs, compared with the original pipeline's (relative L2).
* Latency objective: the sum over models of their per-layer latencies (models run one after the
  other); memory: the weight bytes of all models.
* Finalists (:func:`evaluate`): every front point's end-to-end ``metric`` (e.g. accuracy on labelled
  validation data, computed by the glue with the compressed models); of those within
  ``max_metric_drop``, a few are timed end to end — every model once per pipeline call, in sequence,
  on the target — interleaved with the original pipeline on the target and on onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import SearchError
from qcompile.ir.graph import Graph
from qcompile.search.finalists import PREPARE, Finalist, pick, time_finalists
from qcompile.search.nsga import Point, SearchResult
from qcompile.search.space import Decoded, Layer, LayerConfig, SearchSpace

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


class PipelineSpace:
    """The per-layer choices of every model of a pipeline as one space (the protocol nsga.search uses)."""

    prune_ratios = (1.0,)

    def __init__(self, spaces: Mapping[str, SearchSpace], run: Glue):
        if not spaces:
            raise ValueError("a pipeline needs at least one model")
        for m, sp in spaces.items():
            if SEP in m:
                raise ValueError(f"pipeline model name '{m}' must not contain '{SEP}'")
            if sp.prune_ratios != (1.0,):
                raise ValueError(f"model '{m}': pruning inside a pipeline search is not supported yet "
                                 "(prune_ratios must be (1.0,))")
        self.spaces = dict(spaces)
        self.run = run
        self.layers = [Layer(f"{m}{SEP}{la.name}", la.op, la.choices, la.macs, la.weight_shape)
                       for m, sp in self.spaces.items() for la in sp.layers]
        self._by_name = {la.name: la for la in self.layers}

    def _split(self, name: str) -> tuple[SearchSpace, str]:
        model, _, layer = name.partition(SEP)
        return self.spaces[model], layer

    # ------------------------------------------------------------------ genome
    def layer(self, name: str, ratio: float = 1.0) -> Layer:
        return self._by_name[name]

    def pairs(self) -> list[tuple[str, LayerConfig, float]]:
        return [(la.name, c, 1.0) for la in self.layers for c in la.choices]

    @property
    def size(self) -> int:
        return len(self.pairs())

    @property
    def upper(self) -> np.ndarray:
        return np.array([len(la.choices) - 1 for la in self.layers], dtype=int)

    def genome(self, ratio: float, choices: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(i) for i in choices)

    def decode(self, genome: Sequence[int]) -> Decoded:
        return Decoded(1.0, {la.name: la.choices[int(i)] for la, i in zip(self.layers, genome)})

    def per_model(self, configs: Mapping[str, LayerConfig]) -> dict[str, dict[str, LayerConfig]]:
        out: dict[str, dict[str, LayerConfig]] = {m: {} for m in self.spaces}
        for name, cfg in configs.items():
            model, _, layer = name.partition(SEP)
            out[model][layer] = cfg
        return out

    # ------------------------------------------------------------------ models, costs
    def build_models(self, configs: Mapping[str, LayerConfig]) -> dict[str, Graph]:
        return {m: self.spaces[m].build(c) for m, c in self.per_model(configs).items()}

    def outputs(self, decoded: Decoded | None) -> list[np.ndarray]:
        graphs = ({m: sp.graph for m, sp in self.spaces.items()} if decoded is None
                  else self.build_models(decoded.configs))
        return [np.asarray(o) for o in self.run({m: reference_fn(g) for m, g in graphs.items()})]

    def layer_graph(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> Graph:
        sp, layer = self._split(name)
        return sp.layer_graph(layer, cfg)

    def features(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> np.ndarray:
        sp, layer = self._split(name)
        return sp.features(layer, cfg)

    def weight_bytes(self, name: str, cfg: LayerConfig, ratio: float = 1.0) -> float:
        sp, layer = self._split(name)
        return sp.weight_bytes(layer, cfg)

    def other_bytes(self, ratio: float = 1.0) -> float:
        return sum(sp.other_bytes() for sp in self.spaces.values())

    def pipelines(self, point: Point) -> dict[str, str]:
        """Per model, the pipeline text that rebuilds it as in ``point``."""
        from qcompile.passes.layer_config import format_configs

        out = {}
        for m, configs in self.per_model({n: LayerConfig.parse(c) for n, c in point.configs.items()}).items():
            text = format_configs(configs)
            act = "" if self.spaces[m].act_bits == 8 else f",act_bits={self.spaces[m].act_bits}"
            out[m] = PREPARE + (f',layer-config{{configs="{text}"{act}}}' if text else "")
        return out


def allocation(space: PipelineSpace, point: Point) -> dict[str, dict[str, int]]:
    """How ``point`` spends its choices per model: layers per bit-width and factorized layers."""
    out: dict[str, dict[str, int]] = {}
    for name, label in point.configs.items():
        cfg = LayerConfig.parse(label)
        row = out.setdefault(name.partition(SEP)[0], {"fp32": 0, "int8": 0, "int4": 0, "tucker2": 0})
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
             ) -> tuple[list[Finalist], float, dict, list[float | None]]:
    """(finalists, original metric, timing of the original pipeline, metric of each front point).

    ``metric(models)`` is the pipeline's end-to-end quality (higher is better, e.g. accuracy in percent)
    with the given model callables.  It runs whole pipelines, so it is computed for at most ``max_points``
    front points spread over the predicted latency (None for the others).  ``Finalist.pipeline`` holds the
    per-model pipeline texts as JSON."""
    from qcompile.factorize.latency import runner_for

    if not result.front:
        raise SearchError(f"the search found no feasible point: {result.message}")
    base = metric({m: reference_fn(g) for m, g in models.graphs.items()})
    built = {}
    for p in pick(result.front, max_points):
        graphs = space.build_models({n: LayerConfig.parse(c) for n, c in p.configs.items()})
        built[id(p)] = (graphs, metric({m: reference_fn(g) for m, g in graphs.items()}))
    front_metric = [built[id(p)][1] if id(p) in built else None for p in result.front]
    within = [p for p in result.front if id(p) in built and base - built[id(p)][1] <= max_metric_drop]
    if not within:
        best = max(v for v in front_metric if v is not None)
        raise SearchError(f"no point of the pipeline's front keeps the end-to-end metric within {max_metric_drop:g} "
                          f"of the original's {base:.2f}: the best front point reaches {best:.2f}")
    chosen = pick(within, count)

    def pipeline_run(graphs: Mapping[str, Graph], backend: str):
        fns = [runner_for(g, backend, feed=models.calibration[m][0]) for m, g in graphs.items()]

        def run():
            for fn in fns:
                fn()
        return run

    values = [built[id(p)][1] for p in chosen]
    out, timing = time_finalists(chosen, [pipeline_run(built[id(p)][0], target) for p in chosen],
                                 pipeline_run(models.graphs, target), pipeline_run(models.graphs, "onnxruntime"),
                                 [json.dumps(space.pipelines(p), sort_keys=True) for p in chosen], values, base,
                                 result.budget, rounds=rounds, number=number)
    return out, base, timing, front_metric
