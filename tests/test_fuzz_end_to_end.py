"""End-to-end fuzzing: random valid CNNs -> a real frontend -> a pipeline of passes -> a backend.

Graphs come from :mod:`cnn_strategies` (convs of varied kernel / stride / groups / dilation /
asymmetric pads, depthwise and rectangular convs, residual adds, concats, max / avg pools with
padding and ceil mode, per-channel scaling, global-pool or flatten heads with one or two linear
layers; seeded random weights and batch-norm statistics; square and non-square inputs).  Each
graph enters the compiler the way a user's model does:

* ``onnx``: exported with :func:`qcompile.frontends.onnx_export.to_onnx` (opset drawn from
  13 / 17 / 21) to a file, loaded by :func:`qcompile.frontends.load_model` -- the ONNX frontend,
  with onnxruntime on that file as the reference;
* ``torch``: rebuilt as ordinary ``nn.Module`` code (:class:`fuzz_models.IdiomaticCNN`: nn.Conv2d,
  nn.BatchNorm2d, nn.MaxPool2d, torch.cat, ...) and loaded by ``load_model("fuzz_models:current")``
  -- torch.export and the torch frontend, with the module itself as the reference.

Checks, per graph:

1. the source model computes what the generated IR computes (reference interpreter), fp32 tolerance
   |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref| (``compiler.FP32_ATOL_REL`` / ``FP32_RTOL``):
   the exporter / the module rebuild are right, so the later checks compare against the right thing;
2. :func:`qcompile.compiler.compile_model` (only the report's plot is stubbed out: it takes 90 % of
   a small compile's time and computes nothing that is checked) runs the pipeline and the target's
   phases, builds the artifact, loads it back and applies the compiler's own
   :func:`~qcompile.compiler.check_numerics`: an exact pipeline's artifact must match the *original*
   model within the fp32 tolerance; a lossy one's must match the compressed IR (reference
   interpreter) within the fp32 tolerance, or, for quantized graphs, within
   ``compiler.INT8_ATOL_REL`` = 4/127 * max|y_ref| (four int8 steps of the output range) or else the
   RMS bound ``compiler.INT8_RMS_FACTOR`` vs the original (see those constants' docstrings).  A
   ``NumericsError`` fails the example.  These graphs are shallow, so the fuzz is stricter than
   the compiler: at most 10 % of the quantized compiles may rely on the RMS fallback (the 4-step
   bound is the one that catches a wrong lowering in a shallow model).

Known limits, asserted rather than skipped:

* On the torch route every other conv's padding is written out as ``nn.ZeroPad2d`` before an
  unpadded ``nn.Conv2d``, and asymmetric pads (rare in the generated graphs) as ``nn.ZeroPad2d`` of
  the excess before a padded conv (the usual way to write "same" padding of a strided conv in
  torch); the frontend must fold each pad into its conv (``_load`` checks that the imported convs
  have exactly the generated pads) -- counted as ``torch_pad_folded``, and a run with torch-route
  graphs must have folded some.  Every graph must load on both routes.
* onnxruntime's int8 kernels saturate on CPUs without VNNI (:data:`ORT_REDUCE_RANGE`): there
  ``quantize`` and ``layer-config`` get ``reduce_range=true`` (the compiler's own advice, and what
  ``qcompile search -t onnxruntime`` records on such a CPU), and are held to the 4-step count like
  every other quantized compile.

Pipelines cover every registered pass that applies to an unlabelled random CNN
(:data:`PIPELINES`; ``test_every_pass_is_fuzzed`` keeps that list complete).  Factorization and
pruning budgets are relative (``energy=``, ``macs=``), so an example may be refused with the
documented "impossible" budget error; that is asserted (the message must say so), counted apart,
and does not count as a compared graph.

Counts: every test records ``fuzz`` user properties (compiled-and-compared graphs, refusals,
per pipeline); ``tests/conftest.py`` sums them over xdist workers into a terminal-summary line,
and each test asserts that at least a stated number of its examples were actually compared.

Budget: the default set imports 30 random graphs per onnxruntime / torch target (3 pipelines each:
90 compiles) and 8 for tvm-x86 (2 pipelines each: 16 TVM builds), about 80 s on one core;
``-m slow`` runs a wider sweep (100 graphs x 4 pipelines per onnxruntime / torch, 30 x 3 on
tvm-x86, all pipelines plus :data:`SLOW_PIPELINES`) and 12 graphs on the emulated arm64 board.
Hypothesis runs with a fixed seed per target (the same examples every run, other graphs on each
target) and no example database.
"""

from __future__ import annotations

import collections
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import fuzz_models
from cnn_strategies import build_cnn, cnn_specs
from qcompile import compiler
from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL, CompileOptions, compile_model
from qcompile.errors import PipelineError
from qcompile.frontends import load_model
from qcompile.frontends.onnx_export import to_onnx
from qcompile.passes import PASSES, format_pipeline, parse_pipeline
from qcompile.passes.manager import run_feeds, run_reference, within_fp32_tolerance


def _layer_config(graph) -> str:
    convs = [n.name for n in graph.nodes if n.op == "conv2d" and n.attrs["group"] == 1
             and min(graph.types[n.inputs[1]].shape[:2]) >= 4]
    fc = [n.name for n in graph.nodes if n.op == "linear"][-1]
    pairs = ([f"{convs[0]}=tucker2[4x4]+int8"] if convs else []) + [f"{fc}=int4"]
    return 'layer-config{configs="' + ";".join(pairs) + '"}'


PIPELINES = {
    # name: pipeline text, or a function of the loaded graph giving it (layer names differ per frontend)
    "identity": "",
    "fold-bn": "fold-bn,dead-code,annotate-costs",
    "svd": "fold-bn,lowrank-svd{energy=0.9,multiple=2}",
    "spatial-svd": "fold-bn,spatial-svd{energy=0.9,multiple=2}",
    "tucker2": "fold-bn,tucker2{energy=0.8,multiple=2}",
    "cp": "fold-bn,cp{rank=4,multiple=1}",
    "channel-decomp": "fold-bn,channel-decomp{energy=0.9,multiple=2,samples=512}",
    "prune": "prune-channels{macs=0.7,multiple=2,min_keep=0.25}",
    "int8": "fold-bn,quantize",
    "int4": "fold-bn,quantize{weight_bits=4}",
    "weight-only": "quantize{act_bits=0,bias_correction=false,observer=minmax}",
    "qaf": "fold-bn,qaf{energy=0.8,multiple=2,iterations=8}",
    "tucker2+int8": "fold-bn,tucker2{energy=0.8,multiple=2},quantize{observer=mse}",
    "layer-config": _layer_config,
}
"""Every pipeline the fuzz drives through every backend."""

SLOW_PIPELINES = {
    "prune-qubo": "fold-bn,prune-channels{macs=0.6,criterion=qubo,multiple=1,reads=4}",
    "channel-decomp-weights": "fold-bn,channel-decomp{fit=weights,macs=0.6,multiple=1}",
    "spatial-svd+int4": "fold-bn,spatial-svd{macs=0.6,multiple=1},quantize{int4=*}",
    "qaf-cp4": "fold-bn,qaf{method=cp,bits=4,rank=4,multiple=1,iterations=8}",
    "prune+int8": "fold-bn,prune-channels{macs=0.5,multiple=1,min_keep=0.1},quantize",
    "prune+distill": "fold-bn,prune-channels{macs=0.6,multiple=1,min_keep=0.1},distill{epochs=1,batch_size=4}",
}

NOT_FUZZED = {
    "finetune": "trains on a labelled data set (digits / mnist / .npz) whose images must fit the model's input; "
                "covered by tests/test_finetune_pass.py and test_qat.py",
}

REFUSALS = ("impossible", "infeasible")
"""Budget refusals (PipelineError) that are legitimate for a random graph: the message says which."""

SIZES = st.sampled_from([7, 8, 9, (8, 11), (11, 6)])
WIDTHS = (6, 8, 10, 12, 16, 24)
"""Block widths: odd branch widths (a 10-wide inception has a 5-channel branch) and non-multiples of 8
reach the kernels' remainder paths."""

FUZZ_SETTINGS = dict(deadline=None, database=None,
                     phases=(Phase.explicit, Phase.generate, Phase.shrink),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _no_report_plot(monkeypatch):
    """compile's report (markdown + matplotlib MAC plot) checks nothing and dominates small compiles."""
    monkeypatch.setattr(compiler, "build_report", lambda manifest, g_in, g_out: {})


def _feeds(graph, n=3, rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    return [{i: rng.standard_normal(graph.types[i].shape).astype(np.float32) for i in graph.inputs}
            for _ in range(n)]


def _load(graph, route: str, opset: int, workdir: Path, stats):
    """``graph`` through a real frontend; checks the source model computes what ``graph`` does."""
    if route == "onnx":
        path = workdir / "model.onnx"
        onnx.save(to_onnx(graph, opset), path)
        loaded = load_model(str(path))
    else:
        fuzz_models.set_current(fuzz_models.IdiomaticCNN(graph).eval())
        loaded = load_model("fuzz_models:current")
        # every nn.ZeroPad2d was folded into its conv: the same convs with the generated (t, l, b, r) pads
        convs = lambda g: sorted((n.attrs["pads"], n.attrs["strides"], g.types[n.inputs[1]].shape)  # noqa: E731
                                 for n in g.nodes if n.op == "conv2d")
        assert convs(loaded.graph) == convs(graph), "the torch frontend did not fold ZeroPad2d into the convs"
        stats["torch_pad_folded"] += sum("folded_pad" in n.meta for n in loaded.graph.nodes)
    feeds = _feeds(graph)
    want = run_reference(graph, feeds)
    source = run_feeds(loaded.reference, feeds)
    assert within_fp32_tolerance(source, want, FP32_RTOL, FP32_ATOL_REL), \
        f"{route} source model differs from the generated IR"
    imported = run_reference(loaded.graph, feeds)
    assert within_fp32_tolerance(imported, want, FP32_RTOL, FP32_ATOL_REL), \
        f"{route} frontend's IR differs from the generated IR"
    return loaded


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


ORT_REDUCE_RANGE = not _cpu_has_vnni()
"""onnxruntime's u8s8 int8 kernels on x86 without VNNI add byte products in int16 and saturate with
full-range int8 weights (documented; ``quantize{reduce_range=true}`` is the stated fix, and the
compiler's NumericsError says so): on such CPUs the fuzz quantizes onnxruntime targets on the 7-bit
weight grid.  The TVM backends are exact either way (vpmaddwd / VNNI) and get full-range weights."""


def for_target(text: str, target: str) -> str:
    """``text`` with ``reduce_range=true`` on every ``quantize`` / ``layer-config`` when onnxruntime needs it."""
    if target != "onnxruntime" or not ORT_REDUCE_RANGE or ("quantize" not in text and "layer-config" not in text):
        return text
    passes = [type(p)(p.options, reduce_range=True) if p.name in ("quantize", "layer-config") else p
              for p in parse_pipeline(text)]
    return format_pipeline(passes)


def _compile_one(loaded, pipeline_name, target, pipelines, workdir: Path, stats) -> None:
    """One pipeline on one loaded graph for ``target``: compiled and checked by the compiler itself."""
    text = pipelines[pipeline_name]
    text = for_target(text(loaded.graph) if callable(text) else text, target)
    out = workdir / f"out-{pipeline_name}"
    try:
        result = compile_model(loaded, text, target, out, CompileOptions(repro_dir=workdir / "repro"))
    except PipelineError as e:
        assert any(r in str(e) for r in REFUSALS), f"pipeline '{text}' failed: {e}"
        stats["refused"] += 1
        stats[f"refused:{pipeline_name}"] += 1
        return
    v = result.manifest["verification"]
    assert v["exact_pipeline"] == (pipeline_name in ("identity", "fold-bn"))
    if v["exact_pipeline"]:
        assert v["within_fp32_tolerance"]
    stats["compared"] += 1
    stats[f"compared:{pipeline_name}"] += 1
    if "int8_bound_held" in v:  # quantized: which of the compiler's two int8 bounds held, per output
        rms_only = any(h != "steps" for h in v["int8_bound_held"])
        stats["quantized"] += 1
        stats["int8_rms_bound_only"] += rms_only
    if not v["exact_pipeline"]:
        stats["lossy"] += 1
        # the pipeline's last pass changed the graph (a factorization that kept every rank would test nothing)
        stats["transformed"] += bool(result.records[len(parse_pipeline(text)) - 1].modified)


def _fuzz_graph(graph, route, opset, pipeline_names, target, pipelines, stats) -> None:
    stats["examples"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _load(graph, route, opset, Path(tmp), stats)
        stats["graphs"] += 1
        stats[f"route:{route}"] += 1
        for name in pipeline_names:
            _compile_one(loaded, name, target, pipelines, Path(tmp), stats)


def _run_fuzz(target, pipeline_names, pipelines, examples, per_graph, record_property, max_blocks=4):
    """``examples`` random graphs, each through ``per_graph`` of ``pipeline_names`` (a random pick: a
    shuffle's head, which spreads the pipelines evenly) on ``target``; returns the counts."""
    stats = collections.Counter()

    @seed(zlib.crc32(f"{target}/{examples}".encode()))  # reproducible, and other graphs on every target
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(spec=cnn_specs(max_blocks=max_blocks, sizes=SIZES, batches=st.sampled_from([1, 2]), widths=WIDTHS),
           route=st.sampled_from(["onnx", "torch"]), opset=st.sampled_from([13, 17, 21]),
           order=st.permutations(pipeline_names))
    def fuzz(spec, route, opset, order):
        _fuzz_graph(build_cnn(**spec), route, opset, order[:per_graph], target, pipelines, stats)

    fuzz()
    record_property("fuzz", {"target": target, **stats})
    return stats


def _assert_meaningful(stats, examples, per_graph, pipeline_names):
    """The run compiled and compared enough graphs to mean something (not all filtered or refused)."""
    # both frontends import every generated graph (the torch route's asymmetric pads through ZeroPad2d)
    assert stats["graphs"] == stats["examples"], f"a frontend refused a graph: {dict(stats)}"
    assert stats["torch_pad_folded"] >= stats["route:torch"] // 2, f"too few ZeroPad2d folded: {dict(stats)}"
    assert stats["compared"] >= 0.75 * examples * per_graph, f"too few compiles compared: {dict(stats)}"
    missing = [p for p in pipeline_names if not stats[f"compared:{p}"]]
    assert len(missing) <= len(pipeline_names) // 5, f"pipelines never compared: {missing} ({dict(stats)})"
    assert examples < 8 or (stats["route:onnx"] and stats["route:torch"]), dict(stats)
    assert stats["transformed"] >= 0.6 * stats["lossy"], f"lossy pipelines mostly left the graph alone: {dict(stats)}"
    # these graphs are shallow: the artifact should meet the 4-step bound vs the quantized IR
    # (compiler.INT8_ATOL_REL), the RMS fallback (compiler.INT8_RMS_FACTOR) is meant for deep models
    assert stats["int8_rms_bound_only"] <= 0.1 * stats["quantized"], dict(stats)


# ---------------------------------------------------------------------------------------------- default set
@pytest.mark.parametrize("target,examples,per_graph", [("onnxruntime", 30, 3), ("torch", 30, 3), ("tvm-x86", 8, 2)])
def test_random_cnns_compile_and_match(target, examples, per_graph, record_property):
    names = list(PIPELINES)
    stats = _run_fuzz(target, names, PIPELINES, examples, per_graph, record_property,
                      max_blocks=4 if target != "tvm-x86" else 3)
    _assert_meaningful(stats, examples, per_graph, names if examples * per_graph >= 2 * len(names) else [])


def test_every_pass_is_fuzzed():
    graph = build_cnn(0, [("conv", 8)], True, 0)
    used = {p.name for t in list(PIPELINES.values()) + list(SLOW_PIPELINES.values())
            for p in parse_pipeline(t(graph) if callable(t) else t)}
    assert used.isdisjoint(NOT_FUZZED)
    assert set(PASSES) - used == set(NOT_FUZZED), \
        f"passes neither fuzzed nor listed in NOT_FUZZED with a reason: {set(PASSES) - used - set(NOT_FUZZED)}"


# ---------------------------------------------------------------------------------------------- -m slow
@pytest.mark.slow
@pytest.mark.parametrize("target,examples,per_graph", [("onnxruntime", 100, 4), ("torch", 100, 4),
                                                       ("tvm-x86", 30, 3)])
def test_random_cnns_compile_and_match_wide(target, examples, per_graph, record_property):
    pipelines = {**PIPELINES, **SLOW_PIPELINES}
    names = list(pipelines)
    stats = _run_fuzz(target, names, pipelines, examples, per_graph, record_property, max_blocks=6)
    _assert_meaningful(stats, examples, per_graph, names)


@pytest.mark.slow
def test_random_cnns_on_emulated_arm64_board(arm_board, record_property):
    names = ["fold-bn", "tucker2", "int8", "int4"]
    stats = _run_fuzz("tvm-arm64", names, PIPELINES, 12, 1, record_property, max_blocks=3)
    _assert_meaningful(stats, 12, 1, [])


# ---------------------------------------------------------------------------------------------- regressions
# Bugs the fuzz found, each pinned by its smallest reproducer.

def test_prune_refuses_a_budget_it_cannot_meet_when_no_channel_is_prunable():
    """A grouped conv freezes every channel of this graph: prune-channels{macs=0.5} returned the graph
    unchanged (budget silently missed) instead of refusing it like any other impossible budget."""
    from qcompile.passes import PassManager

    g = build_cnn(0, [("grouped", 8)], head_gap=False, hidden=0)
    with pytest.raises(PipelineError, match=r"macs=0.5 is impossible: no channel group can be pruned"):
        PassManager(parse_pipeline("prune-channels{macs=0.5,multiple=1}")).run(g)
    out = PassManager(parse_pipeline("prune-channels{macs=1.0}")).run(g)  # a budget of 1 asks for nothing
    assert out.op_counts() == g.op_counts()
