"""Multi-objective compression search: NSGA-II (pymoo) over per-layer configurations.

Objectives, all minimised, of a model pruned at one of the space's prune ratios and built with one
:class:`~qcompile.search.space.LayerConfig` per layer (:class:`~qcompile.search.space.SearchSpace`):

* proxy error: relative L2 error ``||y - y_ref|| / ||y_ref||`` of the model's outputs on the
  calibration feeds (torch reference interpreter) against the original, unpruned model (pruning is
  not followed by any fine-tuning: the error says what it costs);
* latency: the sum of the layers' *measured* latencies on ``backend`` under their configurations
  (each (layer, configuration) of the pruned model built alone and timed once per workload,
  :class:`~qcompile.search.latency_cache.LatencyCache`); layers not measured yet are estimated by a
  :class:`~qcompile.search.predictor.LatencyPredictor` refit after every measurement batch;
  with ``anchor``, each bit-width's layer latencies are scaled so the uniform all-``b`` model's sum
  equals its measured whole-model latency (:func:`_anchor_scales`: layers timed alone pay
  quantize/dequantize boundaries a whole integer model does not);
* weight bytes of the searched layers plus every other constant.

Constraints (``Budget``): latency <= ``latency`` x the all-fp32 per-layer latency sum of the unpruned
model (the baseline), weight bytes <= ``memory`` x the original's, proxy error <= ``max_error``.
A point records its prune ratio (``Point.prune``); ``space.prune_pipeline(point.prune)`` is the
pipeline text that reproduces its pruned model, on which ``Point.configs`` (labels of configurations
of the pruned layers) are applied.

With ``use_predictor`` only every unpruned layer's fp32 configuration (the baseline) and
``seed_measurements`` random pairs (of any prune ratio; drawn from their own generator, so the first
population is the same with and without the predictor) are measured up front; after each
generation, the unmeasured (layer, configuration) pairs used by the current non-dominated feasible
individuals are measured (at most ``measure_per_generation``, the most used first) and the
predictor refit (``predictor``: ``ridge`` or ``gbm``).  At the end the pairs of up to ``final_points``
non-dominated points, spread over their latency, are measured and the front recomputed until those
are fully measured; unmeasured points never enter the returned front.  Without the predictor every pair of the space is
measured before the search.  The result records how many (layer, configuration) pairs, over every
prune ratio, had to be measured vs the size of the space (``measurements_saved``) and how many
distinct workloads were actually timed (cache misses; layers of equal shapes share one).

The front returned is the non-dominated set of feasible, fully measured points of every
evaluation; if no evaluated point is feasible, the result says which budget failed and the best
value reached for it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from qcompile.ir.graph import Graph
from qcompile.search.latency_cache import LatencyCache
from qcompile.search.predictor import LatencyPredictor
from qcompile.search.space import FP32, Decoded, LayerConfig, SearchSpace

Pair = tuple[str, LayerConfig, float]  # (layer, configuration of the pruned layer, prune ratio)


@dataclass(frozen=True)
class Budget:
    latency: float | None = None  # ratio of the all-fp32 per-layer latency sum
    memory: float | None = None  # ratio of the original weight bytes
    max_error: float | None = None  # proxy relative output error


@dataclass
class Point:
    """One evaluated model: the model pruned at ``prune`` (1.0 = not pruned; replay it with
    ``SearchSpace.prune_pipeline(prune)``) with every layer under ``configs[layer]``, a
    :class:`~qcompile.search.space.LayerConfig` label of the pruned layer."""

    configs: dict[str, str]
    error: float
    latency_s: float
    latency_ratio: float
    weight_bytes: float
    memory_ratio: float
    measured: bool
    prune: float = 1.0

    def objectives(self) -> tuple[float, float, float]:
        return (self.error, self.latency_s, self.weight_bytes)


@dataclass
class SearchResult:
    front: list[Point]
    feasible: bool
    message: str
    budget: Budget
    backend: str
    baseline_latency_s: float
    baseline_bytes: float
    measurements: int  # distinct workloads timed in this search (cache misses)
    space_size: int  # (layer, configuration) pairs: what measuring every candidate would time
    pairs_measured: int = 0  # pairs whose latency is measured (from the cache or timed), not predicted
    cache: dict = field(default_factory=dict)
    evaluations: int = 0  # distinct models (prune ratio, per-layer configurations) built for the proxy error
    generations: int = 0
    wall_s: float = 0.0
    best: dict = field(default_factory=dict)  # best value reached per objective (feasible or not)
    latency_scales: dict = field(default_factory=dict)  # weight bits -> anchor scale of per-layer latencies

    @property
    def measurements_saved(self) -> int:
        return self.space_size - self.pairs_measured

    def to_json(self) -> dict:
        d = asdict(self)
        d["measurements_saved"] = self.measurements_saved
        return d


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Point]) -> list[Point]:
    out = []
    for p in points:
        if not any(dominates(q.objectives(), p.objectives()) for q in points if q is not p):
            if not any(q.objectives() == p.objectives() for q in out):  # one representative per value
                out.append(p)
    return sorted(out, key=lambda p: p.latency_s)


class _Evaluator:
    """Objectives of genomes, with the model-building/error part memoised per decoded model."""

    def __init__(self, space: SearchSpace, cache: LatencyCache, predictor: LatencyPredictor | None,
                 baseline: Sequence[Pair]):
        self.space = space
        self.cache = cache
        self.predictor = predictor
        self.known: dict[Pair, float] = {}
        self.features = {p: space.features(*p) for p in dict.fromkeys([*baseline, *space.pairs()])}
        self.ref = space.outputs(None)
        self.errors: dict[tuple, float] = {}
        self.scales: dict[int, float] = {}  # weight bits -> anchor scale (_anchor_scales)
        self.other_bytes = {r: space.other_bytes(r) for r in {1.0, *space.prune_ratios}}

    def measure(self, pairs) -> None:
        pairs = [p for p in dict.fromkeys(pairs) if p not in self.known]
        if not pairs:
            return
        got = self.cache.measure({p: self.space.layer_graph(*p) for p in pairs})
        self.known.update(got)
        if self.predictor is not None:
            self.predictor.fit(self.features, self.known)

    def latency(self, pair: Pair) -> float:
        """The pair's latency alone (measured, else predicted) times its bit-width's anchor scale."""
        t = self.known[pair] if pair in self.known else float(self.predictor.predict(self.features[pair])[0])
        return t * self.scales.get(pair[1].bits, 1.0)

    def error(self, ratio: float, configs: Mapping[str, LayerConfig]) -> float:
        key = (ratio, tuple(configs.items()))
        if key not in self.errors:
            outs = self.space.outputs(Decoded(ratio, dict(configs)))
            num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outs, self.ref))
            den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in self.ref)
            self.errors[key] = float(np.sqrt(num / max(den, 1e-30)))
        return self.errors[key]

    def point(self, genome: tuple[int, ...], base_lat: float, base_bytes: float) -> Point:
        d = self.space.decode(genome)
        lat = sum(self.latency(p) for p in d.pairs())
        wbytes = self.other_bytes[d.prune] + sum(self.space.weight_bytes(*p) for p in d.pairs())
        return Point({n: c.label for n, c in d.configs.items()}, self.error(d.prune, d.configs), lat, lat / base_lat,
                     wbytes, wbytes / base_bytes, all(p in self.known for p in d.pairs()), d.prune)


def _anchor_scales(space: SearchSpace, ev: _Evaluator, cache: LatencyCache) -> dict[int, float]:
    """Per weight bit-width ``b``: how much the per-layer sum mispredicts a whole model in ``b`` bits.

    A quantized layer timed alone pays its own quantize/dequantize boundary, which a whole integer
    model's fused chain does not (measured: ResNet-18 all-int8 on tvm-x86 sums to 10x the fp32 layers
    but runs 0.33x the fp32 model).  So the all-fp32 model and each uniform all-``b`` model (every layer
    that offers ``b``) are timed whole, and ``scale[b] = (T_b / T_fp32) / (S_b / S_fp32)`` (T: whole model,
    S: sum of its layers alone) multiplies every ``b``-bit layer's latency.  Exact for the uniform models;
    first-order for mixed ones (their int/float boundaries are not modelled)."""
    bits = sorted({c.bits for la in space.layers for c in la.choices if c.bits != 32})
    if not bits:
        return {}
    uniform = {b: {la.name: LayerConfig(b) if LayerConfig(b) in la.choices else FP32 for la in space.layers}
               for b in bits}
    ev.measure([(n, c, 1.0) for b in bits for n, c in uniform[b].items()])
    whole = cache.measure({32: space.build({}), **{b: space.build(uniform[b]) for b in bits}})
    fp32_sum = sum(ev.known[(la.name, FP32, 1.0)] for la in space.layers)
    return {b: (whole[b] / whole[32]) / (sum(ev.known[(n, c, 1.0)] for n, c in uniform[b].items()) / fp32_sum)
            for b in bits}


def _violations(p: Point, budget: Budget) -> list[float]:
    return [p.latency_ratio - budget.latency if budget.latency is not None else -1.0,
            p.memory_ratio - budget.memory if budget.memory is not None else -1.0,
            p.error - budget.max_error if budget.max_error is not None else -1.0]


def search(graph: Graph, calibration: Sequence[Mapping[str, np.ndarray]], *, backend: str = "onnxruntime",
           budget: Budget = Budget(), pop_size: int = 16, generations: int = 8, seed: int = 0,
           use_predictor: bool = True, predictor: str = "ridge", seed_measurements: int = 4,
           measure_per_generation: int = 4, final_points: int = 12, anchor: bool = True,
           cache: LatencyCache | None = None, space: SearchSpace | None = None, prepare: bool = True,
           progress: Callable[[int, int, str], None] | None = None, **space_options) -> SearchResult:
    """Pareto front of (proxy error, latency, weight bytes) over prune ratios and per-layer configurations
    of ``graph``.

    ``prepare`` runs ``fold-bn,dead-code`` first (so batch norms are inside the layers' weights);
    ``space_options`` go to :class:`~qcompile.search.space.SearchSpace` (e.g. ``prune_ratios``).
    ``progress(done, total, text)`` is called before the first measurements (done 0) and after every
    generation.  A memory budget below the smallest weight bytes any point can reach is refused before
    anything is measured (an infeasible result, like any other).
    """
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    t0 = time.perf_counter()
    if space is None:
        if prepare:
            from qcompile.passes import PassManager, parse_pipeline

            graph = PassManager(parse_pipeline("fold-bn,dead-code")).run(graph)
        space = SearchSpace(graph, calibration, **space_options)
    if not space.layers:
        raise ValueError("the model has no conv2d/linear layer with constant weights to search over")
    cache = cache or LatencyCache(backend)
    hits0, misses0 = cache.hits, cache.misses
    baseline: list[Pair] = [(la.name, FP32, 1.0) for la in space.layers]  # the unpruned all-fp32 model
    tick = progress or (lambda done, total, text: None)
    if budget.memory is not None:  # weight bytes are known without measuring: an impossible budget fails fast
        base_bytes = space.other_bytes(1.0) + sum(space.weight_bytes(*p) for p in baseline)
        floor = _memory_floor(space)
        if floor / base_bytes > budget.memory:
            message = (f"infeasible: memory budget {budget.memory:g}x of the original weight bytes cannot be met: "
                       f"the smallest any point reaches is {floor / base_bytes:.3g}x (floor {floor:,.0f} of "
                       f"{base_bytes:,.0f} bytes; nothing was measured)")
            return SearchResult([], False, message, budget, backend, baseline_latency_s=0.0, baseline_bytes=base_bytes,
                                measurements=0, space_size=space.size,
                                cache={"hits": 0, "misses": 0, "path": str(cache.path)},
                                wall_s=time.perf_counter() - t0, best={"memory_ratio": floor / base_bytes})
    tick(0, generations, f"measuring the baseline and seed layers on {backend}")
    ev = _Evaluator(space, cache, LatencyPredictor(predictor) if use_predictor else None, baseline)
    rng = np.random.default_rng(seed)  # the first population: the same with and without the predictor
    pick_rng = np.random.default_rng([seed, 1])  # the predictor's seed measurements
    if use_predictor:
        others = [p for p in space.pairs() if p not in baseline]
        picks = pick_rng.choice(len(others), size=min(seed_measurements, len(others)), replace=False)
        ev.measure(baseline + [others[i] for i in picks])
    else:
        ev.measure(baseline + space.pairs())
    base_lat = sum(ev.known[p] for p in baseline)
    if anchor and isinstance(space, SearchSpace):
        ev.scales = _anchor_scales(space, ev, cache)
    base_bytes = ev.other_bytes[1.0] + sum(space.weight_bytes(*p) for p in baseline)

    upper = space.upper
    n_var = len(upper)
    problem = Problem(n_var=n_var, n_obj=3, n_ieq_constr=3, xl=np.zeros(n_var), xu=upper, vtype=int)
    # seeds, for every prune ratio: all-fp32 (first), every uniform choice index (as far as a layer has
    # it); the rest random
    layer_upper = np.array([len(la.choices) - 1 for la in space.layers])
    X0 = [np.array(space.genome(r, np.minimum(layer_upper, k))) for k in range(int(layer_upper.max()) + 1)
          for r in space.prune_ratios]
    while len(X0) < pop_size:
        X0.append(rng.integers(0, upper + 1))
    algorithm = NSGA2(pop_size=pop_size, sampling=np.array(X0[:pop_size]),
                      crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=3.0, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    archive: dict[tuple[int, ...], Point] = {}

    def evaluate(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        F, G = [], []
        for x in X:
            genome = tuple(int(v) for v in np.round(x))
            p = archive[genome] = ev.point(genome, base_lat, base_bytes)
            F.append(p.objectives())
            G.append(_violations(p, budget))
        return np.array(F), np.array(G)

    def refresh() -> None:
        for g in archive:
            archive[g] = ev.point(g, base_lat, base_bytes)

    def promising() -> list[tuple[int, ...]]:
        feas = [g for g, p in archive.items() if max(_violations(p, budget)) <= 0]
        pool = feas or sorted(archive, key=lambda g: max(_violations(archive[g], budget)))[:pop_size]
        front = non_dominated([archive[g] for g in pool])
        ids = {id(p) for p in front}
        return [g for g in pool if id(archive[g]) in ids]

    gens = 0
    while algorithm.has_next():
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:  # every genome the operators reach is evaluated (a small space)
            break
        F, G = evaluate(pop.get("X"))
        Evaluator().eval(StaticProblem(problem, F=F, G=G), pop)
        algorithm.tell(infills=pop)
        gens += 1
        if use_predictor:
            counts: dict = {}
            for g in promising():
                for pair in space.decode(g).pairs():
                    if pair not in ev.known:
                        counts[pair] = counts.get(pair, 0) + 1
            todo = sorted(counts, key=lambda p: -counts[p])[:measure_per_generation]
            if todo:
                ev.measure(todo)
                refresh()
        feasible_now = sum(1 for p in archive.values() if max(_violations(p, budget)) <= 0)
        tick(gens, generations, f"generation {gens}/{generations}: {len(archive)} models evaluated, "
                                f"{feasible_now} within budget, {len(ev.known)}/{space.size} pairs measured")

    # finalists: measure what up to final_points non-dominated points (spread over latency) use, until
    # those are fully measured; measuring every pair of a large front would save nothing (benchmarks/search.py)
    def spread(genomes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        gs = sorted(genomes, key=lambda g: archive[g].latency_s)
        if len(gs) <= final_points:
            return gs
        return [gs[i] for i in sorted({int(i) for i in np.linspace(0, len(gs) - 1, final_points).round()})]

    for _ in range(10):
        missing = [pair for g in spread(promising()) for pair in space.decode(g).pairs() if pair not in ev.known]
        if not missing:
            break
        ev.measure(missing)
        refresh()
    measured_points = [p for p in archive.values() if p.measured]
    feasible = [p for p in measured_points if max(_violations(p, budget)) <= 0]
    front = non_dominated(feasible)
    best = {"error": min(p.error for p in archive.values()),
            "latency_ratio": min(p.latency_ratio for p in measured_points) if measured_points else None,
            "memory_ratio": min(p.memory_ratio for p in archive.values())}
    message = _message(front, budget, best, ev, space, base_lat)
    return SearchResult(front, bool(front), message, budget, backend, base_lat, base_bytes,
                        cache.misses - misses0, space.size, len(ev.known),
                        {"hits": cache.hits - hits0, "misses": cache.misses - misses0, "path": str(cache.path)},
                        len(ev.errors), gens, time.perf_counter() - t0, best, dict(ev.scales))


def _memory_floor(space: SearchSpace) -> float:
    """The fewest weight bytes any point of ``space`` has: per prune ratio, every layer's smallest
    configuration plus the other constants."""
    return min(space.other_bytes(r) + sum(min(space.weight_bytes(la.name, c, r)
                                              for c in space.layer(la.name, r).choices) for la in space.layers)
               for r in space.prune_ratios)


def _message(front: list[Point], budget: Budget, best: dict, ev: _Evaluator, space: SearchSpace,
             base_lat: float) -> str:
    if front:
        return f"{len(front)} non-dominated feasible point(s)"
    parts = []
    if budget.latency is not None and (best["latency_ratio"] is None or best["latency_ratio"] > budget.latency):
        # additive per-layer latency: under the best prune ratio, the fastest configuration of every layer
        # bounds what any point can reach
        bound = min(sum(min(ev.latency((la.name, c, r)) for c in space.layer(la.name, r).choices)
                        for la in space.layers) for r in space.prune_ratios) / base_lat
        reached = "nothing measured" if best["latency_ratio"] is None else f"{best['latency_ratio']:.3g}x"
        parts.append(f"latency budget {budget.latency:g}x of the fp32 per-layer latency cannot be met: the best "
                     f"reachable is {reached} (lower bound from each layer's fastest configuration "
                     f"{bound:.3g}x)")
    if budget.memory is not None and best["memory_ratio"] > budget.memory:
        floor = min(ev.other_bytes[r] + sum(min(space.weight_bytes(la.name, c, r)
                                                for c in space.layer(la.name, r).choices) for la in space.layers)
                    for r in space.prune_ratios)
        parts.append(f"memory budget {budget.memory:g}x of the original weight bytes cannot be met: the best "
                     f"reachable is {best['memory_ratio']:.3g}x (floor {floor:,.0f} bytes)")
    if budget.max_error is not None and best["error"] > budget.max_error:
        parts.append(f"max proxy error {budget.max_error:g} cannot be met: the best reachable is "
                     f"{best['error']:.3g}")
    if not parts:
        parts.append("each budget is reachable alone, but no evaluated point meets all of them at once "
                     f"(best latency {best['latency_ratio']}x, memory {best['memory_ratio']:.3g}x, "
                     f"error {best['error']:.3g}); search longer or relax a budget")
    return "infeasible: " + "; ".join(parts)
