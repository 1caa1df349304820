"""float16 parameters rounded to one side: fp8's scales (up) and kivi's group minima (down) and steps (up).

A codec that stores a parameter in float16 needs it on a known side of the exact value (a scale that never clips, a
grid that covers its group), so it takes the float16 nearest the value and steps once toward the side when the
nearest lies on the other: numpy's ``astype(float16)`` and ``nextafter``, done here by compiled scalar functions so
that a codec computes its parameters in one pass (numpy's float16 casts and temporaries cost 2 ms of a 19 ms
256-token kivi encode). The results equal numpy's on every float16 value, its neighbours and the midpoints between
them (tests).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def bits_of(typingctx, v):  # type: ignore[no-untyped-def]
    """The bits of a float64 (as int64) or of a float32 (as int64 from 0 to 2**32 - 1), an LLVM bitcast: numba has
    no scalar view, and reading a value back through an integer view of an array is unsafe in a ``prange`` body
    unless the array was allocated inside it (numba passes the body's outer arrays as non-aliasing, so the read may
    see a stale value)."""
    if v not in (types.float64, types.float32):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64 = context.get_value_type(types.int64)
        if signature.args[0] == types.float64:
            return builder.bitcast(args[0], i64)
        return builder.zext(builder.bitcast(args[0], context.get_value_type(types.int32)), i64)
    return types.int64(v), codegen


@njit(nogil=True, cache=True, inline="always")
def f16_nearest(v):  # type: ignore[no-untyped-def]
    """float16 bits (int) of the float16 nearest float64 ``v`` (not NaN), ties to even; ``inf`` from 65520 up. Integer
    operations on the bits (``frexp`` and ``ldexp`` calls made the kivi parameters slower than numpy)."""
    u = bits_of(v)
    sign = (u >> 48) & 0x8000
    a = u & 0x7FFFFFFFFFFFFFFF
    if a >= 0x40EFFE0000000000:  # 65520
        return sign | 0x7C00
    if a >= 0x3F10000000000000:  # 2**-14 and up: rebias the exponent (1023 -> 15), round 42 dropped bits to even
        r = a - 0x3F00000000000000
        return sign | ((r + 0x1FFFFFFFFFF + ((r >> 42) & 1)) >> 42)
    return sign | int(np.rint(abs(v) * 2.0**24))  # subnormal: units of 2**-24 (the product is exact)


@njit(nogil=True, cache=True, inline="always")
def f16_value(h: int) -> float:
    """The value (float64, exact) of float16 bits ``h``."""
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    if e == 0x1F:
        v = np.inf if m == 0 else np.nan
    elif e == 0:
        v = m * 2.0**-24
    else:
        v = np.float64((1024 + m) << e) * 2.0**-25  # an integer below 2**41, times a power of two: exact
    return -v if h & 0x8000 else v


@njit(nogil=True, cache=True, inline="always")
def f16_toward(v: float, up: bool) -> int:
    """float16 bits of the float16 nearest float64 ``v`` on one side: ``>= v`` if ``up``, else ``<= v`` (``inf`` past
    the range on that side: an overflowing parameter is the caller's error to report)."""
    h = f16_nearest(v)
    x = f16_value(h)
    if x < v if up else x > v:  # one step toward the side; past a zero of either sign to the smallest subnormal
        if up:
            h = 0x0001 if h == 0x8000 else (h - 1 if h & 0x8000 else h + 1)
        else:
            h = 0x8001 if h == 0x0000 else (h + 1 if h & 0x8000 else h - 1)
    return h


def fp16_toward(values: np.ndarray, up: bool) -> np.ndarray:
    """:func:`f16_toward` of every element of ``values`` (float32 or float64, any shape, not NaN): float16 array of
    the same shape."""
    flat = np.ascontiguousarray(values, np.float64).reshape(-1)
    return _toward(flat, up).view(np.float16).reshape(values.shape)


@njit(nogil=True, cache=True)
def _toward(flat, up):  # type: ignore[no-untyped-def]
    out = np.empty(flat.size, np.uint16)
    for i in range(flat.size):
        out[i] = f16_toward(flat[i], up)
    return out


__all__ = ["bits_of", "f16_nearest", "f16_toward", "f16_value", "fp16_toward"]
