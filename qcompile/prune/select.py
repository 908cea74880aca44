"""Which channels of a group to keep: magnitude and BN-scale baselines, and a QUBO solved by annealing.

Scores (higher = more important) per channel ``k`` of a :class:`~qcompile.prune.groups.ChannelGroup`:

* ``magnitude`` (Li et al. 2017): ``sum_s ||W_s[k]||_2 / mean_c ||W_s[c]||_2`` over the group's
  source layers ``s`` (each source normalised, so a residual stream's convs weigh alike); a batch
  norm right after a source scales its rows by ``|gamma| / sqrt(var + eps)`` first (the filter
  ``fold-bn`` would produce);
* ``bn`` (network slimming, Liu et al. 2017): ``sum_b |gamma_b[k]| / mean |gamma_b|`` over the batch
  norms that directly follow a source (falls back to ``magnitude`` where there is none, e.g. after
  ``fold-bn``).

``qubo`` (after QIANets, 2024) chooses the kept set jointly.  With binary ``x_k`` (1 = keep), on
calibration activations ``A`` of the values the group's consumers read:

* importance ``a_k = sum_sinks ||W_sink[:, k]||_2 * std(A_k)`` -- how much channel ``k``'s variation
  feeds the next layers (normalised to ``max a = 1``; its mean is not lost: ``prune-channels``
  folds removed channels' means into the readers' biases);
* redundancy ``R_kl = |corr(A_k, A_l)|`` over batch and positions -- two channels that move together
  carry the same information;

and the kept set minimises the quadratic unconstrained binary objective

    E(x) = - sum_k a_k x_k + beta / (K - 1) * sum_{k<l} R_kl sqrt(a_k a_l) x_k x_l
           + lambda (sum_k x_k - K)^2

(``K`` kept channels; the ``1/(K-1)`` keeps a channel's total redundancy penalty on the scale of its
importance; ``lambda`` exceeds any single-channel change of the first two terms, so every
minimiser keeps exactly ``K``).  Frozen channels are fixed at 1 (they still count as redundancy).
The QUBO is built with ``dimod`` and sampled by ``dwave-samplers``' simulated annealing (fixed
seed).  Single-bit annealing crosses between sets of size ``K`` only through penalised states, so
every sample is then repaired greedily to exactly ``K`` (add the channel lowering ``E`` most / drop
the one raising it least) and polished by best-improvement swaps inside the constraint; the
lowest-energy result wins.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from qcompile.ir.graph import Graph
from qcompile.prune.groups import ChannelGroup, weight_axes

CRITERIA = ("magnitude", "bn", "qubo")


def _row_norms(w: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0)
    return np.linalg.norm(moved.reshape(moved.shape[0], -1), axis=1)


def _bn_after(graph: Graph, value: str):
    uses = graph.consumers().get(value, [])
    return uses[0] if len(uses) == 1 and uses[0].op == "batch_norm" else None


def magnitude_scores(graph: Graph, group: ChannelGroup) -> np.ndarray:
    score = np.zeros(group.size)
    for name in group.sources:
        node = graph.node(name)
        norms = _row_norms(graph.constants[node.inputs[1]], weight_axes(node)[0])
        bn = _bn_after(graph, node.outputs[0])
        if bn is not None:  # the effective filter is the BN-scaled one (what fold-bn would produce)
            gamma, var = (graph.constants[bn.inputs[i]].astype(np.float64) for i in (1, 4))
            norms = norms * np.abs(gamma) / np.sqrt(var + bn.attrs["epsilon"])
        norms = norms / max(norms.mean(), 1e-30)
        out = node.outputs[0]
        score += [norms[ch[out]].sum() for ch in group.channels]
    return score


def bn_scores(graph: Graph, group: ChannelGroup) -> np.ndarray:
    producers = graph.producers()
    score = np.zeros(group.size)
    found = False
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else ""
        if node.op != "batch_norm" or x not in group.values or producers.get(x) is None \
                or producers[x].name not in group.sources:
            continue
        gamma = np.abs(graph.constants[node.inputs[1]].astype(np.float64))
        gamma = gamma / max(gamma.mean(), 1e-30)
        score += [gamma[ch[x]].sum() for ch in group.channels]
        found = True
    return score if found else magnitude_scores(graph, group)


def channel_statistics(graph: Graph, group: ChannelGroup, acts: Mapping[str, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(a, R)``: normalised importance and absolute correlation of the group's channels, from
    ``acts[value]`` (calibration activations of the values its sinks read)."""
    a = np.zeros(group.size)
    corr, weight = np.zeros((group.size, group.size)), 0.0
    for name in group.sinks:
        node = graph.node(name)
        x = node.inputs[0]
        act = np.asarray(acts[x], np.float64)
        cols = _row_norms(graph.constants[node.inputs[1]], weight_axes(node)[1])
        rms = np.moveaxis(act, 1, 0).reshape(act.shape[1], -1).std(axis=1)
        a += [float(np.sqrt(((cols[ch[x]] * rms[ch[x]]) ** 2).sum())) for ch in group.channels]
        if act.ndim == 4 or all(len(ch[x]) == 1 for ch in group.channels):
            first = [ch[x][0] for ch in group.channels]
            sig = np.moveaxis(act, 1, 0)[first].reshape(len(first), -1)
            std = sig.std(axis=1)
            live = std > 1e-12
            c = np.zeros((group.size, group.size))
            if live.sum() > 1:
                c[np.ix_(live, live)] = np.abs(np.corrcoef(sig[live]))
            corr += c
            weight += 1.0
    a = a / max(a.max(), 1e-30)
    corr = corr / max(weight, 1.0)
    np.fill_diagonal(corr, 0.0)
    return a, corr


def qubo_select(a: np.ndarray, corr: np.ndarray, keep: int, frozen: np.ndarray, beta: float,
                reads: int = 32, seed: int = 0) -> np.ndarray:
    """Indices of the ``keep`` channels minimising the module docstring's ``E(x)`` (annealed)."""
    import dimod
    from dwave.samplers import SimulatedAnnealingSampler

    n = len(a)
    frozen = np.asarray(frozen, bool)
    if keep >= n:
        return np.arange(n)
    if frozen.sum() > keep:
        raise ValueError(f"{int(frozen.sum())} frozen channels exceed the {keep} to keep")
    q = beta / max(keep - 1, 1) * corr * np.sqrt(np.outer(a, a))
    free = np.flatnonzero(~frozen)
    linear = -a[free] + q[np.ix_(free, np.flatnonzero(frozen))].sum(axis=1)
    quad = q[np.ix_(free, free)]
    bqm = dimod.BinaryQuadraticModel(dict(enumerate(linear)), {}, 0.0, dimod.BINARY)
    iu = np.triu_indices(len(free), 1)
    bqm.add_quadratic_from(zip(iu[0].tolist(), iu[1].tolist(), quad[iu].tolist()))
    target = keep - int(frozen.sum())
    lam = 1.5 * (np.abs(linear).max() + np.abs(quad).sum(axis=1).max()) + 1e-6
    bqm.add_linear_equality_constraint([(i, 1.0) for i in range(len(free))], lam, -float(target))
    samples = SimulatedAnnealingSampler().sample(bqm, num_reads=reads, seed=seed)
    x = samples.record.sample.astype(np.int64)
    starts = [_repair(xi, linear, quad, target) for xi in x]
    polished = [_swap_descent(xi, linear, quad) for xi in starts]
    energy = [float(linear @ xi + xi @ np.triu(quad, 1) @ xi) for xi in polished]
    best = polished[int(np.argmin(energy))]
    kept = np.concatenate([np.flatnonzero(frozen), free[np.flatnonzero(best)]])
    return np.sort(kept)


def _pair_matrix(quad: np.ndarray) -> np.ndarray:
    """Symmetric ``S`` with each pair (k, l) counted once, as in ``E``: ``S = triu(Q) + triu(Q)^T``."""
    upper = np.triu(quad, 1)
    return upper + upper.T


def _repair(x: np.ndarray, linear: np.ndarray, quad: np.ndarray, target: int) -> np.ndarray:
    """Greedy single flips to exactly ``target`` ones, each the cheapest in the unpenalised energy."""
    x = x.copy()
    sym = _pair_matrix(quad)
    while x.sum() != target:
        delta = linear + sym @ x  # energy change of switching a channel on
        if x.sum() < target:
            x[np.argmin(np.where(x == 0, delta, np.inf))] = 1
        else:
            x[np.argmax(np.where(x == 1, delta, -np.inf))] = 0  # dropping it raises E the least
    return x


def _swap_descent(x: np.ndarray, linear: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Best-improvement swaps (one kept channel out, one dropped in) until none lowers ``E``.

    Swapping keeps the count, so it searches inside the constraint, which single-bit annealing
    can only cross through penalised states: ``dE = delta_j - delta_i - S_ij`` for ``i`` out,
    ``j`` in, with ``delta = linear + S x`` and ``S = quad + quad^T``."""
    x = x.copy()
    sym = _pair_matrix(quad)
    for _ in range(4 * len(x) + 4):
        on, off = np.flatnonzero(x == 1), np.flatnonzero(x == 0)
        if not len(on) or not len(off):
            break
        delta = linear + sym @ x
        gain = delta[off][None, :] - delta[on][:, None] - sym[np.ix_(on, off)]
        i, j = np.unravel_index(np.argmin(gain), gain.shape)
        if gain[i, j] >= -1e-12:
            break
        x[on[i]], x[off[j]] = 0, 1
    return x


def qubo_energy(a: np.ndarray, corr: np.ndarray, kept: np.ndarray, keep: int, beta: float) -> float:
    """``E(x)`` without the constraint term, for the kept index set (for tests and reports)."""
    x = np.zeros(len(a))
    x[kept] = 1
    q = beta / max(keep - 1, 1) * corr * np.sqrt(np.outer(a, a))
    return float(-a @ x + x @ np.triu(q, 1) @ x)


def top_k(scores: np.ndarray, keep: int, frozen: np.ndarray) -> np.ndarray:
    """The ``keep`` best-scoring channels, frozen ones first (ties: lower index)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores), ~np.asarray(frozen, bool)))
    return np.sort(order[:keep])
