"""`zstd`: the raw KV bytes (as the `raw` codec lays them out) compressed with Zstandard at a given level.

Bit-exact. It is the general-purpose anchor that every kvpack codec is compared with (BENCHMARKS.md: zstd levels 3
and 19 on raw bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import zstandard

from kvpack.codecs.base import Codec, Payload, register
from kvpack.codecs.raw import RawCodec, buffer_from_bytes
from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec


@register
@dataclass(frozen=True)
class ZstdCodec(Codec):
    """Raw bytes through Zstandard; ``level`` in [1, 22]."""

    name = "zstd"
    version = 1
    level: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 22:
            raise ValueError(f"zstd level must be in [1, 22], got {self.level}")

    def encode_payload(self, kv: KVCache) -> Payload:
        inner = RawCodec().encode_payload(kv)
        raw = inner.sections["kv"]
        packed = zstandard.ZstdCompressor(level=self.level).compress(raw)
        return Payload(meta={**inner.meta, "raw_bytes": len(raw)}, sections={"kv": packed})

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        size = meta.get("raw_bytes")
        expected = 2 * spec.num_layers * spec.num_kv_heads * num_tokens * spec.head_dim * spec.torch_dtype.itemsize
        if size != expected:
            raise FormatError(f"zstd payload declares {size} raw bytes, expected {expected}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(bytes(container.section("kv")), max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd payload is corrupted: {exc}") from None
        if len(raw) != expected:
            raise FormatError(f"zstd payload decompressed to {len(raw)} bytes, expected {expected}")
        return buffer_from_bytes(raw, meta.get("dtype"), spec, num_tokens, out)
