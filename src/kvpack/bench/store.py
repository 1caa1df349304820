"""Store micro-benchmark: put/get throughput of container-sized entries, one process or several at once.

Measures kvpack's backends (``memory``, ``disk``, ``disk-nofsync`` = ``DiskStore(fsync=False)``, ``redis`` with
``--redis URL``) and, for the choice of the disk backend's design, two embedded alternatives with the same semantics
(durable puts, LRU access times updated on every hit, every entry verified on put and get): ``sqlite-blob`` (entries
as BLOBs in one SQLite file, WAL) and ``lmdb`` (one LMDB environment with an access-time sub-database; needs
``pip install lmdb``). docs/store.md (section 6) says what it compares and why the disk backend is plain files.

    python -m kvpack.bench.store --backends disk,sqlite-blob,lmdb --sizes 100000,1000000 --procs 1,2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvpack.format import verify, write_container
from kvpack.store import DiskStore, MemoryStore, Store

BACKENDS = ("memory", "disk", "disk-nofsync", "redis", "sqlite-blob", "lmdb")


class _KV(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def close(self) -> None: ...


class _SqliteBlobs:
    """Baseline: entries as BLOBs in SQLite (WAL), durable puts (``synchronous=FULL``), access times on every hit.

    Access-time updates need no durability, so reads run with ``synchronous=NORMAL`` (no fsync).
    """

    def __init__(self, root: Path) -> None:
        self._db = sqlite3.connect(root / "blobs.sqlite3", timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS e (k TEXT PRIMARY KEY, v BLOB NOT NULL, atime REAL NOT NULL)")

    def get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT v FROM e WHERE k = ?", (key,)).fetchone()
        if row is None:
            return None
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("UPDATE e SET atime = ? WHERE k = ?", (time.time(), key))
        verify(row[0])
        return bytes(row[0])

    def put(self, key: str, data: bytes) -> None:
        verify(data)
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("INSERT OR REPLACE INTO e VALUES (?, ?, ?)", (key, data, time.time()))

    def close(self) -> None:
        self._db.close()


class _Lmdb:
    """Baseline: one LMDB environment, durable puts (``env.sync`` after each), access times on every hit.

    Access-time updates need no durability, so the environment is opened with ``sync=False``.
    """

    def __init__(self, root: Path, map_size: int) -> None:
        import lmdb  # optional: only this baseline needs it

        self._env = lmdb.open(str(root / "lmdb"), map_size=map_size, max_dbs=2, sync=False)
        self._data = self._env.open_db(b"data")
        self._atime = self._env.open_db(b"atime")

    def get(self, key: str) -> bytes | None:
        k = key.encode()
        with self._env.begin(db=self._data) as txn:
            value = txn.get(k)
        if value is None:
            return None
        with self._env.begin(db=self._atime, write=True) as txn:
            txn.put(k, struct.pack("<d", time.time()))
        verify(value)
        return bytes(value)

    def put(self, key: str, data: bytes) -> None:
        verify(data)
        k = key.encode()
        with self._env.begin(write=True) as txn:
            txn.put(k, data, db=self._data)
            txn.put(k, struct.pack("<d", time.time()), db=self._atime)
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()


@dataclass(frozen=True)
class BenchConfig:
    """One measurement: ``count`` entries of ``size`` bytes put then read back by ``procs`` processes at once."""

    backend: str
    size: int
    count: int
    procs: int
    redis_url: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("the redis backend needs --redis URL")
        if min(self.size, self.count, self.procs) < 1:
            raise ValueError("size, count and procs must be positive")


@dataclass(frozen=True)
class BenchResult:
    """Aggregate throughput over all processes (medians when repeated)."""

    backend: str
    size: int
    count: int
    procs: int
    put_mb_s: float
    get_mb_s: float
    put_ms_per_op: float
    get_ms_per_op: float


def _open(cfg: BenchConfig, root: Path) -> _KV | Store:
    capacity = 4 * cfg.size * cfg.count * cfg.procs + (64 << 20)
    if cfg.backend == "memory":
        return MemoryStore(max_bytes=capacity)
    if cfg.backend in ("disk", "disk-nofsync"):
        return DiskStore(root / "disk", max_bytes=capacity, fsync=cfg.backend == "disk")
    if cfg.backend == "redis":
        assert cfg.redis_url is not None
        from kvpack.store.redis import RedisStore  # StoreError naming kvpack[redis] without redis-py

        return RedisStore(cfg.redis_url, namespace_prefix=f"kvpack-bench:{os.getpid()}:")
    if cfg.backend == "sqlite-blob":
        return _SqliteBlobs(root)
    return _Lmdb(root, map_size=capacity)


def _payload(size: int, seed: int) -> bytes:
    body = np.random.default_rng(seed).integers(0, 256, size=max(0, size - 200), dtype=np.uint8).tobytes()
    return write_container({"bench": seed}, {"body": body})


def _worker(cfg: BenchConfig, root: Path, rank: int, barrier: Any, out: Any) -> None:
    """Put this rank's share, wait for every process, then read this rank's share back; report timings.

    Every process has its own ``memory`` store; the others share one directory or server.
    """
    store = _open(cfg, root)
    payloads = [_payload(cfg.size, rank * 1_000_003 + i) for i in range(cfg.count)]
    keys = [f"bench-{rank}-{i}" for i in range(cfg.count)]
    barrier.wait()
    t0 = time.perf_counter()
    for key, data in zip(keys, payloads, strict=True):
        store.put(key, data)
    t1 = time.perf_counter()
    barrier.wait()
    t2 = time.perf_counter()
    for key, data in zip(keys, payloads, strict=True):
        if store.get(key) != data:
            raise RuntimeError(f"{cfg.backend}: {key} did not read back")
    t3 = time.perf_counter()
    if isinstance(store, Store):
        for key in keys:
            store.delete(key)
    store.close()
    out.put((t1 - t0, t3 - t2, sum(map(len, payloads))))


def measure(cfg: BenchConfig, root: Path) -> BenchResult:
    """Run one configuration in ``procs`` freshly spawned processes, with any files under ``root``."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(cfg.procs)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(cfg, root, r, barrier, queue)) for r in range(cfg.procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    put_s = max(r[0] for r in results)
    get_s = max(r[1] for r in results)
    total = sum(r[2] for r in results)
    ops = cfg.count * cfg.procs
    return BenchResult(
        backend=cfg.backend,
        size=cfg.size,
        count=cfg.count,
        procs=cfg.procs,
        put_mb_s=total / put_s / 1e6,
        get_mb_s=total / get_s / 1e6,
        put_ms_per_op=1e3 * put_s * cfg.procs / ops,
        get_ms_per_op=1e3 * get_s * cfg.procs / ops,
    )


def table(results: Sequence[BenchResult]) -> str:
    """A Markdown table of results."""
    lines = [
        "| backend | entry bytes | entries/proc | procs | put MB/s | get MB/s | put ms/op | get ms/op |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.backend} | {r.size} | {r.count} | {r.procs} | {r.put_mb_s:.0f} | {r.get_mb_s:.0f} | "
            f"{r.put_ms_per_op:.2f} | {r.get_ms_per_op:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints a Markdown table (and writes JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m kvpack.bench.store", description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="memory,disk,sqlite-blob,lmdb", help=f"comma-separated, of {BACKENDS}")
    parser.add_argument("--sizes", default="100000,1000000", help="entry sizes in bytes, comma-separated")
    parser.add_argument("--count", type=int, default=64, help="entries per process")
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--dir", default=None, help="where to create the stores (default: a temp dir)")
    parser.add_argument("--redis", default=None, help="Redis URL for the redis backend")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all configurations; medians are reported")
    args = parser.parse_args(argv)
    configs = [
        BenchConfig(backend, int(size), args.count, int(procs), args.redis)
        for backend in args.backends.split(",")
        for size in args.sizes.split(",")
        for procs in args.procs.split(",")
    ]
    runs: dict[BenchConfig, list[BenchResult]] = {cfg: [] for cfg in configs}
    for round_ in range(args.repeat):  # rounds interleave the backends, so that a busy moment hits them all alike
        for cfg in configs:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvpack-bench-") as root:
                runs[cfg].append(measure(cfg, Path(root)))
            print(f"round {round_ + 1}/{args.repeat}", table(runs[cfg][-1:]).splitlines()[-1], flush=True)
    results = [_median(rs) for rs in runs.values()]
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


def _median(results: list[BenchResult]) -> BenchResult:
    first = results[0]
    return BenchResult(
        backend=first.backend,
        size=first.size,
        count=first.count,
        procs=first.procs,
        put_mb_s=statistics.median(r.put_mb_s for r in results),
        get_mb_s=statistics.median(r.get_mb_s for r in results),
        put_ms_per_op=statistics.median(r.put_ms_per_op for r in results),
        get_ms_per_op=statistics.median(r.get_ms_per_op for r in results),
    )


if __name__ == "__main__":
    main()
