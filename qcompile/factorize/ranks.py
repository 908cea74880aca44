"""Rank candidates and whole-model rank allocation.

Every factorizable layer offers a list of :class:`Candidate` s — the original layer plus one
entry per admissible rank — each with its MACs and the *retained energy* ``e`` in (0, 1] (the
fraction of squared singular values, or of response variance, the rank keeps).  Ranks are
multiples of ``multiple`` (vector-friendly channel counts: fewer MACs only become speed when
kernels stay vectorized) and only ranks whose factorized MACs are below the original count.

Allocation follows Zhang et al. 2015 (PCA energy): maximise ``sum_l log e_l(r_l)`` subject to
``sum_l macs_l(r_l) <= budget``; solved greedily — repeatedly lower the rank of the layer that
loses the least log-energy per MAC saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import PipelineError


@dataclass(frozen=True)
class Candidate:
    """One choice for one layer: ``rank`` (``None`` = keep the original layer)."""

    rank: int | tuple[int, ...] | None
    macs: int
    energy: float

    @property
    def log_energy(self) -> float:
        return math.log(max(self.energy, 1e-300))


def round_up(r: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(r / multiple)) * multiple)


def cumulative_energy(sigma: np.ndarray) -> np.ndarray:
    """``e[r-1]`` = fraction of ``sum sigma^2`` kept by the ``r`` largest singular values."""
    s2 = np.sort(np.asarray(sigma, dtype=np.float64) ** 2)[::-1]
    total = float(s2.sum())
    if total <= 0:
        return np.ones(len(s2))
    return np.cumsum(s2) / total


def rank_candidates(full_rank: int, orig_macs: int, macs_of: Callable[[int], int],
                    energy_of: Callable[[int], float], multiple: int) -> list[Candidate]:
    """The original layer, then every rank ``multiple, 2*multiple, ...`` that saves MACs.

    Sorted by MACs, largest first.  Ranks at or above ``full_rank`` are exact but never cheaper
    than the original for the factorizations here, so they are only offered when they save MACs.
    """
    cands = [Candidate(None, orig_macs, 1.0)]
    r = multiple
    ranks = []
    while r <= full_rank:
        if macs_of(r) < orig_macs:
            ranks.append(r)
        r += multiple
    if not ranks and full_rank < multiple and macs_of(full_rank) < orig_macs:
        ranks.append(full_rank)
    for r in sorted(ranks, reverse=True):
        cands.append(Candidate(r, macs_of(r), float(energy_of(r))))
    return cands


def smallest_rank_for_energy(cands: Sequence[Candidate], energy: float) -> Candidate:
    """The cheapest candidate keeping at least ``energy`` (the original if none does)."""
    ok = [c for c in cands if c.energy >= energy]
    return min(ok, key=lambda c: c.macs)


def allocate(layers: Mapping[str, Sequence[Candidate]], budget: int, fixed_macs: int = 0,
             unit: str = "MACs") -> dict[str, Candidate]:
    """Greedy PCA-energy allocation: one candidate per layer with total MACs ``<= budget``.

    Costs are ``Candidate.macs`` (MACs, or measured nanoseconds for a latency budget, ``unit``
    names them in errors); ``fixed_macs`` counts the layers this allocation does not touch.  Raises PipelineError naming
    the smallest achievable total when the budget is infeasible.
    """
    floor = fixed_macs + sum(min(c.macs for c in cs) for cs in layers.values())
    if floor > budget:
        raise PipelineError(f"budget of {budget:,} {unit} is infeasible: even the smallest ranks give {floor:,} "
                            f"{unit} ({floor / max(budget, 1):.2f}x the budget); allow more layers or a larger "
                            f"budget")
    order = {name: sorted(cs, key=lambda c: -c.macs) for name, cs in layers.items()}
    idx = {name: 0 for name in layers}
    total = fixed_macs + sum(cs[0].macs for cs in order.values())
    while total > budget:
        best, best_cost = None, math.inf
        for name, cs in order.items():
            i = idx[name]
            if i + 1 >= len(cs):
                continue
            saved = cs[i].macs - cs[i + 1].macs
            lost = cs[i].log_energy - cs[i + 1].log_energy
            cost = lost / max(saved, 1)
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:  # cannot happen after the feasibility check
            break
        i = idx[best]
        total -= order[best][i].macs - order[best][i + 1].macs
        idx[best] = i + 1
    return {name: order[name][idx[name]] for name in layers}
