"""TieredStore: fall-through reads, promotion, write-through in the background with a bounded queue that drops
rather than blocks, per-tier budgets and hit counters, configuration from a URL and a TOML file."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack.store
from kvpack.errors import StoreError
from kvpack.store import DiskStore, MemoryStore, Store, TieredStore, TieredStoreStats
from stores import entry, run_threads


class GatedStore(MemoryStore):
    """A memory store whose writes wait until ``gate`` is set: a slow remote tier."""

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def _write(self, key: str, data: bytes) -> bool:
        if not self.gate.wait(timeout=30):
            raise AssertionError("gate never opened")
        return super()._write(key, data)


def tiers(tmp_path: Path, memory_bytes: int = 1 << 20) -> tuple[MemoryStore, DiskStore, MemoryStore]:
    return (MemoryStore(max_bytes=memory_bytes), DiskStore(tmp_path / "disk", fsync=False), MemoryStore())


def test_put_writes_the_first_tier_now_and_the_others_in_the_background(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote])
    data = entry(b"x" * 1000)
    store.put("k", data)
    assert fast.get("k") == data
    assert store.flush(timeout=10)
    assert disk.get("k") == data and remote.get("k") == data
    st_ = store.stats()
    assert isinstance(st_, TieredStoreStats)
    assert (st_.puts, st_.writes_queued, st_.writes_dropped, st_.queue_bytes) == (1, 1, 0, 0)
    store.close()


def test_reads_fall_through_count_per_tier_and_promote(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote])
    a, b, c = entry(b"a" * 100), entry(b"b" * 100), entry(b"c" * 100)
    fast.put("a", a)
    disk.put("b", b)
    remote.put("c", c)
    assert store.get_many(["a", "b", "c", "d"]) == [a, b, c, None]
    st_ = store.stats()
    assert [t.hits for t in st_.tiers] == [1, 1, 1]
    assert (st_.hits, st_.misses, st_.promotions) == (3, 1, 2)
    assert store.flush(timeout=10)
    assert fast.get_many(["b", "c"]) == [b, c]
    assert disk.get("c") == c
    assert store.get_many(["a", "b", "c"]) == [a, b, c]
    assert [t.hits for t in store.stats().tiers] == [4, 1, 1]  # all from memory now
    assert store.exists_many(["a", "b", "c", "d"]) == [True, True, True, False]
    assert store.contains("c") and not store.contains("d")
    store.close()


def test_no_promotion_when_disabled(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote], promote=False)
    disk.put("b", entry(b"b"))
    assert store.get("b") == entry(b"b")
    assert store.flush(timeout=10)
    assert fast.get("b") is None and store.stats().promotions == 0
    store.close()


def test_each_tier_keeps_its_own_budget(tmp_path: Path) -> None:
    """A small memory tier evicts (LRU); the disk tier still has everything, and a hit there is promoted again."""
    data = {f"k{i}": entry(bytes([i]) * 10_000) for i in range(10)}
    size = len(data["k0"])
    fast, disk, remote = tiers(tmp_path, memory_bytes=3 * size)
    store = TieredStore([fast, disk, remote])
    for key, value in data.items():
        store.put(key, value)
    assert store.flush(timeout=10)
    st_ = store.stats()
    assert st_.tiers[0].stats.entries == 3 and st_.tiers[0].stats.evictions == 7
    assert st_.tiers[1].stats.entries == 10
    assert store.get_many(list(data)) == list(data.values())
    hits = [t.hits for t in store.stats().tiers]
    assert hits == [3, 7, 0]
    assert store.flush(timeout=10)
    assert fast.stats().bytes_stored is not None and fast.stats().bytes_stored <= 3 * size
    store.close()


def test_a_full_queue_drops_writes_and_never_blocks() -> None:
    fast, slow = MemoryStore(), GatedStore()
    data = entry(b"z" * 10_000)
    store = TieredStore([fast, slow], queue_bytes=3 * len(data))
    t0 = time.monotonic()
    for i in range(20):
        store.put(f"k{i}", data)
    elapsed = time.monotonic() - t0
    assert elapsed < 5, "a put must not wait for a slow tier"
    st_ = store.stats()
    # one job may be in the writer's hands, three more fit in the queue; the rest were dropped
    assert 3 <= st_.writes_queued <= 4 and st_.writes_dropped == 20 - st_.writes_queued
    assert fast.stats().entries == 20
    slow.gate.set()
    assert store.flush(timeout=10)
    assert slow.stats().entries == st_.writes_queued
    assert store.stats().queue_bytes == 0
    store.close()


def test_close_waits_a_bounded_time_for_queued_writes() -> None:
    slow = GatedStore()
    store = TieredStore([MemoryStore(), slow], close_timeout_s=0.2)
    for i in range(3):
        store.put(f"k{i}", entry(b"q"))
    t0 = time.monotonic()
    store.close()  # the gate never opens: close gives up on the queue rather than hanging
    assert time.monotonic() - t0 < 5
    slow.gate.set()


def test_damaged_copy_in_a_fast_tier_is_served_from_the_next(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote])
    good = entry(b"good" * 100)
    store.put("k", good)
    assert store.flush(timeout=10)
    fast._entries["k"] = good[:-1] + b"\x00"
    assert store.get("k") == good
    st_ = store.stats()
    assert st_.tiers[0].stats.corrupt_entries == 1 and st_.tiers[1].hits == 1
    assert store.flush(timeout=10)
    assert fast.get("k") == good  # promoted again
    store.close()


def test_get_range_reads_the_first_tier_that_has_the_entry(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote])
    data = entry(bytes(range(200)))
    remote.put("k", data)
    assert store.get_range("k", 3, 50) == data[3:50]
    assert store.get_range("nope", 0, 5) is None
    assert store.flush(timeout=10)
    assert fast.get("k") is None  # a range read promotes nothing
    store.close()


def test_delete_removes_every_copy(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    store = TieredStore([fast, disk, remote])
    store.put("k", entry(b"x"))
    assert store.flush(timeout=10)
    assert store.delete("k")
    assert not any(t.contains("k") for t in (fast, disk, remote))
    assert not store.delete("k")
    store.close()


def test_closing_closes_the_tiers_unless_told_not_to(tmp_path: Path) -> None:
    fast, disk, remote = tiers(tmp_path)
    TieredStore([fast, disk], close_tiers=False).close()
    assert fast.get("k") is None  # still open
    TieredStore([fast, disk, remote]).close()
    with pytest.raises(StoreError):
        fast.get("k")


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        TieredStore([])
    with pytest.raises(ValueError):
        TieredStore(["memory://"])
    with pytest.raises(ValueError):
        TieredStore([MemoryStore()], queue_bytes=-1)
    with pytest.raises(ValueError):
        TieredStore([MemoryStore()], close_timeout_s=float("nan"))


def test_tiered_url(tmp_path: Path) -> None:
    with kvpack.store.open(f"tiered://memory://?max_bytes=5000|file://{tmp_path}/d?max_bytes=90000&fsync=0") as s:
        assert isinstance(s, TieredStore)
        first, second = s.tiers
        assert isinstance(first, MemoryStore) and first.config.max_bytes == 5000
        assert isinstance(second, DiskStore) and second.config.max_bytes == 90000 and not second.config.fsync
    for bad in ("tiered://", "tiered://memory://|", "tiered://memory://|nope://x"):
        with pytest.raises(StoreError):
            kvpack.store.open(bad)


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "tiered.toml"
    config.write_text(
        f'tiers = ["memory://?max_bytes=268435456", "file://{tmp_path}/disk?fsync=0"]\n'
        "queue_bytes = 1048576\npromote = false\nclose_timeout_s = 5\n"
    )
    with kvpack.store.open(str(config)) as s:
        assert isinstance(s, TieredStore)
        assert (s.config.queue_bytes, s.config.promote, s.config.close_timeout_s) == (1 << 20, False, 5)
        assert [type(t) for t in s.tiers] == [MemoryStore, DiskStore]
        s.put("k", entry(b"v"))
        assert s.get("k") == entry(b"v")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiers = [", "cannot read"),
        ('tiers = []', "non-empty list"),
        ('tiers = "memory://"', "non-empty list"),
        ('tiers = ["memory://"]\ncolour = 1', "unknown keys"),
        ('tiers = ["memory://"]\nqueue_bytes = -5', "queue_bytes"),
        ('tiers = ["memory://"]\npromote = "yes"', "promote"),
        ('tiers = ["memory://?max_bytes=0"]', "max_bytes"),
    ],
)
def test_bad_toml_config(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(StoreError, match=message):
        kvpack.store.open(str(config))
    with pytest.raises(StoreError, match="cannot read"):
        kvpack.store.open(str(tmp_path / "missing.toml"))


def test_threads_share_a_tiered_store(tmp_path: Path) -> None:
    store = TieredStore(list(tiers(tmp_path, memory_bytes=50_000)))

    def work(tid: int) -> None:
        for i in range(20):
            key = f"t{tid}-{i % 6}"
            value = entry(f"{tid}-{i % 6}".encode() * 200)
            store.put(key, value)
            got = store.get(key)
            assert got is None or got == value

    run_threads(work)
    assert store.flush(timeout=10)
    st_ = store.stats()
    assert (st_.corrupt_entries, st_.errors) == (0, 0)
    store.close()


@pytest.fixture
def tiered(tmp_path: Path) -> Store:
    return TieredStore(list(tiers(tmp_path)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.binary(max_size=2000), min_size=1, max_size=6))
def test_round_trips_through_every_tier(tiered: Store, payloads: list[bytes]) -> None:
    assert isinstance(tiered, TieredStore)
    keys = [f"h{i}" for i in range(len(payloads))]
    values = [entry(p) for p in payloads]
    for key, value in zip(keys, values, strict=True):
        tiered.put(key, value)
    assert tiered.flush(timeout=10)
    assert tiered.get_many(keys) == values
    for tier in tiered.tiers:
        assert tier.get_many(keys) == values
