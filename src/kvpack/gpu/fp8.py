"""`fp8` on a GPU: code symbols from the rANS kernel, then one Triton pass of dequantization: ``E4M3(code ^ flip) *
scale`` in float32 (one multiplication, exact as on the CPU), rounded to the cache dtype with the CPU's bit
arithmetic (:mod:`kvpack.gpu.floats`). Identical values to the CPU decoder (no GEMM involved)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvpack.codecs.base import Codec
from kvpack.codecs.common import OUT_KINDS, rows_stream
from kvpack.codecs.fp8 import E4M3_VALUES, Fp8Codec, read_rows
from kvpack.entropy.rans_triton import decode_stream
from kvpack.format import Container
from kvpack.gpu.floats import to_bits
from kvpack.gpu.transfer import array
from kvpack.spec import ModelSpec

#: Tokens per program of the dequantization kernel.
BLOCK_TOKENS = 32


@triton.jit
def _dequant_kernel(  # type: ignore[no-untyped-def]
        out, symbols, row_offset, scales, flips, values, tokens, dim, KIND: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    cm = c < dim
    m = (t < tokens)[:, None] & cm[None, :]
    row = tile * dim + c
    offs = tl.load(row_offset + row, mask=cm, other=0)
    scale = tl.load(scales + row, mask=cm, other=0.0)
    flip = tl.load(flips + row, mask=cm, other=0).to(tl.int32) * 0x80
    code = tl.load(symbols + offs[None, :] + t[:, None], mask=m, other=0).to(tl.int32) ^ flip[None, :]
    prod = tl.load(values + code, mask=m, other=0.0) * scale[None, :]
    u = prod.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    tl.store(out + (tile * tokens + t[:, None]) * dim + c[None, :], to_bits(u, KIND).to(out.dtype.element_ty), mask=m)


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device``, bit-identical to the CPU decoder's."""
    assert isinstance(codec, Fp8Codec)
    groups, heads, dim = 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim
    scales, flips = read_rows(container.section("rows"), groups * heads * dim)
    stream, row_offset = rows_stream(container.section("symbols"), container.section("classes"),
                                     (groups, heads * dim, num_tokens), 256, codec.classes)
    symbols = decode_stream(stream, device)
    bits = torch.empty((groups * heads, num_tokens, dim), dtype=torch.int32 if spec.dtype == "float32" else
                       torch.int16, device=device)
    if bits.numel():
        grid = (groups * heads, triton.cdiv(num_tokens, BLOCK_TOKENS))
        _dequant_kernel[grid](bits, symbols, array(row_offset, device), array(scales, device),
                              array(flips.astype(np.uint8), device), array(E4M3_VALUES, device), num_tokens, dim,
                              KIND=OUT_KINDS[spec.dtype], BLOCK_T=BLOCK_TOKENS, BLOCK_D=triton.next_power_of_2(dim))
    data = bits.view(spec.torch_dtype).view(spec.buffer_shape(num_tokens))
    return data if out is None else out.copy_(data)
