"""``qcompile search``: search, check the finalists, compile the chosen point — one call.

1. load the model and its calibration feeds; ``fold-bn,dead-code``; build the per-layer space (pruned
   models, fine-tuned first with ``prune_finetune_epochs``);
2. NSGA-II over the space with per-layer latencies measured on the target (:func:`~qcompile.search.nsga.search`);
   an infeasible budget stops here with the search's message (nothing written);
3. finalists: validation accuracy and end-to-end latency measured (:mod:`qcompile.search.finalists`);
4. the chosen point -- the graph the finalists were measured on, its pipeline text recorded for replay -- is
   compiled for the target (verified like every artifact) into
   ``out``, together with ``search/search.json`` (budget, measurement counts, front, finalists, choice, test
   accuracy of the choice) and ``search/front.png``, all in one atomic directory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qcompile.errors import InputError, SearchError
from qcompile.search.nsga import Budget

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SearchSettings:
    budget: Budget = Budget()
    max_acc_drop: float = 1.0
    data: str = ""  # bundled data set name or .npz; "" = the model's own ``dataset``
    bits: tuple[int, ...] = (8, 4)
    ranks_per_layer: int = 2
    prune_ratios: tuple[float, ...] = (1.0,)
    pop_size: int = 16
    generations: int = 8
    seed: int = 0
    use_predictor: bool = True
    finalists: int = 4
    check_points: int = 16  # front points whose validation accuracy is measured
    rounds: int = 5
    finetune_epochs: int = 0  # > 0: fine-tune checked points that miss the accuracy drop (finalists.recover)
    finetune_points: int = 4
    prune_finetune_epochs: int = 0  # > 0: every pruned model is fine-tuned this long before per-layer choices
    prune_progressive: bool = False  # each ratio pruned from the next larger ratio's fine-tuned model
    threads: int | None = None  # runtime threads of every timing (None: every usable core)
    space_options: dict = field(default_factory=dict)


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI (``avx512_vnni`` or ``avx_vnni`` in /proc/cpuinfo's flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # unknown: assume the exact kernels (no reduce_range)
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_vnni", "avx_vnni"}) or not flags


def ort_needs_reduce_range(target: str, cpuinfo: str | None = None) -> bool:
    """onnxruntime on an x86 CPU without VNNI: its u8s8 int8 kernels add byte products in int16 and
    saturate with full-range int8 weights, so searched int8 layers use the 7-bit grid
    (``layer-config{reduce_range=true}``, the compiler's REDUCE_RANGE_HINT advice)."""
    import platform

    if target != "onnxruntime" or (cpuinfo is None and platform.machine().lower() not in ("x86_64", "amd64")):
        return False
    return not cpu_has_vnni(cpuinfo)


def parse_budget(text: str) -> Budget:
    """``"latency=0.4x,memory=0.5x"`` -> ``Budget(latency=0.4, memory=0.5)`` (ratios of the original)."""
    kw = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("latency", "memory"):
            raise InputError(f"bad --budget item '{item}': use latency=0.4x and/or memory=0.5x (ratios of the "
                             "original model)")
        try:
            ratio = float(value.strip().rstrip("xX"))
        except ValueError:
            raise InputError(f"bad --budget value '{value}' for {key}: a ratio such as 0.4x") from None
        if not ratio > 0:
            raise InputError(f"--budget {key}={value}: the ratio must be positive")
        kw[key] = ratio
    return Budget(**kw)


def _validation(data: str, dataset: str, spec: str):
    from qcompile.finetune import load_training_data

    name = data or dataset
    if not name:
        raise InputError(f"model '{spec}' names no labelled data set: pass --data (digits, mnist, or an .npz with "
                         "x_val, y_val) so the finalists' accuracy can be measured")
    d = load_training_data(name)
    if d.val is None:
        raise InputError(f"data '{name}' has no validation split (x_val, y_val): the search chooses on it")
    return d


def search_and_compile(spec: str, target: str, out: str | Path, settings: SearchSettings, *,
                       input_shapes: dict | None = None, calibration: str | None = None, num_calibration: int = 16,
                       force: bool = False, progress: Progress | None = None) -> dict:
    """Run the whole search (module docstring); returns the ``search.json`` document."""
    from qcompile.compiler import CompileOptions, compile_loaded
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline
    from qcompile.search import finalists as F
    from qcompile.search.latency_cache import LatencyCache
    from qcompile.search.nsga import search
    from qcompile.search.space import SearchSpace
    from qcompile.targets import get_target

    say = progress or (lambda msg: None)
    tgt = get_target(target)
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"output '{out}' already exists (use --force to replace it)")
    if settings.max_acc_drop < 0:
        raise InputError(f"--max-acc-drop must be >= 0, not {settings.max_acc_drop}")
    loaded = load_model(spec, input_shapes or {}, calibration, num_calibration)
    data = _validation(settings.data, loaded.dataset, spec)
    if not loaded.calibration:
        raise InputError(f"model '{spec}' has no calibration data: pass --calib FILE (real samples) for the "
                         "search's proxy error and for quantization")
    graph = PassManager(parse_pipeline(F.PREPARE)).run(loaded.graph)
    space_kw = dict(bits=settings.bits, ranks_per_layer=settings.ranks_per_layer, **settings.space_options)
    if "reduce_range" not in space_kw and ort_needs_reduce_range(target):
        space_kw["reduce_range"] = True
        say("onnxruntime on a CPU without VNNI: int8 weights on the 7-bit grid (layer-config reduce_range=true)")
    if tuple(settings.prune_ratios) != (1.0,):
        space_kw["prune_ratios"] = tuple(settings.prune_ratios)
        if settings.prune_finetune_epochs > 0:
            from qcompile.passes.finetune import Finetune, FinetuneOptions

            say(f"pruning at {', '.join(f'{r:g}' for r in settings.prune_ratios if r < 1)} of the MACs, each pruned "
                f"model fine-tuned for up to {settings.prune_finetune_epochs} epochs on {data.name}")
            recovery = Finetune(FinetuneOptions(data=data.name, epochs=settings.prune_finetune_epochs)).to_text()
            space_kw.update(prune_recovery=recovery, teacher=loaded.graph, prune_progressive=settings.prune_progressive)
            if settings.prune_progressive:
                say("progressive: each ratio is pruned from the next larger ratio's fine-tuned model")
    space = SearchSpace(graph, loaded.calibration, **space_kw)
    say(f"search space: {len(space.layers)} layers, {space.size} (layer, configuration) pairs; target {target}")
    from qcompile.progress import enabled as bars_enabled

    ticker = _Ticker(say, bar=progress is stderr_progress and bars_enabled()) if progress else None
    try:
        result = search(graph, loaded.calibration, backend=target, budget=settings.budget,
                        pop_size=settings.pop_size, generations=settings.generations, seed=settings.seed,
                        use_predictor=settings.use_predictor, cache=LatencyCache(target, threads=settings.threads),
                        space=space, progress=ticker)
    finally:
        if ticker:
            ticker.close()
    say(f"search: {result.evaluations} evaluations, {result.pairs_measured}/{result.space_size} pairs measured "
        f"({result.measurements} timed, rest cached), {result.wall_s:.1f} s — {result.message}")
    if not result.feasible:
        raise SearchError(f"{spec} on {target}: {result.message}")
    x_val, y_val = data.val
    tune = None
    if settings.finetune_epochs > 0:
        from qcompile.passes.finetune import FinetuneOptions

        tune = FinetuneOptions(data=data.name, epochs=settings.finetune_epochs)
    finalists, base_acc, timing, front_acc = F.evaluate(loaded, space, result, target, x_val, y_val,
                                             max_acc_drop=settings.max_acc_drop, count=settings.finalists,
                                             max_points=settings.check_points, rounds=settings.rounds,
                                             finetune=tune, finetune_points=settings.finetune_points,
                                             threads=settings.threads, progress=say)
    chosen = F.choose(finalists, settings.budget, settings.max_acc_drop)
    doc = F.report(result, finalists, chosen, base_acc, timing, front_acc)
    doc["settings"] = {"model": spec, "target": target, "data": data.name, "max_acc_drop": settings.max_acc_drop,
                       "bits": list(settings.bits), "ranks_per_layer": settings.ranks_per_layer,
                       "prune_ratios": list(settings.prune_ratios), "pop_size": settings.pop_size,
                       "generations": settings.generations, "seed": settings.seed,
                       "use_predictor": settings.use_predictor, "finetune_epochs": settings.finetune_epochs,
                       "finetune_points": settings.finetune_points,
                       "prune_finetune_epochs": settings.prune_finetune_epochs,
                       "prune_progressive": settings.prune_progressive, "threads": settings.threads,
                       "reduce_range": space.reduce_range}
    if data.test is not None:
        from qcompile.finetune import accuracy

        doc["chosen"]["test_accuracy"] = accuracy(chosen.graph, *data.test)
        doc["original"]["test_accuracy"] = accuracy(loaded.graph, *data.test)
    say(f"chosen: {chosen.pipeline}\n  accuracy {chosen.accuracy:.2f} % (drop {chosen.acc_drop:.2f} pt), "
        f"{chosen.latency_ratio:.3g}x the original's latency on {target}, "
        f"speed-up over onnxruntime fp32 on the original {chosen.speedup_vs_onnxruntime:.2f}x")
    files = {"search/search.json": (json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n").encode(),
             "search/front.png": F.plot_front(result, finalists, chosen, base_acc, front_acc)}
    # the artifact is the very graph the finalist stage measured (no second fine-tune), then the target's phases
    prebuilt = (chosen.graph, chosen.records) if chosen.graph is not None and chosen.records else None
    passes = ([] if prebuilt else parse_pipeline(chosen.pipeline)) + parse_pipeline(",".join(tgt.phases))
    compile_loaded(loaded, passes, tgt, out, CompileOptions(force=force), prebuilt=prebuilt,
                   extra_files=files, extra_manifest={"search": {
                       "file": "search/search.json", "chosen": chosen.pipeline, "accuracy": chosen.accuracy,
                       "acc_drop": chosen.acc_drop, "latency_ratio": chosen.latency_ratio,
                       "speedup_vs_onnxruntime": chosen.speedup_vs_onnxruntime}})
    return doc


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Ticker:
    """Per-generation progress of the search: a transient ``rich`` bar when stderr is a terminal
    (:func:`qcompile.progress.enabled`), else one plain line per generation through ``say`` (bounded by
    --generations: no bar redraws in CI logs)."""

    def __init__(self, say: Progress, bar: bool):
        self.say, self.bar, self.task = say, None, None
        if bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True), transient=True)

    def __call__(self, done: int, total: int, text: str) -> None:
        if self.bar is None:
            self.say(text)
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(text, total=total)
        self.bar.update(self.task, completed=done, description=text)

    def close(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


__all__: Sequence[str] = ("SearchSettings", "parse_budget", "search_and_compile")
