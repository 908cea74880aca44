"""Backend comparison on the seed CNNs: torch, onnxruntime fp32/int8, TVM x86 (and arm64 via RPC).

    python benchmarks/backends.py                         # all five seed models + the bundled one
    python benchmarks/backends.py --models resnet18 vgg16 --backends onnxruntime,tvm-x86 --rounds 7

Prints the table, writes ``results.json`` (machine description included) and ``ratios.png`` into
``--out``.  Latencies are medians of interleaved rounds (see qcompile/bench.py); ratios are
against onnxruntime fp32 measured in the same run.  Random weights: latency only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompile.bench import format_table, machine, run_benchmark

ZOO = ("resnet18", "vgg16", "googlenet", "densenet121", "mobilenet_v2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[*ZOO, "digits_cnn"], choices=[*ZOO, "digits_cnn"])
    ap.add_argument("--backends", default="torch,onnxruntime,onnxruntime-int8,tvm-x86")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/backends")
    args = ap.parse_args()
    specs = [("qcompile.models.digits:" if m == "digits_cnn" else "qcompile.models.zoo:") + m for m in args.models]
    rows = run_benchmark(specs, args.backends.split(","), {"original": "fold-bn,dead-code"}, Path(args.out),
                         rounds=args.rounds, number=args.number)
    m = machine()
    print(f"machine: {m.get('Model name', '?')} ({m.get('llvm_cpu', '?')}), {m['affinity']} cores")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
