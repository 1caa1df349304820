"""`kivi`: KIVI asymmetric low-bit quantization (keys per channel, values per token), symbols coded with rANS.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024, arXiv 2402.02750): keys
have outlier *channels*, so they are quantized per channel over groups of ``group`` consecutive tokens; values have
no such structure and are quantized per token over groups of ``group`` consecutive channels. Each group stores its
minimum ``m`` and step ``s = (max - m) / (2**bits - 1)`` (float16, as in the paper) and every element the integer
``q = round((x - m) / s)`` in ``0 .. 2**bits - 1``. The paper keeps the most recent ``residual`` tokens (128) in
full precision; kvpack also keeps ``sink`` attention-sink tokens exact (REFERENCES.md §9: compressing the first
tokens of a sequence costs far more quality than their size).

In a stored chunk, *sink* tokens are the leading tokens whose absolute position is below ``sink`` (only the first
chunk of a sequence has any), and *residual* tokens are the chunk's last ``residual`` tokens. Both are stored as they
are (the cache dtype); the tokens between are quantized (a last key group shorter than ``group`` is allowed, as is a
last value group when ``head_dim`` is not a multiple of ``group``). The symbols, one row per
``(layer, K/V, head, channel)`` over the quantized tokens, are entropy coded with rANS (tables per (layer, K/V,
class), :mod:`kvpack.codecs.common`), which the paper does not do (it bit-packs).

The group minima and steps are the paper's float16 values, stored losslessly with the ``lossless`` codec's scheme
(:func:`kvpack.codecs.lossless.encode_bits`): 70-77% of their raw size on SmolLM2, which takes KIVI-2 from 5.8x to
6.5x on 1536-token chunks without changing a decoded value.

Sections: ``key_params.*`` (the five sections of :func:`~kvpack.codecs.lossless.encode_bits` for the key minima and
steps, ``[layers, 2 (minimum, step), heads, key groups, head_dim]``), ``value_params.*`` (value minima and steps,
``[layers, 2, heads, quantized tokens, value groups]``), ``classes`` and ``symbols`` (the quantized elements, rows
``(layer, K/V, head, channel)`` over the quantized tokens), ``exact`` (per layer keys then values
``[heads, sink + residual tokens, head_dim]`` in the cache dtype).
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
from kvpack.codecs.half import bits_of, f16_toward, f16_value
from kvpack.codecs.lossless import SECTIONS, bits_sizes, decode_bits, encode_bits
from kvpack.codecs.raw import tensor_bytes
from kvpack.codecs.validate import Size, exact, json_int
from kvpack.errors import CodecError, FormatError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

BITS = (2, 3, 4)
#: Class tables per group when the group minima and steps are coded losslessly (2: best on SmolLM2, 256-1536 tokens).
PARAM_CLASSES = 2


@njit(nogil=True, cache=True, parallel=True)
def _group_ranges(x: np.ndarray, heads: int, first: int, count: int, group: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Minima and maxima (float64) of the key groups ``[L, H, D, gk]`` and value groups ``[L, H, count, gv]``, and
    how many values of the whole cache (exact tokens too) are infinite or NaN (counted here rather than by
    ``np.isfinite``, a second pass over the 12 MB of a 256-token chunk; for the quantized tokens in the same pass as
    their extremes).

    ``x [2L * H, tokens, D]`` (float32) with tiles ordered (layer, K/V, head); tokens ``first .. first + count``.
    """
    tiles, tokens, dim = x.shape
    layers = tiles // (2 * heads)
    gk = (count + group - 1) // group
    gv = (dim + group - 1) // group
    kmin = np.full((layers, heads, dim, gk), np.inf)
    kmax = np.full((layers, heads, dim, gk), -np.inf)
    vmin = np.full((layers, heads, count, gv), np.inf)
    vmax = np.full((layers, heads, count, gv), -np.inf)
    special = np.zeros(tiles, np.int64)
    for tile in prange(tiles):
        layer, kind, h = tile // (2 * heads), (tile // heads) % 2, tile % heads
        # local accumulators, updated in the same order as before (a min/max of -0.0 and 0.0 keeps the first), in
        # float32: exact (the values are float32), and twice the lanes of float64 per vector
        lo = np.empty(dim, np.float32)
        hi = np.empty(dim, np.float32)
        odd = 0
        for t in range(tokens - count):  # the exact tokens here, the quantized ones in the loop below
            bits = x[tile, t if t < first else t + count].view(np.uint32)
            for c in range(dim):
                odd += (bits[c] & 0x7F800000) == 0x7F800000
        for i in range(count):
            row = x[tile, first + i]
            bits = row.view(np.uint32)
            for c in range(dim):
                odd += (bits[c] & 0x7F800000) == 0x7F800000
            if kind == 0:
                if i % group == 0:
                    lo[:] = np.inf
                    hi[:] = -np.inf
                for c in range(dim):
                    lo[c] = min(lo[c], row[c])
                    hi[c] = max(hi[c], row[c])
                if i % group == group - 1 or i == count - 1:
                    kmin[layer, h, :, i // group] = lo
                    kmax[layer, h, :, i // group] = hi
            else:  # a group's channels into scalars, then one store: in place on the 4-D arrays it was 2x slower
                for c0 in range(0, dim, group):
                    low, high = np.float32(np.inf), np.float32(-np.inf)
                    for c in range(c0, min(c0 + group, dim)):
                        low = min(low, row[c])
                        high = max(high, row[c])
                    vmin[layer, h, i, c0 // group] = low
                    vmax[layer, h, i, c0 // group] = high
        special[tile] = odd
    return kmin, kmax, vmin, vmax, special.sum()


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _quantize(x: np.ndarray, heads: int, first: int, count: int, group: int, levels: int, kmin: np.ndarray,
              kstep: np.ndarray, vmin: np.ndarray, vstep: np.ndarray, out: np.ndarray, wide: np.ndarray) -> None:
    """Symbols into ``out [rows * count]`` (uint8, row = tile * D + channel; allocated by numpy, which asks for huge
    pages on large arrays; ``wide``: its words, :func:`~kvpack.codecs.common.as_words`): ``clip(round((x - m) / s),
    0, levels - 1)``.

    A token's channels are quantized together, against their groups' minima and steps gathered once per token
    (values) or per key group, into a ``[tokens, channels]`` block of up to
    :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens that is then transposed into the rows
    (:func:`~kvpack.codecs.common.block_to_rows`; numpy's error model: no zero-division check; the ``s > 0`` test
    keeps its meaning). 3.1 -> 2.1 ms per 256-token chunk against a branch per element and a division per channel
    for the value groups (in-process A/B, identical symbols)."""
    tiles, _, dim = x.shape
    top = levels - 1.0
    for tile in prange(tiles):
        layer, kind, h = tile // (2 * heads), (tile // heads) % 2, tile % heads
        q, q64 = symbol_block(dim)  # the block, and as words for block_to_rows
        offs = np.arange(tile * dim, (tile + 1) * dim) * count
        m = np.empty(dim)
        s = np.empty(dim)
        for i0 in range(0, count, BLOCK_TOKENS):
            n = min(BLOCK_TOKENS, count - i0)
            for i in range(n):
                t = i0 + i
                if kind == 0 and (i == 0 or t % group == 0):
                    m[:] = kmin[layer, h, :, t // group]
                    s[:] = kstep[layer, h, :, t // group]
                elif kind == 1:
                    for c0 in range(0, dim, group):  # by group: an integer division per channel cost a third
                        mv, sv = vmin[layer, h, t, c0 // group], vstep[layer, h, t, c0 // group]
                        for c in range(c0, min(c0 + group, dim)):
                            m[c] = mv
                            s[c] = sv
                row = x[tile, first + t]
                qi = q[i]
                for c in range(dim):  # computed for every channel, then selected: the loop vectorizes
                    v = min(max(np.rint((np.float64(row[c]) - m[c]) / s[c]), 0.0), top)
                    qi[c] = np.uint8(v) if s[c] > 0 else np.uint8(0)
            block_to_rows(q, q64, i0, n, out, wide, offs)


def _decoder(kind: int) -> Any:
    """The reconstruction kernel for output kind ``kind`` (``common.OUT_KINDS``), with the kind as a constant."""

    @njit(nogil=True, cache=True, parallel=True)
    def reconstruct(span, stride, tokens, dim, heads, first, count, group, symbols,  # type: ignore[no-untyped-def]
                    wide, row_offset, kmin, kstep, vmin, vstep):
        """Quantized tokens ``first .. first + count`` of the bits ``[tiles, tokens, dim]`` that are the tiles of
        ``span`` at ``stride`` (:func:`~kvpack.codecs.common.tile_span`): ``m + q * s`` in float32, rounded to the
        cache dtype.

        Per block of up to :data:`~kvpack.codecs.common.BLOCK_TOKENS` tokens (inside one key group) the block's
        symbols are first transposed to ``[token, channel]``, so that every later loop runs over contiguous channels
        and vectorizes: a token's float32 values and their rounding to the cache dtype in one loop, the value's bits
        taken by :func:`~kvpack.codecs.half.bits_of` (1.79 -> 1.52 ms per 256-token chunk against a float32 array
        read back through an integer view, in-process A/B, identical output). (A table of each group's ``2**bits``
        values costs half a table entry per element and a gather per lookup: 1.7 ms of a 7.7 ms 256-token
        decode.)"""
        tiles = row_offset.size // dim
        for tile in prange(tiles):
            layer, is_value, h = tile // (2 * heads), (tile // heads) % 2, tile % heads
            offs = row_offset[tile * dim : (tile + 1) * dim]
            q, q64 = symbol_block(dim)  # the block, and as words for rows_to_block
            m = np.empty(dim, np.float32)
            s = np.empty(dim, np.float32)
            o = span[tile * stride : tile * stride + tokens * dim].reshape(tokens, dim)
            for g0 in range(0, count, group):
                if not is_value:
                    m[:] = kmin[layer, h, :, g0 // group]
                    s[:] = kstep[layer, h, :, g0 // group]
                for i0 in range(g0, min(g0 + group, count), BLOCK_TOKENS):
                    n = min(BLOCK_TOKENS, g0 + group - i0, count - i0)
                    rows_to_block(symbols, wide, offs, i0, n, q, q64)
                    for i in range(n):
                        if is_value:
                            for c0 in range(0, dim, group):
                                mv, sv = vmin[layer, h, i0 + i, c0 // group], vstep[layer, h, i0 + i, c0 // group]
                                for c in range(c0, min(c0 + group, dim)):
                                    m[c] = mv
                                    s[c] = sv
                        dst = o[first + i0 + i]
                        for c in range(dim):
                            dst[c] = float_bits(bits_of(m[c] + np.float32(q[i, c]) * s[c]), kind)

    return reconstruct


_DECODERS = {name: _decoder(kind) for name, kind in OUT_KINDS.items()}


def _param_bits(minima: np.ndarray, steps: np.ndarray, keys: bool) -> np.ndarray:
    """Group minima and steps (float16 ``[L, H, a, b]``) as the bit array :func:`encode_bits` codes:
    ``[2L, H, rows, channels]`` (per layer the minima then the steps) with the token groups of keys as its rows."""
    both = np.stack([minima, steps], axis=1)  # [L, 2, H, a, b]
    if keys:  # [L, 2, H, D, gk] -> channels over token groups, like the keys themselves
        both = both.transpose(0, 1, 2, 4, 3)
    layers, _, heads, rows, cols = both.shape
    return np.ascontiguousarray(both).reshape(2 * layers, heads, rows, cols).view(np.uint16)


def read_params(container: Container, prefix: str, shape: tuple[int, int, int, int], keys: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_param_bits` from the container's ``prefix.*`` sections: float32 minima and steps."""
    layers, heads, a, b = shape
    bits = np.empty((2 * layers, heads, b, a) if keys else (2 * layers, heads, a, b), np.uint16)
    decode_bits({name: container.section(f"{prefix}.{name}") for name in SECTIONS}, bits, "float16", PARAM_CLASSES)
    minima, steps, finite = _widen_params(bits.reshape(layers, 2, *bits.shape[1:]), keys)
    if not finite:
        raise FormatError("kivi group minima and steps must be finite")
    return minima, steps


@njit(nogil=True, cache=True)
def _widen_params(bits: np.ndarray, keys: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """float32 minima and steps ``[L, H, a, b]`` of float16 bits ``[L, 2, H, a, b]`` (keys: ``[L, 2, H, b, a]``,
    transposed here), and whether all are finite. One compiled pass in place of numpy's cast, transpose, finiteness
    check and copies (0.3 ms of a 7.7 ms 256-token decode)."""
    layers, _, heads, rows, cols = bits.shape
    a, b = (cols, rows) if keys else (rows, cols)
    out = np.empty((2, layers, heads, a, b), np.uint32)
    floats = out.view(np.float32)
    finite = True
    for layer in range(layers):
        for j in range(2):
            for h in range(heads):
                for r in range(rows):
                    for c in range(cols):
                        v = np.int64(bits[layer, j, h, r, c])
                        e, m = (v >> 10) & 0x1F, v & 0x3FF
                        finite &= e != 0x1F
                        at = (j, layer, h, c, r) if keys else (j, layer, h, r, c)
                        # float16 -> float32 exactly: rebias a normal exponent; a subnormal is m * 2**-24
                        out[at] = (v & 0x8000) << 16 | (e + 112) << 23 | m << 13
                        if e == 0:
                            sub = np.float32(m) * np.float32(2.0**-24)
                            floats[at] = -sub if v & 0x8000 else sub
    return floats[0], floats[1], finite


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _grid(lo: np.ndarray, hi: np.ndarray, levels: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The groups' minima ``m`` (the float16 at or below ``lo``) and steps ``s`` (the float16 at or above ``(hi - m)
    / levels``) of groups with extremes ``lo`` and ``hi`` (float64, same shape): ``(m, s)`` as float16 bits (uint16),
    then as float64, and whether all are finite. (numpy's error model: the division's zero check, with the inlined
    rounding, made the loop 5x slower.)"""
    low, high = lo.reshape(-1), hi.reshape(-1)
    # 1-D outputs, reshaped at the end: a version that wrote through reshaped views returned unwritten elements
    m16 = np.empty(low.size, np.uint16)
    s16 = np.empty(low.size, np.uint16)
    m64 = np.empty(low.size)
    s64 = np.empty(low.size)
    infinite = 0
    for i in prange(low.size):
        m = f16_toward(low[i], False)
        mv = f16_value(m)
        step = f16_toward((high[i] - mv) / levels, True)
        m16[i], s16[i], m64[i], s64[i] = m, step, mv, f16_value(step)
        infinite += (m & 0x7C00) == 0x7C00 or (step & 0x7C00) == 0x7C00
    shape = lo.shape
    return m16.reshape(shape), s16.reshape(shape), m64.reshape(shape), s64.reshape(shape), infinite == 0


@register
@dataclass(frozen=True)
class KiviCodec(Codec):
    """KIVI (Liu et al., arXiv 2402.02750): per-channel keys, per-token values, ``bits``-bit asymmetric groups.

    Shapes: keys and values ``[num_kv_heads, tokens, head_dim]`` per layer; key groups ``[layers, heads, head_dim,
    ceil(Tq / group)]``, value groups ``[layers, heads, Tq, ceil(head_dim / group)]`` with ``Tq`` the quantized
    tokens; decoded tensors are views of one ``[2 * num_layers, num_kv_heads, tokens, head_dim]`` buffer.

    Parameters:
        bits: 2, 3 or 4 bits per quantized element (before entropy coding).
        group: tokens per key group and channels per value group (paper: 32).
        sink: tokens at absolute positions below this are kept exact (default 4; REFERENCES.md §9).
        residual: the chunk's last ``residual`` tokens are kept exact (paper: 128 for the streaming window; default
            0 here, because a stored chunk's last tokens are not the ones a model is about to attend to most: a
            chunk is reused as history, and the live cache after it is exact anyway).
        classes: rANS tables per (layer, K/V) (1, 2, 4, 8 or 16).

    Error bound (every quantized element ``x`` of a group with stored minimum ``m`` and step ``s``, decoded ``x̂``;
    verified by the tests)::

        |x - x̂| <= s / 2  +  2**-23 * |x̂|  +  u * |x̂|

    ``m`` is ``min`` rounded down to float16 and ``s`` is ``(max - m) / (2**bits - 1)`` rounded up, so the grid
    ``m, m + s, ..., m + (2**bits - 1) s`` covers the group and rounding to it is off by at most ``s / 2``;
    ``2**-23 |x̂|`` is the float32 evaluation of ``m + q s``, and ``u |x̂|`` the rounding to the cache dtype
    (``u = 2**-8`` bfloat16, ``2**-11`` float16 plus ``2**-25`` absolute below ``2**-14``, 0 float32). Exact tokens
    (sinks, residual) decode bit-exactly. Caches with non-finite values, or values beyond float16's range (±65504),
    are refused (:class:`CodecError`).
    """

    name = "kivi"
    version = 1
    bits: int = 2
    group: int = 32
    sink: int = 4
    residual: int = 0
    classes: int = 4

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if not isinstance(self.group, int) or not 1 <= self.group <= 4096:
            raise ValueError(f"group must be an integer in 1..4096, got {self.group!r}")
        for attr in ("sink", "residual"):
            value = getattr(self, attr)
            if not isinstance(value, int) or not 0 <= value <= 1 << 20:
                raise ValueError(f"{attr} must be an integer in 0..{1 << 20}, got {value!r}")
        check_classes(self.classes)

    def _exact_counts(self, positions: torch.Tensor) -> tuple[int, int]:
        """(sink tokens, residual tokens) of a chunk with these absolute positions."""
        below = (positions < self.sink).to(torch.int64)
        n_sink = int(below.cumprod(0).sum()) if below.numel() else 0
        return n_sink, min(self.residual, positions.numel() - n_sink)

    def encode_payload(self, kv: KVCache) -> Payload:
        with threads_for(kv.num_tokens * kv.spec.elements_per_token):
            n_sink, n_res = self._exact_counts(kv.positions)
            groups, heads, tokens, dim = 2 * kv.spec.num_layers, kv.spec.num_kv_heads, kv.num_tokens, kv.spec.head_dim
            count = tokens - n_sink - n_res
            xs = stacked_float32(kv)
            kmin, kmax, vmin, vmax, special = _group_ranges(xs, heads, n_sink, count, self.group)
            if special:
                raise CodecError("kivi cannot encode a cache with NaN or infinite values; use the lossless codec")
            levels = (1 << self.bits) - 1
            params, values = [], []
            for lo, hi in ((kmin, kmax), (vmin, vmax)):
                m16, s16, m64, s64, finite = _grid(lo, hi, levels)
                if not finite:
                    raise CodecError("kivi stores group minima and steps in float16: values beyond ±65504 cannot be "
                                     "encoded; use the fp8 or lossless codec")
                params += [m16.view(np.float16), s16.view(np.float16)]
                values += [m64, s64]
            k_m, k_s, v_m, v_s = values
            symbols = np.empty(xs.shape[0] * dim * count, np.uint8)
            _quantize(xs, heads, n_sink, count, self.group, levels + 1, k_m, k_s, v_m, v_s, symbols, as_words(symbols))
            blob, classes = encode_rows(symbols.reshape(groups, heads * dim, count), levels + 1, self.classes)
            exact = torch.cat([kv.data[:, :, :, :n_sink], kv.data[:, :, :, tokens - n_res :]], dim=3)
            sections: dict[str, bytes | memoryview] = {"classes": classes, "symbols": blob,
                                                       "exact": tensor_bytes(exact)}
            for prefix, minima, steps in (("key_params", params[0], params[1]), ("value_params", params[2], params[3])):
                coded = encode_bits(_param_bits(minima, steps, prefix == "key_params"), "float16", PARAM_CLASSES)
                sections.update({f"{prefix}.{name}": data for name, data in coded.items()})
            return Payload(meta={"sink_tokens": n_sink, "residual_tokens": n_res}, sections=sections)

    def exact_meta(self, meta: Mapping[str, Any], num_tokens: int) -> tuple[int, int]:
        """``(sink tokens, residual tokens)`` from the meta: ints (never bools) that add up to at most the tokens."""
        if set(meta) != {"sink_tokens", "residual_tokens"}:
            raise FormatError(f"kivi meta has bad exact token counts: it must hold sink_tokens and residual_tokens "
                              f"only, got {sorted(meta)}")
        what = f"kivi meta has bad exact token counts {meta['sink_tokens']!r}, {meta['residual_tokens']!r} for " \
               f"{num_tokens} tokens:"
        n_sink = json_int(meta["sink_tokens"], f"{what} sink_tokens", 0, num_tokens)
        return n_sink, json_int(meta["residual_tokens"], f"{what} residual_tokens", 0, num_tokens - n_sink)

    def _group_counts(self, count: int, dim: int) -> tuple[int, int]:
        """Token groups per key channel and channel groups per value token, for ``count`` quantized tokens."""
        return -(-count // self.group), -(-dim // self.group)

    def read_groups(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int
                    ) -> tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """``(sink tokens, residual tokens, (key minima, key steps, value minima, value steps))`` of a stored chunk:
        the counts from its meta (:meth:`exact_meta`), the groups' minima and steps (float32) from its
        ``key_params.*`` sections ``[layers, heads, head_dim, key groups]`` and ``value_params.*`` sections
        ``[layers, heads, quantized tokens, value groups]``."""
        n_sink, n_res = self.exact_meta(meta, num_tokens)
        layers, heads, dim, count = spec.num_layers, spec.num_kv_heads, spec.head_dim, num_tokens - n_sink - n_res
        gk, gv = self._group_counts(count, dim)
        k_m, k_s = read_params(container, "key_params", (layers, heads, dim, gk), True)
        v_m, v_s = read_params(container, "value_params", (layers, heads, count, gv), False)
        return n_sink, n_res, (k_m, k_s, v_m, v_s)

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        n_sink, n_res = self.exact_meta(meta, num_tokens)
        layers, heads, dim, count = spec.num_layers, spec.num_kv_heads, spec.head_dim, num_tokens - n_sink - n_res
        gk, gv = self._group_counts(count, dim)
        return {"exact": exact(2 * layers * heads * (n_sink + n_res) * dim * spec.torch_dtype.itemsize),
                **rows_sizes((2 * layers, heads * dim, count), 1 << self.bits, self.classes),
                **bits_sizes((2 * layers, heads, gk, dim), "float16", PARAM_CLASSES, "key_params."),
                **bits_sizes((2 * layers, heads, count, gv), "float16", PARAM_CLASSES, "value_params.")}

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        with threads_for(num_tokens * spec.elements_per_token):
            n_sink, n_res, (k_m, k_s, v_m, v_s) = self.read_groups(meta, container, spec, num_tokens)
            layers, heads, dim, group = spec.num_layers, spec.num_kv_heads, spec.head_dim, self.group
            count = num_tokens - n_sink - n_res
            symbols, row_offset = decode_rows(container.section("symbols"), container.section("classes"),
                                              (2 * layers, heads * dim, count), 1 << self.bits, self.classes)
            data, tiles, span, stride = out_buffer((2 * layers, heads, num_tokens, dim), spec.dtype, out)
            n_exact = n_sink + n_res
            kept = np.frombuffer(container.section("exact"), tiles.dtype.newbyteorder("<"))
            kept = kept.reshape(2 * layers * heads, n_exact, dim)
            tiles[:, :n_sink] = kept[:, :n_sink]
            tiles[:, num_tokens - n_res :] = kept[:, n_sink:]
            _DECODERS[spec.dtype](span, stride, num_tokens, dim, heads, n_sink, count, group, symbols,
                                  as_words(symbols), row_offset, k_m, k_s, v_m, v_s)
            return data.view(spec.buffer_shape(num_tokens))
