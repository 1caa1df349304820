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
from kvpack.codecs.raw import RawCodec, buffer_from_bytes, raw_nbytes
from kvpack.codecs.validate import Size
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

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        expected = raw_nbytes(meta, spec, num_tokens, spec.dtype)
        if meta.get("raw_bytes") != expected or isinstance(meta.get("raw_bytes"), bool):
            raise FormatError(f"zstd payload declares {meta.get('raw_bytes')!r} raw bytes, expected {expected}")
        # a zstd frame is at least 9 bytes; it never exceeds ZSTD_compressBound (the input plus 1/256 plus 64)
        return {"kv": Size(9, expected + (expected >> 8) + 64)}

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        expected = int(meta["raw_bytes"])
        packed = bytes(container.section("kv"))
        stream = zstandard.ZstdDecompressor().decompressobj()
        try:
            # libzstd stops a frame that outgrows the content size its header declares: the output is bounded
            if zstandard.frame_content_size(packed) != expected:
                raise FormatError(f"zstd frame does not declare the {expected} bytes the header implies")
            raw = stream.decompress(packed)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd payload is corrupted: {exc}") from None
        if len(raw) != expected or not stream.eof or stream.unused_data:
            raise FormatError(f"zstd payload decompressed to {len(raw)} bytes (one whole frame of {expected} bytes "
                              "expected, nothing after it)")
        return buffer_from_bytes(raw, meta.get("dtype"), spec, num_tokens, out)
