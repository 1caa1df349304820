"""Calibration of the `transform` / `kvtc` codecs: weighted PCA basis + optimal bit allocation -> :class:`Profile`.

Steps (KVTC, arXiv 2511.01815, section 3, with the changes measured in docs/transform.md):

1. Pre-RoPE keys and values of all layers and KV heads, one vector ``x [D]`` per token, from calibration documents
   only, sink tokens excluded (:func:`kvpack.codecs.transform.features.features`).
2. Per-feature weights ``w`` (``weights=``): how much squared error in a feature costs, measured with the model
   (:mod:`kvpack.codecs.transform.sensitivity`: diagonal Fisher information of the continuation log-likelihood with
   respect to the cache, averaged per layer, K/V, head and channel, RoPE channel pairs tied); without a model,
   uniform (plain MSE, KVTC).
3. Per PCA group (one joint K+V group, or separate K and V under the kvtc recipe): mean, covariance of
   ``w * (x - mean)`` and its eigenvectors (exact float32 ``eigh`` of the smaller of covariance and token Gram
   matrix) from the basis documents; coefficient scales, tables and option costs from held-out documents, so that
   the allocation sees the generalization error and the real rates.
4. For each block of ``BLOCK`` components and each option (dropped; entropy-coded levels at every rate class;
   int2/int4/int8 with group sizes; fp8) the true bits per token and squared error of simulated coding on the
   calibration coefficients, counting all metadata (group scales, escapes, raw low bits); the entropy-coding tables
   (one per rate class) are pooled from the same data and stored in the profile.
5. Dynamic programming over blocks (a multiple-choice knapsack on a bit grid) gives the minimum-error allocation for
   every budget at once; one preset per nominal ratio, its budget net of sinks and header at ``reference_tokens``.
   With ``component_cost``, every coded component also costs that share of the total variance (a Lagrangian price
   on the decode GEMM's multiply-adds, which grow with the coded components), so blocks that buy less error than
   their price are dropped and their bits go to the others.
6. The basis is trimmed to the components some preset uses; with the model, :func:`calibrate` measures each preset's
   KL on held-out calibration text (for ``max_kl=`` rate control).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.calibrated import Log
from kvpack.codecs.transform import quant
from kvpack.codecs.transform.features import feature_groups, features
from kvpack.codecs.transform.profile import BASIS_FORMATS, store_basis
from kvpack.codecs.transform.retrieval import retrieval_fisher
from kvpack.codecs.transform.sensitivity import fisher_weights, prefill_and_fisher
from kvpack.entropy.tables import quantize_freqs
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

DEFAULT_RATIOS = (10.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 56.0, 64.0, 80.0, 96.0)
#: Sink tokens (positions stored apart, exact or fp8) by recipe. ``transform``: 1, the token that draws the attention
#: (StreamingLLM's sink; coding it costs +127% perplexity) -- tokens 1-3 code like any other, and keeping them exact
#: made chunks 6-16% larger at equal KL (docs/transform.md, "Sink tokens"). ``kvtc``: 4, as the paper keeps.
DEFAULT_SINKS = {"transform": 1, "kvtc": 4}
#: Container bytes per chunk besides the payload (header JSON, section table), counted in every preset's budget.
HEADER_BYTES = 2600
#: Bit-grid steps of the allocation DP (at the largest budget).
DP_STEPS = 4096
_ESCAPE_BITS = 24.0  # an escaped symbol costs its rANS escape code plus a ~2-3 byte varint


@dataclass(frozen=True)
class CalibrationConfig:
    """The settings of :func:`calibrate` (``kvpack calibrate --option name=value``), checked when made, so a bad one
    is refused before the model is loaded. ``None``: the recipe's default (:func:`calibrate_from_caches`).

    Attributes:
        tokens: prefix tokens per document that enter the statistics (and the chunk length the presets' budgets
            count sinks and header at); ``cont`` more tokens give the gradients and the KL.
        weighting: ``"fisher"`` (sensitivity-weighted distortion) or ``"uniform"`` (plain MSE, as in KVTC).
        fisher_docs: documents (the last ones, which the basis does not see) whose continuation is differentiated
            for the Fisher weights; the last one also gives the per-preset KL. The others are only prefilled.
        measure_kl: measure each preset's KL on the last document (``max_kl=`` rate control needs it).
        retrieval: haystacks of ``retrieval_tokens`` calibration tokens with a key hidden in them whose recall is
            differentiated too (:mod:`kvpack.codecs.transform.retrieval`); their Fisher, normalized to mean 1,
            makes ``retrieval_share`` of the weights and the continuation's the rest. 0: continuation only.
        ratios, default_ratio, sinks, rounding, max_tokens, grouping, sink_format, basis_format, component_cost: as in
            :func:`calibrate_from_caches`.
    """

    tokens: int = 1536
    cont: int = 256
    weighting: str = "fisher"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    default_ratio: float = 32.0
    sinks: int | None = None
    fisher_docs: int = 2
    measure_kl: bool = True
    rounding: float = 0.5
    max_tokens: int = 6144
    grouping: str | None = None
    sink_format: str | None = None
    basis_format: str | None = None
    component_cost: float = 0.0
    retrieval: int = 0
    retrieval_tokens: int = 4096
    retrieval_share: float = 0.5

    def __post_init__(self) -> None:
        for name, low in (("tokens", 16), ("cont", 1), ("fisher_docs", 1), ("max_tokens", 16), ("retrieval", 0),
                          ("retrieval_tokens", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1 << 24:
                raise ValueError(f"calibration setting {name} must be an integer in {low}..{1 << 24}, got {value!r}")
        if self.sinks is not None and (isinstance(self.sinks, bool) or not isinstance(self.sinks, int)
                                       or not 0 <= self.sinks < self.tokens):
            raise ValueError(f"calibration setting sinks must be an integer in 0..tokens - 1 ({self.tokens - 1}), "
                             f"got {self.sinks!r}")
        if self.weighting not in ("fisher", "uniform"):
            raise ValueError(f"calibration setting weighting must be 'fisher' or 'uniform', got {self.weighting!r}")
        if not isinstance(self.measure_kl, bool):
            raise ValueError(f"calibration setting measure_kl must be true or false, got {self.measure_kl!r}")
        if not (_number(self.retrieval_share) and 0 <= self.retrieval_share <= 1):
            raise ValueError(f"calibration setting retrieval_share must be a number in [0, 1], "
                             f"got {self.retrieval_share!r}")
        if self.retrieval and self.weighting != "fisher":
            raise ValueError("calibration setting retrieval needs weighting=fisher (it adds to the Fisher weights)")
        if not (_number(self.rounding) and 0 <= self.rounding <= 0.5):
            raise ValueError(f"calibration setting rounding must be a number in [0, 0.5], got {self.rounding!r}")
        ratios = self.ratios if isinstance(self.ratios, tuple | list) else (self.ratios,)
        if not ratios or not all(_number(r) and 1 < r <= 4096 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"calibration setting ratios must be distinct numbers in (1, 4096], got {self.ratios!r}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        if not (_number(self.default_ratio) and self.default_ratio > 1):
            raise ValueError(f"calibration setting default_ratio must be a number above 1 (the preset nearest to it "
                             f"is the default), got {self.default_ratio!r}")
        if self.grouping is not None:
            if not isinstance(self.grouping, str):
                raise ValueError(f"calibration setting grouping must be a string, got {self.grouping!r}")
            feature_groups(1 << 12, 1, self.grouping)  # its syntax; the layer count is checked against the model
        check_storage(self.sink_format, self.basis_format, self.component_cost)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_storage(sink_format: str | None, basis_format: str | None, component_cost: float) -> None:
    """Refuse a sink or basis format the profile cannot store, or a price per component outside ``[0, 1)``."""
    if not (_number(component_cost) and 0 <= component_cost < 1):
        raise ValueError(f"component_cost must be a number in [0, 1), got {component_cost!r}")
    if basis_format is not None and basis_format not in BASIS_FORMATS:
        raise ValueError(f"basis_format must be one of {BASIS_FORMATS}, got {basis_format!r}")
    if sink_format is not None and sink_format not in ("exact", "fp8"):
        raise ValueError(f"sink_format must be 'exact' or 'fp8', got {sink_format!r}")


# ------------------------------------------------------------------------------------------------ statistics


@njit(parallel=True, cache=True)
def _class_stats(z, r, low, rounding):  # type: ignore[no-untyped-def]
    """Pooled high-symbol histograms ``[J, 256]`` and reconstruction offsets of every rate class over all of ``z``."""
    n, c = z.shape
    j_count = r.shape[0]
    hist = np.zeros((j_count, 256))
    offset = np.zeros(j_count)
    nonzero = np.zeros(j_count)
    for j in prange(j_count):
        for i in range(c):
            for t in range(n):
                v = z[t, i] * r[j]
                a = math.floor(abs(v) + rounding)
                if a:
                    offset[j] += a - abs(v)
                    nonzero[j] += 1
                u = 2 * a - 1 if v < 0 and a else 2 * a
                h = u >> low[j]
                hist[j, h if h < 255 else 255] += 1
    return hist, offset / np.maximum(nonzero, 1)


@njit(parallel=True, cache=True)
def _component_costs(z, r, low, rounding, shrink, cost):  # type: ignore[no-untyped-def]
    """Per component and rate class: mean bits per token (table ``cost`` in bits, raw low bits, escapes) and mean
    squared error of the normalized coefficient."""
    n, c = z.shape
    j_count = r.shape[0]
    bits = np.zeros((c, j_count))
    err = np.zeros((c, j_count))
    for i in prange(c):
        for j in range(j_count):
            b = 0.0
            e = 0.0
            for t in range(n):
                v = z[t, i] * r[j]
                a = math.floor(abs(v) + rounding)
                u = 2 * a - 1 if v < 0 and a else 2 * a
                h = u >> low[j]
                if h >= 255 or cost[j, h] > 60:
                    b += cost[j, 255] + _ESCAPE_BITS
                else:
                    b += cost[j, h]
                rec = (a - shrink[j]) if a else 0.0
                d = abs(v) - rec
                e += d * d
            bits[i, j] = b / n + low[j]
            err[i, j] = e / n / (r[j] * r[j])
    return bits, err


def _tables(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rANS tables from pooled counts (every symbol up to the largest seen gets a little mass; escape always)."""
    counts = hist.copy()
    total = counts.sum(axis=1, keepdims=True)
    for j in range(counts.shape[0]):
        seen = np.flatnonzero(counts[j, :255])
        top = int(seen[-1]) if seen.size else 0
        counts[j, : top + 1] += 1e-7 * total[j, 0] + 0.5
        counts[j, 255] += 1e-6 * total[j, 0] + 1
    freqs = quantize_freqs(np.round(counts * 16).astype(np.int64))
    with np.errstate(divide="ignore"):
        cost = np.where(freqs > 0, -np.log2(freqs / float(1 << 15)), 99.0)
    return freqs.astype(np.uint16), cost


# ------------------------------------------------------------------------------------------------ allocation


def _split(caches: Sequence[KVCache], sinks: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` of the non-sink tokens, split into the basis set and a held-out set for the allocation.

    With 3+ caches the last third of the caches is held out (documents are correlated inside); otherwise the last
    30% of each cache's tokens. Each set is evenly subsampled to at most ``max_tokens``.
    """
    feats = [features(kv, kv.positions >= sinks) for kv in caches]
    if len(feats) >= 3:
        cut = len(feats) - len(feats) // 3
        fit, held = torch.cat(feats[:cut]), torch.cat(feats[cut:])
    else:
        fit = torch.cat([f[: int(0.7 * len(f))] for f in feats])
        held = torch.cat([f[int(0.7 * len(f)) :] for f in feats])
    if not len(fit) or not len(held):
        raise ValueError("calibration needs more tokens (beyond the sinks)")

    def thin(x: torch.Tensor) -> torch.Tensor:
        return x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()] if x.shape[0] > max_tokens else x

    return thin(fit), thin(held)


def _pca(centred: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Principal axes ``[C, D]`` (float32, orthonormal rows) and standard deviations ``[C]`` of ``centred [N, D]``.

    Exact symmetric eigendecomposition (float32 LAPACK) of the smaller of the covariance ``[D, D]`` and the token
    Gram matrix ``[N, N]``; components below ``1e-7`` of the largest variance are dropped (numerically noise).
    """
    n, d = centred.shape
    if n < d:
        evals, u = torch.linalg.eigh(centred @ centred.T / n)
    else:
        evals, u = torch.linalg.eigh(centred.T @ centred / n)
    order = torch.argsort(evals, descending=True)
    evals, u = evals[order], u[:, order]
    keep = int((evals > evals[0] * 1e-7).sum())
    evals, u = evals[:keep], u[:, :keep]
    axes = (centred.T @ u) / (evals * n).sqrt() if n < d else u
    return axes.T.contiguous(), evals.sqrt().numpy()


def _block_options(z: np.ndarray, sigma: np.ndarray, recipe: str, ec_bits: np.ndarray | None,
                   ec_err: np.ndarray | None) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Options and their (bits per token, weighted squared error per token) for every block of one PCA group.

    Returns ``(options [(type, param)], bits [blocks, options], err [blocks, options])``.
    """
    var = sigma.astype(np.float64) ** 2
    options: list[tuple[int, int]] = [(quant.TYPE_DROP, 0)]
    if recipe == "transform":
        options += [(quant.TYPE_EC, j) for j in range(quant.N_RATES)]
        fixed_types: tuple[int, ...] = (quant.TYPE_INT2, quant.TYPE_INT4, quant.TYPE_INT8)
    else:
        fixed_types = (quant.TYPE_INT2, quant.TYPE_INT4)
    options += [(t, g) for t in fixed_types for g in quant.GROUPS] + [(quant.TYPE_FP8, 0)]
    n_blocks = -(-z.shape[1] // quant.BLOCK)
    bits = np.zeros((n_blocks, len(options)))
    err = np.zeros((n_blocks, len(options)))
    tokens = z.shape[0]
    for b in range(n_blocks):
        s, e = b * quant.BLOCK, min((b + 1) * quant.BLOCK, z.shape[1])
        zb = z[:, s:e]
        for o, (kind, param) in enumerate(options):
            if kind == quant.TYPE_DROP:
                err[b, o] = float((np.mean(zb.astype(np.float64) ** 2, axis=0) * var[s:e]).sum())
            elif kind == quant.TYPE_EC:
                assert ec_bits is not None and ec_err is not None
                bits[b, o] = ec_bits[s:e, param].sum()
                err[b, o] = (ec_err[s:e, param] * var[s:e]).sum()
            elif param and (e - s) % param:
                bits[b, o], err[b, o] = np.inf, np.inf
            else:
                rec = quant.simulate_fixed(zb, kind, param)
                bits[b, o] = 8 * quant.fixed_bytes(kind, param, tokens, e - s) / tokens
                err[b, o] = float((np.mean((zb - rec).astype(np.float64) ** 2, axis=0) * var[s:e]).sum())
    return options, bits, err


def _allocate(bits: np.ndarray, err: np.ndarray, budgets: Sequence[float]) -> list[np.ndarray]:
    """Minimum-error choice of one option per block under each bit budget (DP on a grid of ``DP_STEPS`` steps).

    ``bits, err [blocks, options]``; returns per budget the chosen option index of every block.
    """
    unit = max(budgets) / DP_STEPS
    units = np.where(np.isfinite(bits), np.ceil(bits / unit - 1e-9), DP_STEPS + 1).astype(np.int64)
    n_blocks, n_opt = bits.shape
    best = np.zeros(DP_STEPS + 1)
    choice = np.zeros((n_blocks, DP_STEPS + 1), np.int16)
    for b in range(n_blocks):
        new = np.full(DP_STEPS + 1, np.inf)
        pick = np.zeros(DP_STEPS + 1, np.int16)
        for o in range(n_opt):
            u = units[b, o]
            if u > DP_STEPS or not np.isfinite(err[b, o]):
                continue
            cand = np.full(DP_STEPS + 1, np.inf)
            cand[u:] = best[: DP_STEPS + 1 - u] + err[b, o]
            better = cand < new
            new[better] = cand[better]
            pick[better] = o
        best = new
        choice[b] = pick
    out = []
    for budget in budgets:
        left = math.floor(budget / unit + 1e-9)
        picks = np.zeros(n_blocks, np.int64)
        for b in range(n_blocks - 1, -1, -1):
            o = int(choice[b, left])
            picks[b] = o
            left -= int(units[b, o])
        out.append(picks)
    return out


# ------------------------------------------------------------------------------------------------ calibration


def _recipe_sinks(recipe: str, sinks: int | None) -> int:
    """``sinks``, or the recipe's default (:data:`DEFAULT_SINKS`); ``ValueError`` for an unknown recipe."""
    if recipe not in DEFAULT_SINKS:
        raise ValueError(f"recipe must be 'transform' or 'kvtc', got {recipe!r}")
    return DEFAULT_SINKS[recipe] if sinks is None else sinks


def calibrate_from_caches(caches: Sequence[KVCache], spec: ModelSpec, *, recipe: str = "transform",
                          grouping: str | None = None, weights: np.ndarray | None = None, sinks: int | None = None,
                          ratios: Sequence[float] = DEFAULT_RATIOS,
                          default_ratio: float = CalibrationConfig.default_ratio,
                          rounding: float = CalibrationConfig.rounding, max_tokens: int = CalibrationConfig.max_tokens,
                          reference_tokens: int = CalibrationConfig.tokens,
                          sink_format: str | None = None, basis_format: str | None = None,
                          component_cost: float = 0.0, log: Log | None = None) -> Profile:
    """A transform profile from KV caches of calibration text (no model needed).

    Args:
        caches: calibration caches (never evaluation documents); tokens at positions ``< sinks`` are left out.
        sinks: tokens stored apart from the transform, recorded in the profile as the codec's default
            (:data:`DEFAULT_SINKS` by recipe).
        spec: their model spec (the profile is bound to its fingerprint).
        recipe: ``"transform"`` (entropy-coded levels among the options, exact sinks, joint K+V basis by default) or
            ``"kvtc"`` (the paper's recipe: int2/int4/fp8 with group scales, DEFLATE, fp8 sinks, separate K and V).
        grouping: ``"joint"``, ``"kv"`` or ``"layers:G"`` (:func:`~kvpack.codecs.transform.features.feature_groups`;
            default by recipe).
        weights: float ``[D]`` per-feature error weights (see :func:`sensitivity`); uniform if ``None``.
        ratios: nominal compression ratios of the presets (named ``"{ratio:g}x"``).
        default_ratio: the preset used when a codec names none.
        rounding: entropy-coded quantizer rounding offset (0.5 = nearest level, smaller = dead zone).
        max_tokens: at most this many calibration tokens (evenly subsampled) enter the statistics.
        reference_tokens: chunk length at which sinks and header are counted in the budgets.
        sink_format: how the codec stores sink tokens, ``"exact"`` (bf16 bits) or ``"fp8"`` (e4m3, an fp32 scale per
            layer and K/V); default by recipe (``transform`` exact, ``kvtc`` fp8, as the paper).
        basis_format: how the profile stores the basis rows: ``"int8"`` with a scale per 32 features (56% of the
            fp16 size at the same quality from the 32x preset up: docs/transform.md, "Basis precision"; see
            :func:`~kvpack.codecs.transform.profile.store_basis`) or ``"fp16"`` (the only format before; 12% less
            KL at the 10x preset in-source); default by recipe (``transform`` int8, ``kvtc`` fp16: not measured
            with int8).
        component_cost: the share of the total variance each coded component must remove besides its bits to be
            kept (0: error under the bit budget only). Decoding multiplies ``[T, U] @ [U, D]`` for ``U`` coded
            components, the larger part of a transform decode, so a price per component trades a little error at
            equal bits for a smaller ``U`` (docs/transform.md, "Pricing components").
    """
    check_storage(sink_format, basis_format, component_cost)
    basis_format = basis_format or ("int8" if recipe == "transform" else "fp16")
    sinks = _recipe_sinks(recipe, sinks)
    sink_format = sink_format or ("exact" if recipe == "transform" else "fp8")
    grouping = grouping or ("joint" if recipe == "transform" else "kv")
    say = log or (lambda _msg: None)
    fit_x, held_x = _split(caches, sinks, max_tokens)
    dims = fit_x.shape[1]
    w = torch.ones(dims) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (dims,) or not bool((w > 0).all()):
        raise ValueError(f"weights must be positive [{dims}]")
    say(f"{fit_x.shape[0]} tokens for the basis, {held_x.shape[0]} held-out tokens for the allocation, {dims} features")
    width = spec.num_kv_heads * spec.head_dim
    groups = feature_groups(spec.num_layers, width, grouping)
    r = quant.rates()
    low = quant.low_bits()
    fits = []
    residual = 0.0
    for g, idx in enumerate(groups):
        cols = torch.from_numpy(idx)
        mean = fit_x[:, cols].mean(0)
        basis, _ = _pca((fit_x[:, cols] - mean) * w[idx])
        held = (held_x[:, cols] - mean) * w[idx]
        coef = held @ basis.T
        residual += float(held.double().pow(2).sum(1).mean() - coef.double().pow(2).sum(1).mean())
        sigma = coef.double().pow(2).mean(0).sqrt().clamp_min(1e-12).float().numpy()
        z = np.ascontiguousarray((coef.numpy() / sigma).astype(np.float32))
        fits.append((mean, basis, sigma, z))
        say(f"group {g}: PCA of {len(idx)} features, {len(sigma)} components")
    ec_stats: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(groups)
    freqs = np.zeros((quant.N_RATES, quant.ALPHABET), np.uint16)
    shrink = np.zeros(quant.N_RATES)
    if recipe == "transform":
        hist = np.zeros((quant.N_RATES, 256))
        offsets = []
        for _, _, _, z in fits:
            h, off = _class_stats(z, r, low, rounding)
            hist += h
            offsets.append(off)
        shrink = np.mean(offsets, axis=0)
        freqs, cost = _tables(hist)
        for g, (_, _, _, z) in enumerate(fits):
            ec_stats[g] = _component_costs(z, r, low, rounding, shrink, cost)
        say("entropy-coding statistics done")
    options: list[tuple[int, int]] = []
    bits_parts, err_parts = [], []
    for g, (_, _, sigma, z) in enumerate(fits):
        stats = ec_stats[g]
        options, b, e = _block_options(z, sigma, recipe, *(stats if stats else (None, None)))
        bits_parts.append(b)
        err_parts.append(e)
    bits, err = np.concatenate(bits_parts), np.concatenate(err_parts)
    total_var = float(sum(float((s.astype(np.float64) ** 2).sum()) for _, _, s, _ in fits)) + max(residual, 0.0)
    sizes = np.concatenate([np.diff(np.minimum(np.arange(0, len(s) + quant.BLOCK, quant.BLOCK), len(s)))
                            for _, _, s, _ in fits])  # components per block
    sink_bytes = sinks * dims * 2 if sink_format == "exact" else sinks * dims + 4 * (dims // width)
    coded_tokens = reference_tokens - sinks
    budgets = [(16 * dims * reference_tokens / ratio - 8 * (sink_bytes + HEADER_BYTES)) / coded_tokens
               for ratio in ratios]
    if min(budgets) <= 0:
        raise ValueError("a ratio leaves no bits after sinks and header; lower it or raise reference_tokens")
    coded = np.array([kind != quant.TYPE_DROP for kind, _ in options])
    picks = _allocate(bits, err + component_cost * total_var * np.outer(sizes, coded), budgets)
    say("allocation done")
    presets: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    rows = np.arange(bits.shape[0])
    for ratio, pick in zip(ratios, picks, strict=True):
        name = f"{ratio:g}x"
        kinds = np.array([options[o][0] for o in pick], np.uint8)
        params = np.array([options[o][1] for o in pick], np.int64)
        chosen_bits, chosen_err = bits[rows, pick], err[rows, pick]
        gain = (err[:, 0] - chosen_err) / np.maximum(chosen_bits, 1e-9)
        rank = np.empty(len(pick), np.int64)
        rank[np.argsort(-gain, kind="stable")] = np.arange(len(pick))
        per_token = float(chosen_bits.sum())
        stored = (per_token * coded_tokens / 8 + sink_bytes + HEADER_BYTES)
        info: dict[str, Any] = {
            "name": name, "nominal_ratio": ratio, "ratio": 2 * dims * reference_tokens / stored,
            "bits_per_token": per_token, "relative_error": (float(chosen_err.sum()) + residual) / total_var,
            "components": int(sizes[kinds != quant.TYPE_DROP].sum()),
            "kl": None,
            "types": {quant.TYPES[t]: int((kinds == t).sum()) for t in range(len(quant.TYPES)) if (kinds == t).any()},
        }
        presets.append(info)
        arrays.update({f"type.{name}": kinds, f"param.{name}": params, f"rank.{name}": rank})
    arrays_out: dict[str, np.ndarray] = {}
    arrays_out.update(_trim(fits, arrays, presets, arrays_out))
    arrays_out.update({"freqs": freqs, "shrink": shrink.astype(np.float32)})
    for g, (mean, basis, _, _) in enumerate(fits):
        used = len(arrays_out[f"sigma{g}"])
        arrays_out[f"mean{g}"] = mean.numpy().astype(np.float32)
        arrays_out[f"weight{g}"] = w[groups[g]].numpy().astype(np.float32)
        arrays_out.update(store_basis(g, basis[:used].numpy(), basis_format))
    meta = {"recipe": recipe, "grouping": grouping, "layers": spec.num_layers, "width": width, "rounding": rounding,
            "sink_format": sink_format, "presets": presets,
            "default_preset": min(presets, key=lambda p: abs(p["nominal_ratio"] - default_ratio))["name"],
            "calibration_tokens": int(fit_x.shape[0]), "held_out_tokens": int(held_x.shape[0]),
            "reference_tokens": reference_tokens, "sinks": sinks,
            "weighted": weights is not None}
    profile = Profile(codec="kvtc" if recipe == "kvtc" else "transform", model_fingerprint=spec.fingerprint,
                      meta=meta, arrays=arrays_out)
    say(f"profile {profile.hash}: {profile.nbytes / 1e6:.1f} MB")
    return profile


def _trim(fits: list[tuple[Any, Any, np.ndarray, Any]], arrays: dict[str, np.ndarray], presets: list[dict[str, Any]],
          out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut every group to the last block some preset uses; re-index the per-block arrays."""
    n_blocks = [-(-len(s) // quant.BLOCK) for _, _, s, _ in fits]
    starts = np.concatenate([[0], np.cumsum(n_blocks)])
    used_any = np.zeros(int(starts[-1]), bool)
    for p in presets:
        used_any |= arrays[f"type.{p['name']}"] != quant.TYPE_DROP
    keep_blocks = []
    for g, (_, _, sigma, _) in enumerate(fits):
        used = np.flatnonzero(used_any[starts[g] : starts[g + 1]])
        n_keep = int(used[-1]) + 1 if used.size else 1
        out[f"sigma{g}"] = sigma[: min(len(sigma), n_keep * quant.BLOCK)].astype(np.float32)
        keep_blocks.append(np.arange(starts[g], starts[g] + n_keep))
    keep = np.concatenate(keep_blocks)
    trimmed = {}
    for name, a in arrays.items():
        part = a[keep]
        if name.startswith("rank."):
            part = np.argsort(np.argsort(part, kind="stable"), kind="stable")
        trimmed[name] = part
    return trimmed


# ------------------------------------------------------------------------------------------------ with the model


def _doc_ids(tokenizer: Any, texts: Sequence[str], tokens: int, cont: int) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() >= tokens + cont:
            out.append(ids[: tokens + cont])
    if not out:
        raise ValueError(f"no calibration text has {tokens + cont} tokens; give longer texts or lower tokens")
    return out


def calibrate(model: Any, tokenizer: Any, spec: ModelSpec, docs: Sequence[Any] | None = None, n_docs: int = 6,
              texts: Sequence[str] | None = None, *, recipe: str = "transform", config: CalibrationConfig | None = None,
              log: Log | None = None) -> Profile:
    """Calibrate a profile with the model (``kvpack calibrate``): what :func:`calibrate_from_caches` does, plus
    Fisher weights and per-preset KL measured on the last calibration document (held out from the basis).

    Args:
        docs: :class:`kvpack.eval.Document` list; default ``documents(n_docs, "calibration")`` (never eval documents).
        texts: raw calibration texts instead of ``docs`` (``kvpack calibrate --text FILE``).
        config: the settings (:class:`CalibrationConfig`; its defaults if ``None``).
    """
    from kvpack.codecs.transform import KVTC, Transform
    from kvpack.eval.corpora import documents
    from kvpack.inference import forward, prefill

    cfg = config or CalibrationConfig()
    tokens, fisher_docs = cfg.tokens, cfg.fisher_docs
    sinks = _recipe_sinks(recipe, cfg.sinks)
    say = log or (lambda _msg: None)
    if texts is None:
        texts = [d.text for d in (docs if docs is not None else documents(n_docs, "calibration"))]
    caches, refs, fisher = [], [], []
    all_ids = _doc_ids(tokenizer, texts, tokens, cfg.cont)
    for i, ids in enumerate(all_ids):
        if i >= len(all_ids) - fisher_docs:
            kv, logprobs, f = prefill_and_fisher(model, spec, ids, tokens, sinks)
            refs.append((ids[tokens:], logprobs))
            fisher.append(f)
        else:
            kv, _ = prefill(model, spec, ids[:tokens], step=512)
        caches.append(kv)
        say(f"calibration document {i + 1}: {tokens} tokens")
    weights = None
    if cfg.weighting == "fisher":
        retrieval = None
        if cfg.retrieval:
            say(f"retrieval sensitivity: {cfg.retrieval} haystacks of {cfg.retrieval_tokens} tokens")
            retrieval = retrieval_fisher(model, tokenizer, spec, texts, cfg.retrieval, cfg.retrieval_tokens, sinks)
        weights = fisher_weights(torch.stack(fisher).mean(0), retrieval, cfg.retrieval_share)
    profile = calibrate_from_caches(caches, spec, recipe=recipe, weights=weights, sinks=sinks, ratios=cfg.ratios,
                                    default_ratio=cfg.default_ratio, reference_tokens=tokens, rounding=cfg.rounding,
                                    max_tokens=cfg.max_tokens, grouping=cfg.grouping, sink_format=cfg.sink_format,
                                    basis_format=cfg.basis_format, component_cost=cfg.component_cost, log=say)
    if not cfg.measure_kl:
        return profile
    cont_ids, reference = refs[-1]
    cls = Transform if recipe == "transform" else KVTC
    presets = [dict(p) for p in profile.meta["presets"]]
    for p in presets:
        codec = cls(profile=profile, preset=p["name"], sinks=sinks)
        decoded = codec.decode(codec.encode(caches[-1]))
        logprobs = forward(model, cont_ids, decoded.to_hf()).log_softmax(-1)
        p["kl"] = float((reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0).mean())
        say(f"preset {p['name']}: KL {p['kl']:.4f}")
    return Profile(codec=profile.codec, model_fingerprint=profile.model_fingerprint,
                   meta={**profile.meta, "presets": presets}, arrays=profile.arrays)
