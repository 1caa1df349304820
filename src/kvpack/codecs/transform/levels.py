"""Entropy-coded levels of the `transform` codec in one pass per component: normalized coefficients to rANS symbols,
escapes and raw low bits (encode), and back (decode).

The bitstream is the one :mod:`kvpack.codecs.transform.codec` documents: component ``i`` of a layer (its rows sorted
by rate class) quantizes ``z`` with step ``1 / r_i`` (:func:`~kvpack.codecs.transform.quant.ec_quantize`), zigzags
the level to ``u``, sends ``u >> b_i`` as a symbol (``ESCAPE`` plus a LEB128 varint when it is off the table) and the
low ``b_i`` bits raw, in one little-endian bit stream per ``b_i`` (components in order, ``tokens`` values each).
Written as numpy expressions these steps are a dozen full-size int64 temporaries per chunk (5 M coefficients at 2K
tokens), whose allocation and page faults took more time than the decode GEMM on a 2-core CPU (docs/transform.md,
Speed). These numba kernels (no library fuses a custom quantizer with its bitstream) do the same arithmetic, value
for value, one component per iteration; the decoder writes the coefficients component-major (``[components,
tokens]``) and transposes them once, into the projection's input precision.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.common import f32_to_bf16_bits, threads_for
from kvpack.codecs.transform.quant import ESCAPE, low_bits, pack_bits, rates
from kvpack.entropy.tables import decode_varints, encode_varints
from kvpack.errors import FormatError


@njit(nogil=True, cache=True, parallel=True)
def _count_escapes(symbols: np.ndarray, tokens: int, out: np.ndarray) -> None:  # pragma: no cover - numba
    for i in prange(out.size):
        n = 0
        for t in range(i * tokens, (i + 1) * tokens):
            n += symbols[t] == ESCAPE
        out[i] = n


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _dequantize(symbols: np.ndarray, tokens: int, escapes: np.ndarray, esc_start: np.ndarray, lows: np.ndarray,
                low_start: np.ndarray, nbits: np.ndarray, r: np.ndarray, shrink: np.ndarray, target: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover - numba
    for i in prange(target.size):
        e, nb, bit, row = esc_start[i], nbits[i], low_start[i], target[i]
        for t in range(tokens):
            high = np.int64(symbols[i * tokens + t])
            if high == ESCAPE:
                high = escapes[e]
                e += 1
            low = np.int64(0)
            for k in range(nb):
                low |= np.int64((lows[(bit + k) >> 3] >> ((bit + k) & 7)) & 1) << k
            bit += nb
            u = (high << nb) | low
            q = np.float32((u >> 1) ^ -(u & 1))
            out[row, t] = np.float32((q - np.float32(np.sign(q)) * shrink[i]) / r[i])


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _quantize(z: np.ndarray, rows: np.ndarray, cols: np.ndarray, r: np.ndarray, nbits: np.ndarray,
              table: np.ndarray, rounding: float, symbols: np.ndarray, low: np.ndarray,
              escapes: np.ndarray) -> None:  # pragma: no cover - numba
    """Rows ``rows[j]`` of ``symbols`` and ``low`` (``[n, T]``) from column ``cols[j]`` of ``z [T, C]``; escapes
    counted per row."""
    tokens = z.shape[0]
    for j in prange(rows.size):
        i, c, nb = rows[j], cols[j], nbits[rows[j]]
        n = 0
        for t in range(tokens):
            scaled = z[t, c] * r[i]
            q = np.int64(np.sign(scaled) * np.floor(np.abs(scaled) + rounding))
            u = -2 * q - 1 if q < 0 else 2 * q
            high = u >> nb
            low[i, t] = u & ((1 << nb) - 1)
            if high >= ESCAPE or table[i, high] == 0:
                symbols[i, t] = ESCAPE
                n += 1
            else:
                symbols[i, t] = high
        escapes[i] = n


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _escaped(z: np.ndarray, rows: np.ndarray, cols: np.ndarray, r: np.ndarray, nbits: np.ndarray,
             rounding: float, symbols: np.ndarray, start: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """The escaped symbols' values (``u >> b``) of rows ``rows[j]``, at ``out[start[i]:]`` in token order."""
    for j in prange(rows.size):
        i, c, nb = rows[j], cols[j], nbits[rows[j]]
        e = start[i]
        if e == start[i + 1]:
            continue
        for t in range(z.shape[0]):
            if symbols[i, t] == ESCAPE:
                scaled = z[t, c] * r[i]
                q = np.int64(np.sign(scaled) * np.floor(np.abs(scaled) + rounding))
                out[e] = (-2 * q - 1 if q < 0 else 2 * q) >> nb
                e += 1


def quantize(zs: list[np.ndarray], group: np.ndarray, column: np.ndarray, classes: np.ndarray, freqs: np.ndarray,
             rounding: float) -> tuple[np.ndarray, bytes, bytes]:
    """Entropy-coded levels of ``n`` components: ``(symbols uint8 [n * T], escape section, low-bit section)``.

    Component ``i`` is column ``column[i]`` of ``zs[group[i]]`` (float32 ``[T, C_g]``: normalized coefficients) at
    rate class ``classes[i]`` (non-decreasing); ``freqs`` (``[classes, alphabet]``) says which symbols the tables
    can code; ``rounding`` as in :func:`~kvpack.codecs.transform.quant.ec_quantize`.
    """
    n, tokens = classes.size, zs[0].shape[0] if zs else 0
    r, nbits = rates()[classes], low_bits()[classes]
    table = freqs[classes]
    symbols = np.empty((n, tokens), np.uint8)
    low = np.empty((n, tokens), np.uint8)
    counts = np.zeros(n, np.int64)
    parts = [(z, rows, column[rows]) for g, z in enumerate(zs) if (rows := np.flatnonzero(group == g)).size]
    with threads_for(n * tokens):
        for z, rows, cols in parts:
            _quantize(z, rows, cols, r, nbits, table, rounding, symbols, low, counts)
        start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        values = np.empty(int(start[-1]), np.int64)
        for z, rows, cols in parts:
            _escaped(z, rows, cols, r, nbits, rounding, symbols, start, values)
    lows = b"".join(pack_bits(low[nbits == nb].reshape(-1), int(nb)) for nb in np.unique(nbits) if nb)
    return symbols.reshape(-1), encode_varints(values).tobytes(), lows


def dequantize(symbols: np.ndarray, tokens: int, escapes: np.ndarray, lows: np.ndarray, classes: np.ndarray,
               shrink: np.ndarray, target: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`quantize`: component ``i``'s coefficients into ``out[target[i]]`` (float32 ``[R, tokens]``).

    ``symbols``: uint8 ``[n * tokens]`` (component-major, as the rANS lanes decode them); ``escapes`` and ``lows``:
    the escape and low-bit sections (uint8); ``shrink``: float32 reconstruction offset per rate class.
    :class:`FormatError` when a section does not match the symbols.
    """
    n = classes.size
    if symbols.size != n * tokens:
        raise FormatError(f"{symbols.size} entropy-coded symbols, expected {n * tokens}")
    if out.shape[1] != tokens or target.size != n or (n and not 0 <= target.min() <= target.max() < out.shape[0]):
        raise ValueError(f"out {out.shape} and target rows do not fit {n} components of {tokens} tokens")
    nbits = low_bits()[classes]
    counts = np.empty(n, np.int64)
    with threads_for(n * tokens):
        _count_escapes(symbols, tokens, counts)
    esc_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    values, pos = decode_varints(escapes, 0, int(counts.sum()), 1 << 31)
    if pos != escapes.size:
        raise FormatError("escape section is malformed or has trailing bytes")
    low_start = np.zeros(n, np.int64)
    end = 0
    for nb in np.unique(nbits):
        if nb:
            rows = np.flatnonzero(nbits == nb)
            low_start[rows] = 8 * end + np.arange(rows.size) * tokens * int(nb)
            end += (rows.size * tokens * int(nb) + 7) // 8
    if lows.size != end:
        raise FormatError(f"low-bit section has {lows.size} bytes, expected {end}")
    with threads_for(n * tokens):
        _dequantize(symbols, tokens, values, esc_start, lows, low_start, nbits, rates()[classes],
                    shrink[classes].astype(np.float32), target.astype(np.int64), out)


#: Tokens per block of :func:`_transpose`: 32 output rows written in step, 128-byte reads of each input row.
_BLOCK_TOKENS = 32


@njit(nogil=True, cache=True, parallel=True)
def _transpose(bits: np.ndarray, out: np.ndarray, to_bf16: bool) -> None:  # pragma: no cover - numba
    """``out [T, U] = bits [U, T]`` transposed: float32 bits, or their bf16 bits rounded to nearest even."""
    rows, tokens = bits.shape
    for block in prange((tokens + _BLOCK_TOKENS - 1) // _BLOCK_TOKENS):
        first = block * _BLOCK_TOKENS
        last = min(tokens, first + _BLOCK_TOKENS)
        for r in range(rows):
            for t in range(first, last):
                out[t, r] = f32_to_bf16_bits(bits[r, t]) if to_bf16 else bits[r, t]


def transposed(z: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``z [U, T]`` (float32: the coefficients as :func:`dequantize` writes them) as the projection's input ``[T, U]``
    in ``dtype`` (float32 or bfloat16, the precisions of :func:`~kvpack.codecs.transform.codec.projection_dtype`;
    rounded as torch's cast rounds finite values), row-major.

    torch's transposing cast took 0.6-1 ms of a 256-token chunk's 15 ms decode at 32x (one-off profile); this
    blocked pass takes a fraction of it."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the projection multiplies in float32 or bfloat16, not {dtype}")
    rows, tokens = z.shape
    out = torch.empty(tokens, rows, dtype=dtype)
    if z.size:
        wide = out.view(torch.int32).numpy().view(np.uint32) if dtype == torch.float32 else \
            out.view(torch.int16).numpy().view(np.uint16)
        with threads_for(z.size):
            _transpose(np.ascontiguousarray(z, np.float32).view(np.uint32), wide, dtype == torch.bfloat16)
    return out
