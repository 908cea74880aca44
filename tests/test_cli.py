"""End to end through the CLI: compile (torch factory and third-party ONNX), run, inspect, passes,
and the failure modes (named errors, exit codes, nothing written at OUT, reproducers).  Broken and
hostile model files, shapes, budgets and targets are one table in test_hostile_inputs.py.

fp32 tolerance for exact pipelines (asserted by the compiler itself and re-checked here):
|y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompile.artifact import sha256_file
from qcompile.cli import main

DIGITS = "qcompile.models.digits:digits_cnn"
PIPELINE = "fold-bn,dead-code,annotate-costs"


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("target", ["onnxruntime", "torch"])
def test_compile_bundled_torch_model(tmp_path, capsys, target):
    out = tmp_path / "digits"
    assert run_cli("compile", DIGITS, "-p", PIPELINE, "-t", target, "-o", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["pipeline"] == PIPELINE and m["target"]["name"] == target
    assert m["inputs"] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10]
    v = m["verification"]
    assert v["within_fp32_tolerance"] and v["exact_pipeline"] and v["feeds"] == 16
    assert "real samples" in v["calibration"]
    assert v["max_rel_error"] < 1e-5
    # fold-bn folded every batch norm of the bundled model and said so in the provenance
    assert m["costs"]["after"]["nodes"] < m["costs"]["before"]["nodes"]
    folded = [p for layer in m["layers"] for p in layer["provenance"] if p["pass"] == "fold-bn"]
    assert len(folded) >= 5
    assert all(layer["macs"] > 0 for layer in m["layers"] if layer["op"] == "conv2d")
    for name, f in m["files"].items():
        assert sha256_file(out / name) == f["sha256"]
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left
    assert "verified on 16 feeds" in capsys.readouterr().out


def test_run_artifact_predicts_digits(tmp_path, capsys):
    from qcompile.data.digits import load_digits_split

    out = tmp_path / "digits"
    assert run_cli("compile", DIGITS, "-p", PIPELINE, "-t", "onnxruntime", "-o", out) == 0
    x, y = load_digits_split().test
    np.save(tmp_path / "x.npy", x[:1])
    capsys.readouterr()
    assert run_cli("run", out, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npz") == 0
    saved = np.load(tmp_path / "y.npz")
    logits = saved[saved.files[0]]
    assert logits.shape == (1, 10) and int(np.argmax(logits)) == int(y[0])
    np.save(tmp_path / "bad.npy", np.zeros((1, 1, 9, 9), np.float32))
    assert run_cli("run", out, "--input", tmp_path / "bad.npy") == 2
    assert "expects [1, 1, 8, 8]" in capsys.readouterr().err


def test_same_inputs_same_artifact_bytes(tmp_path):
    for d in ("a", "b"):
        assert run_cli("compile", DIGITS, "-p", PIPELINE, "-o", tmp_path / d) == 0
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert ma["files"] == mb["files"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


@pytest.mark.network
def test_compile_third_party_onnx_model(tmp_path, rapidocr_models, capsys):
    src = rapidocr_models["ch_ppocr_mobile_v2.0_cls_infer.onnx"]
    out = tmp_path / "cls"
    assert run_cli("compile", src, "-p", PIPELINE, "-t", "onnxruntime", "-o", out,
                   "--input-shape", "x=1x3x48x192", "--verify-each-pass") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}]
    assert m["verification"]["within_fp32_tolerance"]
    assert "onnxruntime on the source file" in m["verification"]["against"]
    conv_macs_before = m["costs"]["before"]["macs"]
    assert m["costs"]["after"]["macs"] < conv_macs_before  # batch-norm MACs are gone
    assert sum(1 for layer in m["layers"] if layer["op"] == "conv2d") == 53
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out / "model.onnx").graph.node)


def test_inspect_and_passes(capsys):
    assert run_cli("inspect", DIGITS, "-p", "fold-bn") == 0
    text = capsys.readouterr().out
    assert "conv2d(" in text and "batch_norm" not in text and "total" in text
    assert run_cli("passes") == 0
    text = capsys.readouterr().out
    for name in ("fold-bn", "dead-code", "annotate-costs", "onnxruntime", "torch"):
        assert name in text


def test_unsupported_op_names_op_and_node(tmp_path, capsys):
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 2] v) {
            k = Constant <value = int64[1] {2}> ()
            v, i = TopK <axis = 1> (x, k)
        }""")
    for n in model.graph.node:
        n.name = "my_topk" if n.op_type == "TopK" else "k_const"
    path = tmp_path / "topk.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    assert run_cli("compile", path, "-o", out) == 2
    err = capsys.readouterr().err
    assert "TopK" in err and "my_topk" in err
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["-p", "fold-bn,nope"], "unknown pass 'nope'"),
    (["-t", "gpu9000"], "unknown target 'gpu9000'"),
    (["--input-shape", "image=1xAx8"], "bad --input-shape"),
])
def test_usage_errors_exit_2(tmp_path, capsys, args, needle):
    assert run_cli("compile", DIGITS, "-o", tmp_path / "o", *args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run_cli("compile", DIGITS, "-o", out) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert run_cli("compile", DIGITS, "-o", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_internal_failure_writes_reproducer_and_no_output(tmp_path, capsys, monkeypatch):
    from qcompile.backends import onnxruntime_backend

    def broken_build(self, graph, out_dir, options=None):
        (Path(out_dir) / "partial.bin").write_bytes(b"half")
        raise RuntimeError("simulated backend crash")

    monkeypatch.setattr(onnxruntime_backend.OnnxRuntimeBackend, "build", broken_build)
    out, repro = tmp_path / "o", tmp_path / "repro"
    assert run_cli("compile", DIGITS, "-p", PIPELINE, "-o", out, "--repro-dir", repro) == 1
    err = capsys.readouterr().err
    assert "simulated backend crash" in err and "reproducer written" in err
    assert not out.exists() and not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())
    [case] = list(repro.iterdir())
    assert (case / "pipeline.txt").read_text().strip() == PIPELINE
    assert "simulated backend crash" in (case / "error.txt").read_text()
    onnx.checker.check_model(onnx.load(case / "input.onnx"))
    assert "qcompile compile input.onnx" in (case / "replay.sh").read_text()


def test_numerics_failure_is_internal_error(tmp_path, capsys, monkeypatch):
    """An artifact that does not match the original model is never written."""
    from qcompile.passes import fold_bn

    orig = fold_bn.FoldBatchNorm._fold

    def bad_fold(g, bn, prod):
        orig(g, bn, prod)
        prod.inputs[2] = g.add_constant("corrupt", g.constants[prod.inputs[2]] + 1.0)

    monkeypatch.setattr(fold_bn.FoldBatchNorm, "_fold", staticmethod(bad_fold))
    out = tmp_path / "o"
    assert run_cli("compile", DIGITS, "-p", "fold-bn", "-o", out, "--repro-dir", tmp_path / "r") == 1
    assert "beyond fp32 tolerance" in capsys.readouterr().err
    assert not out.exists()
