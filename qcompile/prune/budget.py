"""How many channels each group keeps, for a MAC budget.

One keep ratio ``r`` for every eligible group: group ``g`` of ``n_g`` channels keeps

    K_g(r) = min(n_g, max(K_min, multiple * round(r * n_g / multiple)))
    K_min  = max(frozen_g, multiple, multiple * ceil(min_keep * n_g / multiple))

(multiples of ``multiple`` keep channel counts vectorisable).  MACs after pruning are exact and
need no rewrite: a conv/linear keeps ``(1 - d_in/C_in)(1 - d_out/C_out)`` of its MACs
(depthwise: ``1 - d/C``), with ``d`` the channels its input / output value loses.  ``K_g`` is
non-decreasing in ``r``, so the largest ``r`` meeting the budget is found by bisection.

Rounding to multiples makes ``K_g(r)`` jump: a 24-channel group keeps 16 at ``r = 0.5`` but 8 just
below it, so the bisection's ``r`` can land far under the budget (a detector asked for 0.30 of its
MACs got 0.205, its 24-channel high-resolution head cut to 8).  So the budget is then filled:
``multiple`` channels at a time go back to the group kept furthest below ``r`` (smallest
``K_g / n_g``; ties to the cheaper addition) while the MACs stay within the budget.
"""

from __future__ import annotations

import math
from typing import Sequence

from qcompile.errors import PipelineError
from qcompile.factorize.layers import compute_macs
from qcompile.ir.graph import Graph
from qcompile.prune.groups import ChannelGroup
from qcompile.prune.rewrite import node_macs_after

MAC_OPS = ("conv2d", "conv_transpose2d", "linear", "matmul")


def min_keep_count(group: ChannelGroup, multiple: int, min_keep: float) -> int:
    k = max(group.size - group.prunable, multiple, multiple * math.ceil(min_keep * group.size / multiple))
    return min(group.size, k)


def keep_counts(groups: Sequence[ChannelGroup], eligible: Sequence[int], ratio: float, multiple: int,
                min_keep: float) -> dict[int, int]:
    out = {}
    for gi in eligible:
        g = groups[gi]
        k = multiple * round(ratio * g.size / multiple)
        out[gi] = min(g.size, max(min_keep_count(g, multiple, min_keep), k))
    return out


def dropped_counts(groups: Sequence[ChannelGroup], counts: dict[int, int]) -> dict[str, int]:
    """value -> number of channel items removed when group ``gi`` keeps ``counts[gi]``."""
    out: dict[str, int] = {}
    for gi, k in counts.items():
        g = groups[gi]
        for v in g.values:
            out[v] = out.get(v, 0) + (g.size - k) * len(g.channels[0][v])
    return out


def macs_after(graph: Graph, groups: Sequence[ChannelGroup], counts: dict[int, int]) -> float:
    from qcompile.factorize.layers import node_macs

    dropped = dropped_counts(groups, counts)
    total = 0.0
    for n in graph.nodes:
        if n.op in ("conv2d", "conv_transpose2d", "linear"):
            total += node_macs_after(graph, n, dropped)
        elif n.op in MAC_OPS:
            total += node_macs(graph, n)
    return total


def counts_for_macs(graph: Graph, groups: Sequence[ChannelGroup], eligible: Sequence[int], target: float,
                    multiple: int, min_keep: float) -> tuple[float, dict[int, int]]:
    """``(r, counts)`` with the largest keep ratio ``r`` whose MACs are at most ``target`` x the
    original's; raises :class:`PipelineError` naming the smallest reachable ratio otherwise."""
    before = compute_macs(graph)
    lowest = macs_after(graph, groups, keep_counts(groups, eligible, 0.0, multiple, min_keep)) / max(before, 1)
    if lowest > target + 1e-12:
        raise PipelineError(
            f"prune-channels: macs={target} is impossible: with min_keep={min_keep} and multiple={multiple} "
            f"the prunable channel groups ({len(eligible)}) can reach at best {lowest:.3f} of the MACs")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs_after(graph, groups, keep_counts(groups, eligible, mid, multiple, min_keep)) <= target * before:
            lo = mid
        else:
            hi = mid
    return lo, fill_budget(graph, groups, keep_counts(groups, eligible, lo, multiple, min_keep), target * before,
                           multiple)


def fill_budget(graph: Graph, groups: Sequence[ChannelGroup], counts: dict[int, int], budget: float,
                multiple: int) -> dict[int, int]:
    """``counts`` with ``multiple`` channels at a time given back, each to the group with the smallest kept
    fraction ``K_g / n_g`` (ties: the addition costing fewer MACs) whose addition keeps the MACs at most
    ``budget``; stops when no group can grow."""
    counts = dict(counts)
    while True:
        best = None
        for gi in sorted((gi for gi in counts if counts[gi] < groups[gi].size),
                         key=lambda gi: counts[gi] / groups[gi].size):
            if best is not None and counts[gi] / groups[gi].size > best[0] + 1e-12:
                break
            trial = {**counts, gi: min(groups[gi].size, counts[gi] + multiple)}
            m = macs_after(graph, groups, trial)
            if m <= budget and (best is None or m < best[2]):
                best = (counts[gi] / groups[gi].size, gi, m, trial)
        if best is None:
            return counts
        counts = best[3]
