"""Quantization-aware factorization vs factorize-then-quantize: accuracy on real MNIST digits.

    python benchmarks/qaf.py [--models vgg_style resnet_style] [--bits 8 6 4]

For each model (trained here on 3,500 real MNIST digits; test accuracy on the 1,000 held-out
digits), each factorization config (method + rank option) and each weight width: the accuracy of

* ``float``: the ``tucker2`` / ``cp`` pass alone (float factors);
* ``ftq``: the same float chain with every factor rounded per output channel to the ``bits`` grid
  (``s = max|W_c| / Q``, what ``quantize`` does to a factorized layer) — factorize, then quantize;
* ``qaf``: ``qaf{method, rank option, bits}`` — the same chain shapes, factors fitted on the grid.

Weights only (activations float), no fine-tune: the comparison isolates how the factors are
quantized.  Also the mean relative weight error of the factorized layers (qaf vs ftq, from the
qaf pass's provenance).  Prints a table and writes ``results/qaf.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIGS = {
    "tucker2 macs=0.8": ("tucker2", "macs=0.8"),
    "tucker2 macs=0.6": ("tucker2", "macs=0.6"),
    "cp rank=16": ("cp", "rank=16"),
}


def ftq_graph(graph, bits: int):
    """``graph`` with every tucker2 / cp factor weight rounded to the per-channel ``bits`` grid."""
    import numpy as np

    from qcompile.factorize.admm import ftq

    g = graph.clone()
    for n in g.nodes:
        if n.op == "conv2d" and any(p["pass"] in ("tucker2", "cp") for p in n.meta.get("provenance", [])):
            n.inputs[1] = g.add_constant(n.inputs[1] + "_ftq", ftq(g.constants[n.inputs[1]], bits, 0).value
                                         .astype(np.float32))
    g.remove_unused_constants()
    return g


def _layer_errors(graph) -> tuple[float, float]:
    """Mean (qaf, ftq) relative weight error over the layers the qaf pass factorized."""
    seen = {}
    for n in graph.nodes:
        for p in n.meta.get("provenance", []):
            if p["pass"] == "qaf":
                seen[p["source"]] = (p["weight_rel_error"], p["ftq_weight_rel_error"])
    vals = list(seen.values()) or [(float("nan"), float("nan"))]
    return sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["vgg_style", "resnet_style"])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4])
    ap.add_argument("--out", default="benchmarks/results/qaf.json")
    args = ap.parse_args()

    from qcompile.data.mnist import load_mnist_split
    from qcompile.factorize.layers import compute_macs
    from qcompile.frontends import load_model
    from qcompile.models.mnist_nets import evaluate
    from qcompile.passes import PassManager, parse_pipeline

    xte, yte = load_mnist_split().test
    rows = []
    print(f"{'model':13s} {'config':18s} {'MACs':>5s} {'bits':>4s} {'float %':>8s} {'ftq %':>7s} {'qaf %':>7s} "
          f"{'w.err ftq':>9s} {'w.err qaf':>9s} {'qaf s':>6s}")
    for model in args.models:
        base = PassManager(parse_pipeline("fold-bn,dead-code")).run(
            load_model(f"qcompile.models.mnist_nets:{model}").graph)
        a0 = evaluate(base, xte, yte)
        print(f"{model:13s} {'fp32':18s} {1.0:5.2f} {'':4s} {a0:8.2f}")
        for name in args.configs:
            method, opt = CONFIGS[name]
            flt = PassManager(parse_pipeline(f"{method}{{{opt}}}")).run(base)
            a_float = evaluate(flt, xte, yte)
            ratio = compute_macs(flt) / compute_macs(base)
            for bits in args.bits:
                t = time.time()
                q = PassManager(parse_pipeline(f"qaf{{{opt},method={method},bits={bits}}}")).run(base)
                seconds = time.time() - t
                e_qaf, e_ftq = _layer_errors(q)
                row = {"model": model, "config": name, "method": method, "option": opt, "bits": bits,
                       "mac_ratio": ratio, "fp32_accuracy": a0, "float_accuracy": a_float,
                       "ftq_accuracy": evaluate(ftq_graph(flt, bits), xte, yte), "qaf_accuracy": evaluate(q, xte, yte),
                       "ftq_weight_rel_error": e_ftq, "qaf_weight_rel_error": e_qaf, "qaf_seconds": seconds}
                rows.append(row)
                print(f"{model:13s} {name:18s} {ratio:5.2f} {bits:4d} {a_float:8.2f} {row['ftq_accuracy']:7.2f} "
                      f"{row['qaf_accuracy']:7.2f} {e_ftq:9.4f} {e_qaf:9.4f} {seconds:6.1f}", flush=True)
                _write(Path(args.out), {"test_digits": len(yte), "rows": rows})  # after every row: partial runs keep
    return 0


def _write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
