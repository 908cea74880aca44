"""The reference interpreter (GraphModule) and the ``torch`` backend.

Semantics are checked against onnxruntime running the same graph exported to ONNX
(pools with asymmetric pads / ceil_mode / count_include_pad, every elementwise op),
and against plain numpy formulas.  Weights and inputs are random (seeded).

fp32 tolerance: |y - y_ref| <= RTOL * |y_ref| + ATOL_REL * max|y_ref|.
"""

import numpy as np
import pytest
import torch

from qcompile.backends.torch_backend import IMPLS, GraphModule, TorchBackend, to_torch, write_back
from qcompile.errors import InputError, IRVerificationError, ShapeError, UnsupportedOpError
from qcompile.ir import Graph, TensorType, ops, verify

RTOL = 1e-5
ATOL_REL = 1e-5


def assert_close(y, ref, rtol=RTOL, atol_rel=ATOL_REL):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    atol = atol_rel * float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(y - ref)
    assert np.all(err <= atol + rtol * np.abs(ref)), f"max abs error {err.max():.3g} (atol {atol:.3g})"


def rng(seed=0):
    return np.random.default_rng(seed)


def single_op_graph(op, in_shapes, attrs=None, consts=(), dtype="float32"):
    """x0..xn inputs (then constants) -> op -> output."""
    g = Graph(op)
    ins = [g.add_input(f"x{i}", TensorType(s, dtype)) for i, s in enumerate(in_shapes)]
    ins += [g.add_constant(f"c{i}", c) for i, c in enumerate(consts)]
    g.outputs = g.append(g.make_node(op, ins, attrs or {}, name=op)).outputs
    verify(g)
    return g


def run_ort(g, feeds):
    import onnxruntime as ort

    from qcompile.frontends.onnx_export import to_onnx

    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_gm(g, feeds):
    with torch.no_grad():
        out = to_torch(g)(*[torch.from_numpy(feeds[i]) for i in g.inputs])
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


# ---------------------------------------------------------------------------- coverage
def test_every_ir_op_has_an_implementation():
    assert set(ops.all_ops()) <= set(IMPLS), sorted(set(ops.all_ops()) - set(IMPLS))


def test_missing_implementation_names_op_and_node(monkeypatch):
    g = single_op_graph("relu", [(2, 3)])
    monkeypatch.delitem(IMPLS, "relu")
    with pytest.raises(UnsupportedOpError, match="'relu' at node 'relu'"):
        GraphModule(g)


# ---------------------------------------------------------------------------- ONNX semantics
POOLS = [
    # op, kernel, strides, pads (t,l,b,r), ceil_mode, extra attrs
    ("max_pool2d", (3, 3), (2, 2), (1, 1, 1, 1), 1, {}),
    ("max_pool2d", (3, 2), (2, 2), (0, 1, 2, 0), 1, {}),
    ("max_pool2d", (2, 2), (1, 2), (1, 0, 0, 1), 0, {"dilations": (2, 1)}),
    ("max_pool2d", (3, 3), (3, 3), (0, 0, 0, 0), 1, {}),
    ("avg_pool2d", (3, 3), (2, 2), (1, 1, 1, 1), 1, {"count_include_pad": 1}),
    ("avg_pool2d", (3, 3), (2, 2), (1, 1, 1, 1), 1, {"count_include_pad": 0}),
    ("avg_pool2d", (3, 2), (2, 1), (0, 1, 2, 0), 0, {"count_include_pad": 0}),
    ("avg_pool2d", (3, 2), (2, 1), (0, 1, 2, 0), 1, {"count_include_pad": 1}),
    ("avg_pool2d", (2, 2), (2, 2), (0, 0, 0, 0), 1, {"count_include_pad": 0}),
    ("avg_pool2d", (2, 3), (2, 2), (0, 0, 0, 0), 0, {"count_include_pad": 0}),
]


@pytest.mark.parametrize("op,k,s,pads,ceil,extra", POOLS)
def test_pools_match_onnxruntime(op, k, s, pads, ceil, extra):
    g = single_op_graph(op, [(2, 3, 9, 10)], {"kernel": k, "strides": s, "pads": pads, "ceil_mode": ceil, **extra})
    x = rng().standard_normal((2, 3, 9, 10)).astype(np.float32)
    ours = run_gm(g, {"x0": x})[0]
    assert ours.shape == g.types[g.outputs[0]].shape
    assert_close(ours, run_ort(g, {"x0": x})[0])


@pytest.mark.parametrize("ceil", [0, 1])
@pytest.mark.parametrize("include", [0, 1])
def test_symmetric_pools_match_torch(ceil, include):
    x = torch.randn(1, 2, 7, 8)
    attrs = {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "ceil_mode": ceil}
    g = single_op_graph("avg_pool2d", [(1, 2, 7, 8)], {**attrs, "count_include_pad": include})
    ref = torch.nn.functional.avg_pool2d(x, 3, 2, 1, ceil_mode=bool(ceil), count_include_pad=bool(include))
    assert_close(run_gm(g, {"x0": x.numpy()})[0], ref.numpy())
    g = single_op_graph("max_pool2d", [(1, 2, 7, 8)], attrs)
    ref = torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=bool(ceil))
    assert_close(run_gm(g, {"x0": x.numpy()})[0], ref.numpy())


@pytest.mark.parametrize("pads,strides,dil,group", [
    ((1, 1, 1, 1), (1, 1), (1, 1), 1), ((0, 1, 2, 0), (2, 1), (1, 1), 1),
    ((2, 0, 1, 1), (1, 2), (2, 1), 2), ((1, 1, 1, 1), (2, 2), (1, 1), 4),
])
def test_conv2d_matches_onnxruntime(pads, strides, dil, group):
    r = rng(1)
    w = r.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    b = r.standard_normal(8).astype(np.float32)
    g = single_op_graph("conv2d", [(1, 4, 8, 9)], {"pads": pads, "strides": strides, "dilations": dil,
                                                   "group": group}, consts=(w, b))
    x = r.standard_normal((1, 4, 8, 9)).astype(np.float32)
    assert_close(run_gm(g, {"x0": x})[0], run_ort(g, {"x0": x})[0])


UNARY = [("relu", {}), ("sigmoid", {}), ("tanh", {}), ("exp", {}), ("erf", {}), ("neg", {}), ("abs", {}),
         ("identity", {}), ("hardswish", {}), ("silu", {}), ("hardsigmoid", {}),
         ("hardsigmoid", {"alpha": 1 / 6, "beta": 0.5}), ("clip", {"min": -0.5, "max": 0.7}),
         ("clip", {"min": 0.0}), ("clip", {"max": 0.25}), ("clip", {}), ("leaky_relu", {"alpha": 0.2}),
         ("gelu", {}), ("gelu", {"approximate": "tanh"})]


@pytest.mark.parametrize("op,attrs", UNARY, ids=[f"{o}-{a}" for o, a in UNARY])
def test_unary_ops_match_onnxruntime(op, attrs):
    g = single_op_graph(op, [(2, 3, 4)], attrs)
    x = (rng(2).standard_normal((2, 3, 4)) * 3).astype(np.float32)
    assert_close(run_gm(g, {"x0": x})[0], run_ort(g, {"x0": x})[0])


@pytest.mark.parametrize("op", ["sqrt", "reciprocal"])
def test_positive_domain_unary_ops(op):
    g = single_op_graph(op, [(5,)])
    x = rng(3).uniform(0.5, 2.0, 5).astype(np.float32)
    assert_close(run_gm(g, {"x0": x})[0], np.sqrt(x) if op == "sqrt" else 1 / x)


@pytest.mark.parametrize("op", ops.BINARY_OPS)
def test_binary_ops_broadcast(op):
    r = rng(4)
    a = r.uniform(0.5, 2.0, (2, 3, 4)).astype(np.float32)
    b = r.uniform(0.5, 2.0, (3, 1)).astype(np.float32)
    g = single_op_graph(op, [(2, 3, 4), (3, 1)])
    ref = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
           "max": np.maximum, "min": np.minimum}[op](a, b)
    assert_close(run_gm(g, {"x0": a, "x1": b})[0], ref)


def test_batch_norm_inference_formula():
    r = rng(5)
    scale, bias, mean = (r.standard_normal(3).astype(np.float32) for _ in range(3))
    var = r.uniform(0.5, 2, 3).astype(np.float32)
    g = single_op_graph("batch_norm", [(2, 3, 4, 5)], {"epsilon": 1e-3}, consts=(scale, bias, mean, var))
    x = r.standard_normal((2, 3, 4, 5)).astype(np.float32)
    c = (slice(None), None, None)
    ref = scale[c] * (x - mean[c]) / np.sqrt(var[c] + 1e-3) + bias[c]
    assert_close(run_gm(g, {"x0": x})[0], ref)


@pytest.mark.parametrize("op,shape,attrs,ref", [
    ("flatten", (2, 3, 4, 5), {"axis": 2}, lambda x: x.reshape(6, 20)),
    ("flatten", (2, 3, 4), {"axis": 0}, lambda x: x.reshape(1, 24)),
    ("reshape", (2, 3, 4), {"shape": (4, 6)}, lambda x: x.reshape(4, 6)),
    ("transpose", (2, 3, 4), {"perm": (2, 0, 1)}, lambda x: x.transpose(2, 0, 1)),
    ("softmax", (2, 3, 4), {"axis": 1}, lambda x: np.exp(x) / np.exp(x).sum(1, keepdims=True)),
    ("reduce_mean", (2, 3, 4), {"axes": (0, 2), "keepdims": 0}, lambda x: x.mean((0, 2))),
    ("reduce_mean", (2, 3, 4), {"axes": (-1,), "keepdims": 1}, lambda x: x.mean(-1, keepdims=True)),
    ("global_avg_pool", (2, 3, 4, 5), {}, lambda x: x.mean((2, 3), keepdims=True)),
])
def test_layout_and_reduction_ops(op, shape, attrs, ref):
    g = single_op_graph(op, [shape], attrs)
    x = rng(6).standard_normal(shape).astype(np.float32)
    assert_close(run_gm(g, {"x0": x})[0], ref(x))


def test_linear_matmul_concat():
    r = rng(7)
    w, b = r.standard_normal((5, 4)).astype(np.float32), r.standard_normal(5).astype(np.float32)
    x = r.standard_normal((2, 3, 4)).astype(np.float32)
    g = single_op_graph("linear", [(2, 3, 4)], consts=(w, b))
    assert_close(run_gm(g, {"x0": x})[0], x @ w.T + b)
    y = r.standard_normal((4, 6)).astype(np.float32)
    g = single_op_graph("matmul", [(2, 3, 4), (4, 6)])
    assert_close(run_gm(g, {"x0": x, "x1": y})[0], x @ y)
    g = single_op_graph("concat", [(2, 3, 4), (2, 1, 4)], {"axis": -2})
    z = r.standard_normal((2, 1, 4)).astype(np.float32)
    assert_close(run_gm(g, {"x0": x, "x1": z})[0], np.concatenate([x, z], -2))


# ---------------------------------------------------------------------------- module structure
def two_output_graph():
    """x -> conv -> (relu, add int-free); an int64 constant is carried (unused by compute)."""
    r = rng(8)
    g = Graph("two")
    x = g.add_input("x", TensorType((1, 2, 5, 5)))
    w = g.add_constant("conv.weight", r.standard_normal((3, 2, 3, 3)).astype(np.float32))
    c = g.append(g.make_node("conv2d", [x, w], {"pads": (1, 1, 1, 1)}, name="conv")).outputs[0]
    r1 = g.append(g.make_node("relu", [c], name="relu")).outputs[0]
    s = g.add_constant("shift", np.float32(0.5).reshape(()))
    a = g.append(g.make_node("add", [c, s], name="shift_add")).outputs[0]
    g.add_constant("steps", np.array([3], np.int64))
    g.outputs = [r1, a]
    verify(g)
    return g


def test_parameters_buffers_and_outputs():
    g = two_output_graph()
    gm = to_torch(g)
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    assert {gm.param_names["conv.weight"], gm.param_names["shift"]} == set(params)
    assert set(buffers) == {gm.param_names["steps"]}
    assert all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for p in to_torch(g, trainable=False).parameters())
    assert torch.equal(gm.constant("conv.weight").detach(), torch.tensor(g.constants["conv.weight"]))
    out = gm(torch.randn(1, 2, 5, 5))
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (1, 3, 5, 5)
    with pytest.raises(InputError, match="takes 1 inputs"):
        gm()


def test_constant_names_cannot_collide_with_module_attributes():
    """User tensors named like nn.Module attributes ('half', 'to', 'train') must not break the interpreter."""
    g = Graph("names")
    x = g.add_input("x", TensorType((2, 3)))
    y = x
    for name in ("half", "to", "train", "forward", "1.weight", "c_half"):
        c = g.add_constant(name, np.full((3,), 2.0, np.float32), exact_name=True)
        y = g.append(g.make_node("mul", [y, c], name=f"mul_{name}")).outputs[0]
    g.outputs = [y]
    gm = to_torch(g)
    assert len(set(gm.param_names.values())) == 6
    assert torch.allclose(gm(torch.ones(2, 3)), torch.full((2, 3), 64.0))


def test_write_back_after_training_step():
    torch.manual_seed(0)
    g = two_output_graph()
    gm = to_torch(g)
    x = torch.randn(4, 2, 5, 5)[:1]
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    relu, shifted = gm(x)
    (relu.square().mean() + shifted.abs().mean()).backward()
    opt.step()
    g2 = write_back(g, gm)
    verify(g2)
    assert g2 is not g and set(g2.constants) == set(g.constants)
    assert not np.array_equal(g2.constants["conv.weight"], g.constants["conv.weight"])
    assert not g2.constants["conv.weight"].flags.writeable
    assert g2.types == g.types
    with torch.no_grad():
        for a, b in zip(to_torch(g2)(x), gm(x)):
            assert torch.equal(a, b)
        before = to_torch(g)(x)[0]
    assert not torch.equal(before, gm(x)[0].detach())  # the original graph is untouched


def test_write_back_rejects_shape_change_and_foreign_module():
    g = two_output_graph()
    gm = to_torch(g)
    setattr(gm, gm.param_names["conv.weight"], torch.nn.Parameter(torch.zeros(3, 2, 1, 1)))
    with pytest.raises(IRVerificationError, match="conv.weight"):
        write_back(g, gm)
    with pytest.raises(IRVerificationError, match="no parameter"):
        write_back(g, to_torch(single_op_graph("relu", [(2,)])))


# ---------------------------------------------------------------------------- backend
def test_runner_numpy_io_and_input_checks():
    g = two_output_graph()
    runner = TorchBackend().runner(g)
    assert runner.input_names == ["x"] and runner.output_names == g.outputs
    x = rng(9).standard_normal((1, 2, 5, 5))
    outs = runner.run({"x": x})  # float64 is converted to the declared float32
    assert [o.dtype for o in outs] == [np.float32, np.float32]
    assert_close(outs[0], run_gm(g, {"x": x.astype(np.float32)})[0])
    with pytest.raises(InputError, match="missing"):
        runner.run({})
    with pytest.raises(ShapeError, match="shape"):
        runner.run({"x": np.zeros((1, 2, 5, 6), np.float32)})
    with pytest.raises(InputError, match="dtype"):
        runner.run({"x": np.zeros((1, 2, 5, 5), np.int64)})


def test_runner_respects_num_threads(monkeypatch):
    g = two_output_graph()
    before = torch.get_num_threads()
    runner = TorchBackend(num_threads=1).runner(g)
    seen = []
    real = runner.module.forward
    monkeypatch.setattr(runner.module, "forward", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    runner.run({"x": np.zeros((1, 2, 5, 5), np.float32)})
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(InputError, match="num_threads"):
        TorchBackend(num_threads=0)


def test_build_and_load_round_trip(tmp_path):
    g = two_output_graph()
    backend = TorchBackend()
    files = backend.build(g, tmp_path, {"num_threads": 2})
    assert files == ["model.onnx"] and (tmp_path / "model.onnx").is_file()
    runner = backend.load(tmp_path, {"files": files})
    assert runner.num_threads == 2
    x = rng(10).standard_normal((1, 2, 5, 5)).astype(np.float32)
    for a, b in zip(runner.run({"x": x}), backend.runner(g).run({"x": x})):
        assert_close(a, b)
    assert backend.versions() == {"torch": torch.__version__}
