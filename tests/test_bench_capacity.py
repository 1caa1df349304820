"""The capacity benchmark's workload pieces (no model): Zipf traces, budgets, settings, replay statistics."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack import codecs
from kvpack.bench import capacity
from kvpack.bench.capacity import (
    Budget,
    EncodeMemo,
    Prefilled,
    Replay,
    Served,
    compute_contexts,
    float32_copy,
    load_kv,
    main,
    merge,
    parse_budget,
    parse_setting,
    parse_size,
    quality_of,
    replay,
    requote,
    stored_bytes,
    summarize,
    target,
    time_prefill,
    validate,
    zipf_trace,
)
from kvpack.format import write_container
from kvpack.kv import KVCache
from kvpack.prefix import RequestStats, spec_for
from kvpack.store import MemoryStore, TieredStore
from test_families import tiny


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
    assert row["requests"] == 4 and row["hit_rate"] == 0.5 and row["partial_hit_rate"] == 0.25
    assert row["ttft_mean_s"] == 2.5 and row["ttft_p95_s"] == 5.0
    with pytest.raises(ValueError):
        replay([], lambda i: outcomes[i])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200))
def test_summary_bounds(values: list[float]) -> None:
    out = summarize(values)
    assert min(values) - 1e-9 <= out["ttft_mean_s"] <= max(values) + 1e-9  # fmean rounds (e.g. 0.95 * n / n)
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
    def cid(name: str, profile: str | None = None) -> str:
        return json.dumps({"name": name, "params": {"p": 1}, "profile": profile, "version": 1})

    results = tmp_path / "codecs.json"
    results.write_text(json.dumps({"rows": [{"codec_id": cid("a"), "ppl_increase_pct": 0.5, "kl_mean": 0.01},
                                            {"codec_id": cid("b")},
                                            {"codec_id": cid("t", "p1"), "ppl_increase_pct": 0.6}]}))
    assert quality_of(cid("a"), [results]) == {"ppl_increase_pct": 0.5, "kl_mean": 0.01, "same_profile": True}
    assert quality_of(cid("b"), [results]) is None and quality_of(cid("c"), [results]) is None
    assert quality_of(cid("t", "p2"), [results]) == {"ppl_increase_pct": 0.6, "kl_mean": None, "same_profile": False}
    assert quality_of(cid("a"), [tmp_path / "missing.json"]) is None
    # a later document that measured the exact profile wins over another profile's row in the first
    lever = tmp_path / "lever.json"
    lever.write_text(json.dumps({"rows": [{"codec_id": cid("t", "p2"), "ppl_increase_pct": 0.7, "kl_mean": 0.02}]}))
    assert quality_of(cid("t", "p2"), [results, tmp_path / "missing.json", lever]) == \
        {"ppl_increase_pct": 0.7, "kl_mean": 0.02, "same_profile": True}
    doc = {"rows": [{"codec_id": cid("t", "p2"), "quality": None}], "config": {}}
    assert requote(doc, [results, lever])["rows"][0]["quality"]["kl_mean"] == 0.02
    assert requote(doc, [lever])["config"]["quality_sources"] == [str(lever)]


# ------------------------------------------------------------------------------ the replay, on a tiny random model
CHUNK = 8


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[torch.Tensor], list[Prefilled], Path]:
    """A tiny bf16 Llama, 10 prompts of 4 chunks + a 3-token question, computed once (step 1) in float32."""
    model = tiny("llama")
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 90, (4 * CHUNK + 3,), generator=gen) for _ in range(10)]
    workdir = tmp_path_factory.mktemp("capacity")
    prefilled = compute_contexts(float32_copy(model), spec, prompts, CHUNK, workdir, log=lambda _: None)
    return model, spec, prompts, prefilled, workdir


def test_compute_once_keeps_the_kv_on_disk_rounded_to_the_stored_dtype(computed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, workdir = computed
    item = prefilled[2]
    assert len(item.chunk_s) == 4 and all(s > 0 for s in item.chunk_s) and item.question_s > 0
    assert item.one_shot_s > 0 and item.compute_s(0) == item.one_shot_s and item.compute_s(4) == item.question_s
    share = (item.chunk_s[3] + item.question_s) / (sum(item.chunk_s) + item.question_s)
    assert item.compute_s(3) == pytest.approx(max(item.question_s, item.one_shot_s * share))
    kv = load_kv(item, spec, prompts[2])
    _, _, cache = time_prefill(float32_copy(model), prompts[2], 4, CHUNK)
    reference = KVCache.from_hf(cache, spec_for(float32_copy(model)), span=(0, 4 * CHUNK))
    assert kv.data.dtype == torch.bfloat16 and torch.equal(kv.data, reference.data.to(torch.bfloat16))

    def no_compute(*args: Any) -> Any:
        raise AssertionError("a computed context was computed again")

    monkeypatch.setattr(capacity, "time_prefill", no_compute)
    assert compute_contexts(float32_copy(model), spec, prompts, CHUNK, workdir, log=lambda _: None) == prefilled
    # a manifest from before one-shot prefills were measured: only those are measured now
    manifest = json.loads((workdir / capacity.MANIFEST).read_text())
    del manifest["entries"][item.ids_hash]["one_shot_s"]
    (workdir / capacity.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(capacity, "recompute_ttft", lambda model, ids: 1.5)
    again = compute_contexts(float32_copy(model), spec, prompts, CHUNK, workdir, log=lambda _: None)
    assert again[2] == replace(item, one_shot_s=1.5) and again[:2] + again[3:] == prefilled[:2] + prefilled[3:]


def test_replay_loads_what_is_stored_and_charges_only_what_is_missing(computed) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, _ = computed
    store = MemoryStore(max_bytes=1 << 30)
    serve = Replay(model, spec, store, codecs.get("raw"), CHUNK, prompts, prefilled)
    miss = serve(0)
    assert (miss.tokens_hit, miss.context_tokens) == (0, 4 * CHUNK) and serve.chunks_put == 4
    assert miss.compute_s == prefilled[0].compute_s(0) and miss.ttft_s == miss.load_s + miss.compute_s
    assert miss.write_s > 0
    hit = serve(0)
    assert hit.tokens_hit == 4 * CHUNK and hit.compute_s == prefilled[0].question_s and hit.write_s == 0
    assert serve.chunks_put == 4
    # what a hit loads is the computed KV, bit for bit (raw), read through the real loader
    loaded = serve.prefixes.load(prompts[0][:-1], RequestStats())
    assert loaded is not None and torch.equal(loaded.data, load_kv(prefilled[0], spec, prompts[0]).data)
    # the last chunk evicted: a partial hit, charged that chunk and the question, and the chunk stored again
    store.delete(serve.prefixes.keys.keys(prompts[0][:-1])[-1])
    partial = serve(0)
    assert partial.tokens_hit == 3 * CHUNK
    assert partial.compute_s == prefilled[0].compute_s(3) and serve.chunks_put == 5
    assert serve(0).tokens_hit == 4 * CHUNK


def test_the_adaptive_loader_serves_a_hit_whole_and_charges_only_the_question(computed) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, _ = computed
    serve = Replay(model, spec, MemoryStore(max_bytes=1 << 30), codecs.get("raw"), CHUNK, prompts, prefilled,
                   compute_front=True)
    assert serve.prefixes.loader.config.compute_front and serve(0).tokens_hit == 0
    hit = serve(0)
    assert hit.tokens_hit == 4 * CHUNK and hit.compute_s == prefilled[0].question_s
    assert hit.ttft_s == hit.load_s + hit.compute_s and hit.write_s == 0


def test_a_chunk_encoded_again_puts_the_same_bytes_charged_its_first_encode(computed) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, _ = computed
    store = MemoryStore(max_bytes=1 << 30)
    memo = EncodeMemo(codecs.get("lossless"))
    serve = Replay(model, spec, store, memo.codec, CHUNK, prompts, prefilled, memo)
    serve(0)
    keys = serve.prefixes.keys.keys(prompts[0][:-1])
    first = [store.get(k) for k in keys]
    expected = [memo.codec.encode(part) for part in load_kv(prefilled[0], spec, prompts[0]).chunks(CHUNK)]
    assert first == expected and len(memo.blobs) == 4 and memo.charged_s == 0
    for key in keys:
        store.delete(key)
    again = serve(0)
    assert again.tokens_hit == 0 and [store.get(k) for k in keys] == expected
    assert memo.charged_s == pytest.approx(sum(seconds for _, seconds in memo.blobs.values()))
    assert again.write_s >= memo.charged_s


@pytest.mark.parametrize("tiered", [False, True])
def test_replayed_hit_rate_follows_the_budget(computed, tmp_path: Path, tiered: bool) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, _ = computed
    # a miss charged 1 s, as a real model's prefill dwarfs a load (the tiny model's takes as long as a load here)
    prefilled = [replace(p, one_shot_s=1.0) for p in prefilled]
    chunk = len(codecs.get("raw").encode(load_kv(prefilled[0], spec, prompts[0])[:CHUNK]))
    trace = zipf_trace(len(prompts), 80, 1.2, seed=0)
    rows = {}
    for contexts_fit in (2, 8):
        budget = Budget(contexts_fit * 4 * chunk, 4 * 4 * chunk) if tiered else Budget(contexts_fit * 4 * chunk)
        store = budget.open(tmp_path / str(contexts_fit))
        row = replay(trace, Replay(model, spec, store, codecs.get("raw"), CHUNK, prompts, prefilled))
        assert 0 < stored_bytes(store) <= budget.memory_bytes + (budget.disk_bytes or 0)
        store.close()
        rows[contexts_fit] = row
    assert rows[2]["hit_rate"] < rows[8]["hit_rate"] and rows[8]["ttft_mean_s"] < rows[2]["ttft_mean_s"]
    assert rows[8]["hit_rate"] <= 1 - len(set(trace)) / len(trace) + 1e-9  # every first request is a miss


def test_end_to_end_check_runs_contextcache_and_the_replay(computed) -> None:  # type: ignore[no-untyped-def]
    model, spec, prompts, prefilled, _ = computed
    out = validate(model, None, spec, float32_copy(model), [codecs.get("raw"), codecs.get("lossless")], prompts[1],
                   prefilled[1], CHUNK, repeats=2, log=lambda _: None)
    assert len(out["miss"]["contextcache_s"]) == 2 and out["miss"]["replay_s"] == prefilled[1].compute_s(0)
    assert [len(h["replay_s"]) for h in out["hits"]] == [2, 2]
    assert all(t > 0 for h in out["hits"] for t in h["contextcache_s"] + h["replay_s"])


def _row(setting: str, alpha: float, hit: float, ttft: float) -> dict[str, Any]:
    return {"setting": setting, "label": setting, "codec_id": setting, "budget": "memory:256MiB", "alpha": alpha,
            "hit_rate": hit, "partial_hit_rate": 0.0, "ttft_mean_s": ttft, "ttft_p95_s": ttft, "load_mean_s": 0.1,
            "compute_mean_s": ttft, "write_mean_s": 0.1, "bytes_stored": 10**8, "ratio": 1.0,
            "contexts_in_budget": 5.0, "quality": None}


def test_the_page_states_the_target_from_the_rows(tmp_path: Path) -> None:
    doc = {"rows": [_row("raw", 0.8, 0.1, 8.0), _row("transform:preset=32x", 0.8, 0.5, 2.0),
                    _row("raw", 1.2, 0.3, 6.0), _row("transform:preset=32x", 1.2, 0.8, 4.0)],
           "config": {"contexts": 2, "tokens": 16, "question_tokens": 3, "requests": 4, "seed": 0,
                      "chunk_tokens": 8, "alphas": [0.8, 1.2], "budgets": ["memory:256MiB", "memory:1GiB"],
                      "settings": ["raw", "transform:preset=32x"]},
           "compute": {"dtype": "float32", "one_shot_s": {"float32": 1.0}},
           "check": {"miss": {"contextcache_s": [1.0], "replay_s": 1.1},
                     "hits": [{"codec_id": "raw", "contextcache_s": [0.2], "replay_s": [0.21]}]},
           "machine": "test"}
    checks = target(doc, "memory:256MiB")
    assert [(t["alpha"], t["met"]) for t in checks] == [(0.8, True), (1.2, False)]
    assert checks[1]["hit_ratio"] == pytest.approx(0.8 / 0.3) and checks[1]["ttft_speedup"] == 1.5
    # rows of the adaptive loader are compared with the baseline's adaptive rows only
    adaptive = [_row("raw", 1.2, 0.3, 3.0) | {"loader": "adaptive"},
                _row("transform:preset=32x", 1.2, 0.8, 1.0) | {"loader": "adaptive"}]
    both = target(doc | {"rows": doc["rows"] + adaptive}, "memory:256MiB")
    assert [(t["loader"], t["alpha"], t["ttft_speedup"]) for t in both] == \
        [("adaptive", 1.2, 3.0), ("load", 0.8, 4.0), ("load", 1.2, 1.5)]
    (tmp_path / "c.json").write_text(json.dumps(doc))
    main(["--render", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"), "--plot",
          str(tmp_path / "c.png")])
    page = (tmp_path / "c.md").read_text()
    assert "**met**" in page and "**missed**" in page and "not re-run" in page and (tmp_path / "c.png").stat().st_size
    assert "Not run (the run was stopped before these arms): raw at memory:1GiB, alpha 0.8;" in page
    main(["--render", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "n.md"), "--note", "the runs relate"])
    assert "Note on the runs: the runs relate." in (tmp_path / "n.md").read_text()
    assert "in docs/results/codecs.json (" in page
    lever = tmp_path / "lever.json"
    lever.write_text(json.dumps({"rows": [{"codec_id": "transform:preset=32x", "ppl_increase_pct": 0.9,
                                           "kl_mean": 0.0097}]}))
    main(["--render", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "q.md"), "--quality", str(lever)])
    requoted = (tmp_path / "q.md").read_text()
    assert f"in {lever} (" in requoted and "+0.90% / 0.0097" in requoted and "not measured" in requoted


def test_runs_of_one_workload_merge_and_others_do_not() -> None:
    base = {"config": {"contexts": 2, "tokens": 16, "requests": 4, "seed": 0, "chunk_tokens": 8, "alphas": [0.8],
                       "budgets": ["memory:1MiB"], "settings": ["raw"]},
            "compute": {"prefill_s": [1.0, 2.0]}, "rows": [{"setting": "raw"}],
            "check": {"miss": {"replay_s": 1.0}, "hits": [{"codec_id": "raw"}]}, "command": "a"}
    other = base | {"config": base["config"] | {"settings": ["transform"], "alphas": [0.8, 1.2],
                                                "loaders": ["adaptive"]},
                    "rows": [{"setting": "transform"}], "command": "b",
                    "check": {"miss": {"replay_s": 1.1}, "hits": [{"codec_id": "t"}]}}
    doc = merge([base, other])
    assert [r["setting"] for r in doc["rows"]] == ["raw", "transform"] and len(doc["check"]["hits"]) == 2
    assert doc["config"]["settings"] == ["raw", "transform"] and doc["config"]["alphas"] == [0.8, 1.2]
    assert doc["config"]["loaders"] == ["load", "adaptive"]  # a run from before --loader loaded every chunk
    assert doc["command"] == "a` and `b" and merge([base]) is base
    arm = {"setting": "raw", "label": "raw", "loader": "load", "budget": "memory:1MiB", "alpha": 0.8}
    first, rerun = arm | {"hit_rate": 0.1}, arm | {"hit_rate": 0.2}
    kept = arm | {"setting": "fp8", "label": "fp8"}
    doc = merge([base | {"rows": [first, kept]}, other | {"rows": [rerun, arm | {"alpha": 1.2}]}])
    assert doc["rows"] == [rerun, kept, arm | {"alpha": 1.2}]  # a rerun replaces its arm's row, in its place
    with pytest.raises(ValueError):
        merge([base, base | {"compute": {"prefill_s": [1.0, 2.5]}}])
    with pytest.raises(ValueError):
        merge([base, base | {"config": base["config"] | {"requests": 5}}])


def test_rows_name_the_profile_of_a_calibrated_codec(tmp_path: Path) -> None:
    from kvpack.bench.capacity import label
    from kvpack.codecs import get
    from kvpack.codecs.transform.calibrate import calibrate_from_caches
    from test_calibrate import low_rank_caches

    caches = low_rank_caches()
    prof = calibrate_from_caches(caches, caches[0].spec, ratios=(4.0,), default_ratio=4.0, reference_tokens=256)
    codec = get("transform", profile=str(prof.save(tmp_path / "p.kvprof")), preset="4x")
    assert label(codec) == f"transform preset=4x [{prof.hash[:8]}]"
    assert label(get("raw")) == "raw" and label(get("kivi", bits=4)) == "kivi bits=4"
