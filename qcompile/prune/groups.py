"""Which output channels must be removed together: channel coupling groups (after DepGraph, Fang et al. 2023).

Every value of rank >= 2 has channels on axis 1 (NCHW feature maps; the feature axis of a rank-2
``linear`` input/output).  A *channel item* is ``(value, index)``.  Each node says which items are
the same channel seen at different places, and items are merged with a union-find:

* channel-preserving ops -- unary elementwise ops, ``batch_norm``, pools, per-tensor
  ``quantize_linear``/``dequantize_linear``, depthwise ``conv2d`` (``group == C_in == C_out``) --
  merge ``(in, c)`` with ``(out, c)``;
* binary elementwise ops merge each non-broadcast input's ``(in, c)`` with ``(out, c)``: a residual
  ``add`` couples the channels of both branches; a constant operand with one entry per channel is
  sliced with them;
* ``concat`` on axis 1 merges ``(in_k, c)`` with ``(out, offset_k + c)``: each branch keeps its own
  channels, the concatenation follows;
* ``flatten`` of ``(N, C, H, W)`` merges ``(in, c)`` with the ``H*W`` features ``c*H*W + j``;
* ``resize`` (H and W only) preserves channels like a pool;
* ``conv2d`` (``group == 1``), ``conv_transpose2d`` (``group == 1``) and ``linear`` with constant
  weights end a channel: they are its *sources* (removing output channel ``c`` drops the weight's
  output slice ``c`` and bias ``c``) and *sinks* (removing input channel ``c`` drops the weight's
  input slice ``c``); :func:`weight_axes` says which weight axis is which.

An equivalence class of items is one *prunable channel* unless it touches something that cannot
drop a channel: a graph input or output, or any other op (``reshape``, ``transpose``, ``matmul``,
grouped convs, per-axis quantization, ...) -- then it is *frozen* and always kept.
Classes that span the same set of values form a :class:`ChannelGroup` (a layer's channels, or the
channels of a whole residual stream); pruning chooses how many channels of each group to keep and
which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.ir import ops
from qcompile.ir.graph import Graph, Node

PRESERVING = frozenset({"batch_norm", "max_pool2d", "avg_pool2d", "global_avg_pool", "resize"})
LAYER_OPS = ("conv2d", "conv_transpose2d", "linear")
"""Ops whose constant weight can be a channel group's source or sink."""


def weight_axes(node: Node) -> tuple[int, int]:
    """``(output axis, input axis)`` of a layer's weight: conv2d (O, I, kH, kW) and linear (O, I) give
    (0, 1); conv_transpose2d (I, O/group, kH, kW) gives (1, 0)."""
    return (1, 0) if node.op == "conv_transpose2d" else (0, 1)


@dataclass
class ChannelGroup:
    """Coupled channels: ``channels[k]`` maps each value of the group to its index of channel ``k``.

    ``frozen[k]``: channel ``k`` cannot be removed.  ``sources``: conv/linear nodes whose output
    rows the group removes; ``sinks``: conv/linear nodes whose input columns it removes.
    """

    values: tuple[str, ...]
    channels: list[dict[str, list[int]]] = field(default_factory=list)
    frozen: list[bool] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> int:
        return sum(not f for f in self.frozen)

    @property
    def name(self) -> str:
        return "+".join(self.sources) if self.sources else self.values[0]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def channels_of(graph: Graph, value: str) -> int:
    t = graph.types[value]
    return t.shape[1] if t.rank >= 2 else 0


def is_depthwise(graph: Graph, node: Node) -> bool:
    c_in = channels_of(graph, node.inputs[0])
    return node.op == "conv2d" and node.attrs["group"] == c_in == channels_of(graph, node.outputs[0]) and c_in > 1


def _constant_weights(graph: Graph, node: Node) -> bool:
    return all(v in graph.constants for v in node.inputs[1:] if v)


def channel_extent(graph: Graph, value: str, out_rank: int) -> int | None:
    """Size on the channel axis of ``value`` broadcast against a rank-``out_rank`` result (numpy
    broadcasting aligns trailing axes); None if ``value`` has a higher rank."""
    shape = graph.types[value].shape
    if len(shape) > out_rank:
        return None
    return ((1,) * (out_rank - len(shape)) + tuple(shape))[1]


class _Analysis:
    def __init__(self, graph: Graph):
        self.g = graph
        self.offset: dict[str, int] = {}
        n = 0
        for v in [*graph.inputs, *(o for node in graph.nodes for o in node.outputs)]:
            c = channels_of(graph, v)
            if c:
                self.offset[v] = n
                n += c
        self.uf = _UnionFind(n)
        self.frozen_items = np.zeros(n, bool)
        self.sources: dict[str, list[str]] = {}  # value -> nodes producing rows
        self.sinks: dict[str, list[str]] = {}

    def item(self, value: str, c: int) -> int:
        return self.offset[value] + c

    def merge(self, a: str, b: str, b_offset: int = 0, block: int = 1) -> None:
        """Merge (a, c) with (b, b_offset + c*block + j) for j < block."""
        for c in range(channels_of(self.g, a)):
            for j in range(block):
                self.uf.union(self.item(a, c), self.item(b, b_offset + c * block + j))

    def freeze(self, value: str) -> None:
        if value in self.offset:
            o = self.offset[value]
            self.frozen_items[o:o + channels_of(self.g, value)] = True

    def visit(self, node: Node) -> None:
        g, op = self.g, node.op
        out = node.outputs[0] if len(node.outputs) == 1 else None
        schema = ops.get(op)
        if out is None or out not in self.offset:
            self._freeze_all(node)
        elif op in LAYER_OPS and _constant_weights(g, node) and (
                op == "linear" and g.types[out].rank == 2 or op != "linear" and node.attrs["group"] == 1):
            self.sources.setdefault(out, []).append(node.name)
            self.sinks.setdefault(node.inputs[0], []).append(node.name)
        elif op == "conv2d" and is_depthwise(g, node) and _constant_weights(g, node):
            self.merge(node.inputs[0], out)
        elif op in PRESERVING or (schema.elementwise and schema.max_inputs == 1):
            if op == "batch_norm" and not all(v in g.constants for v in node.inputs[1:]):
                return self._freeze_all(node)
            self.merge(node.inputs[0], out)
        elif op in ("quantize_linear", "dequantize_linear"):
            if g.types[node.inputs[1]].numel != 1:
                return self._freeze_all(node)
            self.merge(node.inputs[0], out)
        elif schema.elementwise:  # binary, broadcasting
            c = channels_of(g, out)
            for v in node.inputs:
                if v in self.offset and channels_of(g, v) == c and g.types[v].rank == g.types[out].rank:
                    self.merge(v, out)
                elif v in self.offset and channels_of(g, v) != 1:
                    return self._freeze_all(node)
                elif v in g.constants and channel_extent(g, v, g.types[out].rank) not in (1, c):
                    return self._freeze_all(node)  # a constant sliced on some other axis
        elif op == "concat" and node.attrs["axis"] % g.types[out].rank == 1 and all(
                v in self.offset for v in node.inputs):
            off = 0
            for v in node.inputs:
                self.merge(v, out, off)
                off += channels_of(g, v)
        elif _flattens(g, node):
            h, w = g.types[node.inputs[0]].shape[2:]
            self.merge(node.inputs[0], out, 0, h * w)
        else:
            self._freeze_all(node)

    def _freeze_all(self, node: Node) -> None:
        for v in [*node.inputs, *node.outputs]:
            if v:
                self.freeze(v)


def _flattens(graph: Graph, node: Node) -> bool:
    """``flatten(axis=1)`` of a rank-4 value, or a ``reshape`` doing exactly that."""
    if node.op not in ("flatten", "reshape") or graph.types[node.inputs[0]].rank != 4:
        return False
    if node.op == "flatten":
        return node.attrs["axis"] == 1
    n, c, h, w = graph.types[node.inputs[0]].shape
    return graph.types[node.outputs[0]].shape == (n, c * h * w)


def channel_groups(graph: Graph) -> list[ChannelGroup]:
    """The graph's channel groups, in order of their first value's definition (see module doc)."""
    a = _Analysis(graph)
    for v in [*graph.inputs, *graph.outputs]:
        a.freeze(v)
    for node in graph.nodes:
        a.visit(node)
    classes: dict[int, dict[str, list[int]]] = {}
    frozen: dict[int, bool] = {}
    for v, o in a.offset.items():
        for c in range(channels_of(graph, v)):
            root = a.uf.find(o + c)
            classes.setdefault(root, {}).setdefault(v, []).append(c)
            frozen[root] = frozen.get(root, False) or bool(a.frozen_items[o + c])
    groups: dict[tuple[str, ...], ChannelGroup] = {}
    for root in sorted(classes, key=lambda r: (r,)):
        cls = classes[root]
        key = tuple(cls)
        grp = groups.setdefault(key, ChannelGroup(key))
        grp.channels.append(cls)
        grp.frozen.append(frozen[root] or not any(v in a.sources for v in cls))
    for grp in groups.values():
        grp.sources = [n for v in grp.values for n in a.sources.get(v, [])]
        grp.sinks = [n for v in grp.values for n in a.sinks.get(v, [])]
    return list(groups.values())
