"""A latency predictor over (layer, configuration) features, refit as measurements arrive.

After SIMQ-NAS: a cheap regression from configuration features (MACs, weight bytes, bits, rank
ratio, shapes; :meth:`qcompile.search.space.SearchSpace.features`) to measured latency lets the
search rank candidates it has not measured, so only promising ones are timed.  The model is ridge
regression on standardised features predicting ``log(seconds)`` (latency spans orders of
magnitude; ratios matter), or scikit-learn's gradient boosting (``kind="gbm"``) once enough
measurements exist.  Until ``min_samples`` measurements exist it scales the mean measured latency
by MACs.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np


class LatencyPredictor:
    def __init__(self, kind: str = "ridge", alpha: float = 1.0, min_samples: int = 4):
        if kind not in ("ridge", "gbm"):
            raise ValueError(f"predictor kind must be ridge or gbm, not '{kind}'")
        self.kind = kind
        self.alpha = alpha
        self.min_samples = min_samples
        self.model = None
        self.n_fit = 0
        self.fits = 0
        self._X = np.zeros((0, 0))
        self._y = np.zeros(0)

    def fit(self, features: Mapping[Hashable, np.ndarray], seconds: Mapping[Hashable, float]) -> None:
        """Refit on every measured key (features must cover them)."""
        keys = [k for k in seconds if k in features]
        self._X = np.stack([features[k] for k in keys]) if keys else np.zeros((0, 0))
        self._y = np.log(np.maximum([seconds[k] for k in keys], 1e-9)) if keys else np.zeros(0)
        self.n_fit = len(keys)
        self.model = None
        if self.n_fit >= self.min_samples:
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            if self.kind == "gbm" and self.n_fit >= 16:
                from sklearn.ensemble import GradientBoostingRegressor

                est = GradientBoostingRegressor(n_estimators=100, max_depth=2, learning_rate=0.1, random_state=0)
            else:
                from sklearn.linear_model import Ridge

                est = Ridge(alpha=self.alpha)
            self.model = make_pipeline(StandardScaler(), est).fit(self._X, self._y)
            self.fits += 1

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted seconds for each row of ``X``."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if self.model is not None:
            return np.exp(self.model.predict(X))
        if self.n_fit:
            # too few points for a regression: mean seconds per MAC (feature 0 is log1p(MACs))
            per_mac = np.mean(np.exp(self._y) / np.expm1(self._X[:, 0]).clip(1))
            return per_mac * np.expm1(X[:, 0]).clip(1)
        return np.expm1(X[:, 0]).clip(1) * 1e-9  # ~1 GMAC/s until anything is measured
