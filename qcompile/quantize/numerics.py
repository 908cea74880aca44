"""Symmetric integer quantization, calibration observers and int4 packing.

Symmetric, narrow range, ``b`` bits: ``q = clip(round(x / s), -Q, Q)`` with ``Q = 2^(b-1) - 1``
(int8: +-127, int4: +-7) and ``x ~ s * q``.  The rounding error of an unclipped value is at most
``s / 2``.  Weights are quantized per output channel (axis 0): ``s_c = max|W_c| / Q``.
Activations take one scale per tensor from an observer that sees calibration batches:

* ``minmax``: ``s = max|x| / Q`` — no clipping, but one outlier stretches the grid;
* ``percentile``: the ``p``-th percentile of ``|x|`` as the clipping threshold;
* ``mse``: the threshold minimising the expected squared quantization error (rounding noise
  ``s^2 / 12`` per unclipped value plus the squared clipping error), searched over a histogram
  of ``|x|``.

``pack_int4`` stores two signed 4-bit values per byte (low nibble first), ``unpack_int4``
inverts it exactly.
"""

from __future__ import annotations

import numpy as np


def qmax(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise ValueError(f"bit width must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def quantize(x: np.ndarray, scale, bits: int, axis: int | None = None) -> np.ndarray:
    """Integers (int32) ``clip(round(x / scale), -Q, Q)``; ``scale`` per ``axis`` entry if given."""
    s = np.asarray(scale, dtype=np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    q = qmax(bits)
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) / s), -q, q).astype(np.int32)


def dequantize(q: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return (q * s).astype(np.float32)


def _scale_for(threshold: float, bits: int) -> float:
    return max(float(threshold), 1e-12) / qmax(bits)


def per_channel_scales(w: np.ndarray, bits: int = 8) -> np.ndarray:
    """``s_c = max|W_c| / Q`` over every axis but 0 (output channels); zero channels get a tiny scale."""
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    return np.maximum(absmax, 1e-12) / qmax(bits)


class Observer:
    """Collects activation statistics over calibration batches, then gives one scale."""

    BINS = 2048

    def __init__(self, method: str = "minmax", bits: int = 8, percentile: float = 99.99):
        if method not in ("minmax", "percentile", "mse"):
            raise ValueError(f"unknown observer '{method}' (minmax, percentile, mse)")
        self.method, self.bits, self.percentile = method, bits, percentile
        self.absmax = 0.0
        self._samples: list[np.ndarray] = []

    def observe(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        if a.size:
            self.absmax = max(self.absmax, float(a.max()))
            self._samples.append(a)

    def scale(self) -> float:
        if not self._samples:
            raise ValueError("observer saw no data: calibrate before asking for a scale")
        if self.method == "minmax" or self.absmax == 0.0:
            return _scale_for(self.absmax, self.bits)
        a = np.concatenate(self._samples)
        if self.method == "percentile":
            return _scale_for(np.percentile(a, self.percentile), self.bits)
        hist, edges = np.histogram(a, bins=self.BINS, range=(0.0, self.absmax))
        centers = (edges[:-1] + edges[1:]) / 2
        best, best_err = self.absmax, np.inf
        for t in edges[16::8]:  # candidate clipping thresholds
            s = _scale_for(t, self.bits)
            inside = centers <= t
            err = np.sum(hist[inside]) * s * s / 12 + np.sum(hist[~inside] * (centers[~inside] - t) ** 2)
            if err < best_err:
                best, best_err = t, err
        return _scale_for(best, self.bits)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values in [-8, 7] -> uint8, two per byte (low nibble = even index); pads odd length."""
    flat = np.asarray(q, dtype=np.int32).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{flat.min()}, {flat.max()}]")
    if flat.size % 2:
        flat = np.append(flat, 0)
    nib = (flat & 0xF).astype(np.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: the first ``count`` signed values (int8)."""
    b = np.asarray(packed, dtype=np.uint8)
    nib = np.empty(b.size * 2, dtype=np.int16)
    nib[0::2] = b & 0xF
    nib[1::2] = b >> 4
    nib = np.where(nib > 7, nib - 16, nib)
    return nib[:count].astype(np.int8)
