"""Small IR graphs with random (seeded) weights for pass tests.

Pass tests check structure and that the rewrite preserves the function; those
are properties of the rewrite, so random weights are adequate here.  Accuracy
claims use the trained bundled model (tests/test_digits_model.py, test_cli.py).
"""

from __future__ import annotations

import numpy as np

from qcompile.ir import Graph, TensorType


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def conv_bn(g: Graph, x: str, cin: int, cout: int, name: str, rng, *, k: int = 3, bias: bool = False,
            stride: int = 1, group: int = 1) -> str:
    w = g.add_constant(f"{name}.weight", rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3)
    ins = [x, w]
    if bias:
        ins.append(g.add_constant(f"{name}.bias", rng.standard_normal(cout).astype(np.float32)))
    p = k // 2
    conv = g.append(g.make_node("conv2d", ins, {"pads": (p, p, p, p), "strides": (stride, stride), "group": group},
                                name=name))
    bn = [g.add_constant(f"{name}_bn.{k_}", v) for k_, v in (
        ("weight", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        ("bias", rng.standard_normal(cout).astype(np.float32) * 0.1),
        ("running_mean", rng.standard_normal(cout).astype(np.float32) * 0.1),
        ("running_var", rng.uniform(0.5, 2.0, cout).astype(np.float32)))]
    b = g.append(g.make_node("batch_norm", [conv.outputs[0], *bn], {"epsilon": 1e-5}, name=f"{name}_bn"))
    return b.outputs[0]


def resnet_block_graph(seed: int = 0) -> Graph:
    """conv-bn-relu -> [conv-bn-relu-conv-bn + skip] -> relu -> bn(after add) -> gap -> linear-bn1d."""
    rng = _rng(seed)
    g = Graph("resblock")
    x = g.add_input("x", TensorType((1, 3, 10, 10)))
    h = g.append(g.make_node("relu", [conv_bn(g, x, 3, 8, "stem", rng)], name="stem_relu")).outputs[0]
    a = g.append(g.make_node("relu", [conv_bn(g, h, 8, 8, "b1", rng, bias=True)], name="b1_relu")).outputs[0]
    a = conv_bn(g, a, 8, 8, "b2", rng, group=2)
    s = g.append(g.make_node("add", [a, h], name="skip")).outputs[0]
    s = g.append(g.make_node("relu", [s], name="out_relu")).outputs[0]
    bn_params = [g.add_constant(f"post_bn.{k}", v) for k, v in (
        ("weight", rng.uniform(0.5, 1.5, 8).astype(np.float32)), ("bias", np.zeros(8, np.float32)),
        ("mean", np.zeros(8, np.float32)), ("var", np.ones(8, np.float32)))]
    s = g.append(g.make_node("batch_norm", [s, *bn_params], name="post_bn")).outputs[0]
    p = g.append(g.make_node("global_avg_pool", [s], name="gap")).outputs[0]
    f = g.append(g.make_node("flatten", [p], name="flatten")).outputs[0]
    fw = g.add_constant("fc.weight", rng.standard_normal((6, 8)).astype(np.float32))
    fc = g.append(g.make_node("linear", [f, fw], name="fc")).outputs[0]
    bn1 = [g.add_constant(f"fc_bn.{k}", v) for k, v in (
        ("weight", rng.uniform(0.5, 1.5, 6).astype(np.float32)), ("bias", rng.standard_normal(6).astype(np.float32)),
        ("mean", rng.standard_normal(6).astype(np.float32)), ("var", rng.uniform(0.5, 2, 6).astype(np.float32)))]
    out = g.append(g.make_node("batch_norm", [fc, *bn1], name="fc_bn")).outputs[0]
    g.outputs = [out]
    return g


def feeds(g: Graph, n: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = _rng(seed)
    return [{i: rng.standard_normal(g.types[i].shape).astype(np.float32) for i in g.inputs} for _ in range(n)]


def damaged(g: Graph, conv_index: int = 1, noise: float = 1.5, seed: int = 0) -> Graph:
    """A clone of ``g`` whose ``conv_index``-th conv weights carry Gaussian noise of ``noise`` x their
    std (a model that fine-tuning has to repair)."""
    bad = g.clone()
    conv = [n for n in bad.nodes if n.op == "conv2d"][conv_index]
    w = bad.constants[conv.inputs[1]]
    rng = np.random.default_rng(seed)
    noisy = (w + rng.standard_normal(w.shape).astype(np.float32) * noise * w.std()).astype(np.float32)
    noisy.flags.writeable = False
    bad.constants[conv.inputs[1]] = noisy
    return bad
