"""`Loader`: bring a stored prefix back by loading from the back while computing from the front.

A request whose first ``n`` chunks are stored needs their KV before the model can read the rest of the prompt.
Loading them one after the other (fetch all, decode all) leaves the CPU idle during transfer and the link idle
during decoding, and ignores that recomputing a chunk may be as fast as fetching it. The loader runs three things at
once, as Cake does ("Compute Or Load KV Cache? Why Not Both?", Jin et al., arXiv 2410.03065, §4):

- **fetch**: an I/O thread reads the chunks from the *back* (chunk ``n - 1`` first), ``prefetch`` chunks ahead;
- **decode**: the loader thread decodes each chunk, as its bytes arrive, straight into its slice of the request's
  KV buffer (allocated once, :meth:`KVCache.empty`; ``decode(..., out=)``);
- **compute**: the calling thread prefills chunks from the *front* (chunk ``0`` first) on top of what it computed.

Each side claims the next chunk under a lock, so the two meet where their speeds cross and no chunk is done twice:
a slow link or a slow decoder moves the meeting point back, a fast one forward, without a plan having to be right.
Whether to compute at all is planned from online estimates (:class:`Estimates`: EWMA of fetch and decode
throughput per store and codec, and of this model's prefill throughput on this machine, persisted as JSON in the
cache directory): the front starts only when loading all ``n`` chunks is predicted to take longer than computing
one, since on two cores a compute thread that cannot win only slows the decoder down. A chunk that cannot be fetched
or decoded (a store outage mid-stream, an entry evicted or corrupted since the lookup) is a hole: the loader goes on,
and once everything before the hole is in the buffer the chunk is computed on top of it, so the output is still
correct, only that chunk costs compute, and the stats list it.

Exactness: loaded chunks are bit-identical to what was stored; computed chunks are what the model computes for them
in chunk-sized steps (as a prefix cache that stored them would hold, up to floating-point summation order).

Quality levels (CacheGen, Liu et al., SIGCOMM 2024, §5.3: a chunk's quality picked per chunk at load time): a loader
serves one or more codecs, best quality first. A progressive codec (``Transform(layers=k)``) gives ``k`` levels
without storing several copies: level ``j`` reads only the byte prefix that holds its first ``j`` layers
(:meth:`Store.get_range`, the header first). A non-progressive codec is one level, chosen at write time
(``ContextCache(levels=...)`` stores each chunk once per codec, under that codec's keys); the loader picks per chunk
among the levels stored for it. :func:`choose` plans, per request: with no TTFT target, the best level, and the
meeting point that minimizes TTFT; with ``ttft_slo=`` seconds, the best quality whose predicted TTFT meets the target,
else the fastest plan. While loading, a chunk that arrives much later than planned (the link slowed down) makes the
loader plan the chunks not yet taken again, with the time left and the rate it just saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch

from kvpack.codecs.base import Codec
from kvpack.errors import KvpackError
from kvpack.format import PREFIX_BYTES, header_bytes
from kvpack.inference import forward, new_cache
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec
from kvpack.store import Store
from kvpack.store.disk import default_cache_dir

ESTIMATES_FILE = "estimates.json"
#: Most estimates kept in the file (the most recently updated): a store's fetch rate is named after the store, and
#: every new temporary directory or URL would otherwise add one for good.
MAX_ESTIMATES = 512


@dataclass(frozen=True)
class LoaderConfig:
    """Settings of a :class:`Loader`.

    Attributes:
        compute_front: allow prefilling from the front while loading from the back (Cake); ``False`` loads only.
        prefetch: chunks the I/O thread reads ahead of the decoder (bounds the bytes in flight).
        ewma: weight of a new sample in the running estimates, in (0, 1].
        estimates_path: JSON file of the estimates; ``None`` means ``<cache dir>/estimates.json``
            (:func:`kvpack.store.default_cache_dir`); ``""`` keeps them in memory only.
    """

    compute_front: bool = True
    prefetch: int = 4
    ewma: float = 0.3
    estimates_path: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.prefetch <= 256:
            raise ValueError(f"prefetch must be in [1, 256] chunks, got {self.prefetch}")
        if not 0.0 < self.ewma <= 1.0:
            raise ValueError(f"ewma must be in (0, 1], got {self.ewma}")


class Estimates:
    """Running (EWMA) estimates by name, e.g. ``fetch_Bps/<store>``; persisted as a flat JSON object.

    Thread-safe. A missing, unreadable or malformed file starts from no estimates (with a warning when malformed):
    estimates only steer speed, never correctness. The :data:`MAX_ESTIMATES` most recently updated are kept, in that
    order, in memory and in the file.
    """

    def __init__(self, path: Path | None, alpha: float) -> None:
        self.path = path
        self.alpha = alpha
        self._lock = threading.Lock()
        self._values: dict[str, float] = self._read(path)

    @staticmethod
    def _read(path: Path | None) -> dict[str, float]:
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            values = {str(k): float(v) for k, v in data.items() if isinstance(v, int | float) and v > 0}
            return dict(list(values.items())[-MAX_ESTIMATES:])
        except (OSError, ValueError, AttributeError) as exc:
            warnings.warn(f"kvpack: ignoring unreadable loader estimates {path} ({exc})", stacklevel=3)
            return {}

    def get(self, name: str) -> float | None:
        with self._lock:
            return self._values.get(name)

    def update(self, name: str, sample: float) -> None:
        """Fold a positive ``sample`` into estimate ``name`` (the first sample is taken as it is)."""
        if not sample > 0 or sample == float("inf"):
            return
        with self._lock:
            old = self._values.pop(name, None)  # re-inserted last: the dict's order is the order of last update
            self._values[name] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample
            if len(self._values) > MAX_ESTIMATES:  # one name added at most: drop the least recently updated
                del self._values[next(iter(self._values))]

    def save(self) -> None:
        """Write the estimates atomically (temporary file + rename); an unwritable directory is only a warning."""
        if self.path is None:
            return
        with self._lock:
            text = json.dumps(self._values, indent=1)  # in update order, which _read keeps
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            warnings.warn(f"kvpack: could not save loader estimates to {self.path} ({exc})", stacklevel=2)


def _short(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def codec_label(codec: Codec) -> str:
    """A short readable name of a codec and the parameters it does not leave at their defaults (``kivi bits=4``),
    for stats and tables."""
    defaults = {f.name: f.default for f in fields(codec)}
    return codec.name + "".join(f" {k}={v}" for k, v in codec.params().items()
                                if v is not None and k not in ("profile", "layers") and v != defaults.get(k))


@runtime_checkable
class Progressive(Protocol):
    """A codec whose containers decode from a byte prefix at lower quality (``Transform(layers=k)``)."""

    layers: int

    def layer_ends(self, data: bytes | memoryview) -> tuple[int, ...]: ...

    def decode_prefix(self, data: bytes | memoryview, max_bytes: int | None = None, spec: ModelSpec | None = None,
                      *, token_ids: torch.Tensor | Sequence[int] | None = None,
                      out: KVCache | None = None) -> KVCache: ...


@dataclass(frozen=True)
class Level:
    """One way to load a chunk: the entry of codec ``source`` (an index into the loader's codecs), whole
    (``layers=None``) or only the byte prefix of its first ``layers`` progressive layers. ``name`` is shown in stats."""

    source: int
    codec: Codec
    layers: int | None
    name: str


def levels_of(codecs: Sequence[Codec]) -> list[Level]:
    """The quality levels of ``codecs`` (best quality first): each codec in order, and for a progressive one with
    ``k`` layers its whole entry then ``k - 1, ..., 1`` layers."""
    out = []
    for j, codec in enumerate(codecs):
        label = codec_label(codec)
        k = codec.layers if isinstance(codec, Progressive) and codec.layers > 1 else 1
        out.append(Level(j, codec, None, label if k == 1 else f"{label} {k}/{k}"))
        out += [Level(j, codec, m, f"{label} {m}/{k}") for m in range(k - 1, 0, -1)]
    return out


@dataclass(frozen=True)
class EstimateNames:
    """The names under which a loader keeps its estimates (shared by loaders of the same store, codec and model).

    ``fetch``: bytes/s of reading one chunk from the store (latency included); ``chunk_bytes``: stored bytes per
    chunk; ``decode``: fp16-equivalent bytes/s of decoding; ``prefill``: tokens/s of this model's prefill of a whole
    prompt here (one call, as ContextCache computes what it does not load); ``chunk_prefill``: seconds to prefill one
    chunk on top of the chunks before it, as the loader's front does (several times slower per token than one call
    on a CPU, and slowed further by the loads running beside it).
    """

    fetch: str
    chunk_bytes: str
    decode: str
    prefill: str
    chunk_prefill: str

    def all(self) -> tuple[str, str, str, str, str]:
        return self.fetch, self.chunk_bytes, self.decode, self.prefill, self.chunk_prefill


@dataclass(frozen=True)
class Cost:
    """Predicted seconds to fetch and to decode one chunk at one level."""

    fetch_s: float
    decode_s: float


@dataclass(frozen=True)
class Choice:
    """A plan of :func:`choose` for ``n`` chunks: the front computes chunks ``[0, front)``; chunk ``i >= front`` is
    loaded at level ``levels[i - front]``; ``seconds`` is the predicted load time (``None``: unknown costs)."""

    front: int
    levels: tuple[int, ...]
    seconds: float | None
    meets: bool | None


def predict(front: int, levels: Sequence[int], costs: Sequence[Cost | None], compute_s: float | None) -> float | None:
    """Predicted seconds to have every chunk: the link fetches the loaded chunks while the CPU computes the front and
    decodes the loaded chunks (one CPU: on two cores prefill and decoding slow each other down), so
    ``max(sum fetch, front * compute + sum decode)``. ``None`` if a cost is unknown."""
    if front and compute_s is None:
        return None
    fetch = decode = 0.0
    for level in levels:
        cost = costs[level]
        if cost is None:
            return None
        fetch, decode = fetch + cost.fetch_s, decode + cost.decode_s
    return max(fetch, front * (compute_s or 0.0) + decode)


def choose(n: int, costs: Sequence[Cost | None], compute_s: float | None, budget: float | None = None,
           front: bool = True) -> Choice:
    """The plan for ``n`` chunks given per-level costs (``costs[0]`` the best quality; ``None``: unknown).

    Without ``budget``: every loaded chunk at level 0, and the front (if ``front``) as long as the prediction falls
    (Cake's meeting point). With ``budget`` seconds: the plan of least quality loss (the sum of the loaded chunks' level
    indices; a computed chunk is exact) whose prediction meets it; if none does, the fastest plan. Lower levels go to
    the chunks loaded last (from the back, those nearest the front), so a re-plan can still lower them.
    """
    fronts = range(n + 1) if front and compute_s is not None else range(1)
    if budget is None:
        if costs[0] is None:  # loading not measured yet (a new store or codec): load everything, and measure
            return Choice(0, (0,) * n, None, None)
        best = min(fronts, key=lambda k: (predict(k, [0] * (n - k), costs, compute_s) or float("inf"), -k))
        return Choice(best, (0,) * (n - best), predict(best, [0] * (n - best), costs, compute_s), None)
    usable = [j for j, c in enumerate(costs) if c is not None]
    if not usable:
        return Choice(0, (0,) * n, None, None)
    fits: tuple[int, float, int, tuple[int, ...]] | None = None  # (loss, seconds, front, levels)
    fastest: tuple[float, int, int, tuple[int, ...]] | None = None  # (seconds, loss, front, levels)
    for k in fronts:
        m = n - k
        for step in range(m * (len(usable) - 1) + 1):
            q, r = divmod(step, m) if m else (0, 0)
            lo, hi = usable[min(q + 1, len(usable) - 1)], usable[q]
            levels = (lo,) * r + (hi,) * (m - r)
            seconds = predict(k, levels, costs, compute_s)
            assert seconds is not None
            loss = sum(levels)
            if seconds <= budget and (fits is None or (loss, seconds) < fits[:2]):
                fits = (loss, seconds, k, levels)
            if fastest is None or (seconds, loss) < fastest[:2]:
                fastest = (seconds, loss, k, levels)
            if seconds <= budget:
                break  # further steps only lose quality
    if fits is not None:
        return Choice(fits[2], fits[3], fits[1], True)
    assert fastest is not None
    return Choice(fastest[2], fastest[3], fastest[0], False)


@dataclass(frozen=True)
class Plan:
    """What the loader decided for ``chunks`` stored chunks, and the predictions it decided on (seconds).

    ``levels``: per chunk, the planned level's name or ``"compute"``; ``ttft_slo``: the target, if any;
    ``predicted_ttft_s``: predicted load plus the rest of the prompt; ``meets_slo``: whether the prediction meets it;
    ``recompute``: load nothing, the whole prompt is prefilled in one call (every level ``"recompute"``).
    """

    chunks: int
    compute_front: bool
    predicted_load_s: float | None
    predicted_chunk_compute_s: float | None
    levels: tuple[str, ...] = ()
    ttft_slo: float | None = None
    predicted_ttft_s: float | None = None
    meets_slo: bool | None = None
    recompute: bool = False


@dataclass
class LoadReport:
    """What a load did (times in seconds).

    Of the stored chunks, ``chunks_loaded`` came from the store (from the back) and ``chunks_computed`` were
    prefilled from the front while the rest loaded; ``failed_chunks`` lists those whose entry could not be read or
    decoded (computed instead). ``load_s`` is the wall time of the whole load; ``fetch_s``, ``decode_s``,
    ``compute_s`` the time spent in each activity (they overlap, so they may add up to more: :attr:`overlap_s`).
    ``plan`` is what the loader decided and the predictions it decided on; ``chunk_levels`` what each chunk became
    (its quality level's name, or ``"computed"``), ``chunks_by_level`` the count per level; ``replans`` how often
    chunks arriving later than planned made the loader plan the rest again; ``estimates`` the loader's estimates
    after the load.
    """

    plan: Plan | None = None
    chunks_loaded: int = 0
    chunks_computed: int = 0
    failed_chunks: list[int] = field(default_factory=list)
    bytes_read: int = 0
    load_s: float = 0.0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    compute_s: float = 0.0
    chunk_levels: list[str] = field(default_factory=list)
    replans: int = 0
    estimates: dict[str, float | None] = field(default_factory=dict)

    @property
    def chunks_by_level(self) -> dict[str, int]:
        """How many of the stored chunks each quality level (or ``"computed"``) gave."""
        return dict(Counter(self.chunk_levels))

    @property
    def overlap_s(self) -> float:
        """Seconds the fetch, decode and compute activities ran at the same time (their sum beyond the load's wall
        time; 0 when they ran one after another)."""
        return max(0.0, self.fetch_s + self.decode_s + self.compute_s - self.load_s)


#: A chunk that arrives this many times later than planned makes the loader plan the rest again.
REPLAN_FACTOR = 1.5
#: Bytes read first from a progressive entry whose level size is not estimated yet (the header and more).
HEADER_PROBE_BYTES = 16384
#: Longest run of followed ``recompute`` plans between two re-measurements of loading (:meth:`Loader.recomputed`).
MAX_PROBE_GAP = 64


class Loader:
    """Loads the stored leading chunks of a prompt for one model and store, at the quality levels of ``codec`` (one
    codec, or several best first; see the module docstring).

    ``keys(ids)`` gives the chained chunk keys of ``ids``; one Loader serves concurrent requests.
    """

    def __init__(self, model: Any, spec: ModelSpec, store: Store, codec: Codec | Sequence[Codec], chunk_tokens: int,
                 config: LoaderConfig | None = None) -> None:
        self.codecs = (codec,) if isinstance(codec, Codec) else tuple(codec)
        if not self.codecs:
            raise ValueError("a loader needs at least one codec")
        self.model, self.spec, self.store, self.codec = model, spec, store, self.codecs[0]
        self.chunk_tokens = chunk_tokens
        self.config = config or LoaderConfig()
        path = self.config.estimates_path
        resolved = default_cache_dir() / ESTIMATES_FILE if path is None else (Path(path) if path else None)
        self.estimates = Estimates(resolved, self.config.ewma)
        self.levels = levels_of(self.codecs)
        self.level_names = [self._names(level) for level in self.levels]
        self.names = self.level_names[0]
        self.tail_name = f"tail_s/{spec.fingerprint[:16]}"
        self._lock = threading.Lock()
        self._decoded: set[int] = set()  # levels decoded at least once by this loader
        self._probe_gap = 1  # recompute plans to follow before the next probe ...
        self._since_probe = 0  # ... and those followed since the last probe or load

    def _names(self, level: Level) -> EstimateNames:
        part = "" if level.layers is None else f"/{level.layers}"
        cid = _short(level.codec.codec_id)
        return EstimateNames(fetch=f"fetch_Bps/{_short(repr(self.store))}",
                             chunk_bytes=f"chunk_bytes/{cid}/{self.chunk_tokens}{part}",
                             decode=f"decode_Bps/{cid}{part}",
                             prefill=f"prefill_tps/{self.spec.fingerprint[:16]}",
                             chunk_prefill=f"chunk_prefill_s/{self.spec.fingerprint[:16]}/{self.chunk_tokens}")

    # ------------------------------------------------------------------------------------------------- planning
    def costs(self, fetch_scale: float = 1.0) -> list[Cost | None]:
        """Per level, the predicted seconds to fetch and decode one chunk (``None`` where the stored size or the
        fetch rate is unknown). A level never decoded yet is predicted at the slowest decode rate known (a
        progressive prefix decodes no slower than its whole entry), so it can be chosen, and measured.
        ``fetch_scale`` multiplies fetch times (a re-plan's observed slow-down)."""
        fp16 = 2 * self.chunk_tokens * self.spec.elements_per_token
        rates = [self.estimates.get(n.decode) for n in self.level_names]
        known = [r for r in rates if r]
        out: list[Cost | None] = []
        for names, rate in zip(self.level_names, rates, strict=True):
            fetch, size = self.estimates.get(names.fetch), self.estimates.get(names.chunk_bytes)
            dec = rate or (min(known) if known else None)
            out.append(Cost(fetch_scale * size / fetch, fp16 / dec) if fetch and size and dec else None)
        return out

    def tail_estimate(self, tokens: int) -> float:
        """Predicted seconds from the end of the load to the first token, for a prompt rest of ``tokens`` tokens."""
        tps = self.estimates.get(self.names.prefill)
        if tokens < self.chunk_tokens:
            return self.estimates.get(self.tail_name) or (tokens / tps if tps else 0.0)
        return tokens / tps if tps else 0.0

    def chunk_compute_estimate(self) -> float | None:
        """Predicted seconds for the front to prefill one chunk: as measured, else from the whole-prompt rate."""
        tps = self.estimates.get(self.names.prefill)
        return self.estimates.get(self.names.chunk_prefill) or (self.chunk_tokens / tps if tps else None)

    def plan(self, chunks: int, ttft_slo: float | None = None, tail_tokens: int = 0,
             allow_recompute: bool = False) -> Plan:
        """The plan for ``chunks`` stored chunks from the current estimates: meeting point and level per chunk.

        With ``allow_recompute`` (and ``compute_front``) the plan may also be to load nothing and prefill the whole
        prompt in one call (``recompute``): without a target when that is predicted sooner than the best load, with
        ``ttft_slo`` when it meets the target no later than the load would (it is exact, the best quality); never
        before the best level's fetch and decode costs are known (only loads measure them)."""
        compute = self.chunk_compute_estimate()
        tail = self.tail_estimate(tail_tokens)
        budget = None if ttft_slo is None else ttft_slo - tail
        costs = self.costs()
        c = choose(chunks, costs, compute, budget, self.config.compute_front)
        names = ("compute",) * c.front + tuple(self.levels[j].name for j in c.levels)
        if budget is None and c.front == 1 and c.seconds is not None:  # computing one chunk only races the decoder
            c = Choice(0, (0,) * chunks, predict(0, [0] * chunks, costs, compute), None)
            names = (self.levels[0].name,) * chunks
        predicted = None if c.seconds is None else c.seconds + tail
        tps = self.estimates.get(self.names.prefill)
        measured = costs[0] is not None  # else the load is the only way to learn what a load costs
        if allow_recompute and self.config.compute_front and tps and measured and predicted is not None:
            whole = (chunks * self.chunk_tokens + tail_tokens) / tps
            if ttft_slo is None:
                sooner = whole <= predicted  # a tie: one call, no loader threads
            else:  # exact, so in time it wins unless a load is sooner and in time too
                sooner = whole <= ttft_slo and (whole <= predicted or not c.meets)
            if sooner:
                return Plan(chunks=chunks, compute_front=True, predicted_load_s=0.0,
                            predicted_chunk_compute_s=compute, levels=("recompute",) * chunks, ttft_slo=ttft_slo,
                            predicted_ttft_s=whole, meets_slo=None if ttft_slo is None else True, recompute=True)
        return Plan(chunks=chunks, compute_front=c.front > 0, predicted_load_s=c.seconds,
                    predicted_chunk_compute_s=compute, levels=names, ttft_slo=ttft_slo,
                    predicted_ttft_s=predicted, meets_slo=c.meets)

    def observe_chunk_prefill(self, seconds: float) -> None:
        """Record that the front prefilled one chunk in ``seconds``."""
        if seconds > 0:
            self.estimates.update(self.names.chunk_prefill, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Record a prefill of ``tokens`` tokens in one call that took ``seconds`` (ContextCache reports its tail
        prefills and whole-prompt ones).

        Only prefills of at least one chunk count: a short tail is dominated by per-call overhead and would make
        computing a chunk look several times slower than it is; a short one is kept as the tail estimate.
        """
        if tokens >= self.chunk_tokens and seconds > 0:
            self.estimates.update(self.names.prefill, tokens / seconds)
        elif tokens > 0 and seconds > 0:
            self.estimates.update(self.tail_name, seconds)

    def observe_stored(self, source: int, nbytes: int) -> None:
        """Record that a chunk of codec ``source`` was stored in ``nbytes`` bytes (so its level can be planned
        before it was ever read)."""
        for level, names in zip(self.levels, self.level_names, strict=True):
            if level.source == source and level.layers is None:
                self.estimates.update(names.chunk_bytes, nbytes)

    def recomputed(self) -> bool:
        """Record that a ``recompute`` plan was followed; whether loading should be measured again now
        (:meth:`probe`).

        Estimates only change when a load measures them, so a recompute plan would repeat forever once one slow
        sample (a busy machine, a cold disk) made loading look slower than it is. Probes come after the 1st, then
        every 2nd, 4th, ... recompute plan, at most :data:`MAX_PROBE_GAP` apart (a load starts the count again):
        quick to correct a bad sample, rare while recomputing really is sooner.
        """
        with self._lock:
            self._since_probe += 1
            if self._since_probe < self._probe_gap:
                return False
            self._since_probe, self._probe_gap = 0, min(2 * self._probe_gap, MAX_PROBE_GAP)
            return True

    # -------------------------------------------------------------------------------------------------- loading
    def probe(self, ids: torch.Tensor, keys: list[str] | list[list[str]], stored: list[list[bool]] | None = None
              ) -> int:
        """Fetch and decode chunk 0 of ``ids`` at the best level, timed as a load times it, into a scratch buffer:
        the fetch and decode estimates that a ``recompute`` plan leaves alone (:meth:`recomputed`) are measured
        again. Meant for a background thread after the request (ContextCache's writer), so no request waits for it.
        ``keys`` and ``stored`` as for :meth:`load`. Returns 1 if the chunk was measured, 0 if it is not stored at
        that level or could not be read (a load will compute it)."""
        per_codec = self._per_codec(keys)
        source = self.levels[0].source
        if not per_codec[source] or (stored is not None and not stored[source][0]):
            return 0
        blob, _ = self._fetch(0, per_codec[source][0])
        kv = KVCache.empty(self.spec, self.chunk_tokens)
        with self._lock:
            runs = 1 if 0 in self._decoded else 2  # a level's first decode is not a sample (:meth:`_decode`)
        measured = blob is not None and all(self._decode(0, blob, ids, kv, 0, LoadReport()) for _ in range(runs))
        self.estimates.save()
        return int(measured)

    def _per_codec(self, keys: list[str] | list[list[str]]) -> list[list[str]]:
        """``keys`` as one key list per codec (a single codec may pass its list alone)."""
        per_codec = cast(list[list[str]], [keys] if not keys or isinstance(keys[0], str) else keys)
        assert len(per_codec) == len(self.codecs), "one key list per codec"
        return per_codec

    def load(self, ids: torch.Tensor, keys: list[str] | list[list[str]], chunks: int, *,
             stored: list[list[bool]] | None = None, ttft_slo: float | None = None, tail_tokens: int = 0,
             on_chunk: Callable[[str, int], None] | None = None, plan: Plan | None = None
             ) -> tuple[KVCache, LoadReport]:
        """The KV of the first ``chunks`` chunks of ``ids``, loaded or computed.

        ``keys``: the chunk keys of ``ids`` (one list per codec when the loader has several); ``stored[j][i]``:
        whether codec ``j`` has chunk ``i`` (default: every codec has every chunk). ``ttft_slo``: a TTFT target in
        seconds (``tail_tokens``: prompt tokens after the chunks, prefilled after the load). ``on_chunk(kind,
        index)`` (kind ``"loaded"`` or ``"computed"``) is called as each chunk is done. ``plan``: one
        :meth:`plan` made for this load (default: planned here; a ``recompute`` plan is for the caller to follow).
        """
        c = self.chunk_tokens
        per_codec = self._per_codec(keys)
        if plan is not None and plan.recompute:
            raise ValueError("a recompute plan loads nothing: prefill the prompt instead of calling load")
        with self._lock:  # this load measures: probes after recompute plans start from the shortest gap again
            self._since_probe, self._probe_gap = 0, 1
        report = LoadReport(plan=plan or self.plan(chunks, ttft_slo, tail_tokens))
        assert report.plan is not None
        report.chunk_levels = ["computed"] * chunks
        kv = KVCache.empty(self.spec, chunks * c)
        kv.token_ids = ids[: chunks * c].clone()
        state = _Request(self, per_codec, stored, report, ttft_slo, tail_tokens)
        claim = _Claims(chunks)
        loaded: set[int] = set()
        errors: list[BaseException] = []
        loader = threading.Thread(target=self._load_back, args=(ids, state, kv, claim, loaded, errors, on_chunk),
                                  name="kvpack-load", daemon=True)
        loader.start()
        try:
            front = self._compute_front(ids, claim, report, on_chunk, eager=report.plan.compute_front)
        finally:
            claim.stop()  # on an error here, the loader takes no further chunk
            loader.join()
        if errors:  # not a store failure (those are misses): a bug, which must not pass for a loaded chunk
            raise errors[0]
        if claim.front:  # the computed front goes into the same buffer, before the loaded back
            kv.data[:, :, :, : claim.front * c].copy_(KVCache.from_hf(front, self.spec).data)
        holes = sorted(set(range(claim.front, chunks)) - loaded)
        assert holes == sorted(report.failed_chunks), (holes, report.failed_chunks)
        for hole in holes:  # on top of everything before it, now complete
            self._fill(ids, kv, hole, report)
            report.chunk_levels[hole] = "computed"
        report.load_s = time.perf_counter() - state.start
        self.estimates.save()
        report.estimates = {n: self.estimates.get(n) for names in self.level_names for n in names.all()} \
            | {self.tail_name: self.estimates.get(self.tail_name)}
        return kv, report

    def _compute_front(self, ids: torch.Tensor, claim: _Claims, report: LoadReport,
                       on_chunk: Callable[[str, int], None] | None, eager: bool) -> Any:
        """Prefill chunks from the front while any are unclaimed; with ``eager`` false only after the loader is done
        (which leaves nothing unclaimed: the front then computes nothing)."""
        c = self.chunk_tokens
        cache = new_cache(self.model)
        if not eager:
            claim.wait_loader()  # load only, unless the loader stopped early and left chunks to compute
        while (j := claim.take_front()) is not None:
            t0 = time.perf_counter()
            forward(self.model, ids[j * c : (j + 1) * c], cache)
            elapsed = time.perf_counter() - t0
            report.compute_s += elapsed
            report.chunks_computed += 1
            self.observe_chunk_prefill(elapsed)
            if on_chunk is not None:
                on_chunk("computed", j)
        return cache

    def _fill(self, ids: torch.Tensor, kv: KVCache, i: int, report: LoadReport) -> None:
        """Compute chunk ``i`` on top of chunks ``[0, i)`` of ``kv`` and write it into its slice."""
        c = self.chunk_tokens
        t0 = time.perf_counter()
        cache = kv[: i * c].to_hf()
        forward(self.model, ids[i * c : (i + 1) * c], cache)
        kv.data[:, :, :, i * c : (i + 1) * c].copy_(KVCache.from_hf(cache, self.spec, span=(i * c, (i + 1) * c)).data)
        report.compute_s += time.perf_counter() - t0
        report.chunks_computed += 1

    def _load_back(self, ids: torch.Tensor, state: _Request, kv: KVCache, claim: _Claims, loaded: set[int],
                   errors: list[BaseException], on_chunk: Callable[[str, int], None] | None) -> None:
        """Fetch (I/O thread, ``prefetch`` ahead) and decode chunks from the back until the front is reached.

        Adds each chunk decoded into ``kv`` to ``loaded``; an unexpected exception goes to ``errors``.
        """
        report = state.report
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpack-fetch") as io:
                pending: dict[int, tuple[int, Future[tuple[bytes | None, float]]]] = {}
                while (i := claim.take_back()) is not None:
                    for k in range(i, max(-1, i - self.config.prefetch), -1):  # read ahead, towards the front
                        if k not in pending and claim.may_prefetch(k):
                            level = state.level(k)
                            pending[k] = (level, io.submit(self._fetch, level, state.key(level, k)))
                    level, future = pending.pop(i)
                    blob, seconds = future.result()
                    report.fetch_s += seconds
                    if blob is not None and state.level(i) > level:  # re-planned lower since: fewer layers
                        level, blob = state.narrow(level, blob, state.level(i))
                    if blob is None or not self._decode(level, blob, ids, kv, i, report):
                        report.failed_chunks.append(i)
                        continue
                    loaded.add(i)
                    report.bytes_read += len(blob)
                    report.chunks_loaded += 1
                    report.chunk_levels[i] = self.levels[level].name
                    if on_chunk is not None:
                        on_chunk("loaded", i)
                    state.check(level, seconds, claim)
                for _, future in pending.values():
                    future.cancel()
        except BaseException as exc:  # re-raised by the caller after join
            errors.append(exc)
        finally:
            claim.loader_done()

    def _fetch(self, level: int, key: str) -> tuple[bytes | None, float]:
        """The bytes of ``key`` that ``level`` needs (the whole verified entry, or a progressive prefix)."""
        t0 = time.perf_counter()
        lv = self.levels[level]
        blob = self.store.get(key) if lv.layers is None else self._fetch_prefix(level, key)
        seconds = time.perf_counter() - t0
        if blob is not None:
            self.estimates.update(self.level_names[level].fetch, len(blob) / max(seconds, 1e-9))
            if lv.layers is None:
                self.estimates.update(self.level_names[level].chunk_bytes, len(blob))
                if isinstance(lv.codec, Progressive) and lv.codec.layers > 1:
                    with contextlib.suppress(KvpackError):  # a bad header: the decoder reports it
                        self._observe_sizes(lv.source, lv.codec.layer_ends(blob))
        return blob, seconds

    def _observe_sizes(self, source: int, ends: tuple[int, ...]) -> None:
        """One progressive header gives the size of every level of its codec: record them."""
        for other, names in zip(self.levels, self.level_names, strict=True):
            if other.source == source and other.layers is not None:
                self.estimates.update(names.chunk_bytes, ends[min(other.layers, len(ends)) - 1])

    def _fetch_prefix(self, level: int, key: str) -> bytes | None:
        """The first ``layers`` progressive layers of ``key``'s entry, by range reads: as many bytes as the level
        is estimated to need (at least the header), then what is still missing. ``None`` on a miss or a bad header.
        """
        lv = self.levels[level]
        assert isinstance(lv.codec, Progressive) and lv.layers is not None
        guess = self.estimates.get(self.level_names[level].chunk_bytes)
        head = self.store.get_range(key, 0, int(guess * 1.02) + 64 if guess else HEADER_PROBE_BYTES)
        try:
            if head is None or len(head) < PREFIX_BYTES:
                return None
            if len(head) < (need := header_bytes(head)):
                more = self.store.get_range(key, len(head), need)
                head = None if more is None else head + more
                if head is None:
                    return None
            ends = lv.codec.layer_ends(head)
        except KvpackError:
            return None
        self._observe_sizes(lv.source, ends)
        need = ends[min(lv.layers, len(ends)) - 1]
        if len(head) < need:
            more = self.store.get_range(key, len(head), need)
            if more is None:
                return None
            head += more
        return head[:need] if len(head) >= need else None

    def _decode(self, level: int, blob: bytes, ids: torch.Tensor, kv: KVCache, i: int, report: LoadReport) -> bool:
        """Decode ``blob`` (chunk ``i`` at ``level``) into its slice of ``kv``; False if it cannot be (a warning).

        Every decode but a level's first in this loader is a sample of the level's decode rate. The first pays
        one-time setup: a calibrated codec reads its profile, numba loads the compiled kernels from its cache, and
        torch starts its threads. Counted, it made a process's first load look slower than it is (with one chunk,
        it was the whole estimate), and recompute plans followed from it.
        """
        c = self.chunk_tokens
        lv = self.levels[level]
        t0 = time.perf_counter()
        token_ids, out = ids[i * c : (i + 1) * c], kv[i * c : (i + 1) * c]
        try:
            if lv.layers is None:
                part = lv.codec.decode(blob, self.spec, token_ids=token_ids, out=out)
            else:
                assert isinstance(lv.codec, Progressive)
                part = lv.codec.decode_prefix(blob, spec=self.spec, token_ids=token_ids, out=out)
        except KvpackError as exc:
            warnings.warn(f"kvpack: chunk {i} could not be decoded ({exc}); a load computes it instead",
                          stacklevel=2)
            return False
        seconds = time.perf_counter() - t0
        report.decode_s += seconds
        if int(part.positions[0]) != i * c:  # stored for other positions: not this prefix
            return False
        with self._lock:
            warm = level in self._decoded
            self._decoded.add(level)
        if warm:
            self.estimates.update(self.level_names[level].decode, 2 * part.num_tokens * self.spec.elements_per_token
                                  / seconds)
        return True


class _Request:
    """One load's levels per chunk, what is stored, and re-planning (used by the loader thread only)."""

    def __init__(self, loader: Loader, keys: list[list[str]], stored: list[list[bool]] | None, report: LoadReport,
                 ttft_slo: float | None, tail_tokens: int) -> None:
        self.loader, self.keys, self.report = loader, keys, report
        self.start = time.perf_counter()
        n = len(report.chunk_levels)
        self.stored = stored if stored is not None else [[True] * n for _ in keys]
        self.budget = None if ttft_slo is None else ttft_slo - loader.tail_estimate(tail_tokens)
        assert report.plan is not None
        byname = {lv.name: j for j, lv in enumerate(loader.levels)}
        self.planned = [byname.get(name, 0) for name in report.plan.levels][:n]
        self.planned += [0] * (n - len(self.planned))  # a plan without levels: the best one
        self.costs = loader.costs()

    def level(self, i: int) -> int:
        """The level to read chunk ``i`` at: the planned one if its codec has the chunk, else the nearest stored
        (a better one first)."""
        levels = self.loader.levels
        want = self.planned[i]
        order = list(range(want, -1, -1)) + list(range(want + 1, len(levels)))
        return next((j for j in order if self.stored[levels[j].source][i]), want)

    def key(self, level: int, i: int) -> str:
        return self.keys[self.loader.levels[level].source][i]

    def narrow(self, level: int, blob: bytes, new_level: int) -> tuple[int, bytes]:
        """A blob fetched for ``level`` when its chunk has since been re-planned to ``new_level``: a progressive
        prefix is cut to the new level's layers if that needs fewer bytes; anything else stays at ``level``."""
        levels = self.loader.levels
        new, old = levels[new_level], levels[level]
        if new.source != old.source or new.layers is None or not isinstance(new.codec, Progressive):
            return level, blob
        try:
            ends = new.codec.layer_ends(blob)
        except KvpackError:
            return level, blob
        need = ends[min(new.layers, len(ends)) - 1]
        return (new_level, blob[:need]) if need <= len(blob) else (level, blob)

    def check(self, level: int, seconds: float, claim: _Claims) -> None:
        """After a chunk arrived in ``seconds`` at ``level``: if that is :data:`REPLAN_FACTOR` times the plan's
        fetch time or more (under a TTFT target), plan the chunks not taken yet again, with the time left and the
        fetch times scaled by what was just seen."""
        cost = self.costs[level]
        if self.budget is None or cost is None or seconds <= REPLAN_FACTOR * cost.fetch_s:
            return
        scale = seconds / cost.fetch_s
        self.costs = [None if c is None else Cost(c.fetch_s * scale, c.decode_s) for c in self.costs]
        first, last = claim.open_range()
        if last < first:
            return
        loader = self.loader
        compute = loader.chunk_compute_estimate()
        left = self.budget - (time.perf_counter() - self.start)
        c = choose(last - first + 1, self.costs, compute, left, loader.config.compute_front)
        for offset, j in enumerate(c.levels):
            self.planned[first + c.front + offset] = j
        self.report.replans += 1
class _Claims:
    """Which chunks the front (computing, ascending) and the back (loading, descending) have taken; thread-safe.

    Chunks ``[0, front)`` are the compute side's, ``(back, n)`` the loader's; a chunk goes to whichever side asks
    first.
    """

    def __init__(self, n: int) -> None:
        self.front = 0
        self.back = n - 1
        self._cond = threading.Condition()
        self._loader_running = True

    def take_front(self) -> int | None:
        with self._cond:
            if self.front > self.back:
                return None
            self.front += 1
            return self.front - 1

    def take_back(self) -> int | None:
        with self._cond:
            if self.back < self.front:
                return None
            self.back -= 1
            return self.back + 1

    def stop(self) -> None:
        """No further chunk for the loader (what it has not taken stays unclaimed)."""
        with self._cond:
            self.back = min(self.back, self.front - 1)

    def may_prefetch(self, i: int) -> bool:
        with self._cond:
            return i >= self.front

    def loader_done(self) -> None:
        with self._cond:
            self._loader_running = False
            self._cond.notify_all()

    def open_range(self) -> tuple[int, int]:
        """The chunks no side has taken yet, ``[first, last]`` (empty when ``last < first``)."""
        with self._cond:
            return self.front, self.back

    def wait_loader(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._loader_running)
