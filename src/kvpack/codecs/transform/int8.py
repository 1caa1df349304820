"""The decode projection with its low-rate components in int8 (``$KVPACK_TRANSFORM_GEMM=int8``, issue 12).

A decode multiplies the coefficients ``z [T, U]`` by ``decode [U, D]`` (:mod:`kvpack.codecs.transform.codec`). An
entropy-coded coefficient of component ``c`` is ``z = (q - sign(q) s_c) / r_c`` for an integer level ``q``, its
class's rate ``r_c`` and shrink ``s_c`` (:func:`kvpack.codecs.transform.levels.dequantize`), so up to the shrink
it is an integer: the components whose rate keeps ``MULTIPLIER * |q|`` within int8 up to :data:`SIGMAS` standard
deviations (``r_c <= 127 / (SIGMAS * MULTIPLIER)``) multiply as

    left ``L = clamp(rint(MULTIPLIER * z * r_c), -127, 127)`` (int8 ``[T, K]``; the shrink rounded to
    ``1 / MULTIPLIER`` of a level) against right ``decode[c] / (MULTIPLIER * r_c)`` rounded to int8 with one
    float32 scale per feature column (``[K, D]``), in exact int32 sums (``torch._int_mm``),

and the other components (and fixed-width ones) in the float precision of
:func:`~kvpack.codecs.transform.codec.projection_dtype`. A coefficient whose ``L`` is clamped (beyond
:data:`SIGMAS` deviations, under one in a million on SmolLM2) has its remainder added back in float32.

Error against the exact product, per decoded feature ``d`` (:meth:`Int8Projection.error_bound`, checked by the
tests): for every int8 component, ``|decode[c, d]| * |z - L / (MULTIPLIER r_c)|`` (at most half a ``1 / MULTIPLIER``
of the component's step) plus ``|L| * scale_d / 2`` (the right side's rounding), besides the float part's own
rounding.
On a 2-core Zen 4 (AVX-512 VNNI) SmolLM2's 32x preset decodes 1.37x faster than with the whole projection in bf16,
at equal Δppl and KL (docs/transform.md, "Projection precision" and "Speed"). torch's int8 GEMM is written for the
job; what is written here is the split and the left side, which no library knows about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.common import threads_for
from kvpack.codecs.transform.levels import transposed

#: Levels are scaled by this power of two before rounding: the shrink keeps ``1 / MULTIPLIER`` of a level.
MULTIPLIER = 16
#: Components multiply in int8 while ``SIGMAS`` of their standard deviations fit in int8 levels.
SIGMAS = 4
#: The largest int8 magnitude used (symmetric: -127 .. 127).
INT8_MAX = 127
#: ``torch._int_mm`` wants the inner dimension in multiples of this.
_INNER = 8
#: Tokens multiplied at a time, so that a block's int32 and float32 products (``[256, D]``, 12 MB each for SmolLM2)
#: are scaled and summed while in cache: whole 1,536-token prefixes of the 6 eval caches decode at 32x at 159 MB/s
#: against 142 in one block, 256-token chunks at 170 either way (Zen 4, a one-off in-process A/B, identical output).
BLOCK_TOKENS = 256


@dataclass(frozen=True, eq=False)
class Int8Projection:
    """One PCA group's decode split for a preset: ``low`` components in int8, ``high`` ones in float.

    ``low``, ``high``: int64 row indices into the group's ``z [U, T]``; ``scale_rows``: float64 ``[K]``,
    ``MULTIPLIER * r_c`` of the low rows; ``right``: int8 ``[K_pad, D]`` (``K`` padded with zero rows to a multiple
    of 8); ``column_scale``: float32 ``[D]``; ``high_decode``: ``[U - K, D]`` and ``bias`` ``[D]`` in the float
    precision; ``low_decode``: float32 ``[K, D]``, the exact rows, for the clamped coefficients' remainders.
    """

    low: np.ndarray
    high: np.ndarray
    scale_rows: np.ndarray
    right: torch.Tensor
    column_scale: torch.Tensor
    high_decode: torch.Tensor
    bias: torch.Tensor
    low_decode: torch.Tensor

    @classmethod
    def build(cls, decode: torch.Tensor, bias: torch.Tensor, rate: np.ndarray, dtype: torch.dtype
              ) -> Int8Projection:
        """The split of ``decode [U, D]`` (float32) and ``bias [D]`` given each row's rate ``rate [U]`` (float64;
        NaN for rows that are not entropy-coded), with the float part in ``dtype``."""
        coded = np.isfinite(rate)
        low = np.flatnonzero(coded & (rate <= INT8_MAX / (SIGMAS * MULTIPLIER)))
        high = np.flatnonzero(~np.isin(np.arange(rate.size), low))
        scale_rows = MULTIPLIER * rate[low]
        scaled = decode[torch.from_numpy(low)] / torch.from_numpy(scale_rows.astype(np.float32))[:, None]
        column_scale = (scaled.abs().amax(0) if low.size else torch.zeros(decode.shape[1])) / INT8_MAX
        column_scale = torch.where(column_scale > 0, column_scale, torch.ones_like(column_scale))
        right = torch.zeros((-low.size % _INNER) + low.size, decode.shape[1], dtype=torch.int8)
        right[: low.size] = torch.round(scaled / column_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(low=low, high=high, scale_rows=scale_rows, right=right, column_scale=column_scale,
                   high_decode=decode[torch.from_numpy(high)].to(dtype).contiguous(), bias=bias.to(dtype),
                   low_decode=decode[torch.from_numpy(low)].contiguous())

    def project(self, zt: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """``z @ decode + bias`` as float32 ``[T, D]`` for ``zt [U, T]`` (float32, as dequantized), the float part
        in ``dtype`` (the precision :meth:`build` was given)."""
        tokens = zt.shape[1]
        z_high = transposed(zt[self.high], dtype)
        left = torch.zeros(tokens, self.right.shape[0], dtype=torch.int8)
        with threads_for(self.low.size * tokens):
            clamped = _left(zt, self.low, self.scale_rows, left.numpy())
        x = torch.empty(tokens, self.right.shape[1])
        for t in range(0, tokens, BLOCK_TOKENS):  # each block's [tokens, D] products stay in cache
            block = slice(t, t + BLOCK_TOKENS)
            x[block] = torch.addmm(self.bias, z_high[block], self.high_decode)
            if self.low.size:
                x[block].addcmul_(torch._int_mm(left[block], self.right), self.column_scale)
        if clamped:  # the remainders of the clamped coefficients, in float32
            rows, cols = np.nonzero(np.abs(np.rint(zt[self.low] * self.scale_rows[:, None])) > INT8_MAX)
            z = zt[self.low[rows], cols]
            rest = z - left.numpy()[cols, rows] / self.scale_rows[rows]
            x.index_add_(0, torch.from_numpy(cols), torch.from_numpy(rest.astype(np.float32))[:, None]
                         * self.low_decode[torch.from_numpy(rows)])
        return x

    def left_side(self, zt: np.ndarray) -> np.ndarray:
        """The int8 levels ``L [T, K]`` of ``zt [U, T]`` (module docstring), as :meth:`project` multiplies them."""
        left = np.zeros((zt.shape[1], self.right.shape[0]), np.int8)
        _left(zt, self.low, self.scale_rows, left)
        return left[:, : self.low.size]

    def error_bound(self, zt: np.ndarray) -> torch.Tensor:
        """float64 ``[T, D]``: a bound on ``|int8 part - exact product of the low rows|`` per element (module
        docstring) for ``zt [U, T]``, besides float32 rounding (of the int32 sums, at most ``2**-24`` relative)."""
        left = self.left_side(zt).astype(np.float64)
        z = zt[self.low].T.astype(np.float64)  # [T, K]
        clamped = np.abs(np.rint(z * self.scale_rows)) > INT8_MAX  # their remainders are added back exactly
        shrink = np.where(clamped, 0.0, np.abs(z - left / self.scale_rows))
        bound = torch.from_numpy(shrink) @ self.low_decode.double().abs()
        return bound + torch.from_numpy(np.abs(left).sum(1))[:, None] * (self.column_scale.double() / 2)


@njit(nogil=True, cache=True, parallel=True)
def _left(zt, low, scale_rows, out):  # type: ignore[no-untyped-def]
    """``out[t, j] = clamp(rint(zt[low[j], t] * scale_rows[j]), -127, 127)`` (int8 ``[T, K_pad]``, written for
    ``j < K``); returns how many were clamped."""
    tokens = zt.shape[1]
    clamped = 0
    for j in prange(low.size):
        row, s = zt[low[j]], scale_rows[j]
        n = 0
        for t in range(tokens):
            v = np.rint(np.float64(row[t]) * s)
            if v > INT8_MAX:
                v, n = INT8_MAX, n + 1
            elif v < -INT8_MAX:
                v, n = -INT8_MAX, n + 1
            out[t, j] = np.int8(v)
        clamped += n
    return clamped


__all__ = ["INT8_MAX", "MULTIPLIER", "SIGMAS", "Int8Projection"]
