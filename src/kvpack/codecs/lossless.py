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
* the remaining ``M - k`` mantissa bits are stored raw (bf16: 6 bits, fp16: 8, fp32: 22).

Sections: ``rows`` (``base`` uint8 per row, then the ``flip`` bits packed MSB first), ``classes``, ``symbols`` (the
rANS blob; rows ordered ``(layer, K/V, head, channel)``, tokens inner), ``escapes`` (one LEB128 count per
``(layer, K/V, head)`` tile, then the values as uint16 little-endian, tile after tile, each tile in ``[token,
channel]`` order), ``mantissa`` (per tile and token, ``head_dim * W`` bytes, the ``W = (M - k) // 8`` whole low bytes
of each channel little-endian, then for every block of 8 channels ``P = (M - k) % 8`` bytes holding the next ``P``
bits of each, channel ``j`` of the block at bit ``P * j``, little-endian). Any bit pattern (NaN payloads, infinities,
-0, subnormals) round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.base import Codec, Payload, register
from kvpack.codecs.common import check_classes, decode_rows, encode_rows, out_buffer, threads_for
from kvpack.entropy.tables import decode_varints, encode_varints
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

#: (exponent bits E, mantissa bits M, top mantissa bits k coded in the symbol) per dtype; chosen so that the
#: ``M - 1 - k`` raw bits per element are whole bytes where the alphabet allows (fp16: 8).
FIELDS = {"bfloat16": (8, 7, 1), "float16": (5, 10, 2), "float32": (8, 23, 1)}
ESCAPE = 255


@njit(nogil=True, cache=True, parallel=True)
def _row_stats(bits: np.ndarray, exp_bits: int, man_bits: int, max_rel: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``bits [tiles, tokens, dim]``: largest exponent and majority-sign flag; escapes per tile."""
    tiles, tokens, dim = bits.shape
    base = np.zeros(tiles * dim, np.uint8)
    flip = np.zeros(tiles * dim, np.uint8)
    n_esc = np.zeros(tiles, np.int64)
    emask = (1 << exp_bits) - 1
    for tile in prange(tiles):
        top = np.zeros(dim, np.int64)
        neg = np.zeros(dim, np.int64)
        for t in range(tokens):
            for c in range(dim):
                v = np.int64(bits[tile, t, c])
                top[c] = max(top[c], (v >> man_bits) & emask)
                neg[c] += v >> (exp_bits + man_bits)
        esc = 0
        for t in range(tokens):
            for c in range(dim):
                esc += top[c] - ((np.int64(bits[tile, t, c]) >> man_bits) & emask) >= max_rel
        n_esc[tile] = esc
        for c in range(dim):
            base[tile * dim + c] = top[c]
            flip[tile * dim + c] = 2 * neg[c] > tokens
    return base, flip, n_esc


def _kernels(exp_bits: int, man_bits: int, k: int) -> tuple[Any, Any]:
    """The split and merge kernels for one float layout, compiled with its field widths as constants."""
    low = man_bits - k  # raw bits per element: ``whole`` bytes, then ``part`` bits in blocks of 8 channels
    whole, part = low // 8, low % 8
    pmask = (1 << part) - 1
    max_rel = 255 >> (k + 1)
    emask = (1 << exp_bits) - 1

    @njit(nogil=True, cache=True, parallel=True)
    def split(bits, base, flip, esc_start):  # type: ignore[no-untyped-def]
        """Symbols ``[rows, tokens]``, escapes ``[n]`` and raw low bits ``[tiles, tokens * row_bytes]``."""
        tiles, tokens, dim = bits.shape
        row_bytes = dim * whole + (dim + 7) // 8 * part
        symbols = np.empty((tiles * dim, tokens), np.uint8)
        escapes = np.empty(esc_start[-1], np.uint16)
        raw = np.empty((tiles, tokens * row_bytes), np.uint8)
        for tile in prange(tiles):
            r0 = tile * dim
            ep = esc_start[tile]
            m = raw[tile]
            x = bits[tile]
            for t in range(tokens):
                p = t * row_bytes
                q = p + dim * whole
                for c0 in range(0, dim, 8):
                    block = 0
                    for j in range(min(8, dim - c0)):
                        c = c0 + j
                        v = np.int64(x[t, c])
                        top = v >> low
                        rel = np.int64(base[r0 + c]) - ((top >> k) & emask)
                        if rel < max_rel:
                            sign = (top >> (exp_bits + k)) ^ np.int64(flip[r0 + c])
                            symbols[r0 + c, t] = (rel << (k + 1)) | (sign << k) | (top & ((1 << k) - 1))
                        else:
                            symbols[r0 + c, t] = ESCAPE
                            escapes[ep] = top
                            ep += 1
                        for w in range(whole):
                            m[p + c * whole + w] = (v >> (8 * w)) & 0xFF
                        block |= ((v >> (8 * whole)) & pmask) << (part * j)
                    for w in range(part):
                        m[q + w] = (block >> (8 * w)) & 0xFF
                    q += part
        return symbols, escapes, raw

    @njit(nogil=True, cache=True, parallel=True)
    def merge(out, symbols, row_offset, base, flip, escapes, esc_start, raw):  # type: ignore[no-untyped-def]
        """Inverse of ``split`` into ``out [tiles, tokens, dim]``; False if the stream is inconsistent (a symbol
        whose exponent would be negative, or a tile whose escape symbols do not match its escape count)."""
        tiles, tokens, dim = out.shape
        row_bytes = dim * whole + (dim + 7) // 8 * part
        bad = np.zeros(tiles, np.bool_)
        for tile in prange(tiles):
            r0 = tile * dim
            offs = row_offset[r0 : r0 + dim]
            # symbol -> top bits (sign, exponent, top mantissa bits) per channel; -1: invalid, -2: escape
            lut = np.empty((dim, 256), np.int16)
            for c in range(dim):
                b = np.int64(base[r0 + c])
                f = np.int64(flip[r0 + c])
                for sym in range(ESCAPE):
                    e = b - (sym >> (k + 1))
                    sign = ((sym >> k) & 1) ^ f
                    lut[c, sym] = (sign << (exp_bits + k)) | (e << k) | (sym & ((1 << k) - 1)) if e >= 0 else -1
                lut[c, ESCAPE] = -2
            ep = esc_start[tile]
            end = esc_start[tile + 1]
            wrong = False
            m = raw[tile]
            o = out[tile]
            for t in range(tokens):
                p = t * row_bytes
                q = p + dim * whole
                for c0 in range(0, dim, 8):
                    block = 0
                    for w in range(part):
                        block |= np.int64(m[q + w]) << (8 * w)
                    q += part
                    for j in range(min(8, dim - c0)):
                        c = c0 + j
                        top = np.int64(lut[c, symbols[offs[c] + t]])
                        if top < 0:
                            if top == -2 and ep < end:
                                top = np.int64(escapes[ep])
                            else:
                                wrong = True
                            ep += 1
                        rest = ((block >> (part * j)) & pmask) << (8 * whole)
                        for w in range(whole):
                            rest |= np.int64(m[p + c * whole + w]) << (8 * w)
                        o[t, c] = (top << low) | rest
            bad[tile] = wrong or ep != end
        return not bad.any()

    return split, merge


_KERNELS = {name: _kernels(*fields) for name, fields in FIELDS.items()}


def _int_view(t: torch.Tensor) -> np.ndarray:
    """The bits of a contiguous 16- or 32-bit float tensor as an unsigned numpy array (no copy)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().view(
        np.uint16 if t.element_size() == 2 else np.uint32)


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
        with threads_for(kv.num_tokens * kv.spec.elements_per_token):
            exp_bits, man_bits, k = FIELDS[kv.spec.dtype]
            split, _ = _KERNELS[kv.spec.dtype]
            bits = np.stack([_int_view(t) for pair in zip(kv.keys, kv.values, strict=True) for t in pair])
            groups, heads, tokens, dim = bits.shape
            bits = bits.reshape(groups * heads, tokens, dim)
            base, flip, n_esc = _row_stats(bits, exp_bits, man_bits, 255 >> (k + 1))
            esc_start = np.zeros(n_esc.size + 1, np.int64)
            np.cumsum(n_esc, out=esc_start[1:])
            symbols, escapes, raw = split(bits, base, flip, esc_start)
            blob, classes = encode_rows(symbols.reshape(groups, heads * dim, tokens), 256, self.classes)
            return Payload(meta={"dtype": kv.spec.dtype}, sections={
                "rows": base.tobytes() + np.packbits(flip).tobytes(),
                "classes": classes,
                "symbols": blob,
                "escapes": encode_varints(n_esc).tobytes() + escapes.astype("<u2").tobytes(),
                "mantissa": raw.tobytes(),
            })

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec,
                       num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if meta.get("dtype") != spec.dtype:
            raise FormatError(f"lossless payload holds {meta.get('dtype')!r}, but the model's KV is {spec.dtype}")
        exp_bits, man_bits, k = FIELDS[spec.dtype]
        groups, heads, dim = 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim
        tiles, n_rows = groups * heads, groups * heads * dim
        rows = container.section("rows")
        if len(rows) != n_rows + (n_rows + 7) // 8:
            raise FormatError(f"rows section has {len(rows)} bytes, expected {n_rows + (n_rows + 7) // 8}")
        base = np.frombuffer(rows, np.uint8, count=n_rows)
        flip = np.unpackbits(np.frombuffer(rows, np.uint8, offset=n_rows), count=n_rows)
        low = man_bits - k
        row_bytes = dim * (low // 8) + (dim + 7) // 8 * (low % 8)
        raw = np.frombuffer(container.section("mantissa"), np.uint8)
        if raw.size != tiles * num_tokens * row_bytes:
            raise FormatError(f"mantissa section has {raw.size} bytes, expected {tiles * num_tokens * row_bytes}")
        esc_start, escapes = _read_escapes(container.section("escapes"), tiles, num_tokens * dim)
        if (base.size and int(base.max()) >> exp_bits) or (escapes.size and int(escapes.max()) >> (1 + exp_bits + k)):
            raise FormatError(f"an exponent in the rows or escapes sections does not fit {exp_bits} bits")
        with threads_for(num_tokens * spec.elements_per_token):
            symbols, row_offset = decode_rows(container.section("symbols"), container.section("classes"),
                                              (groups, heads * dim, num_tokens), 256, self.classes)
            out, bits = out_buffer((groups, heads, num_tokens, dim), spec.dtype)
            if not _KERNELS[spec.dtype][1](bits.reshape(tiles, num_tokens, dim), symbols, row_offset, base, flip,
                                           escapes, esc_start, raw.reshape(tiles, num_tokens * row_bytes)):
                raise FormatError("lossless symbols do not match their exponents or escapes: the stream is corrupted")
        return list(out[0::2]), list(out[1::2])


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
