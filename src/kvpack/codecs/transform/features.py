"""Whole-model KV vectors of the `transform` / `kvtc` codecs: per token the pre-RoPE keys and values of all layers and
KV heads, ``x [D]`` with ``D = 2 * layers * kv_heads * head_dim``, and the PCA groups over its features."""

from __future__ import annotations

import numpy as np
import torch

from kvpack import rope
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
    keys, values = kv.data[:, 0], kv.data[:, 1]  # [L, H, T, D]
    if rows is not None:
        keys, values = keys[:, :, rows], values[:, :, rows]
    pre = (rope.by_layer(lambda k, r: rope.unrotate(k, pos, r, spec.head_dim), keys, spec)
           if spec.rope.type != "none" else keys.float())
    out = torch.empty(pos.numel(), spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    both = out.permute(1, 2, 3, 0, 4)  # [L, 2, H, T, D], written in place: no stacked copy to permute
    both[:, 0] = pre
    both[:, 1] = values
    return out.reshape(pos.numel(), 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim)


def unfeatures(x: torch.Tensor, positions: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`features`: post-RoPE keys and values ``[layers, kv_heads, tokens, head_dim]`` (keys float32
    when rotated, values a view of ``x``, in its dtype)."""
    tokens, heads, dim = x.shape[0], spec.num_kv_heads, spec.head_dim
    per_layer = x.reshape(tokens, spec.num_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # [L, 2, H, T, D]
    keys = per_layer[:, 0]
    if spec.rope.type != "none":
        keys = rope.by_layer(lambda k, r: rope.rotate(k, positions, r, dim), keys, spec)
    return keys, per_layer[:, 1]

