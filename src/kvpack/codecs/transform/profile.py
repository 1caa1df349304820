"""The transform profile: a validated :class:`~kvpack.profile.Profile` of the `transform` / `kvtc` codecs (PCA
bases, weights, per-class rANS tables, presets), compiled once per profile by the codecs (see
:mod:`kvpack.codecs.transform.calibrate` for how it is made)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvpack import entropy
from kvpack.codecs.transform.features import feature_groups
from kvpack.codecs.transform.quant import (
    ALPHABET,
    BLOCK,
    GROUPS,
    N_RATES,
    TYPE_DROP,
    TYPE_EC,
    TYPE_INT2,
    TYPE_INT8,
    TYPES,
    rates,
)
from kvpack.entropy.models import Model
from kvpack.errors import CodecError, FormatError
from kvpack.profile import Profile

#: Most sink tokens a profile or codec may keep apart.
MAX_SINKS = 4096
#: How a profile may store its basis rows (:func:`store_basis`).
BASIS_FORMATS = ("fp16", "int8")
#: Features per int8 basis scale.
BASIS_BLOCK = 32


@dataclass(frozen=True)
class Allocation:
    """One preset: per block its type (:data:`TYPES`), parameter (rate class or group size) and progressive rank."""

    name: str
    block_type: np.ndarray  # uint8 [blocks]
    block_param: np.ndarray  # int64 [blocks]: rate class (ec) or group size (int)
    block_rank: np.ndarray  # int64 [blocks]: order of importance (0 first) for progressive layers
    info: dict[str, Any]


@dataclass(frozen=True)
class Bf16Cost:
    """What multiplying a preset's encode projection in bfloat16 may cost (:meth:`TransformProfile.bf16_cost`)."""

    relative_error: float  # added squared error over the total variance, as ``Allocation.info["relative_error"]``
    worst_noise: float  # the largest noise variance of an entropy-coded coefficient, in squared quantization steps


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
    casts: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def encode_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``encode`` in ``dtype`` (cast once per dtype)."""
        return self._cast("encode", dtype)

    def decode_as(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decode, decode_bias)`` in ``dtype`` (cast once per dtype)."""
        return self._cast("decode", dtype), self._cast("decode_bias", dtype)

    def _cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor: torch.Tensor = getattr(self, name)
        if tensor.dtype == dtype:
            return tensor
        if (name, dtype) not in self.casts:
            self.casts[name, dtype] = tensor.to(dtype)
        return self.casts[name, dtype]


@dataclass(frozen=True, eq=False)
class TransformProfile:
    """A parsed, validated transform profile (see :mod:`kvpack.codecs.transform.calibrate` for how it is made)."""

    profile: Profile
    groups: list[np.ndarray]  # feature indices per PCA group
    means: list[torch.Tensor]  # float32 [D_g]
    weights: list[torch.Tensor]  # float32 [D_g]
    bases: list[torch.Tensor]  # float32 [C_g, D_g], rows orthonormal (to the stored precision)
    sigmas: list[np.ndarray]  # float32 [C_g]
    freqs: np.ndarray  # uint32 [N_RATES, ALPHABET]
    shrink: np.ndarray  # float32 [N_RATES]: reconstruction offset per class
    presets: dict[str, Allocation]
    recipe: str
    rounding: float
    sink_format: str
    sinks: int  # the sink tokens the profile was calibrated with: the codec's default

    subs: dict[tuple[str, int], Projection] = field(default_factory=dict)
    bf16_costs: dict[str, Bf16Cost] = field(default_factory=dict)
    plans: dict[tuple[str, int], list[Any]] = field(default_factory=dict)  # the codec's layer layouts per preset
    int8s: dict[tuple[str, int, torch.dtype], Any] = field(default_factory=dict)  # the int8 decode per preset, group

    @property
    def hash(self) -> str:
        return self.profile.hash

    @functools.cached_property
    def model(self) -> Model:
        """:attr:`freqs` compiled for the rANS coders."""
        return Model.from_freqs(self.freqs)

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

    def bf16_cost(self, alloc: Allocation) -> Bf16Cost:
        """What computing ``alloc``'s coefficients in bfloat16 instead of float32 may cost (cached per preset).

        In the weighted feature space (``x_w = x * w``, power ``P_j = E[x_wj^2]``, :attr:`component_power`), the
        coefficient ``z_i = x @ e_i - beta_i`` with ``e_ji = w_j b_ij / sigma_i``. Rounding to bf16 (8 significant
        bits, to nearest) gives each input ``x_j``, each ``e_ji`` and the product ``y_i = x @ e_i`` an independent
        relative error of variance at most ``rho = 2^-14 / 12``, so ``z_i`` gains a noise of variance at most ``n_i =
        rho (2 sum_j P_j b_ij^2 / sigma_i^2 + 1 + beta_i^2)`` (``E[y_i^2] = 1 + beta_i^2``: ``z`` has unit variance in
        calibration), and the decoded vector ``sigma_i^2 n_i``. Summed over the coded components and divided by the
        total variance, that is :attr:`Bf16Cost.relative_error`; ``n_i`` over the squared step ``1 / r_i^2`` of an
        entropy-coded component is its :attr:`Bf16Cost.worst_noise` candidate. Dropped components add nothing."""
        if alloc.name not in self.bf16_costs:
            rho, added, worst = 2.0**-14 / 12, 0.0, 0.0
            first = np.cumsum([0] + [-(-len(s) // BLOCK) for s in self.sigmas])  # first block of each group
            for g, (sigmas, power) in enumerate(zip(self.sigmas, self.component_power, strict=True)):
                p = self.projection(alloc, g)
                sigma2 = torch.from_numpy(sigmas[p.used]).double() ** 2
                noise = rho * (2 * power[p.used] / sigma2 + 1 + p.encode_bias.double() ** 2)  # n_i [U]
                added += float(sigma2 @ noise)
                blocks = first[g] + p.used // BLOCK
                ec = alloc.block_type[blocks] == TYPE_EC
                if ec.any():
                    steps2 = 1 / rates()[alloc.block_param[blocks[ec]]] ** 2
                    worst = max(worst, float((noise.numpy()[ec] / steps2).max()))
            total = sum(float((s.astype(np.float64) ** 2).sum()) for s in self.sigmas)
            self.bf16_costs[alloc.name] = Bf16Cost(relative_error=added / total, worst_noise=worst)
        return self.bf16_costs[alloc.name]

    @functools.cached_property
    def component_power(self) -> list[torch.Tensor]:
        """float64 ``[C_g]`` per group: ``sum_j P_j b_ij^2`` of every component ``i``, where ``P_j = E[x_wj^2] =
        (mean_j w_j)^2 + sum_c sigma_c^2 b_cj^2`` is the weighted features' power under the calibration's statistics
        (:meth:`bf16_cost`; once per profile, not per preset)."""
        out = []
        for m, w, b, s in zip(self.means, self.weights, self.bases, self.sigmas, strict=True):
            squares = b.square()  # [C_g, D_g]
            feature = (m.double() * w.double()) ** 2 + torch.mv(squares.t(), torch.from_numpy(s) ** 2).double()
            out.append(torch.mv(squares, feature.float()).double())
        return out

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


def store_basis(g: int, basis: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """Profile arrays of group ``g``'s basis rows ``basis [C, D]`` (float32): ``basis{g}`` in fp16, or in int8 with
    ``basis_scale{g}``, a float32 scale per row and run of :data:`BASIS_BLOCK` features (``[C, ceil(D / 32)]``:
    ``max |x| / 127`` of the run; an element is ``int8 * scale``), 56% of the fp16 size.

    One scale per whole row does not work: KV features include outlier channels whose basis entries are tens of
    times the row's RMS, so a row scale rounds the other entries to a few levels. With runs of 32 features the
    measured quality is that of the fp16 basis from the 32x preset up (docs/transform.md, "Basis precision")."""
    if fmt == "fp16":
        return {f"basis{g}": basis.astype(np.float16)}
    blocks = _runs(basis)
    top = np.abs(blocks).max(axis=2)
    scale = np.where(top > 0, top / 127, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scale[:, :, None]), -127, 127).astype(np.int8)
    return {f"basis{g}": codes.reshape(basis.shape[0], codes.shape[1] * BASIS_BLOCK)[:, :basis.shape[1]],
            f"basis_scale{g}": scale}


def _runs(a: np.ndarray) -> np.ndarray:
    """``a [C, D]`` as float32 runs ``[C, ceil(D / BASIS_BLOCK), BASIS_BLOCK]``, zero-padded at the end (a fresh
    array)."""
    rows, dims = a.shape
    runs = -(-dims // BASIS_BLOCK)
    out = np.zeros((rows, runs, BASIS_BLOCK), np.float32)
    out.reshape(rows, runs * BASIS_BLOCK)[:, :dims] = a
    return out


def load_basis(arrays: dict[str, np.ndarray], g: int) -> np.ndarray:
    """Group ``g``'s basis rows as float32 ``[C, D]`` from :func:`store_basis`'s arrays (fp16, or int8 with a finite
    positive scale per row and run of features); :class:`FormatError` otherwise."""
    basis = arrays[f"basis{g}"]
    scale = arrays.get(f"basis_scale{g}")
    if basis.dtype == np.float16 and scale is None:
        rows = basis.astype(np.float32)
    elif basis.dtype == np.int8 and basis.ndim == 2 and scale is not None and scale.dtype == np.float32 \
            and scale.shape == (basis.shape[0], -(-basis.shape[1] // BASIS_BLOCK)) and (scale > 0).all():
        runs = _runs(basis)  # the only float32 copy: scaled in place, a view of it when D is a multiple of 32
        with np.errstate(over="ignore", invalid="ignore"):
            runs *= scale[:, :, None]
        rows = np.ascontiguousarray(runs.reshape(basis.shape[0], runs.shape[1] * BASIS_BLOCK)[:, :basis.shape[1]])
    else:
        raise FormatError(f"profile group {g} basis must be fp16, or int8 with a positive float32 scale per row and "
                          f"run of {BASIS_BLOCK} features")
    if not np.isfinite(rows).all():
        raise FormatError(f"profile group {g} basis has non-finite values")
    return rows


def profile_from(profile: Profile) -> TransformProfile:
    """Validate a profile written by :mod:`kvpack.codecs.transform.calibrate`; :class:`FormatError` on anything
    inconsistent."""
    meta, arrays = profile.meta, profile.arrays
    try:
        grouping, recipe = str(meta["grouping"]), str(meta["recipe"])
        rounding, sink_format = float(meta["rounding"]), str(meta["sink_format"])
        sinks = meta["sinks"]
        if not isinstance(sinks, int) or not 0 <= sinks <= MAX_SINKS:
            raise FormatError(f"profile sinks must be an int in [0, {MAX_SINKS}], got {sinks!r}")
        groups = feature_groups(int(meta["layers"]), int(meta["width"]), grouping)
        means, weights, bases, sigmas = [], [], [], []
        for g, idx in enumerate(groups):
            mean, weight = arrays[f"mean{g}"].astype(np.float32), arrays[f"weight{g}"].astype(np.float32)
            basis, sigma = load_basis(arrays, g), arrays[f"sigma{g}"].astype(np.float32)
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
            error = info.get("relative_error", 0.0)  # missing: encoding stays float32 (Transform.encode_dtype)
            if isinstance(error, bool) or not isinstance(error, int | float) or not 0 <= error < float("inf"):
                raise FormatError(f"preset {name!r} has an invalid relative_error {error!r}")
            presets[name] = Allocation(name, kinds.astype(np.uint8), params, rank, dict(info))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"not a valid transform profile: {exc}") from None
    if sink_format not in ("exact", "fp8") or recipe not in ("transform", "kvtc") or not 0 < rounding <= 0.5:
        raise FormatError("profile has an unknown recipe, sink format or rounding")
    return TransformProfile(profile, groups, means, weights, bases, sigmas, freqs, shrink, presets, recipe, rounding,
                            sink_format, sinks)
