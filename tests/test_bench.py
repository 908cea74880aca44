"""Benchmark harness: runs interleaved, checks outputs, writes JSON + plot with ratios vs the reference."""

import json

from qcompile.cli import main


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "qcompile.models.digits:digits_cnn", "-b", "onnxruntime,torch,tvm-x86",
                 "--rounds", "2", "--number", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "digits_cnn" in text and "tvm-x86" in text and "machine:" in text
    result = json.loads((out / "results.json").read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"onnxruntime", "torch", "tvm-x86"}
    assert rows["onnxruntime"]["ratio_vs_ref"] == 1.0
    for r in rows.values():
        assert len(r["round_medians_ms"]) == 2 and r["median_ms"] > 0
        assert r["rel_error"] < 1e-4  # every backend computed the same function before it was timed
    assert result["machine"]["cores"] >= 1 and result["reference"] == "onnxruntime"
    assert (out / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["complete"] is True


def test_bench_rejects_a_bad_model_before_measuring_anything(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "qcompile.models.digits:digits_cnn", "qcompile.models.zoo:no_such_model",
                 "-b", "onnxruntime", "--rounds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err
    assert not (out / "results.json").exists()


def test_bench_variants_are_interleaved_and_report_speedup(tmp_path, capsys):
    """A factorized variant (data-driven pass: needs the calibration feeds) next to the original."""
    out = tmp_path / "bench"
    assert main(["bench", "qcompile.models.digits:digits_cnn", "-b", "onnxruntime", "--rounds", "2",
                 "--number", "2", "--variant", "cd=fold-bn,dead-code,channel-decomp{rank=8}",
                 "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"original", "cd"}
    assert rows["original"]["speedup"] is None and rows["cd"]["speedup"] > 0
    assert rows["cd"]["rel_error"] > 1e-4  # lossy, and measured against the original model
    assert "speedup" in capsys.readouterr().out


def test_per_layer_latency_table_pairs_each_layer_with_its_factor_chain():
    from qcompile.bench import chain_graph, format_layer_table, layer_latency
    from qcompile.frontends import load_model
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.passes.manager import run_reference

    lm = load_model("qcompile.models.digits:digits_cnn", num_calibration=4)
    base = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
    pm = PassManager(parse_pipeline("spatial-svd{rank=4}"))
    g = pm.run(base, PassContext(calibration=lm.calibration))
    layers = pm.records[-1].stats["layers"]
    table = layer_latency(base, g, layers, ["onnxruntime"], rounds=1, number=2)
    assert [e["layer"] for e in table] == list(layers)
    for e in table:
        assert e["macs_after"] < e["macs_before"] and e["onnxruntime"]["before_ms"] > 0
    assert "speedup" in format_layer_table(table, ["onnxruntime"])
    # a one-node chain computes exactly what that node computes inside the full graph
    conv = base.node(next(iter(layers)))
    sub = chain_graph(base, [conv])
    from qcompile.factorize.layers import capture

    x = capture(base, lm.calibration[:1], [conv.inputs[0], conv.outputs[0]])
    out = run_reference(sub, [{conv.inputs[0]: x[conv.inputs[0]]}])[0][0]
    assert abs(out - x[conv.outputs[0]]).max() <= 1e-5 * abs(x[conv.outputs[0]]).max()


def test_timing_clock_is_cpu_time_only_for_one_local_thread():
    """One runtime thread computes in the calling thread: its CPU time is the work without the waiting
    a loaded machine adds.  Several threads, or a remote board, are timed by the wall clock."""
    import time

    from qcompile.factorize.latency import timing_clock

    assert timing_clock("onnxruntime", 1) is time.thread_time
    assert timing_clock("tvm-x86", 1) is time.thread_time
    assert timing_clock("tvm-x86", 2) is time.perf_counter
    assert timing_clock("onnxruntime", None) is time.perf_counter
    assert timing_clock("tvm-arm64", 1) is time.perf_counter  # the work runs on the board


def test_cpu_clock_ignores_time_spent_waiting():
    import time

    from qcompile.bench import interleaved

    def sleeper():
        time.sleep(0.01)  # waiting, not computing
    wall = interleaved({"s": sleeper}, rounds=2, number=3, warmup=0, settle=0)["s"]
    cpu = interleaved({"s": sleeper}, rounds=2, number=3, warmup=0, settle=0, clock=time.thread_time)["s"]
    assert min(wall) >= 0.009 and max(cpu) < 0.005
