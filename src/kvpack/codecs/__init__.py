"""Codecs: `get(name, **params)` builds one; `available()` lists them. One module per codec."""

from kvpack.codecs import cachegen, fp8, kivi, lossless, raw, transform, zstd  # importing a codec module registers it
from kvpack.codecs.base import Codec, Payload, available, codec_class, decode, encode, get, parse_params, register
from kvpack.codecs.calibrated import CalibratedCodec, calibrated

__all__ = ["CalibratedCodec", "Codec", "Payload", "available", "cachegen", "calibrated", "codec_class", "decode",
           "encode", "fp8", "get", "kivi", "lossless", "parse_params", "raw", "register", "transform", "zstd"]
