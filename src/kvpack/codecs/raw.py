"""`raw`: the KV tensors as they are, bit-exact (fp32, fp16 or bf16), optionally down-cast to fp16.

Section ``kv`` holds the KV buffer ``[layers, 2, kv_heads, tokens, head_dim]`` row-major (so, for each layer in
order, the keys then the values), little-endian, in ``dtype`` (the cache's own dtype when ``dtype`` is ``None``).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpack.codecs.base import Codec, Payload, register
from kvpack.codecs.validate import Size, exact
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.kv import KVCache, int_view
from kvpack.spec import DTYPES, ModelSpec


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian bytes of ``tensor`` in row-major order (bit patterns, any dtype)."""
    ints = int_view(tensor.contiguous()).numpy()
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
        return Payload(meta={"dtype": self.dtype or kv.spec.dtype}, sections={"kv": tensor_bytes(kv.data.to(target))})

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        return {"kv": exact(raw_nbytes(meta, spec, num_tokens, self.dtype or spec.dtype))}

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        return buffer_from_bytes(container.section("kv"), meta.get("dtype"), spec, num_tokens, out)


def raw_nbytes(meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int, stored: str) -> int:
    """Bytes of the raw layout of a cache of ``num_tokens`` tokens of ``spec`` in dtype ``stored``; a meta that
    names another dtype is a :class:`FormatError`."""
    if meta.get("dtype") != stored or not isinstance(meta.get("dtype"), str):
        raise FormatError(f"raw payload meta names dtype {meta.get('dtype')!r}; the codec stores {stored}")
    return math.prod(spec.buffer_shape(num_tokens)) * DTYPES[stored].itemsize


def buffer_from_bytes(data: bytes | memoryview, stored: Any, spec: ModelSpec, num_tokens: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes` for a whole cache: the buffer ``[layers, 2, kv_heads, tokens, head_dim]``.

    ``stored`` is the dtype name the bytes hold; their length is checked before anything is allocated. With
    ``out`` the values are written there (one copy, converting to ``spec.dtype`` on the way) and ``out`` returned.
    """
    if stored not in DTYPES:
        raise FormatError(f"raw payload has unknown dtype {stored!r}")
    dtype = DTYPES[stored]
    size = dtype.itemsize
    shape = spec.buffer_shape(num_tokens)
    expected = math.prod(shape) * size
    if len(data) != expected:
        raise FormatError(f"raw section has {len(data)} bytes, expected {expected}")
    ints = np.frombuffer(data, dtype="<i2" if size == 2 else "<i4")
    if sys.byteorder != "little":
        ints = ints.astype("=i2" if size == 2 else "=i4")
    with warnings.catch_warnings():  # a read-only view of the input: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        stored_view = torch.from_numpy(ints).view(dtype).view(shape)
    if out is not None:
        return out.copy_(stored_view)
    return stored_view.to(spec.torch_dtype, copy=True)
