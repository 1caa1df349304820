"""kvpack.codecs.half: float16 rounding to one side equals numpy's cast plus one nextafter step, everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from kvpack.codecs.half import fp16_toward


def _numpy(v: np.ndarray, up: bool) -> np.ndarray:
    """The reference: numpy's nearest float16, stepped once toward the side when it lies on the other."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
        wrong = h.astype(np.float64) < v if up else h.astype(np.float64) > v
        h[wrong] = np.nextafter(h[wrong], np.float16(np.inf if up else -np.inf))
    return h


def _values() -> np.ndarray:
    """Every finite float16 and infinity, as float64, with their float64 neighbours and the midpoints between
    consecutive float16 values (ties), plus zeros, overflow and underflow."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    every = np.sort(every[~np.isnan(every)])
    mids = (every[:-1] + every[1:])[np.isfinite(every[:-1] + every[1:])] / 2
    near = np.concatenate([np.nextafter(every, np.inf), np.nextafter(every, -np.inf)])
    extra = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e300, -1e300, 2.0**-25, -(2.0**-25),
                      2.0**-26, 5e-324, -5e-324, 2.0**-14 * (1 - 2.0**-12)])
    out = np.concatenate([every, mids, near, extra])
    return out[~np.isnan(out)]


@pytest.mark.parametrize("up", [True, False])
def test_rounding_to_a_side_equals_numpy(up: bool) -> None:
    v = _values()
    got, want = fp16_toward(v, up), _numpy(v, up)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))  # bits: signed zeros count
    assert np.all(got.astype(np.float64) >= v) if up else np.all(got.astype(np.float64) <= v)


def test_float32_input_and_shape() -> None:
    rng = np.random.default_rng(3)
    v = (rng.standard_normal((3, 5, 7)) * 10.0 ** rng.integers(-9, 6, (3, 5, 7))).astype(np.float32)
    got = fp16_toward(v, True)
    assert got.shape == v.shape and got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), _numpy(v.astype(np.float64), True).view(np.uint16))


def test_bits_of_is_the_view_of_the_value() -> None:
    """``bits_of`` in a compiled loop equals numpy's integer view: float64 as int64, float32 as its unsigned 32 bits
    (sign bit set: negative values, -0.0, NaN payloads), both widened to int64."""
    from numba import njit

    from kvpack.codecs.half import bits_of

    @njit
    def all_bits(x):  # type: ignore[no-untyped-def]
        out = np.empty(x.size, np.int64)
        for i in range(x.size):
            out[i] = bits_of(x[i])
        return out

    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.integers(0, 1 << 32, 4096, dtype=np.uint64),
                          np.array([0, 1 << 31, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFFFFFFF], np.uint64)])
    f32 = raw.astype(np.uint32).view(np.float32)
    assert np.array_equal(all_bits(f32), f32.view(np.uint32).astype(np.int64))
    f64 = rng.integers(-(1 << 63), (1 << 63) - 1, 4096, dtype=np.int64).view(np.float64)
    assert np.array_equal(all_bits(f64), f64.view(np.int64))
