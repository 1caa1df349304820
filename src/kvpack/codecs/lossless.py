"""`lossless`: bit-exact KV storage (fp32, fp16, bf16), exponents modelled per channel and coded with rANS.

Every element is split into sign ``s``, biased exponent ``e`` (``E`` bits) and mantissa (``M`` bits): bf16 8+7,
fp16 5+10, fp32 8+23. As in DFloat11 (Zhang et al., "70% Size, 100% Accuracy", arXiv 2504.11651: the exponent of
bf16 weights carries ~2.6 of its 8 bits of information, the mantissa next to no redundancy) and ZipNN (Hershcovitch
et al., arXiv 2411.05239: byte grouping plus an entropy coder), the exponent is entropy coded and most mantissa bits
are stored as they are. What kvpack adds is context: a KV channel has a narrow, channel-specific exponent range
(SmolLM2-135M: 2.3-2.6 bits of exponent entropy per element given its (layer, K/V, head, channel), 2.7-2.8 given
its layer only), keys often have a dominant sign per channel, and the top mantissa bit is skewed (0.91-0.93 bits
given the channel and exponent). Per row ``r = (layer, K/V, head, channel)``, running over the tokens:

* ``base[r]`` = the largest exponent in the row; ``flip[r]`` = 1 if most of the row is negative;
* an element with ``base - e < 255 >> (k + 1)`` becomes the symbol ``(base - e) << (k + 1) | (s ^ flip) << k | t``
  where ``t`` are its top ``k`` mantissa bits (``k`` = 1 for bf16 and fp32, 2 for fp16); any other element
  (zeros and tiny values in a row of large ones, NaN/inf rows) takes the escape symbol 255 and stores its top
  ``1 + E + k`` bits (``bits >> (M - k)``) as a uint16;
* the symbol rows are coded with rANS, tables per (layer, K/V, class), each row in one of ``classes`` clusters
  (:mod:`kvpack.codecs.common`): shifting by ``base`` and flipping by the majority sign make the rows of a layer
  alike, so a few tables serve them all and stay cheap in a 256-token chunk (a table per row would cost ~50 bytes);
* the remaining ``M - k`` mantissa bits are stored raw (bf16: 6 bits, fp16: 8, fp32: 22), less the ``shift``
  lowest bits (a multiple of 8) when they are zero in every element of the chunk: a bf16 cache upcast to fp32 costs
  6 raw bits per element, not 22.

Sections: ``rows`` (``base`` uint8 per row, then the ``flip`` bits packed MSB first), ``classes``, ``symbols`` (the
rANS blob; rows ordered ``(layer, K/V, head, channel)``, tokens inner), ``escapes`` (one LEB128 count per
``(layer, K/V, head)`` tile, then the values as uint16 little-endian, tile after tile, each tile in ``[token,
channel]`` order), ``mantissa`` (one byte ``shift``, then per tile and token ``head_dim * W`` bytes, the
``W = (M - k - shift) // 8`` whole bytes of each channel's raw bits ``shift ..`` little-endian, then for every block
of 8 channels ``P = (M - k - shift) % 8`` bytes holding each channel's next ``P`` bits, channel ``j`` of the block at
bit ``P * j``, little-endian). Any bit pattern (NaN payloads, infinities, -0, subnormals) round-trips exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.base import Codec, Payload, register
from kvpack.codecs.common import (
    BLOCK_TOKENS,
    as_words,
    block_to_rows,
    check_classes,
    encode_rows,
    out_buffer,
    rows_sizes,
    rows_stream,
    rows_to_block,
    symbol_block,
    threads_for,
    tile_span,
)
from kvpack.codecs.validate import Size, exact
from kvpack.entropy.rans import LaneStream, decode_lanes
from kvpack.entropy.tables import decode_varints, encode_varints
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.kv import KVCache, int_view
from kvpack.spec import ModelSpec

#: (exponent bits E, mantissa bits M, top mantissa bits k coded in the symbol) per dtype; chosen so that the
#: ``M - k`` raw bits per element are whole bytes where the alphabet allows (fp16: 8).
FIELDS = {"bfloat16": (8, 7, 1), "float16": (5, 10, 2), "float32": (8, 23, 1)}
ESCAPE = 255


def _narrow(dtype: str) -> bool:
    """Whether the kernels compute in int32 for ``dtype``: 16-bit floats, whose bits fit it (eight channels per AVX2
    vector instead of four)."""
    exp_bits, man_bits, _ = FIELDS[dtype]
    return 1 + exp_bits + man_bits <= 16


@functools.cache
def _row_stats(narrow: bool) -> Any:
    """The row statistics kernel, in int32 arithmetic for 16-bit floats (``narrow``; eight channels per AVX2
    vector) and int64 for float32, compiled on first use. Against int64 for every dtype, on 1,024 tokens of each of
    two real SmolLM2 bf16 caches in 256-token chunks: 22.2 -> 15.1 ms on one thread, 22.7 -> 13.9 on two (2-core
    Zen 3, identical output; ``docs/results/zen3/lossless_kernels_ab.py``)."""
    word = np.int32 if narrow else np.int64

    @njit(nogil=True, cache=True, parallel=True)
    def row_stats(span, stride, tiles, tokens, dim, exp_bits, man_bits, max_rel, low_mask):  # type: ignore[no-untyped-def]
        """Per row of bits ``[tiles, tokens, dim]`` (the tiles of ``span`` at ``stride``: :func:`tile_span`):
        largest exponent and majority-sign flag; escapes per tile; the OR of every element's bits under
        ``low_mask``."""
        base = np.zeros(tiles * dim, np.uint8)
        flip = np.zeros(tiles * dim, np.uint8)
        n_esc = np.zeros(tiles, np.int64)
        low = np.zeros(tiles, np.int64)
        emask = (1 << exp_bits) - 1
        for tile in prange(tiles):
            bits = span[tile * stride : tile * stride + tokens * dim].reshape(tokens, dim)
            top = np.zeros(dim, word)
            neg = np.zeros(dim, word)
            ors = np.zeros(dim, word)
            for t in range(tokens):
                for c in range(dim):
                    v = word(bits[t, c])
                    top[c] = max(top[c], (v >> man_bits) & emask)
                    neg[c] += v >> (exp_bits + man_bits)
                    ors[c] |= v
            esc = 0
            for t in range(tokens):
                for c in range(dim):
                    esc += top[c] - ((word(bits[t, c]) >> man_bits) & emask) >= max_rel
            n_esc[tile] = esc
            for c in range(dim):
                base[tile * dim + c] = top[c]
                flip[tile * dim + c] = 2 * neg[c] > tokens
                low[tile] |= ors[c] & low_mask
        all_low = 0
        for tile in range(tiles):
            all_low |= low[tile]
        return base, flip, n_esc, all_low

    return row_stats


@njit(nogil=True, cache=True, inline="always")
def _put(o, t, c, top, block, j, m, p, escapes, ep, end, low, shift, whole, part, pmask):  # type: ignore[no-untyped-def]
    """Write element ``(t, c)`` of a tile for ``merge`` from its top bits ``top`` (-1: an invalid symbol, -2: an
    escape, whose top bits are the tile's next escape); returns ``(ep, ok)`` (escapes taken in order). Module level,
    not a closure of :func:`_kernels`: a closure over another dispatcher gets a new cache key in every process, so
    numba would recompile ``merge`` (~6 s) on each start."""
    ok = True
    if top < 0:
        if top == -2 and ep < end:
            top = np.int64(escapes[ep])
        else:
            ok = False
        ep += 1
    o[t, c] = (top << low) | (_rest(block, j, m, p, c, whole, part, pmask) << shift)
    return ep, ok


@njit(nogil=True, cache=True, inline="always")
def _partial(m, q, part):  # type: ignore[no-untyped-def]
    """The packed partial raw bits of a block of 8 channels: the ``part`` bytes at ``m[q]``, little-endian."""
    block = 0
    for w in range(part):
        block |= np.int64(m[q + w]) << (8 * w)
    return block


@njit(nogil=True, cache=True, inline="always")
def _rest(block, j, m, p, c, whole, part, pmask):  # type: ignore[no-untyped-def]
    """The raw mantissa bits of channel ``c`` (``j``-th of its block of 8, whose packed partial bits are ``block``)
    of the token whose bytes start at ``m[p]``."""
    rest = ((block >> (part * j)) & pmask) << (8 * whole)
    for w in range(whole):
        rest |= np.int64(m[p + c * whole + w]) << (8 * w)
    return rest


@njit(nogil=True, cache=True, inline="always")
def _top(sym: int, base: int, flip: int, exp_bits: int, k: int) -> int:
    """The top bits (sign, exponent, top ``k`` mantissa bits) that a symbol other than ``ESCAPE`` stands for in a row
    with largest exponent ``base`` and majority sign ``flip``; -1 if invalid (its exponent would be negative)."""
    e = base - (sym >> (k + 1))
    sign = ((sym >> k) & 1) ^ flip
    return (sign << (exp_bits + k)) | (e << k) | (sym & ((1 << k) - 1)) if e >= 0 else -1


@functools.cache
def _kernels(dtype: str, shift: int) -> tuple[Any, Any]:
    """The split and merge kernels for one float layout whose lowest ``shift`` bits are all zero, compiled (on first
    use) with the field widths as constants."""
    exp_bits, man_bits, k = FIELDS[dtype]
    low = man_bits - k  # the top bits start here; raw bits ``shift .. low``: ``whole`` bytes, then ``part`` bits
    whole, part = (low - shift) // 8, (low - shift) % 8
    pmask = (1 << part) - 1
    kmask = (1 << k) - 1
    narrow = _narrow(dtype)
    max_rel = 255 >> (k + 1)
    emask = (1 << exp_bits) - 1

    @njit(nogil=True, cache=True, parallel=True)
    def split(span, stride, tokens, dim, base, flip, esc_start, symbols, wide):  # type: ignore[no-untyped-def]
        """Escapes ``[n]`` and the mantissa section (the shift byte, then the raw low bits ``[tiles, tokens *
        row_bytes]``) of the bits ``[tiles, tokens, dim]`` that are the tiles of ``span`` at ``stride``
        (:func:`tile_span`); their symbols go to ``symbols`` (uint8 ``[tiles * dim * tokens]``, rows ``[tiles * dim,
        tokens]``; ``wide``: as words, :func:`~kvpack.codecs.common.as_words`).

        The inverse of ``merge``'s order: per token, one branch-free loop over contiguous channels computes every
        symbol into a ``[token, channel]`` block and spreads the partial raw bits one byte per channel, which are
        then packed by blocks of 8; a token with an escape then lists its escapes; each block of
        :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens goes to the symbol rows by words
        (:func:`~kvpack.codecs.common.block_to_rows`). Against the former split (symbols written to 64 rows and raw
        bits packed element by element, a branch per element for escapes), on 1,024 tokens of each of two real
        SmolLM2 bf16 caches in 256-token chunks: 85.7 -> 58.5 ms on one thread, 75.8 -> 42.2 on two (2-core Zen 3,
        identical output; ``docs/results/zen3/lossless_kernels_ab.py``). 16-bit floats are computed in int32,
        eight channels per AVX2 vector."""
        tiles = base.size // dim
        row_bytes = dim * whole + (dim + 7) // 8 * part
        n_blocks = (dim + 7) // 8
        escapes = np.empty(esc_start[-1], np.uint16)
        mantissa = np.empty(1 + tiles * tokens * row_bytes, np.uint8)
        mantissa[0] = shift
        raw = mantissa[1:].reshape((tiles, tokens * row_bytes))
        for tile in prange(tiles):
            r0 = tile * dim
            offs = np.arange(r0, r0 + dim) * tokens
            top_base = np.empty(dim, np.int32)
            sign_flip = np.empty(dim, np.int32)
            for c in range(dim):
                top_base[c] = base[r0 + c]
                sign_flip[c] = flip[r0 + c]
            q, q64 = symbol_block(dim)
            spread64 = np.zeros(n_blocks, np.uint64)
            spread = spread64.view(np.uint8)  # per channel its partial raw bits
            ep = esc_start[tile]
            m = raw[tile]
            x = span[tile * stride : tile * stride + tokens * dim].reshape(tokens, dim)
            for i0 in range(0, tokens, BLOCK_TOKENS):
                n = min(BLOCK_TOKENS, tokens - i0)
                for i in range(n):
                    t = i0 + i
                    row = x[t]
                    sym_row = q[i]
                    p = t * row_bytes
                    escaped = False
                    for c in range(dim):
                        v = np.int32(row[c]) if narrow else np.int64(row[c])
                        top = v >> low
                        rel = top_base[c] - ((top >> k) & emask)
                        sign = ((top >> (exp_bits + k)) & 1) ^ sign_flip[c]
                        escape = rel >= max_rel
                        escaped |= escape
                        sym_row[c] = ESCAPE if escape else (rel << (k + 1)) | (sign << k) | (top & kmask)
                        spread[c] = (v >> (shift + 8 * whole)) & pmask
                        for w in range(whole):
                            m[p + c * whole + w] = (v >> (shift + 8 * w)) & 0xFF
                    q0 = p + dim * whole
                    for b in range(n_blocks if part else 0):
                        packed = np.uint64(0)
                        for j in range(8):
                            packed |= ((spread64[b] >> np.uint64(8 * j)) & np.uint64(pmask)) << np.uint64(part * j)
                        for w in range(part):
                            m[q0 + b * part + w] = (packed >> np.uint64(8 * w)) & np.uint64(0xFF)
                    for c in range(dim if escaped else 0):
                        if sym_row[c] == ESCAPE:  # no symbol of an element that is not escaped is ESCAPE
                            escapes[ep] = np.int64(row[c]) >> low
                            ep += 1
                block_to_rows(q, q64, i0, n, symbols, wide, offs)
        return escapes, mantissa

    @njit(nogil=True, cache=True, parallel=True)
    def merge(span, stride, tokens, dim, symbols, wide, row_offset, base, flip, escapes, esc_start,  # type: ignore[no-untyped-def]
              raw):
        """Inverse of ``split`` into bits ``[tiles, tokens, dim]``, the tiles of ``span`` at ``stride``
        (:func:`tile_span`); ``wide``: ``symbols`` as words (:func:`~kvpack.codecs.common.as_words`). False if the
        stream is inconsistent (a symbol whose exponent would be negative, or a tile whose escape symbols do not
        match its escape count).

        Per block of :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens the symbol rows are transposed to ``[token,
        channel]`` (:func:`~kvpack.codecs.common.rows_to_block`); per token, the packed partial raw bits are first
        spread to one byte per channel, then one loop over contiguous channels computes every element's top bits
        from its symbol in arithmetic and writes it, with no branch and no table; a
        token holding an escape or an invalid symbol is redone element by element. Against the former merge (a
        ``[dim, 256]`` table of top bits built per tile, symbols read row by row, bits unpacked per element),
        on 1,024 tokens of each of two real SmolLM2 bf16 caches in 256-token chunks: 74.0 -> 43.7 ms on one thread,
        55.8 -> 37.3 on two (2-core Zen 3, identical bits; ``docs/results/zen3/lossless_kernels_ab.py``)."""
        tiles = base.size // dim
        row_bytes = dim * whole + (dim + 7) // 8 * part
        n_blocks = (dim + 7) // 8
        bad = np.zeros(tiles, np.bool_)
        for tile in prange(tiles):
            r0 = tile * dim
            offs = row_offset[r0 : r0 + dim]
            top_base = np.empty(dim, np.int32)
            sign_flip = np.empty(dim, np.int32)
            for c in range(dim):
                top_base[c] = base[r0 + c]
                sign_flip[c] = np.int32(flip[r0 + c]) << (exp_bits + k)
            q, q64 = symbol_block(dim)
            spread64 = np.zeros(n_blocks, np.uint64)
            spread = spread64.view(np.uint8)  # per channel its partial raw bits
            ep = esc_start[tile]
            end = esc_start[tile + 1]
            good = True
            m = raw[tile]
            o = span[tile * stride : tile * stride + tokens * dim].reshape(tokens, dim)
            for i0 in range(0, tokens, BLOCK_TOKENS):
                n = min(BLOCK_TOKENS, tokens - i0)
                rows_to_block(symbols, wide, offs, i0, n, q, q64)
                for i in range(n):
                    t = i0 + i
                    p = t * row_bytes
                    q0 = p + dim * whole
                    for b in range(n_blocks if part else 0):
                        packed = np.uint64(_partial(m, q0 + b * part, part))
                        word = np.uint64(0)
                        for j in range(8):
                            word |= ((packed >> np.uint64(part * j)) & np.uint64(pmask)) << np.uint64(8 * j)
                        spread64[b] = word
                    odd = np.int32(0)  # negative if the token has an invalid symbol or an escape
                    sym_row = q[i]
                    out_row = o[t]
                    for c in range(dim):
                        sym = np.int32(sym_row[c])
                        e = top_base[c] - (sym >> (k + 1))
                        odd |= e | -((sym + 1) >> 8)
                        top = ((((sym >> k) & 1) << (exp_bits + k)) ^ sign_flip[c]) | (e << k) | (sym & kmask)
                        rest = np.uint32(spread[c]) << (8 * whole)
                        for w in range(whole):
                            rest |= np.uint32(m[p + c * whole + w]) << (8 * w)
                        out_row[c] = (np.uint32(top) << low) | (rest << shift)
                    if odd >= 0:
                        continue
                    q0 = p + dim * whole
                    for c0 in range(0, dim, 8):
                        packed = _partial(m, q0, part)
                        q0 += part
                        for j in range(min(8, dim - c0)):
                            c = c0 + j
                            sym = np.int64(sym_row[c])
                            top = -2 if sym == ESCAPE else _top(sym, np.int64(top_base[c]), np.int64(flip[r0 + c]),
                                                                exp_bits, k)
                            ep, ok = _put(o, t, c, top, packed, j, m, p, escapes, ep, end, low, shift, whole, part,
                                          pmask)
                            good &= ok
            bad[tile] = not good or ep != end
        return not bad.any()

    return split, merge


#: Names of the sections :func:`encode_bits` writes (a codec may prefix them).
SECTIONS = ("rows", "classes", "symbols", "escapes", "mantissa")


@dataclass(frozen=True)
class BitSplit:
    """Float bits ``[groups, heads, tokens, dim]`` split into the fields :func:`encode_bits` stores (module docstring).

    ``base``, ``flip``: uint8 ``[tiles * dim]`` (tiles ``(group, head)``); ``n_esc``: int64 ``[tiles]``; ``shift``: the
    mantissa shift; ``symbols``: uint8 ``[groups, heads * dim, tokens]``, the rows the rANS stream codes;
    ``escapes``: uint16 ``[n]``; ``mantissa``: uint8 ``[1 + tiles * tokens * row_bytes]``, the ``mantissa`` section
    (the shift byte, then the raw low bits ``[tiles, tokens * row_bytes]``).
    """

    base: np.ndarray
    flip: np.ndarray
    n_esc: np.ndarray
    shift: int
    symbols: np.ndarray
    escapes: np.ndarray
    mantissa: np.ndarray


def split_bits(bits: np.ndarray, dtype: str) -> BitSplit:
    """Split bits ``[groups, heads, tokens, dim]`` of ``dtype`` (as :func:`encode_bits`) before entropy coding."""
    exp_bits, man_bits, k = FIELDS[dtype]
    groups, heads, tokens, dim = bits.shape
    span, stride = tile_span(bits.reshape(groups * heads, tokens, dim))  # a chunk of a longer cache: no copy
    base, flip, n_esc, low_bits = _row_stats(_narrow(dtype))(
        span, stride, groups * heads, tokens, dim, exp_bits, man_bits, 255 >> (k + 1), (1 << (man_bits - k)) - 1)
    zeros = (low_bits & -low_bits).bit_length() - 1 if low_bits else man_bits - k
    shift = zeros // 8 * 8  # whole zero bytes only: at most 3 kernel variants per dtype to compile
    esc_start = np.zeros(n_esc.size + 1, np.int64)
    np.cumsum(n_esc, out=esc_start[1:])
    symbols = np.empty(groups * heads * dim * tokens, np.uint8)
    escapes, mantissa = _kernels(dtype, shift)[0](span, stride, tokens, dim, base, flip, esc_start, symbols,
                                                  as_words(symbols))
    return BitSplit(base, flip, n_esc, shift, symbols.reshape(groups, heads * dim, tokens), escapes, mantissa)


def encode_bits(bits: np.ndarray, dtype: str, classes: int) -> dict[str, bytes | memoryview]:
    """Losslessly code float bit patterns (scheme and sections in the module docstring).

    Args:
        bits: ``[groups, heads, tokens, dim]`` uint16 (bf16, fp16) or uint32 (fp32) bit patterns of ``dtype``; a
            row is ``(group, head, channel)`` over the tokens, and each group gets its own class tables (for a KV
            cache the groups are (layer, K/V)).
        dtype: ``bfloat16``, ``float16`` or ``float32``.
        classes: tables per group (:data:`kvpack.codecs.common.CLASS_CHOICES`).

    Returns:
        The sections named in :data:`SECTIONS`.
    """
    s = split_bits(bits, dtype)
    blob, class_ids = encode_rows(s.symbols, 256, classes)
    return {
        "rows": s.base.tobytes() + np.packbits(s.flip).tobytes(),
        "classes": class_ids,
        "symbols": blob,
        "escapes": encode_varints(s.n_esc).tobytes() + s.escapes.astype("<u2").tobytes(),
        "mantissa": s.mantissa.data,
    }


def bits_sizes(shape: tuple[int, int, int, int], dtype: str, classes: int, prefix: str = "") -> dict[str, Size]:
    """Byte lengths of the sections :func:`encode_bits` writes for bits ``[groups, heads, tokens, dim]`` (named
    ``prefix + name``): exact for ``rows``, bounded for the others (``mantissa`` depends on its shift byte and
    ``escapes`` on its counts, which :func:`decode_bits` checks exactly)."""
    _, man_bits, k = FIELDS[dtype]
    groups, heads, tokens, dim = shape
    tiles, n_rows, low = groups * heads, groups * heads * dim, man_bits - k
    mantissa = [1 + tiles * tokens * (dim * ((low - shift) // 8) + (dim + 7) // 8 * ((low - shift) % 8))
                for shift in range(0, low + 1, 8)]
    return {f"{prefix}rows": exact(n_rows + (n_rows + 7) // 8),
            f"{prefix}escapes": Size(tiles, 9 * tiles + 2 * n_rows * tokens),
            f"{prefix}mantissa": Size(min(mantissa), max(mantissa)),
            **rows_sizes((groups, heads * dim, tokens), 256, classes, prefix)}


@dataclass(frozen=True)
class BitSections:
    """The sections of :func:`encode_bits`, parsed and checked (:func:`read_bits`); what a merge kernel reads.

    ``base``, ``flip``: uint8 ``[rows]``; ``shift``: the mantissa shift; ``raw``: uint8 ``[tiles, tokens *
    row_bytes]``; ``esc_start``: int64 ``[tiles + 1]``; ``escapes``: uint16 ``[n]``; ``stream``: the symbol lanes;
    ``row_offset``: int64 ``[rows]``, where each row starts in the decoded symbols.
    """

    base: np.ndarray
    flip: np.ndarray
    shift: int
    raw: np.ndarray
    esc_start: np.ndarray
    escapes: np.ndarray
    stream: LaneStream
    row_offset: np.ndarray


def decode_bits(sections: Mapping[str, memoryview], out: np.ndarray, dtype: str, classes: int) -> None:
    """Inverse of :func:`encode_bits`: fill ``out [groups, heads, tokens, dim]`` (the bit patterns, uint16/uint32;
    each ``[tokens, dim]`` tile contiguous, the tiles at any stride: a token slice of a longer buffer qualifies).

    Raises:
        FormatError: a section whose size or content does not fit ``out``'s shape (never reads out of bounds).
        ValueError: ``out``'s tiles are not each contiguous.
    """
    groups, heads, tokens, dim = out.shape
    tiles = out.reshape(groups * heads, tokens, dim)
    span, stride = tile_span(tiles)
    if tiles.size and not (np.may_share_memory(tiles, out) and np.may_share_memory(span, tiles)):
        raise ValueError("decode_bits writes each [tokens, dim] tile of out in place: they must be contiguous")
    p = read_bits(sections, out.shape, dtype, classes)
    s = p.stream
    symbols = decode_lanes(s.words, s.word_offsets, s.lane_starts, s.lane_table, s.freqs)
    merge = _kernels(dtype, p.shift)[1]
    if not merge(span, stride, tokens, dim, symbols, as_words(symbols), p.row_offset, p.base, p.flip, p.escapes,
                 p.esc_start, p.raw):
        raise FormatError("lossless symbols do not match their exponents or escapes: the stream is corrupted")


def read_bits(sections: Mapping[str, memoryview], shape: tuple[int, ...], dtype: str, classes: int) -> BitSections:
    """Everything :func:`decode_bits` reads and checks before decoding symbols, for bits ``shape [groups, heads,
    tokens, dim]`` (shared with the GPU decoder); :class:`FormatError` as :func:`decode_bits`."""
    exp_bits, man_bits, k = FIELDS[dtype]
    groups, heads, tokens, dim = shape
    tiles, n_rows = groups * heads, groups * heads * dim
    rows = sections["rows"]
    if len(rows) != n_rows + (n_rows + 7) // 8:
        raise FormatError(f"rows section has {len(rows)} bytes, expected {n_rows + (n_rows + 7) // 8}")
    base = np.frombuffer(rows, np.uint8, count=n_rows)
    flip = np.unpackbits(np.frombuffer(rows, np.uint8, offset=n_rows), count=n_rows)
    low = man_bits - k
    mantissa = np.frombuffer(sections["mantissa"], np.uint8)
    shift = int(mantissa[0]) if mantissa.size else -1
    if not (0 <= shift <= low and shift % 8 == 0):
        raise FormatError(f"mantissa section must start with a shift in 0..{low}, a multiple of 8")
    row_bytes = dim * ((low - shift) // 8) + (dim + 7) // 8 * ((low - shift) % 8)
    raw = mantissa[1:]
    if raw.size != tiles * tokens * row_bytes:
        raise FormatError(f"mantissa section has {raw.size} bytes past its shift, not {tiles * tokens * row_bytes}")
    esc_start, escapes = _read_escapes(sections["escapes"], tiles, tokens * dim)
    if (base.size and int(base.max()) >> exp_bits) or (escapes.size and int(escapes.max()) >> (1 + exp_bits + k)):
        raise FormatError(f"an exponent in the rows or escapes sections does not fit {exp_bits} bits")
    stream, row_offset = rows_stream(sections["symbols"], sections["classes"], (groups, heads * dim, tokens), 256,
                                     classes)
    return BitSections(base, flip, shift, raw.reshape(tiles, tokens * row_bytes), esc_start, escapes, stream,
                       row_offset)


@register
@dataclass(frozen=True)
class LosslessCodec(Codec):
    """Bit-exact storage of fp32 / fp16 / bf16 KV caches (scheme in the module docstring).

    Shapes: keys and values ``[num_kv_heads, tokens, head_dim]`` per layer; decoded tensors are views of one
    ``[2 * num_layers, num_kv_heads, tokens, head_dim]`` buffer (keys of layer ``i`` at ``2i``, values at ``2i+1``).

    Parameters:
        classes: exponent tables per (layer, K/V): rows (channels) are clustered into this many classes, each with
            its own rANS table. 1, 2, 4, 8 or 16; 4 measured best on SmolLM2 at 256- and 1536-token chunks.

    Error bound: none; decode returns exactly the input bits.
    """

    name = "lossless"
    version = 1
    classes: int = 4

    def __post_init__(self) -> None:
        check_classes(self.classes)

    def encode_payload(self, kv: KVCache) -> Payload:
        wide = kv.spec.dtype == "float32"
        spec = kv.spec
        data = int_view(kv.data).numpy().view(np.uint32 if wide else np.uint16)  # any strides: split_bits reads them
        bits = data.reshape(2 * spec.num_layers, spec.num_kv_heads, kv.num_tokens, spec.head_dim)
        with threads_for(bits.size):
            sections = encode_bits(bits, kv.spec.dtype, self.classes)
        return Payload(meta={"dtype": kv.spec.dtype}, sections=sections)

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        if meta != {"dtype": spec.dtype}:
            raise FormatError(f"lossless payload holds {meta.get('dtype')!r} (meta {dict(meta)}), but the model's KV "
                              f"is {spec.dtype}")
        shape = (2 * spec.num_layers, spec.num_kv_heads, num_tokens, spec.head_dim)
        return bits_sizes(shape, spec.dtype, self.classes)

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        shape = (2 * spec.num_layers, spec.num_kv_heads, num_tokens, spec.head_dim)
        data, tiles, _, _ = out_buffer(shape, spec.dtype, out)
        with threads_for(tiles.size):
            decode_bits({name: container.section(name) for name in SECTIONS}, tiles.reshape(shape), spec.dtype,
                        self.classes)
        return data.view(spec.buffer_shape(num_tokens))


def _read_escapes(data: memoryview, tiles: int, per_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse the escapes section: ``(esc_start int64 [tiles + 1], values uint16 [n])``; FormatError if malformed."""
    raw = np.frombuffer(data, np.uint8)
    if tiles > raw.size:
        raise FormatError(f"escapes section of {raw.size} bytes cannot hold {tiles} counts")
    counts, pos = decode_varints(raw, 0, tiles, per_tile)
    if pos < 0 or (raw.size - pos) != 2 * int(counts.sum()):
        raise FormatError("escapes section is malformed (bad counts, or values that do not match them)")
    esc_start = np.zeros(tiles + 1, np.int64)
    np.cumsum(counts, out=esc_start[1:])
    return esc_start, raw[pos:].view("<u2").astype(np.uint16)
