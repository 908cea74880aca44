"""Quantization numerics: rounding bound, per-channel vs per-tensor, observers, int4 packing.

Bounds: an unclipped value's int-b round trip is within scale/2 (+ fp32 rounding, 1e-6 relative).
"""

import numpy as np
import pytest

from qcompile.quantize.numerics import (Observer, dequantize, pack_int4, per_channel_scales, qmax, quantize,
                                        unpack_int4)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_round_trip_error_is_at_most_half_a_step(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * rng.uniform(0.01, 3, (16, 1, 1, 1))
    s = per_channel_scales(w, bits)
    q = quantize(w, s, bits, axis=0)
    assert q.min() >= -qmax(bits) and q.max() <= qmax(bits)
    err = np.abs(dequantize(q, s, axis=0) - w)
    assert np.all(err <= s.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6) + 1e-7)


def test_per_channel_beats_per_tensor_when_channel_ranges_differ():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 32)) * np.geomspace(0.01, 1.0, 8)[:, None]
    pc = dequantize(quantize(w, per_channel_scales(w), 8, axis=0), per_channel_scales(w), axis=0)
    st = np.abs(w).max() / 127
    pt = dequantize(quantize(w, st, 8), st)
    def rel(approx):  # mean over channels of the channel's relative squared error
        return np.mean(np.mean((approx - w) ** 2, axis=1) / np.mean(w ** 2, axis=1))

    assert rel(pc) < 0.1 * rel(pt)


def test_clipping_observers_beat_minmax_on_heavy_tailed_activations():
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_t(df=2, size=200_000))  # post-ReLU-like, heavy tail
    errs = {}
    for method in ("minmax", "percentile", "mse"):
        obs = Observer(method, bits=8)
        for chunk in np.array_split(x, 4):
            obs.observe(chunk)
        s = obs.scale()
        errs[method] = float(np.mean((dequantize(quantize(x, s, 8), s) - x) ** 2))
    assert errs["mse"] < 0.8 * errs["minmax"], errs  # clipping the tail pays on heavy-tailed data
    assert errs["mse"] <= errs["percentile"] * 1.001, errs  # and MSE search is the best of the three


def test_observer_without_data_and_bad_method_are_named():
    with pytest.raises(ValueError, match="no data"):
        Observer("mse").scale()
    with pytest.raises(ValueError, match="unknown observer"):
        Observer("kl")


def test_int4_pack_unpack_is_exact_and_half_the_bytes():
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, size=101)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == 51
    assert np.array_equal(unpack_int4(packed, q.size), q.astype(np.int8))
    with pytest.raises(ValueError, match="int4"):
        pack_int4(np.array([8]))
