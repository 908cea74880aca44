"""Quantization: accuracy on real data, weight size, and measured latency of int8 / int4 builds.

    python benchmarks/quantization.py accuracy   # MNIST VGG-style / ResNet-style (trained here)
    python benchmarks/quantization.py latency    # ResNet-18 / VGG-16 at 224x224 (latency only)

``accuracy``: the models trained here on 3,500 real MNIST digits, test accuracy on 1,000 held-out
digits for fp32 and for each quantize configuration (observers; all-int4 weights; mixed precision
chosen by the pass under a weight-size budget), with the weight bytes (int4 packed two per byte)
and the tvm-x86 latency of each build, all builds timed interleaved in the same rounds.  Writes
``accuracy.json`` and ``tradeoff.png`` (accuracy vs weight size, latency as labels).

``latency``: the harness (``qcompile.bench``) on the seed models, variants ``original`` (fp32)
and ``int8`` (``quantize``, per-channel weights, calibrated activations), backends onnxruntime
(runs our QDQ graph for the int8 variant), onnxruntime-int8 (onnxruntime's own static QDQ
quantizer on the fp32 graph: the int8 baseline) and tvm-x86 (our integer lowering).  Random
weights: latency only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIGS = {
    "int8 minmax": "quantize{observer=minmax}",
    "int8 percentile": "quantize{observer=percentile}",
    "int8 mse": "quantize{observer=mse}",
    "mixed size=0.75": "quantize{size=0.75}",
    "mixed size=0.6": "quantize{size=0.6}",
    "int4 weights": "quantize{weight_bits=4}",
}


def weight_bytes(graph) -> int:
    """Bytes of conv/linear weights as stored: fp32 4, int8 1, int4 0.5 per value."""
    total = 0.0
    prod = graph.producers()
    for n in graph.nodes:
        if n.op not in ("conv2d", "linear"):
            continue
        w = n.inputs[1]
        if w in graph.constants:
            total += graph.constants[w].size * 4
        elif w in prod and prod[w].op == "dequantize_linear":
            dq = prod[w]
            total += graph.types[dq.inputs[0]].numel * dq.attrs["bits"] / 8
    return int(total)


def accuracy(args) -> None:
    import numpy as np

    from qcompile.bench import interleaved
    from qcompile.data.mnist import load_mnist_split
    from qcompile.factorize.latency import runner_for
    from qcompile.frontends import load_model
    from qcompile.models.mnist_nets import evaluate
    from qcompile.passes import PassContext, PassManager, parse_pipeline

    split = load_mnist_split()
    (xtr, _), (xte, yte) = split.train, split.test
    calib = [{"image": xtr[i:i + 1]} for i in range(256)]  # real training digits
    results = []
    for model in args.models:
        base = PassManager(parse_pipeline("fold-bn,dead-code")).run(
            load_model(f"qcompile.models.mnist_nets:{model}").graph)
        graphs, int4 = {"fp32": base}, {}
        for name, text in CONFIGS.items():
            t = time.time()
            pm = PassManager(parse_pipeline(text))
            graphs[name] = pm.run(base, PassContext(calibration=calib))
            int4[name] = pm.records[-1].stats["int4_layers"]
            print(f"  {model} {name}: quantized in {time.time() - t:.1f}s")
        feed = {"image": xte[:1]}
        timed = interleaved({k: runner_for(g, "tvm-x86", None, feed) for k, g in graphs.items()},
                            rounds=args.rounds, number=args.number)
        a0 = evaluate(base, xte, yte)
        for name, g in graphs.items():
            acc = evaluate(g, xte, yte)
            row = {"model": model, "config": name, "pipeline": CONFIGS.get(name, "fold-bn,dead-code"),
                   "accuracy": acc, "drop": a0 - acc, "weight_bytes": weight_bytes(g),
                   "tvm_x86_ms": float(np.median(timed[name])) * 1e3, "int4_layers": int4.get(name, [])}
            results.append(row)
            print(f"{model:13s} {name:16s} acc {acc:6.2f} % (drop {a0 - acc:+.2f} pt)  weights "
                  f"{row['weight_bytes'] / 1024:8.1f} KiB  tvm-x86 {row['tvm_x86_ms']:.3f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "tradeoff.png")


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in sorted({r["model"] for r in results}):
        rows = [r for r in results if r["model"] == model]
        ax.plot([r["weight_bytes"] / 1024 for r in rows], [r["accuracy"] for r in rows], "o", label=model)
        for r in rows:
            ax.annotate(f"{r['config']} {r['tvm_x86_ms']:.2f}ms", (r["weight_bytes"] / 1024, r["accuracy"]),
                        fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("conv/linear weight KiB (log)")
    ax.set_ylabel("MNIST test accuracy %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def latency(args) -> None:
    from qcompile.bench import format_table, run_benchmark

    rows = run_benchmark([f"qcompile.models.zoo:{m}" for m in args.models], args.backends.split(","),
                         {"original": "fold-bn,dead-code", "int8": "fold-bn,dead-code,quantize"},
                         Path(args.out), rounds=args.rounds, number=args.number)
    print(format_table(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    accp = sub.add_parser("accuracy")
    accp.add_argument("--models", nargs="*", default=["vgg_style", "resnet_style"])
    accp.add_argument("--rounds", type=int, default=7)
    accp.add_argument("--number", type=int, default=20)
    accp.add_argument("--out", default="benchmarks/results/quantization")
    lat = sub.add_parser("latency")
    lat.add_argument("--models", nargs="*", default=["resnet18", "vgg16"])
    lat.add_argument("--backends", default="onnxruntime,onnxruntime-int8,tvm-x86")
    lat.add_argument("--rounds", type=int, default=7)
    lat.add_argument("--number", type=int, default=5)
    lat.add_argument("--out", default="benchmarks/results/quantization")
    args = ap.parse_args()
    {"accuracy": accuracy, "latency": latency}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
