"""kvpack: store and reuse the KV caches of language models, small and fast to move."""

from kvpack import codecs, store
from kvpack.codecs import Codec, decode, encode
from kvpack.context import ContextCache, Generation
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
from kvpack.prefix import PrefixStore, RequestStats, load_prefix, save_prefix
from kvpack.reuse import Prompt, Segment, SegmentStats
from kvpack.spec import ModelSpec, RopeSpec

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "CodecError",
    "ContextCache",
    "FormatError",
    "Generation",
    "KVCache",
    "KvpackError",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelSpec",
    "PrefixStore",
    "ProfileMismatchError",
    "Prompt",
    "RequestStats",
    "RopeSpec",
    "Segment",
    "SegmentStats",
    "StoreError",
    "TokenMismatchError",
    "UnsupportedModelError",
    "__version__",
    "codecs",
    "decode",
    "encode",
    "load_prefix",
    "save_prefix",
    "store",
]
