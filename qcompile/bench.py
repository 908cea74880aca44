"""Benchmark harness: models x backends x variants, interleaved, medians and ratios.

Every backend of one model is timed in the same process, *interleaved*: each
round runs every backend once (in a rotating order) for ``number`` calls and keeps
that round's median; the reported latency is the median over rounds, and the
ratio is against a reference backend measured in the same run (default
``onnxruntime``).  Shared, noisy machines make absolute numbers drift; ratios from
interleaved rounds do not.  Every backend's output is also checked against the
original model before it is timed.

Backends: ``torch`` (the original nn.Module, eager), ``onnxruntime`` (fp32),
``onnxruntime-int8`` (static QDQ quantization by onnxruntime's own tool, on
calibration data), ``tvm-x86`` and ``tvm-arm64`` (over RPC; on the emulated board
the numbers are correctness-only and flagged as such).

Results: a table on stdout, ``results.json`` (with the machine description) and
``ratios.png`` in the output folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qcompile.cache import atomic_write
from qcompile.frontends import LoadedModel, load_model
from qcompile.passes import PassContext, PassManager, parse_pipeline
from qcompile.factorize.layers import chain_graph
from qcompile.passes.manager import max_rel_error

RunFn = Callable[[], object]


@dataclass
class Row:
    model: str
    variant: str
    backend: str
    median_ms: float | None
    round_medians_ms: list[float] = field(default_factory=list)
    ratio_vs_ref: float | None = None
    rel_error: float | None = None
    build_s: float | None = None
    note: str = ""
    speedup: float | None = None  # vs the first variant on the same backend (same interleaved run)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0))}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Flags", "L2 cache", "L3 cache", "CPU max MHz"):
                info[key.strip()] = val.strip() if key.strip() != "Flags" else \
                    [f for f in val.split() if f.startswith(("avx512", "avx2", "fma", "amx"))]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from tvm.target import codegen

        info["llvm_cpu"] = codegen.llvm_get_system_cpu()
    except Exception:  # noqa: BLE001
        pass
    return info


def _int8_qdq_model(onnx_bytes: bytes, calibration: Sequence[Mapping[str, np.ndarray]]) -> bytes:
    """Static per-channel QDQ int8 quantization with onnxruntime.quantization (the comparison baseline)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def make_runners(loaded: LoadedModel, graph, backends: Sequence[str], threads: int) -> dict[str, tuple]:
    """backend -> (run_fn, build_seconds, note) for one model variant; run_fn runs calibration feed 0."""
    feed = loaded.calibration[0]
    out: dict[str, tuple] = {}
    for name in backends:
        t0 = time.perf_counter()
        note = ""
        if name == "torch":
            import torch

            torch.set_num_threads(threads)
            run = lambda: loaded.reference(feed)  # noqa: E731 - the original model, eager
        elif name == "onnxruntime-int8":
            from qcompile.backends.onnxruntime_backend import OrtRunner
            from qcompile.frontends.onnx_export import to_onnx

            r = OrtRunner(_int8_qdq_model(to_onnx(graph).SerializeToString(), loaded.calibration), threads)
            run = (lambda r: lambda: r.run(feed))(r)
            note = "QDQ per-channel int8 (onnxruntime.quantization)"
        elif name == "onnxruntime" or name.startswith("tvm-"):
            from qcompile.backends.tvm.lowering import resolve
            from qcompile.factorize.latency import runner_for

            run = runner_for(graph, name, threads, feed)
            if name.startswith("tvm-") and resolve(name[4:]).remote and "QCOMPILE_EMULATED" in os.environ:
                note = "emulated board: correctness only, not a timing"
        else:
            raise ValueError(f"unknown benchmark backend '{name}'")
        out[name] = (run, time.perf_counter() - t0, note)
    return out


SETTLE_S = 0.2
"""Pause after each backend's block: every runtime keeps its default (production) thread pool, and
thread pools busy-wait for a while after a call; the pause lets them go idle so the next backend
measured does not share its cores with the previous one's spinning workers."""


def interleaved(runs: Mapping[Any, RunFn], rounds: int, number: int, warmup: int = 2,
                progress: Callable[[], None] | None = None, settle: float = SETTLE_S,
                clock: Callable[[], float] = time.perf_counter) -> dict[Any, list[float]]:
    """Round-robin timing (the starting point rotates every round); returns key -> per-round median
    seconds of ``clock`` (wall time by default; ``time.thread_time`` for runtimes that compute in the
    calling thread, see :func:`qcompile.factorize.latency.timing_clock`)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
        time.sleep(settle)
    names = list(runs)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            ts = []
            for _ in range(number):
                t = clock()
                runs[n]()
                ts.append(clock() - t)
            per_round[n].append(float(np.median(ts)))
            time.sleep(settle)
            if progress:
                progress()
    return per_round


def bench_model(spec: str, backends: Sequence[str], variants: Mapping[str, str], *, rounds: int = 5,
                number: int = 5, threads: int | None = None, reference: str = "onnxruntime",
                progress=None) -> list[Row]:
    """Time every (variant, backend) pair of one model, all interleaved in the same rounds.

    ``variants`` maps a name to a pipeline; the first is the baseline of ``speedup`` (same backend).
    ``rel_error`` is measured against the original model (lossy variants show their error here).
    """
    threads = threads or len(os.sched_getaffinity(0))
    loaded = load_model(spec, num_calibration=8)
    ref_outputs = loaded.reference(loaded.calibration[0])
    runs, meta = {}, {}
    for variant, pipeline in variants.items():
        ctx = PassContext(calibration=loaded.calibration)
        graph = PassManager(parse_pipeline(pipeline)).run(loaded.graph, ctx)
        for name, (run, build_s, note) in make_runners(loaded, graph, backends, threads).items():
            outs = run()
            outs = outs if isinstance(outs, list) else [outs]
            err = max_rel_error([np.asarray(o) for o in outs], ref_outputs)
            runs[(variant, name)] = run
            meta[(variant, name)] = (build_s, note, err)
    timed = interleaved(runs, rounds, number, progress=progress)
    base = next(iter(variants))
    rows: list[Row] = []
    for (variant, name), per_round in timed.items():
        med = float(np.median(per_round))
        ref = timed.get((variant, reference))
        first = timed.get((base, name))
        build_s, note, err = meta[(variant, name)]
        rows.append(Row(spec.split(":")[-1], variant, name, med * 1e3, [t * 1e3 for t in per_round],
                        med / float(np.median(ref)) if ref else None, err, build_s, note,
                        float(np.median(first)) / med if first and variant != base else None))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'model':<14} {'variant':<14} {'backend':<18} {'median ms':>10} {'x ref':>7} {'speedup':>8} "
            f"{'rel.err':>9} {'build s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r.ratio_vs_ref:.2f}" if r.ratio_vs_ref is not None else "-"
        speed = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        lines.append(f"{r.model:<14} {r.variant:<14} {r.backend:<18} {r.median_ms:>10.2f} {ratio:>7} {speed:>8} "
                     f"{r.rel_error:>9.1e} {r.build_s:>8.1f}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, reference: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({(r.model, r.variant) for r in rows})
    backends = sorted({r.backend for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models)), 4))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        vals = [next((r.ratio_vs_ref for r in rows if (r.model, r.variant) == mv and r.backend == b), np.nan)
                for mv in models]
        ax.bar(np.arange(len(models)) + i * width, vals, width, label=b)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{m}\n{v}" for m, v in models], fontsize=8)
    ax.set_ylabel(f"latency / {reference} (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(specs: Sequence[str], backends: Sequence[str], variants: Mapping[str, str], out_dir: Path, *,
                  rounds: int = 5, number: int = 5, threads: int | None = None,
                  reference: str = "onnxruntime") -> list[Row]:
    from rich.progress import Progress

    from qcompile.frontends import check_model_spec

    for spec in specs:  # a typo in the last model must not cost the whole run
        check_model_spec(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    total = len(specs) * len(variants) * len(backends) * rounds

    def save(complete: bool) -> None:
        result = {"machine": machine(), "reference": reference, "rounds": rounds, "number": number,
                  "threads": threads or len(os.sched_getaffinity(0)), "complete": complete,
                  "rows": [asdict(r) for r in rows]}
        atomic_write(out_dir / "results.json", json.dumps(result, indent=2))

    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)
        for spec in specs:
            bar.update(task, description=f"benchmarking {spec.split(':')[-1]}")
            rows += bench_model(spec, backends, variants, rounds=rounds, number=number, threads=threads,
                                reference=reference, progress=lambda: bar.advance(task))
            save(complete=False)  # partial results survive a later failure or an interrupt
    save(complete=True)
    plot(rows, out_dir / "ratios.png", reference)
    return rows


def layer_latency(original, factorized, layers: Mapping[str, Mapping], backends: Sequence[str], *,
                  rounds: int = 5, number: int = 20, threads: int | None = None) -> list[dict]:
    """Per factorized layer: MACs and measured latency of the original node vs its factor chain.

    ``layers`` is a factorization pass's ``stats["layers"]`` (source node -> rank, macs_before,
    macs_after).  Each layer is built alone for every backend (onnxruntime, tvm-*) and all
    (layer, before/after, backend) runs are timed interleaved in the same rounds.
    """
    from qcompile.factorize.latency import runner_for

    runs, info = {}, {}
    for name, row in layers.items():
        chain = [n for n in factorized.nodes
                 if n.meta.get("provenance") and n.meta["provenance"][-1].get("source") == name]
        for kind, g in (("before", chain_graph(original, [original.node(name)])), ("after", chain_graph(factorized, chain))):
            for b in backends:
                runs[(name, kind, b)] = runner_for(g, b, threads)
        info[name] = row
    timed = interleaved(runs, rounds, number)
    table = []
    for name, row in info.items():
        entry = {"layer": name, "rank": row["rank"], "macs_before": row["macs_before"], "macs_after": row["macs_after"]}
        for b in backends:
            before = float(np.median(timed[(name, "before", b)])) * 1e3
            after = float(np.median(timed[(name, "after", b)])) * 1e3
            entry[b] = {"before_ms": before, "after_ms": after, "speedup": before / after}
        table.append(entry)
    return table


def format_layer_table(table: Sequence[Mapping], backends: Sequence[str]) -> str:
    head = f"{'layer':<28} {'rank':>10} {'MACs x':>7}" + "".join(f" {b + ' ms':>22} {'speedup':>8}" for b in backends)
    lines = [head, "-" * len(head)]
    for e in table:
        line = f"{e['layer'][:28]:<28} {str(e['rank']):>10} {e['macs_before'] / max(e['macs_after'], 1):>6.2f}x"
        for b in backends:
            d = e[b]
            line += f" {d['before_ms']:>10.3f} -> {d['after_ms']:>7.3f} {d['speedup']:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)
