"""Quantizers of the `transform` / `kvtc` codecs: the entropy-coded rate ladder, int2/int4/int8 with group scales
and fp8 on normalized PCA coefficients ``z [tokens, components]``, and the fixed-width block layout."""

from __future__ import annotations

import numpy as np
import torch

#: Components per allocation block.
BLOCK = 64
#: Block types: 0 dropped, 1 entropy-coded uniform levels, 2-4 int2/int4/int8 with a group scale, 5 fp8 (e4m3).
TYPE_DROP, TYPE_EC, TYPE_INT2, TYPE_INT4, TYPE_INT8, TYPE_FP8 = range(6)
TYPES = ("drop", "ec", "int2", "int4", "int8", "fp8")
INT_BITS = {TYPE_INT2: 2, TYPE_INT4: 4, TYPE_INT8: 8}
#: Clip of the static (profile) int scale, in standard deviations (near-optimal uniform quantizers of a Gaussian).
INT_CLIP = {2: 2.0, 4: 2.7, 8: 4.5}
#: Group sizes of int blocks (consecutive components of one token share an fp16 scale); 0: static scale.
GROUPS = (0, 16, 64)
FP8_GAIN = 16.0
#: Entropy-coded step ladder: class j quantizes z with step 1 / r_j, r_j = 2 ** ((j + RATE_OFFSET) / 4).
N_RATES = 48
RATE_OFFSET = -8
#: Classes with r_j above this store log2(r_j / DIRECT_MAX) low bits of each symbol raw.
DIRECT_MAX = 16.0
ALPHABET = 256
ESCAPE = ALPHABET - 1
#: Coded tokens per chunk above which a container is refused (bounds decode allocations with the base's limit).
MAX_CODED = 1 << 20


def rates() -> np.ndarray:
    """float64 ``[N_RATES]``: the ratio ``sigma / step`` of each entropy-coded class."""
    return 2.0 ** ((np.arange(N_RATES) + RATE_OFFSET) / 4.0)


def low_bits() -> np.ndarray:
    """int64 ``[N_RATES]``: raw low bits per symbol of each class (0 while ``r_j <= DIRECT_MAX``)."""
    return np.maximum(0, np.ceil(np.log2(rates() / DIRECT_MAX) - 1e-9)).astype(np.int64)



def ec_quantize(z: np.ndarray, r: np.ndarray, rounding: float) -> np.ndarray:
    """Uniform levels with a dead zone: int64 ``q = sign(z) floor(|z| r + rounding)`` (``rounding`` 0.5 = nearest).

    The definition; the codec runs it fused with the bitstream in :mod:`kvpack.codecs.transform.levels`, whose tests
    check it against this function value for value."""
    scaled = z * r
    return (np.sign(scaled) * np.floor(np.abs(scaled) + rounding)).astype(np.int64)


def ec_dequantize(q: np.ndarray, r: np.ndarray, shrink: np.ndarray | float = 0.0) -> np.ndarray:
    """float32 ``z`` of levels ``q`` (reconstruction pulled towards zero by ``shrink`` steps for ``q != 0``); the
    definition the fused decoder (:mod:`kvpack.codecs.transform.levels`) is tested against."""
    qf = q.astype(np.float32)
    return ((qf - np.sign(qf) * np.float32(shrink)) / r).astype(np.float32)


def zigzag(q: np.ndarray) -> np.ndarray:
    """Signed to unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    return np.where(q < 0, -2 * q - 1, 2 * q)


def unzigzag(u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag` (for non-negative signed integers ``u``): ``(u >> 1) XOR -(u & 1)``."""
    return (u >> 1) ^ -(u & 1)


def int_quantize(z: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Mid-rise uniform ``bits``-bit codes ``uint8 [T, n]`` and fp16 absmax scales ``[T, n / group]`` (or static)."""
    half = 2 ** (bits - 1) - 0.5
    if group:
        t, n = z.shape
        amax = np.abs(z.reshape(t, n // group, group)).max(axis=2)
        scales = (amax / half).astype(np.float16)
        s = np.repeat(np.maximum(scales.astype(np.float32), 1e-12), group, axis=1)
    else:
        scales = None
        s = np.full(z.shape[1], INT_CLIP[bits] / half, np.float32)
    codes = np.clip(np.floor(z / s + half + 0.5), 0, 2 * half)
    return codes.astype(np.uint8), scales


def int_dequantize(codes: np.ndarray, scales: np.ndarray | None, bits: int, group: int) -> np.ndarray:
    half = 2 ** (bits - 1) - 0.5
    if scales is None:
        s: np.ndarray | float = INT_CLIP[bits] / half
    else:
        s = np.repeat(scales.astype(np.float32), group, axis=1)
    return ((codes.astype(np.float32) - half) * s).astype(np.float32)


def fp8_quantize(z: np.ndarray) -> np.ndarray:
    """e4m3 bytes of ``z * FP8_GAIN`` (saturating at +-448)."""
    t = torch.from_numpy(np.clip(z * FP8_GAIN, -448, 448).astype(np.float32))
    return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


#: float32 value of every e4m3 byte.
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def fp8_dequantize(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fp8_quantize` (a table lookup: ``data`` may be a read-only view of a container)."""
    return (_FP8_VALUES[data] / FP8_GAIN).astype(np.float32)


def fixed_bytes(kind: int, group: int, tokens: int, n: int) -> int:
    """Bytes of one fixed-width block of ``n`` components over ``tokens`` tokens."""
    if kind == TYPE_FP8:
        return tokens * n
    bits = INT_BITS[kind]
    return (tokens * n * bits + 7) // 8 + (2 * tokens * (n // group) if group else 0)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """``values`` (uint, < 2**bits) as a little-endian bit stream."""
    if bits == 0 or values.size == 0:
        return b""
    planes = np.unpackbits(values.astype("<u2").reshape(-1, 1).view(np.uint8), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits], bitorder="little").tobytes()


def unpack_bits(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    if bits == 0 or count == 0:
        return np.zeros(count, np.int64)
    planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


def fixed_encode(z: np.ndarray, kind: int, group: int) -> bytes:
    """Bytes of a fixed-width block ``z [T, n]`` (see :func:`fixed_bytes`)."""
    if kind == TYPE_FP8:
        return fp8_quantize(z).tobytes()
    bits = INT_BITS[kind]
    codes, scales = int_quantize(z, bits, group)
    return pack_bits(codes.reshape(-1), bits) + (b"" if scales is None else scales.astype("<f2").tobytes())


def fixed_decode(data: np.ndarray, kind: int, group: int, tokens: int, n: int) -> np.ndarray:
    """Inverse of :func:`fixed_encode` (``data`` exactly :func:`fixed_bytes` long)."""
    if kind == TYPE_FP8:
        return fp8_dequantize(data.reshape(tokens, n))
    bits = INT_BITS[kind]
    code_bytes = (tokens * n * bits + 7) // 8
    codes = unpack_bits(data[:code_bytes], tokens * n, bits).reshape(tokens, n)
    scales = data[code_bytes:].view("<f2").reshape(tokens, n // group) if group else None
    return int_dequantize(codes, scales, bits, group)


def simulate_fixed(z: np.ndarray, kind: int, group: int) -> np.ndarray:
    """Reconstruction of ``z [T, n]`` through a fixed-width block (what the decoder will see)."""
    if kind == TYPE_FP8:
        return fp8_dequantize(fp8_quantize(z))
    codes, scales = int_quantize(z, INT_BITS[kind], group)
    return int_dequantize(codes, scales, INT_BITS[kind], group)

