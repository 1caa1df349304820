"""`kivi` on a GPU: symbols from the rANS kernel, the groups' value tables ``m + q * s`` built in float32 with torch
(a multiplication then an addition, as separate operations: no fused multiply-add, so the same numbers as the CPU),
then one Triton pass per K/V gathering each element's value and rounding it to the cache dtype with the CPU's bit
arithmetic. The exact (sink, residual) tokens are copied. The group minima and steps (``key_params.*``,
``value_params.*``: 1 / group of the elements) are decoded on the CPU. Identical values to the CPU decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvpack.codecs.base import Codec
from kvpack.codecs.common import OUT_KINDS, rows_stream
from kvpack.codecs.kivi import KiviCodec
from kvpack.entropy.rans_triton import decode_stream
from kvpack.format import Container
from kvpack.gpu.floats import to_bits
from kvpack.gpu.transfer import array, to_device
from kvpack.spec import ModelSpec

#: Tokens per program of the dequantization kernel.
BLOCK_TOKENS = 32


@triton.jit
def _dequant_kernel(  # type: ignore[no-untyped-def]
        out, symbols, row_offset, table, heads, tokens, first, count, dim, group, n_groups, levels,
        VALUES: tl.constexpr, KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    lh = tl.program_id(0).to(tl.int64)  # layer * heads + head
    tile = ((lh // heads) * 2 + VALUES) * heads + lh % heads
    i = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    cm = c < dim
    m = (i < count)[:, None] & cm[None, :]
    offs = tl.load(row_offset + tile * dim + c, mask=cm, other=0)
    q = tl.load(symbols + offs[None, :] + i[:, None], mask=m, other=0).to(tl.int64)
    if VALUES:
        g = (lh * count + i[:, None]) * n_groups + c[None, :] // group
    else:
        g = (lh * dim + c[None, :]) * n_groups + i[:, None] // group
    v = tl.load(table + g * levels + q, mask=m, other=0.0)
    u = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    dst = out + (tile * tokens + first + i[:, None]) * dim + c[None, :]
    tl.store(dst, to_bits(u, KIND).to(out.dtype.element_ty), mask=m)


def _table(minima: np.ndarray, steps: np.ndarray, levels: int, device: torch.device) -> torch.Tensor:
    """float32 ``[groups, levels]``: ``m + q * s`` per group, evaluated in float32 as the CPU kernel does."""
    m, s = array(minima.reshape(-1, 1), device), array(steps.reshape(-1, 1), device)
    q = torch.arange(levels, dtype=torch.float32, device=device)
    scaled = q * s
    return (m + scaled).contiguous()


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device``, bit-identical to the CPU decoder's."""
    assert isinstance(codec, KiviCodec)
    n_sink, n_res, (k_m, k_s, v_m, v_s) = codec.read_groups(meta, container, spec, num_tokens)
    layers, heads, dim, group = spec.num_layers, spec.num_kv_heads, spec.head_dim, codec.group
    count = num_tokens - n_sink - n_res
    stream, row_offset = rows_stream(container.section("symbols"), container.section("classes"),
                                     (2 * layers, heads * dim, count), 1 << codec.bits, codec.classes)
    symbols = decode_stream(stream, device)
    wide = spec.dtype == "float32"
    bits = torch.empty((2 * layers * heads, num_tokens, dim), dtype=torch.int32 if wide else torch.int16,
                       device=device)
    kept = to_device(container.section("exact"), device).view(bits.dtype).view(2 * layers * heads, n_sink + n_res,
                                                                                 dim)
    bits[:, :n_sink] = kept[:, :n_sink]
    bits[:, num_tokens - n_res :] = kept[:, n_sink:]
    if count:
        offsets = array(row_offset, device)
        levels = 1 << codec.bits
        for is_value, (m, s) in enumerate(((k_m, k_s), (v_m, v_s))):
            n_groups = m.shape[-1]
            grid = (layers * heads, triton.cdiv(count, BLOCK_TOKENS))
            _dequant_kernel[grid](bits, symbols, offsets, _table(m, s, levels, device), heads, num_tokens, n_sink,
                                  count, dim, group, n_groups, levels, VALUES=is_value, KIND=OUT_KINDS[spec.dtype],
                                  BLOCK_T=BLOCK_TOKENS, BLOCK_D=triton.next_power_of_2(dim))
    data = bits.view(spec.torch_dtype).view(spec.buffer_shape(num_tokens))
    return data if out is None else out.copy_(data)
