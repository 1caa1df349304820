"""The CacheGen profile: per-model tables of the `cachegen` codec, validated and unpacked for coding.

Profile contents (a :class:`~kvpack.profile.Profile` with ``codec="cachegen"``; rows ``r`` are (layer, K/V,
channel) with channel ``= kv_head * head_dim + dim``; ``C = num_kv_heads * head_dim``):

==================  ==========================  ==============================================================
array               dtype, shape                meaning
==================  ==========================  ==============================================================
``mean``            f4 ``[L, 2, C]``            calibration mean of every channel (kind 0 = keys, 1 = values)
``std``             f4 ``[L, 2, C]``            calibration standard deviation (floored at 1e-6 of the largest
                                                in its layer and kind, and at 1e-30): the unit of the bins
``bins``            f8 ``[3, 3]``               bin size in units of ``std``, per (level, layer group)
``window_lo``       i4 ``[3, R, 2]``            first bin index of each table's window, per (level, row, role);
                                                ``R = 2 L C``, row ``r = (layer * 2 + kind) * C + channel``
``window_width``    u1 ``[3, R, 2]``            window width ``w`` (1..255); role 0 = raw, 1 = delta
``tables{level}``   u1 ``[bytes]``              :func:`kvpack.entropy.pack_tables` of ``[2 R, 256]`` tables: row
                                                ``2 r + role`` has the window's frequencies at ``0..w-1`` and the
                                                escape symbol's at ``w``, zeros after; every entry in ``0..w`` is
                                                at least 1, so any index can be coded
==================  ==========================  ==============================================================

``meta``: ``format`` (1), ``group_size`` (10), ``num_layers``, ``num_kv_heads``, ``head_dim``, ``layer_groups``,
``levels``, ``margin``, ``smoothing`` and ``calibration`` (document names, caches, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvpack.entropy import unpack_tables
from kvpack.entropy.models import Model
from kvpack.entropy.tables import MAX_ALPHABET
from kvpack.errors import FormatError, ModelMismatchError
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

#: The codec these profiles serve (``Profile.codec``).
CODEC_NAME = "cachegen"
#: Tokens per anchor group (CacheGen §5.2).
GROUP_SIZE = 10
#: Names of the quality levels; a level selects one row of the profile's ``bins``.
LEVELS = {"low": 0, "medium": 1, "high": 2}
#: Layer groups (first, middle, last third of the layers).
N_GROUPS = 3
#: Table roles: ``raw`` codes an index itself (anchors; every token without anchor/delta), ``delta`` codes ``q - q_a``.
ROLE_RAW, ROLE_DELTA = 0, 1
#: Profile format version (``meta["format"]``).
PROFILE_FORMAT = 1
#: Largest ``|lo|`` a profile window may start at (the builder's histogram range).
MAX_WINDOW_LO = 1 << 12


def layer_groups(num_layers: int) -> np.ndarray:
    """Layer group of each layer, int64 ``[num_layers]``: 0 for the first third, 1 the middle, 2 the last."""
    return np.minimum(N_GROUPS * np.arange(num_layers, dtype=np.int64) // num_layers, N_GROUPS - 1)


@dataclass(frozen=True, eq=False)
class CacheGenTables:
    """A validated CacheGen profile, unpacked for coding. Rows ``r`` index (layer, K/V, channel) as
    ``(layer * 2 + kind) * C + channel`` with ``C = num_kv_heads * head_dim`` and kind 0 = keys, 1 = values.

    Attributes:
        profile: the :class:`~kvpack.profile.Profile` it came from.
        mean: float64 ``[R]``; std: float64 ``[R]``.
        bins: float64 ``[3, 3]``, bin size in units of ``std`` per (level, layer group).
        lo, width: int64 ``[3, R, 2]``: window of each (level, row, role).
        freqs: per level, uint32 ``[2 R, alphabet]``; row ``2 r + role``; the last column is the escape symbol.

    The rANS coders read :meth:`model`, compiled on first use per level and kept here.
    """

    profile: Profile
    num_layers: int
    num_kv_heads: int
    head_dim: int
    mean: np.ndarray
    std: np.ndarray
    bins: np.ndarray
    lo: np.ndarray
    width: np.ndarray
    freqs: tuple[np.ndarray, ...]
    _models: dict[tuple[int, bool], Model] = field(default_factory=dict, init=False, repr=False)

    @property
    def rows(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def scale(self, level: int) -> np.ndarray:
        """Bin width of every row at ``level``: float64 ``[R]``."""
        groups = layer_groups(self.num_layers)
        per_row = np.repeat(self.bins[level][groups], 2 * self.num_kv_heads * self.head_dim)
        return per_row * self.std

    def model(self, level: int, anchor_delta: bool) -> Model:
        """The compiled tables of ``level``: all ``2 R`` (anchor/delta coding), or the ``R`` raw ones only."""
        key = (level, anchor_delta)
        if key not in self._models:
            freqs = self.freqs[level]
            self._models[key] = Model.from_freqs(freqs if anchor_delta else freqs[ROLE_RAW::2])
        return self._models[key]

    @classmethod
    def from_profile(cls, profile: Profile) -> CacheGenTables:
        """Validate and unpack ``profile``; :class:`FormatError` on any inconsistency."""
        if profile.codec != CODEC_NAME:
            raise FormatError(f"profile is for codec {profile.codec!r}, not {CODEC_NAME!r}")
        meta = profile.meta
        if meta.get("format") != PROFILE_FORMAT or meta.get("group_size") != GROUP_SIZE:
            raise FormatError(f"CacheGen profile format {meta.get('format')!r} / group size "
                              f"{meta.get('group_size')!r} is not supported (expected {PROFILE_FORMAT} / {GROUP_SIZE})")
        dims = [meta.get(k) for k in ("num_layers", "num_kv_heads", "head_dim")]
        if not all(isinstance(d, int) and 0 < d <= 1 << 16 for d in dims):
            raise FormatError(f"CacheGen profile has bad dimensions {dims}")
        layers, heads, head_dim = (int(d) for d in dims)  # type: ignore[arg-type]
        channels = heads * head_dim
        rows = 2 * layers * channels
        a = profile.arrays
        levels = len(LEVELS)
        expect: dict[str, tuple[str, tuple[int, ...] | None]] = {
            "mean": ("<f4", (layers, 2, channels)), "std": ("<f4", (layers, 2, channels)),
            "bins": ("<f8", (levels, N_GROUPS)), "window_lo": ("<i4", (levels, rows, 2)),
            "window_width": ("|u1", (levels, rows, 2))}
        expect |= {f"tables{lv}": ("|u1", None) for lv in range(len(LEVELS))}
        for name, (dtype, shape) in expect.items():
            arr = a.get(name)
            if arr is None or arr.dtype.newbyteorder("<").str != dtype or (shape is not None and arr.shape != shape) \
                    or (shape is None and arr.ndim != 1):
                raise FormatError(f"CacheGen profile array {name!r} is missing or not {dtype} {shape or '[n]'}")
        mean = a["mean"].astype(np.float64).reshape(rows)
        std = a["std"].astype(np.float64).reshape(rows)
        bins = a["bins"].astype(np.float64)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise FormatError("CacheGen profile has a non-finite mean or a non-positive std")
        if not (np.all(np.isfinite(bins)) and np.all(bins > 0)):
            raise FormatError("CacheGen profile bins must be finite and positive")
        lo = a["window_lo"].astype(np.int64)
        width = a["window_width"].astype(np.int64)
        if np.any(np.abs(lo) > MAX_WINDOW_LO) or np.any(width < 1):
            raise FormatError("CacheGen profile has a window outside the supported range")
        freqs = []
        for lv in range(len(LEVELS)):
            packed = unpack_tables(a[f"tables{lv}"].tobytes(), 2 * rows, MAX_ALPHABET)
            w = width[lv].reshape(-1)
            cols = np.arange(MAX_ALPHABET)
            inside = cols[None, :] <= w[:, None]  # window symbols 0..w-1, then the escape at w
            if np.any((packed > 0) != inside):
                raise FormatError(f"CacheGen profile level {lv}: a table does not match its window width")
            alphabet = int(w.max()) + 1
            f = np.zeros((2 * rows, alphabet), np.uint32)
            window = cols[None, :alphabet - 1] < w[:, None]
            f[:, : alphabet - 1] = np.where(window, packed[:, : alphabet - 1], 0)
            f[:, alphabet - 1] = packed[np.arange(2 * rows), w]
            freqs.append(f)
        return cls(profile=profile, num_layers=layers, num_kv_heads=heads, head_dim=head_dim, mean=mean, std=std,
                   bins=bins, lo=lo, width=width, freqs=tuple(freqs))

    def check_spec(self, spec: ModelSpec) -> None:
        """:class:`ModelMismatchError` unless ``spec`` is the model this profile was built for."""
        if spec.fingerprint != self.profile.model_fingerprint or \
                (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (self.num_layers, self.num_kv_heads,
                                                                        self.head_dim):
            raise ModelMismatchError(
                f"the CacheGen profile {self.profile.hash} was built for model {self.profile.model_fingerprint[:12]}, "
                f"not for {spec.name or '?'} ({spec.fingerprint[:12]}); build a profile for this model")
