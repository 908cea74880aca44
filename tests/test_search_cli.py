"""``qcompile search`` end to end and the ``layer-config`` pass that replays a chosen point.

The bundled digits CNN on onnxruntime (real scikit-learn digits for calibration and accuracy), tiny
populations, every latency cache under tmp_path (QCOMPILE_CACHE).
"""

import json

import numpy as np
import pytest

from qcompile.cli import main
from qcompile.errors import PipelineError, SearchError
from qcompile.passes import PassContext, PassManager, format_pipeline, parse_pipeline
from qcompile.search import LayerConfig, SearchSpace
from qcompile.search.driver import ort_needs_reduce_range, parse_budget

DIGITS = "qcompile.models.digits:digits_cnn"
SMALL = ["--pop", "8", "--generations", "2", "--ranks-per-layer", "1", "--finalists", "2", "--rounds", "2", "-q",
         "--threads", "1"]


@pytest.fixture(scope="module")
def digits():
    from qcompile.frontends import load_model

    m = load_model(DIGITS, num_calibration=8)
    graph = PassManager(parse_pipeline("fold-bn,dead-code")).run(m.graph)
    return m, graph, SearchSpace(graph, m.calibration, ranks_per_layer=1)


def test_layer_config_pass_rebuilds_what_the_search_space_builds(digits):
    m, graph, space = digits
    conv = space.layer("conv_out.0")
    rank = next(c.rank for c in conv.choices if c.rank)
    configs = {"stem.0": LayerConfig(8), "conv_out.0": LayerConfig(8, rank), "fc": LayerConfig(4)}
    text = ";".join(f"{n}={c.label}" for n, c in configs.items())
    replayed = PassManager(parse_pipeline(f'layer-config{{configs="{text}"}}')).run(
        graph, PassContext(calibration=m.calibration))
    built = space.build(configs)
    from qcompile.passes.manager import run_reference

    a, b = run_reference(replayed, m.calibration), run_reference(built, m.calibration)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)  # fp32: the same rewrite, the same numbers
    ops = [n.op for n in replayed.nodes]
    assert ops.count("conv2d") == 6 + 2 and "dequantize_linear" in ops  # conv_out.0 became three factor convs
    fc_w = next(n for n in replayed.nodes if n.name.startswith("fc") and n.op == "dequantize_linear")
    q = replayed.constants[fc_w.inputs[0]]
    assert q.min() >= -8 and q.max() <= 7  # int4 grid


def _int8_weights(graph):
    """The integer weight constants of the quantized layers with 8-bit weights."""
    return [graph.constants[n.inputs[0]] for n in graph.nodes
            if n.op == "dequantize_linear" and n.inputs[0] in graph.constants and n.attrs["bits"] == 8]


def test_layer_config_reduce_range_puts_int8_weights_on_the_7_bit_grid(digits):
    m, graph, _ = digits
    text = 'layer-config{configs="stem.0=int8;conv_out.0=tucker2[8x8]+int8;fc=int4",reduce_range=true}'
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text and passes[0].options.reduce_range  # round-trips as recorded
    replayed = PassManager(passes).run(graph, PassContext(calibration=m.calibration))
    weights = _int8_weights(replayed)
    assert len(weights) == 4  # stem.0 and the three factor convs of conv_out.0
    assert all(np.abs(q.astype(int)).max() == 63 for q in weights)  # per-channel scale: the largest is +-63
    full = PassManager(parse_pipeline(text.replace(",reduce_range=true", ""))).run(
        graph, PassContext(calibration=m.calibration))
    assert max(np.abs(q.astype(int)).max() for q in _int8_weights(full)) == 127
    # the search space builds the same graph with the option (what a search on a non-VNNI CPU measures)
    space = SearchSpace(graph, m.calibration, ranks_per_layer=1, reduce_range=True)
    built = space.build({"stem.0": LayerConfig(8), "conv_out.0": LayerConfig(8, (8, 8)), "fc": LayerConfig(4)})
    for a, b in zip(_int8_weights(built), weights):
        np.testing.assert_array_equal(a, b)
    from qcompile.search.finalists import point_pipeline
    from qcompile.search.nsga import Point

    point = Point({"stem.0": "int8"}, 0.0, 1.0, 1.0, 1.0, 1.0, True)
    assert point_pipeline(space, point).endswith('layer-config{configs="stem.0=int8",reduce_range=true}')


def test_reduce_range_is_chosen_for_onnxruntime_without_vnni():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    vnni = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"
    assert ort_needs_reduce_range("onnxruntime", avx2)
    assert not ort_needs_reduce_range("onnxruntime", vnni)
    assert not ort_needs_reduce_range("onnxruntime", avx2.replace("avx2", "avx2 avx_vnni"))
    assert not ort_needs_reduce_range("tvm-x86", avx2)  # TVM's integer kernels are exact either way


def test_layer_config_reduce_range_holds_the_int8_step_bound_on_onnxruntime(tmp_path):
    """A quantized factorized layer on onnxruntime: with full-range int8 weights a CPU without VNNI
    saturates (measured here, AVX2 only: 0.079 of the output range off the quantized IR, only the RMS
    bound holds); with reduce_range=true the artifact is within 4 int8 steps (3.6e-4)."""
    from qcompile.compiler import CompileOptions, compile_model
    from qcompile.frontends import load_model

    m = load_model(DIGITS, num_calibration=8)
    held = {}
    for rr in ("false", "true"):
        pipeline = f'fold-bn,dead-code,layer-config{{configs="stem.0=int8;conv_out.0=tucker2[8x8]+int8",' \
                   f'reduce_range={rr}}}'
        result = compile_model(m, pipeline, "onnxruntime", tmp_path / rr, CompileOptions(repro_dir=tmp_path / "r"))
        held[rr] = result.manifest["verification"]["int8_bound_held"]
    assert held["true"] == ["steps"]
    if ort_needs_reduce_range("onnxruntime"):
        assert held["false"] == ["rms"]  # the saturation the option exists for


@pytest.mark.parametrize("configs, needle", [
    ("nope=int8", "'nope' is not a conv2d/linear layer"),
    ("fc=tucker2[4x4]", "layer 'fc' (linear) cannot take Tucker-2"),
    ("conv_out.0=tucker2[999x8]", "rank 999x8 outside"),
    ("fc=int6", "6-bit weights are not supported"),
    ("fc", "is not layer=choice"),
    ("fc=int8+tucker2[4x4]", "not canonical"),
])
def test_layer_config_refuses_bad_choices_naming_the_layer(digits, configs, needle):
    m, graph, _ = digits
    with pytest.raises(PipelineError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PassManager(parse_pipeline(f'layer-config{{configs="{configs}"}}')).run(
            graph, PassContext(calibration=m.calibration))


def test_budget_text():
    b = parse_budget("latency=0.4x, memory=0.5")
    assert (b.latency, b.memory, b.max_error) == (0.4, 0.5, None)
    for bad in ("speed=2x", "latency=fast", "latency=-1x", "latency"):
        with pytest.raises(Exception, match="budget"):
            parse_budget(bad)


def test_search_cli_compiles_a_checked_point_and_writes_the_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["search", DIGITS, "-t", "onnxruntime", "-o", str(out), "--budget", "memory=0.5x",
               "--max-acc-drop", "1", *SMALL])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    doc = json.loads((out / "search" / "search.json").read_text())
    assert {"search/search.json", "search/front.png"} <= set(manifest["files"])  # hashed with the artifact
    assert (out / "search" / "front.png").read_bytes()[:4] == b"\x89PNG"
    chosen = doc["chosen"]
    assert manifest["pipeline"].startswith(chosen["pipeline"])  # the artifact is the chosen point
    # onnxruntime on a CPU without VNNI: the searched int8 layers use (and record) the 7-bit grid
    assert doc["settings"]["reduce_range"] == ort_needs_reduce_range("onnxruntime")
    assert ("reduce_range=true" in chosen["pipeline"]) == (ort_needs_reduce_range("onnxruntime")
                                                           and "layer-config" in chosen["pipeline"])
    assert chosen["acc_drop"] <= 1.0 and chosen["memory_ratio"] <= 0.5
    assert chosen["accuracy"] == pytest.approx(doc["original"]["accuracy"] - chosen["acc_drop"])
    assert chosen["latency_s"] > 0 and doc["original"]["original_onnxruntime_s"] > 0
    assert all("accuracy" in p for p in doc["front"]) and 1 <= len(doc["finalists"]) <= 2
    # the front is non-dominated in (proxy error, latency, bytes)
    objs = [(p["error"], p["latency_s"], p["weight_bytes"]) for p in doc["front"]]
    for a in objs:
        assert not any(all(x <= y for x, y in zip(b, a)) and b != a for b in objs)
    # cached measurements: the latency cache was written and a second search times nothing new
    assert doc["measurements"] > 0 and (tmp_path / "cache" / "latency" / "onnxruntime.json").exists()
    entries = json.loads((tmp_path / "cache" / "latency" / "onnxruntime.json").read_text())["entries"]
    # one runtime thread: timed by the calling thread's CPU time, recorded in every entry's target
    assert doc["settings"]["threads"] == 1
    assert all(e["target"].endswith("threads=1 | cpu-time") for e in entries.values())
    rc = main(["search", DIGITS, "-t", "onnxruntime", "-o", str(tmp_path / "again"), "--budget", "memory=0.5x",
               *SMALL])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "search" / "search.json").read_text())
    assert again["measurements"] == 0 and again["cache"]["hits"] > 0
    # the recorded pipeline replays through `qcompile compile` to the same model
    rc = main(["compile", DIGITS, "-p", chosen["pipeline"], "-t", "onnxruntime", "-o", str(tmp_path / "replay")])
    assert rc == 0
    assert (tmp_path / "replay" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_infeasible_budget_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["search", DIGITS, "-o", str(out), "--budget", "memory=0.01x", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "memory budget 0.01x" in err and "cannot be met" in err
    assert not out.exists()


def test_no_front_point_within_the_accuracy_drop_is_an_error(digits, tmp_path):
    from qcompile.finetune import load_training_data
    from qcompile.search import LatencyCache, search
    from qcompile.search import finalists as F

    m, graph, space = digits
    result = search(graph, m.calibration, space=space, pop_size=6, generations=1,
                    cache=LatencyCache("onnxruntime", tmp_path / "lat.json"))
    x, y = load_training_data("digits").val
    with pytest.raises(SearchError, match="no point of the front keeps the accuracy within -1 pt"):
        F.evaluate(m, space, result, "onnxruntime", x, y, max_acc_drop=-1.0)


def test_pruned_models_are_fine_tuned_once_before_the_search(tmp_path, monkeypatch, capsys):
    """``--prune-finetune-epochs``: each pruned model is recovered once, when the space is built; the
    finalist stage and the artifact reuse it (no fine-tune per front point, none at compile), and a pruned
    choice's pipeline carries the fine-tune so that it replays."""
    from qcompile.passes.finetune import Finetune

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = Finetune.call
    monkeypatch.setattr(Finetune, "call", lambda self, graph, ctx: calls.append(self.to_text()) or real(self, graph, ctx))
    out = tmp_path / "out"
    rc = main(["search", DIGITS, "-t", "onnxruntime", "-o", str(out), "--prune", "1,0.5", "--bits", "8",
               "--prune-finetune-epochs", "1", "--max-acc-drop", "5", *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert calls == ["finetune{epochs=1}"]  # one pruned ratio: one fine-tune, in the space
    doc = json.loads((out / "search" / "search.json").read_text())
    pruned = [p for p in doc["finalists"] if "prune-channels" in p["pipeline"]]
    assert all(",finetune{epochs=1}," in p["pipeline"] for p in pruned)
    assert doc["settings"]["prune_finetune_epochs"] == 1
    assert main(["search", DIGITS, "-t", "onnxruntime", "-o", str(tmp_path / "o2"), "--prune-finetune-epochs", "1",
                 *SMALL]) == 2  # nothing to fine-tune without a prune ratio below 1
    assert "offer prune ratios below 1" in capsys.readouterr().err
    assert main(["search", DIGITS, "-t", "onnxruntime", "-o", str(tmp_path / "o3"), "--prune", "1,0.5",
                 "--prune-progressive", *SMALL]) == 2  # steps from fine-tuned models need a fine-tune
    assert "--prune-progressive" in capsys.readouterr().err
