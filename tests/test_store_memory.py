"""MemoryStore specifics: an LRU bounded by bytes."""

from __future__ import annotations

import pytest

from kvpack.store import MemoryStore
from stores import sized_entry


def test_evicts_least_recently_used_by_bytes() -> None:
    size = 1000
    store = MemoryStore(max_bytes=3 * size + 10)
    for key in "abc":
        store.put(key, sized_entry(size, key))
    assert store.get("a") is not None  # a is now more recent than b and c
    store.put("d", sized_entry(size, "d"))
    assert [store.contains(k) for k in "abcd"] == [True, False, True, True]
    st = store.stats()
    assert (st.entries, st.bytes_stored, st.evictions) == (3, 3 * size, 1)


def test_one_large_entry_evicts_several() -> None:
    store = MemoryStore(max_bytes=3000)
    for key in "abc":
        store.put(key, sized_entry(1000, key))
    store.put("big", sized_entry(2500, "big"))
    assert [store.contains(k) for k in ("a", "b", "c", "big")] == [False, False, False, True]
    assert store.stats().bytes_stored == 2500


def test_entry_larger_than_capacity_is_not_kept() -> None:
    store = MemoryStore(max_bytes=1000)
    store.put("small", sized_entry(600))
    store.put("huge", sized_entry(1001))
    assert store.get("huge") is None
    assert store.get("small") is not None
    assert store.stats().puts == 1


def test_replacing_an_entry_updates_the_byte_count() -> None:
    store = MemoryStore(max_bytes=10_000)
    store.put("k", sized_entry(1000))
    store.put("k", sized_entry(400))
    assert store.stats().bytes_stored == 400
    assert store.delete("k")
    assert (store.stats().entries, store.stats().bytes_stored) == (0, 0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_rejects_bad_capacity(bad: object) -> None:
    with pytest.raises(ValueError):
        MemoryStore(max_bytes=bad)  # type: ignore[arg-type]
