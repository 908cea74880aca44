"""Low-rank factorization passes: structure, exactness at full rank, error falling with rank,
budgets and allocation, provenance, and data-driven reconstruction on a trained model.

Structure/exactness use small random-weight graphs (properties of the rewrite).  Claims about
reconstruction quality use the bundled DigitsNet (trained on real digits) and its real
calibration images.

Tolerances: fp32 rewrites that are exact in real arithmetic (full rank) are held to
|y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref| (SVD in float64, weights rounded to fp32).
"""

import numpy as np
import pytest

from qcompile.errors import PipelineError, PreconditionError
from qcompile.factorize.layers import capture, compute_macs, splice
from qcompile.factorize.ranks import Candidate, allocate
from qcompile.frontends import load_model
from qcompile.ir import Graph, TensorType
from qcompile.passes import PASSES, PassContext, PassManager, parse_pipeline
from qcompile.passes.manager import max_rel_error, run_reference, within_fp32_tolerance

RTOL, ATOL_REL = 1e-4, 1e-5


def conv_graph(cin=6, cout=10, k=3, stride=1, pads=(1, 1, 1, 1), dil=1, hw=9, linear=True, seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("convnet")
    x = g.add_input("x", TensorType((2, cin, hw, hw)))
    w = g.add_constant("c.weight", rng.standard_normal((cout, cin, k, k)).astype(np.float32))
    b = g.add_constant("c.bias", rng.standard_normal(cout).astype(np.float32))
    c = g.append(g.make_node("conv2d", [x, w, b], {"strides": (stride, stride), "pads": pads,
                                                    "dilations": (dil, dil)}, name="conv"))
    r = g.append(g.make_node("relu", [c.outputs[0]], name="relu"))
    out = r.outputs[0]
    if linear:
        p = g.append(g.make_node("global_avg_pool", [out], name="gap"))
        f = g.append(g.make_node("flatten", [p.outputs[0]], {"axis": 1}, name="flat"))
        lw = g.add_constant("fc.weight", rng.standard_normal((12, cout)).astype(np.float32))
        lb = g.add_constant("fc.bias", rng.standard_normal(12).astype(np.float32))
        out = g.append(g.make_node("linear", [f.outputs[0], lw, lb], name="fc")).outputs[0]
    g.outputs = [out]
    return g


def feeds(g: Graph, n=2, seed=1):
    rng = np.random.default_rng(seed)
    return [{i: rng.standard_normal(g.types[i].shape).astype(np.float32) for i in g.inputs} for _ in range(n)]


def factorize_at(g: Graph, pass_name: str, node_name: str, rank, **opts) -> Graph:
    """Apply one pass's factorization to one node at an exact rank (bypasses rank selection,
    so full rank - which never saves MACs - can be checked for exactness)."""
    g = g.clone()
    p = PASSES[pass_name](**opts)
    node = g.node(node_name)
    ctx = PassContext(calibration=feeds(g))
    p.prepare(g, [node], ctx)
    steps, _ = p.factorize(g, node, rank, ctx)
    splice(g, node, steps, {"pass": pass_name, "rank": rank})
    return g


# ----------------------------------------------------------------------------- structure
def test_spatial_svd_structure_keeps_strides_pads_dilations():
    g = conv_graph(stride=2, pads=(2, 1, 2, 1), dil=2, k=3, hw=11)
    out = factorize_at(g, "spatial-svd", "conv", 4)
    convs = [n for n in out.nodes if n.op == "conv2d"]
    assert [out.types[n.inputs[1]].shape for n in convs] == [(4, 6, 3, 1), (10, 4, 1, 3)]
    assert convs[0].attrs["strides"] == (2, 1) and convs[1].attrs["strides"] == (1, 2)
    assert convs[0].attrs["pads"] == (2, 0, 2, 0) and convs[1].attrs["pads"] == (0, 1, 0, 1)
    assert convs[0].attrs["dilations"] == (2, 1) and convs[1].attrs["dilations"] == (1, 2)
    assert len(convs[0].inputs) == 2 and len(convs[1].inputs) == 3  # bias on the last factor


def test_tucker2_and_cp_structure():
    g = conv_graph()
    t = [n for n in factorize_at(g, "tucker2", "conv", (4, 3)).nodes if n.op == "conv2d"]
    tg = factorize_at(g, "tucker2", "conv", (4, 3))
    assert [tg.types[n.inputs[1]].shape for n in t] == [(3, 6, 1, 1), (4, 3, 3, 3), (10, 4, 1, 1)]
    cg = factorize_at(g, "cp", "conv", 5)
    c = [n for n in cg.nodes if n.op == "conv2d"]
    assert [cg.types[n.inputs[1]].shape for n in c] == [(5, 6, 1, 1), (5, 1, 3, 1), (5, 1, 1, 3), (10, 5, 1, 1)]
    assert [n.attrs["group"] for n in c] == [1, 5, 5, 1]


def test_lowrank_svd_structure():
    g = conv_graph()
    out = factorize_at(g, "lowrank-svd", "fc", 3)
    lin = [n for n in out.nodes if n.op == "linear"]
    assert [out.types[n.inputs[1]].shape for n in lin] == [(3, 10), (12, 3)]


# ---------------------------------------------------------------------- exact at full rank
@pytest.mark.parametrize("pass_name,node,rank", [
    ("lowrank-svd", "fc", 10), ("spatial-svd", "conv", 18), ("tucker2", "conv", (10, 6)),
    ("channel-decomp", "conv", 10)])
def test_full_rank_is_exact(pass_name, node, rank):
    g = conv_graph(stride=2, pads=(1, 0, 1, 2), hw=10)
    f = feeds(g)
    out = factorize_at(g, pass_name, node, rank, **({"fit": "weights"} if pass_name == "channel-decomp" else {}))
    assert within_fp32_tolerance(run_reference(out, f), run_reference(g, f), RTOL, ATOL_REL)


# ---------------------------------------------------------------------- error falls with rank
@pytest.mark.parametrize("pass_name,ranks", [
    ("lowrank-svd", [1, 3, 6, 9]), ("spatial-svd", [1, 4, 9, 15]), ("tucker2", [(2, 2), (5, 3), (8, 5)]),
    ("cp", [2, 8, 30])])
def test_output_error_decreases_with_rank(pass_name, ranks):
    g = conv_graph(seed=3)
    f = feeds(g, 4)
    ref = run_reference(g, f)
    node = "fc" if pass_name == "lowrank-svd" else "conv"
    errs = [max_rel_error(run_reference(factorize_at(g, pass_name, node, r), f), ref) for r in ranks]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


# ---------------------------------------------------------------------- budgets, allocation
@pytest.fixture(scope="module")
def digits():
    lm = load_model("qcompile.models.digits:digits_cnn", num_calibration=32)
    g = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
    return g, lm.calibration


@pytest.mark.parametrize("pipeline", ["spatial-svd{macs=0.5,multiple=2}", "tucker2{macs=0.5,multiple=2}",
                                      "channel-decomp{macs=0.5,multiple=2}", "cp{macs=0.5,multiple=2}"])
def test_mac_budget_is_met_and_provenance_recorded(digits, pipeline):
    g, calib = digits
    pm = PassManager(parse_pipeline(pipeline))
    out = pm.run(g, PassContext(calibration=calib))
    assert compute_macs(out) <= 0.5 * compute_macs(g)
    stats = pm.records[-1].stats
    assert stats["layers"], "nothing was factorized"
    for name, row in stats["layers"].items():
        assert row["macs_after"] < row["macs_before"]
        made = [n for n in out.nodes if any(p.get("source") == name for p in n.meta.get("provenance", []))]
        assert len(made) >= 2
        prov = made[0].meta["provenance"][-1]
        assert prov["rank"] == row["rank"] and prov["method"] and prov["macs_before"] == row["macs_before"]


def test_impossible_budget_is_refused_by_name(digits):
    g, calib = digits
    with pytest.raises(PipelineError, match="infeasible"):
        PassManager(parse_pipeline("spatial-svd{macs=0.01}")).run(g, PassContext(calibration=calib))


def test_allocation_gives_fast_decaying_layers_lower_ranks():
    """Energy allocation is not one uniform ratio: the layer whose spectrum decays fast gives up rank first."""
    def cands(decay):
        s2 = decay ** np.arange(16)
        e = np.cumsum(s2) / s2.sum()
        return [Candidate(None, 1600, 1.0)] + [Candidate(r, 100 * r, float(e[r - 1])) for r in range(15, 0, -1)]

    got = allocate({"steep": cands(0.5), "flat": cands(0.98)}, budget=1600)
    assert got["steep"].rank < got["flat"].rank
    assert got["steep"].macs + got["flat"].macs <= 1600


def test_channel_decomp_needs_calibration(digits):
    g, _ = digits
    with pytest.raises(PreconditionError, match="calibration"):
        PassManager(parse_pipeline("channel-decomp")).run(g, PassContext(calibration=None))


# ------------------------------------------------- data-driven reconstruction on a trained model
def _digits_test_error(g_ref, g, x):
    feeds_ = [{"image": x[i:i + 1]} for i in range(len(x))]
    return max_rel_error(run_reference(g, feeds_), run_reference(g_ref, feeds_))


def test_asymmetric_nonlinear_reconstruction_beats_plain_svd(digits):
    """Same ranks, same structure (d-filter conv + 1x1): fitting the trained model's real responses
    (asymmetric, post-ReLU) reproduces its outputs on held-out real digits better than SVD of the weights."""
    from qcompile.data.digits import load_digits_split

    g, calib = digits
    x = load_digits_split().test[0][:64]
    errs = {}
    for fit in ("weights", "responses"):
        out = PassManager(parse_pipeline(f"channel-decomp{{rank=8,fit={fit}}}")).run(
            g, PassContext(calibration=calib))
        errs[fit] = _digits_test_error(g, out, x)
    assert errs["responses"] < 0.7 * errs["weights"], errs


def test_capture_returns_intermediate_values(digits):
    g, calib = digits
    conv = next(n for n in g.nodes if n.op == "conv2d")
    got = capture(g, calib[:3], [conv.outputs[0]])
    assert got[conv.outputs[0]].shape == (3,) + g.types[conv.outputs[0]].shape[1:]


def _pool_then_reshape(target) -> Graph:
    """conv -> relu -> global average pool (2, 10, 1, 1) -> reshape to ``target``."""
    g = conv_graph(linear=False)
    p = g.append(g.make_node("global_avg_pool", [g.outputs[0]], name="gap"))
    g.outputs = [g.append(g.make_node("reshape", [p.outputs[0]], {"shape": target}, name="r")).outputs[0]]
    return g


def test_capture_batches_reshapes_that_keep_the_batch_axis():
    """A reshape keeping axis 0 ((2, 10, 1, 1) -> (2, 10)) runs batched, and batched capture gives what
    one feed at a time gives (fp32: the same sums); one folding the batch into another axis does not."""
    from qcompile.factorize.layers import _batch_free

    g = _pool_then_reshape((2, 10))
    assert _batch_free(g)
    assert not _batch_free(_pool_then_reshape((20,)))
    assert not _batch_free(_pool_then_reshape((10, 2)))
    rng = np.random.default_rng(0)
    fs = [{"x": rng.standard_normal((2, 6, 9, 9)).astype(np.float32)} for _ in range(5)]
    batched = capture(g, fs, g.outputs)[g.outputs[0]]
    one_by_one = np.concatenate([capture(g, [f], g.outputs)[g.outputs[0]] for f in fs])
    assert batched.shape == (10, 10)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_latency_budget_uses_measured_latency():
    """latency=0.6: ranks chosen so the layers' measured (interpolated) latency fits 60 % of the original's."""
    g = conv_graph(cin=64, cout=64, hw=28, linear=False)
    pm = PassManager(parse_pipeline("spatial-svd{latency=0.6,probes=3}"))
    out = pm.run(g, PassContext(calibration=feeds(g)))
    stats = pm.records[-1].stats
    measured = stats["measured_latency_s"]
    assert "conv@-1" in measured and len(measured) == 4  # the original + 3 probed ranks, built alone
    row = stats["layers"]["conv"]
    assert row["latency_us_est"] * 1e-6 <= 0.6 * measured["conv@-1"] * 1.0001
    assert row["macs_after"] < row["macs_before"] and compute_macs(out) == row["macs_after"]


def test_impossible_latency_budget_is_refused():
    g = conv_graph(cin=64, cout=64, hw=28, linear=False)
    with pytest.raises(PipelineError, match="infeasible.*measured on onnxruntime"):
        PassManager(parse_pipeline("spatial-svd{latency=0.001,probes=2}")).run(g, PassContext(calibration=feeds(g)))
