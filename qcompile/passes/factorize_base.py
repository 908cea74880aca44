"""Shared driver of the low-rank factorization passes (``lowrank-svd``, ``spatial-svd``,
``tucker2``, ``cp``, ``channel-decomp``).

Each pass says which nodes it can rewrite (:meth:`FactorizePass.why_not`), what each rank costs
and keeps (:meth:`FactorizePass.candidates`) and how to build the factors
(:meth:`FactorizePass.factorize`).  The driver picks the ranks — one fixed ``rank``, the
smallest rank keeping ``energy`` per layer, a budget of *measured* latency ``latency`` on a
backend (each layer and a few of its ranks built alone and timed; see ``_latency_candidates``), or
(default) a whole-model MAC budget ``macs`` — budgets allocated across layers by retained energy
(:func:`qcompile.factorize.ranks.allocate`) — and
splices the factor chains in, graph order, each new node carrying provenance (method, rank,
MACs before/after, source node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from qcompile.errors import PipelineError
from qcompile.factorize import layers as L
from qcompile.factorize.ranks import Candidate, allocate, cumulative_energy, rank_candidates, smallest_rank_for_energy
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class FactorizeOptions:
    macs: float = field(default=0.5, metadata={
        "doc": "target ratio of the model's conv/linear MACs after/before; ranks allocated across layers by "
               "retained energy (ignored when rank or energy is set)"})
    energy: float = field(default=0.0, metadata={"doc": "per layer: the smallest rank keeping this fraction "
                                                        "of the energy (0 = off)"})
    rank: int = field(default=0, metadata={"doc": "one fixed rank for every layer (0 = off)"})
    layers: str = field(default="*", metadata={"doc": "node-name patterns to factorize (fnmatch, '|' separated)"})
    exclude: str = field(default="", metadata={"doc": "node-name patterns to leave alone"})
    multiple: int = field(default=8, metadata={"doc": "ranks are multiples of this (vectorizable channel counts)"})
    latency: float = field(default=0.0, metadata={
        "doc": "target ratio of the factorized layers' *measured* latency on `backend` after/before; replaces "
               "the MAC budget (0 = off)"})
    backend: str = field(default="onnxruntime", metadata={"doc": "where `latency` is measured (onnxruntime, "
                                                                 "tvm-x86, ...)"})
    probes: int = field(default=4, metadata={"doc": "ranks measured per layer for `latency` (others interpolated)"})


class FactorizePass(Pass):
    Options = FactorizeOptions
    exact = False
    ops: ClassVar[tuple[str, ...]] = ("conv2d",)
    method: ClassVar[str] = ""

    # -- per-method hooks ------------------------------------------------------
    def why_not(self, graph: Graph, node: Node) -> str | None:
        """None when this pass can rewrite ``node``, else the reason it is skipped.

        Every conv factorization here mixes all input channels, so grouped convs are skipped."""
        if node.op == "conv2d" and node.attrs["group"] != 1:
            return "grouped convolution"
        return None

    def full_rank(self, graph: Graph, node: Node) -> int:
        raise NotImplementedError

    def singular_values(self, graph: Graph, node: Node, ctx: PassContext):
        raise NotImplementedError

    def macs_of(self, graph: Graph, node: Node, rank) -> int:
        raise NotImplementedError

    def candidates(self, graph: Graph, node: Node, ctx: PassContext) -> list[Candidate]:
        energy = cumulative_energy(self.singular_values(graph, node, ctx))
        full = self.full_rank(graph, node)
        return rank_candidates(full, L.node_macs(graph, node), lambda r: self.macs_of(graph, node, r),
                               lambda r: float(energy[min(r, len(energy)) - 1]), self.options.multiple)

    def fixed_rank(self, graph: Graph, node: Node, rank: int):
        return min(rank, self.full_rank(graph, node))

    def timing_steps(self, graph: Graph, node: Node, rank, ctx: PassContext) -> list[L.Step]:
        """A chain with the shapes ``factorize`` would produce at ``rank`` (values may differ: only
        its latency is measured)."""
        return self.factorize(graph, node, rank, ctx)[0]

    def prepare(self, graph: Graph, nodes: Sequence[Node], ctx: PassContext) -> None:
        """Called once before any rewrite (data-driven passes capture activations here)."""

    def factorize(self, graph: Graph, node: Node, rank, ctx: PassContext) -> tuple[list[L.Step], dict]:
        """The replacement chain for ``node`` at ``rank`` and stats (e.g. relative error)."""
        raise NotImplementedError

    # -- driver ----------------------------------------------------------------
    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        self.measured_latency = None
        if o.multiple < 1 or o.rank < 0 or not 0 <= o.energy <= 1 or o.macs < 0 or o.latency < 0 or o.probes < 1:
            raise PipelineError(f"pass '{self.name}': invalid options {o}")
        skipped: dict[str, str] = {}
        nodes = []
        for n in L.targets(graph, self.ops, o.layers, o.exclude):
            reason = self.why_not(graph, n)
            if reason:
                skipped[n.name] = reason
            else:
                nodes.append(n)
        if not nodes:
            return PassResult(graph, False, {"layers": {}, "skipped": skipped})
        self.prepare(graph, nodes, ctx)
        chosen = self._choose(graph, nodes, ctx, skipped)
        macs_before = L.compute_macs(graph)
        table = {}
        for n in list(nodes):
            cand = chosen.get(n.name)
            if cand is None or cand.rank is None:
                continue
            steps, info = self.factorize(graph, n, cand.rank, ctx)
            orig = L.node_macs(graph, n)
            prov = {"pass": self.name, "method": self.method, "rank": cand.rank, "macs_before": orig,
                    "macs_after": self.macs_of(graph, n, cand.rank), "energy": round(cand.energy, 6)}
            if o.latency > 0:
                prov["latency_us_est"] = round(cand.macs / 1e3, 3)  # the cost was measured latency (ns)
            prov.update(info)
            L.splice(graph, n, steps, prov)
            table[n.name] = {k: v for k, v in prov.items() if k != "pass"}
        graph.remove_unused_constants()
        macs_after = L.compute_macs(graph)
        stats = {"layers": table, "skipped": skipped, "macs_before": macs_before, "macs_after": macs_after,
                 "mac_ratio": macs_after / max(macs_before, 1)}
        if self.measured_latency:
            stats["measured_latency_s"] = self.measured_latency
        return PassResult(graph, bool(table), stats)

    def _choose(self, graph: Graph, nodes: list[Node], ctx: PassContext, skipped: dict) -> dict[str, Candidate]:
        o = self.options
        if o.rank > 0:
            out = {}
            for n in nodes:
                r = self.fixed_rank(graph, n, o.rank)
                macs = self.macs_of(graph, n, r)
                if macs >= L.node_macs(graph, n):
                    skipped[n.name] = f"rank {r} would not reduce MACs ({macs:,} >= {L.node_macs(graph, n):,})"
                    continue
                out[n.name] = Candidate(r, macs, 1.0)
            return out
        cands = {n.name: self.candidates(graph, n, ctx) for n in nodes}
        if o.energy > 0:
            return {name: smallest_rank_for_energy(cs, o.energy) for name, cs in cands.items()}
        if o.latency > 0:
            timed = self._latency_candidates(graph, nodes, cands, ctx)
            total = sum(cs[0].macs for cs in timed.values())
            return allocate(timed, int(o.latency * total), 0, unit=f"ns measured on {o.backend}")
        total = L.compute_macs(graph)
        fixed = total - sum(L.node_macs(graph, n) for n in nodes)
        return allocate(cands, int(o.macs * total), fixed)

    def _latency_candidates(self, graph: Graph, nodes: list[Node], cands: dict, ctx: PassContext) -> dict:
        """Candidates whose cost is measured latency (ns) on ``backend`` instead of MACs.

        Per layer the original and ``probes`` ranks spread over the candidate list are built alone
        and timed interleaved; the other ranks are interpolated by their position in the list.
        Candidates not faster than the original, or slower than a candidate keeping more energy,
        are dropped (they are dominated).
        """
        import numpy as np

        from qcompile.factorize.latency import measure

        o = self.options
        graphs, probe_idx = {}, {}
        for n in nodes:
            ranked = cands[n.name][1:]
            graphs[(n.name, -1)] = L.chain_graph(graph, [n])
            picks = sorted({int(i) for i in np.linspace(0, len(ranked) - 1, min(o.probes, len(ranked))).round()})
            probe_idx[n.name] = picks
            for i in picks:
                scratch = graph.clone()
                node = scratch.node(n.name)
                made = L.splice(scratch, node, self.timing_steps(scratch, node, ranked[i].rank, ctx), {})
                graphs[(n.name, i)] = L.chain_graph(scratch, made)
        lat = measure(graphs, o.backend)
        self.measured_latency = {f"{k[0]}@{k[1]}": v for k, v in lat.items()}
        out = {}
        for n in nodes:
            ranked = cands[n.name][1:]
            orig = lat[(n.name, -1)]
            picks = probe_idx[n.name]
            est = np.interp(np.arange(len(ranked)), picks, [lat[(n.name, i)] for i in picks]) if ranked else []
            kept = [Candidate(None, int(orig * 1e9), 1.0)]
            for c, t in sorted(zip(ranked, est), key=lambda ct: -ct[0].energy):
                if t * 1e9 < kept[-1].macs:
                    kept.append(Candidate(c.rank, int(t * 1e9), c.energy))
            out[n.name] = kept
        return out
