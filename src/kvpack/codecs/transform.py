"""`transform` and `kvtc`: calibrated PCA transform coding of whole-model KV vectors (see docs/transform.md).

Following KVTC (Staniszewski et al., "KV Cache Transform Coding", arXiv 2511.01815): keys are un-rotated (pre-RoPE,
:mod:`kvpack.rope`), the keys and values of all layers and KV heads of a token are concatenated into one vector
``x [D]`` (``D = 2 * layers * kv_heads * head_dim``), centred and weighted per feature (``w``: how much an error in
that feature costs, measured at calibration), and projected on a PCA basis computed once per model
(:mod:`kvpack.calibrate`). Each principal component ``i`` is normalized by its calibration standard deviation
``sigma_i``; the normalized coefficients ``z`` are quantized block by block (``BLOCK`` components) as the profile's
allocation says (:data:`TYPES`), and entropy-coded with the rANS engine using frequency tables kept in the profile,
so a chunk carries no tables. Tokens at positions ``< sinks`` (attention sinks) are stored apart, exactly (or fp8).

Bitstream (``meta`` + sections, per progressive layer ``k``; a layer is a set of blocks, most important first):

- ``sinks``: the sink tokens' post-RoPE keys and values (``bf16`` bits, or fp8 e4m3 with fp32 scales per tensor);
- ``e{k}``: one rANS blob (:func:`kvpack.entropy.pack`, tables from the profile) whose lanes are the entropy-coded
  components of the layer grouped by table (component-major, ``tokens`` symbols each);
- ``x{k}``: LEB128 varints of the escaped symbols' values, in symbol order;
- ``b{k}``: raw low bits of high-resolution components (symbol = zigzag(q) >> b, low b bits stored raw);
- ``i{k}``: fixed-width blocks (int2/int4/int8 codes with fp16 group scales, fp8 bytes), DEFLATE-compressed under
  the ``kvtc`` recipe.

A prefix of the bytes that holds complete layers decodes at lower quality (:meth:`TransformCodec.decode_prefix`).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from kvpack import entropy, rope
from kvpack.codecs.base import Codec, Payload, _tokens_info, register
from kvpack.codecs.raw import tensor_bytes
from kvpack.entropy.tables import decode_varints, encode_varints
from kvpack.errors import CodecError, FormatError
from kvpack.format import PREFIX_BYTES, Container, crc32
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

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


# ------------------------------------------------------------------------------------------------ features


def feature_groups(layers: int, width: int, grouping: str) -> list[np.ndarray]:
    """Feature indices of each PCA group: ``joint`` (one basis over K and V) or ``kv`` (keys, then values).

    Feature order: for each layer, its keys ``[width = kv_heads * head_dim]`` (pre-RoPE) then its values.
    """
    index = np.arange(2 * layers * width).reshape(layers, 2, width)
    if grouping == "joint":
        return [index.reshape(-1)]
    if grouping == "kv":
        return [index[:, 0].reshape(-1), index[:, 1].reshape(-1)]
    raise ValueError(f"grouping must be 'joint' or 'kv', got {grouping!r}")


def features(kv: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[tokens, D]``: pre-RoPE keys and values of all layers and heads per token (``rows``: a token mask),
    features ordered ``(layer, K/V, head, channel)``."""
    spec = kv.spec
    pos = kv.positions if rows is None else kv.positions[rows]
    keys, values = torch.stack(kv.keys), torch.stack(kv.values)  # [L, H, T, D]
    if rows is not None:
        keys, values = keys[:, :, rows], values[:, :, rows]
    pre = rope.unrotate(keys, pos, spec.rope, spec.head_dim) if spec.rope.type != "none" else keys.float()
    both = torch.stack((pre, values.float()), dim=1)  # [L, 2, H, T, D]
    return both.permute(3, 0, 1, 2, 4).reshape(pos.numel(), 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim)


def unfeatures(x: torch.Tensor, positions: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`features`: post-RoPE keys and values ``[layers, kv_heads, tokens, head_dim]`` (float32)."""
    tokens, heads, dim = x.shape[0], spec.num_kv_heads, spec.head_dim
    per_layer = x.reshape(tokens, spec.num_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # [L, 2, H, T, D]
    keys = per_layer[:, 0]
    if spec.rope.type != "none":
        keys = rope.rotate(keys, positions, spec.rope, dim)
    return keys, per_layer[:, 1]


# ------------------------------------------------------------------------------------------------ quantizers


def ec_quantize(z: np.ndarray, r: np.ndarray, rounding: float) -> np.ndarray:
    """Uniform levels with a dead zone: int64 ``q = sign(z) floor(|z| r + rounding)`` (``rounding`` 0.5 = nearest)."""
    scaled = z * r
    return (np.sign(scaled) * np.floor(np.abs(scaled) + rounding)).astype(np.int64)


def ec_dequantize(q: np.ndarray, r: np.ndarray, shrink: np.ndarray | float = 0.0) -> np.ndarray:
    """float32 ``z`` of levels ``q`` (reconstruction pulled towards zero by ``shrink`` steps for ``q != 0``)."""
    qf = q.astype(np.float32)
    return ((qf - np.sign(qf) * np.float32(shrink)) / r).astype(np.float32)


def zigzag(q: np.ndarray) -> np.ndarray:
    """Signed to unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    return np.where(q < 0, -2 * q - 1, 2 * q)


def unzigzag(u: np.ndarray) -> np.ndarray:
    return np.where(u & 1, -(u >> 1) - 1, u >> 1)


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


def fp8_dequantize(data: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(data)).view(torch.float8_e4m3fn).float()
    return (t.numpy() / FP8_GAIN).astype(np.float32)


def fixed_bytes(kind: int, group: int, tokens: int, n: int) -> int:
    """Bytes of one fixed-width block of ``n`` components over ``tokens`` tokens."""
    if kind == TYPE_FP8:
        return tokens * n
    bits = INT_BITS[kind]
    return (tokens * n * bits + 7) // 8 + (2 * tokens * (n // group) if group else 0)


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """``values`` (uint, < 2**bits) as a little-endian bit stream."""
    if bits == 0 or values.size == 0:
        return b""
    planes = np.unpackbits(values.astype("<u2").reshape(-1, 1).view(np.uint8), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits], bitorder="little").tobytes()


def _unpack_bits(data: np.ndarray, count: int, bits: int) -> np.ndarray:
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
    return _pack_bits(codes.reshape(-1), bits) + (b"" if scales is None else scales.astype("<f2").tobytes())


def fixed_decode(data: np.ndarray, kind: int, group: int, tokens: int, n: int) -> np.ndarray:
    """Inverse of :func:`fixed_encode` (``data`` exactly :func:`fixed_bytes` long)."""
    if kind == TYPE_FP8:
        return fp8_dequantize(data.reshape(tokens, n))
    bits = INT_BITS[kind]
    code_bytes = (tokens * n * bits + 7) // 8
    codes = _unpack_bits(data[:code_bytes], tokens * n, bits).reshape(tokens, n)
    scales = data[code_bytes:].view("<f2").reshape(tokens, n // group) if group else None
    return int_dequantize(codes, scales, bits, group)


def simulate_fixed(z: np.ndarray, kind: int, group: int) -> np.ndarray:
    """Reconstruction of ``z [T, n]`` through a fixed-width block (what the decoder will see)."""
    if kind == TYPE_FP8:
        return fp8_dequantize(fp8_quantize(z))
    codes, scales = int_quantize(z, INT_BITS[kind], group)
    return int_dequantize(codes, scales, INT_BITS[kind], group)


# ------------------------------------------------------------------------------------------------ profile


@dataclass(frozen=True)
class Allocation:
    """One preset: per block its type (:data:`TYPES`), parameter (rate class or group size) and progressive rank."""

    name: str
    block_type: np.ndarray  # uint8 [blocks]
    block_param: np.ndarray  # int64 [blocks]: rate class (ec) or group size (int)
    block_rank: np.ndarray  # int64 [blocks]: order of importance (0 first) for progressive layers
    info: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Projection:
    """Group ``g``'s PCA restricted to the ``U`` used components, with centring, weights and ``sigma`` folded in:
    ``z = x_g @ encode - encode_bias`` and ``x_g = z @ decode + decode_bias`` (float32; ``x_g = x[:, columns]``, all
    of ``x`` when ``columns`` is ``None``)."""

    used: np.ndarray  # int64 [U]: component indices
    columns: torch.Tensor | None  # int64 [D_g] feature indices, None for the identity
    encode: torch.Tensor  # [D_g, U]
    encode_bias: torch.Tensor  # [U]
    decode: torch.Tensor  # [U, D_g]
    decode_bias: torch.Tensor  # [D_g]


@dataclass(frozen=True, eq=False)
class TransformProfile:
    """A parsed, validated transform profile (see :mod:`kvpack.calibrate` for how it is made)."""

    profile: Profile
    groups: list[np.ndarray]  # feature indices per PCA group
    means: list[torch.Tensor]  # float32 [D_g]
    weights: list[torch.Tensor]  # float32 [D_g]
    bases: list[torch.Tensor]  # float32 [C_g, D_g], rows orthonormal
    sigmas: list[np.ndarray]  # float32 [C_g]
    freqs: np.ndarray  # uint32 [N_RATES, ALPHABET]
    shrink: np.ndarray  # float32 [N_RATES]: reconstruction offset per class
    presets: dict[str, Allocation]
    recipe: str
    rounding: float
    sink_format: str

    subs: dict[tuple[str, int], Projection] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.profile.hash

    def projection(self, alloc: Allocation, g: int) -> Projection:
        """The affine maps of group ``g`` restricted to the components ``alloc`` codes (cached per preset)."""
        key = (alloc.name, g)
        if key not in self.subs:
            comps = [np.arange(s, s + n) for b in np.flatnonzero(alloc.block_type != TYPE_DROP)
                     for gg, s, n in [self.block_span(int(b))] if gg == g]
            used = np.concatenate(comps) if comps else np.zeros(0, np.int64)
            basis = self.bases[g][torch.from_numpy(used)].double()  # [U, D_g]
            sigma = torch.from_numpy(self.sigmas[g][used]).double()[:, None]
            w, mean = self.weights[g].double(), self.means[g].double()
            idx = self.groups[g]
            whole = idx.size == sum(len(i) for i in self.groups) and bool((idx == np.arange(idx.size)).all())
            self.subs[key] = Projection(
                used=used, columns=None if whole else torch.from_numpy(idx),
                encode=(basis * w / sigma).T.float().contiguous(), encode_bias=((mean * w) @ basis.T / sigma[:, 0])
                .float(), decode=(basis * sigma / w).float().contiguous(), decode_bias=self.means[g])
        return self.subs[key]

    @property
    def block_group(self) -> np.ndarray:
        """int64 [blocks]: the PCA group of each block."""
        return np.concatenate([np.full(-(-len(s) // BLOCK), g) for g, s in enumerate(self.sigmas)]).astype(np.int64)

    def block_span(self, block: int) -> tuple[int, int, int]:
        """``(group, first component, count)`` of ``block``."""
        for g, s in enumerate(self.sigmas):
            n = -(-len(s) // BLOCK)
            if block < n:
                start = block * BLOCK
                return g, start, min(BLOCK, len(s) - start)
            block -= n
        raise IndexError(block)

    def choose(self, preset: str | None, target_ratio: float | None, max_kl: float | None) -> Allocation:
        """The allocation a codec asks for (rate control over the stored presets' calibration measurements)."""
        ordered = sorted(self.presets.values(), key=lambda a: a.info["ratio"])
        if preset is not None:
            if preset not in self.presets:
                raise CodecError(f"profile has no preset {preset!r}; it has {sorted(self.presets)}")
            return self.presets[preset]
        if target_ratio is not None:
            meeting = [a for a in ordered if a.info["ratio"] >= target_ratio]
            if not meeting:
                raise CodecError(f"no preset reaches ratio {target_ratio} (highest {ordered[-1].info['ratio']:.1f})")
            return meeting[0]
        if max_kl is not None:
            measured = [a for a in ordered if a.info.get("kl") is not None]
            if not measured:
                raise CodecError("this profile has no KL measurements; recalibrate with the model to use max_kl")
            good = [a for a in measured if a.info["kl"] <= max_kl]
            if not good:
                raise CodecError(f"no preset meets KL <= {max_kl} (best {min(a.info['kl'] for a in measured):.4g})")
            return good[-1]
        default = self.profile.meta.get("default_preset")
        if default not in self.presets:
            raise CodecError("profile names no default preset; pass preset=, target_ratio= or max_kl=")
        return self.presets[default]


def profile_from(profile: Profile) -> TransformProfile:
    """Validate a profile written by :mod:`kvpack.calibrate`; :class:`FormatError` on anything inconsistent."""
    meta, arrays = profile.meta, profile.arrays
    try:
        grouping, recipe = str(meta["grouping"]), str(meta["recipe"])
        rounding, sink_format = float(meta["rounding"]), str(meta["sink_format"])
        groups = feature_groups(int(meta["layers"]), int(meta["width"]), grouping)
        means, weights, bases, sigmas = [], [], [], []
        for g, idx in enumerate(groups):
            mean, weight = arrays[f"mean{g}"].astype(np.float32), arrays[f"weight{g}"].astype(np.float32)
            basis, sigma = arrays[f"basis{g}"].astype(np.float32), arrays[f"sigma{g}"].astype(np.float32)
            if mean.shape != (len(idx),) or weight.shape != (len(idx),) or basis.ndim != 2 \
                    or basis.shape[1] != len(idx) or sigma.shape != (basis.shape[0],) or not np.all(sigma > 0):
                raise FormatError(f"profile group {g} arrays have inconsistent shapes")
            means.append(torch.from_numpy(mean))
            weights.append(torch.from_numpy(weight))
            bases.append(torch.from_numpy(basis))
            sigmas.append(sigma)
        freqs = entropy.tables.validate_freqs(arrays["freqs"]).astype(np.uint32)
        shrink = arrays["shrink"].astype(np.float32)
        if freqs.shape != (N_RATES, ALPHABET) or shrink.shape != (N_RATES,):
            raise FormatError("profile tables have the wrong shape")
        n_blocks = sum(-(-len(s) // BLOCK) for s in sigmas)
        presets = {}
        for info in meta["presets"]:
            name = str(info["name"])
            kinds, params = arrays[f"type.{name}"].astype(np.int64), arrays[f"param.{name}"].astype(np.int64)
            rank = arrays[f"rank.{name}"].astype(np.int64)
            if kinds.shape != (n_blocks,) or params.shape != (n_blocks,) or rank.shape != (n_blocks,):
                raise FormatError(f"preset {name!r} does not cover the profile's {n_blocks} blocks")
            if np.any((kinds < 0) | (kinds >= len(TYPES))) or sorted(rank.tolist()) != list(range(n_blocks)):
                raise FormatError(f"preset {name!r} has invalid block types or ranks")
            ec = kinds == TYPE_EC
            fixed = (kinds >= TYPE_INT2) & (kinds <= TYPE_INT8)
            if np.any(ec & ((params < 0) | (params >= N_RATES))) or np.any(fixed & ~np.isin(params, GROUPS)):
                raise FormatError(f"preset {name!r} has invalid block parameters")
            presets[name] = Allocation(name, kinds.astype(np.uint8), params, rank, dict(info))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"not a valid transform profile: {exc}") from None
    if sink_format not in ("exact", "fp8") or recipe not in ("transform", "kvtc") or not 0 < rounding <= 0.5:
        raise FormatError("profile has an unknown recipe, sink format or rounding")
    return TransformProfile(profile, groups, means, weights, bases, sigmas, freqs, shrink, presets, recipe, rounding,
                            sink_format)


_CACHE: dict[tuple[str, int, int], TransformProfile] = {}
_LOCK = threading.Lock()


def load_profile(path: str) -> TransformProfile:
    """Load and validate the profile at ``path`` once per (path, size, mtime)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise CodecError(f"cannot read transform profile {path!r}: {exc}; run `kvpack calibrate` first") from None
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = profile_from(Profile.load(path))
        return _CACHE[key]


# ------------------------------------------------------------------------------------------------ codec


@dataclass(frozen=True)
class _Layout:
    """Where every block of an allocation goes, for one progressive layer."""

    ec_group: np.ndarray  # int64 [n_ec]: PCA group of each entropy-coded column (sorted by class)
    ec_comp: np.ndarray  # int64 [n_ec]: component index within its group
    ec_class: np.ndarray  # int64 [n_ec]: rate class, non-decreasing
    fixed: list[tuple[int, int, int, int, int]]  # (group, start, count, type, group size) per fixed-width block


class _Partial(Container):
    """A container read from a prefix of its bytes: trailing layers may be missing."""


@register
@dataclass(frozen=True)
class TransformCodec(Codec):
    """Calibrated PCA transform coding (KVTC-style, with weighted distortion and entropy-coded levels).

    Parameters: ``profile`` (path of a profile made by :func:`kvpack.calibrate.calibrate`); at most one of
    ``preset`` (a name stored in the profile), ``target_ratio`` (the highest-quality preset whose calibration ratio is
    at least this) and ``max_kl`` (the highest-ratio preset whose KL measured at calibration is at most this); the
    profile's default preset otherwise. ``sinks``: tokens at positions below it are stored apart (exact bf16, or fp8
    under the kvtc recipe). ``layers``: progressive layers (1 = not progressive).
    """

    name = "transform"
    version = 1
    recipe: ClassVar[str] = "transform"
    profile: str = field(default="", repr=False)  # not in params(): chunks are tied to the profile's hash
    preset: str | None = None
    target_ratio: float | None = None
    max_kl: float | None = None
    sinks: int = 4
    layers: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"{self.name} needs profile=PATH (make one with `kvpack calibrate`)")
        if sum(x is not None for x in (self.preset, self.target_ratio, self.max_kl)) > 1:
            raise ValueError("give at most one of preset, target_ratio and max_kl")
        if self.target_ratio is not None and not (isinstance(self.target_ratio, int | float) and self.target_ratio > 1):
            raise ValueError(f"target_ratio must be a number > 1, got {self.target_ratio!r}")
        if self.max_kl is not None and not (isinstance(self.max_kl, int | float) and self.max_kl > 0):
            raise ValueError(f"max_kl must be a positive number, got {self.max_kl!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError("preset must be a string")
        if not isinstance(self.sinks, int) or not 0 <= self.sinks <= 4096:
            raise ValueError(f"sinks must be an int in [0, 4096], got {self.sinks!r}")
        if not isinstance(self.layers, int) or not 1 <= self.layers <= 8:
            raise ValueError(f"layers must be an int in [1, 8], got {self.layers!r}")

    # -------------------------------------------------------------------------------------------- profile

    def state(self) -> TransformProfile:
        """The loaded profile (cached per path)."""
        st = load_profile(self.profile)
        if st.recipe != self.recipe:
            raise CodecError(f"profile {self.profile} was calibrated for the {st.recipe!r} recipe, not {self.recipe!r}")
        return st

    def profile_hash(self) -> str | None:
        return self.state().hash

    def profile_nbytes(self) -> int | None:
        return self.state().profile.nbytes

    def allocation(self) -> Allocation:
        """The preset this codec's rate control picks."""
        return self.state().choose(self.preset, self.target_ratio, self.max_kl)

    def _layer_blocks(self, st: TransformProfile, alloc: Allocation, layers: int) -> list[np.ndarray]:
        """Used blocks in importance order, split so that layer ``k`` ends near ``2**(k+1-L)`` of the bits.

        Bits per block are estimated from the allocation alone (entropy of a Gaussian at the class's step, or the
        fixed width), so encoder and decoder agree without extra data.
        """
        used = np.flatnonzero(alloc.block_type != TYPE_DROP)
        used = used[np.argsort(alloc.block_rank[used], kind="stable")]
        kinds, params = alloc.block_type[used], alloc.block_param[used]
        per_comp = np.where(kinds == TYPE_EC, np.maximum(0.1, np.log2(rates()[np.minimum(params, N_RATES - 1)]) + 2.05),
                            np.where(kinds == TYPE_FP8, 8.0, 0.0))
        for kind, bits in INT_BITS.items():
            per_comp = np.where(kinds == kind, bits + np.where(params > 0, 16.0 / np.maximum(params, 1), 0.0), per_comp)
        cum = np.cumsum(per_comp) / max(float(per_comp.sum()), 1e-9)
        ends = [int(np.searchsorted(cum, 2.0 ** (k + 1 - layers) - 1e-9)) + 1 for k in range(layers - 1)]
        bounds = [0, *np.minimum(ends, len(used)), len(used)]
        return [np.sort(used[bounds[k] : max(bounds[k], bounds[k + 1])]) for k in range(layers)]

    def _layout(self, st: TransformProfile, alloc: Allocation, blocks: np.ndarray) -> _Layout:
        groups, comps, classes, fixed = [], [], [], []
        for b in blocks:
            g, start, n = st.block_span(int(b))
            kind, param = int(alloc.block_type[b]), int(alloc.block_param[b])
            if kind == TYPE_EC:
                groups.append(np.full(n, g))
                comps.append(np.arange(start, start + n))
                classes.append(np.full(n, param))
            elif kind != TYPE_DROP:
                fixed.append((g, start, n, kind, param if kind != TYPE_FP8 else 0))
        cls = _cat(classes)
        order = np.argsort(cls, kind="stable")
        return _Layout(_cat(groups)[order], _cat(comps)[order], cls[order], fixed)

    # -------------------------------------------------------------------------------------------- encode

    def encode_payload(self, kv: KVCache) -> Payload:
        st = self.state()
        if kv.spec.fingerprint != st.profile.model_fingerprint:
            raise CodecError(f"profile {self.profile} was calibrated on another model "
                             f"({st.profile.model_fingerprint[:12]}, cache is {kv.spec.fingerprint[:12]})")
        alloc = self.allocation()
        sink = kv.positions < self.sinks
        coded = ~sink
        sections = {"sinks": self._encode_sinks(kv, sink, st.sink_format)}
        x = features(kv, coded)
        zs = [self._project(st, alloc, g, x) for g in range(len(st.groups))]
        layers = self._layer_blocks(st, alloc, self.layers)
        for k, blocks in enumerate(layers):
            sections.update(self._encode_layer(st, k, self._layout(st, alloc, blocks), zs, x.shape[0]))
        meta = {"preset": alloc.name, "layers": len(layers), "coded": int(x.shape[0])}
        return Payload(meta=meta, sections=sections)

    @staticmethod
    def _project(st: TransformProfile, alloc: Allocation, g: int, x: torch.Tensor) -> np.ndarray:
        """Normalized coefficients ``z [T, C_g]`` of PCA group ``g`` (zero for components the preset drops)."""
        p = st.projection(alloc, g)
        z = np.zeros((x.shape[0], len(st.sigmas[g])), np.float32)
        z[:, p.used] = torch.addmm(-p.encode_bias, x if p.columns is None else x[:, p.columns], p.encode).numpy()
        return z

    def _encode_layer(self, st: TransformProfile, k: int, lay: _Layout, zs: list[np.ndarray],
                      tokens: int) -> dict[str, bytes]:
        blob, escapes, lows = b"", b"", b""
        if lay.ec_comp.size and tokens:
            z = np.empty((lay.ec_comp.size, tokens), np.float32)  # [n_ec, T]
            for g in range(len(zs)):
                sel = lay.ec_group == g
                z[sel] = zs[g][:, lay.ec_comp[sel]].T
            r = rates()[lay.ec_class][:, None]
            u = zigzag(ec_quantize(z, r, st.rounding))
            b = low_bits()[lay.ec_class][:, None]
            high, low = u >> b, u & ((1 << b) - 1)
            esc = (high >= ESCAPE) | (st.freqs[lay.ec_class[:, None], np.minimum(high, ESCAPE)] == 0)
            escapes = encode_varints(high[esc]).tobytes()
            symbols = np.where(esc, ESCAPE, high).astype(np.uint8).reshape(-1)
            classes, counts = np.unique(lay.ec_class, return_counts=True)
            starts = np.concatenate([[0], np.cumsum(counts * tokens)]).astype(np.int64)
            blob = entropy.pack(symbols, starts, classes.astype(np.int32), st.freqs, include_tables=False)
            lows = b"".join(_pack_bits(low[b[:, 0] == nb].reshape(-1), int(nb)) for nb in np.unique(b[:, 0]) if nb)
        fixed = b"".join(fixed_encode(zs[g][:, s : s + n], kind, gs) for g, s, n, kind, gs in lay.fixed)
        if st.recipe == "kvtc":
            fixed = zlib.compress(fixed, 9)
        return {f"e{k}": blob, f"x{k}": escapes, f"b{k}": lows, f"i{k}": fixed}

    @staticmethod
    def _encode_sinks(kv: KVCache, sink: torch.Tensor, fmt: str) -> bytes:
        tensors = [t[:, sink] for pair in zip(kv.keys, kv.values, strict=True) for t in pair]
        if fmt == "exact" or not tensors[0].numel():
            return tensor_bytes(tensors)
        out = []
        for t in tensors:
            scale = max(float(t.float().abs().max()), 1e-30) / 448.0
            out.append(struct.pack("<f", scale) + (t.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
                       .numpy().tobytes())
        return b"".join(out)

    # -------------------------------------------------------------------------------------------- decode

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec,
                       num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        st = self.state()
        preset, n_layers, coded = meta.get("preset"), meta.get("layers"), meta.get("coded")
        if preset not in st.presets or not isinstance(n_layers, int) or not 1 <= n_layers <= 8 \
                or not isinstance(coded, int) or not 0 <= coded <= num_tokens:
            raise FormatError("transform payload meta is invalid or names a preset the profile lacks")
        _, positions, _ = _tokens_info(container.header, container)
        sink = positions < self.sinks
        if int((~sink).sum()) != coded:
            raise FormatError(f"payload codes {coded} tokens but {int((~sink).sum())} are not sinks")
        alloc = st.presets[str(preset)]
        zs = [np.zeros((coded, len(s)), np.float32) for s in st.sigmas]
        for k, blocks in enumerate(self._layer_blocks(st, alloc, n_layers)):
            names = [f"{p}{k}" for p in "exbi"]
            if isinstance(container, _Partial) and not all(n in container.sections for n in names):
                break
            self._decode_layer(st, self._layout(st, alloc, blocks), [container.section(n) for n in names], zs, coded)
        x = torch.empty(coded, sum(len(g) for g in st.groups))
        for g in range(len(st.groups)):
            p = st.projection(alloc, g)
            z = torch.from_numpy(np.ascontiguousarray(zs[g][:, p.used]))
            if p.columns is None:
                torch.addmm(p.decode_bias, z, p.decode, out=x)
            else:
                x[:, p.columns] = torch.addmm(p.decode_bias, z, p.decode)
        keys_c, values_c = unfeatures(x, positions[~sink], spec)
        keys_s, values_s = self._decode_sinks(container.section("sinks"), spec, int(sink.sum()), st.sink_format)
        if not bool(sink.any()):
            return [t.to(spec.torch_dtype) for t in keys_c], [t.to(spec.torch_dtype) for t in values_c]
        shape = (spec.num_kv_heads, num_tokens, spec.head_dim)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in range(spec.num_layers):
            for out, c, s in ((keys, keys_c, keys_s), (values, values_c, values_s)):
                t = torch.empty(shape, dtype=spec.torch_dtype)
                t[:, ~sink] = c[layer].to(spec.torch_dtype)
                t[:, sink] = s[layer]
                out.append(t)
        return keys, values

    def _decode_layer(self, st: TransformProfile, lay: _Layout, data: list[memoryview], zs: list[np.ndarray],
                      tokens: int) -> None:
        escapes, lows, fixed = (np.frombuffer(d, np.uint8) for d in data[1:])
        blob = data[0]
        n_ec = lay.ec_comp.size
        if n_ec and tokens:
            symbols, starts = entropy.unpack(blob, max_symbols=n_ec * tokens, freqs=st.freqs)
            _, counts = np.unique(lay.ec_class, return_counts=True)
            if not np.array_equal(starts, np.concatenate([[0], np.cumsum(counts * tokens)])):
                raise FormatError("entropy-coded lanes do not match the preset's layout")
            high = symbols.astype(np.int64).reshape(n_ec, tokens)
            esc = high == ESCAPE
            values, pos = decode_varints(escapes, 0, int(esc.sum()), 1 << 31)
            if pos != escapes.size:
                raise FormatError("escape section is malformed or has trailing bytes")
            high[esc] = values
            b = low_bits()[lay.ec_class]
            need = sum((int((b == nb).sum()) * tokens * int(nb) + 7) // 8 for nb in np.unique(b) if nb)
            if lows.size != need:
                raise FormatError(f"low-bit section has {lows.size} bytes, expected {need}")
            low = np.zeros_like(high)
            pos = 0
            for nb in np.unique(b):
                if nb:
                    rows = b == nb
                    size = (int(rows.sum()) * tokens * int(nb) + 7) // 8
                    low[rows] = _unpack_bits(lows[pos : pos + size], int(rows.sum()) * tokens, int(nb)).reshape(-1,
                                                                                                                tokens)
                    pos += size
            q = unzigzag((high << b[:, None]) | low)
            z = ec_dequantize(q, rates()[lay.ec_class][:, None], st.shrink[lay.ec_class][:, None])
            for g in range(len(zs)):
                sel = lay.ec_group == g
                zs[g][:, lay.ec_comp[sel]] = z[sel].T
        elif len(blob) or escapes.size or lows.size:
            raise FormatError("entropy-coded sections present where the preset has none")
        if st.recipe == "kvtc" and (lay.fixed or fixed.size):
            limit = sum(fixed_bytes(kind, gs, tokens, n) for _, _, n, kind, gs in lay.fixed)
            fixed = _inflate(fixed, limit)
        pos = 0
        for g, s, n, kind, gs in lay.fixed:
            size = fixed_bytes(kind, gs, tokens, n)
            if pos + size > fixed.size:
                raise FormatError("fixed-width section is truncated")
            zs[g][:, s : s + n] = fixed_decode(fixed[pos : pos + size], kind, gs, tokens, n)
            pos += size
        if pos != fixed.size:
            raise FormatError("fixed-width section has trailing bytes")

    @staticmethod
    def _decode_sinks(data: memoryview, spec: ModelSpec, count: int, fmt: str) -> tuple[list[torch.Tensor],
                                                                                         list[torch.Tensor]]:
        per = spec.num_kv_heads * count * spec.head_dim
        shape = (spec.num_kv_heads, count, spec.head_dim)
        n = 2 * spec.num_layers
        if fmt == "exact" or count == 0:
            size = torch.empty((), dtype=spec.torch_dtype).element_size()
            if len(data) != n * per * size:
                raise FormatError(f"sink section has {len(data)} bytes, expected {n * per * size}")
            ints = np.frombuffer(data, dtype=f"<i{size}").astype(f"=i{size}")
            flat = torch.from_numpy(ints).view(spec.torch_dtype)
        else:
            if len(data) != n * (4 + per):
                raise FormatError(f"fp8 sink section has {len(data)} bytes, expected {n * (4 + per)}")
            raw = np.frombuffer(data, np.uint8).reshape(n, 4 + per)
            scales = torch.from_numpy(raw[:, :4].copy().view("<f4").astype(np.float32))
            vals = torch.from_numpy(raw[:, 4:].copy()).view(torch.float8_e4m3fn).float() * scales
            flat = vals.reshape(-1).to(spec.torch_dtype)
        tensors = [t.view(shape) for t in flat.split(per)] if per else [flat.view(shape)] * n
        return tensors[0::2], tensors[1::2]

    def decode_prefix(self, data: bytes | memoryview, max_bytes: int | None = None,
                      spec: ModelSpec | None = None) -> KVCache:
        """Decode from the first ``max_bytes`` bytes of a container (all of ``data`` if ``None``).

        Complete progressive layers in the prefix are decoded; later ones count as zero (lower quality). The prefix
        must hold the header, the positions and the sinks; every section used is checksum-verified.
        """
        view = memoryview(data).cast("B")
        view = view[: len(view) if max_bytes is None else max_bytes]
        if len(view) < PREFIX_BYTES:
            raise FormatError("prefix too short for a container header")
        _, _, _, head_len, _ = struct.unpack_from("<8sHHIQ", view, 0)
        if PREFIX_BYTES + head_len > len(view):
            raise FormatError("prefix does not hold the container header")
        (stored,) = struct.unpack_from("<I", view, PREFIX_BYTES - 4)
        head = bytes(view[PREFIX_BYTES : PREFIX_BYTES + head_len])
        if bytes(view[:4]) != b"\x89KVP" or crc32(bytes(view[: PREFIX_BYTES - 4]) + head) != stored:
            raise FormatError("not a kvpack container, or its header is corrupted")
        header = json.loads(head)
        area = view[PREFIX_BYTES + head_len :]
        sections: dict[str, memoryview] = {}
        for entry in header.get("sections", []):
            off, length, name = entry.get("offset"), entry.get("length"), entry.get("name")
            if not (isinstance(off, int) and isinstance(length, int) and isinstance(name, str)) \
                    or off + length > len(area):
                break
            body = area[off : off + length]
            if crc32(body) != entry.get("crc32"):
                raise FormatError(f"section {name!r} checksum mismatch")
            sections[name] = body
        info = header.get("codec")
        if not isinstance(info, dict) or info.get("name") != self.name or info.get("params") != self.params():
            raise CodecError("container was not written by this codec with these parameters")
        if "sinks" not in sections:
            raise FormatError("prefix does not reach the sink section; read more bytes")
        return self._decode_container(_Partial(header=header, sections=sections), spec, None)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _inflate(data: np.ndarray, limit: int) -> np.ndarray:
    """DEFLATE-decompress ``data`` to at most ``limit`` bytes; :class:`FormatError` on bad or oversized input."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(data.tobytes(), limit + 1)
    except zlib.error as exc:
        raise FormatError(f"fixed-width section is not valid DEFLATE: {exc}") from None
    if len(out) > limit or not d.eof:
        raise FormatError("fixed-width section inflates to the wrong size")
    return np.frombuffer(out, np.uint8)


@register
@dataclass(frozen=True)
class KvtcCodec(TransformCodec):
    """The KVTC recipe as published (arXiv 2511.01815): separate K and V PCA, int2/int4/fp8 blocks with group scales,
    DEFLATE of the packed symbols, fp8 sinks; calibrate with ``recipe="kvtc"``. Same parameters as ``transform``."""

    name = "kvtc"
    recipe: ClassVar[str] = "kvtc"


__all__ = ["TYPES", "Allocation", "KvtcCodec", "TransformCodec", "TransformProfile", "features", "load_profile",
           "profile_from", "unfeatures"]
