"""Shared driver of the low-rank factorization passes (``lowrank-svd``, ``spatial-svd``,
``tucker2``, ``cp``, ``channel-decomp``).

Each pass says which nodes it can rewrite (:meth:`FactorizePass.why_not`), what each rank costs
and keeps (:meth:`FactorizePass.candidates`) and how to build the factors
(:meth:`FactorizePass.factorize`).  The driver picks the ranks — one fixed ``rank``, the
smallest rank keeping ``energy`` per layer, or (default) a whole-model MAC budget ``macs``
allocated across layers by retained energy (:func:`qcompile.factorize.ranks.allocate`) — and
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


class FactorizePass(Pass):
    Options = FactorizeOptions
    exact = False
    ops: ClassVar[tuple[str, ...]] = ("conv2d",)
    method: ClassVar[str] = ""

    # -- per-method hooks ------------------------------------------------------
    def why_not(self, graph: Graph, node: Node) -> str | None:
        """None when this pass can rewrite ``node``, else the reason it is skipped."""
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

    def prepare(self, graph: Graph, nodes: Sequence[Node], ctx: PassContext) -> None:
        """Called once before any rewrite (data-driven passes capture activations here)."""

    def factorize(self, graph: Graph, node: Node, rank, ctx: PassContext) -> tuple[list[L.Step], dict]:
        """The replacement chain for ``node`` at ``rank`` and stats (e.g. relative error)."""
        raise NotImplementedError

    # -- driver ----------------------------------------------------------------
    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.multiple < 1 or o.rank < 0 or not 0 <= o.energy <= 1 or o.macs < 0:
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
                    "macs_after": cand.macs, "energy": round(cand.energy, 6)}
            prov.update(info)
            L.splice(graph, n, steps, prov)
            table[n.name] = {k: v for k, v in prov.items() if k != "pass"}
        graph.remove_unused_constants()
        macs_after = L.compute_macs(graph)
        stats = {"layers": table, "skipped": skipped, "macs_before": macs_before, "macs_after": macs_after,
                 "mac_ratio": macs_after / max(macs_before, 1)}
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
        total = L.compute_macs(graph)
        fixed = total - sum(L.node_macs(graph, n) for n in nodes)
        return allocate(cands, int(o.macs * total), fixed)
