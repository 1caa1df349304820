"""`cachegen` on a GPU: symbols from the rANS kernel (one table per lane: the binary-search lookup), then the
reconstruction in torch on the device, the CPU kernel's arithmetic step for step: escapes (in lane order, which is
the symbols' order) replace their symbols, ``q = z + lo``, deltas add their group's anchor, ``mean + scale * q`` in
float64 (a multiplication then an addition: no fused multiply-add), clipped to the dtype's range, rounded to float32
and then to the cache dtype (round to nearest even, as on the CPU). Identical values to the CPU decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from kvpack.codecs.base import Codec
from kvpack.codecs.cachegen.codec import CacheGen, read_stream
from kvpack.codecs.cachegen.profile import GROUP_SIZE, ROLE_DELTA, ROLE_RAW
from kvpack.entropy.rans_triton import decode_stream
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.gpu.transfer import array
from kvpack.spec import ModelSpec


def _token_map(tokens: int, delta: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: its offset among the row's ``tokens`` symbols, its role, and its group's anchor offset."""
    t = np.arange(tokens)
    if not delta:
        return t, np.full(tokens, ROLE_RAW), t
    n_anchor = -(-tokens // GROUP_SIZE)
    g = t // GROUP_SIZE
    anchor = t % GROUP_SIZE == 0
    return np.where(anchor, g, n_anchor + t - g - 1), np.where(anchor, ROLE_RAW, ROLE_DELTA), g


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device``, bit-identical to the CPU decoder's."""
    assert isinstance(codec, CacheGen)
    t = codec.tables
    lvl = int(codec.level)
    stream, escapes, escape = read_stream(codec, meta, container, num_tokens)
    symbols = decode_stream(stream, device).view(t.rows, num_tokens).to(torch.int64)
    is_escape = symbols == escape
    if int(is_escape.sum()) != escapes.size:
        raise FormatError(f"cachegen symbols hold {int(is_escape.sum())} escapes, the header {escapes.size}")
    e = array(escapes, device)
    symbols[is_escape] = (e >> 1) ^ -(e & 1)
    offset, role, anchor = (array(a.astype(np.int64), device) for a in _token_map(num_tokens, codec.anchor_delta))
    lo = array(t.lo[lvl].astype(np.int64), device)  # [rows, 2]
    z = symbols[:, offset]  # [rows, tokens] in token order
    q = z + lo[:, role]
    if codec.anchor_delta:
        q = torch.where(role == ROLE_DELTA, q + q[:, anchor * GROUP_SIZE], q)
    limit = float(torch.finfo(spec.torch_dtype).max)
    scaled = array(t.scale(lvl).reshape(-1, 1), device) * q.to(torch.float64)
    value = (array(t.mean.reshape(-1, 1), device) + scaled).clamp_(-limit, limit).to(torch.float32)
    shape = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim, num_tokens)
    data = value.view(shape).transpose(3, 4).to(spec.torch_dtype)
    return data.contiguous() if out is None else out.copy_(data)
