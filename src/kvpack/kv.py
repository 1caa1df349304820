"""`KVCache`: one sequence's KV cache in kvpack's own, framework-neutral shape.

Per layer ``keys[i]`` and ``values[i]`` are ``[num_kv_heads, tokens, head_dim]`` tensors in the spec's dtype; keys
are post-RoPE exactly as the model produced them. ``positions`` (int64 ``[tokens]``) are the absolute positions the
keys were rotated for; ``token_ids`` (int64 ``[tokens]``) are the tokens, when known.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpack.errors import UnsupportedModelError
from kvpack.spec import ModelSpec


def token_ids_hash(token_ids: torch.Tensor) -> str:
    """BLAKE2b-128 hex digest of token ids as little-endian int64."""
    data = token_ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class KVCache:
    """A batch-of-one KV cache: ``keys``/``values`` lists of ``[num_kv_heads, tokens, head_dim]`` per layer."""

    spec: ModelSpec
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    token_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if len(self.keys) != spec.num_layers or len(self.values) != spec.num_layers:
            raise ValueError(f"expected {spec.num_layers} layers of keys and values, got {len(self.keys)}, "
                             f"{len(self.values)}")
        shape = (spec.num_kv_heads, self.num_tokens, spec.head_dim)
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(f"layer {i}: keys {tuple(k.shape)} / values {tuple(v.shape)}, expected {shape}")
            if k.dtype != spec.torch_dtype or v.dtype != spec.torch_dtype:
                raise ValueError(f"layer {i}: dtype {k.dtype}/{v.dtype}, expected {spec.torch_dtype}")
        if self.positions.dtype != torch.int64 or tuple(self.positions.shape) != (self.num_tokens,):
            raise ValueError(f"positions must be int64 [{self.num_tokens}], got {self.positions.dtype} "
                             f"{tuple(self.positions.shape)}")
        if self.token_ids is not None and (
            self.token_ids.dtype != torch.int64 or tuple(self.token_ids.shape) != (self.num_tokens,)
        ):
            raise ValueError(f"token_ids must be int64 [{self.num_tokens}]")

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of K and V in the cache's own dtype."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def fp16_bytes(self) -> int:
        """Bytes the same K and V take at 16 bits per element: the reference for compression ratios."""
        return 2 * self.num_tokens * self.spec.elements_per_token

    def __getitem__(self, index: slice) -> KVCache:
        """Token range ``cache[start:stop]`` (step 1 only); the tensors are views."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("KVCache supports token slices with step 1 only, e.g. cache[256:512]")
        start, stop, _ = index.indices(self.num_tokens)
        stop = max(start, stop)
        return KVCache(
            spec=self.spec,
            keys=[k[:, start:stop] for k in self.keys],
            values=[v[:, start:stop] for v in self.values],
            positions=self.positions[start:stop],
            token_ids=None if self.token_ids is None else self.token_ids[start:stop],
        )

    def chunks(self, chunk_tokens: int) -> list[KVCache]:
        """Consecutive slices of ``chunk_tokens`` tokens (the last may be shorter)."""
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        return [self[s : s + chunk_tokens] for s in range(0, self.num_tokens, chunk_tokens)]

    @staticmethod
    def concat(parts: Sequence[KVCache]) -> KVCache:
        """Concatenate caches of the same spec along tokens."""
        if not parts:
            raise ValueError("concat needs at least one cache")
        spec = parts[0].spec
        if any(p.spec.fingerprint != spec.fingerprint for p in parts):
            raise ValueError("cannot concatenate caches of different models")
        has_ids = all(p.token_ids is not None for p in parts)
        return KVCache(
            spec=spec,
            keys=[torch.cat([p.keys[i] for p in parts], dim=1) for i in range(spec.num_layers)],
            values=[torch.cat([p.values[i] for p in parts], dim=1) for i in range(spec.num_layers)],
            positions=torch.cat([p.positions for p in parts]),
            token_ids=torch.cat([p.token_ids for p in parts if p.token_ids is not None]) if has_ids else None,
        )

    def equal(self, other: KVCache) -> bool:
        """Bit-exact equality of spec, positions, token ids, keys and values."""
        if self.spec != other.spec or not torch.equal(self.positions, other.positions):
            return False
        if (self.token_ids is None) != (other.token_ids is None):
            return False
        if self.token_ids is not None and not torch.equal(self.token_ids, other.token_ids):  # type: ignore[arg-type]
            return False
        tensors = zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True)
        return all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                               b.view(torch.int16 if b.element_size() == 2 else torch.int32)) for a, b in tensors)

    def max_abs_error(self, other: KVCache) -> tuple[float, float]:
        """Largest absolute difference of keys and of values against ``other`` (same shape), in float32."""
        dk = max(float((a.float() - b.float()).abs().max()) for a, b in zip(self.keys, other.keys, strict=True))
        dv = max(float((a.float() - b.float()).abs().max()) for a, b in zip(self.values, other.values, strict=True))
        return dk, dv

    @classmethod
    def from_hf(cls, cache: Any, spec: ModelSpec, token_ids: torch.Tensor | Sequence[int] | None = None,
                start_position: int = 0) -> KVCache:
        """Copy a transformers (v5) cache of batch size 1 into a :class:`KVCache`.

        Tokens are assumed contiguous from ``start_position``; sliding-window layers are refused.
        """
        _refuse_sliding(spec)
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != spec.num_layers:
            raise ValueError(f"expected a transformers cache with {spec.num_layers} layers, got {type(cache).__name__}")
        keys, values = [], []
        for i, layer in enumerate(layers):
            k, v = layer.keys, layer.values
            if k is None or k.dim() != 4 or k.shape[0] != 1:
                raise ValueError(f"layer {i}: expected keys [1, heads, tokens, head_dim], got "
                                 f"{None if k is None else tuple(k.shape)}")
            keys.append(k[0].detach().clone())
            values.append(v[0].detach().clone())
        tokens = keys[0].shape[1]
        ids = None if token_ids is None else torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)[:tokens].clone()
        positions = torch.arange(start_position, start_position + tokens, dtype=torch.int64)
        return cls(spec=spec, keys=keys, values=values, positions=positions, token_ids=ids)

    def to_hf(self) -> Any:
        """A new transformers ``DynamicCache`` holding copies of these tensors with a batch dimension of 1."""
        from transformers import DynamicCache

        _refuse_sliding(self.spec)
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(k.unsqueeze(0).clone(), v.unsqueeze(0).clone(), i)
        return cache


def _refuse_sliding(spec: ModelSpec) -> None:
    if spec.sliding_layers:
        kinds = ", ".join(f"layer {i}: sliding_attention (window {spec.sliding_windows[i]})"
                          for i in spec.sliding_layers[:4])
        raise UnsupportedModelError(
            f"{spec.name or 'this model'} has sliding-window attention layers ({kinds}"
            f"{', ...' if len(spec.sliding_layers) > 4 else ''}); kvpack does not yet store their rolling caches. "
            "Use a model with full attention in every layer."
        )
