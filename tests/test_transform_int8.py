"""The int8 decode projection (kvpack.codecs.transform.int8): within its stated bound, exact where it claims to be."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.transform.int8 import INT8_MAX, MULTIPLIER, SIGMAS, Int8Projection
from kvpack.codecs.transform.quant import rates


def _case(seed: int, comps: int, dims: int, tokens: int, outliers: int
          ) -> tuple[Int8Projection, np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
    """A split of a random ``decode [U, D]`` over rows of every kind (int8, float, fixed-width), and coefficients
    ``zt [U, T]`` dequantized as the codec does from integer levels, some far beyond int8 (clamped)."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 40, comps)
    rate = rates()[classes]
    rate[rng.random(comps) < 0.1] = np.nan  # fixed-width rows
    shrink = np.linspace(0.38, 0.0, 48).astype(np.float32)[classes]
    decode = torch.from_numpy(rng.standard_normal((comps, dims)).astype(np.float32)) * 0.1
    decode[:, rng.integers(0, dims)] *= 30.0  # an outlier feature
    bias = torch.from_numpy(rng.standard_normal(dims).astype(np.float32))
    q = np.rint(rng.laplace(0.0, np.nan_to_num(rate, nan=1.0)[:, None] / np.sqrt(2), (comps, tokens)))
    q.flat[rng.integers(0, q.size, outliers)] *= 40  # levels far beyond the int8 range
    z = ((q.astype(np.float32) - np.sign(q).astype(np.float32) * shrink[:, None])
         / np.nan_to_num(rate, nan=1.0)[:, None]).astype(np.float32)
    return Int8Projection.build(decode, bias, rate, torch.float32), z, decode, bias, rate


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), comps=st.integers(1, 60), dims=st.integers(1, 40), tokens=st.integers(1, 50),
       outliers=st.integers(0, 5))
def test_int8_projection_is_within_its_bound(seed: int, comps: int, dims: int, tokens: int, outliers: int) -> None:
    split, zt, decode, bias, _ = _case(seed, comps, dims, tokens, outliers)
    exact = torch.from_numpy(zt.T.astype(np.float64)) @ decode.double() + bias.double()
    got = split.project(zt, torch.float32).double()
    # float32 rounding of the float part and of the int32 sums: a few ulps of the terms' magnitudes
    rounding = 1e-5 * (torch.from_numpy(np.abs(zt.T).astype(np.float64)) @ decode.double().abs() + bias.double().abs())
    assert bool(((got - exact).abs() <= split.error_bound(zt) + rounding).all())


def test_int8_rows_are_the_low_rate_entropy_coded_ones() -> None:
    split, _, _, _, rate = _case(3, 200, 16, 30, 0)
    np.testing.assert_array_equal(split.low, np.flatnonzero(rate <= INT8_MAX / (SIGMAS * MULTIPLIER)))
    assert split.low.size and split.high.size and np.isnan(rate[split.high]).any()
    assert np.array_equal(np.sort(np.concatenate([split.low, split.high])), np.arange(200))
    assert split.right.shape[0] % 8 == 0 and not split.right[split.low.size :].any()


def test_int8_left_side_is_the_scaled_levels() -> None:
    """``L = clamp(rint(16 (q - sign(q) s)))``: the shrink kept to 1/16 of a level, levels beyond int8 clamped."""
    split, zt, _, _, _ = _case(5, 120, 8, 64, 20)
    left = split.left_side(zt).astype(np.int64)
    want = np.clip(np.rint(zt[split.low].astype(np.float64) * split.scale_rows[:, None]), -INT8_MAX, INT8_MAX).T
    np.testing.assert_array_equal(left, want)
    assert (np.abs(left) == INT8_MAX).any()  # the clamped path is exercised


def test_int8_projection_without_int8_rows() -> None:
    decode, bias = torch.ones(3, 4), torch.arange(4.0)
    split = Int8Projection.build(decode, bias, np.array([np.nan, 100.0, 200.0]), torch.float32)
    assert split.low.size == 0
    zt = np.ones((3, 2), np.float32)
    torch.testing.assert_close(split.project(zt, torch.float32), torch.full((2, 4), 3.0) + bias)
