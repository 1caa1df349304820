"""kvpack: store and reuse the KV caches of language models, small and fast to move."""

# First, before torch loads the OpenMP runtime: numba's threads must not spin-wait (kvpack.entropy.workers).
from kvpack.entropy import workers as _workers  # noqa: F401  # isort: skip
from kvpack import allocator  # noqa: F401  # isort: skip  # malloc keeps chunks' memory mapped (its docstring)
from kvpack import codecs, store
from kvpack.codecs import (
    FP8,
    KVTC,
    CacheGen,
    CalibratedCodec,
    Codec,
    Kivi,
    Lossless,
    Raw,
    Transform,
    Zstd,
    decode,
    encode,
)
from kvpack.context import ContextCache, Generation
from kvpack.errors import (
    CodecError,
    FormatError,
    KvpackError,
    ModelLoadError,
    ModelMismatchError,
    ProfileError,
    ProfileMismatchError,
    StoreError,
    TokenMismatchError,
    UnsupportedModelError,
)
from kvpack.kv import KVCache
from kvpack.prefix import PrefixStore, RequestStats, load_prefix, save_prefix
from kvpack.profile import Profile
from kvpack.reuse import Prompt, Segment, SegmentStats
from kvpack.spec import ModelSpec, RopeSpec

__version__ = "0.1.0"

__all__ = [
    "FP8",
    "KVTC",
    "CacheGen",
    "CalibratedCodec",
    "Codec",
    "CodecError",
    "ContextCache",
    "FormatError",
    "Generation",
    "KVCache",
    "Kivi",
    "KvpackError",
    "Lossless",
    "ModelLoadError",
    "ModelMismatchError",
    "ModelSpec",
    "PrefixStore",
    "Profile",
    "ProfileError",
    "ProfileMismatchError",
    "Prompt",
    "Raw",
    "RequestStats",
    "RopeSpec",
    "Segment",
    "SegmentStats",
    "StoreError",
    "TokenMismatchError",
    "Transform",
    "UnsupportedModelError",
    "Zstd",
    "__version__",
    "codecs",
    "decode",
    "encode",
    "load_prefix",
    "save_prefix",
    "store",
]
