"""The capacity benchmark's workload pieces (no model): Zipf traces, budgets, settings, replay statistics."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.bench.capacity import (
    Budget,
    Served,
    parse_budget,
    parse_setting,
    parse_size,
    quality_of,
    replay,
    summarize,
    zipf_trace,
)
from kvpack.format import write_container
from kvpack.store import MemoryStore, TieredStore


def test_zipf_trace_is_deterministic_and_skewed() -> None:
    trace = zipf_trace(200, 5000, 1.2, seed=7)
    assert trace == zipf_trace(200, 5000, 1.2, seed=7)
    assert trace != zipf_trace(200, 5000, 1.2, seed=8)
    assert all(0 <= i < 200 for i in trace)
    counts = sorted(Counter(trace).values(), reverse=True)
    assert counts[0] > 10 * counts[min(len(counts) - 1, 50)]  # a heavy head
    flatter = sorted(Counter(zipf_trace(200, 5000, 0.8, seed=7)).values(), reverse=True)
    assert flatter[0] < counts[0]
    uniform = Counter(zipf_trace(10, 10_000, 0.0, seed=1))
    assert max(uniform.values()) < 1.2 * min(uniform.values())


@pytest.mark.parametrize(("args", "error"), [((0, 10, 1.0), ValueError), ((5, -1, 1.0), ValueError),
                                             ((5, 10, float("nan")), ValueError), ((5, 10, -0.5), ValueError)])
def test_zipf_trace_rejects_bad_arguments(args: tuple[int, int, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        zipf_trace(*args)


def test_sizes_and_budgets() -> None:
    assert parse_size("256MiB") == 256 << 20 and parse_size("1GiB") == 1 << 30 and parse_size("500MB") == 500 * 10**6
    assert parse_size("4096") == 4096 and parse_size("1.5KiB") == 1536
    assert parse_budget("memory:256MiB") == Budget(256 << 20)
    assert parse_budget("memory:256MiB+disk:1GiB") == Budget(256 << 20, 1 << 30)
    assert parse_budget("memory:256MiB+disk:1GiB").label == "memory:256MiB+disk:1024MiB"
    for bad in ("256MiB", "disk:1GiB", "memory:1GiB+redis:1GiB", "memory:abc", "memory:0", "memory:1GiB+"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_budget_opens_fresh_bounded_stores(tmp_path: Path) -> None:
    memory = Budget(1000).open(tmp_path / "a")
    assert isinstance(memory, MemoryStore) and memory.config.max_bytes == 1000
    tiered = Budget(1000, 5000).open(tmp_path / "b")
    assert isinstance(tiered, TieredStore) and tiered.stats().tiers[1].stats.entries == 0
    tiered.close()


def test_settings() -> None:
    assert parse_setting("raw") == ("raw", {})
    assert parse_setting("kivi:bits=2,group=32") == ("kivi", {"bits": 2, "group": 32})
    assert parse_setting("transform:profile=p.kvp,preset=32x") == ("transform", {"profile": "p.kvp", "preset": "32x"})
    with pytest.raises(ValueError):
        parse_setting("kivi:bits")


def test_replay_counts_full_and_partial_hits() -> None:
    outcomes = {0: Served(1.0, 512, 512), 1: Served(3.0, 256, 512), 2: Served(5.0, 0, 512)}
    row = replay([0, 1, 2, 0], lambda i: outcomes[i])
    assert row["requests"] == 4 and row["hit_rate"] == 0.5 and row["partial_hit_rate"] == 0.75
    assert row["ttft_mean_s"] == 2.5 and row["ttft_p95_s"] == 5.0
    with pytest.raises(ValueError):
        replay([], lambda i: outcomes[i])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200))
def test_summary_bounds(values: list[float]) -> None:
    out = summarize(values)
    assert min(values) <= out["ttft_mean_s"] <= max(values) + 1e-9
    assert out["ttft_p95_s"] in values and out["ttft_p95_s"] >= sorted(values)[len(values) // 2]


def test_replay_through_a_real_store_fills_only_its_budget() -> None:
    """The same protocol as a run: look up the context's chunks, reuse the leading run, write the rest back."""
    chunks = {i: [write_container({"c": i, "j": j}, {"p": bytes(5000)}) for j in range(4)] for i in range(20)}
    budget = 3 * 4 * len(chunks[0][0])  # three contexts
    store = MemoryStore(max_bytes=budget)

    def serve(i: int) -> Served:
        keys = [f"c{i}-{j}" for j in range(4)]
        got = store.get_many(keys)
        run = next((j for j, g in enumerate(got) if g is None), 4)
        for j in range(run, 4):
            store.put(keys[j], chunks[i][j])
        return Served(0.1 if run == 4 else 1.0, run * 256, 1024)

    row = replay(zipf_trace(20, 400, 1.2, seed=0), serve)
    assert 0.2 < row["hit_rate"] < 0.95
    assert (store.stats().bytes_stored or 0) <= budget


def test_quality_is_quoted_from_the_committed_results(tmp_path: Path) -> None:
    results = tmp_path / "codecs.json"
    results.write_text(json.dumps({"rows": [{"codec_id": "a", "ppl_increase_pct": 0.5}, {"codec_id": "b"}]}))
    assert quality_of("a", results) == 0.5
    assert quality_of("b", results) is None and quality_of("c", results) is None
    assert quality_of("a", tmp_path / "missing.json") is None
