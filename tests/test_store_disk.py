"""DiskStore specifics: persistence, the size cap, several processes at once, and a writer killed mid-put."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import pytest

from kvpack.errors import StoreError
from kvpack.format import write_container
from kvpack.store import DiskStore, default_cache_dir
from stores import sized_entry


def object_files(root: Path) -> list[Path]:
    return [p for p in (root / "objects").rglob("*") if p.is_file()]


def test_entries_and_recency_survive_reopening(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DiskStore(root, max_bytes=3 * 1000) as store:
        for key in "abc":
            store.put(key, sized_entry(1000, key))
        assert store.get("a") is not None
    with DiskStore(root, max_bytes=3 * 1000) as store:
        st = store.stats()
        assert (st.entries, st.bytes_stored) == (3, 3000)
        assert store.get("c") == sized_entry(1000, "c")
        store.put("d", sized_entry(1000, "d"))  # b is the least recently used, even across the restart
        assert [store.contains(k) for k in "abcd"] == [True, False, True, True]


def test_size_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = DiskStore(root, max_bytes=3500, fsync=False)
    for i in range(10):
        store.put(f"k{i}", sized_entry(1000, str(i)))
        if i >= 1:
            assert store.get("k0") is not None  # k0 stays hot
    st = store.stats()
    assert st.bytes_stored is not None and st.bytes_stored <= 3500
    assert (st.entries, st.evictions) == (3, 7)
    assert [store.contains(f"k{i}") for i in (0, 8, 9)] == [True, True, True]
    assert len(object_files(root)) == 3
    store.put("huge", sized_entry(3501))
    assert not store.contains("huge")
    assert store.stats().entries == 3
    store.close()


def test_default_directory_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVPACK_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kvpack"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "kvpack"
    monkeypatch.setenv("KVPACK_CACHE_DIR", str(tmp_path / "explicit"))
    with DiskStore() as store:
        store.put("k", sized_entry(1000))
        assert store.config.path == tmp_path / "explicit"
    assert (tmp_path / "explicit" / "index.sqlite3").is_file()


def test_lost_index_is_rebuilt_from_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DiskStore(root) as store:
        for key in "abc":
            store.put(key, sized_entry(500, key))
    for p in root.glob("index.sqlite3*"):
        p.unlink()
    with DiskStore(root) as store:
        assert (store.stats().entries, store.stats().bytes_stored) == (3, 1500)
        assert store.get("b") == sized_entry(500, "b")


def test_externally_deleted_file_is_a_miss_and_leaves_the_index(tmp_path: Path) -> None:
    with DiskStore(tmp_path / "s") as store:
        store.put("a", sized_entry(500))
        store.entry_path("a").unlink()
        assert store.get("a") is None
        assert store.stats().entries == 0


def test_unusable_directory_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open a disk store"):
        DiskStore(blocker / "store")


def test_io_failure_degrades_to_miss_with_warning(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.put("a", sized_entry(500))
    path = store.entry_path("a")
    path.unlink()
    path.mkdir()  # reading a directory fails with an OSError other than "not found"
    with pytest.warns(Warning, match="get failed"):
        assert store.get("a") is None
    assert store.stats().errors == 1
    store.close()


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "s"
    DiskStore(root).close()
    old, fresh = root / "tmp" / "1-old.tmp", root / "tmp" / "2-fresh.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    DiskStore(root).close()
    assert not old.exists()
    assert fresh.exists()


def writer_data(i: int, writer: str) -> bytes:
    return write_container({"key": i, "writer": writer}, {"p": bytes([i % 251]) * (20_000 + 997 * i)})


def concurrent_writer(root: Path, writer: str, lo: int, hi: int, cap: int, out: Queue) -> None:
    """Put keys [lo, hi) twice, reading some back after each put; report what was seen."""
    store = DiskStore(root, max_bytes=cap)
    bad = 0
    for _ in range(2):
        for i in range(lo, hi):
            store.put(f"k{i}", writer_data(i, writer))
            for j in (i, i + 7, i - 13):
                got = store.get(f"k{j}")
                if got is not None and got not in (writer_data(j, "A"), writer_data(j, "B")):
                    bad += 1
    st = store.stats()
    out.put({"bad": bad, "corrupt": st.corrupt_entries, "errors": st.errors, "hits": st.hits})


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    """Two processes put overlapping keys (different valid bytes for the same key) under a cap that forces evictions."""
    root, cap = tmp_path / "shared", 600_000
    DiskStore(root, max_bytes=cap).close()
    ctx = mp.get_context("fork")  # inherits the imports: no interpreter start-up per child
    out = ctx.Queue()
    procs = [
        ctx.Process(target=concurrent_writer, args=(root, "A", 0, 40, cap, out)),
        ctx.Process(target=concurrent_writer, args=(root, "B", 20, 60, cap, out)),
    ]
    for p in procs:
        p.start()
    reports = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for r in reports:
        assert (r["bad"], r["corrupt"], r["errors"]) == (0, 0, 0), r
        assert r["hits"] > 0
    with DiskStore(root, max_bytes=cap) as store:
        for i in range(60):
            got = store.get(f"k{i}")
            assert got is None or got in (writer_data(i, "A"), writer_data(i, "B"))
        st = store.stats()
        files = object_files(root)
        assert st.corrupt_entries == 0
        assert st.entries == len(files)
        assert st.bytes_stored == sum(f.stat().st_size for f in files)
        assert st.bytes_stored <= cap


def crash_payload(i: int) -> bytes:
    return write_container({"key": i}, {"p": bytes([i % 251]) * (300_000 + 7919 * (i % 50))})


def crashing_writer(root: Path, start: int, done: Synchronized) -> None:
    """Put keys from ``start`` on until killed; ``done`` holds the last key whose put returned."""
    store = DiskStore(root, max_bytes=1 << 30)
    for i in range(start, start + 10_000):
        store.put(f"k{i}", crash_payload(i))
        done.value = i


def test_writer_killed_mid_put_leaves_nothing_wrong(tmp_path: Path) -> None:
    """SIGKILL a writer at varied points in its puts, five times; every key misses or reads back exactly."""
    root = tmp_path / "s"
    ctx = mp.get_context("fork")
    start = 0
    for round_ in range(5):
        done = ctx.Value("q", -1)
        child = ctx.Process(target=crashing_writer, args=(root, start, done))
        child.start()
        deadline = time.monotonic() + 60
        while done.value < start + 2 and time.monotonic() < deadline and child.is_alive():
            time.sleep(0.001)
        time.sleep(0.0013 * round_)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        last = done.value
        assert last >= start + 2
        with DiskStore(root, max_bytes=1 << 30) as store:
            for i in range(last + 3):
                got = store.get(f"k{i}")
                assert got is None or got == crash_payload(i), f"k{i} read back wrong after the crash"
                if i <= last:
                    assert got is not None, f"k{i} was reported written but is gone"
            st = store.stats()
            assert st.corrupt_entries == 0
            assert st.entries == len(object_files(root))  # every surviving file is indexed (orphans adopted)
            store.put("after", crash_payload(1))  # still usable
            assert store.get("after") == crash_payload(1)
            assert store.delete("after")
        start = last + 1
