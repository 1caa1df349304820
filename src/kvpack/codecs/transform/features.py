"""Whole-model KV vectors of the `transform` / `kvtc` codecs: per token the pre-RoPE keys and values of all layers and
KV heads, ``x [D]`` with ``D = 2 * layers * kv_heads * head_dim``, and the PCA groups over its features.

:func:`features` (cache -> vectors, un-rotating keys) and :func:`place` (vectors -> a cache buffer, rotating keys)
run, for bf16 and float32 caches on the CPU, as fused numba kernels: one pass per (layer, K/V, head) that gathers a
token's channels, applies RoPE, changes the layout and (for :func:`place`) rounds to the cache's dtype, where the
torch expressions (kept for the other dtypes and for CUDA tensors) pass over the keys once each for a strided copy to
float32, the product with ``cos``, the two half-width ``sin`` terms, the cast and the index copy into the cache.
The kernels compute the same float32 arithmetic as :func:`kvpack.rope.rotate` (the product with ``cos`` rounded once,
then one fused multiply-add for the ``sin`` term: what torch's ``mul_`` and ``addcmul_`` compute; LLVM's ``fma``
here) and round to bf16 to nearest even, so their results equal the torch path's bit for bit (tested; NaN payloads
aside). No library fuses a rotation with a layout change, hence the hand-written kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from kvpack import rope
from kvpack.codecs.common import bit_tiles, threads_for
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec


def feature_groups(layers: int, width: int, grouping: str) -> list[np.ndarray]:
    """Feature indices of each PCA group: ``joint`` (one basis over K and V), ``kv`` (keys, then values) or
    ``layers:G`` (``G`` runs of consecutive layers, each one basis over its layers' K and V: a block-diagonal basis
    whose projection costs ``1/G`` of the joint one's multiply-adds per component).

    Feature order: for each layer, its keys ``[width = kv_heads * head_dim]`` (pre-RoPE) then its values.
    """
    index = np.arange(2 * layers * width).reshape(layers, 2, width)
    if grouping == "joint":
        return [index.reshape(-1)]
    if grouping == "kv":
        return [index[:, 0].reshape(-1), index[:, 1].reshape(-1)]
    runs = grouping.removeprefix("layers:")
    if runs != grouping and runs.isdigit() and 1 <= int(runs) <= layers:
        return [part.reshape(-1) for part in np.array_split(index, int(runs))]
    raise ValueError(f"grouping must be 'joint', 'kv' or 'layers:G' with 1 <= G <= {layers}, got {grouping!r}")


def features(kv: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[tokens, D]``: pre-RoPE keys and values of all layers and heads per token (``rows``: a token mask),
    features ordered ``(layer, K/V, head, channel)``."""
    spec = kv.spec
    pos = kv.positions if rows is None else kv.positions[rows]
    span = _span(kv.data)
    if span is not None:
        src = np.arange(kv.num_tokens, dtype=np.int64) if rows is None else rows.nonzero().squeeze(1).numpy()
        out = torch.empty(pos.numel(), spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
        with threads_for(out.numel()):
            _gather(*span, 16 if kv.data.dtype == torch.bfloat16 else 0, src,
                    *_tables(spec, pos, inverse=True), out.numpy())
        return out.reshape(pos.numel(), spec.elements_per_token)
    keys, values = kv.data[:, 0], kv.data[:, 1]  # [L, H, T, D]
    if rows is not None:
        keys, values = keys[:, :, rows], values[:, :, rows]
    pre = (rope.by_layer(lambda k, r: rope.unrotate(k, pos, r, spec.head_dim), keys, spec)
           if spec.rope.type != "none" else keys.float())
    out = torch.empty(pos.numel(), spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    both = out.permute(1, 2, 3, 0, 4)  # [L, 2, H, T, D], written in place: no stacked copy to permute
    both[:, 0] = pre
    both[:, 1] = values
    return out.reshape(pos.numel(), spec.elements_per_token)


def unfeatures(x: torch.Tensor, positions: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`features`: post-RoPE keys and values ``[layers, kv_heads, tokens, head_dim]`` (keys float32
    when rotated, values a view of ``x``, in its dtype)."""
    tokens, heads, dim = x.shape[0], spec.num_kv_heads, spec.head_dim
    per_layer = x.reshape(tokens, spec.num_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # [L, 2, H, T, D]
    keys = per_layer[:, 0]
    if spec.rope.type != "none":
        keys = rope.by_layer(lambda k, r: rope.rotate(k, positions, r, dim), keys, spec)
    return keys, per_layer[:, 1]


def place(x: torch.Tensor, positions: torch.Tensor, spec: ModelSpec, data: torch.Tensor,
          slots: torch.Tensor) -> None:
    """Write the tokens of vectors ``x [T, D]`` (float32 or bfloat16) at ``positions [T]`` into token slots ``slots
    [T]`` (int64) of the cache buffer ``data [layers, 2, kv_heads, N, head_dim]`` (the cache's dtype), keys
    rotated: what ``index_copy_`` of :func:`unfeatures`'s keys and values cast to ``data``'s dtype writes."""
    span = _span(data)
    if span is not None and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32):
        shape = (x.shape[0], spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
        with threads_for(x.numel()):
            _scatter(_bits(x).reshape(shape), 16 if x.dtype == torch.bfloat16 else 0,
                     *_tables(spec, positions, inverse=False), slots.numpy(), *span,
                     data.dtype == torch.bfloat16)
        return
    keys, values = unfeatures(x, positions, spec)
    for kind, part in ((0, keys), (1, values)):  # all layers at once: [L, H, T, D]
        data[:, kind].index_copy_(2, slots.to(data.device), part.to(data.dtype))


def _bits(t: torch.Tensor) -> np.ndarray:
    """The bits of a bf16 (uint16) or float32 (uint32) CPU tensor as a numpy array (a view, same strides)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else \
        t.view(torch.int32).numpy().view(np.uint32)


def _span(data: torch.Tensor) -> tuple[np.ndarray, int, int] | None:
    """A cache buffer ``[layers, 2, kv_heads, N, head_dim]`` for the fused kernels: its heads' bits as tiles ``[N,
    head_dim]`` (:func:`~kvpack.codecs.common.bit_tiles`: the span and the tile stride, views, so the kernels'
    writes reach ``data``) and ``N``; None where they do not serve it (not bf16 or float32 on the CPU, or heads
    whose tokens are not contiguous: torch's path). A chunk's slice of a longer cache qualifies."""
    if data.device.type != "cpu" or data.dtype not in (torch.bfloat16, torch.float32):
        return None
    viewed = bit_tiles(data)
    return None if viewed is None else (viewed[1], viewed[2], data.shape[-2])


def _tables(spec: ModelSpec, positions: torch.Tensor, inverse: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RoPE tables of the distinct RoPEs of ``spec``'s layers for the kernels: float32 ``cos, sin [G, T, R]``
    (:func:`kvpack.rope.rotation`, zero-padded to the largest rotary dim ``R``), int64 ``rdim [G]`` and each layer's
    table ``group [layers]``; ``R = 0`` for a model without RoPE."""
    tokens = positions.numel()
    if spec.rope.type == "none":
        empty = np.zeros((1, tokens, 0), np.float32)
        return empty, empty, np.zeros(1, np.int64), np.zeros(spec.num_layers, np.int64)
    ropes: list[Any] = []
    for layer in range(spec.num_layers):
        if spec.rope_of(layer) not in ropes:
            ropes.append(spec.rope_of(layer))
    group = np.array([ropes.index(spec.rope_of(layer)) for layer in range(spec.num_layers)], np.int64)
    tables = [rope.rotation(positions, r, spec.head_dim, inverse) for r in ropes]
    rdim = np.array([c.shape[1] for c, _ in tables], np.int64)
    cos = np.zeros((len(ropes), tokens, int(rdim.max())), np.float32)
    sin = np.zeros_like(cos)
    for g, (c, s) in enumerate(tables):
        cos[g, :, : c.shape[1]] = c.numpy()
        sin[g, :, : s.shape[1]] = s.numpy()
    return cos, sin, rdim, group


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """float32 ``a * b + c`` rounded once (LLVM ``llvm.fma.f32``)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(nogil=True, cache=True, inline="always")
def _turn_row(k, cos, sin, rdim, row):  # type: ignore[no-untyped-def]
    """``row = k * cos + rotate_half(k) * sin`` on the first ``rdim`` channels of float32 ``k [D]``, the rest
    copied (:func:`kvpack.rope.rotation`'s arithmetic)."""
    half = rdim // 2
    for c in range(half):
        row[c] = _fma(-k[c + half], sin[c], k[c] * cos[c])
    for c in range(half, rdim):
        row[c] = _fma(k[c - half], sin[c], k[c] * cos[c])
    for c in range(rdim, k.size):
        row[c] = k[c]


@njit(nogil=True, cache=True, parallel=True)
def _gather(data, stride, n, shift, src, cos, sin, rdim, group, out):  # type: ignore[no-untyped-def]
    """``out[t, l, kind, h] =`` token ``src[t]`` of the cache ``[L, 2, H, n, D]`` whose heads' bits are the tiles of
    ``data`` at ``stride`` (:func:`_span`), widened by ``<< shift``, as float32, keys un-rotated with the tables of
    layer ``l``."""
    _, layers, _, heads, dim = out.shape
    for item in prange(layers * 2 * heads):
        layer, kind, head = item // (2 * heads), (item // heads) % 2, item % heads
        g = group[layer]
        wide = np.empty(dim, np.uint32)
        k = wide.view(np.float32)
        rows = data[item * stride : item * stride + n * dim].reshape(n, dim)  # this head's tokens
        for t in range(src.size):
            line = rows[src[t]]
            for c in range(dim):
                wide[c] = np.uint32(line[c]) << shift
            if kind == 0:
                _turn_row(k, cos[g, t], sin[g, t], rdim[g], out[t, layer, kind, head])
            else:
                out[t, layer, kind, head] = k


@njit(nogil=True, cache=True, parallel=True)
def _scatter(x, shift, cos, sin, rdim, group, slots, data, stride, n, to_bf16):  # type: ignore[no-untyped-def]
    """Token ``t`` of vectors ``x [T, L, 2, H, D]`` (bits, widened by ``<< shift``) into slot ``slots[t]`` of the
    cache ``[L, 2, H, n, D]`` whose heads' bits are the tiles of ``data`` at ``stride`` (:func:`_span`; bf16 bits
    rounded to nearest even if ``to_bf16``, else float32 bits), keys rotated."""
    tokens, layers, _, heads, dim = x.shape
    for item in prange(layers * 2 * heads):
        layer, kind, head = item // (2 * heads), (item // heads) % 2, item % heads
        g = group[layer]
        wide = np.empty(dim, np.uint32)
        k = wide.view(np.float32)
        turned = np.empty(dim, np.float32)
        bits = turned.view(np.uint32)
        rows = data[item * stride : item * stride + n * dim].reshape(n, dim)  # this head's tokens
        for t in range(tokens):
            line = x[t, layer, kind, head]
            for c in range(dim):
                wide[c] = np.uint32(line[c]) << shift
            if kind == 0:
                _turn_row(k, cos[g, t], sin[g, t], rdim[g], turned)
            else:
                turned[:] = k
            dst = rows[slots[t]]
            for c in range(dim):
                u = bits[c]
                if not to_bf16:
                    dst[c] = u
                elif (u & 0x7FFFFFFF) > 0x7F800000:  # NaN
                    dst[c] = 0x7FC0
                else:
                    dst[c] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
