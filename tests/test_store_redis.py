"""RedisStore against a real redis-server: TTL, prefixes, batching, and a server that dies, stalls and comes back."""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpack.errors import StoreError
from kvpack.store import RedisStore, StoreWarning
from servers import RedisServer, redis_server_available
from stores import entry, failures

REQUIRES_REDIS_SERVER = pytest.mark.skipif(
    not redis_server_available(),
    reason="redis-server binary not found; install it (`make redis-server` or apt-get install redis-server)",
)

pytestmark = [pytest.mark.redis, REQUIRES_REDIS_SERVER]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as s:
        yield s


def test_keys_carry_the_namespace_prefix(server: RedisServer) -> None:
    a = RedisStore(server.url, namespace_prefix="tenant-a:")
    b = RedisStore(server.url, namespace_prefix="tenant-b:")
    a.put("k", entry(b"from a"))
    assert b.get("k") is None
    assert not b.contains("k")
    b.put("k", entry(b"from b"))
    assert a.get("k") == entry(b"from a")
    raw = server.client()
    assert sorted(raw.keys("*")) == [b"tenant-a:k", b"tenant-b:k"]
    assert b.delete("k")
    assert raw.keys("*") == [b"tenant-a:k"]
    for s in (a, b):
        s.close()


def test_ttl_expires_entries(server: RedisServer) -> None:
    store = RedisStore(server.url, ttl_seconds=0.3)
    store.put("k", entry(b"short-lived"))
    assert 0 < server.client().pttl("kvpack:k") <= 300
    assert store.get("k") == entry(b"short-lived")
    time.sleep(0.45)
    assert store.get("k") is None
    no_ttl = RedisStore(server.url)
    no_ttl.put("k", entry(b"forever"))
    assert server.client().pttl("kvpack:k") == -1


def test_get_many_batches_keep_order(server: RedisServer) -> None:
    store = RedisStore(server.url, batch_size=3)
    keys = [f"k{i}" for i in range(11)]
    for i in range(0, 11, 2):
        store.put(keys[i], entry(bytes([i]) * 100))
    got = store.get_many(keys)
    assert got == [entry(bytes([i]) * 100) if i % 2 == 0 else None for i in range(11)]
    assert (store.stats().hits, store.stats().misses) == (6, 5)


def test_dead_server_degrades_then_recovers(server: RedisServer) -> None:
    store = RedisStore(server.url, socket_timeout=1.0, connect_timeout=0.5)
    store.put("k", entry(b"cached"))
    assert store.get("k") == entry(b"cached")
    server.kill()

    got, warned, elapsed = failures(lambda: store.get("k"))
    assert got is None and len(warned) == 1 and elapsed < 3
    assert "get failed" in str(warned[0].message)
    got, warned, elapsed = failures(lambda: store.get_many(["k", "j"]))
    assert got == [None, None] and warned == [] and elapsed < 3  # one warning per failure streak
    for call in (lambda: store.put("k", entry(b"x")), lambda: store.contains("k"), lambda: store.delete("k")):
        result, warned, elapsed = failures(call)
        assert result in (None, False) and warned == [] and elapsed < 3
    st = store.stats()
    assert st.errors == 5
    assert (st.hits, st.misses, st.puts) == (1, 3, 1)

    server.start()  # same port, empty (no persistence)
    got, warned, _ = failures(lambda: store.get("k"))
    assert got is None and warned == []
    store.put("k", entry(b"again"))
    assert store.get("k") == entry(b"again")
    assert store.stats().errors == 5
    server.kill()
    _, warned, _ = failures(lambda: store.get("k"))
    assert len(warned) == 1, "a new failure streak warns again"
    store.close()


def test_stalled_server_times_out(server: RedisServer) -> None:
    store = RedisStore(server.url, socket_timeout=0.5, connect_timeout=0.5)
    store.put("k", entry(b"cached"))
    server.signal(signal.SIGSTOP)
    try:
        got, warned, elapsed = failures(lambda: store.get("k"))
        assert got is None and len(warned) == 1
        assert elapsed < 2.5, f"a stalled server must not hang the caller ({elapsed:.1f} s)"
    finally:
        server.signal(signal.SIGCONT)
    assert store.get("k") == entry(b"cached")
    store.close()


def test_server_killed_mid_request_never_returns_wrong_bytes(server: RedisServer) -> None:
    store = RedisStore(server.url, socket_timeout=1.0, connect_timeout=0.5, batch_size=4)
    keys = [f"k{i}" for i in range(16)]
    values = {k: entry(bytes([i]) * 1_000_000) for i, k in enumerate(keys)}
    for k, v in values.items():
        store.put(k, v)
    outcomes = {"hit": 0, "miss": 0, "wrong": 0}
    problems: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            for _ in range(500):
                if stop.is_set():
                    break
                for k, got in zip(keys, store.get_many(keys), strict=True):
                    outcomes["miss" if got is None else "hit" if got == values[k] else "wrong"] += 1
        except BaseException as exc:
            problems.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.3)
        server.kill()
        time.sleep(0.3)
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert not problems
    assert outcomes["wrong"] == 0
    assert outcomes["hit"] > 0 and outcomes["miss"] > 0, outcomes
    assert store.stats().errors >= 1
    assert store.stats().corrupt_entries == 0
    store.close()


@pytest.mark.parametrize(
    "url", ["http://localhost:6379", "redis://localhost:notaport/0", "redis://localhost/0?bogus_option=1", ""]
)
def test_bad_url_raises_at_construction(url: str) -> None:
    with pytest.raises(StoreError):
        RedisStore(url)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"namespace_prefix": "has space"},
        {"ttl_seconds": 0},
        {"ttl_seconds": float("inf")},
        {"socket_timeout": 0},
        {"connect_timeout": -1},
        {"batch_size": 0},
    ],
)
def test_bad_settings_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RedisStore("redis://127.0.0.1:6379/0", **kwargs)  # type: ignore[arg-type]
