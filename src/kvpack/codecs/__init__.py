"""Codecs: each one an exported dataclass with typed, validated parameters (``Transform(profile=P, preset="32x")``);
``get(name, **params)`` builds one from its registered name and string parameters (the CLI's way); ``available()``
lists the names. One module, or package when it has several parts, per codec."""

from kvpack.codecs import cachegen, fp8, kivi, lossless, raw, transform, zstd  # importing a codec module registers it
from kvpack.codecs.base import (
    NOT_IN_BITSTREAM,
    Codec,
    Payload,
    available,
    codec_class,
    decode,
    encode,
    get,
    parse_params,
    register,
)
from kvpack.codecs.cachegen import CacheGen
from kvpack.codecs.calibrated import CalibratedCodec, calibrated
from kvpack.codecs.fp8 import Fp8Codec as FP8
from kvpack.codecs.kivi import KiviCodec as Kivi
from kvpack.codecs.lossless import LosslessCodec as Lossless
from kvpack.codecs.raw import RawCodec as Raw
from kvpack.codecs.transform import KVTC, Transform
from kvpack.codecs.zstd import ZstdCodec as Zstd

__all__ = ["FP8", "KVTC", "NOT_IN_BITSTREAM", "CacheGen", "CalibratedCodec", "Codec", "Kivi", "Lossless", "Payload",
           "Raw", "Transform", "Zstd", "available", "cachegen", "calibrated", "codec_class", "decode", "encode", "fp8",
           "get", "kivi", "lossless", "parse_params", "raw", "register", "transform", "zstd"]
