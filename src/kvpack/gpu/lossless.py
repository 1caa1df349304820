"""`lossless` on a GPU: exponent symbols from the rANS kernel, then one Triton pass merging them with the escapes
and the raw mantissa bytes into the bit patterns (the inverse of :func:`kvpack.codecs.lossless.encode_bits`).

One program per tile ``(layer, K/V, head)`` walks its tokens in order with the channels as its vector: an escape's
value is the next one of the tile's escape list (``[token, channel]`` order), found by a running count plus a prefix
sum over the channels of the token. Symbols that imply a negative exponent, escape counts that do not match the
tile's, are reported per tile and raise :class:`FormatError`, as on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvpack.codecs.base import Codec
from kvpack.codecs.lossless import ESCAPE, FIELDS, SECTIONS, LosslessCodec, read_bits
from kvpack.entropy.rans_triton import decode_stream
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.gpu.transfer import array
from kvpack.spec import ModelSpec

_ESCAPE = tl.constexpr(ESCAPE)  # Triton kernels read globals only when they are constexpr


@triton.jit
def _merge_kernel(  # type: ignore[no-untyped-def]
        out, symbols, row_offset, base, flip, escapes, esc_start, raw, bad, tokens, dim, row_bytes,
        EXP: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, SHIFT: tl.constexpr, WHOLE: tl.constexpr,
        PART: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    cm = c < dim
    row = tile * dim + c
    offs = tl.load(row_offset + row, mask=cm, other=0)
    b = tl.load(base + row, mask=cm, other=0).to(tl.int64)
    f = tl.load(flip + row, mask=cm, other=0).to(tl.int64)
    ep = tl.load(esc_start + tile)
    end = tl.load(esc_start + tile + 1)
    wrong = tl.zeros([BLOCK_D], tl.int32)
    for t in range(0, tokens):
        sym = tl.load(symbols + offs + t, mask=cm, other=0).to(tl.int64)
        e = b - (sym >> (K + 1))
        sign = ((sym >> K) & 1) ^ f
        top = (sign << (EXP + K)) | (e << K) | (sym & ((1 << K) - 1))
        esc = cm & (sym == _ESCAPE)
        count = esc.to(tl.int64)
        idx = ep + tl.cumsum(count, 0) - count
        value = tl.load(escapes + idx, mask=esc & (idx < end), other=0).to(tl.int64)
        wrong |= ((esc & (idx >= end)) | (cm & (esc == 0) & (e < 0))).to(tl.int32)
        top = tl.where(esc, value, top)
        ep += tl.sum(count, 0)
        p = raw + (tile * tokens + t) * row_bytes
        rest = tl.zeros([BLOCK_D], tl.int64)
        for w in tl.static_range(0, WHOLE):
            rest |= tl.load(p + c * WHOLE + w, mask=cm, other=0).to(tl.int64) << (8 * w)
        if PART > 0:
            bit = PART * (c % 8)
            q = p + dim * WHOLE + (c // 8) * PART + bit // 8
            two = cm & ((bit % 8) + PART > 8)
            pair = tl.load(q, mask=cm, other=0).to(tl.int64) | (tl.load(q + 1, mask=two, other=0).to(tl.int64) << 8)
            rest |= ((pair >> (bit % 8)) & ((1 << PART) - 1)) << (8 * WHOLE)
        bits = (top << LOW) | (rest << SHIFT)
        tl.store(out + (tile * tokens + t) * dim + c, bits.to(out.dtype.element_ty), mask=cm)
    tl.store(bad + tile, ((tl.max(wrong, 0) > 0) | (ep != end)).to(tl.int8))


def decode_bits(sections: Mapping[str, memoryview], shape: tuple[int, int, int, int], dtype: str, classes: int,
                device: torch.device) -> torch.Tensor:
    """:func:`kvpack.codecs.lossless.decode_bits` on ``device``: the bit patterns ``[groups, heads, tokens, dim]``
    as int16 (bf16, fp16) or int32 (fp32)."""
    exp_bits, man_bits, k = FIELDS[dtype]
    groups, heads, tokens, dim = shape
    tiles = groups * heads
    p = read_bits(sections, shape, dtype, classes)
    symbols = decode_stream(p.stream, device)
    wide = dtype == "float32"
    out = torch.empty(shape, dtype=torch.int32 if wide else torch.int16, device=device)
    if out.numel() == 0:
        return out
    low = man_bits - k
    whole, part = (low - p.shift) // 8, (low - p.shift) % 8
    row_bytes = dim * whole + (dim + 7) // 8 * part
    bad = torch.zeros(tiles, dtype=torch.int8, device=device)
    _merge_kernel[(tiles,)](out, symbols, array(p.row_offset, device), array(p.base, device), array(p.flip, device),
                            array(p.escapes.astype(np.int32), device), array(p.esc_start, device),
                            array(p.raw, device), bad, tokens, dim, row_bytes, EXP=exp_bits, K=k, LOW=low,
                            SHIFT=p.shift, WHOLE=whole, PART=part, BLOCK_D=triton.next_power_of_2(dim))
    if bool(bad.any()):
        raise FormatError("lossless symbols do not match their exponents or escapes: the stream is corrupted")
    return out


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device``, bit-identical to the CPU decoder's."""
    assert isinstance(codec, LosslessCodec)
    shape = (2 * spec.num_layers, spec.num_kv_heads, num_tokens, spec.head_dim)
    bits = decode_bits({name: container.section(name) for name in SECTIONS}, shape, spec.dtype, codec.classes,
                       device)
    data = bits.view(spec.torch_dtype).view(spec.buffer_shape(num_tokens))
    return data if out is None else out.copy_(data)
