"""`raw`: the KV tensors as they are, bit-exact (fp32, fp16 or bf16), optionally down-cast to fp16.

Section ``kv`` holds, for each layer in order, the keys then the values, each ``[num_kv_heads, tokens, head_dim]``
row-major, little-endian, in ``dtype`` (the cache's own dtype when ``dtype`` is ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpack.codecs.base import Codec, Payload, register
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import DTYPES, ModelSpec


def tensor_bytes(tensors: list[torch.Tensor]) -> bytes:
    """Little-endian bytes of ``tensors`` concatenated (bit patterns, any dtype)."""
    flat = torch.cat([t.contiguous().reshape(-1) for t in tensors])
    ints = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).numpy()
    return ints.astype(ints.dtype.newbyteorder("<"), copy=False).tobytes()


@register
@dataclass(frozen=True)
class RawCodec(Codec):
    """Uncompressed storage; ``dtype="float16"`` down-casts (lossy for bf16/fp32), ``None`` keeps bits exactly."""

    name = "raw"
    version = 1
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"raw codec dtype must be None or one of {sorted(DTYPES)}, got {self.dtype!r}")

    def encode_payload(self, kv: KVCache) -> Payload:
        target = DTYPES[self.dtype] if self.dtype else kv.spec.torch_dtype
        tensors = [t.to(target) for pair in zip(kv.keys, kv.values, strict=True) for t in pair]
        return Payload(meta={"dtype": self.dtype or kv.spec.dtype}, sections={"kv": tensor_bytes(tensors)})

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec,
                       num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return tensors_from_bytes(container.section("kv"), meta.get("dtype"), spec, num_tokens)


def tensors_from_bytes(data: bytes | memoryview, stored: Any, spec: ModelSpec,
                       num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`tensor_bytes` for a whole cache: per-layer keys and values in ``spec.dtype``.

    ``stored`` is the dtype name the bytes hold; their length is checked before anything is allocated.
    """
    if stored not in DTYPES:
        raise FormatError(f"raw payload has unknown dtype {stored!r}")
    dtype = DTYPES[stored]
    size = torch.empty((), dtype=dtype).element_size()
    per_tensor = spec.num_kv_heads * num_tokens * spec.head_dim
    if len(data) != 2 * spec.num_layers * per_tensor * size:
        raise FormatError(f"raw section has {len(data)} bytes, expected {2 * spec.num_layers * per_tensor * size}")
    ints = np.frombuffer(data, dtype="<i2" if size == 2 else "<i4").astype("=i2" if size == 2 else "=i4")
    flat = torch.from_numpy(ints).view(dtype).to(spec.torch_dtype)
    shape = (spec.num_kv_heads, num_tokens, spec.head_dim)
    tensors = list(flat.split(per_tensor)) if per_tensor else [flat] * (2 * spec.num_layers)
    views = [t.view(shape) for t in tensors]
    return views[0::2], views[1::2]
