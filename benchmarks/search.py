"""Compression search (NSGA-II) with and without the latency predictor: measurements saved, front quality.

    python benchmarks/search.py predictor --models digits_cnn resnet_style --backend onnxruntime --seeds 3

``predictor``: for each model and each seed, :func:`qcompile.search.search` runs twice with the same
population size, generations, seed and budget: ``use_predictor=True`` (only the fp32 baseline, a few
random pairs and then the pairs the current front uses are timed; a ridge regression on configuration
features estimates the rest) and ``use_predictor=False`` (every (layer, configuration) pair of the
space is timed before the search).  The variants alternate which runs first from seed to seed, and
every run gets a *fresh* latency cache file in a temporary directory, so no run is served by another
one's measurements.

* Measurements: (layer, configuration) pairs whose latency the run measured (``pairs_measured``) out of
  the space's pairs (``space_size``); distinct workloads actually timed (cache misses: layers of equal
  shapes share one); the seconds spent inside the timing function.
* Front quality: both searches return only *fully measured* points, but each run timed its pairs
  itself, and on a shared machine two timings of the same layer differ.  So after all runs of a model,
  every pair of the space is timed once more in one interleaved "referee" run (fresh cache), and every
  front point of both variants is re-scored with those latencies (latency ratio = sum of the point's
  per-layer referee latencies / the all-fp32 sum); proxy error and memory ratio are deterministic.
  Hypervolume (``pymoo.indicators.hv.HV``) of each front in (proxy error, latency ratio, memory
  ratio), normalised per model by the minimum and maximum of each objective over the union of all
  fronts of that model (both variants, all seeds), reference point 1.1 in every objective: one
  space and one reference point for both variants.  The hypervolume under the run's own timings is
  kept in the JSON too (``hv_self``).
* Wall time of each search (``SearchResult.wall_s``).  The search space (Tucker-2 factorizations,
  per-layer graphs, features) is built once per model before the timed runs and shared (both variants
  need all of it); its build time is reported separately.
* Predictor check: with the referee latencies, the search's ``LatencyPredictor`` (ridge, and gbm) is
  fit on the fp32 baseline plus k random pairs and scored on the other pairs (Spearman rank
  correlation, median |log(predicted / measured)|).

``plot X.json``: hypervolumes and summary recomputed from the stored fronts, the table printed and
``X.png`` redrawn.

Writes ``<tag>.json`` and ``<tag>.png`` under ``--out`` (default tag: ``predictor_<models>`` plus the
budget, e.g. ``predictor_resnet_style_mem0.5_err0.3``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {"digits_cnn": "qcompile.models.digits:digits_cnn"}
VARIANTS = ("predictor", "exhaustive")


def _machine() -> dict:
    """CPU model, flags of interest, cores, load: the machine is shared, so the load is recorded too."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and "cpu" not in info:
                info["cpu"] = val.strip()
            elif key == "flags" and "flags" not in info:
                info["flags"] = sorted(f for f in val.split() if f.startswith(("avx512", "avx2", "fma", "amx")))
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    info["loadavg_start"] = list(os.getloadavg())
    return info


def _spec(model: str) -> str:
    return model if ":" in model else MODELS.get(model, f"qcompile.models.mnist_nets:{model}")


class _TimedMeasure:
    """The latency cache's timing function (qcompile.factorize.latency.measure), timed."""

    def __init__(self, rounds: int = 3, number: int = 10):
        self.rounds, self.number = rounds, number
        self.seconds = 0.0
        self.calls = 0
        self.workloads = 0

    def __call__(self, graphs, backend):
        from qcompile.factorize.latency import measure

        t = time.perf_counter()
        out = measure(graphs, backend, rounds=self.rounds, number=self.number)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.workloads += len(graphs)
        return out


def _pairs(space) -> list[tuple]:
    """Every (layer, configuration, prune ratio) of the space."""
    if hasattr(space, "pairs"):
        return [tuple(p) if len(p) == 3 else (p[0], p[1], 1.0) for p in space.pairs()]
    return [(la.name, c, 1.0) for la in space.layers for c in la.choices]


def _layer_graph(space, name, cfg, ratio):
    return space.layer_graph(name, cfg) if ratio == 1.0 else space.layer_graph(name, cfg, ratio)


def _features(space, name, cfg, ratio):
    return space.features(name, cfg) if ratio == 1.0 else space.features(name, cfg, ratio)


def _point_latency(point, referee: dict) -> float:
    prune = float(getattr(point, "prune", 1.0))
    return sum(referee[(name, label, prune)] for name, label in point.configs.items())


def _run(graph, calib, space, args, budget, use_predictor: bool, seed: int, tmp: Path) -> tuple[dict, list]:
    from qcompile.search import LatencyCache, search

    timer = _TimedMeasure()
    cache = LatencyCache(args.backend, tmp / f"{'pred' if use_predictor else 'exh'}-s{seed}.json", measure_fn=timer)
    t = time.perf_counter()
    r = search(graph, calib, backend=args.backend, budget=budget, pop_size=args.pop, generations=args.generations,
               seed=seed, use_predictor=use_predictor, cache=cache, space=space)
    wall = time.perf_counter() - t
    row = {"variant": VARIANTS[0] if use_predictor else VARIANTS[1], "seed": seed, "wall_s": r.wall_s,
           "call_s": wall, "measure_s": timer.seconds, "measure_calls": timer.calls,
           "pairs_measured": r.pairs_measured, "space_size": r.space_size, "measurements": r.measurements,
           "pairs_saved": r.measurements_saved, "pairs_saved_pct": 100.0 * r.measurements_saved / r.space_size,
           "evaluations": r.evaluations, "generations": r.generations, "feasible": r.feasible,
           "message": r.message, "baseline_latency_s": r.baseline_latency_s,
           "all_measured": all(p.measured for p in r.front),
           "front": [{"configs": p.configs, "prune": float(getattr(p, "prune", 1.0)), "error": p.error,
                      "latency_ratio_self": p.latency_ratio, "memory_ratio": p.memory_ratio} for p in r.front]}
    return row, r.front


def _referee(space, args, tmp: Path) -> tuple[dict, dict]:
    """Every pair of the space timed in one interleaved run (fresh cache): (name, label, prune) -> seconds."""
    from qcompile.search import LatencyCache

    timer = _TimedMeasure(rounds=args.referee_rounds)
    cache = LatencyCache(args.backend, tmp / "referee.json", measure_fn=timer)
    pairs = _pairs(space)
    got = cache.measure({p: _layer_graph(space, *p) for p in pairs})
    table = {(n, c.label, r): float(got[(n, c, r)]) for n, c, r in pairs}
    return table, {"pairs": len(pairs), "workloads": cache.misses, "rounds": args.referee_rounds,
                   "measure_s": timer.seconds}


def _hv(points: np.ndarray, lo: np.ndarray, hi: np.ndarray, ref: float) -> float:
    from pymoo.indicators.hv import HV

    if len(points) == 0:
        return 0.0
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    return float(HV(ref_point=np.full(points.shape[1], ref))((points - lo) / scale))


def _score(row: dict, hv_ref: float) -> None:
    """Hypervolumes, per-seed pairs and the summary of one model's runs (in place).

    ``hv``: fronts re-scored with the referee latencies, normalised by the minimum and maximum of each
    objective over every front of the model (both variants, all seeds); ``hv_self``: the same with
    each run's own latencies (normalised over those)."""
    runs = row["runs"]

    def objs(run: dict, key: str) -> np.ndarray:
        return np.array([[d["error"], d[key], d["memory_ratio"]] for d in run["front"]]).reshape(-1, 3)

    row["normalisation"] = {"objectives": ["error", "latency_ratio", "memory_ratio"], "reference": hv_ref}
    for key, hv_key in (("latency_ratio", "hv"), ("latency_ratio_self", "hv_self")):
        union = np.concatenate([objs(r, key) for r in runs])
        lo, hi = (union.min(0), union.max(0)) if len(union) else (np.zeros(3), np.ones(3))
        row["normalisation"][hv_key] = {"min": lo.tolist(), "max": hi.tolist()}
        for r in runs:
            r[hv_key] = _hv(objs(r, key), lo, hi, hv_ref)
    for r in runs:
        r["other_s"] = r["wall_s"] - r["measure_s"]
    paired = []
    for seed in sorted({r["seed"] for r in runs}):
        p, e = (next(r for r in runs if r["seed"] == seed and r["variant"] == v) for v in VARIANTS)
        paired.append({"seed": seed, "hv_ratio": p["hv"] / e["hv"] if e["hv"] else None,
                       "hv_self_ratio": p["hv_self"] / e["hv_self"] if e["hv_self"] else None,
                       "pairs_saved": e["pairs_measured"] - p["pairs_measured"],
                       "workloads_saved": e["measurements"] - p["measurements"],
                       "wall_ratio": p["wall_s"] / e["wall_s"], "measure_ratio": p["measure_s"] / e["measure_s"]})
    row["paired"] = paired
    row["summary"] = {v: {k: float(np.mean([r[k] for r in runs if r["variant"] == v]))
                          for k in ("pairs_measured", "measurements", "pairs_saved", "pairs_saved_pct", "hv", "hv_self",
                                    "wall_s", "measure_s", "other_s", "evaluations")} for v in VARIANTS}
    for key in ("hv_ratio", "hv_self_ratio"):
        ratios = [s[key] for s in paired if s[key] is not None]
        row["summary"][key + "_mean"] = float(np.mean(ratios)) if ratios else None
        row["summary"][key + "_range"] = [float(min(ratios)), float(max(ratios))] if ratios else None


def _predictor_check(space, referee: dict, rng_seed: int = 0, repeats: int = 5) -> list[dict]:
    """How well the search's predictor ranks unmeasured pairs, trained on baseline + k random pairs."""
    from scipy.stats import spearmanr

    from qcompile.search import LatencyPredictor
    from qcompile.search.space import FP32

    pairs = _pairs(space)
    feats = {p: _features(space, *p) for p in pairs}
    secs = {p: referee[(p[0], p[1].label, p[2])] for p in pairs}
    base = [p for p in pairs if p[1] == FP32 and p[2] == 1.0]
    others = [p for p in pairs if p not in set(base)]
    out = []
    for k in sorted({4, 8, 16, 32, len(others) // 2}):
        if k >= len(others) - 4:
            continue
        for kind in ("ridge", "gbm"):
            rhos, errs = [], []
            for rep in range(repeats):
                rng = np.random.default_rng(rng_seed + rep)
                picked = [others[i] for i in rng.choice(len(others), k, replace=False)]
                train = base + picked
                test = [p for p in others if p not in set(picked)]
                pred = LatencyPredictor(kind=kind)
                pred.fit(feats, {p: secs[p] for p in train})
                y = np.array([secs[p] for p in test])
                yhat = pred.predict(np.stack([feats[p] for p in test]))
                rhos.append(float(spearmanr(yhat, y).statistic))
                errs.append(float(np.median(np.abs(np.log(yhat / y)))))
            out.append({"kind": kind, "train_pairs": len(base) + k, "test_pairs": len(others) - k,
                        "spearman": float(np.mean(rhos)), "median_abs_log_err": float(np.mean(errs))})
    return out


def _load(model: str, n_calib: int):
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline

    loaded = load_model(_spec(model), num_calibration=n_calib)
    graph = PassManager(parse_pipeline("fold-bn,dead-code")).run(loaded.graph)
    return graph, list(loaded.calibration[:n_calib]), loaded.calibration_source


def predictor(args) -> None:
    from qcompile.search import Budget, SearchSpace

    budget = Budget(latency=args.latency, memory=args.memory, max_error=args.max_error)
    limits = (("lat", args.latency), ("mem", args.memory), ("err", args.max_error))
    tag = args.tag or "_".join(["predictor"] + [m.split(":")[-1] for m in args.models]
                               + [f"{k}{v:g}" for k, v in limits if v is not None])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    results = {"machine": _machine(), "backend": args.backend, "budget": vars(budget), "pop_size": args.pop,
               "generations": args.generations, "seeds": seeds, "calibration": args.calibration,
               "hv_reference": args.hv_ref, "models": []}
    t_all = time.perf_counter()
    for model in args.models:
        graph, calib, calib_source = _load(model, args.calibration)
        t = time.perf_counter()
        space = SearchSpace(graph, calib)
        for p in _pairs(space):  # one-off: Tucker-2 factors, per-layer graphs, features (shared by all runs)
            _features(space, *p)
            _layer_graph(space, *p)
        t_space = time.perf_counter() - t
        print(f"{model}: {len(space.layers)} layers, {space.size} (layer, configuration) pairs; space built in "
              f"{t_space:.1f}s; calibration {len(calib)} feeds ({calib_source})", flush=True)
        runs, fronts = [], []
        with tempfile.TemporaryDirectory(prefix="qcompile-search-bench-") as tmpdir:
            tmp = Path(tmpdir)
            # untimed warm-up (imports, first onnxruntime sessions, first torch calls), so that the first
            # timed run does not pay for them
            from qcompile.search import LatencyCache, search

            search(graph, calib, backend=args.backend, pop_size=4, generations=1, space=space,
                   cache=LatencyCache(args.backend, tmp / "warmup.json"))
            for seed in seeds:
                order = (True, False) if seed % 2 == 0 else (False, True)  # alternate who runs first
                for use in order:
                    row, front = _run(graph, calib, space, args, budget, use, seed, tmp)
                    runs.append(row)
                    fronts.append(front)
                    print(f"  seed {seed} {row['variant']:10s}: pairs {row['pairs_measured']:3d}/{row['space_size']} "
                          f"({row['pairs_saved_pct']:4.1f} % saved), workloads timed {row['measurements']:3d}, "
                          f"front {len(row['front']):3d}, wall {row['wall_s']:6.1f}s (timing {row['measure_s']:5.1f}s)"
                          f" - {row['message']}", flush=True)
            referee, ref_info = _referee(space, args, tmp)
        base = sum(referee[(la.name, "fp32", 1.0)] for la in space.layers)
        for row, front in zip(runs, fronts):
            for d, p in zip(row["front"], front):
                d["latency_ratio"] = _point_latency(p, referee) / base
        check = _predictor_check(space, referee)
        row = {"model": model, "spec": _spec(model), "layers": len(space.layers), "space_size": space.size,
               "distinct_workloads": ref_info["workloads"], "space_build_s": t_space, "referee": ref_info,
               "referee_baseline_s": base, "runs": runs, "predictor_check": check}
        _score(row, args.hv_ref)
        results["models"].append(row)
        for c in check:
            print(f"  predictor check {c['kind']:5s} trained on {c['train_pairs']:3d} pairs: Spearman "
                  f"{c['spearman']:.2f}, median |log err| {c['median_abs_log_err']:.2f} on {c['test_pairs']} others")
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        results["total_s"] = time.perf_counter() - t_all
        (out / f"{tag}.json").write_text(json.dumps(results, indent=2))
    _table(results)
    _plot(results, out / f"{tag}.png")
    print(f"\nwrote {out / (tag + '.json')} and {out / (tag + '.png')} ({results['total_s']:.0f}s in all)")


def _budget_text(budget: dict) -> str:
    names = {"latency": "latency ratio", "memory": "memory ratio", "max_error": "proxy error"}
    text = ", ".join(f"{names[k]} <= {v:g}" for k, v in budget.items() if v is not None)
    return text or "none"


def _table(results) -> None:
    m = results["machine"]
    print(f"\nmachine: {m.get('cpu')}, {m['affinity']} cores (shared: load average {m['loadavg_start'][0]:.1f} "
          f"at start, "
          f"{m['loadavg_end'][0]:.1f} at end); backend {results['backend']}; pop {results['pop_size']} x "
          f"{results['generations']} generations; seeds {results['seeds']}; budget: {_budget_text(results['budget'])}")
    head = (f"{'model':14s} {'variant':10s} {'pairs measured':>15s} {'saved':>12s} {'workloads':>9s} "
            f"{'HV (referee)':>12s} {'HV ratio':>9s} {'HV own ratio':>12s} {'wall s':>7s} {'timing s':>8s} "
            f"{'other s':>7s}")
    print(head)
    print("-" * len(head))
    for r in results["models"]:
        s = r["summary"]
        for v in VARIANTS:
            x = s[v]
            first = v == VARIANTS[0]
            ratio = f"{s['hv_ratio_mean']:.3f}" if first and s["hv_ratio_mean"] is not None else ""
            own = f"{s['hv_self_ratio_mean']:.3f}" if first and s["hv_self_ratio_mean"] is not None else ""
            print(f"{r['model']:14s} {v:10s} {x['pairs_measured']:7.1f}/{r['space_size']:<7d} "
                  f"{x['pairs_saved']:5.1f} ({x['pairs_saved_pct']:4.1f}%) {x['measurements']:9.1f} {x['hv']:12.4f} "
                  f"{ratio:>9s} {own:>12s} {x['wall_s']:7.1f} {x['measure_s']:8.1f} {x['other_s']:7.1f}")
        per = ", ".join(f"s{p['seed']}: {p['pairs_saved']:+d} pairs, HV x{p['hv_ratio']:.3f}" if p["hv_ratio"] else
                        f"s{p['seed']}: {p['pairs_saved']:+d} pairs" for p in r["paired"])
        print(f"{'':14s} per seed (predictor vs exhaustive): {per}")
    print("HV: hypervolume of the returned front re-scored with one referee timing of every pair (mean over seeds);"
          " HV ratio: predictor / exhaustive, paired by seed (mean); HV own: with each run's own timings; "
          "wall s: SearchResult.wall_s; timing s: inside the latency measurements; other s: the rest (proxy error "
          "evaluations, NSGA-II, predictor fits)")


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 3.8 * len(models)), squeeze=False)
    colors = {"predictor": "tab:orange", "exhaustive": "tab:blue"}
    markers = "os^Dv<>"
    for ax_row, r in zip(axes, models):
        ax = ax_row[0]
        for run in r["runs"]:
            pts = sorted((d["latency_ratio"], d["error"]) for d in run["front"])
            if pts:
                ax.scatter(*zip(*pts), s=14, color=colors[run["variant"]], marker=markers[run["seed"] % len(markers)],
                           alpha=0.6, label=f"{run['variant']} seed {run['seed']}")
        ax.set_xlabel("latency ratio (referee timings, sum of layers)")
        ax.set_ylabel("proxy error")
        ax.set_title(f"{r['model']}: returned fronts")
        ax.legend(fontsize=6)
        ax = ax_row[1]
        x = np.arange(len(r["paired"]))
        for j, v in enumerate(VARIANTS):
            vals = [next(q for q in r["runs"] if q["seed"] == s["seed"] and q["variant"] == v) for s in r["paired"]]
            ax.bar(x + (j - 0.5) * 0.38, [q["pairs_measured"] for q in vals], 0.38, color=colors[v], label=f"{v} pairs")
            ax.bar(x + (j - 0.5) * 0.38, [q["measurements"] for q in vals], 0.38, color="none", edgecolor="k",
                   hatch="//", label="distinct workloads timed" if j == 0 else None)
        ax.axhline(r["space_size"], color="k", ls="--", lw=1, label="space size (pairs)")
        ax.set_xticks(x, [f"seed {s['seed']}" for s in r["paired"]])
        ax.set_ylabel("measured")
        ax.set_title("pairs measured (hatched: distinct workloads timed)")
        ax.legend(fontsize=6)
        ax = ax_row[2]
        for j, v in enumerate(VARIANTS):
            vals = [next(q for q in r["runs"] if q["seed"] == s["seed"] and q["variant"] == v) for s in r["paired"]]
            ax.bar(x + (j - 0.5) * 0.38, [q["hv"] for q in vals], 0.38, color=colors[v], label=v)
        ax.set_xticks(x, [f"seed {s['seed']}" for s in r["paired"]])
        ax.set_ylabel(f"hypervolume (normalised, ref {results['hv_reference']})")
        ax.set_title("front quality")
        ax.legend(fontsize=6)
    m = results["machine"]
    fig.suptitle(f"{m.get('cpu')}, {m['affinity']} cores (shared), {results['backend']}, pop {results['pop_size']} x "
                 f"{results['generations']} gen, budget: {_budget_text(results['budget'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(args) -> None:
    for name in args.json:
        results = json.loads(Path(name).read_text())
        for row in results["models"]:  # recompute the scores from the stored fronts (same definitions)
            _score(row, results["hv_reference"])
        Path(name).write_text(json.dumps(results, indent=2))
        _table(results)
        _plot(results, Path(name).with_suffix(".png"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("predictor", help="search with vs without the latency predictor")
    p.add_argument("--models", nargs="*", default=["digits_cnn", "resnet_style"],
                   help="digits_cnn, an MNIST net name (resnet_style, vgg_style, ...) or module:factory")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pop", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--calibration", type=int, default=8, help="calibration feeds (proxy error)")
    p.add_argument("--latency", type=float, default=None, help="budget: latency ratio")
    p.add_argument("--memory", type=float, default=None, help="budget: memory ratio")
    p.add_argument("--max-error", type=float, default=None, help="budget: proxy error")
    p.add_argument("--hv-ref", type=float, default=1.1, help="reference point in the normalised space")
    p.add_argument("--referee-rounds", type=int, default=5)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results/search")
    rp = sub.add_parser("plot", help="print the table and redraw the PNG of a written JSON")
    rp.add_argument("json", nargs="+")
    args = ap.parse_args()
    {"predictor": predictor, "plot": replot}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
