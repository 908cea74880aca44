"""Quantization-aware factorization by ADMM (Cherniuk et al. 2023).

Fit a factorization of a conv weight ``W`` whose factors lie on a low-bit grid, instead of
factorizing in float and rounding afterwards.  A *grid factor* is ``F = s ⊙ q`` with integers
``q`` in the symmetric ``b``-bit range ``[-Q, Q]``, ``Q = 2^(b-1) - 1``, and one float32 scale per
slice along the factor's grid axis (the output channel of the conv the factor becomes)::

    minimise ||W - [[F_1, ..., F_n]]||^2   subject to   F_k in grid_b (per-slice scale)

Alternating least squares over the factors; each factor's sub-problem (the others fixed, on
their grids) is split as ``F`` (continuous) = ``Z`` (on the grid) with scaled dual ``U``::

    F <- argmin_F  1/2 ||W_(k) - F M_k||^2 + rho/2 ||F - Z + U||^2    (a ridge least squares)
    Z <- proj_grid(F + U)
    U <- U + F - Z

``rho = rho_t * trace(M_k M_k^T) / R`` (scale-free) grows geometrically over the outer
iterations, so early steps explore near the float optimum and late ones force ``F = Z``.
``proj_grid`` picks, per slice, the clipping threshold ``c * max|x|`` (``c`` from a small set)
minimising the slice's squared rounding + clipping error, then rounds and clips.  The returned
factors are the ``Z`` of the outer iteration with the smallest reconstruction error, the
factorize-then-quantize start (float factors, ``s = max|x| / Q`` per slice, round) included, so
they are exactly on the grid and never worse in weight error than that baseline.

Tucker-2 (``W ~ G x_0 U_o x_1 U_i``): ``U_o`` per row (conv out channels), ``U_i`` per column
(it is the first conv's weight transposed), ``G`` per slice of axis 0.  The core's sub-problem
``A G B + rho G = C`` (``A = U_o^T U_o``, ``B = U_i^T U_i`` acting on the two channel modes) is
solved exactly in the eigenbases of ``A`` and ``B``: ``G' = C' / (a_i b_j + rho)``.
CP (``W ~ [[A, B, C, D]]``, weights absorbed in ``A``): ``A`` per row, ``B``, ``C``, ``D`` per
column (the depthwise / 1x1 convs' channels); each update is the ALS normal equation with the
Khatri-Rao product of the others (tensorly's ``unfolding_dot_khatri_rao``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tensorly as tl
from tensorly.tenalg import multi_mode_dot, unfolding_dot_khatri_rao

from qcompile.quantize import numerics as qn

BITS = (4, 6, 8)
CLIP_RATIOS = np.linspace(0.5, 1.0, 11)
"""Candidate clipping thresholds (fractions of a slice's max |x|) searched by :func:`project`."""


@dataclass
class GridFactor:
    """``value = scale ⊙ q`` along ``axis``: ``q`` int8 in ``[-Q, Q]``, ``scale`` float32 per slice."""

    q: np.ndarray
    scale: np.ndarray
    axis: int
    bits: int

    @property
    def value(self) -> np.ndarray:
        """The dequantized factor in float64 (what the IR's ``dequantize_linear`` computes)."""
        return qn.dequantize(self.q, self.scale, axis=self.axis).astype(np.float64)


@dataclass
class QAFResult:
    factors: list[GridFactor]
    rel_error: float
    """``||W - [[factors]]|| / ||W||`` of the returned grid factors."""
    ftq_rel_error: float
    """The same error for factorize-then-quantize (float start, max-scale rounding)."""
    iterations: int
    best_iteration: int
    """0 when no ADMM iterate beat the factorize-then-quantize start."""


def _moved(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as (slices, elements): slice ``i`` is everything at index ``i`` along ``axis``."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def project(x: np.ndarray, bits: int, axis: int, search: bool = True) -> GridFactor:
    """Nearest grid factor to ``x``: per slice the clipping threshold ``c * max|x|`` (``c`` in
    :data:`CLIP_RATIOS`, or 1 with ``search=False``) minimising ``||x - s q||^2``, ``s = c max|x| / Q``."""
    qm = qn.qmax(bits)
    m = _moved(np.asarray(x, np.float64), axis)
    absmax = np.maximum(np.abs(m).max(axis=1), 1e-12)
    ratios = CLIP_RATIOS if search else np.ones(1)
    scales = (absmax[None, :] * ratios[:, None] / qm).astype(np.float32)  # (ratios, slices)
    err = np.stack([((m - np.clip(np.rint(m / s[:, None]), -qm, qm) * s[:, None].astype(np.float64)) ** 2).sum(1)
                    for s in scales])
    s = scales[err.argmin(axis=0), np.arange(m.shape[0])]
    q = qn.quantize(x, s.astype(np.float64), bits, axis=axis).astype(np.int8)
    return GridFactor(q, s, axis, bits)


def ftq(x: np.ndarray, bits: int, axis: int) -> GridFactor:
    """Factorize-then-quantize rounding: ``s = max|x| / Q`` per slice (as the ``quantize`` pass)."""
    return project(x, bits, axis, search=False)


def _ridge(gram: np.ndarray, rhs: np.ndarray, rho: float) -> np.ndarray:
    """``F`` solving ``F (gram + rho I) = rhs`` (``gram`` symmetric positive semi-definite)."""
    return np.linalg.solve(gram + rho * np.eye(len(gram)), rhs.T).T


def _admm_factor(z: GridFactor, u: np.ndarray, gram: np.ndarray, rhs: np.ndarray, rho: float,
                 inner: int, solve: Callable | None = None) -> tuple[GridFactor, np.ndarray]:
    """``inner`` ADMM steps on one factor; ``solve(target, rho)`` minimises
    ``1/2 ||W - F M||^2 + rho/2 ||F - target||^2`` (default: the ridge normal equation)."""
    for _ in range(inner):
        target = z.value - u
        f = solve(target, rho) if solve else _ridge(gram, rhs + rho * target, rho)
        z = project(f + u, z.bits, z.axis)
        u = u + f - z.value
    return z, u


def _rel(w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30))


def _rho_schedule(iterations: int, start: float, stop: float) -> np.ndarray:
    return np.geomspace(start, stop, max(iterations, 1))


def _run(w: np.ndarray, start: Sequence[np.ndarray], axes: Sequence[int], bits: int, iterations: int,
         inner: int, rho: tuple[float, float], reconstruct: Callable, sweep: Callable) -> QAFResult:
    """Shared outer loop: grid start, ``iterations`` sweeps (``sweep(zs, us, rho_t)`` updates
    every factor in place), best iterate by reconstruction error."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    base = [ftq(f, bits, a) for f, a in zip(start, axes)]
    ftq_err = _rel(w, reconstruct([z.value for z in base]))
    zs = [project(f, bits, a) for f, a in zip(start, axes)]
    us = [np.zeros_like(f, dtype=np.float64) for f in start]
    best, best_err, best_it = base, ftq_err, 0
    for t, rho_t in enumerate(_rho_schedule(iterations, *rho), start=1):
        sweep(zs, us, float(rho_t))
        err = _rel(w, reconstruct([z.value for z in zs]))
        if err < best_err:
            best, best_err, best_it = list(zs), err, t
    return QAFResult(best, best_err, ftq_err, iterations, best_it)


def tucker2(w: np.ndarray, u_o: np.ndarray, core: np.ndarray, u_i: np.ndarray, bits: int,
            iterations: int = 40, inner: int = 2, rho: tuple[float, float] = (1e-2, 1e1)) -> QAFResult:
    """Grid Tucker-2 of ``w (O, I, kh, kw)`` from the float start ``(u_o (O, R_o), core, u_i (I, R_i))``.

    Returns factors ``[U_o (axis 0), G (axis 0), U_i (axis 1)]``.
    """
    w = np.asarray(w, np.float64)
    w0, w1 = tl.unfold(w, 0), tl.unfold(w, 1)

    def reconstruct(f):
        return multi_mode_dot(f[1], [f[0], f[2]], modes=[0, 1])

    def sweep(zs, us, rho_t):
        # U_o: W_(0) ~ U_o M, M = (G x_1 U_i)_(0)
        m = tl.unfold(multi_mode_dot(zs[1].value, [zs[2].value], modes=[1]), 0)
        gram = m @ m.T
        zs[0], us[0] = _admm_factor(zs[0], us[0], gram, w0 @ m.T, rho_t * np.trace(gram) / len(gram), inner)
        # U_i: W_(1) ~ U_i M, M = (G x_0 U_o)_(1)
        m = tl.unfold(multi_mode_dot(zs[1].value, [zs[0].value], modes=[0]), 1)
        gram = m @ m.T
        zs[2], us[2] = _admm_factor(zs[2], us[2], gram, w1 @ m.T, rho_t * np.trace(gram) / len(gram), inner)
        # core: (U_o^T U_o) G (U_i^T U_i) + rho G = W x_0 U_o^T x_1 U_i^T + rho target, in eigenbases
        a, p = np.linalg.eigh(zs[0].value.T @ zs[0].value)
        b, q = np.linalg.eigh(zs[2].value.T @ zs[2].value)
        a, b = np.maximum(a, 0), np.maximum(b, 0)
        proj = multi_mode_dot(w, [zs[0].value.T, zs[2].value.T], modes=[0, 1])
        rho_c = rho_t * a.mean() * b.mean()
        denom = (np.outer(a, b) + rho_c)[:, :, None, None]

        def solve_core(target, rho_c):
            c = multi_mode_dot(proj + rho_c * target, [p.T, q.T], modes=[0, 1])
            return multi_mode_dot(c / denom, [p, q], modes=[0, 1])

        zs[1], us[1] = _admm_factor(zs[1], us[1], None, None, rho_c, inner, solve_core)

    return _run(w, [u_o, core, u_i], [0, 0, 1], bits, iterations, inner, rho, reconstruct, sweep)


def cp(w: np.ndarray, factors: Sequence[np.ndarray], bits: int, iterations: int = 40, inner: int = 2,
       rho: tuple[float, float] = (1e-2, 1e1)) -> QAFResult:
    """Grid CP of ``w (O, I, kh, kw)`` from the float start ``[A * lambda, B, C, D]`` (each (dim, R)).

    Returns ``[A (axis 0), B, C, D (axis 1)]``.
    """
    w = np.asarray(w, np.float64)
    weights = np.ones(factors[0].shape[1])

    def reconstruct(f):
        return tl.cp_to_tensor((weights, f))

    def sweep(zs, us, rho_t):
        for k in range(4):
            others = [z.value for z in zs]
            gram = np.ones((len(weights), len(weights)))
            for j, f in enumerate(others):
                if j != k:
                    gram *= f.T @ f
            rhs = unfolding_dot_khatri_rao(w, (weights, others), k)
            zs[k], us[k] = _admm_factor(zs[k], us[k], gram, rhs, rho_t * np.trace(gram) / len(gram), inner)

    return _run(w, list(factors), [0, 1, 1, 1], bits, iterations, inner, rho, reconstruct, sweep)
