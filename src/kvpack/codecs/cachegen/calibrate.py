"""Offline profiling for the `cachegen` codec: the per-model CacheGen Profile (format: :mod:`.profile`).

CacheGen (Liu et al., SIGCOMM 2024, arXiv 2310.07240, §5.2) arithmetic-codes its quantized KV symbols with a
probability distribution per (layer, channel) that it profiles offline, once per model. :func:`build_profile` does
that on calibration documents (:func:`kvpack.eval.corpora.documents` with ``split="calibration"``);
:func:`build_profile_from_caches` does it from given KV caches (tests, dumped caches).

How tables are made: every calibration cache is quantized exactly as the encoder does (groups of 10 tokens from its
first token); per table the bin indices are counted (raw: every token's index, since anchors are every tenth token
and the ablation codes all tokens raw; delta: ``q - q_anchor`` of the nine other tokens of each group). The window
covers the observed indices plus ``margin`` on each side (at most 255 symbols; wider distributions keep the 255-wide
window with the most mass), and the frequencies are the counts plus ``smoothing`` per symbol (so indices never seen
in calibration cost about ``log2(N / smoothing)`` bits instead of failing), quantized to 15 bits with
:func:`kvpack.entropy.quantize_freqs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from kvpack.codecs.cachegen.codec import CacheGen, quantize_indices
from kvpack.codecs.cachegen.profile import GROUP_SIZE, LEVELS, N_GROUPS, PROFILE_FORMAT, layer_groups
from kvpack.entropy import pack_tables, quantize_freqs
from kvpack.entropy.tables import MAX_ALPHABET
from kvpack.eval.corpora import Document, documents
from kvpack.inference import prefill
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

__all__ = ["DEFAULT_BINS", "build_profile", "build_profile_from_caches"]

#: Bin sizes in units of each channel's calibration std, per level (low, medium, high) and layer group (first,
#: middle, last third). The 1 : 2 : 3 progression over layer groups is the paper's (0.5, 1, 1.5, §5.2); "medium"
#: uses the paper's numbers.
DEFAULT_BINS: tuple[tuple[float, float, float], ...] = ((1.0, 2.0, 3.0), (0.5, 1.0, 1.5), (0.25, 0.5, 0.75))
#: Histograms cover bin indices -HIST..HIST; a window always lies inside.
HIST = 256
#: Fixed-point factor applied to counts before adding the smoothing pseudo-count (tables need integer counts).
_COUNT_SCALE = 64
_MAX_WIDTH = MAX_ALPHABET - 1


@dataclass(frozen=True)
class CalibrationConfig:
    """CacheGen's calibration settings (``kvpack calibrate --codec cachegen --option name=value``), checked when
    made: ``tokens`` (prefix of each document whose KV cache is profiled; :func:`build_profile`), and ``bins``,
    ``margin``, ``smoothing`` as in :func:`build_profile_from_caches`."""

    tokens: int = 1536
    bins: Sequence[Sequence[float]] = DEFAULT_BINS
    margin: int = 2
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 10 <= self.tokens <= 1 << 24:
            raise ValueError(f"calibration setting tokens must be an integer in 10..{1 << 24}, got {self.tokens!r}")
        try:
            b = np.asarray(self.bins, np.float64)
        except (TypeError, ValueError):
            b = np.zeros(0)
        if b.shape != (len(LEVELS), N_GROUPS) or not np.all(np.isfinite(b)) or not np.all(b > 0):
            raise ValueError(f"bins must be finite positive numbers of shape {(len(LEVELS), N_GROUPS)}, got "
                             f"{self.bins!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or not 0 <= self.margin <= 64:
            raise ValueError(f"margin must be an integer in 0..64, got {self.margin!r}")
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, int | float) \
                or not 0 < self.smoothing <= 1e6:
            raise ValueError(f"smoothing must be a number in (0, 1e6], got {self.smoothing!r}")


@njit(nogil=True, cache=True, parallel=True)
def _count(q, raw, delta, outside):  # type: ignore[no-untyped-def]
    """Add the indices ``q`` (int32 ``[R, T]``) to ``raw``/``delta`` (int64 ``[R, 2 HIST + 1]``); indices outside
    ``-HIST..HIST`` go to ``outside`` (int64 ``[R, 2]``)."""
    rows, n = q.shape
    for r in prange(rows):
        q_anchor = 0
        for t in range(n):
            v = q[r, t]
            if t % GROUP_SIZE == 0:
                q_anchor = v
            else:
                d = v - q_anchor
                if -HIST <= d <= HIST:
                    delta[r, d + HIST] += 1
                else:
                    outside[r, 1] += 1
            if -HIST <= v <= HIST:
                raw[r, v + HIST] += 1
            else:
                outside[r, 0] += 1


def _windows(counts: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``counts [n, 2 HIST + 1]``: window start (bin index) and width, int64 ``[n]`` each."""
    size = counts.shape[1]
    used = counts > 0
    any_used = used.any(axis=1)
    first = np.where(any_used, used.argmax(axis=1), HIST)
    last = np.where(any_used, size - 1 - used[:, ::-1].argmax(axis=1), HIST)
    start = first - margin
    width = last - first + 1 + 2 * margin
    wide = width > _MAX_WIDTH
    if wide.any():  # the 255-wide window holding the most calibration mass
        cum = np.zeros((int(wide.sum()), size + 1), np.int64)
        np.cumsum(counts[wide], axis=1, out=cum[:, 1:])
        start[wide] = (cum[:, _MAX_WIDTH:] - cum[:, :-_MAX_WIDTH]).argmax(axis=1)
        width[wide] = _MAX_WIDTH
    start = np.clip(start, 0, size - width)
    return start - HIST, width


def _tables(counts: np.ndarray, outside: np.ndarray, lo: np.ndarray, width: np.ndarray,
            smoothing: float) -> np.ndarray:
    """Frequency tables ``[n, 256]`` (window then escape, see the module docstring) from histograms."""
    n = counts.shape[0]
    cols = np.arange(MAX_ALPHABET)
    idx = np.clip(lo[:, None] + HIST + cols[None, :], 0, counts.shape[1] - 1)
    inside = cols[None, :] < width[:, None]
    window = np.where(inside, np.take_along_axis(counts, idx, axis=1), 0)
    escaped = counts.sum(axis=1) + outside - window.sum(axis=1)
    pseudo = max(1, round(smoothing * _COUNT_SCALE))
    weighted = np.where(inside, window * _COUNT_SCALE + pseudo, 0)
    weighted[np.arange(n), width] = escaped * _COUNT_SCALE + pseudo
    return quantize_freqs(weighted)


def build_profile_from_caches(caches: Sequence[KVCache], *,
                              bins: Sequence[Sequence[float]] = DEFAULT_BINS, margin: int = CalibrationConfig.margin,
                              smoothing: float = CalibrationConfig.smoothing, document_names: Sequence[str] = (),
                              on_progress: Callable[[str], None] | None = None) -> Profile:
    """Profile CacheGen's tables from calibration ``caches`` (same model; any token counts).

    Args:
        caches: calibration KV caches; each is grouped in tens from its first token, as a chunk is.
        bins: ``[3 levels][3 layer groups]`` bin sizes in units of channel std (finer for higher levels).
        margin: indices added to each side of a table's observed range before escaping.
        smoothing: pseudo-count of every window symbol and of the escape symbol.
        document_names: recorded in ``meta["calibration"]``.
        on_progress: called with a short status line per step.

    Returns:
        The profile (its hash names it; save it with :meth:`Profile.save`).
    """
    if not caches:
        raise ValueError("build_profile_from_caches needs at least one cache")
    spec = caches[0].spec
    if any(kv.spec.fingerprint != spec.fingerprint for kv in caches):
        raise ValueError("calibration caches come from different models")
    CalibrationConfig(bins=bins, margin=margin, smoothing=smoothing)
    b = np.asarray(bins, np.float64)
    channels = spec.num_kv_heads * spec.head_dim
    rows = 2 * spec.num_layers * channels
    say = on_progress or (lambda _: None)

    total = np.zeros(rows)
    square = np.zeros(rows)
    n_tokens = sum(kv.num_tokens for kv in caches)
    if n_tokens == 0:
        raise ValueError("the calibration caches hold no tokens")
    for kv in caches:
        x = kv.data.double()  # [L, 2, H, T, D]
        total += x.sum(dim=3).reshape(rows).numpy()
        square += x.square().sum(dim=3).reshape(rows).numpy()
    mean = total / n_tokens
    std = np.sqrt(np.maximum(square / n_tokens - mean**2, 0.0))
    per_kind = std.reshape(spec.num_layers * 2, channels)
    floor = np.maximum(1e-6 * per_kind.max(axis=1, keepdims=True), 1e-30)
    std = np.maximum(per_kind, floor).reshape(rows).astype(np.float32)
    mean32 = mean.astype(np.float32)
    say(f"statistics of {rows} channels over {n_tokens} tokens")

    groups = layer_groups(spec.num_layers)
    window_lo = np.zeros((len(LEVELS), rows, 2), np.int32)
    window_width = np.zeros((len(LEVELS), rows, 2), np.uint8)
    arrays: dict[str, np.ndarray] = {}
    for level in range(len(LEVELS)):
        scale = np.repeat(b[level][groups], 2 * channels) * std.astype(np.float64)
        hist = np.zeros((2, rows, 2 * HIST + 1), np.int64)
        outside = np.zeros((rows, 2), np.int64)
        for kv in caches:
            q, ok = quantize_indices(kv, mean32.astype(np.float64), scale)
            if not ok:
                raise ValueError("a calibration cache holds a non-finite value or an extreme outlier")
            _count(q, hist[0], hist[1], outside)
        freqs = np.zeros((rows, 2, MAX_ALPHABET), np.uint32)
        for role in (0, 1):
            lo, width = _windows(hist[role], margin)
            window_lo[level, :, role] = lo
            window_width[level, :, role] = width
            freqs[:, role] = _tables(hist[role], outside[:, role], lo, width, smoothing)
        arrays[f"tables{level}"] = np.frombuffer(pack_tables(freqs.reshape(2 * rows, MAX_ALPHABET)), np.uint8)
        say(f"level {level}: tables of {int(window_width[level].mean() + 0.5)} symbols on average")
    shape = (spec.num_layers, 2, channels)
    arrays |= {
        "mean": mean32.reshape(shape),
        "std": std.reshape(shape),
        "bins": b,
        "window_lo": window_lo,
        "window_width": window_width,
    }
    meta: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "group_size": GROUP_SIZE,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "layer_groups": groups.tolist(),
        "levels": list(LEVELS),
        "margin": margin,
        "smoothing": smoothing,
        "calibration": {"documents": list(document_names), "caches": len(caches), "tokens": n_tokens},
    }
    return Profile(codec=CacheGen.name, model_fingerprint=spec.fingerprint, meta=meta, arrays=arrays)


def build_profile(model: Any, tokenizer: Any, spec: ModelSpec, docs: Sequence[Document] | int = 8, *,
                  tokens: int = CalibrationConfig.tokens, bins: Sequence[Sequence[float]] = DEFAULT_BINS,
                  margin: int = CalibrationConfig.margin, smoothing: float = CalibrationConfig.smoothing,
                  on_progress: Callable[[str], None] | None = None) -> Profile:
    """Profile CacheGen's tables for ``model`` on calibration documents.

    Args:
        model, tokenizer, spec: the model (as :func:`kvpack.models.load` and :meth:`ModelSpec.from_model` give).
        docs: the documents, or how many calibration documents to take (half code, half prose; never eval ones).
        tokens: prefix of each document whose KV cache is profiled.
        bins, margin, smoothing, on_progress: as :func:`build_profile_from_caches`.
    """
    CalibrationConfig(tokens=tokens, bins=bins, margin=margin, smoothing=smoothing)
    chosen = documents(docs, split="calibration") if isinstance(docs, int) else list(docs)
    say = on_progress or (lambda _: None)
    caches = []
    for doc in chosen:
        ids = tokenizer(doc.text, return_tensors="pt", add_special_tokens=False).input_ids[0][:tokens]
        kv, _ = prefill(model, spec, ids, step=256)
        caches.append(kv)
        say(f"prefilled {doc.name}: {kv.num_tokens} tokens")
    return build_profile_from_caches(caches, bins=bins, margin=margin, smoothing=smoothing,
                                     document_names=[d.name for d in chosen], on_progress=on_progress)
