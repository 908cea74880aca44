"""Finalists of a compression search: real accuracy, end-to-end measured latency, the chosen point.

The search ranks configurations by a proxy error and the sum of per-layer latencies
(:mod:`qcompile.search.nsga`).  Both are approximations, so a few points of the front (the
*finalists*, spread over its latency range) are checked for real:

* up to ``max_points`` front points, spread over the predicted latency, are rebuilt from their replay
  pipeline text (``fold-bn,dead-code[,prune-channels{...}],
  layer-config{configs=...}``) and its top-1 accuracy measured on labelled validation data by the
  reference interpreter (the compiled artifact is later verified against that interpreter);
* of the points within ``max_acc_drop`` points of the original (and the memory budget), up to
  ``count`` spread over the predicted latency (the fastest always) are the finalists: each whole
  model, the original on the target and the original on onnxruntime fp32 are timed end to end,
  interleaved round-robin (:func:`qcompile.bench.interleaved`), medians;
* with ``finetune`` options, up to ``finetune_points`` of the checked points that miss the accuracy
  drop (spread over the predicted latency, the fastest always) are fine-tuned (``finetune`` pass:
  distillation from the original, quantization-aware for quantized points) and checked again; their
  replay pipeline ends with ``finetune{...}``.  Pruned points typically need this: the proxy ranks them by the error *before*
  recovery training, so they sit on the front as the fast, inaccurate end;
* the chosen point is the fastest finalist whose measured latency ratio (vs the original on the
  target) meets the budget.  When no point qualifies, :class:`~qcompile.errors.SearchError` says what
  was missed and by how much.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from qcompile.errors import SearchError
from qcompile.frontends import LoadedModel
from qcompile.passes.layer_config import format_configs
from qcompile.search.nsga import Budget, Point, SearchResult
from qcompile.search.space import LayerConfig, SearchSpace

PREPARE = "fold-bn,dead-code"
"""What :func:`qcompile.search.nsga.search` runs before building its space; every replay pipeline starts so."""


@dataclass
class Finalist:
    pipeline: str
    proxy_error: float
    predicted_latency_ratio: float  # sum of per-layer latencies vs the all-fp32 sum (the search's estimate)
    memory_ratio: float
    accuracy: float  # top-1 percent on the validation data
    acc_drop: float  # points below the original
    latency_s: float  # measured end to end on the target (median)
    latency_ratio: float  # vs the original on the target, measured in the same interleaved run
    speedup_vs_onnxruntime: float  # original on onnxruntime fp32 / this point on the target
    misses: list[str]
    graph: Any = field(default=None, repr=False, compare=False)  # the built IR (single-model searches)
    records: list = field(default_factory=list, repr=False, compare=False)  # the PassRecords that built it

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("graph", "records")}

    @property
    def qualifies(self) -> bool:
        return not self.misses


def point_pipeline(space: SearchSpace, point: Point) -> str:
    """The pipeline text that rebuilds ``point`` from the original model."""
    parts = [PREPARE]
    prune = getattr(point, "prune", 1.0)
    if prune < 1.0:
        parts.append(space.prune_pipeline(prune))
    configs = format_configs({n: LayerConfig.parse(c) for n, c in point.configs.items()})
    if configs:
        from qcompile.passes.layer_config import option_text

        opts = option_text(space.act_bits, getattr(space, "reduce_range", False))
        parts.append(f'layer-config{{configs="{configs}"{opts}}}')
    return ",".join(parts)


def pick(front: Sequence[Point], count: int) -> list[Point]:
    """Up to ``count`` points spread evenly over the front's latency range (fastest always included)."""
    pts = sorted(front, key=lambda p: p.latency_s)
    if len(pts) <= count:
        return pts
    idx = sorted({int(i) for i in np.linspace(0, len(pts) - 1, count).round()})
    return [pts[i] for i in idx]


def evaluate(loaded: LoadedModel, space: SearchSpace, result: SearchResult, target: str,
             images: np.ndarray, labels: np.ndarray, *, max_acc_drop: float, count: int = 4, max_points: int = 16,
             rounds: int = 5, number: int = 10, finetune=None, finetune_points: int = 4,
             threads: int | None = None, progress=None) -> tuple[list[Finalist], float, dict, list[float | None]]:
    """(finalists, original accuracy, timing of the originals, accuracy of each front point).

    Accuracy (batched reference interpreter) is measured for up to ``max_points`` front points spread over
    the predicted latency (None for the others: building a quantized model with bias correction costs
    seconds); end-to-end timing only for ``count`` of the points within ``max_acc_drop`` (and the memory
    budget), again spread, the fastest always included."""
    from qcompile.factorize.latency import runner_for, timing_clock
    from qcompile.finetune import accuracy
    from qcompile.passes import PassContext, PassManager, parse_pipeline

    ctx = PassContext(calibration=loaded.calibration)
    if not result.front:
        raise SearchError(f"the search found no feasible point: {result.message}")
    base_acc = accuracy(loaded.graph, images, labels)
    built: dict[int, tuple[str, object, float, list]] = {}
    checked = pick(result.front, max_points)
    prepare = PassManager(parse_pipeline(PREPARE))
    prepared = prepare.run(loaded.graph, ctx)
    for k, p in enumerate(checked):
        text = point_pipeline(space, p)
        # the point's pipeline text, run from the space's pruned model (the prune and its recovery fine-tune
        # ran once per ratio when the space was built; running them again per point would repeat the training)
        ratio = getattr(p, "prune", 1.0)
        start, done = ((prepared, prepare.records) if ratio >= 1.0 else
                       (space.pruned_graph(ratio), [*prepare.records, *space.prune_records[ratio]]))
        passes = parse_pipeline(text)
        if [q.to_text() for q in passes[:len(done)]] != [r.text for r in done]:  # not expected: replay it all
            start, done = loaded.graph, []
        pm = PassManager(passes[len(done):])
        g = pm.run(start, dataclasses.replace(ctx, original=loaded.graph))
        built[id(p)] = (text, g, accuracy(g, images, labels), [*done, *pm.records])
        if progress and (k + 1) % 5 == 0:
            progress(f"validation accuracy of front point {k + 1}/{len(checked)}")
    if finetune is not None:
        recover(built, checked, loaded, ctx, images, labels, base_acc, max_acc_drop, finetune, finetune_points,
                progress)
    front_acc = [built[id(p)][2] if id(p) in built else None for p in result.front]
    within = [p for p in checked if base_acc - built[id(p)][2] <= max_acc_drop
              and (result.budget.memory is None or p.memory_ratio <= result.budget.memory)]
    if not within:
        best = max(checked, key=lambda p: built[id(p)][2])
        raise SearchError(f"no point of the front keeps the accuracy within {max_acc_drop:g} pt of the original's "
                          f"{base_acc:.2f} % on the validation data: the best front point reaches "
                          f"{built[id(best)][2]:.2f} % ({best.latency_ratio:.3g}x predicted latency); relax "
                          "--max-acc-drop or the budget, offer gentler choices (--bits 8, fewer ranks), or "
                          "fine-tune the points that miss (--finetune-epochs)")
    chosen = pick(within, count)
    feed = loaded.calibration[0] if loaded.calibration else None
    if progress:
        progress(f"timing {len(chosen)} finalist(s) and the original end to end on {target}, interleaved")
    out, timing = time_finalists(
        chosen, [runner_for(built[id(p)][1], target, threads, feed=feed) for p in chosen],
        runner_for(loaded.graph, target, threads, feed=feed),
        runner_for(loaded.graph, "onnxruntime", threads, feed=feed),
        [built[id(p)][0] for p in chosen], [built[id(p)][2] for p in chosen], base_acc, result.budget,
        rounds=rounds, number=number, clock=timing_clock(target, threads))
    for f, p in zip(out, chosen):
        f.graph, f.records = built[id(p)][1], list(built[id(p)][3])
    return out, base_acc, timing, front_acc


def recover(built: dict, checked: Sequence[Point], loaded: LoadedModel, ctx, images: np.ndarray,
            labels: np.ndarray, base_acc: float, max_acc_drop: float, options, points: int, progress=None) -> None:
    """Fine-tune (in place of their ``built`` entries) up to ``points`` checked points that miss
    ``max_acc_drop``, spread over their predicted latency (the fastest always: the fastest points are
    often the hardest to recover, e.g. pruned *and* int4, so the others are not all its neighbours); a
    fine-tune that does not improve keeps the point as it was."""
    import time

    from qcompile.finetune import accuracy
    from qcompile.passes.manager import PassRecord
    from qcompile.passes.finetune import Finetune

    missing = pick([p for p in checked if base_acc - built[id(p)][2] > max_acc_drop], points) if points > 0 else []
    for k, p in enumerate(missing):
        text, graph, acc, records = (*built[id(p)], [])[:4]
        tune = Finetune(options, teacher=loaded.graph, progress=False)
        t0 = time.perf_counter()
        res = tune(graph, ctx)
        tuned = res.graph
        record = PassRecord(tune.name, tune.to_text(), time.perf_counter() - t0, res.modified, len(graph.nodes),
                            len(tuned.nodes), stats=dict(res.stats))
        tuned_acc = accuracy(tuned, images, labels)
        if progress:
            progress(f"fine-tuned front point {k + 1}/{len(missing)}: validation accuracy {acc:.2f} -> "
                     f"{tuned_acc:.2f} % ({p.latency_ratio:.3g}x predicted latency)")
        if tuned_acc > acc:
            built[id(p)] = (f"{text},{tune.to_text()}", tuned, tuned_acc, [*records, record])


def time_finalists(chosen: Sequence[Point], runs: Sequence, original_target, original_onnxruntime,
                   pipelines: Sequence[str], values: Sequence[float], base_value: float, budget: Budget, *,
                   rounds: int, number: int, clock=None) -> tuple[list[Finalist], dict]:
    """Time ``runs`` (one no-argument call per finalist on the target) interleaved with the original on
    the target and on onnxruntime fp32 (medians); a finalist misses the budget when its measured latency
    ratio exceeds ``budget.latency``.  ``values``: each finalist's accuracy / metric, ``base_value`` the
    original's.  ``clock``: see :func:`qcompile.factorize.latency.timing_clock` (default wall time)."""
    from qcompile.bench import interleaved

    timed = {"original@target": original_target, "original@onnxruntime": original_onnxruntime,
             **dict(enumerate(runs))}
    med = {k: float(np.median(v)) for k, v in interleaved(timed, rounds, number,
                                                          **({"clock": clock} if clock else {})).items()}
    base_t, ort_t = med["original@target"], med["original@onnxruntime"]
    out = []
    for i, (p, text, value) in enumerate(zip(chosen, pipelines, values)):
        lat = med[i]
        misses = []
        if budget.latency is not None and lat / base_t > budget.latency:
            misses.append(f"measured latency {lat / base_t:.3g}x > {budget.latency:g}x")
        out.append(Finalist(text, p.error, p.latency_ratio, p.memory_ratio, value, base_value - value, lat,
                            lat / base_t, ort_t / lat, misses))
    return out, {"original_target_s": base_t, "original_onnxruntime_s": ort_t}


def choose(finalists: Sequence[Finalist], budget: Budget, max_acc_drop: float) -> Finalist:
    ok = [f for f in finalists if f.qualifies]
    if ok:
        return min(ok, key=lambda f: f.latency_s)
    lines = [f"  {f.pipeline}\n    accuracy drop {f.acc_drop:.2f} pt, measured latency {f.latency_ratio:.3g}x: "
             + "; ".join(f.misses) for f in finalists]
    raise SearchError(f"no finalist meets the budget (max accuracy drop {max_acc_drop:g} pt"
                      + (f", latency {budget.latency:g}x" if budget.latency is not None else "")
                      + (f", memory {budget.memory:g}x" if budget.memory is not None else "")
                      + ") when measured end to end:\n" + "\n".join(lines)
                      + "\nrelax the budget, search longer (--generations), or fine-tune the result")


def report(result: SearchResult, finalists: Sequence[Finalist], chosen: Finalist, base_acc: float,
           timing: dict, front_acc: Sequence[float]) -> dict:
    """The search's JSON record: budget, measurement counts, the front (with each point's validation
    accuracy), the finalists, the choice."""
    doc = result.to_json()
    for p, acc in zip(doc["front"], front_acc):
        p["accuracy"] = acc  # None: not checked
    doc["original"] = {"accuracy": base_acc, **timing}
    doc["finalists"] = [f.as_dict() for f in finalists]
    doc["chosen"] = chosen.as_dict()
    return doc


def plot_front(result: SearchResult, finalists: Sequence[Finalist], chosen: Finalist, base_acc: float,
               front_acc: Sequence[float]) -> bytes:
    """PNG: the front (proxy error vs predicted latency ratio, colour = memory ratio) and, beside it,
    accuracy drop vs latency ratio: the checked front points at their predicted ratio, the finalists at their
    measured end-to-end ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = result.front
    sc = a.scatter([p.latency_ratio for p in pts], [p.error for p in pts], c=[p.memory_ratio for p in pts],
                   cmap="viridis", s=28)
    fig.colorbar(sc, ax=a, label="weight bytes / original")
    a.set_xlabel(f"per-layer latency sum / fp32 ({result.backend}, measured per layer)")
    a.set_ylabel("proxy error (relative output L2)")
    a.set_title(f"Pareto front: {len(pts)} points, {result.pairs_measured}/{result.space_size} pairs measured")
    a.grid(alpha=0.3)
    checked = [(p, a) for p, a in zip(pts, front_acc) if a is not None]
    b.scatter([p.latency_ratio for p, _ in checked], [base_acc - a for _, a in checked], s=18, c="lightgray",
              label="front points checked (predicted latency)")
    b.scatter([f.latency_ratio for f in finalists], [f.acc_drop for f in finalists], s=40,
              label="finalists (measured latency)")
    b.scatter([chosen.latency_ratio], [chosen.acc_drop], marker="*", s=220, c="crimson", label="chosen")
    b.set_xlabel(f"latency / original ({result.backend})")
    b.set_ylabel("validation accuracy drop (points)")
    b.set_title("real accuracy; finalists timed end to end")
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
