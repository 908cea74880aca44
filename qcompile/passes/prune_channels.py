"""``prune-channels``: structured channel pruning with coupled-channel groups.

Whole output channels are removed together with every weight that reads or writes them: the
channel coupling analysis (:mod:`qcompile.prune.groups`) follows batch norms, activations, pools,
resizes, depthwise convs, transposed convs (pruned like convs), residual adds (both branches lose the
same channels), concatenations (each branch is pruned on its own, the concatenation follows) and
flattens into linear layers.

Budget: ``macs=R`` keeps at most ``R`` of the conv/linear MACs (one keep ratio for every group,
then the budget filled ``multiple`` channels at a time, :mod:`qcompile.prune.budget`), or
``latency=R`` keeps at most ``R`` of the whole model's *measured* latency on ``backend`` (the model
pruned at ``probes`` keep ratios is built and timed interleaved with the original; the ratio meeting
the budget is interpolated between probes, then its MACs are met exactly).  Selection within a
group (:mod:`qcompile.prune.select`): ``magnitude`` (filter norms), ``bn`` (batch-norm scales; run
before ``fold-bn``), or ``qubo`` (importance vs redundancy on calibration activations, solved by
simulated annealing).  With calibration data the mean of every removed channel is folded into the
biases of the layers that read it (``compensate``; :func:`qcompile.prune.rewrite.compensate_bias`).
The pruned model usually needs a short fine-tune (``qcompile finetune``) to recover accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import PipelineError, PreconditionError
from qcompile.factorize.layers import capture, compute_macs, matches
from qcompile.ir.graph import Graph
from qcompile.passes.base import Pass, PassContext, PassResult
from qcompile.prune import budget as B
from qcompile.prune import select as S
from qcompile.prune.groups import ChannelGroup, channel_groups
from qcompile.prune.rewrite import compensate_bias, drops_by_value, remove_channels

CALIBRATION_LIMIT = 64
"""At most this many calibration feeds are used for the qubo criterion's activation statistics."""


@dataclass(frozen=True)
class PruneOptions:
    macs: float = field(default=0.5, metadata={"doc": "keep at most this fraction of conv/linear MACs"})
    latency: float = field(default=0.0, metadata={
        "doc": "keep at most this fraction of the model's measured latency on `backend` (replaces macs; 0 = off)"})
    backend: str = field(default="onnxruntime", metadata={"doc": "where `latency` is measured"})
    probes: int = field(default=4, metadata={"doc": "keep ratios measured for `latency`"})
    criterion: str = field(default="magnitude", metadata={"doc": "channel selection: magnitude, bn or qubo"})
    redundancy: float = field(default=0.5, metadata={"doc": "qubo: weight beta of the redundancy term"})
    reads: int = field(default=32, metadata={"doc": "qubo: simulated-annealing reads per group"})
    multiple: int = field(default=8, metadata={"doc": "kept channel counts are multiples of this"})
    min_keep: float = field(default=0.25, metadata={"doc": "every group keeps at least this fraction"})
    layers: str = field(default="*", metadata={"doc": "prune groups whose source layers all match (fnmatch, '|')"})
    exclude: str = field(default="", metadata={"doc": "never prune groups with a source layer matching this"})
    compensate: bool = field(default=True, metadata={
        "doc": "fold removed channels' calibration means into the next layers' biases (needs calibration data)"})
    seed: int = field(default=0, metadata={"doc": "annealing seed"})


class PruneChannels(Pass):
    name = "prune-channels"
    Options = PruneOptions
    exact = False
    summary = "structured channel pruning (coupled groups through residuals/concats; magnitude, bn or QUBO)"

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self._checked_options()
        groups = channel_groups(graph)
        eligible = [i for i, g in enumerate(groups) if self._eligible(g)]
        if not eligible:
            budget = f"latency={o.latency}" if o.latency else f"macs={o.macs}"
            if (o.latency or o.macs) < 1:
                raise PipelineError(
                    f"prune-channels: {budget} is impossible: no channel group can be pruned (every channel "
                    "touches a grouped conv, reshape, transpose, matmul, graph input or output, is excluded "
                    f"by layers=/exclude=, or its group is at min_keep={o.min_keep}), so at best 1.000 of the "
                    "model remains")
            return PassResult(graph, False, {"groups": {}, "reason": "no prunable channel group"})
        if o.criterion == "qubo" and not ctx.calibration:
            raise PreconditionError(
                "pass 'prune-channels' with criterion=qubo measures channel importance and redundancy on real "
                "inputs and needs calibration data: pass --calib FILE or use a model with calibration_data()")
        macs_before = compute_macs(graph)
        measured = None
        if o.latency:
            ratio, counts, measured = self._counts_for_latency(graph, groups, eligible)
        else:
            ratio, counts = B.counts_for_macs(graph, groups, eligible, o.macs, o.multiple, o.min_keep)
        acts = self._sink_activations(graph, groups, counts, ctx)
        kept = self._select(graph, groups, counts, acts)
        drop = {gi: sorted(set(range(groups[gi].size)) - set(kept[gi].tolist())) for gi in counts}
        table = self._annotate(graph, groups, counts)
        dropped = drops_by_value(groups, drop)
        compensated = 0
        if acts and o.compensate:
            means = {v: np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).mean(axis=1) for v, a in acts.items()}
            compensated = compensate_bias(graph, dropped, means)
        remove_channels(graph, dropped)
        macs_after = compute_macs(graph)
        stats = {"groups": table, "criterion": o.criterion, "keep_ratio": round(ratio, 4),
                 "bias_compensated": compensated,
                 "macs_before": macs_before, "macs_after": macs_after,
                 "mac_ratio": macs_after / max(macs_before, 1)}
        if measured:
            stats["measured_latency_s"] = measured
        return PassResult(graph, any(k < groups[gi].size for gi, k in counts.items()), stats)

    # ------------------------------------------------------------------ choices
    def _checked_options(self) -> PruneOptions:
        o = self.options
        if o.criterion not in S.CRITERIA:
            raise PipelineError(f"prune-channels: unknown criterion '{o.criterion}' (one of {', '.join(S.CRITERIA)})")
        if not 0 < o.macs <= 1 or not 0 <= o.latency <= 1:
            raise PipelineError(f"prune-channels: macs and latency are fractions in (0, 1], got macs={o.macs}, "
                                f"latency={o.latency}")
        if o.multiple < 1 or not 0 < o.min_keep <= 1 or o.reads < 1 or o.probes < 2 or o.redundancy < 0:
            raise PipelineError(f"prune-channels: invalid options {o}")
        return o

    def _eligible(self, g: ChannelGroup) -> bool:
        o = self.options
        if not g.sources or g.prunable == 0 or g.size <= B.min_keep_count(g, o.multiple, o.min_keep):
            return False
        return all(matches(s, o.layers) for s in g.sources) and not any(
            o.exclude and matches(s, o.exclude) for s in g.sources)

    def _counts_for_latency(self, graph, groups, eligible):
        from qcompile.factorize.latency import measure

        o = self.options
        ratios = np.linspace(1.0, 0.0, o.probes)
        graphs = {"original": graph}
        probe_counts = {}
        for r in ratios[1:]:
            counts = B.keep_counts(groups, eligible, float(r), o.multiple, o.min_keep)
            probe_counts[float(r)] = counts
            scratch = graph.clone()
            drop = {gi: list(range(k, groups[gi].size)) for gi, k in counts.items()}
            remove_channels(scratch, drops_by_value(groups, drop))
            graphs[float(r)] = scratch
        lat = measure(graphs, o.backend)
        rel = [1.0] + [lat[float(r)] / lat["original"] for r in ratios[1:]]
        measured = {str(k): v for k, v in lat.items()}
        if min(rel) > o.latency:
            raise PipelineError(
                f"prune-channels: latency={o.latency} is impossible on {o.backend}: the most pruned model "
                f"(min_keep={o.min_keep}) measured {min(rel):.3f} of the original's latency")
        # measured latency grows with the keep ratio; largest probed-or-interpolated ratio under budget
        order = np.argsort(ratios)
        r = float(np.interp(o.latency, np.maximum.accumulate(np.array(rel)[order]), ratios[order]))
        target = B.macs_after(graph, groups, B.keep_counts(groups, eligible, r, o.multiple, o.min_keep))
        ratio, counts = B.counts_for_macs(graph, groups, eligible, target / max(compute_macs(graph), 1),
                                          o.multiple, o.min_keep)
        return ratio, counts, measured

    def _sink_activations(self, graph: Graph, groups: list[ChannelGroup], counts: dict[int, int],
                          ctx: PassContext) -> dict[str, np.ndarray]:
        """Calibration activations of every value a pruned group's sinks read ({} without data)."""
        if not ctx.calibration or not (self.options.compensate or self.options.criterion == "qubo"):
            return {}
        values = sorted({graph.node(s).inputs[0] for gi in counts for s in groups[gi].sinks})
        return capture(graph, list(ctx.calibration)[:CALIBRATION_LIMIT], values)

    def _select(self, graph: Graph, groups: list[ChannelGroup], counts: dict[int, int],
                acts: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        o = self.options
        out = {}
        for gi, k in counts.items():
            g = groups[gi]
            frozen = np.array(g.frozen)
            if o.criterion == "magnitude":
                out[gi] = S.top_k(S.magnitude_scores(graph, g), k, frozen)
            elif o.criterion == "bn":
                out[gi] = S.top_k(S.bn_scores(graph, g), k, frozen)
            else:
                a, corr = S.channel_statistics(graph, g, acts)
                out[gi] = S.qubo_select(a, corr, k, frozen, o.redundancy, o.reads, o.seed + gi)
        return out

    def _annotate(self, graph: Graph, groups: list[ChannelGroup], counts: dict[int, int]) -> dict:
        table = {}
        for gi, k in counts.items():
            g = groups[gi]
            entry = {"kept": k, "channels": g.size, "sources": list(g.sources), "values": len(g.values)}
            table[g.name] = entry
            for s in g.sources:
                graph.node(s).add_provenance(**{"pass": self.name, "criterion": self.options.criterion,
                                                "out_channels_kept": k, "out_channels": g.size})
        return table
