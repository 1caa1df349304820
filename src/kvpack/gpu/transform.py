"""`transform` / `kvtc` on a GPU: the entropy-coded coefficients' symbols from the rANS kernel, their escapes and
dequantization in torch on the device (the CPU decoder's float64 arithmetic, operation by operation), the
fixed-width blocks (int2/int4/int8/fp8, DEFLATE under kvtc) decoded on the CPU and copied, then the projection back
to the KV features as one GEMM per PCA group (``torch.addmm``) and RoPE on the device.

Exactness: the symbols and the normalized coefficients ``z`` are identical to the CPU's; the GEMM and RoPE round
differently on a GPU (summation order, fused multiply-adds), so decoded values agree with the CPU's within that
rounding, which the codec's error budget counts (docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvpack import entropy
from kvpack.codecs.base import Codec, _tokens_info
from kvpack.codecs.transform.codec import Transform, _inflate, _Layout
from kvpack.codecs.transform.features import place
from kvpack.codecs.transform.profile import TransformProfile
from kvpack.codecs.transform.quant import ESCAPE, fixed_bytes, fixed_decode, low_bits, rates, unpack_bits
from kvpack.entropy.rans_triton import decode_stream
from kvpack.entropy.tables import decode_varints
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.gpu.transfer import array
from kvpack.spec import ModelSpec


def _low(lows: np.ndarray, b: np.ndarray, tokens: int) -> np.ndarray:
    """The raw low bits of the high-resolution classes: int64 ``[n_ec, tokens]`` (CPU, from their section)."""
    need = sum((int((b == nb).sum()) * tokens * int(nb) + 7) // 8 for nb in np.unique(b) if nb)
    if lows.size != need:
        raise FormatError(f"low-bit section has {lows.size} bytes, expected {need}")
    low = np.zeros((b.size, tokens), np.int64)
    pos = 0
    for nb in np.unique(b):
        if nb:
            rows = b == nb
            size = (int(rows.sum()) * tokens * int(nb) + 7) // 8
            low[rows] = unpack_bits(lows[pos : pos + size], int(rows.sum()) * tokens, int(nb)).reshape(-1, tokens)
            pos += size
    return low


def _decode_layer(st: TransformProfile, lay: _Layout, data: list[memoryview], zs: list[torch.Tensor], tokens: int,
                  device: torch.device) -> None:
    """:meth:`Transform._decode_layer` with the entropy-coded part on ``device`` (same checks, same numbers)."""
    escapes, lows, fixed = (np.frombuffer(d, np.uint8) for d in data[1:])
    blob = data[0]
    n_ec = lay.ec_comp.size
    if n_ec and tokens:
        stream = entropy.parse(blob, max_symbols=n_ec * tokens, freqs=st.model)
        if not np.array_equal(stream.lane_starts, np.concatenate([[0], np.cumsum(lay.counts * tokens)])):
            raise FormatError("entropy-coded lanes do not match the preset's layout")
        high = decode_stream(stream, device).to(torch.int64).view(n_ec, tokens)
        esc = high == ESCAPE
        values, pos = decode_varints(escapes, 0, int(esc.sum()), 1 << 31)
        if pos != escapes.size:
            raise FormatError("escape section is malformed or has trailing bytes")
        high[esc] = array(values.astype(np.int64), device)
        b = low_bits()[lay.ec_class]
        u = (high << array(b, device)[:, None]) | array(_low(lows, b, tokens), device)
        q = torch.where(u & 1 == 1, -(u >> 1) - 1, u >> 1)  # unzigzag
        qf = q.to(torch.float32)
        shrink = array(st.shrink[lay.ec_class][:, None], device)
        pulled = qf - torch.sign(qf) * shrink
        z = (pulled.to(torch.float64) / array(rates()[lay.ec_class][:, None], device)).to(torch.float32)
        for g in range(len(zs)):
            sel = lay.ec_group == g
            zs[g][:, array(lay.ec_comp[sel], device)] = z[array(np.flatnonzero(sel), device)].T
    elif len(blob) or escapes.size or lows.size:
        raise FormatError("entropy-coded sections present where the preset has none")
    if st.recipe == "kvtc" and (lay.fixed or fixed.size):
        fixed = _inflate(fixed, sum(fixed_bytes(kind, gs, tokens, n) for _, _, n, kind, gs in lay.fixed))
    pos = 0
    for g, s, n, kind, gs in lay.fixed:
        size = fixed_bytes(kind, gs, tokens, n)
        if pos + size > fixed.size:
            raise FormatError("fixed-width section is truncated")
        zs[g][:, s : s + n] = array(fixed_decode(fixed[pos : pos + size], kind, gs, tokens, n), device)
        pos += size
    if pos != fixed.size:
        raise FormatError("fixed-width section has trailing bytes")


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device`` (values within GEMM rounding of the
    CPU decoder's)."""
    assert isinstance(codec, Transform)
    st = codec.state()
    preset, n_layers, coded = str(meta["preset"]), int(meta["layers"]), int(meta["coded"])
    _, positions, _ = _tokens_info(container.header, container)
    sink = positions < codec.sink_tokens
    if int((~sink).sum()) != coded:
        raise FormatError(f"payload codes {coded} tokens but {int((~sink).sum())} are not sinks")
    alloc = st.presets[preset]
    zs = [torch.zeros((coded, len(s)), dtype=torch.float32, device=device) for s in st.sigmas]
    for k, (lay, _, _) in enumerate(codec._plans(st, alloc, n_layers)):
        sections = [container.section(f"{p}{k}") for p in "exbi"]
        _decode_layer(st, lay, sections, zs, coded, device)
    x = torch.empty(coded, sum(len(g) for g in st.groups), device=device)
    for g in range(len(st.groups)):
        p = st.projection(alloc, g)
        z = zs[g][:, array(p.used, device)]
        y = torch.addmm(p.decode_bias.to(device), z, p.decode.to(device))  # the projection: one GEMM per group
        if p.columns is None:
            x.copy_(y)
        else:
            x[:, p.columns.to(device)] = y
    keys_s, values_s = codec._decode_sinks(container.section("sinks"), spec, int(sink.sum()), st.sink_format)
    data = torch.empty(spec.buffer_shape(num_tokens), dtype=spec.torch_dtype, device=device) if out is None else out
    place(x, positions[~sink], spec, data, (~sink).nonzero().squeeze(1))
    mask = sink.to(device)
    for layer in range(spec.num_layers):
        for kind, s in ((0, keys_s), (1, values_s)):
            data[layer, kind][:, mask] = s[layer].to(device)
    return data
