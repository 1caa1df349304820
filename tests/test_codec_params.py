"""Codec parameters: the exported classes, and which fields make a codec's bitstream identity (header and key)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from kvpack import codecs
from kvpack.codecs import NOT_IN_BITSTREAM, Codec, Payload
from kvpack.codecs.validate import Size
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Fields(Codec):
    """Not registered: only its parameters are used."""

    name = "fields"
    shown: int = 1
    hidden: int = dataclasses.field(default=2, repr=False)
    path: str = dataclasses.field(default="a", repr=False, metadata=NOT_IN_BITSTREAM)

    def encode_payload(self, kv: KVCache) -> Payload:
        raise NotImplementedError

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        raise NotImplementedError

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def test_every_init_field_is_in_the_key_unless_marked_outside_the_bitstream() -> None:
    assert Fields().params() == {"shown": 1, "hidden": 2}  # hidden from repr, still a parameter
    assert Fields(hidden=3).codec_id != Fields().codec_id
    assert Fields(path="b").codec_id == Fields().codec_id
    assert "profile" not in {f.name for f in dataclasses.fields(codecs.Transform) if f.metadata.get(
        "kvpack.bitstream", True)}


def test_codec_classes_are_exported_under_their_names() -> None:
    exported = (codecs.Raw, codecs.Zstd, codecs.Lossless, codecs.FP8, codecs.Kivi, codecs.CacheGen, codecs.Transform,
                codecs.KVTC)
    assert sorted(c.name for c in exported) == codecs.available()
    assert all(codecs.codec_class(c.name) is c for c in exported)
    assert codecs.Raw().params() == codecs.get("raw").params()
