"""Hypothesis strategies for random valid CNN graphs (seeded random weights).

A graph is a stem conv followed by a random sequence of blocks -- plain conv(-bn)(-relu), depthwise
conv, residual block (two convs + skip add), inception-style concat of branches (1x1, 3x3, max
pool), dense-style concat of the input with new features, pooling, per-channel scaling by a
constant -- and a head (global average pool or a flatten of the feature map, then one or two
linear layers).  Used for properties that must hold for *any* such graph (rewrites preserve the
function, budgets are met); random weights are adequate for those.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from qcompile.ir import Graph, TensorType

BLOCKS = ("conv", "dw", "res", "inception", "dense", "pool", "scale")


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.g = Graph("random_cnn")

    def const(self, name: str, arr: np.ndarray) -> str:
        return self.g.add_constant(name, arr.astype(np.float32))

    def node(self, op: str, inputs: list[str], attrs: dict | None = None, name: str | None = None) -> str:
        return self.g.append(self.g.make_node(op, inputs, attrs or {}, name=name or op)).outputs[0]

    def channels(self, x: str) -> int:
        return self.g.types[x].shape[1]

    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True,
             bn: bool = True, relu: bool = True) -> str:
        cin = self.channels(x)
        w = self.const("w", self.rng.standard_normal((cout, cin // group, k, k)) * (2.0 / (cin // group * k * k)) ** 0.5)
        ins = [x, w] + ([self.const("b", self.rng.standard_normal(cout) * 0.1)] if bias else [])
        p = k // 2
        y = self.node("conv2d", ins, {"pads": (p, p, p, p), "strides": (stride, stride), "group": group}, "conv")
        if bn:
            params = [self.const(n, v) for n, v in (
                ("gamma", self.rng.uniform(0.5, 1.5, cout)), ("beta", self.rng.standard_normal(cout) * 0.1),
                ("mean", self.rng.standard_normal(cout) * 0.1), ("var", self.rng.uniform(0.5, 2.0, cout)))]
            y = self.node("batch_norm", [y, *params], {"epsilon": 1e-5}, "bn")
        return self.node("relu", [y], name="relu") if relu else y

    def block(self, kind: str, x: str, width: int) -> str:
        c, h = self.channels(x), self.g.types[x].shape[2]
        if kind == "conv":
            return self.conv(x, width, k=int(self.rng.choice([1, 3])), stride=2 if h >= 8 and self.rng.random() < 0.3 else 1,
                             bn=bool(self.rng.random() < 0.7), bias=bool(self.rng.random() < 0.5))
        if kind == "dw":
            return self.conv(x, c, group=c)
        if kind == "res":
            y = self.conv(self.conv(x, c), c, relu=False)
            return self.node("relu", [self.node("add", [y, x], name="skip")], name="relu")
        if kind == "inception":
            branches = [self.conv(x, width // 2, k=1), self.conv(self.conv(x, width // 2, k=1), width, k=3),
                        self.node("max_pool2d", [x], {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1)},
                                  "branch_pool")]
            return self.node("concat", branches, {"axis": 1}, "concat")
        if kind == "dense":
            return self.node("concat", [x, self.conv(x, width // 2)], {"axis": 1}, "dense_concat")
        if kind == "pool":
            if h < 4:
                return x
            op = "max_pool2d" if self.rng.random() < 0.5 else "avg_pool2d"
            return self.node(op, [x], {"kernel": (2, 2), "strides": (2, 2)}, "pool")
        if kind == "scale":
            s = self.const("scale", self.rng.uniform(0.5, 1.5, (1, c, 1, 1)))
            return self.node("mul", [x, s], name="scale")
        raise ValueError(kind)


def build_cnn(seed: int, blocks: list[tuple[str, int]], head_gap: bool, hidden: int, size: int = 8) -> Graph:
    b = _Builder(seed)
    x = b.g.add_input("x", TensorType((2, 3, size, size)))
    y = b.conv(x, 8)
    for kind, width in blocks:
        y = b.block(kind, y, width)
    if head_gap:
        y = b.node("flatten", [b.node("global_avg_pool", [y], name="gap")], {"axis": 1}, "flatten")
    else:
        y = b.node("flatten", [y], {"axis": 1}, "flatten")
    f = b.g.types[y].shape[1]
    if hidden:
        w1 = b.const("fc1.weight", b.rng.standard_normal((hidden, f)) * (1.0 / f) ** 0.5)
        y = b.node("relu", [b.node("linear", [y, w1, b.const("fc1.bias", np.zeros(hidden))], name="fc1")],
                   name="fc1_relu")
        f = hidden
    w2 = b.const("fc.weight", b.rng.standard_normal((10, f)) * (1.0 / f) ** 0.5)
    b.g.outputs = [b.node("linear", [y, w2], name="fc")]
    return b.g


@st.composite
def random_cnns(draw, max_blocks: int = 5) -> Graph:
    blocks = draw(st.lists(st.tuples(st.sampled_from(BLOCKS), st.sampled_from([8, 12, 16])),
                           min_size=1, max_size=max_blocks))
    return build_cnn(draw(st.integers(0, 2 ** 16)), blocks, draw(st.booleans()), draw(st.sampled_from([0, 16])))
