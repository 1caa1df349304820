"""Local-disk store, the embedded default: one file per entry plus an SQLite index of sizes and access times.

Layout of the store directory::

    objects/<2 hex>/<64 hex>   one file per entry, named by BLAKE2b-256 of the key, fanned out over 256 dirs
    tmp/                       files being written (same filesystem, so the final rename is atomic)
    index.sqlite3              (WAL mode) entries(name, size, atime), running totals, the index format

Guarantees (docs/store.md has the measurements, and why plain files were chosen over LMDB and SQLite blobs):

- Atomic puts: the bytes go to a temp file, are fsynced, and are renamed over the final name (then the directory is
  fsynced). A reader sees the old entry, the new one, or none; never a partial one. A writer killed at any point
  leaves at most a stray temp file (removed by a later open once it is an hour old).
- The index survives restarts; if it is deleted it is rebuilt from the entry files at the next open.
- Size cap: after each put, least recently used entries are evicted until the total is at most ``max_bytes``.
  Access times reach the index in batches (with the next put, every :data:`TOUCH_BATCH` hits or
  :data:`TOUCH_INTERVAL_S` seconds, and on close), so that reads rarely take the index's write lock; the LRU order
  across processes may lag by that much.
- Several processes and threads may share a directory: index changes and the renames and unlinks they describe
  happen inside one SQLite write transaction (a file lock), so the index and the files agree. Reads of entry files
  take no lock.
- Everything read is verified by the :class:`~kvpack.store.base.Store` layer; a damaged file is deleted.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvpack.errors import StoreError
from kvpack.store.base import Store

DEFAULT_DISK_BYTES = 10 << 30
INDEX_FORMAT = "1"
STALE_TMP_SECONDS = 3600.0
TOUCH_BATCH = 64
TOUCH_INTERVAL_S = 1.0
_EVICT_BATCH = 32

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (name TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_by_atime ON entries (atime)",
    "CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), entries INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO totals VALUES (0, 0, 0)",
    "CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN "
    "UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size; END",
    "CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN "
    "UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size; END",
    "CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF size ON entries BEGIN "
    "UPDATE totals SET bytes = bytes - OLD.size + NEW.size; END",
)
_UPSERT = (
    "INSERT INTO entries (name, size, atime) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET size = excluded.size, atime = excluded.atime"
)


def default_cache_dir() -> Path:
    """``$KVPACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvpack``, else ``~/.cache/kvpack``."""
    explicit = os.environ.get("KVPACK_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvpack"


@dataclass(frozen=True)
class DiskStoreConfig:
    """Settings of a :class:`DiskStore`.

    Attributes:
        path: the store directory (created if missing).
        max_bytes: size cap of the entries; least recently used ones are evicted beyond it, and an entry larger
            than this is not stored.
        fsync: fsync each entry and its directory on put (durable across power loss); ``False`` keeps atomicity
            and crash safety for process crashes but may lose recent puts on power loss.
        lock_timeout_s: how long an operation waits for another process's index transaction.
    """

    path: Path
    max_bytes: int = DEFAULT_DISK_BYTES
    fsync: bool = True
    lock_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            raise ValueError(f"path must be a pathlib.Path, got {type(self.path).__name__}")
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {self.max_bytes!r}")
        if not self.lock_timeout_s > 0:
            raise ValueError(f"lock_timeout_s must be positive, got {self.lock_timeout_s!r}")


def _entry_name(key: str) -> str:
    return hashlib.blake2b(key.encode("ascii"), digest_size=32).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskStore(Store):
    """Entries as files under ``path`` (default :func:`default_cache_dir`), LRU-capped at ``max_bytes``.

    Open one ``DiskStore`` per process (do not carry one across ``fork``); any number of processes may open the
    same directory. Construction raises :class:`StoreError` if the directory cannot be used.
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (OSError, sqlite3.DatabaseError)

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_DISK_BYTES,
        *,
        fsync: bool = True,
        lock_timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        root = Path(path).expanduser() if path is not None else default_cache_dir()
        self.config = DiskStoreConfig(path=root, max_bytes=max_bytes, fsync=fsync, lock_timeout_s=lock_timeout_s)
        self._objects = root / "objects"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}  # entry name -> time of its latest hit, not yet in the index
        self._last_flush = time.monotonic()
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
            self._remove_stale_tmp()
            self._db = sqlite3.connect(
                root / "index.sqlite3", timeout=lock_timeout_s, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open a disk store at {root}: {exc}; give a writable directory (or set KVPACK_CACHE_DIR)"
            ) from exc
        try:
            self._init_index()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, StoreError) or not isinstance(exc, OSError | sqlite3.Error):
                raise
            raise StoreError(
                f"cannot open the index of the disk store at {root}: {exc}; if the file is damaged, delete "
                f"{root / 'index.sqlite3'} and it is rebuilt from the entry files"
            ) from exc

    def __repr__(self) -> str:
        return f"DiskStore({str(self.config.path)!r}, max_bytes={self.config.max_bytes})"

    def entry_path(self, key: str) -> Path:
        """The file that holds ``key``'s entry (which may not exist)."""
        return self._path(_entry_name(key))

    def _path(self, name: str) -> Path:
        return self._objects / name[:2] / name

    # ------------------------------------------------------------------------------------------ raw operations
    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        names = [_entry_name(k) for k in keys]
        out: list[bytes | None] = []
        for name in names:
            try:
                out.append(self._path(name).read_bytes())
            except FileNotFoundError:
                out.append(None)
        now = time.time()
        with self._lock:
            for name, data in zip(names, out, strict=True):
                if data is not None:
                    self._touched[name] = now
            stale = [
                name
                for name, data in zip(names, out, strict=True)
                if data is None and self._db.execute("SELECT 1 FROM entries WHERE name = ?", (name,)).fetchone()
            ]
            flush_due = len(self._touched) >= TOUCH_BATCH or time.monotonic() - self._last_flush >= TOUCH_INTERVAL_S
        if stale or flush_due:
            with self._transaction() as db:
                self._flush_touches(db)
                for name in stale:
                    if not self._path(name).exists():
                        db.execute("DELETE FROM entries WHERE name = ?", (name,))
        return out

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        path = self.entry_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, stop - start, start) if stop > start else b""
        finally:
            os.close(fd)
        with self._lock:
            self._touched[path.name] = time.time()
        return data

    def _write(self, key: str, data: bytes) -> bool:
        if len(data) > self.config.max_bytes:
            return False
        final = self.entry_path(key)
        tmp = self._tmp / f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if self.config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            with self._transaction() as db:
                self._flush_touches(db)
                db.execute(_UPSERT, (final.name, len(data), time.time()))
                evicted = self._evict(db, keep=final.name)
                try:
                    os.replace(tmp, final)
                except FileNotFoundError:  # the first entry of its fan-out directory
                    final.parent.mkdir(exist_ok=True)
                    if self.config.fsync:
                        _fsync_dir(self._objects)
                    os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if self.config.fsync:
            _fsync_dir(final.parent)
        self._count(evictions=evicted)
        return True

    def _exists(self, key: str) -> bool:
        return self.entry_path(key).is_file()

    def _remove(self, key: str) -> bool:
        path = self.entry_path(key)
        with self._transaction() as db:
            db.execute("DELETE FROM entries WHERE name = ?", (path.name,))
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    def _usage(self) -> tuple[int, int]:
        if self._touched:  # pending hits may index orphaned files; count them
            with self._transaction() as db:
                self._flush_touches(db)
        with self._lock:
            entries, nbytes = self._db.execute("SELECT entries, bytes FROM totals").fetchone()
        return int(entries), int(nbytes)

    def _close(self) -> None:
        if self._touched:
            try:
                with self._transaction() as db:
                    self._flush_touches(db)
            except (OSError, sqlite3.DatabaseError):
                pass  # access times only order evictions; losing the last few is harmless
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------ internals
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) SQLite transaction, committed on success and rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _init_index(self) -> None:
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT v FROM meta WHERE k = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('format', ?)", (INDEX_FORMAT,))
                self._adopt_files(db)
            elif row[0] != INDEX_FORMAT:
                raise StoreError(
                    f"the disk store at {self.config.path} has index format {row[0]}, this kvpack uses "
                    f"{INDEX_FORMAT}; use another directory or delete this one"
                )

    def _adopt_files(self, db: sqlite3.Connection) -> None:
        """Index the entry files already present (a new or deleted index): size from the file, atime from mtime."""
        rows = []
        for sub in self._objects.iterdir():
            if sub.is_dir():
                for entry in os.scandir(sub):
                    if entry.is_file() and len(entry.name) == 64:
                        st = entry.stat()
                        rows.append((entry.name, st.st_size, st.st_mtime))
        db.executemany(_UPSERT, rows)

    def _flush_touches(self, db: sqlite3.Connection) -> None:
        """Write the access times of recent hits to the index (indexing any file it lacks); lock held, in a txn."""
        for name, atime in self._touched.items():
            if db.execute("UPDATE entries SET atime = ? WHERE name = ?", (atime, name)).rowcount == 0:
                path = self._path(name)
                if path.is_file():
                    db.execute(_UPSERT, (name, path.stat().st_size, atime))
        self._touched.clear()
        self._last_flush = time.monotonic()

    def _evict(self, db: sqlite3.Connection, keep: str) -> int:
        """Delete least recently used entries (never ``keep``) until the total fits ``max_bytes``; how many."""
        total = db.execute("SELECT bytes FROM totals").fetchone()[0]
        evicted = 0
        while total > self.config.max_bytes:
            victims = db.execute(
                "SELECT name, size FROM entries WHERE name != ? ORDER BY atime LIMIT ?", (keep, _EVICT_BATCH)
            ).fetchall()
            if not victims:
                break
            for name, size in victims:
                if total <= self.config.max_bytes:
                    break
                db.execute("DELETE FROM entries WHERE name = ?", (name,))
                self._path(name).unlink(missing_ok=True)
                total -= size
                evicted += 1
        return evicted

    def _remove_stale_tmp(self) -> None:
        """Delete temp files of writers that died (older than :data:`STALE_TMP_SECONDS`)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in os.scandir(self._tmp):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
