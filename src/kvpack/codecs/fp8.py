"""`fp8`: FP8 E4M3 KV with one scale per (layer, K/V, head, channel), the 8-bit codes entropy coded with rANS.

FP8 E4M3 (``torch.float8_e4m3fn``: 1 sign, 4 exponent, 3 mantissa bits, largest finite 448, no infinities;
Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433) is the usual 2x KV format (REFERENCES.md §3).
Each row ``r = (layer, K/V, head, channel)`` gets ``scale[r] = absmax / 448`` over its tokens (stored as float16,
rounded *up* so that ``|x| / scale <= 448`` always holds), and every element becomes the E4M3 code of
``x / scale`` (float32 division, round to nearest even). Codes of a row whose values are mostly negative have their
sign bit flipped (``flip[r]``), so rows of a layer share distributions; the codes are then entropy coded with rANS,
tables per (layer, K/V, class) of rows (:mod:`kvpack.codecs.common`).

Decoding computes ``code_value * scale`` in float32 (exact: 4 x 11 significant bits) and rounds it to the cache dtype.

Sections: ``rows`` (``scale`` float16 little-endian per row, then the ``flip`` bits packed MSB first), ``classes``,
``symbols`` (the rANS blob over rows ``(layer, K/V, head, channel)``, tokens inner).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.base import Codec, Payload, register
from kvpack.codecs.common import (
    BLOCK_TOKENS,
    OUT_KINDS,
    as_words,
    block_to_rows,
    check_classes,
    decode_rows,
    encode_rows,
    float_bits,
    out_buffer,
    rows_sizes,
    rows_to_block,
    stacked_float32,
    symbol_block,
    threads_for,
)
from kvpack.codecs.half import bits_of, fp16_toward
from kvpack.codecs.validate import Size, exact
from kvpack.errors import CodecError, FormatError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

FP8_MAX = 448.0
#: float32 value of every E4M3 code (0x7F and 0xFF are NaN; the encoder never writes them).
E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


@njit(nogil=True, cache=True, parallel=True)
def _row_ranges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row (tile, channel) of ``x [tiles, tokens, dim]``: largest magnitude and number of negative values; and
    how many values are infinite or NaN (counted here rather than by ``np.isfinite``, a second pass over the 12 MB of
    a 256-token chunk that cost 1.4 ms)."""
    tiles, tokens, dim = x.shape
    absmax = np.zeros(tiles * dim, np.float32)
    neg = np.zeros(tiles * dim, np.int64)
    special = np.zeros(tiles, np.int64)
    for tile in prange(tiles):
        top = np.zeros(dim, np.float32)  # per-tile accumulators, so the channel loop vectorizes
        count = np.zeros(dim, np.int64)
        odd = 0
        for t in range(tokens):
            row = x[tile, t]
            bits = row.view(np.uint32)
            for c in range(dim):
                top[c] = max(top[c], abs(row[c]))
                count[c] += row[c] < 0
                odd += (bits[c] & 0x7F800000) == 0x7F800000
        absmax[tile * dim : (tile + 1) * dim] = top
        neg[tile * dim : (tile + 1) * dim] = count
        special[tile] = odd
    return absmax, neg, special.sum()


@njit(nogil=True, cache=True, parallel=True)
def _encode_codes(x: np.ndarray, scales: np.ndarray, flips: np.ndarray, out: np.ndarray, wide: np.ndarray) -> None:
    """E4M3 codes of ``x / scale`` (float32 division, round to nearest even), sign flipped per row, into ``out [rows *
    tokens]`` (uint8; allocated by numpy, which asks for huge pages on large arrays; ``wide``: its words,
    :func:`~kvpack.codecs.common.as_words`).

    ``|x / scale| <= 448`` must hold. Normal range (``>= 2**-6``): round the float32 bits to 3 mantissa bits (a carry
    moves into the exponent) and rebias the exponent from 127 to 7; below it: ``rint(|y| * 2**9)`` subnormal units.
    Both are computed for every element and one is selected, in int32, so that the channel loop vectorizes: 3.1 ->
    1.4 ms per 256-token chunk against a branch per element in int64 (in-process A/B, identical codes). The codes of
    up to :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens go into a ``[token, channel]`` block, then into the rows
    (:func:`~kvpack.codecs.common.block_to_rows`), where each had been stored to its row alone.
    """
    tiles, tokens, dim = x.shape
    for tile in prange(tiles):
        scale = scales[tile * dim : (tile + 1) * dim]
        flip = np.empty(dim, np.int32)
        for c in range(dim):
            flip[c] = np.int32(flips[tile * dim + c]) << 7
        y = np.empty(dim, np.float32)
        u = y.view(np.int32)
        q, q64 = symbol_block(dim)  # the block, and as words for block_to_rows
        offs = np.arange(tile * dim, (tile + 1) * dim) * tokens
        for i0 in range(0, tokens, BLOCK_TOKENS):
            n = min(BLOCK_TOKENS, tokens - i0)
            for i in range(n):
                row = x[tile, i0 + i]
                for c in range(dim):
                    y[c] = row[c] / scale[c] if scale[c] > 0 else np.float32(0.0)
                code = q[i]
                for c in range(dim):
                    a = u[c] & 0x7FFFFFFF
                    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
                    subnormal = np.int32(np.rint(abs(y[c]) * np.float32(512.0)))
                    sign = (((u[c] >> 31) & 1) << 7) ^ flip[c]
                    code[c] = (normal if a >= 0x3C800000 else subnormal) | sign
            block_to_rows(q, q64, i0, n, out, wide, offs)


def _decoder(kind: int) -> Any:
    """The reconstruction kernel for output kind ``kind`` (``common.OUT_KINDS``), with the kind as a constant."""

    @njit(nogil=True, cache=True, parallel=True)
    def reconstruct(span, stride, tokens, dim, symbols, wide, row_offset, scales,  # type: ignore[no-untyped-def]
                    flips, values):
        """Bits of the cache dtype ``[tiles, tokens, dim]``, the tiles of ``span`` at ``stride``
        (:func:`~kvpack.codecs.common.tile_span`), from the coded rows: ``values[code] * scale`` in float32, rounded
        to the cache dtype.

        Per block of up to :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens the codes are first transposed to
        ``[token, channel]`` (:func:`~kvpack.codecs.common.rows_to_block`), so that the later loops run over
        contiguous channels: 1.89 -> 1.64 ms per 256-token chunk against a 256-entry table per channel (as many
        entries as the chunk has elements; in-process A/B on 36 real SmolLM2 chunks, identical output)."""
        tiles = scales.size // dim
        for tile in prange(tiles):
            r0 = tile * dim
            offs = row_offset[r0 : r0 + dim]
            scale = scales[r0 : r0 + dim]
            flip = np.empty(dim, np.uint8)
            for c in range(dim):
                flip[c] = 0x80 if flips[r0 + c] else 0
            q, q64 = symbol_block(dim)  # the block, and as words for rows_to_block
            value = np.empty(dim, np.float32)
            o = span[tile * stride : tile * stride + tokens * dim].reshape(tokens, dim)
            for i0 in range(0, tokens, BLOCK_TOKENS):
                n = min(BLOCK_TOKENS, tokens - i0)
                rows_to_block(symbols, wide, offs, i0, n, q, q64)
                for i in range(n):
                    for c in range(dim):  # lookups apart: in the rounding loop they cost 30% (A/B)
                        value[c] = values[q[i, c] ^ flip[c]] * scale[c]
                    dst = o[i0 + i]
                    for c in range(dim):
                        dst[c] = float_bits(bits_of(value[c]), kind)

    return reconstruct


_DECODERS = {name: _decoder(kind) for name, kind in OUT_KINDS.items()}


def read_rows(rows: memoryview, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rows`` section (length checked by ``section_sizes``): float32 scales and uint8 flips ``[n_rows]``;
    :class:`FormatError` for a negative or non-finite scale."""
    scales = np.frombuffer(rows, "<f2", count=n_rows).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise FormatError("fp8 scales must be finite and nonnegative")
    return scales, np.unpackbits(np.frombuffer(rows, np.uint8, offset=2 * n_rows), count=n_rows)


@register
@dataclass(frozen=True)
class Fp8Codec(Codec):
    """FP8 E4M3 with per-(layer, K/V, head, channel) scales, codes entropy coded (scheme in the module docstring).

    Shapes: keys and values ``[num_kv_heads, tokens, head_dim]`` per layer; scales ``[2 * num_layers, num_kv_heads,
    head_dim]`` (float16); decoded tensors are views of one ``[2 * num_layers, num_kv_heads, tokens, head_dim]``
    buffer in the cache dtype.

    Parameters:
        classes: rANS tables per (layer, K/V), rows clustered by their code histograms (1, 2, 4, 8 or 16). 2 is
            best on SmolLM2 at the store's 256-token chunks (4 gains 0.5% on 1536-token chunks, loses 1% at 256:
            an E4M3 code table has ~100 used symbols and costs ~150 bytes).

    Error bound (every element ``x`` of a row with stored scale ``s``, decoded ``x̂``; verified by the tests)::

        |x - x̂| <= 2**-4 * (1 + 2**-19) * |x|  +  2**-10 * s  +  u * |x̂|

    ``2**-4 |x|``: E4M3 keeps 3 mantissa bits, so rounding ``x / s`` in its normal range (``>= 2**-6``) is off by at
    most half a unit in the last place, ``2**-4`` of the value (``2**-19`` covers the float32 division).
    ``2**-10 s``: below ``2**-6`` E4M3 is subnormal with spacing ``2**-9``. ``u |x̂|``: rounding the float32 result to
    the cache dtype: ``u = 2**-8`` for bfloat16, ``2**-11`` for float16 (plus ``2**-25`` absolute below
    ``2**-14``), 0 for float32. Caches with non-finite values or with ``absmax / 448`` beyond float16 are refused
    (:class:`CodecError`).
    """

    name = "fp8"
    version = 1
    classes: int = 2

    def __post_init__(self) -> None:
        check_classes(self.classes)

    def encode_payload(self, kv: KVCache) -> Payload:
        with threads_for(kv.num_tokens * kv.spec.elements_per_token):
            x = stacked_float32(kv)
            absmax, neg, special = _row_ranges(x)
            if special:
                raise CodecError("fp8 cannot encode a cache with NaN or infinite values; use the lossless codec")
            scale16 = fp16_toward(absmax / np.float32(FP8_MAX), up=True)
            if not np.isfinite(scale16).all():
                raise CodecError(f"values up to {float(absmax.max()):.3g} need fp8 scales beyond float16's range")
            flips = (2 * neg > kv.num_tokens).astype(np.uint8)
            codes = np.empty(x.shape[0] * x.shape[2] * kv.num_tokens, np.uint8)
            _encode_codes(x, scale16.astype(np.float32), flips, codes, as_words(codes))
            rows = codes.reshape(2 * kv.spec.num_layers, kv.spec.num_kv_heads * kv.spec.head_dim, kv.num_tokens)
            blob, classes = encode_rows(rows, 256, self.classes)
            return Payload(meta={}, sections={
                "rows": scale16.astype("<f2").tobytes() + np.packbits(flips).tobytes(),
                "classes": classes,
                "symbols": blob,
            })

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        if meta:
            raise FormatError(f"fp8 payload meta must be empty, got {dict(meta)}")
        groups, rows = 2 * spec.num_layers, spec.num_kv_heads * spec.head_dim
        n_rows = groups * rows
        return {"rows": exact(2 * n_rows + (n_rows + 7) // 8), **rows_sizes((groups, rows, num_tokens), 256,
                                                                             self.classes)}

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        with threads_for(num_tokens * spec.elements_per_token):
            groups, heads, dim = 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim
            n_rows = groups * heads * dim
            scales, flips = read_rows(container.section("rows"), n_rows)
            symbols, row_offset = decode_rows(container.section("symbols"), container.section("classes"),
                                              (groups, heads * dim, num_tokens), 256, self.classes)
            data, _, span, stride = out_buffer((groups, heads, num_tokens, dim), spec.dtype, out)
            _DECODERS[spec.dtype](span, stride, num_tokens, dim, symbols, as_words(symbols), row_offset, scales, flips,
                                  E4M3_VALUES)
            return data.view(spec.buffer_shape(num_tokens))
