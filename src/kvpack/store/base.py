"""The :class:`Store` contract shared by every backend: bytes by key, verified on every read, degrading on failure.

A backend implements a handful of raw operations (``_read``, ``_write``, ...). This base class wraps them with what
every backend must do the same way:

- keys are validated (:func:`validate_key`);
- what is put must be an intact kvpack container (:func:`kvpack.format.verify`), and so must what is read back: a
  corrupted or truncated entry is counted in ``corrupt_entries``, deleted, and returned as a miss;
- a failure of the backend itself (a server that is down, an I/O error) never reaches the caller: a read becomes a
  miss, a write or delete a no-op, the ``errors`` counter goes up, and one :class:`StoreWarning` is issued per
  streak of failures. The caller recomputes; a store failure never turns into a wrong answer.
"""

from __future__ import annotations

import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

from kvpack.errors import FormatError, StoreError
from kvpack.format import verify

MAX_KEY_CHARS = 200
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]+")


class StoreWarning(RuntimeWarning):
    """A store backend failed; kvpack carries on without the cache (misses and skipped writes)."""


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid store key, else raise :class:`ValueError` saying why.

    A key is a non-empty ``str`` of at most :data:`MAX_KEY_CHARS` characters from ``[A-Za-z0-9._:-]`` (chunk keys
    from :mod:`kvpack.keys` are 64 lowercase hex characters).
    """
    if not isinstance(key, str):
        raise ValueError(f"store keys are str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"store keys have 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"store key {key!r} has characters outside [A-Za-z0-9._:-]")
    return key


@dataclass(frozen=True)
class StoreStats:
    """Counters of one store object (this process), plus the backend's size where it is known.

    Attributes:
        hits: reads that returned an intact entry.
        misses: reads that returned ``None`` (absent, corrupted, or the backend failed).
        puts: entries written.
        bytes_read: bytes returned by hits and by :meth:`Store.get_range`.
        bytes_written: bytes written by puts.
        corrupt_entries: entries that failed verification on read (each was deleted and counted as a miss).
        errors: backend failures (I/O errors, unreachable server) that were degraded to misses or no-ops.
        evictions: entries this object evicted to stay within its size cap.
        entries: entries in the backend now (all processes), or ``None`` where unknown.
        bytes_stored: bytes in the backend now (all processes), or ``None`` where unknown.
    """

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt_entries: int = 0
    errors: int = 0
    evictions: int = 0
    entries: int | None = None
    bytes_stored: int | None = None


_COUNTERS = ("hits", "misses", "puts", "bytes_read", "bytes_written", "corrupt_entries", "errors", "evictions")


class Store(ABC):
    """Bytes by key. Thread-safe; usable as a context manager (``close()`` on exit).

    Subclasses implement the raw operations and list in ``_transient_errors`` the exception types that mean "the
    backend failed" (degraded to misses and no-ops) as opposed to programming errors (raised).
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._failing = False
        self._closed = False

    # ----------------------------------------------------------------------------------------------- public API
    def get(self, key: str) -> bytes | None:
        """The intact entry stored under ``key``, or ``None`` (absent, corrupted, or the backend failed)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Entries for ``keys`` in order, ``None`` for each miss; backends batch the reads."""
        self._check_open()
        keys = [validate_key(k) for k in keys]
        if not keys:
            return []
        try:
            raw = self._read_many(keys)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("get", exc)
            raw = [None] * len(keys)
        return [self._accept(k, data) for k, data in zip(keys, raw, strict=True)]

    def get_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Bytes ``[start, stop)`` of the entry under ``key``, clipped to its length like a slice; ``None`` if absent
        or the backend failed.

        For a loader that fetches a prefix of an entry (for example the header and the first sections). The bytes
        are **not verified**: they are not a whole container, so the caller checks what it uses (every section of
        a container has its own CRC-32 in the header, :mod:`kvpack.format`). Counts ``bytes_read``, not hits or
        misses. ``0 <= start <= stop`` or :class:`ValueError`.
        """
        self._check_open()
        validate_key(key)
        for name, value in (("start", start), ("stop", stop)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if stop < start:
            raise ValueError(f"stop ({stop}) must not be below start ({start})")
        try:
            data = self._read_range(key, start, stop)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("get_range", exc)
            return None
        if data is not None:
            self._count(bytes_read=len(data))
        return data

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` (an intact kvpack container, else :class:`FormatError`) under ``key``, replacing any entry.

        A backend failure is counted and warned about, not raised: the entry is simply not cached.
        """
        self._check_open()
        validate_key(key)
        payload = data if isinstance(data, bytes) else bytes(data)
        try:
            verify(payload)
        except FormatError as exc:
            raise FormatError(f"refusing to store a value that is not an intact kvpack container: {exc}") from None
        try:
            stored = self._write(key, payload)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("put", exc)
            return
        if stored:
            self._count(puts=1, bytes_written=len(payload))

    def contains(self, key: str) -> bool:
        """Whether an entry exists under ``key`` (not verified; a later ``get`` may still find it corrupted)."""
        self._check_open()
        validate_key(key)
        try:
            found = self._exists(key)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("contains", exc)
            return False
        return found

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """:meth:`contains` for many keys in one round trip where the backend can batch; ``False`` on failure."""
        self._check_open()
        keys = [validate_key(k) for k in keys]
        if not keys:
            return []
        try:
            found = self._exists_many(keys)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("contains", exc)
            return [False] * len(keys)
        return found

    def delete(self, key: str) -> bool:
        """Remove the entry under ``key``; whether there was one (``False`` too when the backend failed)."""
        self._check_open()
        validate_key(key)
        try:
            removed = self._remove(key)
            self._recovered()
        except self._transient_errors as exc:
            self._failed("delete", exc)
            return False
        return removed

    def stats(self) -> StoreStats:
        """A snapshot of this object's counters and the backend's current size (where known)."""
        self._check_open()
        usage: tuple[int, int] | None
        try:
            usage = self._usage()
            self._recovered()
        except self._transient_errors as exc:
            self._failed("stats", exc)
            usage = None
        with self._stats_lock:
            counts = dict(self._counts)
        entries, nbytes = usage if usage is not None else (None, None)
        return StoreStats(**counts, entries=entries, bytes_stored=nbytes)

    def close(self) -> None:
        """Release the backend's resources; idempotent. Further calls raise :class:`StoreError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        """Raw bytes for each key (``None`` if absent), unverified."""

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Raw bytes ``[start, stop)`` of ``key``'s entry (clipped), ``None`` if absent; backends that can read part
        of an entry override this, the default reads it whole."""
        data = self._read_many([key])[0]
        return None if data is None else data[start:stop]

    def _exists_many(self, keys: list[str]) -> list[bool]:
        """Whether each key exists; backends with a batched check override this."""
        return [self._exists(k) for k in keys]

    @abstractmethod
    def _write(self, key: str, data: bytes) -> bool:
        """Store ``data``; ``False`` if the backend declined to keep it (larger than its capacity)."""

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """Whether ``key`` has an entry."""

    @abstractmethod
    def _remove(self, key: str) -> bool:
        """Delete ``key``'s entry; whether there was one."""

    @abstractmethod
    def _usage(self) -> tuple[int, int] | None:
        """``(entries, bytes)`` stored in the backend, or ``None`` where unknown."""

    @abstractmethod
    def _close(self) -> None:
        """Release resources (called once)."""

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    # ------------------------------------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self!r} is closed; open a new store")

    def _accept(self, key: str, data: bytes | None) -> bytes | None:
        if data is None:
            self._count(misses=1)
            return None
        try:
            verify(data)
        except FormatError:
            self._count(misses=1, corrupt_entries=1)
            self._discard(key)
            return None
        self._count(hits=1, bytes_read=len(data))
        return data

    def _discard(self, key: str) -> None:
        try:
            self._remove(key)
        except self._transient_errors as exc:
            self._failed("delete", exc)

    def _failed(self, op: str, exc: Exception) -> None:
        with self._stats_lock:
            self._counts["errors"] += 1
            first = not self._failing
            self._failing = True
        if first:
            warnings.warn(
                f"{self!r}: {op} failed ({type(exc).__name__}: {exc}); continuing without the cache (reads miss, "
                "writes are skipped, kvpack recomputes). Further failures are counted in stats().errors until the "
                "store works again.",
                StoreWarning,
                stacklevel=3,
            )

    def _recovered(self) -> None:
        if self._failing:
            with self._stats_lock:
                self._failing = False
