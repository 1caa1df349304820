"""kvpack: store and reuse the KV caches of language models, small and fast to move."""

from kvpack.codecs import Codec, decode, encode
from kvpack.errors import (
    CodecError,
    FormatError,
    KvpackError,
    ModelLoadError,
    ModelMismatchError,
    ProfileMismatchError,
    StoreError,
    TokenMismatchError,
    UnsupportedModelError,
)
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec, RopeSpec

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "CodecError",
    "FormatError",
    "KVCache",
    "KvpackError",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelSpec",
    "ProfileMismatchError",
    "RopeSpec",
    "StoreError",
    "TokenMismatchError",
    "UnsupportedModelError",
    "__version__",
    "decode",
    "encode",
]
