"""Remove chosen channels from a graph: slice every weight that touches them, re-infer every type.

Given, per value, the channel indices to drop (all items of the chosen classes of
:mod:`qcompile.prune.groups`), each node is rewritten by what it does to channels:

* ``conv2d`` (``group == 1``) / ``conv_transpose2d`` (``group == 1``) / ``linear``: output channels
  dropped -> the weight's output slices and bias entries removed; input channels dropped -> its input
  slices removed (axes by :func:`qcompile.prune.groups.weight_axes`);
* depthwise ``conv2d``: weight rows and bias removed, ``group`` set to the new channel count;
* ``batch_norm``: its four per-channel parameters sliced;
* binary elementwise ops: a constant operand with one entry per channel is sliced on the channel axis;
* a ``reshape`` that flattens gets its new target shape;
* everything else (activations, pools, add, concat, flatten) only changes shape.

Sliced constants are stored under new names (constants are immutable), then every node's output
type is inferred again in graph order, so the result passes the structural verifier.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from qcompile.ir import ops
from qcompile.ir.graph import Graph, Node
from qcompile.prune.groups import LAYER_OPS, ChannelGroup, channel_extent, is_depthwise, weight_axes


def drops_by_value(groups: Sequence[ChannelGroup], drop: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """value -> sorted channel indices to remove, from ``drop`` (group index -> channel numbers)."""
    out: dict[str, set[int]] = {}
    for gi, chans in drop.items():
        for k in chans:
            for v, idx in groups[gi].channels[k].items():
                out.setdefault(v, set()).update(idx)
    return {v: sorted(s) for v, s in out.items() if s}


def _keep(n: int, dropped: Sequence[int]) -> np.ndarray:
    mask = np.ones(n, bool)
    mask[list(dropped)] = False
    return np.flatnonzero(mask)


def _sliced(graph: Graph, value: str, axis: int, keep: np.ndarray) -> str:
    return graph.add_constant(value, np.take(graph.constants[value], keep, axis=axis))


def remove_channels(graph: Graph, dropped: Mapping[str, Sequence[int]]) -> None:
    """Rewrite ``graph`` in place so that the channels ``dropped[value]`` no longer exist."""
    types = graph.types
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else ""
        out = node.outputs[0]
        d_in, d_out = dropped.get(x, ()), dropped.get(out, ())
        if not d_in and not d_out:
            continue
        if node.op in LAYER_OPS and not (node.op == "conv2d" and is_depthwise(graph, node)):
            w, (o_axis, i_axis) = node.inputs[1], weight_axes(node)
            if d_out:
                keep = _keep(types[out].shape[1], d_out)
                w = _sliced(graph, w, o_axis, keep)
                if len(node.inputs) > 2 and node.inputs[2]:
                    node.inputs[2] = _sliced(graph, node.inputs[2], 0, keep)
            if d_in:
                w = _sliced(graph, w, i_axis, _keep(types[x].shape[1], d_in))
            node.inputs[1] = w
        elif node.op == "conv2d":  # depthwise: the channel passes through
            keep = _keep(types[x].shape[1], d_in)
            node.inputs[1] = _sliced(graph, node.inputs[1], 0, keep)
            if len(node.inputs) > 2 and node.inputs[2]:
                node.inputs[2] = _sliced(graph, node.inputs[2], 0, keep)
            node.attrs["group"] = len(keep)
        elif node.op == "batch_norm":
            keep = _keep(types[x].shape[1], d_in)
            node.inputs[1:] = [_sliced(graph, p, 0, keep) for p in node.inputs[1:]]
        elif node.op == "reshape":  # a flatten written as reshape (the only one groups.py lets through)
            n, c, h, w = types[x].shape
            node.attrs["shape"] = (n, (c - len(d_in)) * h * w)
        elif ops.get(node.op).elementwise and len(node.inputs) == 2 and d_out:
            rank, c = types[out].rank, types[out].shape[1]
            keep = _keep(c, d_out)
            for i, v in enumerate(node.inputs):
                if v in graph.constants and channel_extent(graph, v, rank) == c > 1:
                    node.inputs[i] = _sliced(graph, v, 1 - (rank - types[v].rank), keep)
    retype(graph)
    graph.remove_unused_constants()


def compensate_bias(graph: Graph, dropped: Mapping[str, Sequence[int]], means: Mapping[str, np.ndarray]) -> int:
    """Fold the mean of every removed input channel into its readers' biases; returns layers changed.

    A conv/linear reading value ``x`` computes ``y_o = b_o + sum_c W[o, c] * x_c``; with channel ``c``
    gone, replacing ``x_c`` by its calibration mean ``m_c`` keeps the expected output:
    ``b'_o = b_o + sum_{c removed} m_c * sum_{kh, kw} W[o, c, kh, kw]`` (exact for positions whose
    window lies inside the image; zero-padded borders saw less of the mean).  ``means[x]`` holds
    the per-channel mean of ``x`` (over batch and positions).  Call before :func:`remove_channels`.
    """
    changed = 0
    for node in graph.nodes:
        if node.op not in ("conv2d", "linear") or (node.op == "conv2d" and node.attrs["group"] != 1):
            continue
        x = node.inputs[0]
        d_in = dropped.get(x, ())
        if not d_in or x not in means:
            continue
        w = graph.constants[node.inputs[1]].astype(np.float64)
        per_in = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # (O, C)
        delta = per_in[:, list(d_in)] @ np.asarray(means[x], np.float64)[list(d_in)]
        has_bias = len(node.inputs) > 2 and node.inputs[2]
        b = graph.constants[node.inputs[2]].astype(np.float64) if has_bias else np.zeros(w.shape[0])
        name = graph.add_constant(node.inputs[2] if has_bias else node.name + ".bias", (b + delta).astype(np.float32))
        node.inputs[2:] = [name]
        changed += 1
    return changed


def retype(graph: Graph) -> None:
    """Infer every node output's type again, in graph order (after weights changed shape)."""
    for node in graph.nodes:
        schema = ops.get(node.op)
        inferred = schema.infer([graph.types[v] if v else None for v in node.inputs], node.attrs, node)
        for o, t in zip(node.outputs, inferred):
            graph.types[o] = t


def node_macs_after(graph: Graph, node: Node, dropped: Mapping[str, int]) -> float:
    """MACs of a conv/linear node once ``dropped[value]`` channels (counts) are gone (no rewrite)."""
    from qcompile.factorize.layers import node_macs

    macs = node_macs(graph, node)
    x, out = node.inputs[0], node.outputs[0]
    c_in, c_out = graph.types[x].shape[1], graph.types[out].shape[1]
    if node.op == "conv2d" and is_depthwise(graph, node):
        return macs * (1 - dropped.get(x, 0) / c_in)
    return macs * (1 - dropped.get(x, 0) / c_in) * (1 - dropped.get(out, 0) / c_out)
