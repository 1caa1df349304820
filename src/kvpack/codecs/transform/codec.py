"""`transform` and `kvtc`: calibrated PCA transform coding of whole-model KV vectors (see docs/transform.md).

Following KVTC (Staniszewski et al., "KV Cache Transform Coding", arXiv 2511.01815): keys are un-rotated (pre-RoPE,
:mod:`kvpack.rope`), the keys and values of all layers and KV heads of a token are concatenated into one vector
``x [D]`` (``D = 2 * layers * kv_heads * head_dim``), centred and weighted per feature (``w``: how much an error in
that feature costs, measured at calibration), and projected on a PCA basis computed once per model
(:mod:`kvpack.codecs.transform.calibrate`). Each principal component ``i`` is normalized by its calibration
standard deviation ``sigma_i``; the normalized coefficients ``z`` are quantized block by block (``BLOCK``
components) as the profile's allocation says (:data:`TYPES`), and entropy-coded with the rANS engine using frequency
tables kept in the profile, so a chunk carries no tables. Tokens at positions ``< sinks`` (attention sinks) are
stored apart, exactly (or fp8).

Bitstream (``meta`` + sections, per progressive layer ``k``; a layer is a set of blocks, most important first):

- ``sinks``: the sink tokens' post-RoPE keys and values (``bf16`` bits, or fp8 e4m3 with fp32 scales per tensor);
- ``e{k}``: one rANS blob (:func:`kvpack.entropy.pack`, tables from the profile) whose lanes are the entropy-coded
  components of the layer grouped by table (component-major, ``tokens`` symbols each);
- ``x{k}``: LEB128 varints of the escaped symbols' values, in symbol order;
- ``b{k}``: raw low bits of high-resolution components (symbol = zigzag(q) >> b, low b bits stored raw);
- ``i{k}``: fixed-width blocks (int2/int4/int8 codes with fp16 group scales, fp8 bytes), DEFLATE-compressed under
  the ``kvtc`` recipe.

A prefix of the bytes that holds complete layers decodes at lower quality (:meth:`Transform.decode_prefix`).

Encoding and decoding are one GEMM per PCA group each, ``x [tokens, D_g] @ encode [D_g, U]`` and ``z [tokens, U] @
decode [U, D_g]`` (60 MFLOP per token each for SmolLM2's 32x preset), in the precision :func:`projection_dtype` picks
for this CPU: bfloat16 inputs with float32 accumulation where the CPU multiplies bf16 natively (several times faster
there than float32), float32 elsewhere. The bf16 inputs and product add a relative error of about 2^-9 per term,
below both the coefficients' quantization error and the bf16 rounding of the decoded cache. Encoded in bf16, a
coefficient that lies that close to a quantization boundary takes the neighbouring level, so the bytes depend on
the precision (as float32 GEMM kernels of different CPUs already may, in the last bit of a sum); any precision
decodes them. ``$KVPACK_TRANSFORM_GEMM=int8`` (opt-in) decodes the low-rate components' share of the product in
int8 (:mod:`kvpack.codecs.transform.int8`, with its error bound).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from kvpack import cpu, entropy
from kvpack.codecs.base import Payload, _tokens_info, register
from kvpack.codecs.calibrated import CalibratedCodec, Log, config_from_options
from kvpack.codecs.raw import tensor_bytes
from kvpack.codecs.transform import levels
from kvpack.codecs.transform.features import features, place
from kvpack.codecs.transform.int8 import Int8Projection
from kvpack.codecs.transform.profile import MAX_SINKS, Allocation, Projection, TransformProfile, profile_from
from kvpack.codecs.transform.quant import (
    INT_BITS,
    N_RATES,
    TYPE_DROP,
    TYPE_EC,
    TYPE_FP8,
    fixed_bytes,
    fixed_decode,
    fixed_encode,
    rates,
)
from kvpack.codecs.validate import Size, json_int
from kvpack.errors import CodecError, FormatError, ModelMismatchError
from kvpack.format import PREFIX_BYTES, Container, crc32, read_header
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

if TYPE_CHECKING:
    from kvpack.codecs.transform.calibrate import CalibrationConfig
    from kvpack.eval.corpora import Document

#: Environment variable that overrides :func:`projection_dtype`: ``float32``, ``bfloat16``, ``int8`` (decoding the
#: low-rate components in int8, :mod:`kvpack.codecs.transform.int8`) or ``auto`` (default).
PROJECTION_ENV = "KVPACK_TRANSFORM_GEMM"
#: Encoding multiplies in bfloat16 only where its error bound adds at most this share to the preset's calibrated error
BF16_ENCODE_SHARE = 0.02
#: ... and moves no entropy-coded coefficient by more than this variance in squared quantization steps (half a step).
BF16_ENCODE_NOISE = 0.25


def _projection_choice() -> str:
    choice = os.environ.get(PROJECTION_ENV, "auto")
    if choice not in ("float32", "bfloat16", "int8", "auto"):
        raise ValueError(f"${PROJECTION_ENV} must be float32, bfloat16, int8 or auto, not {choice!r}")
    return choice


def projection_dtype() -> torch.dtype:
    """The float precision of the projections on this machine: bfloat16 where the CPU multiplies bf16 natively
    (:func:`kvpack.cpu.native_bf16_matmul`), else float32; ``$KVPACK_TRANSFORM_GEMM`` (``float32``, ``bfloat16``)
    overrides it, e.g. for the same bytes and decoded caches on every machine (up to the last bit of float32 sums);
    ``int8`` keeps this machine's float precision for the encode and the decode's other components."""
    choice = _projection_choice()
    if choice in ("auto", "int8"):
        return torch.bfloat16 if cpu.native_bf16_matmul() else torch.float32
    return torch.float32 if choice == "float32" else torch.bfloat16


def decode_precision() -> str:
    """How the decode projection multiplies: ``int8`` (:mod:`kvpack.codecs.transform.int8`, when
    ``$KVPACK_TRANSFORM_GEMM=int8``), else ``bfloat16`` or ``float32`` (:func:`projection_dtype`)."""
    return "int8" if _projection_choice() == "int8" else str(projection_dtype()).removeprefix("torch.")


@dataclass(frozen=True)
class _Layout:
    """Where every block of an allocation goes, for one progressive layer."""

    ec_group: np.ndarray  # int64 [n_ec]: PCA group of each entropy-coded column (sorted by class)
    ec_comp: np.ndarray  # int64 [n_ec]: component index within its group
    ec_class: np.ndarray  # int64 [n_ec]: rate class, non-decreasing
    fixed: list[tuple[int, int, int, int, int]]  # (group, start, count, type, group size) per fixed-width block
    classes: np.ndarray  # int32 [k]: the distinct rate classes (one rANS lane each)
    counts: np.ndarray  # int64 [k]: components per class


class _Partial(Container):
    """A container read from a prefix of its bytes: trailing layers may be missing."""

    complete = False


@register
@dataclass(frozen=True)
class Transform(CalibratedCodec[TransformProfile]):
    """Calibrated PCA transform coding (KVTC-style, with weighted distortion and entropy-coded levels).

    Parameters: ``profile`` (a profile made by :meth:`calibrate`, see :class:`CalibratedCodec`); at most
    one of ``preset`` (a name stored in the profile), ``target_ratio`` (the highest-quality preset whose calibration
    ratio is at least this) and ``max_kl`` (the highest-ratio preset whose KL measured at calibration is at most
    this); the profile's default preset otherwise. ``sinks``: tokens at positions below it are stored apart (exact
    bf16, or fp8 under the kvtc recipe); default (``None``): as many as the profile was calibrated with, which the
    codec then records (``params()`` names the number). ``layers``: progressive layers (1 = not progressive).
    """

    name = "transform"
    version = 1
    recipe: ClassVar[str] = "transform"
    preset: str | None = None
    target_ratio: float | None = None
    max_kl: float | None = None
    sinks: int | None = None
    layers: int = 1

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.preset, self.target_ratio, self.max_kl)) > 1:
            raise ValueError("give at most one of preset, target_ratio and max_kl")
        if self.target_ratio is not None and not (isinstance(self.target_ratio, int | float) and self.target_ratio > 1):
            raise ValueError(f"target_ratio must be a number > 1, got {self.target_ratio!r}")
        if self.max_kl is not None and not (isinstance(self.max_kl, int | float) and self.max_kl > 0):
            raise ValueError(f"max_kl must be a positive number, got {self.max_kl!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError("preset must be a string")
        if self.sinks is not None and (not isinstance(self.sinks, int) or not 0 <= self.sinks <= MAX_SINKS):
            raise ValueError(f"sinks must be an int in [0, {MAX_SINKS}] or None (the profile's), got {self.sinks!r}")
        if not isinstance(self.layers, int) or not 1 <= self.layers <= 8:
            raise ValueError(f"layers must be an int in [1, 8], got {self.layers!r}")
        super().__post_init__()
        if self.sinks is None:
            object.__setattr__(self, "sinks", self.state().sinks)  # frozen: resolved once, before any use

    # -------------------------------------------------------------------------------------------- profile

    @classmethod
    def calibrate(cls, model: Any, tokenizer: Any, texts: Sequence[str] | None = None, *,
                  docs: int | Sequence[Document] = 6, spec: ModelSpec | None = None, log: Log | None = None,
                  **options: Any) -> Profile:
        """A profile made with the model (:func:`kvpack.codecs.transform.calibrate.calibrate` under this codec's
        recipe; ``options``: the fields of :class:`~kvpack.codecs.transform.calibrate.CalibrationConfig`)."""
        from kvpack.codecs.transform.calibrate import calibrate

        config = cls.calibration_config(options)
        given = None if isinstance(docs, int) else docs
        return calibrate(model, tokenizer, spec or ModelSpec.from_model(model, tokenizer), docs=given,
                         n_docs=docs if isinstance(docs, int) else len(docs), texts=texts, recipe=cls.recipe,
                         config=config, log=log)

    @classmethod
    def calibration_config(cls, options: Mapping[str, Any]) -> CalibrationConfig:
        from kvpack.codecs.transform.calibrate import CalibrationConfig

        return config_from_options(CalibrationConfig, options, "transform and kvtc calibration",
                                   "docs/transform.md")

    @classmethod
    def compile(cls, profile: Profile) -> TransformProfile:
        st = profile_from(profile)
        if st.recipe != cls.recipe:
            raise FormatError(f"it was calibrated for the {st.recipe!r} recipe, not {cls.recipe!r}")
        return st

    def state(self) -> TransformProfile:
        """The compiled profile."""
        return self.compiled

    @property
    def sink_tokens(self) -> int:
        """Tokens at positions below this are stored apart: ``sinks``, which ``__post_init__`` resolved to an int."""
        return cast(int, self.sinks)

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
        distinct, counts = np.unique(cls, return_counts=True)
        return _Layout(_cat(groups)[order], _cat(comps)[order], cls[order], fixed, distinct.astype(np.int32),
                       counts.astype(np.int64))

    def _plans(self, st: TransformProfile, alloc: Allocation, layers: int) -> list[tuple[_Layout, _Columns, _Columns]]:
        """Per progressive layer of ``alloc`` split in ``layers``: its layout, its columns in the groups' ``z [T,
        U_g]`` (encode) and in the stacked ``[U, T]`` (decode); computed once per profile, preset and layer count
        (they were a few hundred small numpy calls per chunk)."""
        key = (alloc.name, layers)
        if key not in st.plans:
            projections = [st.projection(alloc, g) for g in range(len(st.groups))]
            offsets = np.cumsum([0] + [p.used.size for p in projections])
            st.plans[key] = [(lay, _columns(projections, lay), _columns(projections, lay, offsets))
                             for lay in (self._layout(st, alloc, b) for b in self._layer_blocks(st, alloc, layers))]
        return cast(list[tuple[_Layout, _Columns, _Columns]], st.plans[key])

    # -------------------------------------------------------------------------------------------- encode

    def encode_payload(self, kv: KVCache) -> Payload:
        st, alloc, _, zs = self._coefficients(kv)
        sections = {"sinks": self._encode_sinks(kv, kv.positions < self.sink_tokens, st.sink_format)}
        layers = self._plans(st, alloc, self.layers)
        for k, (lay, cols, _) in enumerate(layers):
            sections.update(self._encode_layer(st, k, lay, cols, zs))
        meta = {"preset": alloc.name, "layers": len(layers), "coded": int(zs[0].shape[0])}
        return Payload(meta=meta, sections=sections)

    def _coefficients(self, kv: KVCache) -> tuple[TransformProfile, Allocation, list[Projection], list[np.ndarray]]:
        """The compiled profile, the chosen allocation, its projection per PCA group and the normalized coefficients
        ``z [T, U_g]`` of ``kv``'s ``T`` coded (non-sink) tokens per group."""
        st = self.state()
        if kv.spec.fingerprint != st.profile.model_fingerprint:
            raise CodecError(f"profile {self.profile} was calibrated on another model "
                             f"({st.profile.model_fingerprint[:12]}, cache is {kv.spec.fingerprint[:12]})")
        alloc = self.allocation()
        x = features(kv, kv.positions >= self.sink_tokens).to(self.encode_dtype())
        projections = [st.projection(alloc, g) for g in range(len(st.groups))]
        return st, alloc, projections, [self._project(p, x) for p in projections]

    def level_symbols(self, kv: KVCache) -> CodedLevels:
        """The rANS symbols a chunk of ``kv`` codes (all progressive layers together), for analysis
        (`kvpack bench transform-context`); encoding does not call it."""
        st, alloc, _, zs = self._coefficients(kv)
        lay, cols, _ = self._plans(st, alloc, 1)[0]
        n, tokens = lay.ec_class.size, zs[0].shape[0]
        if not n or not tokens:
            symbols = np.zeros((n, tokens), np.uint8)
        else:
            flat, _, _ = levels.quantize(zs, lay.ec_group, cols.ec, lay.ec_class, st.freqs, st.rounding)
            symbols = flat.reshape(n, tokens)
        return CodedLevels(classes=lay.ec_class, groups=lay.ec_group, components=lay.ec_comp, symbols=symbols)

    def encode_dtype(self) -> torch.dtype:
        """The precision this codec's encode projection multiplies in on this machine: :func:`projection_dtype`,
        but float32 for a preset whose quantization bf16 would disturb
        (:meth:`TransformProfile.bf16_cost`): one whose error it could raise by more than :data:`BF16_ENCODE_SHARE`
        (the fine steps of low ratios), or with a coefficient it could move by more than :data:`BF16_ENCODE_NOISE`
        squared steps (components of tiny variance, whose symbols it would scramble at a cost in bytes)."""
        dtype = projection_dtype()
        if dtype == torch.float32:
            return dtype
        alloc = self.allocation()
        cost = self.state().bf16_cost(alloc)
        budget = BF16_ENCODE_SHARE * alloc.info.get("relative_error", 0.0)  # validated by profile_from
        return dtype if cost.relative_error <= budget and cost.worst_noise <= BF16_ENCODE_NOISE else torch.float32

    @staticmethod
    def _project(p: Projection, x: torch.Tensor) -> np.ndarray:
        """float32 normalized coefficients ``z [T, U_g]`` of the components a preset codes in PCA group ``g``, from
        features ``x [T, D]`` multiplied in ``x``'s precision (float32, or bfloat16 with float32 accumulation and a
        bfloat16 product; the bias is subtracted in float32)."""
        xg = x if p.columns is None else x[:, p.columns]
        if x.dtype == torch.float32:
            return torch.addmm(-p.encode_bias, xg, p.encode).numpy()
        return torch.mm(xg, p.encode_as(x.dtype)).float().sub_(p.encode_bias).numpy()

    def _encode_layer(self, st: TransformProfile, k: int, lay: _Layout, cols: _Columns,
                      zs: list[np.ndarray]) -> dict[str, bytes]:
        blob, escapes, lows = b"", b"", b""
        tokens = zs[0].shape[0]
        if lay.ec_comp.size and tokens:
            symbols, escapes, lows = levels.quantize(zs, lay.ec_group, cols.ec, lay.ec_class, st.freqs, st.rounding)
            starts = np.concatenate([[0], np.cumsum(lay.counts * tokens)]).astype(np.int64)
            blob = entropy.pack(symbols, starts, lay.classes, st.model, include_tables=False)
        fixed = b"".join(fixed_encode(zs[g][:, c : c + n], kind, gs)
                         for (g, _, n, kind, gs), c in zip(lay.fixed, cols.fixed, strict=True))
        if st.recipe == "kvtc":
            fixed = zlib.compress(fixed, 9)
        return {f"e{k}": blob, f"x{k}": escapes, f"b{k}": lows, f"i{k}": fixed}

    @staticmethod
    def _encode_sinks(kv: KVCache, sink: torch.Tensor, fmt: str) -> bytes:
        kept = kv.data[:, :, :, sink]  # [L, 2, H, sinks, D]
        if fmt == "exact" or not kept.numel():
            return tensor_bytes(kept)
        tensors = kept.reshape(-1, *kept.shape[2:]).unbind(0)  # one tensor per (layer, K/V)
        out = []
        for t in tensors:
            scale = max(float(t.float().abs().max()), 1e-30) / 448.0
            out.append(struct.pack("<f", scale) + (t.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
                       .numpy().tobytes())
        return b"".join(out)

    # -------------------------------------------------------------------------------------------- decode

    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        st = self.state()
        if spec.fingerprint != st.profile.model_fingerprint:
            raise ModelMismatchError(f"this chunk's model {spec.fingerprint[:12]} is not the one the profile was "
                                     f"calibrated on ({st.profile.model_fingerprint[:12]})")
        width = sum(len(g) for g in st.groups)
        if spec.elements_per_token != width:
            raise FormatError(f"the header's model has {spec.elements_per_token} K/V elements per token, its profile "
                              f"{width}: the header is forged or corrupted")
        preset, n_layers = meta.get("preset"), json_int(meta.get("layers"), "transform meta layers", 1, 8)
        coded = json_int(meta.get("coded"), "transform meta coded", 0, num_tokens)
        if set(meta) != {"preset", "layers", "coded"} or not isinstance(preset, str) or preset not in st.presets:
            raise FormatError("transform payload meta is invalid or names a preset the profile lacks")
        values = coded * width  # coefficients of the coded tokens: every layer section is bounded by a few per one
        n_tables, alphabet = st.freqs.shape
        sizes = {"sinks": Size(0, (num_tokens - coded) * width * 4 + 8 * spec.num_layers)}
        for k in range(n_layers):
            blob = entropy.max_packed_bytes(values, n_tables, n_tables, alphabet, include_tables=False)
            sizes |= {f"e{k}": Size(0, blob), f"x{k}": Size(0, 5 * values), f"b{k}": Size(0, 4 * values),
                      f"i{k}": Size(0, 9 * values + 1024)}
        return sizes

    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        st = self.state()
        preset, n_layers, coded = str(meta["preset"]), int(meta["layers"]), int(meta["coded"])
        _, positions, _ = _tokens_info(container.header, container)
        sink = positions < self.sink_tokens
        if int((~sink).sum()) != coded:
            raise FormatError(f"payload codes {coded} tokens but {int((~sink).sum())} are not sinks")
        alloc = st.presets[str(preset)]
        projections = [st.projection(alloc, g) for g in range(len(st.groups))]
        offsets = np.cumsum([0] + [p.used.size for p in projections])
        zt = np.zeros((int(offsets[-1]), coded), np.float32)  # [U, T]: every group's used components
        for k, (lay, _, cols) in enumerate(self._plans(st, alloc, n_layers)):
            names = [f"{p}{k}" for p in "exbi"]
            if isinstance(container, _Partial) and not all(n in container.sections for n in names):
                break
            self._decode_layer(st, lay, cols, [container.section(n) for n in names], zt)
        dtype = projection_dtype()
        int8 = decode_precision() == "int8"
        # the GEMM's output precision (int8: float32, the int32 sums scaled)
        x = torch.empty(coded, sum(len(g) for g in st.groups), dtype=torch.float32 if int8 else dtype)
        for g, p in enumerate(projections):
            zg = zt[offsets[g] : offsets[g + 1]]
            if int8:
                xg = self._int8(st, alloc, g, n_layers, dtype).project(zg, dtype)
                if p.columns is None:
                    x = xg
                else:
                    x[:, p.columns] = xg
                continue
            # [T, U_g] row-major: the GEMM is faster (and rounds as before) than on the transposed view
            z = levels.transposed(zg, dtype)
            decode, bias = p.decode_as(dtype)
            if p.columns is None:
                torch.addmm(bias, z, decode, out=x)
            else:
                x[:, p.columns] = torch.addmm(bias, z, decode)
        keys_s, values_s = self._decode_sinks(container.section("sinks"), spec, int(sink.sum()), st.sink_format)
        data = torch.empty(spec.buffer_shape(num_tokens), dtype=spec.torch_dtype) if out is None else out
        place(x, positions[~sink], spec, data, (~sink).nonzero().squeeze(1))
        if bool(sink.any()):
            for kind, s in ((0, keys_s), (1, values_s)):  # all layers at once: [L, H, T, D]
                data[:, kind].index_copy_(2, sink.nonzero().squeeze(1), torch.stack(s))
        return data

    def _int8(self, st: TransformProfile, alloc: Allocation, g: int, n_layers: int, dtype: torch.dtype
              ) -> Int8Projection:
        """Group ``g``'s int8 decode for ``alloc`` (cached per preset, group and float precision): the rate of each
        of its rows of ``[U, T]`` from the layouts (NaN for fixed-width rows)."""
        key = (alloc.name, g, dtype)
        if key not in st.int8s:
            projections = [st.projection(alloc, gg) for gg in range(len(st.groups))]
            offsets = np.cumsum([0] + [p.used.size for p in projections])
            rate = np.full(int(offsets[-1]), np.nan)
            for lay, _, cols in self._plans(st, alloc, n_layers):
                rate[cols.ec] = rates()[lay.ec_class]
            p = projections[g]
            st.int8s[key] = Int8Projection.build(p.decode, p.decode_bias, rate[offsets[g] : offsets[g + 1]], dtype)
        return cast(Int8Projection, st.int8s[key])

    def _decode_layer(self, st: TransformProfile, lay: _Layout, cols: _Columns, data: list[memoryview],
                      zt: np.ndarray) -> None:
        """One progressive layer's coefficients into rows ``cols`` of ``zt [U, T]``."""
        escapes, lows, fixed = (np.frombuffer(d, np.uint8) for d in data[1:])
        blob, tokens = data[0], zt.shape[1]
        n_ec = lay.ec_comp.size
        if n_ec and tokens:
            symbols, starts = entropy.unpack(blob, max_symbols=n_ec * tokens, freqs=st.model)
            if not np.array_equal(starts, np.concatenate([[0], np.cumsum(lay.counts * tokens)])):
                raise FormatError("entropy-coded lanes do not match the preset's layout")
            levels.dequantize(symbols, tokens, escapes, lows, lay.ec_class, st.shrink, cols.ec, zt)
        elif len(blob) or escapes.size or lows.size:
            raise FormatError("entropy-coded sections present where the preset has none")
        if st.recipe == "kvtc" and (lay.fixed or fixed.size):
            limit = sum(fixed_bytes(kind, gs, tokens, n) for _, _, n, kind, gs in lay.fixed)
            fixed = _inflate(fixed, limit)
        pos = 0
        for (_, _, n, kind, gs), row in zip(lay.fixed, cols.fixed, strict=True):
            size = fixed_bytes(kind, gs, tokens, n)
            if pos + size > fixed.size:
                raise FormatError("fixed-width section is truncated")
            zt[row : row + n] = fixed_decode(fixed[pos : pos + size], kind, gs, tokens, n).T
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

    def layer_ends(self, data: bytes | memoryview) -> tuple[int, ...]:
        """The byte counts that hold the first ``1, 2, ..., layers`` progressive layers of a container.

        ``data`` is a prefix of the container that holds its whole header (:func:`kvpack.format.header_bytes` says how
        long that is). Reading ``layer_ends(...)[k - 1]`` bytes and passing them to :meth:`decode_prefix` decodes
        exactly ``k`` layers: a progressive loader uses it to pick a quality level per chunk (issue 11, the loader).
        """
        header = read_header(memoryview(data).cast("B"), prefix=True)
        head_len = struct.unpack_from("<I", data, 12)[0]  # verified by read_header
        table = header.get("sections")
        meta = header.get("meta")
        if not isinstance(table, list) or not isinstance(meta, dict):
            raise FormatError("header has no valid section table")
        layers = json_int(meta.get("layers"), "transform meta layers", 1, 8)
        ends: dict[str, int] = {}
        for entry in table:
            off, length, name = (entry.get("offset"), entry.get("length"), entry.get("name")) \
                if isinstance(entry, dict) else (None, None, None)
            if not (isinstance(off, int) and isinstance(length, int) and isinstance(name, str)) or off < 0 \
                    or length < 0:
                raise FormatError(f"section {name!r} has a bad table entry")
            ends[name] = PREFIX_BYTES + head_len + off + length
        try:
            return tuple(ends[f"i{k}"] for k in range(layers))
        except KeyError as exc:
            raise FormatError(f"section {exc} of a progressive layer is missing from the table") from None

    def decode_prefix(self, data: bytes | memoryview, max_bytes: int | None = None,
                      spec: ModelSpec | None = None, *, token_ids: torch.Tensor | Sequence[int] | None = None,
                      out: KVCache | None = None) -> KVCache:
        """Decode from the first ``max_bytes`` bytes of a container (all of ``data`` if ``None``).

        Complete progressive layers in the prefix are decoded; later ones count as zero (lower quality). The prefix
        must hold the header, the positions and the sinks; every section used is checksum-verified. ``token_ids``
        and ``out`` as in :meth:`~kvpack.codecs.base.Codec.decode`.
        """
        view = memoryview(data).cast("B")
        view = view[: len(view) if max_bytes is None else max_bytes]
        header = read_header(view, prefix=True)
        head_len = struct.unpack_from("<I", view, 12)[0]  # verified by read_header
        area = view[PREFIX_BYTES + head_len :]
        table = header.get("sections")
        if not isinstance(table, list):
            raise FormatError("header has no valid section table")
        sections: dict[str, memoryview] = {}
        end = 0
        for entry in table:
            if not isinstance(entry, dict):
                raise FormatError("section table entry is not an object")
            off, length, name = entry.get("offset"), entry.get("length"), entry.get("name")
            if not (isinstance(off, int) and isinstance(length, int) and isinstance(name, str)) or off != end \
                    or length < 0 or name in sections:
                raise FormatError(f"section {name!r} has a bad table entry")
            end = off + length
            if end > len(area):
                break
            body = area[off : off + length]
            if crc32(body) != entry.get("crc32"):
                raise FormatError(f"section {name!r} checksum mismatch")
            sections[name] = body
        info = header.get("codec")
        if not isinstance(info, dict) or info.get("name") != self.name or info.get("version") != self.version \
                or info.get("params") != self.params():
            raise CodecError("container was not written by this codec with these parameters")
        if "sinks" not in sections:
            raise FormatError("prefix does not reach the sink section; read more bytes")
        return self._decode_container(_Partial(header=header, sections=sections), spec, token_ids, out)


@dataclass(frozen=True)
class CodedLevels:
    """The entropy-coded levels of one chunk, lane order (:meth:`Transform.level_symbols`): component ``i`` is
    principal component ``components[i]`` of PCA group ``groups[i]`` at rate class ``classes[i]`` (int64 ``[n]``
    each; classes non-decreasing), and ``symbols[i]`` (uint8 ``[n, T]``, one per coded token) are its rANS symbols
    (``ESCAPE`` where the value went to the escape section)."""

    classes: np.ndarray
    groups: np.ndarray
    components: np.ndarray
    symbols: np.ndarray


@dataclass(frozen=True)
class _Columns:
    """Where a layout's components sit among the coded ones: entropy-coded component ``i`` at column ``ec[i]`` and
    fixed-width block ``j`` from column ``fixed[j]`` of its group's ``z [T, U_g]`` (plus the group's offset in
    ``[U, T]`` when decoding)."""

    ec: np.ndarray  # int64 [n_ec]
    fixed: list[int]


def _columns(projections: list[Projection], lay: _Layout, offsets: np.ndarray | None = None) -> _Columns:
    base = np.zeros(len(projections), np.int64) if offsets is None else np.asarray(offsets[:-1], np.int64)
    ec = np.zeros(lay.ec_comp.size, np.int64)
    for g, p in enumerate(projections):
        sel = lay.ec_group == g
        ec[sel] = base[g] + np.searchsorted(p.used, lay.ec_comp[sel])
    fixed = [int(base[g] + np.searchsorted(projections[g].used, s)) for g, s, _, _, _ in lay.fixed]
    return _Columns(ec, fixed)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _inflate(data: np.ndarray, limit: int) -> np.ndarray:
    """DEFLATE-decompress ``data`` to at most ``limit`` bytes; :class:`FormatError` on bad or oversized input."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(data.tobytes(), limit + 1)
    except zlib.error as exc:
        raise FormatError(f"fixed-width section is not valid DEFLATE: {exc}") from None
    if len(out) > limit or not d.eof or d.unused_data:
        raise FormatError("fixed-width section inflates to the wrong size")
    return np.frombuffer(out, np.uint8)
