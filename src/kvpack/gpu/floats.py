"""Float rounding inside Triton kernels, bit for bit as the CPU kernels round (:func:`kvpack.codecs.common.float_bits`).

The GPU decoders compute in float32 as the CPU ones do and then round with integer operations on the float32 bits,
not with the hardware conversion, so that even NaN payloads (a forged fp8 code) come out as the CPU writes them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_bits(u, KIND: tl.constexpr):  # type: ignore[no-untyped-def]
    """``u`` (int64, float32 bit patterns) as the bits of output kind ``KIND`` (``common.OUT_KINDS``: 0 float32,
    1 bfloat16, 2 float16), rounded to nearest even; NaN stays a quiet NaN with its sign."""
    if KIND == 1:
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = tl.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    elif KIND == 2:
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        n = a - 0x38000000
        normal = (n + 0xFFF + ((n >> 13) & 1)) >> 13
        shift = tl.minimum(tl.maximum(126 - (a >> 23), 1), 40)
        m = (a & 0x7FFFFF) | 0x800000
        q = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int64)
        r = tl.where(a < 0x33000000, 0, sub)
        r = tl.where(a >= 0x38800000, normal, r)
        r = tl.where(a >= 0x477FF000, 0x7C00, r)
        r = tl.where(a > 0x7F800000, 0x7E00, r)
        r = sign | r
    else:
        r = u
    return r
