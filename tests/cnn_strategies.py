"""Hypothesis strategies for random valid CNN graphs (seeded random weights).

A graph is a stem conv followed by a random sequence of blocks -- plain conv(-bn)(-relu), depthwise
conv, residual block (two convs + skip add), inception-style concat of branches (1x1, 3x3, max
pool), dense-style concat of the input with new features, pooling, per-channel scaling by a
constant, dilated conv (dilation 2/3, stride 1/2), grouped conv (2-4 groups), strided conv
(3x3/5x5 with "same"-style asymmetric pads), rectangular 1xk / kx1 convs, overlapping pools (3x3,
stride 2, padded, ceil mode), downsampling residual block (stride-2 convs + 1x1 stride-2 projection
shortcut), and (opt-in, ``UP_BLOCKS``) an upsampling block (nearest ``resize`` 2x then a stride-2 conv,
added to a 2x2 stride-2 ``conv_transpose2d`` then a 2x2 average pool) -- and a head (global average pool or a flatten of the feature map, then one or two
linear layers).  Inputs are square (``size``) or ``(h, w)``, batch ``batch``.  Used for properties
that must hold for *any* such graph (rewrites preserve the function, budgets are met, every
backend computes what the reference interpreter computes); random weights are adequate for those.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from qcompile.ir import Graph, TensorType

BLOCKS = ("conv", "dw", "res", "inception", "dense", "pool", "scale",
          "dilated", "grouped", "strided", "rect", "pool3", "res_down")
UP_BLOCKS = BLOCKS + ("up",)
"""BLOCKS plus the upsampling block (resize, conv_transpose2d), for properties of passes that follow
channels through them."""


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

    def hw(self, x: str) -> tuple[int, int]:
        return self.g.types[x].shape[2], self.g.types[x].shape[3]

    def conv(self, x: str, cout: int, k: int | tuple[int, int] = 3, stride: int = 1, group: int = 1,
             bias: bool = True, bn: bool = True, relu: bool = True, dilation: int = 1,
             pads: tuple[int, int, int, int] | None = None) -> str:
        cin = self.channels(x)
        kh, kw = (k, k) if isinstance(k, int) else k
        w = self.const("w", self.rng.standard_normal((cout, cin // group, kh, kw))
                       * (2.0 / (cin // group * kh * kw)) ** 0.5)
        ins = [x, w] + ([self.const("b", self.rng.standard_normal(cout) * 0.1)] if bias else [])
        ph, pw = dilation * (kh // 2), dilation * (kw // 2)
        attrs = {"pads": pads or (ph, pw, ph, pw), "strides": (stride, stride), "group": group}
        if dilation != 1:
            attrs["dilations"] = (dilation, dilation)
        y = self.node("conv2d", ins, attrs, "conv")
        if bn:
            params = [self.const(n, v) for n, v in (
                ("gamma", self.rng.uniform(0.5, 1.5, cout)), ("beta", self.rng.standard_normal(cout) * 0.1),
                ("mean", self.rng.standard_normal(cout) * 0.1), ("var", self.rng.uniform(0.5, 2.0, cout)))]
            y = self.node("batch_norm", [y, *params], {"epsilon": 1e-5}, "bn")
        return self.node("relu", [y], name="relu") if relu else y

    def block(self, kind: str, x: str, width: int) -> str:
        c, h = self.channels(x), min(self.hw(x))
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
        if kind == "dilated":
            d = int(self.rng.choice([2, 3]))
            return self.conv(x, width, dilation=d, stride=2 if h >= 6 and self.rng.random() < 0.4 else 1,
                             bn=bool(self.rng.random() < 0.5))
        if kind == "grouped":
            groups = [gr for gr in (2, 3, 4) if c % gr == 0 and width % gr == 0]
            if not groups:
                return x
            return self.conv(x, width, group=int(self.rng.choice(groups)), bias=bool(self.rng.random() < 0.5))
        if kind == "strided":
            if h < 4:
                return x
            k = int(self.rng.choice([3, 5]))
            # "same" padding of a stride-2 conv: the odd pad goes to the end (TF / ONNX SAME_UPPER)
            ih, iw = self.hw(x)
            need = [max((-(-n // 2) - 1) * 2 + k - n, 0) for n in (ih, iw)]
            pads = (need[0] // 2, need[1] // 2, need[0] - need[0] // 2, need[1] - need[1] // 2)
            return self.conv(x, width, k=k, stride=2, pads=pads, bn=bool(self.rng.random() < 0.5))
        if kind == "rect":
            k = int(self.rng.choice([3, 5]))
            return self.conv(x, width, k=(1, k) if self.rng.random() < 0.5 else (k, 1))
        if kind == "pool3":
            if h < 3:
                return x
            ceil = int(self.rng.random() < 0.5)
            if self.rng.random() < 0.5:
                return self.node("max_pool2d", [x], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                                     "ceil_mode": ceil}, "pool")
            return self.node("avg_pool2d", [x], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                                 "ceil_mode": ceil, "count_include_pad": int(self.rng.random() < 0.5)},
                             "pool")
        if kind == "res_down":
            if h < 4:
                return x
            y = self.conv(self.conv(x, width, stride=2), width, relu=False)
            shortcut = self.conv(x, width, k=1, stride=2, relu=False, bias=False)
            return self.node("relu", [self.node("add", [y, shortcut], name="skip")], name="relu")
        if kind == "up":
            (ih, iw), c = self.hw(x), self.channels(x)
            up = self.node("resize", [x], {"sizes": (2 * ih, 2 * iw), "scales": (2.0, 2.0), "mode": "nearest",
                                           "coordinate_transformation_mode": "asymmetric",
                                           "nearest_mode": "floor"}, "upsample")
            a = self.conv(up, width, stride=2, relu=False)
            w = self.const("wt", self.rng.standard_normal((c, width, 2, 2)) * (2.0 / (c * 4)) ** 0.5)
            t = self.node("conv_transpose2d", [x, w, self.const("bt", self.rng.standard_normal(width) * 0.1)],
                          {"strides": (2, 2)}, "deconv")
            b_ = self.node("avg_pool2d", [t], {"kernel": (2, 2), "strides": (2, 2)}, "deconv_pool")
            return self.node("relu", [self.node("add", [a, b_], name="up_add")], name="relu")
        raise ValueError(kind)


def build_cnn(seed: int, blocks: list[tuple[str, int]], head_gap: bool, hidden: int,
              size: int | tuple[int, int] = 8, batch: int = 2) -> Graph:
    b = _Builder(seed)
    h, w = (size, size) if isinstance(size, int) else size
    x = b.g.add_input("x", TensorType((batch, 3, h, w)))
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


def cnn_specs(max_blocks: int = 5, blocks: tuple[str, ...] = BLOCKS, sizes: st.SearchStrategy | None = None,
              batches: st.SearchStrategy | None = None,
              widths: tuple[int, ...] = (8, 12, 16)) -> st.SearchStrategy[dict]:
    """Keyword arguments of :func:`build_cnn` (a plain dict, so a failing example prints readably)."""
    return st.fixed_dictionaries({
        "blocks": st.lists(st.tuples(st.sampled_from(blocks), st.sampled_from(widths)),
                           min_size=1, max_size=max_blocks),
        "seed": st.integers(0, 2 ** 16),
        "head_gap": st.booleans(),
        "hidden": st.sampled_from([0, 16]),
        "size": sizes if sizes is not None else st.just(8),
        "batch": batches if batches is not None else st.just(2),
    })


def random_cnns(max_blocks: int = 5, blocks: tuple[str, ...] = BLOCKS, sizes: st.SearchStrategy | None = None,
                batches: st.SearchStrategy | None = None, widths: tuple[int, ...] = (8, 12, 16)
                ) -> st.SearchStrategy[Graph]:
    return cnn_specs(max_blocks, blocks, sizes, batches, widths).map(lambda spec: build_cnn(**spec))
