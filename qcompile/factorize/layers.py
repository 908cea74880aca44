"""Which nodes a factorization pass rewrites, and how the rewrite is spliced in.

A *target* is a ``conv2d`` / ``linear`` node with constant weights whose name matches the
pass's ``layers`` pattern (fnmatch, ``|``-separated alternatives) and not ``exclude``.
:func:`splice` replaces a target by a chain of new nodes; every new node records provenance
(method, rank, the node it came from, MACs before and after).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from qcompile import progress
from qcompile.ir.graph import Graph, Node


def matches(name: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p.strip()) for p in pattern.split("|") if p.strip())


def node_macs(graph: Graph, node: Node) -> int:
    """The node's MACs by its op schema's rule (as in :func:`qcompile.ir.costs.node_cost`)."""
    from qcompile.ir import ops

    return ops.get(node.op).macs([graph.types[i] if i else None for i in node.inputs],
                                 [graph.types[o] for o in node.outputs], node.attrs)


def compute_macs(graph: Graph) -> int:
    """MACs of every conv2d / conv_transpose2d / linear / matmul node (what compression budgets count)."""
    return sum(node_macs(graph, n) for n in graph.nodes
               if n.op in ("conv2d", "conv_transpose2d", "linear", "matmul"))


def targets(graph: Graph, ops: Sequence[str], layers: str, exclude: str) -> list[Node]:
    out = []
    for n in graph.nodes:
        if n.op not in ops or not matches(n.name, layers) or (exclude and matches(n.name, exclude)):
            continue
        if not all(v in graph.constants for v in n.inputs[1:] if v):
            continue
        out.append(n)
    return out


def weight_and_bias(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None]:
    w = graph.constants[node.inputs[1]].astype(np.float64)
    b = graph.constants[node.inputs[2]].astype(np.float64) if len(node.inputs) > 2 and node.inputs[2] else None
    return w, b


@dataclass
class Step:
    """One node of a replacement chain: ``op`` applied to the previous value with these constants."""

    op: str
    weight: np.ndarray
    bias: np.ndarray | None = None
    attrs: Mapping[str, Any] | None = None
    role: str = ""


def splice(graph: Graph, node: Node, steps: Sequence[Step], provenance: Mapping[str, Any]) -> list[Node]:
    """Replace ``node`` by ``steps`` applied in sequence to its input; returns the new nodes."""
    x = node.inputs[0]
    dtype = graph.constants[node.inputs[1]].dtype
    new_nodes = []
    for k, st in enumerate(steps):
        w = graph.add_constant(f"{node.name}.{st.role or k}.weight", st.weight.astype(dtype))
        ins = [x, w]
        if st.bias is not None:
            ins.append(graph.add_constant(f"{node.name}.{st.role or k}.bias", st.bias.astype(dtype)))
        n = graph.make_node(st.op, ins, dict(st.attrs or {}), name=f"{node.name}.{st.role or k}")
        n.meta.update({k2: v for k2, v in node.meta.items() if k2 != "provenance"})
        n.meta["provenance"] = list(node.meta.get("provenance", []))
        n.add_provenance(**dict(provenance), source=node.name, step=f"{k + 1}/{len(steps)}", role=st.role)
        new_nodes.append(n)
        x = n.outputs[0]
    graph.replace_node(node, new_nodes, [x])
    return new_nodes


def _batch_free(graph: Graph) -> bool:
    """Whether feeds may be stacked along axis 0 and run as one batch: no node fixes the batch size
    (a reshape's static target shape, unless it keeps axis 0 as it is: ``(1, C, 1, 1) -> (1, C)``, which
    the reference interpreter runs with the batch it gets) or computes across axis 0 (flatten, concat,
    softmax, transpose, slice, mean or layer norm over it)."""
    for n in graph.nodes:
        shape = graph.types[n.inputs[0]].shape if n.inputs else ()
        rank = max(len(shape), 1)
        a = n.attrs
        keeps_batch = n.op == "reshape" and len(shape) > 0 and len(a["shape"]) > 0 and a["shape"][0] == shape[0]
        if (n.op == "reshape" and not keeps_batch) \
                or (n.op in ("flatten", "concat", "softmax") and a["axis"] % rank == 0) \
                or (n.op == "transpose" and tuple(a["perm"])[0] != 0) \
                or (n.op in ("slice", "reduce_mean", "layer_norm") and any(ax % rank == 0 for ax in a["axes"])):
            return False
    return True


def capture(graph: Graph, feeds: Sequence[Mapping[str, np.ndarray]], values: Sequence[str],
            batch: int = 64) -> dict[str, np.ndarray]:
    """The values named ``values`` computed by the reference interpreter on every feed,
    concatenated along axis 0 (feeds are shaped like the graph inputs; up to ``batch`` feeds are
    run as one batch along axis 0 when the graph allows it, see :func:`_batch_free`).  More than one
    batch shows a transient progress bar on a terminal (:func:`qcompile.progress.steps`)."""
    import torch

    from qcompile.backends.torch_backend import to_torch

    g = graph.clone()
    g.outputs = list(values)
    if not _batch_free(g):
        batch = 1
    module = to_torch(g, trainable=False).eval()
    got: dict[str, list[np.ndarray]] = {v: [] for v in values}
    batches = [{i: np.concatenate([np.asarray(f[i]) for f in feeds[k:k + batch]]) for i in g.inputs}
               for k in range(0, len(feeds), batch)]
    with torch.no_grad(), progress.steps(f"calibration: {graph.name}", len(batches)) as advance:
        for feed in batches:
            outs = module(*[torch.from_numpy(feed[i]) for i in g.inputs])
            outs = outs if isinstance(outs, tuple) else (outs,)
            for v, o in zip(values, outs):
                got[v].append(o.numpy())
            advance()
    return {v: np.concatenate(a, axis=0) for v, a in got.items()}


def chain_graph(graph: Graph, nodes: Sequence[Node]) -> Graph:
    """A graph computing just ``nodes`` (a chain: each reads the previous one's output), with the
    first node's data input as the graph input and the constants it needs."""
    g = Graph(f"{graph.name}.{nodes[0].name}")
    x = nodes[0].inputs[0]
    g.add_input(x, graph.types[x])
    for n in nodes:
        for v in n.inputs[1:]:
            if v and v not in g.constants:
                g.constants[v] = graph.constants[v]
                g.types[v] = graph.types[v]
        g.append(Node(n.op, list(n.inputs), list(n.outputs), n.name, dict(n.attrs), {}))
        for o in n.outputs:
            g.types[o] = graph.types[o]
    g.outputs = [nodes[-1].outputs[0]]
    return g
