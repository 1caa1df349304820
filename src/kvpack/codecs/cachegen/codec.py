"""`cachegen`: the KV encoder of CacheGen (Liu et al., "CacheGen: KV Cache Compression and Streaming for Fast Large
Language Model Serving", SIGCOMM 2024, arXiv 2310.07240, §5.2), with symbol tables profiled offline per model.

What the paper's encoder does, and what this codec does for each step (full account in ``docs/cachegen.md``):

- *Change-based encoding* (§5.2, Fig. 6): tokens are cut into groups of ``GROUP_SIZE = 10``; the first token of a
  group (the anchor) is coded on its own, the other nine as deltas from the anchor. Here every element is first
  mapped to its bin index ``q = floor((x - mean) / s + 1/2)``; the anchor codes ``q_a``, each other token
  ``q - q_a``. That is exactly "quantize the delta against the *reconstructed* anchor" of the paper, because the
  anchor and the delta share the bin ``s`` and the anchor's reconstruction lies on the bin lattice: the decoder's
  ``mean + s * (q_a + (q - q_a))`` is the same number whether or not anchor/delta coding is on, and errors never
  accumulate. ``anchor_delta=False`` codes every token's ``q`` directly (the ablation; the public CacheGen code has
  no delta step at all).
- *Layer-wise quantization* (§5.2): the layers form three groups (first, middle, last third), deeper groups get
  coarser bins. The bin of channel ``c`` of layer ``l`` is ``s = bins[level, group(l)] * std[l, kind, c]``: a
  per-(layer, K/V, channel) normalization measured on calibration data (the paper's bin sizes are in the units of
  its models' KV values; normalizing makes them portable across channels and models). ``bins`` and ``std`` come from
  the profile.
- *Arithmetic coding with per-(layer, channel) distributions profiled offline* (§5.2): each (layer, K/V, channel,
  role) has its own frequency table, where role is ``raw`` (anchors, or every token without anchor/delta) or
  ``delta``. Tables live in the per-model profile (:mod:`kvpack.codecs.cachegen.calibrate`), never in a chunk: a chunk's
  header names the profile's hash. Coding is kvpack's interleaved rANS (:mod:`kvpack.entropy`), one lane per
  (layer, K/V, channel, role) in the order of the tables.
- *Quality levels* (§5.3 streams each chunk at one of several levels): ``level`` 0/1/2 (``"low"``, ``"medium"``,
  ``"high"``) picks one row of ``bins``; the profile holds tables for each level.

Each table covers a window of ``width`` consecutive values starting at ``lo`` (chosen from calibration data): a
coded value ``v`` (``q`` for raw, ``q - q_a`` for delta) is the symbol ``v - lo`` inside its window; outside it is the
escape symbol ``alphabet - 1`` and its ``zigzag(v - lo)`` goes, in lane order, to the ``escapes`` section as LEB128
varints. That is :func:`kvpack.entropy.split_escapes` applied to ``v - lo`` inside and ``-1 - zigzag(v - lo)``
outside, fused into the numba kernels (a test checks the equality). Lane ``2 r`` holds row ``r``'s anchors and lane
``2 r + 1`` its deltas (without anchor/delta: lane ``r``, all tokens), ``r = (layer * 2 + kind) * C + channel``.

Error bound, per element, for any finite input: ``|x - x_hat| <= s / 2 + u * |x_hat| + 2**-50 * |mean| + t``, with
``s`` the element's bin (:meth:`CacheGen.bin_widths`), ``u`` the output dtype's unit roundoff plus float32's
(``2**-8 + 2**-23`` for bfloat16, ``2**-11 + 2**-23`` for float16, ``2**-24`` for float32: the decoder computes in
float64, rounds to float32, then to the output dtype), ``2**-50 * |mean|`` the float64 arithmetic, and ``t`` half
the dtype's smallest subnormal (:func:`error_bound` evaluates it). Inputs more than ``2**28`` bins from the profile's
mean, and non-finite inputs, are refused with :class:`CodecError`.

Payload: meta ``{"group_size": 10, "escapes": E}``; sections ``symbols`` (a :func:`kvpack.entropy.pack` blob packed
with ``include_tables=False``) and ``escapes`` (``E`` varints).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.base import Payload, register
from kvpack.codecs.cachegen.profile import (
    CODEC_NAME,
    GROUP_SIZE,
    LEVELS,
    ROLE_DELTA,
    ROLE_RAW,
    CacheGenTables,
)
from kvpack.codecs.calibrated import CalibratedCodec, Log, config_from_options
from kvpack.codecs.validate import Size, json_int
from kvpack.entropy import MIN_PACKED_BYTES, max_packed_bytes, pack, parse
from kvpack.entropy.models import Model
from kvpack.entropy.rans import LaneStream, decode_lanes
from kvpack.entropy.tables import decode_varints, encode_varints
from kvpack.errors import CodecError, FormatError, ModelMismatchError
from kvpack.format import Container
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

if TYPE_CHECKING:
    from kvpack.codecs.cachegen.calibrate import CalibrationConfig
    from kvpack.eval.corpora import Document

__all__ = ["CacheGen", "error_bound", "kv_array", "quantize_indices", "read_stream"]

#: Largest ``|q|`` accepted; keeps every escape value inside int32.
MAX_INDEX = 1 << 28

_DTYPE_ROUNDOFF = {torch.bfloat16: 2.0**-8 + 2.0**-23, torch.float16: 2.0**-11 + 2.0**-23, torch.float32: 2.0**-24}

# --------------------------------------------------------------------------------------------- numba kernels


@njit(nogil=True, cache=True, inline="always")
def _index(x: float, m: float, inv: float) -> tuple[np.int64, bool]:
    """Bin index ``floor((x - m) * inv + 1/2)`` and whether it is unusable (NaN, inf, ``MAX_INDEX`` bins or more)."""
    u = (x - m) * inv
    return np.int64(np.floor(min(max(u, -MAX_INDEX), MAX_INDEX) + 0.5)), not abs(u) < MAX_INDEX


@njit(nogil=True, cache=True, inline="always")
def _slot(t, n, n_anchor, delta):  # type: ignore[no-untyped-def]
    """Where token ``t`` of a row goes: ``(role, offset in the row's T symbols)``; the row's anchor lane comes first."""
    if not delta:
        return ROLE_RAW, t
    g = t // GROUP_SIZE
    if t == g * GROUP_SIZE:
        return ROLE_RAW, g
    return ROLE_DELTA, n_anchor + t - g - 1


@njit(nogil=True, cache=True, inline="always")
def _load(x, ly, k, h, t, bits, as_u32, as_f32):  # type: ignore[no-untyped-def]
    """``as_f32[:] = x[ly, k, h, t, :]`` as float32; ``bits``: ``x`` holds bfloat16 bit patterns (uint16)."""
    for d in range(as_f32.shape[0]):
        if bits:
            as_u32[d] = np.uint32(x[ly, k, h, t, d]) << np.uint32(16)
        else:
            as_f32[d] = x[ly, k, h, t, d]


@njit(nogil=True, cache=True, parallel=True)
def _encode_kernel(x, bits, mean, inv, lo, width, delta, escape, symbols, lane_escapes):  # type: ignore[no-untyped-def]
    """Quantize and map to symbols in one pass.

    ``x`` ``[L, 2, H, T, D]`` (float32, or bfloat16 bits as uint16 when ``bits``); ``mean``, ``inv`` (1 / bin)
    float64 ``[R]``; ``lo``, ``width`` int64 ``[R, 2]``; ``escape`` the escape symbol. Fills ``symbols`` (uint8
    ``[R * T]``, lane after lane: row ``r`` holds ``symbols[r*T:(r+1)*T]``, its anchors then its deltas when ``delta``)
    and counts escapes per lane into ``lane_escapes`` (int64). Returns bool ``[L * 2 * H]``: blocks holding
    unusable input.
    """
    n_layers, _, heads, n, dim = x.shape
    n_anchor = (n + GROUP_SIZE - 1) // GROUP_SIZE
    blocks = n_layers * 2 * heads
    bad = np.zeros(blocks, np.bool_)
    lanes_per_row = 2 if delta else 1
    for b in prange(blocks):
        ly, k, h = b // (2 * heads), (b // heads) % 2, b % heads
        rows = slice(b * dim, (b + 1) * dim)
        m, iv, lo_b, width_b = mean[rows], inv[rows], lo[rows], width[rows]
        as_u32 = np.empty(dim, np.uint32)
        as_f32 = as_u32.view(np.float32)
        q_anchor = np.zeros(dim, np.int64)
        escapes = np.zeros(dim * lanes_per_row, np.int64)
        n_bad = 0
        for t in range(n):
            _load(x, ly, k, h, t, bits, as_u32, as_f32)
            role, offset = _slot(t, n, n_anchor, delta)
            out = symbols[b * dim * n + offset : (b + 1) * dim * n : n]  # this token of the block's rows
            if role == ROLE_RAW:
                for d in range(dim):
                    q, unusable = _index(np.float64(as_f32[d]), m[d], iv[d])
                    n_bad += unusable
                    q_anchor[d] = q
                    z = q - lo_b[d, ROLE_RAW]
                    inside = (z >= 0) & (z < width_b[d, ROLE_RAW])
                    out[d] = z if inside else escape
                    escapes[d * lanes_per_row] += not inside
            else:
                for d in range(dim):
                    q, unusable = _index(np.float64(as_f32[d]), m[d], iv[d])
                    n_bad += unusable
                    z = q - q_anchor[d] - lo_b[d, ROLE_DELTA]
                    inside = (z >= 0) & (z < width_b[d, ROLE_DELTA])
                    out[d] = z if inside else escape
                    escapes[d * lanes_per_row + ROLE_DELTA] += not inside
        lane_escapes[b * dim * lanes_per_row : (b + 1) * dim * lanes_per_row] = escapes
        bad[b] = n_bad > 0
    return bad


@njit(nogil=True, cache=True, parallel=True)
def _escape_kernel(x, bits, mean, inv, lo, delta, escape, symbols, lanes, offsets, out):  # type: ignore[no-untyped-def]
    """Escape values of the ``lanes`` that have any: ``out[offsets[i]:...]`` = ``zigzag(q - lo)`` of every escaped
    symbol of lane ``lanes[i]``, in lane order (arguments as :func:`_encode_kernel`; ``out`` int64)."""
    _, _, heads, n, dim = x.shape
    n_anchor = (n + GROUP_SIZE - 1) // GROUP_SIZE
    for i in prange(lanes.shape[0]):
        lane = lanes[i]
        r, role = (lane // 2, lane % 2) if delta else (lane, ROLE_RAW)
        b, d = r // dim, r % dim
        ly, k, h = b // (2 * heads), (b // heads) % 2, b % heads
        as_u32 = np.empty(dim, np.uint32)
        as_f32 = as_u32.view(np.float32)
        p = offsets[i]
        for t in range(n):
            token_role, offset = _slot(t, n, n_anchor, delta)
            if token_role != role or symbols[r * n + offset] != escape:
                continue
            _load(x, ly, k, h, t, bits, as_u32, as_f32)
            q, _ = _index(np.float64(as_f32[d]), mean[r], inv[r])
            if role == ROLE_DELTA:
                _load(x, ly, k, h, t - t % GROUP_SIZE, bits, as_u32, as_f32)
                q_anchor, _ = _index(np.float64(as_f32[d]), mean[r], inv[r])
                q -= q_anchor
            z = q - lo[r, role]
            out[p] = 2 * z if z >= 0 else -2 * z - 1
            p += 1


@njit(nogil=True, cache=True, parallel=True)
def _lane_escape_counts(symbols, lane_starts, escape):  # type: ignore[no-untyped-def]
    """Number of escape symbols in every lane: int64 ``[n_lanes]``."""
    n_lanes = lane_starts.shape[0] - 1
    counts = np.zeros(n_lanes, np.int64)
    for i in prange(n_lanes):
        c = 0
        for j in range(lane_starts[i], lane_starts[i + 1]):
            c += symbols[j] == escape
        counts[i] = c
    return counts


@njit(nogil=True, cache=True, parallel=True)
def _decode_kernel(symbols, escapes, lane_offsets, mean, scale, lo, delta, escape, limit, bits, out):  # type: ignore[no-untyped-def]
    """Inverse of :func:`_encode_kernel` + :func:`_escape_kernel`: ``out[l, k, h, t, d] = mean + scale * q``
    computed in float64, clipped to ``[-limit, limit]``, rounded to float32 and, when ``bits``, on to bfloat16
    (round to nearest even; ``out`` uint16 bit patterns) else stored as float32. Lane ``i``'s escape values
    (int64 zigzag) start at ``escapes[lane_offsets[i]]``."""
    n_layers, _, heads, n, dim = out.shape
    n_anchor = (n + GROUP_SIZE - 1) // GROUP_SIZE
    lanes_per_row = 2 if delta else 1
    per_block = dim * lanes_per_row
    for b in prange(n_layers * 2 * heads):
        ly, k, h = b // (2 * heads), (b // heads) % 2, b % heads
        as_u32 = np.empty(dim, np.uint32)
        as_f32 = as_u32.view(np.float32)
        q_anchor = np.zeros(dim, np.int64)
        ptr = lane_offsets[b * per_block : (b + 1) * per_block].copy()
        for t in range(n):
            role, offset = _slot(t, n, n_anchor, delta)
            for d in range(dim):
                r = b * dim + d
                z = np.int64(symbols[r * n + offset])
                if z == escape:
                    lane = d * lanes_per_row + role
                    e = escapes[ptr[lane]]
                    ptr[lane] += 1
                    z = (e >> 1) ^ -(e & 1)
                q = z + lo[r, role]
                if role == ROLE_RAW:
                    q_anchor[d] = q
                else:
                    q += q_anchor[d]
                as_f32[d] = min(max(mean[r] + scale[r] * np.float64(q), -limit), limit)
            for d in range(dim):
                if bits:
                    v = as_u32[d]
                    out[ly, k, h, t, d] = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) \
                        >> np.uint32(16)
                else:
                    out[ly, k, h, t, d] = as_f32[d]


@njit(nogil=True, cache=True, parallel=True)
def _indices_kernel(x, bits, mean, inv, out):  # type: ignore[no-untyped-def]
    """``out[r, t]`` = bin index of token ``t`` of row ``r`` (``x``, ``bits`` as :func:`_encode_kernel`; ``out``
    int32 ``[R, T]``); returns bool ``[L * 2 * H]``: blocks with unusable input."""
    n_layers, _, heads, n, dim = x.shape
    blocks = n_layers * 2 * heads
    bad = np.zeros(blocks, np.bool_)
    for b in prange(blocks):
        ly, k, h = b // (2 * heads), (b // heads) % 2, b % heads
        as_u32 = np.empty(dim, np.uint32)
        as_f32 = as_u32.view(np.float32)
        n_bad = 0
        for t in range(n):
            _load(x, ly, k, h, t, bits, as_u32, as_f32)
            for d in range(dim):
                r = b * dim + d
                q, unusable = _index(np.float64(as_f32[d]), mean[r], inv[r])
                n_bad += unusable
                out[r, t] = q
        bad[b] = n_bad > 0
    return bad


def kv_array(kv: KVCache) -> tuple[np.ndarray, bool]:
    """The cache as one C-contiguous ``[layers, 2 (K, V), kv_heads, tokens, head_dim]`` array for the kernels:
    ``(array, bits)``, bfloat16 as its uint16 bit patterns (``bits=True``), other dtypes as float32.

    Built with numpy copies only (torch's thread pool competes with numba's when both are busy).
    """
    data = kv.data.contiguous()
    if kv.spec.torch_dtype == torch.bfloat16:
        return data.view(torch.int16).numpy().view(np.uint16), True
    return data.numpy().astype(np.float32), False


def quantize_indices(kv: KVCache, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, bool]:
    """Bin indices ``q`` (int32 ``[R, T]``) of ``kv`` for per-row ``mean`` and ``scale`` (float64 ``[R]``).

    The same arithmetic as the encoder (the profile builder counts these). Returns ``(q, ok)``; ``ok`` is False if
    an input was non-finite or more than ``MAX_INDEX`` bins from its mean.
    """
    x, bits = kv_array(kv)
    n_layers, _, heads, n, dim = x.shape
    out = np.empty((n_layers * 2 * heads * dim, n), np.int32)
    bad = _indices_kernel(x, bits, mean, 1.0 / scale, out)
    return out, not bad.any()


# --------------------------------------------------------------------------------------------- the codec


def _lane_sizes(rows: int, tokens: int, anchor_delta: bool) -> np.ndarray:
    """``lane_starts`` int64: per row one lane of ``tokens`` symbols, or an anchor lane then a delta lane."""
    if anchor_delta:
        n_anchor = -(-tokens // GROUP_SIZE)
        sizes = np.tile(np.array([n_anchor, tokens - n_anchor], np.int64), rows)
    else:
        sizes = np.full(rows, tokens, np.int64)
    starts = np.zeros(sizes.size + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    return starts


@register
@dataclass(frozen=True)
class CacheGen(CalibratedCodec[CacheGenTables]):
    """CacheGen's encoder (arXiv 2310.07240 §5.2) with tables from a per-model profile.

    Parameters:
        profile: the profile (:meth:`calibrate`, :func:`kvpack.codecs.cachegen.calibrate.build_profile`; see
            :class:`CalibratedCodec`): chunks name its hash, so moving the file changes nothing; decode with
            ``kvpack.decode(data, profile=PATH)``.
        level: quality level 0/1/2 or ``"low"``/``"medium"``/``"high"`` (stored as the integer).
        anchor_delta: code groups of 10 tokens as an anchor plus deltas (the paper); ``False`` codes every token's
            bin index directly (same reconstruction, bit for bit; only the entropy coding differs).
    """

    name = CODEC_NAME
    version = 1
    level: int | str = 1
    anchor_delta: bool = True

    def __post_init__(self) -> None:
        level = LEVELS.get(self.level) if isinstance(self.level, str) else self.level
        if isinstance(level, bool) or level not in LEVELS.values():
            raise ValueError(f"cachegen level must be 0, 1, 2 or one of {list(LEVELS)}, got {self.level!r}")
        object.__setattr__(self, "level", level)
        if not isinstance(self.anchor_delta, bool):
            raise ValueError(f"cachegen anchor_delta must be a bool, got {self.anchor_delta!r}")
        super().__post_init__()

    @classmethod
    def calibrate(cls, model: Any, tokenizer: Any, texts: Sequence[str] | None = None, *,
                  docs: "int | Sequence[Document]" = 6, spec: ModelSpec | None = None, log: Log | None = None,
                  **options: Any) -> Profile:
        """The profile of :func:`kvpack.codecs.cachegen.calibrate.build_profile` (``options``: its keyword
        arguments)."""
        from kvpack.codecs.cachegen.calibrate import build_profile
        from kvpack.eval.corpora import Document

        cls.calibration_config(options)
        chosen = docs if texts is None else [Document(name=f"text {i + 1}", kind="file", text=text)
                                             for i, text in enumerate(texts)]
        return build_profile(model, tokenizer, spec or ModelSpec.from_model(model, tokenizer), chosen,
                             on_progress=log, **options)

    @classmethod
    def calibration_config(cls, options: Mapping[str, Any]) -> "CalibrationConfig":
        from kvpack.codecs.cachegen.calibrate import CalibrationConfig

        return config_from_options(CalibrationConfig, options, "cachegen calibration", "docs/cachegen.md")

    @classmethod
    def compile(cls, profile: Profile) -> CacheGenTables:
        return CacheGenTables.from_profile(profile)

    @property
    def tables(self) -> CacheGenTables:
        """The compiled profile."""
        return self.compiled

    @property
    def _level(self) -> int:
        return int(self.level)

    def bin_widths(self) -> np.ndarray:
        """Bin width ``s`` of every channel at this level: float64 ``[layers, 2 (K, V), kv_heads * head_dim]``.

        The per-element error bound is ``s / 2`` plus output rounding (module docstring).
        """
        t = self.tables
        return t.scale(self._level).reshape(t.num_layers, 2, t.num_kv_heads * t.head_dim)

    def _model(self) -> Model:
        """The compiled rANS tables this codec's lanes use (built once per profile and level)."""
        return self.tables.model(self._level, self.anchor_delta)

    def encode_payload(self, kv: KVCache) -> Payload:
        t = self.tables
        try:
            t.check_spec(kv.spec)
        except ModelMismatchError as exc:
            raise CodecError(str(exc)) from None
        lvl = self._level
        x, bits = kv_array(kv)
        freqs = self._model()
        escape = freqs.shape[1] - 1
        starts = _lane_sizes(t.rows, kv.num_tokens, self.anchor_delta)
        symbols = np.empty(int(starts[-1]), np.uint8)
        lane_escapes = np.zeros(starts.size - 1, np.int64)
        inv = 1.0 / t.scale(lvl)
        bad = _encode_kernel(x, bits, t.mean, inv, t.lo[lvl], t.width[lvl], self.anchor_delta, escape, symbols,
                             lane_escapes)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            heads = t.num_kv_heads
            raise CodecError(f"layer {b // (2 * heads)} {'values' if b // heads % 2 else 'keys'} of KV head "
                             f"{b % heads} hold a non-finite value or one more than {MAX_INDEX} bins from the "
                             "profile's mean: this profile does not fit this cache")
        lanes = np.flatnonzero(lane_escapes)
        offsets = np.zeros(lanes.size + 1, np.int64)
        np.cumsum(lane_escapes[lanes], out=offsets[1:])
        escapes = np.empty(int(offsets[-1]), np.int64)
        if lanes.size:
            _escape_kernel(x, bits, t.mean, inv, t.lo[lvl], self.anchor_delta, escape, symbols, lanes, offsets,
                           escapes)
        blob = pack(symbols, starts, np.arange(starts.size - 1, dtype=np.int32), freqs, include_tables=False)
        return Payload(meta={"group_size": GROUP_SIZE, "escapes": int(escapes.size)},
                       sections={"symbols": blob, "escapes": encode_varints(escapes).tobytes()})

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        t = self.tables
        t.check_spec(spec)
        n_symbols = t.rows * num_tokens
        if set(meta) != {"group_size", "escapes"} or json_int(meta["group_size"], "cachegen group_size", 0,
                                                                GROUP_SIZE) != GROUP_SIZE:
            raise FormatError(f"cachegen meta {dict(meta)} is not valid (group_size {GROUP_SIZE}, escapes >= 0)")
        n_escapes = json_int(meta["escapes"], "cachegen escape count", 0, n_symbols)
        freqs = self._model()
        lanes = 2 * t.rows if self.anchor_delta else t.rows
        return {"symbols": Size(MIN_PACKED_BYTES, max_packed_bytes(n_symbols, lanes, freqs.shape[0], freqs.shape[1],
                                                                   include_tables=False)),
                "escapes": Size(n_escapes, 5 * n_escapes)}  # varints of at most 2**31 - 1: 1 to 5 bytes

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        t = self.tables
        stream, escapes, escape = read_stream(self, meta, container, num_tokens)
        starts = stream.lane_starts
        symbols = decode_lanes(stream.words, stream.word_offsets, stream.lane_starts, stream.lane_table, stream.freqs)
        lane_escapes = _lane_escape_counts(symbols, starts, escape)
        if int(lane_escapes.sum()) != escapes.size:
            raise FormatError(f"cachegen symbols hold {int(lane_escapes.sum())} escapes, the header {escapes.size}")
        offsets = np.zeros(starts.size, np.int64)
        np.cumsum(lane_escapes, out=offsets[1:])
        lvl = self._level
        bits = spec.torch_dtype == torch.bfloat16
        shape = (spec.num_layers, 2, spec.num_kv_heads, num_tokens, spec.head_dim)
        decoded = np.empty(shape, np.uint16 if bits else np.float32)
        _decode_kernel(symbols, escapes, offsets, t.mean, t.scale(lvl), t.lo[lvl], self.anchor_delta, escape,
                       float(torch.finfo(spec.torch_dtype).max), bits, decoded)
        if bits:
            return torch.from_numpy(decoded.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(decoded).to(spec.torch_dtype)


def read_stream(codec: CacheGen, meta: Mapping[str, Any], container: Container, num_tokens: int
                ) -> tuple[LaneStream, np.ndarray, int]:
    """The checked symbol stream, the escape values (int64 zigzag, lane order) and the escape symbol of a chunk
    (shared with the GPU decoder); :class:`FormatError` for lanes that are not the profile's or malformed escapes."""
    starts = _lane_sizes(codec.tables.rows, num_tokens, codec.anchor_delta)
    freqs = codec._model()
    stream = parse(container.section("symbols"), max_symbols=int(starts[-1]), freqs=freqs)
    if not np.array_equal(stream.lane_starts, starts) or \
            not np.array_equal(stream.lane_table, np.arange(starts.size - 1)):
        raise FormatError("cachegen symbol lanes do not match the header's token count and the profile")
    escape_raw = np.frombuffer(container.section("escapes"), np.uint8)
    escapes, end = decode_varints(escape_raw, 0, int(meta["escapes"]), 2**31 - 1)
    if end != escape_raw.size:
        raise FormatError("cachegen escapes section is malformed or has trailing bytes")
    return stream, escapes, freqs.shape[1] - 1


def error_bound(codec: CacheGen, decoded: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The guaranteed ``|x - x_hat|`` bound of every element of ``decoded`` (float64, per layer K and V tensors)."""
    spec = decoded.spec
    u = _DTYPE_ROUNDOFF[spec.torch_dtype]
    tiny = float(torch.finfo(spec.torch_dtype).smallest_normal) * float(torch.finfo(spec.torch_dtype).eps) / 2
    shape = (spec.num_layers, 2, spec.num_kv_heads, 1, spec.head_dim)
    mean = torch.from_numpy(codec.tables.mean).view(shape)
    half = torch.from_numpy(codec.bin_widths() / 2).view(shape) + 2.0**-50 * mean.abs()
    keys = [half[i, 0] + u * k.double().abs() + tiny for i, k in enumerate(decoded.keys)]
    values = [half[i, 1] + u * v.double().abs() + tiny for i, v in enumerate(decoded.values)]
    return keys, values
