"""Tiers of stores, fastest first (e.g. memory -> disk -> Redis or S3), each with its own budget and eviction.

- A read asks the tiers in order and stops at the first that has the entry (each tier verifies what it returns,
  so a damaged copy in one tier is deleted there and the next tier answers). A hit in a slower tier is *promoted*:
  copied into every faster tier, in the background.
- A put writes the first tier in the request (read-your-writes in this process) and the others in the background
  (write-through). Background writes wait in one bounded queue (``queue_bytes``); when it is full a write is
  dropped and counted (``writes_dropped``), never waited for, so a slow or dead remote tier never slows a request.
- Every tier keeps its own byte budget and eviction (``MemoryStore``/``DiskStore``: LRU by bytes; Redis: the
  server's ``maxmemory-policy``; S3: the bucket's lifecycle rules). Tiers need not be inclusive: an entry evicted
  from memory is found on disk and promoted again.
- ``stats()`` is a :class:`TieredStoreStats`: this store's counters, which tier served each hit, and each tier's
  own :class:`~kvpack.store.base.StoreStats`.

Configuration from one URL (``tiered://URL1|URL2|...``) or a TOML file (``kvpack.store.open("tiered.toml")``,
:func:`open_config`); docs/store.md has the schema and what is guaranteed for a remote tier shared by several
processes.
"""

from __future__ import annotations

import math
import threading
import tomllib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from kvpack.errors import KvpackError, StoreError
from kvpack.store.base import Store, StoreStats

DEFAULT_QUEUE_BYTES = 256 << 20
DEFAULT_CLOSE_TIMEOUT_S = 30.0
TIERED_SCHEME = "tiered://"


@dataclass(frozen=True)
class TieredStoreConfig:
    """Settings of a :class:`TieredStore`.

    Attributes:
        queue_bytes: the most bytes of entries waiting for background writes (write-through and promotions); a
            write that does not fit is dropped and counted.
        promote: copy a hit in a slower tier into the faster ones.
        close_timeout_s: how long :meth:`TieredStore.close` waits for queued writes before dropping them.
    """

    queue_bytes: int = DEFAULT_QUEUE_BYTES
    promote: bool = True
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.queue_bytes, int) or isinstance(self.queue_bytes, bool) or self.queue_bytes < 0:
            raise ValueError(f"queue_bytes must be a non-negative int, got {self.queue_bytes!r}")
        if not isinstance(self.promote, bool):
            raise ValueError(f"promote must be a bool, got {self.promote!r}")
        value = self.close_timeout_s
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0):
            raise ValueError(f"close_timeout_s must be a non-negative number of seconds, got {value!r}")


@dataclass(frozen=True)
class TierStats:
    """One tier as seen by a :class:`TieredStore`.

    Attributes:
        store: the tier's ``repr`` (its kind and location).
        hits: reads of the tiered store that this tier answered.
        stats: the tier's own counters and size.
    """

    store: str
    hits: int
    stats: StoreStats


@dataclass(frozen=True)
class TieredStoreStats(StoreStats):
    """:class:`~kvpack.store.base.StoreStats` of the tiered store plus what the tiers and the queue did.

    Attributes:
        tiers: per tier, fastest first: which hits it served and its own stats.
        promotions: copies of hits queued for faster tiers.
        writes_queued: background writes accepted (one per entry and target tier set).
        writes_dropped: background writes dropped because the queue was full (or the store closing).
        queue_bytes: bytes waiting in the queue now.
    """

    tiers: tuple[TierStats, ...] = ()
    promotions: int = 0
    writes_queued: int = 0
    writes_dropped: int = 0
    queue_bytes: int = 0


@dataclass(frozen=True)
class _Job:
    key: str
    data: bytes
    targets: tuple[int, ...]


class _Writer:
    """One background thread draining a byte-bounded FIFO of writes; ``offer`` never blocks."""

    def __init__(self, capacity: int, write: Callable[[_Job], None]) -> None:
        self._capacity = capacity
        self._write = write
        self._jobs: deque[_Job] = deque()
        self._bytes = 0
        self._busy = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvpack-tiered-writer", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def offer(self, job: _Job) -> bool:
        """Queue ``job``; ``False`` (dropped) if it does not fit or the writer is stopping."""
        with self._cond:
            if self._stopping or self._bytes + len(job.data) > self._capacity:
                return False
            self._jobs.append(job)
            self._bytes += len(job.data)
            self._cond.notify_all()
            return True

    def flush(self, timeout: float | None) -> bool:
        """Wait until every queued write is done; whether that happened within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def stop(self, timeout: float) -> int:
        """Finish queued writes for at most ``timeout`` seconds, then stop; how many were dropped."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self._bytes = 0
            self._cond.notify_all()
        self._thread.join(timeout=max(timeout, 1.0))
        return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._write(job)
            finally:
                with self._cond:
                    self._bytes -= len(job.data)
                    self._busy = False
                    self._cond.notify_all()


class TieredStore(Store):
    """Stores in order, fastest first; reads fall through and promote, writes go through in the background.

    ``tiers`` are closed with this store when ``close_tiers`` is true (the default; :func:`open_config` and
    ``tiered://`` URLs build tiers that belong to the tiered store). Thread-safe.
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = ()  # every tier degrades its own failures

    def __init__(
        self,
        tiers: Sequence[Store],
        *,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        promote: bool = True,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
        close_tiers: bool = True,
    ) -> None:
        super().__init__()
        if not tiers or not all(isinstance(t, Store) for t in tiers):
            raise ValueError(f"tiers must be a non-empty sequence of stores, got {tiers!r}")
        self.config = TieredStoreConfig(queue_bytes=queue_bytes, promote=promote, close_timeout_s=close_timeout_s)
        self.tiers: tuple[Store, ...] = tuple(tiers)
        self._close_tiers = close_tiers
        self._tier_hits = [0] * len(self.tiers)
        self._extra = {"promotions": 0, "writes_queued": 0, "writes_dropped": 0}
        self._writer = _Writer(queue_bytes, self._write_job)

    def __repr__(self) -> str:
        return f"TieredStore([{', '.join(repr(t) for t in self.tiers)}])"

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued background write has reached its tiers; whether it did within ``timeout``."""
        self._check_open()
        return self._writer.flush(timeout)

    def stats(self) -> TieredStoreStats:
        """This store's counters, the hits each tier served, each tier's own stats, and the queue's state."""
        base = super().stats()
        tiers = tuple(
            TierStats(store=repr(tier), hits=hits, stats=tier.stats())
            for tier, hits in zip(self.tiers, self._snapshot_tier_hits(), strict=True)
        )
        with self._stats_lock:
            extra = dict(self._extra)
        own = {f.name: getattr(base, f.name) for f in fields(StoreStats)}
        return TieredStoreStats(**own, tiers=tiers, queue_bytes=self._writer.queued_bytes, **extra)

    # ------------------------------------------------------------------------------------------ raw operations
    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not pending:
                break
            found = tier.get_many([keys[i] for i in pending])
            missing = []
            for i, data in zip(pending, found, strict=True):
                if data is None:
                    missing.append(i)
                    continue
                out[i] = data
                with self._stats_lock:
                    self._tier_hits[level] += 1
                if level and self.config.promote:
                    self._enqueue(keys[i], data, tuple(range(level)), promotion=True)
            pending = missing
        return out

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        for tier in self.tiers:  # raw bytes, no promotion: a part of an entry is no entry
            data = tier.get_range(key, start, stop)
            if data is not None:
                return data
        return None

    def _write(self, key: str, data: bytes) -> bool:
        self.tiers[0].put(key, data)
        if len(self.tiers) > 1:
            self._enqueue(key, data, tuple(range(1, len(self.tiers))), promotion=False)
        return True

    def _exists(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def _exists_many(self, keys: list[str]) -> list[bool]:
        out = [False] * len(keys)
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            found = tier.exists_many([keys[i] for i in pending])
            for i, ok in zip(pending, found, strict=True):
                out[i] = ok
            pending = [i for i, ok in zip(pending, found, strict=True) if not ok]
        return out

    def _remove(self, key: str) -> bool:
        removed = [tier.delete(key) for tier in self.tiers]
        return any(removed)

    def _usage(self) -> None:
        return None  # an entry may sit in several tiers; each tier's size is in stats().tiers

    def _close(self) -> None:
        dropped = self._writer.stop(self.config.close_timeout_s)
        self._count_extra(writes_dropped=dropped)
        if self._close_tiers:
            for tier in self.tiers:
                tier.close()

    # ------------------------------------------------------------------------------------------------ internals
    def _enqueue(self, key: str, data: bytes, targets: tuple[int, ...], *, promotion: bool) -> None:
        if self._writer.offer(_Job(key, data, targets)):
            self._count_extra(writes_queued=1, promotions=int(promotion))
        else:
            self._count_extra(writes_dropped=1)

    def _write_job(self, job: _Job) -> None:
        for level in job.targets:
            try:
                self.tiers[level].put(job.key, job.data)
            except KvpackError as exc:  # a tier closed under us; the others still get the entry
                self._failed("background put", exc)

    def _count_extra(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._extra[name] += delta

    def _snapshot_tier_hits(self) -> list[int]:
        with self._stats_lock:
            return list(self._tier_hits)


# ------------------------------------------------------------------------------------------------ configuration
_TOP_KEYS = {"tiers", "queue_bytes", "promote", "close_timeout_s", "encryption"}
_ENCRYPTION_KEYS = {"namespace", "secrets_file", "memory"}


def open_tiered_url(url: str) -> TieredStore:
    """``tiered://URL1|URL2|...``: one tier per store URL, fastest first (tiered-store options need a TOML file)."""
    from kvpack.store import open as open_store
    from kvpack.store import redact_url

    urls = url[len(TIERED_SCHEME) :].split("|")
    if not url.startswith(TIERED_SCHEME) or not all(urls):
        raise StoreError(
            f"a tiered store URL is tiered://URL1|URL2|... with one store URL per tier, got {redact_url(url)!r}"
        )
    return TieredStore(_open_all(open_store, urls))


def open_config(path: str | Path) -> Store:
    """A store from a TOML file: ``tiers = [URL, ...]`` (a :class:`TieredStore`, fastest first), optional
    ``queue_bytes``, ``promote``, ``close_timeout_s``, and an optional ``[encryption]`` table (``namespace``,
    ``secrets_file``, ``memory``) that wraps every tier, or every tier but ``memory://`` ones unless
    ``memory = true``, in an :class:`~kvpack.store.crypto.EncryptedStore`. The schema is in docs/store.md.

    Raises :class:`StoreError` for an unreadable file, invalid TOML, unknown keys or bad values.
    """
    from kvpack.store import open as open_store

    where = Path(path).expanduser()
    try:
        config: dict[str, Any] = tomllib.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StoreError(f"cannot read the store configuration {where}: {exc}") from None
    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise StoreError(f"unknown keys {sorted(unknown)} in {where}; known: {sorted(_TOP_KEYS)}")
    urls = config.get("tiers")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise StoreError(f"{where} needs tiers = [\"URL\", ...]: a non-empty list of store URLs, fastest first")
    options = {k: v for k, v in config.items() if k not in ("tiers", "encryption")}
    try:
        TieredStoreConfig(**options)  # validate before any tier is opened
    except (TypeError, ValueError) as exc:
        raise StoreError(f"bad tiered store settings in {where}: {exc}") from None
    encryption = config.get("encryption")
    if encryption is None:
        return TieredStore(_open_all(open_store, urls), **options)
    seal = _sealer(where, encryption)
    return TieredStore(_open_all(lambda url: seal(url, open_store(url)), urls), **options)


def _sealer(where: Path, table: object) -> Callable[[str, Store], Store]:
    """From an ``[encryption]`` table: a function that wraps a tier opened from a URL in an EncryptedStore (or
    leaves a memory tier as it is); the key ring is loaded once, here, so that a missing key fails before any tier
    is opened."""
    from kvpack.store.crypto import EncryptedStore, KeyRing, cryptography_api

    if not isinstance(table, dict) or set(table) - _ENCRYPTION_KEYS or "namespace" not in table:
        raise StoreError(
            f"[encryption] in {where} takes namespace (required), secrets_file and memory; got {table!r}"
        )
    namespace, secrets_file, memory = table["namespace"], table.get("secrets_file"), table.get("memory", False)
    if not isinstance(namespace, str) or not namespace or not isinstance(memory, bool):
        raise StoreError(f"[encryption] in {where}: namespace must be a non-empty string and memory a bool")
    if secrets_file is not None and not isinstance(secrets_file, str):
        raise StoreError(f"[encryption] in {where}: secrets_file must be a path")
    cryptography_api()
    ring = KeyRing.load(namespace, secrets_file)

    def seal(url: str, store: Store) -> Store:
        if url.startswith("memory://") and not memory:
            return store
        return EncryptedStore(store, namespace, ring)

    return seal


def _open_all(open_store: Callable[[str], Store], urls: list[str]) -> list[Store]:
    """Open every URL; if one fails, close the ones already open and re-raise."""
    opened: list[Store] = []
    try:
        for url in urls:
            opened.append(open_store(url))
    except BaseException:
        for store in opened:
            store.close()
        raise
    return opened
