"""Data-driven low-rank reconstruction of a layer's responses (Zhang et al. 2015, sections 3.2-3.4).

Notation: per sampled output position, ``y`` (O,) is the *original* network's pre-activation
response of the layer and ``y_hat`` (O,) the response of the layer's *original* weights to the
input produced by the already-approximated network (asymmetric reconstruction: errors of earlier
layers are seen and corrected, not accumulated).  We seek ``M = P Q^T`` of rank ``d`` and ``b``.

* Linear:  ``min ||Y - (M Y_hat + b)||_F``, rank(M) <= d — reduced-rank regression:
  ``M_ols = Yc Yhc^T (Yhc Yhc^T)^-1`` on centred data, ``P`` = top-``d`` left singular vectors of
  ``M_ols Yhc``, ``M = P P^T M_ols``, ``b = mean(Y) - M mean(Y_hat)``.
* Nonlinear (layer followed by ReLU ``r``): ``min sum ||r(y) - r(z)||^2 + lam ||z - (M y_hat + b)||^2``
  alternating (a) the linear problem with ``z`` as target and (b) the closed-form per-element
  ``z``: with ``u = M y_hat + b`` and ``t = r(y)``, the best ``z <= 0`` is ``min(u, 0)`` (cost
  ``t^2 + lam (z-u)^2``) and the best ``z >= 0`` is ``max((lam u + t)/(1 + lam), 0)`` (cost
  ``(t-z)^2 + lam (z-u)^2``); take the cheaper.  ``lam`` grows geometrically so ``z`` is finally
  tied to the linear model.

The layer is then rewritten as a conv with ``d`` filters ``Q^T W`` (bias ``Q^T b0``) followed by a
1x1 conv ``P`` with bias ``b``: exactly ``M (W x + b0) + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Reconstruction:
    p: np.ndarray  # (O, d)
    q: np.ndarray  # (O, d):  M = p @ q.T
    b: np.ndarray  # (O,)

    def apply(self, y_hat: np.ndarray) -> np.ndarray:
        """M y_hat + b for columns of ``y_hat`` (O, N)."""
        return self.p @ (self.q.T @ y_hat) + self.b[:, None]


def reduced_rank_regression(target: np.ndarray, y_hat: np.ndarray, d: int, ridge: float = 1e-6) -> Reconstruction:
    """Rank-``d`` ``M``, ``b`` minimising ``||target - M y_hat - b||_F`` (columns are samples)."""
    t_mean, y_mean = target.mean(axis=1), y_hat.mean(axis=1)
    tc, yc = target - t_mean[:, None], y_hat - y_mean[:, None]
    cov = yc @ yc.T
    cov += ridge * (np.trace(cov) / len(cov) + 1e-12) * np.eye(len(cov))
    m_ols = np.linalg.solve(cov, yc @ tc.T).T  # (O, O)
    fitted = m_ols @ yc
    # left singular vectors of the fitted values = eigenvectors of their (O x O) Gram matrix
    _, vecs = np.linalg.eigh(fitted @ fitted.T)
    p = vecs[:, ::-1][:, :d]
    q = m_ols.T @ p  # M = p p^T m_ols = p q^T
    b = t_mean - p @ (q.T @ y_mean)
    return Reconstruction(p, q, b)


def _best_z(t: np.ndarray, u: np.ndarray, lam: float) -> np.ndarray:
    z_neg = np.minimum(u, 0.0)
    cost_neg = t ** 2 + lam * (z_neg - u) ** 2
    z_pos = np.maximum((lam * u + t) / (1.0 + lam), 0.0)
    cost_pos = (t - z_pos) ** 2 + lam * (z_pos - u) ** 2
    return np.where(cost_pos < cost_neg, z_pos, z_neg)


def nonlinear_reconstruction(y: np.ndarray, y_hat: np.ndarray, d: int, iterations: int = 25,
                             lam0: float = 0.01, lam1: float = 1.0) -> Reconstruction:
    """Zhang et al.'s alternating solver for a layer followed by ReLU (see module docstring)."""
    t = np.maximum(y, 0.0)
    z = y.copy()
    rec = reduced_rank_regression(z, y_hat, d)
    for k in range(iterations):
        lam = lam0 * (lam1 / lam0) ** (k / max(iterations - 1, 1))
        z = _best_z(t, rec.apply(y_hat), lam)
        rec = reduced_rank_regression(z, y_hat, d)
    return rec


def relu_error(y: np.ndarray, approx: np.ndarray) -> float:
    """||r(y) - r(approx)|| / ||r(y)||."""
    t = np.maximum(y, 0.0)
    return float(np.linalg.norm(t - np.maximum(approx, 0.0)) / max(np.linalg.norm(t), 1e-30))


def linear_error(y: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(y - approx) / max(np.linalg.norm(y), 1e-30))
