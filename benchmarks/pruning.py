"""Structured pruning (+ int8) with fine-tuning: accuracy on real data, compression, measured TVM latency.

    python benchmarks/pruning.py accuracy   # MNIST ResNet/Inception/Dense-style nets trained here
    python benchmarks/pruning.py latency    # ResNet-18 at 224x224 on tvm-x86 (random weights: latency only)

``accuracy``: for each model (trained here on 3,500 real MNIST digits; test accuracy on 1,000
held-out digits):

1. ``prune-channels{macs=M,criterion=C},fold-bn`` for each criterion (magnitude, bn, qubo) at the
   *same* MAC budget, accuracy before and after a short distillation fine-tune from the original
   (``qcompile.finetune``: Adam, early stopping on the 500-digit validation split) -- does the QUBO
   selection beat the baselines at equal MACs?
2. the best pruned model, then ``quantize`` (int8 weights per channel, calibrated int8
   activations), then quantization-aware fine-tuning (STE, learned scales);
3. compression = conv/linear weight bytes of the fp32 original / of the result (int8 one byte per
   weight), and the tvm-x86 latency of the original fp32, pruned fp32 and pruned int8 builds, all
   timed interleaved in the same rounds (medians).

Writes ``pruning.json`` and ``pruning.png`` under ``--out``.  ``latency``: ResNet-18 pruned to
``--macs`` of its MACs vs the original, tvm-x86, interleaved medians.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from quantization import weight_bytes  # noqa: E402  (benchmarks/ is the script's directory)

CRITERIA = ("magnitude", "bn", "qubo")


def _machine() -> str:
    from qcompile.bench import machine

    m = machine()
    return f"{m.get('Model name', m['platform'])}, {m['affinity']} cores, LLVM cpu {m.get('llvm_cpu', '?')}"


def accuracy(args) -> None:
    from qcompile.bench import interleaved
    from qcompile.data.mnist import load_mnist_split
    from qcompile.factorize.latency import runner_for
    from qcompile.finetune import finetune
    from qcompile.frontends import load_model
    from qcompile.models.mnist_nets import evaluate
    from qcompile.passes import PassContext, PassManager, parse_pipeline

    split = load_mnist_split()
    (xtr, ytr), (xva, yva), (xte, yte) = split.train, split.val, split.test
    calib = [{"image": xtr[i:i + 1]} for i in range(256)]  # real training digits
    ctx = PassContext(calibration=calib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": _machine(), "macs": args.macs, "epochs": args.epochs, "models": []}

    def tune(graph, teacher, epochs):
        t = time.time()
        res = finetune(graph, xtr, ytr, val_images=xva, val_labels=yva, teacher=teacher, epochs=epochs,
                       patience=2, lr=args.lr, progress=False)
        return res.graph, time.time() - t

    for model in args.models:
        loaded = load_model(f"qcompile.models.mnist_nets:{model}")
        base = PassManager(parse_pipeline("fold-bn,dead-code")).run(loaded.graph)
        a0 = evaluate(base, xte, yte)
        row = {"model": model, "fp32_accuracy": a0, "weight_bytes": weight_bytes(base), "criteria": {}}
        print(f"{model}: fp32 {a0:.2f} %, {row['weight_bytes'] / 1024:.1f} KiB", flush=True)
        best = None
        for crit in CRITERIA:
            t = time.time()
            pm = PassManager(parse_pipeline(f"prune-channels{{macs={args.macs},criterion={crit}}},fold-bn"))
            pruned = pm.run(loaded.graph, ctx)
            t_pass = time.time() - t
            before = evaluate(pruned, xte, yte)
            tuned, t_ft = tune(pruned, loaded.graph, args.epochs)
            after = evaluate(tuned, xte, yte)
            row["criteria"][crit] = {"mac_ratio": pm.records[0].stats["mac_ratio"], "before_finetune": before,
                                     "after_finetune": after, "pass_s": t_pass, "finetune_s": t_ft,
                                     "weight_bytes": weight_bytes(tuned)}
            print(f"  {crit:9s} macs {pm.records[0].stats['mac_ratio']:.3f}: {before:6.2f} % -> fine-tuned "
                  f"{after:6.2f} % (pass {t_pass:.1f}s, fine-tune {t_ft:.0f}s)", flush=True)
            if best is None or after > best[1]:
                best = (crit, after, tuned)
        crit, _, pruned = best
        q = PassManager(parse_pipeline("quantize")).run(pruned, ctx)
        a_q = evaluate(q, xte, yte)
        q_tuned, t_qat = tune(q, loaded.graph, max(2, args.epochs // 2))
        a_qat = evaluate(q_tuned, xte, yte)
        print(f"  {crit} + int8: {a_q:.2f} % -> QAT {a_qat:.2f} % ({t_qat:.0f}s)", flush=True)
        feed = {"image": xte[:1]}
        variants = {"fp32": base, "pruned fp32": pruned, "pruned int8": q_tuned}
        timed = interleaved({k: runner_for(g, "tvm-x86", None, feed) for k, g in variants.items()},
                            rounds=args.rounds, number=args.number)
        ms = {k: float(np.median(v)) * 1e3 for k, v in timed.items()}
        row.update(best_criterion=crit, int8_accuracy=a_q, qat_accuracy=a_qat, qat_s=t_qat,
                   final_drop=a0 - a_qat, final_weight_bytes=weight_bytes(q_tuned),
                   compression_pruned=row["weight_bytes"] / weight_bytes(pruned),
                   compression_final=row["weight_bytes"] / weight_bytes(q_tuned), tvm_x86_ms=ms)
        print(f"  compression: pruned x{row['compression_pruned']:.2f}, pruned+int8 x{row['compression_final']:.2f}"
              f" at {a0 - a_qat:+.2f} pt drop; tvm-x86 ms " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()),
              flush=True)
        results["models"].append(row)
        (out / "pruning.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "pruning.png")
    _table(results)


def _table(results) -> None:
    print(f"\nmachine: {results['machine']}; prune budget macs={results['macs']}; real MNIST test split")
    print(f"{'model':15s} {'fp32':>6s} " + " ".join(f"{c + ' (ft)':>16s}" for c in CRITERIA)
          + f" {'+int8 QAT':>9s} {'drop':>6s} {'compr.':>7s} {'tvm fp32':>9s} {'pruned':>7s} {'int8':>7s}")
    for r in results["models"]:
        crit = " ".join(f"{v['before_finetune']:6.2f}->{v['after_finetune']:6.2f}  " for v in r["criteria"].values())
        ms = r["tvm_x86_ms"]
        print(f"{r['model']:15s} {r['fp32_accuracy']:6.2f} {crit} {r['qat_accuracy']:9.2f} {r['final_drop']:+6.2f} "
              f"x{r['compression_final']:6.2f} {ms['fp32']:8.3f}m {ms['pruned fp32']:6.3f}m {ms['pruned int8']:6.3f}m")


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    models = [r["model"] for r in results["models"]]
    x = np.arange(len(models))
    for i, crit in enumerate(CRITERIA):
        axes[0].bar(x + (i - 1) * 0.25, [r["criteria"][crit]["after_finetune"] for r in results["models"]], 0.25,
                    label=crit)
    axes[0].plot(x, [r["fp32_accuracy"] for r in results["models"]], "k_", markersize=30, label="fp32")
    axes[0].set_xticks(x, models)
    axes[0].set_ylim(90, 100)
    axes[0].set_ylabel("test accuracy % after fine-tune")
    axes[0].set_title(f"equal MACs ({results['macs']})")
    axes[0].legend(fontsize=7, loc="lower left")
    for j, k in enumerate(("fp32", "pruned fp32", "pruned int8")):
        axes[1].bar(x + (j - 1) * 0.25, [r["tvm_x86_ms"][k] for r in results["models"]], 0.25, label=k)
    axes[1].set_xticks(x, models)
    axes[1].set_ylabel("tvm-x86 ms / image (median)")
    axes[1].legend(fontsize=7)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def latency(args) -> None:
    from qcompile.bench import interleaved
    from qcompile.factorize.latency import runner_for
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline

    loaded = load_model("qcompile.models.zoo:resnet18")
    graphs = {"original": PassManager(parse_pipeline("fold-bn,dead-code")).run(loaded.graph)}
    for m in args.macs_list:
        graphs[f"pruned macs={m}"] = PassManager(parse_pipeline(
            f"prune-channels{{macs={m},compensate=false}},fold-bn,dead-code")).run(loaded.graph)
    t = time.time()
    runs = {k: runner_for(g, "tvm-x86") for k, g in graphs.items()}
    print(f"built {len(runs)} tvm-x86 variants in {time.time() - t:.0f}s")
    timed = interleaved(runs, rounds=args.rounds, number=args.number)
    ms = {k: float(np.median(v)) * 1e3 for k, v in timed.items()}
    rows = [{"variant": k, "params": g.param_count(), "tvm_x86_ms": ms[k], "ratio": ms[k] / ms["original"]}
            for k, g in graphs.items()]
    for r in rows:
        print(f"{r['variant']:18s} params {r['params'] / 1e6:6.2f} M  tvm-x86 {r['tvm_x86_ms']:8.2f} ms  "
              f"x{r['ratio']:.3f} of original")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--models", nargs="*", default=["resnet_style", "inception_style", "dense_style"])
    acc.add_argument("--macs", type=float, default=0.5)
    acc.add_argument("--epochs", type=int, default=6)
    acc.add_argument("--lr", type=float, default=1e-3)
    acc.add_argument("--rounds", type=int, default=7)
    acc.add_argument("--number", type=int, default=20)
    acc.add_argument("--out", default="benchmarks/results/pruning")
    lat = sub.add_parser("latency")
    lat.add_argument("--macs-list", type=float, nargs="*", default=[0.5, 0.3])
    lat.add_argument("--rounds", type=int, default=7)
    lat.add_argument("--number", type=int, default=5)
    lat.add_argument("--out", default="benchmarks/results/pruning")
    args = ap.parse_args()
    {"accuracy": accuracy, "latency": latency}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
