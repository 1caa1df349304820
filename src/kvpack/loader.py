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

Not yet here (issue 11): quality levels per chunk (progressive byte prefixes) and planning against a TTFT target.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvpack.codecs.base import Codec
from kvpack.errors import KvpackError
from kvpack.inference import forward, new_cache
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec
from kvpack.store import Store
from kvpack.store.disk import default_cache_dir

ESTIMATES_FILE = "estimates.json"


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
    estimates only steer speed, never correctness.
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
            return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float) and v > 0}
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
            old = self._values.get(name)
            self._values[name] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample

    def save(self) -> None:
        """Write the estimates atomically (temporary file + rename); an unwritable directory is only a warning."""
        if self.path is None:
            return
        with self._lock:
            text = json.dumps(self._values, sort_keys=True, indent=1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            warnings.warn(f"kvpack: could not save loader estimates to {self.path} ({exc})", stacklevel=2)


def _short(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class EstimateNames:
    """The names under which a loader keeps its estimates (shared by loaders of the same store, codec and model).

    ``fetch``: bytes/s of reading one chunk from the store (latency included); ``chunk_bytes``: stored bytes per
    chunk; ``decode``: fp16-equivalent bytes/s of decoding; ``prefill``: tokens/s of this model's prefill here.
    """

    fetch: str
    chunk_bytes: str
    decode: str
    prefill: str

    def all(self) -> tuple[str, str, str, str]:
        return self.fetch, self.chunk_bytes, self.decode, self.prefill


@dataclass(frozen=True)
class Plan:
    """What the loader decided for ``chunks`` stored chunks, and the predictions it decided on (seconds)."""

    chunks: int
    compute_front: bool
    predicted_load_s: float | None
    predicted_chunk_compute_s: float | None


@dataclass
class LoadReport:
    """What a load did: chunks loaded (from the back) and computed (from the front), the chunks that failed to
    load (computed instead), bytes read, time per activity (overlapping) and the estimates after the load."""

    plan: Plan | None = None
    chunks_loaded: int = 0
    chunks_computed: int = 0
    failed_chunks: list[int] = field(default_factory=list)
    bytes_read: int = 0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    compute_s: float = 0.0
    wall_s: float = 0.0
    estimates: dict[str, float | None] = field(default_factory=dict)


class Loader:
    """Loads the stored leading chunks of a prompt for one model, store and codec (see the module docstring).

    ``keys(ids)`` gives the chained chunk keys of ``ids``; one Loader serves concurrent requests.
    """

    def __init__(self, model: Any, spec: ModelSpec, store: Store, codec: Codec, chunk_tokens: int,
                 config: LoaderConfig | None = None) -> None:
        self.model, self.spec, self.store, self.codec = model, spec, store, codec
        self.chunk_tokens = chunk_tokens
        self.config = config or LoaderConfig()
        path = self.config.estimates_path
        resolved = default_cache_dir() / ESTIMATES_FILE if path is None else (Path(path) if path else None)
        self.estimates = Estimates(resolved, self.config.ewma)
        self.names = EstimateNames(fetch=f"fetch_Bps/{_short(repr(store))}",
                                   chunk_bytes=f"chunk_bytes/{_short(codec.codec_id)}/{chunk_tokens}",
                                   decode=f"decode_Bps/{_short(codec.codec_id)}",
                                   prefill=f"prefill_tps/{spec.fingerprint[:16]}")

    # ------------------------------------------------------------------------------------------------- planning
    def plan(self, chunks: int) -> Plan:
        """Whether to compute from the front for ``chunks`` stored chunks, from the current estimates."""
        est = self.estimates
        fetch, size, dec, tps = (est.get(n) for n in self.names.all())
        fp16 = 2 * self.chunk_tokens * self.spec.elements_per_token
        load = None
        if fetch and size and dec:
            load = chunks * max(size / fetch, fp16 / dec)  # fetch and decode overlap: the slower one sets the pace
        compute = self.chunk_tokens / tps if tps else None
        front = self.config.compute_front and load is not None and compute is not None and load > compute
        return Plan(chunks=chunks, compute_front=front, predicted_load_s=load, predicted_chunk_compute_s=compute)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Record a prefill of ``tokens`` tokens that took ``seconds`` (ContextCache reports its tail prefills).

        Only prefills of at least one chunk count: a short tail is dominated by per-call overhead and would make
        computing a chunk look several times slower than it is.
        """
        if tokens >= self.chunk_tokens and seconds > 0:
            self.estimates.update(self.names.prefill, tokens / seconds)

    # -------------------------------------------------------------------------------------------------- loading
    def load(self, ids: torch.Tensor, keys: list[str], chunks: int,
             on_chunk: Callable[[str, int], None] | None = None) -> tuple[KVCache, LoadReport]:
        """The KV of the first ``chunks`` chunks of ``ids`` (whose keys are ``keys[:chunks]``), loaded or computed.

        ``on_chunk(kind, index)`` (kind ``"loaded"`` or ``"computed"``) is called as each chunk is done.
        """
        c = self.chunk_tokens
        report = LoadReport(plan=self.plan(chunks))
        assert report.plan is not None
        kv = KVCache.empty(self.spec, chunks * c)
        kv.token_ids = ids[: chunks * c].clone()
        claim = _Claims(chunks)
        loaded: set[int] = set()
        errors: list[BaseException] = []
        start = time.perf_counter()
        loader = threading.Thread(target=self._load_back, args=(ids, keys, kv, claim, report, loaded, errors,
                                                                on_chunk), name="kvpack-load", daemon=True)
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
        report.wall_s = time.perf_counter() - start
        self.estimates.save()
        report.estimates = {n: self.estimates.get(n) for n in self.names.all()}
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
            self.observe_prefill(c, elapsed)
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

    def _load_back(self, ids: torch.Tensor, keys: list[str], kv: KVCache, claim: _Claims, report: LoadReport,
                   loaded: set[int], errors: list[BaseException], on_chunk: Callable[[str, int], None] | None) -> None:
        """Fetch (I/O thread, ``prefetch`` ahead) and decode chunks from the back until the front is reached.

        Adds each chunk decoded into ``kv`` to ``loaded``; an unexpected exception goes to ``errors``.
        """
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpack-fetch") as io:
                pending: dict[int, Future[tuple[bytes | None, float]]] = {}
                while (i := claim.take_back()) is not None:
                    for k in range(i, max(-1, i - self.config.prefetch), -1):  # read ahead, towards the front
                        if k not in pending and claim.may_prefetch(k):
                            pending[k] = io.submit(self._fetch, keys[k])
                    blob, seconds = pending.pop(i).result() if i in pending else self._fetch(keys[i])
                    report.fetch_s += seconds
                    if blob is None or not self._decode(blob, ids, kv, i, report):
                        report.failed_chunks.append(i)
                        continue
                    loaded.add(i)
                    report.bytes_read += len(blob)
                    report.chunks_loaded += 1
                    if on_chunk is not None:
                        on_chunk("loaded", i)
                for future in pending.values():
                    future.cancel()
        except BaseException as exc:  # re-raised by the caller after join
            errors.append(exc)
        finally:
            claim.loader_done()

    def _fetch(self, key: str) -> tuple[bytes | None, float]:
        t0 = time.perf_counter()
        blob = self.store.get(key)
        seconds = time.perf_counter() - t0
        if blob is not None:
            self.estimates.update(self.names.fetch, len(blob) / max(seconds, 1e-9))
            self.estimates.update(self.names.chunk_bytes, len(blob))
        return blob, seconds

    def _decode(self, blob: bytes, ids: torch.Tensor, kv: KVCache, i: int, report: LoadReport) -> bool:
        c = self.chunk_tokens
        t0 = time.perf_counter()
        try:
            part = self.codec.decode(blob, self.spec, token_ids=ids[i * c : (i + 1) * c], out=kv[i * c : (i + 1) * c])
        except KvpackError as exc:
            warnings.warn(f"kvpack: chunk {i} could not be decoded ({exc}); computing it instead", stacklevel=2)
            return False
        seconds = time.perf_counter() - t0
        report.decode_s += seconds
        if int(part.positions[0]) != i * c:  # stored for other positions: not this prefix
            return False
        self.estimates.update(self.names.decode, 2 * part.num_tokens * self.spec.elements_per_token / seconds)
        return True


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

    def wait_loader(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._loader_running)
