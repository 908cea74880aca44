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
