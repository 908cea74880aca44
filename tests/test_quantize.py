"""The quantize pass, QDQ export to onnxruntime, and the TVM integer lowering.

Accuracy is measured on real data with real trained weights (the bundled DigitsNet on scikit-learn
digits; the MNIST VGG-style net on held-out MNIST digits).  Backends are compared with the
quantized IR's reference interpreter within the stated int8 bound (four int8 steps of the output
range, ``compiler.INT8_ATOL_REL``): a backend may round an activation one step differently where
``x / s`` is within float rounding of a half step.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qcompile.backends.torch_backend import to_torch
from qcompile.compiler import INT8_ATOL_REL
from qcompile.errors import PreconditionError
from qcompile.frontends import load_model
from qcompile.frontends.onnx_export import to_onnx
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.ir.verifier import verify
from qcompile.passes import PassContext, PassManager, parse_pipeline


@pytest.fixture(scope="module")
def digits():
    lm = load_model("qcompile.models.digits:digits_cnn")
    base = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
    return base, lm.calibration


def _quantize(graph, calib, text="quantize"):
    pm = PassManager(parse_pipeline(text))
    return pm.run(graph, PassContext(calibration=calib)), pm.records[-1].stats


def _run(graph, x):
    with torch.no_grad():
        return to_torch(graph, trainable=False)(torch.from_numpy(x)).numpy()


def _weight_dqs(graph):
    return [n for n in graph.nodes if n.op == "dequantize_linear" and n.inputs[0] in graph.constants]


def test_weights_lie_on_the_per_channel_grid(digits):
    base, calib = digits
    g, stats = _quantize(base, calib, "quantize{int4=conv_out.*}")
    verify(g)
    layers = [n for n in g.nodes if n.op in ("conv2d", "linear")]
    dqs = _weight_dqs(g)
    assert len(dqs) == len(layers) == stats["quantized"]
    for dq in dqs:
        q, s = g.constants[dq.inputs[0]], g.constants[dq.inputs[1]]
        bound = 7 if dq.attrs["bits"] == 4 else 127
        assert q.dtype == np.int8 and np.abs(q).max() <= bound and dq.attrs["axis"] == 0
        assert s.shape == (q.shape[0],) and np.all(s > 0)
        # the largest weight of each channel maps to the grid's end
        assert np.all(np.abs(q.reshape(q.shape[0], -1)).max(axis=1)[np.abs(q.reshape(q.shape[0], -1)).max(axis=1) > 0]
                      == bound)
    assert {dq.name.split("/")[0] for dq in dqs if dq.attrs["bits"] == 4} == set(stats["int4_layers"]) != set()
    for n in layers:
        assert n.meta["provenance"][-1]["pass"] == "quantize"
        assert g.producers()[n.inputs[0]].op == "dequantize_linear"  # activation QDQ on every input


def test_int8_accuracy_on_real_digits_within_half_a_point(digits):
    from qcompile.data.digits import load_digits_split
    base, calib = digits
    x, y = load_digits_split().test
    acc = lambda g: float((_run(g, x).argmax(1) == y).mean() * 100)  # noqa: E731
    g, _ = _quantize(base, calib)
    assert acc(g) >= acc(base) - 0.5


def test_bias_correction_removes_the_mean_output_shift(digits):
    base, calib = digits
    x = np.concatenate([f["image"] for f in calib])
    on, _ = _quantize(base, calib, "quantize{act_bits=0,weight_bits=4}")
    off, _ = _quantize(base, calib, "quantize{act_bits=0,weight_bits=4,bias_correction=false}")
    ref = _run(base, x)
    shift = lambda g: np.abs((_run(g, x) - ref).mean(axis=0)).mean()  # noqa: E731
    assert shift(on) < shift(off)


def test_excluded_layers_stay_float(digits):
    base, calib = digits
    g, stats = _quantize(base, calib, "quantize{exclude=fc|stem.*}")
    fc = g.node("fc")
    assert fc.inputs[1] in g.constants and g.constants[fc.inputs[1]].dtype == np.float32
    assert stats["quantized"] == len([n for n in base.nodes if n.op in ("conv2d", "linear")]) - 2


def test_size_budget_picks_int4_layers_and_is_honoured(digits):
    base, calib = digits
    full = sum(base.types[n.inputs[1]].numel for n in base.nodes if n.op in ("conv2d", "linear"))
    g, stats = _quantize(base, calib, "quantize{size=0.7}")
    assert stats["weight_bytes"] <= 0.7 * full and stats["int4_layers"]
    with pytest.raises(PreconditionError, match="impossible"):
        _quantize(base, calib, "quantize{size=0.3}")


def test_needs_calibration_data_for_activations(digits):
    base, _ = digits
    with pytest.raises(PreconditionError, match="calibration"):
        PassManager(parse_pipeline("quantize")).run(base, PassContext())
    g = PassManager(parse_pipeline("quantize{act_bits=0,bias_correction=false}")).run(base, PassContext())
    assert not any(n.op == "quantize_linear" for n in g.nodes)


def test_factorized_sequence_is_quantized_factor_by_factor(digits):
    base, calib = digits
    g, _ = _quantize(base, calib, "spatial-svd{macs=0.6},quantize")
    factors = [n for n in g.nodes if n.op == "conv2d" and any(p["pass"] == "spatial-svd"
                                                               for p in n.meta.get("provenance", []))]
    assert factors and all(n.meta["provenance"][-1]["pass"] == "quantize" for n in factors)
    assert len(_weight_dqs(g)) == len([n for n in g.nodes if n.op in ("conv2d", "linear")])


def test_onnx_qdq_export_runs_in_onnxruntime_and_reimports(digits, tmp_path):
    import onnxruntime as ort

    base, calib = digits
    g, _ = _quantize(base, calib, "quantize{int4=conv_out.*}")
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    assert any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    x = np.concatenate([f["image"] for f in calib])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
    ref = _run(g, x)
    assert np.abs(got - ref).max() <= INT8_ATOL_REL * np.abs(ref).max()
    path = tmp_path / "q.onnx"
    path.write_bytes(model.SerializeToString())
    back = load_onnx(path)
    assert back.op_counts().get("quantize_linear") == g.op_counts()["quantize_linear"]
    assert np.abs(_run(back, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_tvm_x86_computes_quantized_layers_in_integers(digits):
    from qcompile.backends.tvm.backend import TvmBackend
    from qcompile.backends.tvm.integer_lowering import qdq_to_integer
    from qcompile.backends.tvm.relax_builder import to_relax

    base, calib = digits
    g, _ = _quantize(base, calib)
    _, count = qdq_to_integer(to_relax(g))
    dense_layers = [n for n in g.nodes if n.op in ("conv2d", "linear") and n.attrs.get("group", 1) == 1]
    assert count == len(dense_layers)
    runner = TvmBackend("x86").runner(g)
    for feed in calib[:8]:
        ref = _run(g, feed["image"])
        assert np.abs(runner.run(feed)[0] - ref).max() <= INT8_ATOL_REL * np.abs(ref).max()


def test_int8_ptq_on_mnist_vgg_within_half_a_point():
    """Per-channel int8 PTQ of a real trained MNIST net, 1000 held-out test digits."""
    from qcompile.data.mnist import load_mnist_split
    from qcompile.models.mnist_nets import evaluate

    split = load_mnist_split()
    (xtr, _), (xte, yte) = split.train, split.test
    base = PassManager(parse_pipeline("fold-bn,dead-code")).run(load_model("qcompile.models.mnist_nets:vgg_style").graph)
    g, _ = _quantize(base, [{"image": xtr[i:i + 1]} for i in range(128)])
    assert evaluate(g, xte, yte) >= evaluate(base, xte, yte) - 0.5


def _int8_asm(graph, target) -> str:
    from qcompile.backends.tvm.lowering import assembly, build

    return assembly(build(graph, target))


def test_x86_artifacts_use_integer_dot_product_instructions(digits):
    """vpdpbusd for an AVX-512 VNNI CPU (compiled, not run: this host may lack it); the AVX2 build
    multiplies bytes with vpmaddwd.  Integer lowering, not float QDQ, is what these count."""
    from qcompile.backends.tvm.lowering import x86_target

    base, calib = digits
    g, _ = _quantize(base, calib)
    vnni = _int8_asm(g, x86_target("znver4"))
    assert vnni.count("vpdpbusd") >= 4
    avx2 = _int8_asm(g, x86_target("znver3"))
    assert "vpdpbusd" not in avx2 and avx2.count("vpmaddwd") >= 4


def test_arm64_int8_matches_on_the_emulated_boards(digits, arm_board, monkeypatch):
    """sdot with +dotprod (Cortex-A76 board), plain NEON without (Cortex-A72 board); both run over
    RPC on the emulated board and match the quantized reference within the int8 bound."""
    from qcompile import board
    from qcompile.backends.tvm.backend import TvmBackend
    from qcompile.backends.tvm.lowering import resolve

    base, calib = digits
    g, _ = _quantize(base, calib)
    assert _int8_asm(g, resolve("arm64-dotprod")).count("sdot") >= 4
    assert "sdot" not in _int8_asm(g, resolve("arm64"))
    a76 = board.serve("arm64-dotprod")
    try:
        for target, address in (("arm64", arm_board.address), ("arm64-dotprod", a76.address)):
            monkeypatch.setenv("QCOMPILE_RPC", address)
            runner = TvmBackend(target).runner(g)
            for feed in calib[:4]:
                ref = _run(g, feed["image"])
                assert np.abs(runner.run(feed)[0] - ref).max() <= INT8_ATOL_REL * np.abs(ref).max(), target
    finally:
        a76.stop()


def test_third_party_onnx_model_goes_to_qdq_onnx_and_integer_tvm(rapidocr_models, tmp_path):
    """RapidOCR's PaddleOCR direction classifier (an exported third-party model): fp32 ONNX ->
    quantize -> QDQ ONNX that onnxruntime runs, and TVM x86 / arm64-dotprod builds that use integer
    dot-product instructions; every artifact is verified against the quantized IR by the compiler."""
    import json

    from qcompile.backends.tvm.lowering import host_x86_target, resolve
    from qcompile.cli import main

    import onnxruntime as ort

    src = rapidocr_models["ch_ppocr_mobile_v2.0_cls_infer.onnx"]
    pipeline = "fold-bn,dead-code,quantize{reduce_range=true}"
    out = tmp_path / "tvm"
    assert main(["compile", str(src), "-p", pipeline, "-t", "tvm-x86", "-o", str(out),
                 "--input-shape", "x=1x3x48x192"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["backend_vs_compressed_ir_rel_error"] <= INT8_ATOL_REL
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 48, 192), np.float32)} for _ in range(4)]
    g = PassManager(parse_pipeline(pipeline)).run(load_onnx(src, {"x": (1, 3, 48, 192)}),
                                                 PassContext(calibration=feeds))
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 50
    # onnxruntime executing the QDQ operators as written agrees with the reference interpreter to
    # fp32 rounding; its fused int8 kernels run too (their own rounding: within 10 % here)
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for opts, bound in ((exact, 1e-5), (ort.SessionOptions(), 0.1)):
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for feed in feeds:
            ref = _run(g, feed["x"])
            assert np.abs(sess.run(None, feed)[0] - ref).max() <= bound * np.abs(ref).max()
    x86 = _int8_asm(g, host_x86_target())
    assert x86.count("vpdpbusd" if "avx512vnni" in host_x86_target().features else "vpmaddwd") >= 10
    assert _int8_asm(g, resolve("arm64-dotprod")).count("sdot") >= 10


def test_int8_check_accepts_rounding_flips_and_refuses_a_wrong_lowering(digits):
    """compile's int8 check (``check_numerics``): an output within four int8 steps of the quantized IR
    holds the first bound; one further off holds only if it approximates the ORIGINAL as well as the
    quantized IR does (``INT8_RMS_FACTOR``): the quantization error in other places (what compounding
    one-step flips give) passes, a lost scale or a shifted output fails, naming both errors."""
    from qcompile.compiler import INT8_RMS_FACTOR, check_numerics
    from qcompile.errors import NumericsError
    from qcompile.passes.manager import run_reference

    graph, calib = digits
    q, _ = _quantize(graph, calib, "quantize{weight_bits=4}")  # 4-bit weights: an error well above four int8 steps
    feeds = calib[:8]
    orig, ir = run_reference(graph, feeds), run_reference(q, feeds)
    kw = dict(exact=False, quantized=True, target="t", backend="b")
    assert check_numerics(ir, orig, q, feeds, **kw)["int8_bound_held"] == ["steps"]
    # the same quantization error, placed elsewhere: as far from the original, many steps from the IR
    rng = np.random.default_rng(0)
    err = ir[0] - orig[0]
    moved = [orig[0] + rng.permutation(err.ravel()).reshape(err.shape)]
    assert np.abs(moved[0] - ir[0]).max() > INT8_ATOL_REL * np.abs(ir[0]).max()
    v = check_numerics(moved, orig, q, feeds, **kw)
    assert v["int8_bound_held"] == ["rms"]
    assert v["backend_vs_original_rms_rel"][0] == pytest.approx(v["quantized_ir_vs_original_rms_rel"][0])
    # wrong lowerings: a lost per-tensor scale, a zero point off by a few steps of the output range
    step = np.abs(ir[0]).max() / 127
    for wrong in ([ir[0] * 1.5], [ir[0] + 6 * step]):
        with pytest.raises(NumericsError, match=r"output 0: max error vs the quantized IR .* RMS error vs the "
                                                rf"original .* > {INT8_RMS_FACTOR:g} x the quantized IR's"):
            check_numerics(wrong, orig, q, feeds, **kw)
