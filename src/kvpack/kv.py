"""`KVCache`: one sequence's KV cache in kvpack's own, framework-neutral shape: one contiguous buffer.

``data`` is ``[num_layers, 2, num_kv_heads, tokens, head_dim]`` in the spec's dtype (index 0 of the second axis is
keys, 1 is values); keys are post-RoPE exactly as the model produced them. Codecs read and write this one buffer
(``data.view(2 * num_layers * num_kv_heads, tokens, head_dim)`` is the "tile" layout they code), so nothing is
stacked or split per layer. A token slice ``cache[a:b]`` is a view of the same buffer; :meth:`KVCache.empty`
preallocates the cache of a whole request, and decoders write chunks into its slices (``decode(..., out=)``).

Every layer holds every token, sliding-window layers included: a sliding layer's K/V of a token does not depend on
which later tokens attend to it, so a chunk stores them as for a full-attention layer, and any chunk-aligned prefix
can be rebuilt exactly. :meth:`to_hf` hands transformers the whole history of every layer,
with sliding layers that show the model exactly the window transformers' own cache would (bit-identical logits,
tested per family) while recording the history for the next write-back.

``positions`` (int64 ``[tokens]``) are the absolute positions the keys were rotated for; ``token_ids`` (int64
``[tokens]``) are the tokens, when known.
"""

from __future__ import annotations

import hashlib
import math
import mmap
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


def int_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as signed integers of the element's width (for bit-exact comparison and byte I/O)."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def hf_cache(data: torch.Tensor, windows: Sequence[int | None] | None = None, keep_history: bool = True) -> Any:
    """A transformers ``DynamicCache`` whose layers are views of ``data [layers, 2, heads, tokens, dim]`` (batch
    dimension 1, no copy).

    ``windows``: per layer, the sliding window (a ``DynamicSlidingWindowLayer`` holding ``tokens``; with
    ``keep_history`` it records the tokens that fall out of the window, else it holds only the last ``window - 1``)
    or ``None`` (a ``DynamicLayer``); default: every layer a ``DynamicLayer``.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    tokens = data.shape[3]
    layers = []
    for i, window in enumerate((None,) * data.shape[0] if windows is None else windows):
        k, v = data[i, 0].unsqueeze(0), data[i, 1].unsqueeze(0)
        layer: Any
        if window is None:
            layer = DynamicLayer()
        else:
            layer = DynamicSlidingWindowLayer(sliding_window=window)
            layer.cumulative_length = tokens
            layer.record_past = keep_history
            if not keep_history:
                first = max(0, tokens - window + 1)
                k, v = k[:, :, first:], v[:, :, first:]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


@dataclass
class KVCache:
    """A batch-of-one KV cache: ``data [num_layers, 2, num_kv_heads, tokens, head_dim]`` plus positions and ids."""

    spec: ModelSpec
    data: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        expected = self.spec.buffer_shape(self.num_tokens)
        if tuple(self.data.shape) != expected:
            raise ValueError(f"KV buffer has shape {tuple(self.data.shape)}, expected {expected} "
                             "[layers, 2, kv_heads, tokens, head_dim]")
        if self.data.dtype != self.spec.torch_dtype:
            raise ValueError(f"KV buffer dtype {self.data.dtype}, expected {self.spec.torch_dtype}")
        if self.positions.dtype != torch.int64 or self.positions.dim() != 1:
            raise ValueError(f"positions must be int64 [tokens], got {self.positions.dtype} "
                             f"{tuple(self.positions.shape)}")
        if self.token_ids is not None and (
            self.token_ids.dtype != torch.int64 or tuple(self.token_ids.shape) != (self.num_tokens,)
        ):
            raise ValueError(f"token_ids must be int64 [{self.num_tokens}]")

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def empty(cls, spec: ModelSpec, num_tokens: int, start_position: int = 0,
              device: torch.device | str | None = None) -> KVCache:
        """An uninitialised cache of ``num_tokens`` contiguous positions from ``start_position`` (to decode into)."""
        data = _buffer(spec.buffer_shape(num_tokens), spec.torch_dtype, device)
        return cls(spec=spec, data=data,
                   positions=torch.arange(start_position, start_position + num_tokens, dtype=torch.int64))

    @classmethod
    def from_layers(cls, spec: ModelSpec, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                    positions: torch.Tensor, token_ids: torch.Tensor | None = None) -> KVCache:
        """Copy per-layer ``keys[i]``/``values[i]`` ``[num_kv_heads, tokens, head_dim]`` into one buffer."""
        if len(keys) != spec.num_layers or len(values) != spec.num_layers:
            raise ValueError(f"expected {spec.num_layers} layers of keys and values, got {len(keys)}, {len(values)}")
        shape = (spec.num_kv_heads, int(positions.shape[0]), spec.head_dim)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(f"layer {i}: keys {tuple(k.shape)} / values {tuple(v.shape)}, expected {shape}")
            if k.dtype != spec.torch_dtype or v.dtype != spec.torch_dtype:
                raise ValueError(f"layer {i}: dtype {k.dtype}/{v.dtype}, expected {spec.torch_dtype}")
        data = torch.empty(spec.buffer_shape(shape[1]), dtype=spec.torch_dtype)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            data[i, 0].copy_(k)
            data[i, 1].copy_(v)
        return cls(spec=spec, data=data, positions=positions, token_ids=token_ids)

    # ------------------------------------------------------------------------------------------------- views
    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per-layer key views ``[num_kv_heads, tokens, head_dim]`` of the buffer."""
        return list(self.data[:, 0].unbind(0))

    @property
    def values(self) -> list[torch.Tensor]:
        """Per-layer value views ``[num_kv_heads, tokens, head_dim]`` of the buffer."""
        return list(self.data[:, 1].unbind(0))

    def tiles(self) -> torch.Tensor:
        """``[2 * num_layers * num_kv_heads, tokens, head_dim]``, tiles ordered (layer, K/V, head); contiguous."""
        spec = self.spec
        return self.data.contiguous().view(2 * spec.num_layers * spec.num_kv_heads, self.num_tokens, spec.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V in the cache's own dtype."""
        return self.data.numel() * self.data.element_size()

    @property
    def fp16_bytes(self) -> int:
        """Bytes the same K and V take at 16 bits per element: the reference for compression ratios."""
        return 2 * self.num_tokens * self.spec.elements_per_token

    def __getitem__(self, index: slice) -> KVCache:
        """Token range ``cache[start:stop]`` (step 1 only): a view of the same buffer."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("KVCache supports token slices with step 1 only, e.g. cache[256:512]")
        start, stop, _ = index.indices(self.num_tokens)
        stop = max(start, stop)
        return KVCache(spec=self.spec, data=self.data[:, :, :, start:stop], positions=self.positions[start:stop],
                       token_ids=None if self.token_ids is None else self.token_ids[start:stop])

    def chunks(self, chunk_tokens: int) -> list[KVCache]:
        """Consecutive slices of ``chunk_tokens`` tokens (the last may be shorter)."""
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        return [self[s : s + chunk_tokens] for s in range(0, self.num_tokens, chunk_tokens)]

    @staticmethod
    def concat(parts: Sequence[KVCache]) -> KVCache:
        """Concatenate caches of the same spec along tokens (one copy into a new buffer)."""
        if not parts:
            raise ValueError("concat needs at least one cache")
        spec = parts[0].spec
        if any(p.spec.fingerprint != spec.fingerprint for p in parts):
            raise ValueError("cannot concatenate caches of different models")
        has_ids = all(p.token_ids is not None for p in parts)
        return KVCache(
            spec=spec,
            data=torch.cat([p.data for p in parts], dim=3),
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
        return torch.equal(int_view(self.data), int_view(other.data))

    def max_abs_error(self, other: KVCache) -> tuple[float, float]:
        """Largest absolute difference of keys and of values against ``other`` (same shape), in float32."""
        diff = (self.data.float() - other.data.float()).abs()
        if diff.numel() == 0:
            return 0.0, 0.0
        return float(diff[:, 0].max()), float(diff[:, 1].max())

    # ------------------------------------------------------------------------------------------ transformers
    @classmethod
    def from_hf(cls, cache: Any, spec: ModelSpec, token_ids: torch.Tensor | Sequence[int] | None = None,
                start_position: int = 0, span: tuple[int, int] | None = None) -> KVCache:
        """Copy a transformers (v5) cache of batch size 1 into a :class:`KVCache` (one copy, into one buffer).

        Tokens are assumed contiguous from ``start_position``; ``token_ids`` are those of the whole cache. With
        ``span=(a, b)`` only tokens ``[a, b)`` of the cache are copied (positions ``start_position + a`` on).
        Every layer must hold every token: a sliding-window layer that already dropped tokens (transformers' default
        cache for such models, once the prompt is longer than the window) cannot be stored; make the cache with
        :func:`kvpack.inference.new_cache` instead.
        """
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != spec.num_layers:
            raise ValueError(f"expected a transformers cache with {spec.num_layers} layers, got {type(cache).__name__}")
        tokens = None
        for i, layer in enumerate(layers):
            k, v = layer.keys, layer.values
            expected = (1, spec.num_kv_heads, k.shape[2] if k is not None and k.dim() == 4 else -1, spec.head_dim)
            if k is None or v is None or tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise ValueError(f"layer {i}: expected keys and values [1, {spec.num_kv_heads}, tokens, "
                                 f"{spec.head_dim}], got {None if k is None else tuple(k.shape)}")
            seen = int(getattr(layer, "cumulative_length", k.shape[2]))
            if seen != k.shape[2]:
                raise UnsupportedModelError(
                    f"layer {i} is a sliding-window cache that kept {k.shape[2]} of its {seen} tokens; kvpack stores "
                    "every token of every layer. Build the cache with kvpack.inference.new_cache(model) (it records "
                    "the tokens that leave the window; the model still sees only the window) and prefill into that")
            if tokens is not None and k.shape[2] != tokens:
                raise ValueError(f"layer {i} holds {k.shape[2]} tokens, layer 0 holds {tokens}")
            tokens = k.shape[2]
        a, b = span if span is not None else (0, tokens or 0)
        if not 0 <= a <= b <= (tokens or 0):
            raise ValueError(f"span {span} is outside the cache's {tokens or 0} tokens")
        data = torch.empty(spec.buffer_shape(b - a), dtype=spec.torch_dtype)
        for i, layer in enumerate(layers):
            data[i, 0].copy_(layer.keys[0, :, a:b])
            data[i, 1].copy_(layer.values[0, :, a:b])
        ids = None if token_ids is None else torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)[a:b].clone()
        if ids is not None and ids.numel() != b - a:
            raise ValueError(f"token_ids has fewer ids than the cache's {b} tokens")
        positions = torch.arange(start_position + a, start_position + b, dtype=torch.int64)
        return cls(spec=spec, data=data, positions=positions, token_ids=ids)

    def to_hf(self, keep_history: bool = True) -> Any:
        """A transformers ``DynamicCache`` whose layers are views of this buffer (batch dimension 1, no copy).

        Layers are the classes transformers builds for the model: ``DynamicLayer`` for full attention and
        ``DynamicSlidingWindowLayer`` for sliding windows, which shows the model exactly the last ``window - 1``
        tokens, as transformers' default cache does, so logits are bit-identical to it. With ``keep_history`` (the
        default) a sliding layer records the tokens that fall out of the window (transformers' past recording), so
        the cache can be stored again after more tokens went through it; without, it holds only its window.
        transformers concatenates new tokens into fresh tensors: this buffer is never written to.
        """
        return hf_cache(self.data, self.spec.sliding_windows, keep_history)


#: Host buffers from this size up are mapped with transparent huge pages where the OS offers them (:func:`_buffer`).
HUGE_PAGE_BUFFER_BYTES = 8 << 20


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """``torch.empty(shape)``; on a Linux host, a large one is an anonymous mapping advised to use transparent huge
    pages.

    A load writes every byte of a fresh buffer once, and first-touching 4 KiB pages is a page fault each: filling a
    47 MB buffer (2,048 tokens of SmolLM2's bf16 KV) took 10.6 ms against 2.9 ms for the same buffer again, and 4.7 ms
    with huge pages (one-off measurement on the 2-core Xeon). Where the kernel does not honour the advice (THP
    ``never``), it is an ordinary mapping."""
    numel = math.prod(shape)
    size = numel * dtype.itemsize
    if (device is not None and torch.device(device).type != "cpu") or size < HUGE_PAGE_BUFFER_BYTES \
            or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive
