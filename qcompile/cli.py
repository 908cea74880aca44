"""Command line: ``qcompile compile | finetune | search | verify | passes | inspect | run | bench``.

Exit codes: 0 success, 2 usage or input error (bad model, pipeline, shape, target),
1 internal error (a bug, or an artifact that failed verification).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Sequence

import numpy as np

from qcompile.errors import InputError, QCompileError, ShapeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to an .onnx file, or module:factory returning a torch nn.Module")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1xD2x...",
                   help="static shape for an input (specialises dynamic dims); repeatable")


def _check_writable(out: str) -> None:
    """InputError naming OUT when its folder cannot be written (a read-only or virtual file system, a
    file in the way), probed before any work instead of failing at the end: the nearest existing
    ancestor must take a temporary folder (created and removed at once)."""
    import tempfile

    ancestor = Path(out).absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write the output '{out}': '{ancestor}' is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".qcompile-probe-", dir=ancestor)).rmdir()
    except OSError as e:
        raise InputError(f"cannot write the output '{out}': nothing can be created in '{ancestor}' "
                         f"({e.strerror or e})") from None


def _cmd_compile(args: argparse.Namespace) -> int:
    from qcompile.compiler import CompileOptions, compile_model
    from qcompile.frontends import parse_input_shapes
    from qcompile.passes.instruments import DumpIR, PrintAfterChange, Timing

    _check_writable(args.out)
    instruments = []
    timing = Timing() if args.timing else None
    if timing:
        instruments.append(timing)
    if args.dump_ir:
        instruments.append(DumpIR(args.dump_ir))
    if args.print_after_change:
        instruments.append(PrintAfterChange())
    opts = CompileOptions(input_shapes=parse_input_shapes(args.input_shape), calibration=args.calib,
                          num_calibration=args.num_calib, verify_each_pass=args.verify_each_pass,
                          max_rel_error=args.max_rel_error, force=args.force, instruments=instruments,
                          repro_dir=Path(args.repro_dir) if args.repro_dir else None, profile=args.profile,
                          backend_options={k: v for k, v in (("tune_trials", args.tune_trials),
                                                             ("mcpu", args.mcpu)) if v})
    result = compile_model(args.model, args.pipeline, args.target, args.out, opts)
    if timing:
        print(timing.table(), file=sys.stderr)
    m = result.manifest
    v = m["verification"]
    before, after = m["costs"]["before"], m["costs"]["after"]
    print(f"compiled {args.model} -> {result.out_dir} [target {m['target']['name']}]")
    print(f"  pipeline: {m['pipeline'] or '(none)'}")
    print(f"  MACs {before['macs']:,} -> {after['macs']:,}; params {before['params']:,} -> {after['params']:,}; "
          f"nodes {before['nodes']} -> {after['nodes']}")
    print(f"  verified on {v['feeds']} feeds ({v['calibration']}): max abs error {v['max_abs_error']:.3g}, "
          f"max rel error {v['max_rel_error']:.3g}")
    for name, f in m["files"].items():
        print(f"  {name}  {f['bytes']:,} bytes  sha256 {f['sha256'][:16]}...")
    return 0


def _finetune_source(args: argparse.Namespace) -> tuple[str, str, str, list[str]]:
    """(model spec, pipeline, target, input shapes) from the arguments, or from the manifest when
    MODEL is an artifact directory (its source model and pipeline; a previous finetune is replaced)."""
    from qcompile.artifact import MANIFEST, read_manifest
    from qcompile.finetune import Finetune
    from qcompile.passes import format_pipeline, parse_pipeline
    from qcompile.targets import get_target

    src = Path(args.model)
    if not (src.is_dir() and (src / MANIFEST).exists()):
        if src.is_dir():
            raise InputError(f"'{src}' is a directory without {MANIFEST}: give a model (.onnx or module:factory) "
                             "or an artifact directory written by `qcompile compile`")
        return args.model, args.pipeline or "", args.target or "onnxruntime", list(args.input_shape)
    if args.pipeline is not None:
        raise InputError(f"-p/--pipeline cannot be combined with the artifact '{src}': its manifest's pipeline "
                         "is used (give the original model to choose another pipeline)")
    m = read_manifest(src)
    spec = (m.get("source") or {}).get("spec")
    if not spec:
        raise InputError(f"artifact '{src}' does not record its source model (manifest source.spec)")
    target = args.target or m["target"]["name"]
    passes = parse_pipeline(m.get("pipeline") or "")
    phases = parse_pipeline(",".join(get_target(m["target"]["name"]).phases))
    if phases and passes[-len(phases):] == phases:
        passes = passes[:-len(phases)]
    pipeline = format_pipeline([p for p in passes if not isinstance(p, Finetune)])
    shapes = list(args.input_shape) or [f"{i['name']}={'x'.join(map(str, i['shape']))}" for i in m["inputs"]]
    return spec, pipeline, target, shapes


def _cmd_finetune(args: argparse.Namespace) -> int:
    from qcompile.compiler import CompileOptions
    from qcompile.finetune import FinetuneOptions, finetune_model
    from qcompile.frontends import parse_input_shapes

    _check_writable(args.out)
    spec, pipeline, target, shapes = _finetune_source(args)
    ft = FinetuneOptions(data=args.data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         patience=args.patience, kd_weight=args.kd_weight, temperature=args.temperature,
                         learn_scales=not args.fixed_scales, seed=args.seed)
    opts = CompileOptions(input_shapes=parse_input_shapes(shapes), calibration=args.calib,
                          num_calibration=args.num_calib, max_rel_error=args.max_rel_error, force=args.force)
    result = finetune_model(spec, pipeline, target, args.out, ft, opts, progress=not args.quiet)
    m = result.manifest
    st = next(r for r in m["passes"] if r["name"] == "finetune")["stats"]
    v = m["verification"]

    def pct(x) -> str:
        return "n/a" if x is None else f"{x:.2f} %"
    print(f"fine-tuned {spec} -> {result.out_dir} [target {m['target']['name']}]")
    print(f"  pipeline: {m['pipeline']}")
    print(f"  {'quantization-aware ' if st['qat'] else ''}fine-tune on {st['data']}: {st['epochs_run']} epoch(s), "
          f"best epoch {st['best_epoch']}{' (diverged)' if st['diverged'] else ''}")
    print(f"  validation accuracy {pct(st['val_acc_before'])} -> {pct(st['val_acc_after'])}")
    if "test_acc_before" in st:
        print(f"  test accuracy {pct(st['test_acc_before'])} -> {pct(st['test_acc_after'])}")
    print(f"  verified on {v['feeds']} feeds ({v['calibration']}): max rel error vs original {v['max_rel_error']:.3g}, "
          f"vs fine-tuned IR {v['backend_vs_compressed_ir_rel_error']:.3g}")
    return 0


def _ratios(text: str, what: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, not '{text}'") from None


def _cmd_search(args: argparse.Namespace) -> int:
    from qcompile.frontends import parse_input_shapes
    from qcompile.search.driver import SearchSettings, parse_budget, search_and_compile, stderr_progress
    from qcompile.search.nsga import Budget

    _check_writable(args.out)
    budget = parse_budget(args.budget)
    if args.max_proxy_error is not None:
        budget = Budget(budget.latency, budget.memory, args.max_proxy_error)
    bits = tuple(int(b) for b in _ratios(args.bits, "--bits"))
    if any(b not in (8, 4) for b in bits):
        raise InputError(f"--bits takes 8 and/or 4, not {args.bits}")
    prune = _ratios(args.prune, "--prune")
    if not prune or any(not 0 < r <= 1 for r in prune):
        raise InputError(f"--prune ratios must lie in (0, 1], got {args.prune}")
    settings = SearchSettings(budget=budget, max_acc_drop=args.max_acc_drop, data=args.data or "", bits=bits,
                              ranks_per_layer=args.ranks_per_layer, prune_ratios=tuple(sorted(set(prune) | {1.0},
                                                                                               reverse=True)),
                              pop_size=args.pop, generations=args.generations, seed=args.seed,
                              use_predictor=not args.no_predictor, finalists=args.finalists,
                              check_points=args.check_points, rounds=args.rounds,
                              finetune_epochs=args.finetune_epochs, finetune_points=args.finetune_points,
                              prune_finetune_epochs=args.prune_finetune_epochs,
                              prune_progressive=args.prune_progressive, threads=args.threads)
    if args.finetune_epochs < 0 or args.finetune_points < 0 or args.prune_finetune_epochs < 0:
        raise InputError("--finetune-epochs, --finetune-points and --prune-finetune-epochs must be >= 0")
    if args.prune_finetune_epochs and len(settings.prune_ratios) == 1:
        raise InputError("--prune-finetune-epochs fine-tunes pruned models: offer prune ratios below 1 with --prune")
    if args.prune_progressive and not args.prune_finetune_epochs:
        raise InputError("--prune-progressive prunes each ratio from the next larger ratio's fine-tuned model: "
                         "it needs --prune-finetune-epochs N")
    doc = search_and_compile(args.model, args.target, args.out, settings,
                             input_shapes=parse_input_shapes(args.input_shape), calibration=args.calib,
                             num_calibration=args.num_calib, force=args.force,
                             progress=None if args.quiet else stderr_progress)
    c = doc["chosen"]
    print(f"searched {args.model} on {args.target} -> {args.out}")
    print(f"  front: {len(doc['front'])} points; {doc['pairs_measured']}/{doc['space_size']} (layer, configuration) "
          f"pairs measured ({doc['measurements_saved']} saved by the predictor); {doc['wall_s']:.1f} s search")
    print(f"  chosen: {c['pipeline']}")
    print(f"  validation accuracy {doc['original']['accuracy']:.2f} % -> {c['accuracy']:.2f} % "
          f"(drop {c['acc_drop']:.2f} pt)" + (f"; test {doc['original']['test_accuracy']:.2f} % -> "
                                               f"{c['test_accuracy']:.2f} %" if "test_accuracy" in c else ""))
    print(f"  measured latency {c['latency_ratio']:.3g}x the original on {args.target}; "
          f"speed-up over onnxruntime fp32 on the original {c['speedup_vs_onnxruntime']:.2f}x")
    print(f"  front and finalists: {Path(args.out) / 'search'}/search.json, front.png")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from qcompile.passes import PASSES
    from qcompile.passes.base import option_docs
    from qcompile.targets import TARGETS

    print("passes:")
    for name, cls in sorted(PASSES.items()):
        kind = "exact" if cls.exact else "lossy"
        print(f"  {name:<18} [{kind}] {cls.summary}")
        for o in option_docs(cls.Options):
            print(f"      {o['name']}: {o['type']} = {o['default']!r}  {o['doc']}")
    print("targets:")
    for t in TARGETS.values():
        print(f"  {t.name:<18} {t.description}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qcompile.frontends import load_model, parse_input_shapes
    from qcompile.ir.costs import format_cost_table
    from qcompile.ir.printer import format_graph
    from qcompile.passes import PassManager, parse_pipeline

    loaded = load_model(args.model, parse_input_shapes(args.input_shape))
    graph = loaded.graph
    if args.pipeline:
        graph = PassManager(parse_pipeline(args.pipeline)).run(graph)
    if not args.costs_only:
        print(format_graph(graph, constants=args.constants))
        print()
    print(format_cost_table(graph, only_heavy=not args.all_nodes))
    return 0


def _parse_run_inputs(items: Sequence[str], manifest: dict) -> dict[str, np.ndarray]:
    specs = {i["name"]: i for i in manifest["inputs"]}
    feed: dict[str, np.ndarray] = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep:
            if len(specs) != 1:
                raise InputError(f"model has inputs {list(specs)}: use --input NAME=file.npy")
            name, path = next(iter(specs)), item
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read input file '{path}': {e}") from e
        if isinstance(data, np.lib.npyio.NpzFile):
            feed.update({k: data[k] for k in data.files})
        else:
            feed[name] = data
    for name, spec in specs.items():
        if name not in feed:
            raise InputError(f"missing input '{name}' (expected shape {spec['shape']}, {spec['dtype']})")
        arr = np.asarray(feed[name])
        if list(arr.shape) != spec["shape"]:
            raise ShapeError(f"input '{name}' has shape {list(arr.shape)}, the artifact expects {spec['shape']}")
        feed[name] = arr.astype(spec["dtype"], copy=False)
    extra = set(feed) - set(specs)
    if extra:
        raise InputError(f"unknown inputs {sorted(extra)}; the artifact takes {list(specs)}")
    return feed


def _cmd_run(args: argparse.Namespace) -> int:
    from qcompile.artifact import read_manifest
    from qcompile.targets import get_target

    out_dir = Path(args.artifact)
    manifest = read_manifest(out_dir)
    runner = get_target(manifest["target"]["name"]).backend.load(out_dir, manifest)
    feed = _parse_run_inputs(args.input, manifest)
    outputs = runner.run(feed)
    for spec, y in zip(manifest["outputs"], outputs):
        flat = y.reshape(-1)
        extra = f" argmax(last axis)={np.argmax(y, axis=-1).tolist()}" if y.ndim >= 1 and y.shape[-1] > 1 else ""
        print(f"{spec['name']}: shape {list(y.shape)} {y.dtype} first={np.array2string(flat[:6], precision=4)}{extra}")
    if args.output:
        np.savez(args.output, **{s["name"]: y for s, y in zip(manifest["outputs"], outputs)})
        print(f"outputs saved to {args.output}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from qcompile.errors import NumericsError
    from qcompile.verify import ArtifactMismatch, verify_artifact

    try:
        result = verify_artifact(args.artifact, numerics=not args.files_only)
    except (ArtifactMismatch, NumericsError) as e:  # the artifact failed a check: exit 1, not a qcompile bug
        print(f"qcompile verify: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"verified {result.out_dir}")
    for line in result.lines:
        print(f"  {line}")
    return 0


SEED_SPECS = [f"qcompile.models.zoo:{n}" for n in ("resnet18", "vgg16", "googlenet", "densenet121",
                                                     "mobilenet_v2")] + ["qcompile.models.digits:digits_cnn"]


def _cmd_bench(args: argparse.Namespace) -> int:
    from qcompile.bench import format_table, machine, run_benchmark

    variants = {"original": "fold-bn,dead-code"}
    for item in args.variant:
        name, sep, pipe = item.partition("=")
        if not sep:
            raise InputError(f"bad --variant '{item}': expected NAME=PIPELINE")
        variants[name] = pipe
    rows = run_benchmark(args.models or SEED_SPECS, args.backends.split(","), variants, Path(args.out),
                         rounds=args.rounds, number=args.number, threads=args.threads, reference=args.reference)
    m = machine()
    print(f"machine: {m.get('Model name', '?')} ({m.get('llvm_cpu', '?')}), {m['affinity']} cores usable; "
          f"threads {args.threads or m['affinity']}; medians of {args.rounds} interleaved rounds x {args.number} runs")
    print(format_table(rows))
    print(f"results: {Path(args.out) / 'results.json'}, plot: {Path(args.out) / 'ratios.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks for all errors")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model through a pipeline for a target")
    _add_model_args(c)
    c.add_argument("-p", "--pipeline", default="", help="pipeline text, e.g. 'fold-bn,dead-code,annotate-costs'")
    c.add_argument("-t", "--target", default="onnxruntime", help="target name (see `qcompile passes`)")
    c.add_argument("-o", "--out", required=True, help="output directory (created atomically)")
    c.add_argument("--calib", help=".npy (N, ...) or .npz keyed by input name: real calibration samples")
    c.add_argument("--num-calib", type=int, default=16, help="calibration feeds used for verification")
    c.add_argument("--verify-each-pass", action="store_true", help="check numerics after every pass")
    c.add_argument("--max-rel-error", type=float, help="fail if the artifact's relative error exceeds this")
    c.add_argument("--timing", action="store_true", help="print per-pass timing")
    c.add_argument("--profile", action="store_true",
                   help="time each layer of the compiled artifact on its backend (1 thread, median of 15 runs) and "
                        "add its latency share to the report; the artifact's bytes then differ from compile to compile")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass to DIR/NNN_<pass>.txt")
    c.add_argument("--print-after-change", action="store_true", help="print the IR after each pass that changed it")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="TVM targets: tune each kernel with N MetaSchedule trials (database in the cache folder; "
                        "kernels tuned before are reused; a tuned schedule is kept only where it is faster)")
    c.add_argument("--mcpu", help="tvm-x86: LLVM CPU name to generate code for (default: this machine's CPU)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--repro-dir", help="where a failing compile writes its reproducer (default: cache dir)")
    c.set_defaults(fn=_cmd_compile)

    f = sub.add_parser("finetune", help="compile with a fine-tune (quantization-aware for quantized pipelines) "
                                        "on real labelled data, distilling from the original model")
    f.add_argument("model", help="an .onnx file, module:factory, or an artifact directory (its source model, "
                                 "pipeline and target are reused)")
    f.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1xD2x...",
                   help="static shape for an input (specialises dynamic dims); repeatable")
    f.add_argument("-p", "--pipeline", default=None, help="pipeline run before fine-tuning, e.g. "
                                                           "'fold-bn,quantize{weight_bits=4}'")
    f.add_argument("-t", "--target", default=None, help="target name (default: onnxruntime, or the artifact's)")
    f.add_argument("-o", "--out", required=True, help="output directory (created atomically)")
    f.add_argument("--data", default="digits", help="training data: digits, mnist (bundled real data, fixed "
                                                    "train/val/test split) or an .npz with x_train, y_train, "
                                                    "optional x_val, y_val, x_test, y_test")
    f.add_argument("--epochs", type=int, default=5, help="maximum epochs (default 5)")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, weights and scales (default 1e-3)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--patience", type=int, default=2, help="stop after N epochs without validation gain")
    f.add_argument("--kd-weight", type=float, default=0.5, help="distillation loss weight in [0, 1] (default 0.5)")
    f.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    f.add_argument("--fixed-scales", action="store_true", help="QAT: keep the calibrated quantization scales")
    f.add_argument("--seed", type=int, default=0, help="batch order seed")
    f.add_argument("--calib", help=".npy (N, ...) or .npz keyed by input name: real calibration samples")
    f.add_argument("--num-calib", type=int, default=16, help="calibration feeds used for verification")
    f.add_argument("--max-rel-error", type=float, help="fail if the artifact's relative error exceeds this")
    f.add_argument("--force", action="store_true", help="replace OUT if it exists")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    f.set_defaults(fn=_cmd_finetune)

    s = sub.add_parser("search", help="search per-layer rank / bits / prune ratio under budgets with measured "
                                      "latency, check the finalists, compile the chosen point")
    _add_model_args(s)
    s.add_argument("-t", "--target", default="onnxruntime", help="target whose latency is measured and compiled for")
    s.add_argument("-o", "--out", required=True, help="output directory: the artifact plus search/search.json "
                                                      "and search/front.png (created atomically)")
    s.add_argument("--budget", default="", help="ratios of the original, e.g. 'latency=0.4x,memory=0.5x'")
    s.add_argument("--max-acc-drop", type=float, default=1.0, help="accuracy points the chosen point may lose "
                                                                   "on the validation split (default 1)")
    s.add_argument("--max-proxy-error", type=float, help="also bound the search's proxy error (relative output L2)")
    s.add_argument("--data", help="labelled data: digits, mnist, or .npz with x_val, y_val (default: the model's "
                                  "own data set)")
    s.add_argument("--bits", default="8,4", help="weight bit-widths offered per layer besides fp32 (default 8,4)")
    s.add_argument("--ranks-per-layer", type=int, default=2, help="Tucker-2 ranks offered per k x k conv")
    s.add_argument("--prune", default="1", help="model-level MAC keep ratios offered, e.g. '1,0.75,0.5'")
    s.add_argument("--pop", type=int, default=16, help="NSGA-II population (default 16)")
    s.add_argument("--generations", type=int, default=8, help="NSGA-II generations (default 8)")
    s.add_argument("--finalists", type=int, default=4, help="front points checked end to end (default 4)")
    s.add_argument("--check-points", type=int, default=16, help="front points whose validation accuracy is "
                                                                "measured, spread over latency (default 16)")
    s.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds for the finalists")
    s.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune (distillation, QAT when quantized) checked points that miss --max-acc-drop "
                        "for up to N epochs on the data's training split; the chosen point's pipeline then ends "
                        "with finetune{...} (default 0: off)")
    s.add_argument("--finetune-points", type=int, default=4,
                   help="how many missing points are fine-tuned, spread over the predicted latency, the fastest "
                        "always (default 4)")
    s.add_argument("--prune-finetune-epochs", type=int, default=0,
                   help="fine-tune every pruned model (distillation from the original) for up to N epochs right "
                        "after pruning, before the per-layer choices are searched on it (default 0: off)")
    s.add_argument("--prune-progressive", action="store_true",
                   help="with --prune-finetune-epochs: prune each ratio from the next larger ratio's fine-tuned "
                        "model (in steps), not from the original at once")
    s.add_argument("--threads", type=int, default=None,
                   help="runtime threads of every latency measurement (default: every usable core); use 1 on a "
                        "shared machine: a parallel kernel waits for all its threads, and one descheduled thread "
                        "stalls it a whole scheduler slice")
    s.add_argument("--no-predictor", action="store_true", help="measure every (layer, configuration) pair up front")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--calib", help=".npy (N, ...) or .npz keyed by input name: real calibration samples")
    s.add_argument("--num-calib", type=int, default=16, help="calibration feeds for the proxy error and quantization")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(fn=_cmd_search)

    p = sub.add_parser("passes", help="list passes (with options) and targets")
    p.set_defaults(fn=_cmd_passes)

    i = sub.add_parser("inspect", help="print a model's IR and cost table")
    _add_model_args(i)
    i.add_argument("-p", "--pipeline", default="", help="run this pipeline first")
    i.add_argument("--costs-only", action="store_true")
    i.add_argument("--constants", action="store_true", help="list constants too")
    i.add_argument("--all-nodes", action="store_true", help="cost table rows for every node, not just heavy ones")
    i.set_defaults(fn=_cmd_inspect)

    r = sub.add_parser("run", help="run a compiled artifact")
    r.add_argument("artifact", help="artifact directory written by `qcompile compile`")
    r.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE.npy",
                   help="input array (.npy, or .npz keyed by input name); repeatable")
    r.add_argument("--output", help="save outputs to this .npz")
    r.set_defaults(fn=_cmd_run)

    v = sub.add_parser("verify", help="re-check an artifact: file hashes against the manifest, then numerics "
                                      "(source model reloaded, pipeline re-run, artifact run on its backend)")
    v.add_argument("artifact", help="artifact directory written by `qcompile compile`, `finetune` or `search`")
    v.add_argument("--files-only", action="store_true", help="check the file table only (no model is run)")
    v.set_defaults(fn=_cmd_verify)

    b = sub.add_parser("bench", help="compare backends on models (interleaved medians, ratios, JSON + plot)")
    b.add_argument("models", nargs="*", help="model specs (default: the five seed CNNs and the bundled model)")
    b.add_argument("-b", "--backends", default="torch,onnxruntime,onnxruntime-int8,tvm-x86",
                   help="comma-separated: torch, onnxruntime, onnxruntime-int8, tvm-x86, tvm-arm64")
    b.add_argument("--variant", action="append", default=[], metavar="NAME=PIPELINE",
                   help="extra variant compiled with PIPELINE (the 'original' variant is always measured)")
    b.add_argument("--reference", default="onnxruntime", help="backend the ratios are relative to")
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--number", type=int, default=5, help="calls per backend per round")
    b.add_argument("--threads", type=int, help="threads per backend (default: all usable cores)")
    b.add_argument("--out", default="benchmarks/results/latest", help="folder for results.json and ratios.png")
    b.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except QCompileError as e:
        if args.debug:
            traceback.print_exc()
        kind = "error" if isinstance(e, InputError) else "internal error"
        print(f"qcompile: {kind}: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"qcompile: {note}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - an uncaught exception is a qcompile bug
        traceback.print_exc()
        print(f"qcompile: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
