"""Quality levels in the loader: the planner on injected costs, progressive prefixes read by range, codecs stored as
levels, re-planning when the link slows down mid-request, and a store that dies mid-stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kvpack import codecs
from kvpack.codecs.transform import Transform
from kvpack.codecs.transform.calibrate import calibrate_from_caches
from kvpack.context import ContextCache
from kvpack.inference import forward, new_cache
from kvpack.keys import KeySpace
from kvpack.kv import KVCache
from kvpack.loader import Choice, Cost, Loader, LoaderConfig, choose, codec_label, levels_of, predict
from kvpack.spec import ModelSpec
from kvpack.store import MemoryStore
from test_families import tiny

CHUNK = 8
TOKENS = 64  # 8 chunks


# ------------------------------------------------------------------------------------------------ the planner
FAST, MID, SLOW = Cost(0.010, 0.002), Cost(0.004, 0.002), Cost(0.001, 0.002)  # fetch, decode seconds per chunk


def test_no_target_loads_the_best_level_and_meets_where_it_pays() -> None:
    assert choose(4, [None], None) == Choice(0, (0, 0, 0, 0), None, None)  # nothing known: load all, and measure
    assert choose(4, [FAST, SLOW], compute_s=1.0) == Choice(0, (0,) * 4, 0.04, None)  # computing never pays
    c = choose(4, [Cost(0.1, 0.001), SLOW], compute_s=0.05)  # a slow link: the front takes some chunks
    assert c.front == 3 and c.levels == (0,) and c.seconds == pytest.approx(max(0.1, 0.15 + 0.001))
    assert choose(4, [Cost(0.1, 0.001)], compute_s=0.05, front=False).front == 0


def test_a_target_picks_the_best_quality_that_meets_it() -> None:
    costs = [FAST, MID, SLOW]
    assert choose(4, costs, None, budget=1.0) == Choice(0, (0,) * 4, 0.04, True)  # met at the best level
    c = choose(4, costs, None, budget=0.031)  # two chunks must go one level down
    assert c.levels == (1, 1, 0, 0) and c.meets and c.seconds == pytest.approx(0.028)
    assert sum(c.levels) == min(sum(levels) for levels in _all_levels(4, 3)
                                if (predict(0, levels, costs, None) or 1.0) <= 0.031)
    c = choose(4, costs, None, budget=0.0001)  # impossible: the fastest plan, said so, losing no quality for nothing
    assert c == Choice(0, (2, 2, 2, 1), pytest.approx(0.008), False)  # decode-bound at 8 ms: one chunk stays higher
    assert choose(4, [None, MID, SLOW], None, budget=1.0).levels == (1,) * 4  # unknown costs are never planned on
    c = choose(4, costs, compute_s=0.003, budget=0.0105)  # computing (exact) beats lowering the quality
    assert c.meets and c.front >= 1 and sum(c.levels) <= sum(choose(4, costs, None, budget=0.0105).levels)


def _all_levels(n: int, k: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for _ in range(n):
        out = [(*p, j) for p in out for j in range(k)]
    return out


def test_predict_is_one_link_and_one_cpu() -> None:
    assert predict(0, [0, 0], [Cost(0.3, 0.1)], None) == pytest.approx(0.6)  # link-bound
    assert predict(2, [0], [Cost(0.3, 0.1)], 0.5) == pytest.approx(1.1)  # the CPU computes 2 and decodes 1
    assert predict(1, [0], [Cost(0.3, 0.1)], None) is None


# ------------------------------------------------------------------------------------------ real loads, tiny model
class FlakyStore(MemoryStore):
    """A memory store whose backend fails after ``ok_reads`` reads (whole or ranged) and can slow down."""

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__()
        self.ok_reads = 10**6
        self.ranges: list[tuple[int, int]] = []

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        self._tick()
        return super()._read_many(keys)

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        self._tick()
        self.ranges.append((start, stop))
        return super()._read_range(key, start, stop)

    def _tick(self) -> None:
        if self.ok_reads <= 0:
            raise ConnectionError("backend went away")
        self.ok_reads -= 1

    def inner_get(self, key: str) -> bytes:
        """The entry as stored, past the outage."""
        return super()._read_many([key])[0] or b""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny float32 Llama, a transform profile calibrated on its caches, and a prompt's KV."""
    model = tiny("llama", torch.float32)
    spec = ModelSpec.from_model(model)
    gen = torch.Generator().manual_seed(3)
    caches = []
    for _ in range(3):
        cache = new_cache(model)
        ids = torch.randint(3, 96, (96,), generator=gen)
        forward(model, ids, cache)
        caches.append(KVCache.from_hf(cache, spec, token_ids=ids))
    profile = calibrate_from_caches(caches, spec, ratios=(2.0, 4.0), default_ratio=2.0, reference_tokens=256)
    path = profile.save(tmp_path_factory.mktemp("prof") / "t.kvprof")
    ids = torch.randint(3, 96, (TOKENS + 3,), generator=torch.Generator().manual_seed(9))
    cache = new_cache(model)
    forward(model, ids, cache)
    kv = KVCache.from_hf(cache, spec, token_ids=ids, span=(0, TOKENS))
    return {"model": model, "spec": spec, "profile": Path(path), "ids": ids, "kv": kv}


def _store(setup: dict[str, Any], chosen: list[Any], store: MemoryStore) -> list[list[str]]:
    keys = []
    for codec in chosen:
        ks = KeySpace(namespace="t", model_fingerprint=setup["spec"].fingerprint, codec_id=codec.codec_id,
                      chunk_tokens=CHUNK).keys(setup["ids"][:TOKENS])
        for key, part in zip(ks, setup["kv"].chunks(CHUNK), strict=True):
            store.put(key, codec.encode(part))
        keys.append(ks)
    return keys


def _loader(setup: dict[str, Any], chosen: list[Any], store: MemoryStore, **config: Any) -> Loader:
    return Loader(setup["model"], setup["spec"], store, chosen, CHUNK,
                  LoaderConfig(**{"estimates_path": "", "compute_front": False, "prefetch": 2, "ewma": 1.0} | config))


def _progressive(setup: dict[str, Any], store: MemoryStore, **config: Any
                 ) -> tuple[Transform, str, list[list[str]], Loader]:
    """A three-layer progressive codec, its name, the keys of its chunks stored in ``store``, and a loader of them."""
    codec = Transform(profile=str(setup["profile"]), layers=3)
    keys = _store(setup, [codec], store)
    return codec, codec_label(codec), keys, _loader(setup, [codec], store, **config)


def _force(loader: Loader, level: int) -> None:
    """Make every level but ``level`` look slow (1000 s a chunk: no re-plan can afford one), so that a tight target
    picks ``level`` for every chunk."""
    for j, names in enumerate(loader.level_names):
        loader.estimates.update(names.fetch, 1e9)
        loader.estimates.update(names.chunk_bytes, 1e3 if j == level else 1e12)
        loader.estimates.update(names.decode, 1e12)


def test_a_progressive_level_reads_only_its_prefix_and_equals_a_sequential_decode(setup: dict[str, Any]) -> None:
    store = FlakyStore()
    codec, name, keys, loader = _progressive(setup, store)
    assert [lv.name for lv in loader.levels] == [f"{name} 3/3", f"{name} 2/3", f"{name} 1/3"]
    _force(loader, 2)  # one layer of three
    out, report = loader.load(setup["ids"], keys, len(keys[0]), ttft_slo=0.5)
    assert report.chunk_levels == [f"{name} 1/3"] * len(keys[0]) and report.chunks_loaded == len(keys[0])
    blobs = [store.get(k) or b"" for k in keys[0]]
    for i, blob in enumerate(blobs):  # bit-identical to decoding exactly the first layer's bytes, one by one
        want = codec.decode_prefix(blob, codec.layer_ends(blob)[0])
        assert torch.equal(out[i * CHUNK : (i + 1) * CHUNK].data, want.data)
    assert report.bytes_read == sum(codec.layer_ends(b)[0] for b in blobs) < sum(map(len, blobs))
    assert max(stop for _, stop in store.ranges) < max(map(len, blobs))  # never the whole entry
    full, _ = _loader(setup, [codec], store).load(setup["ids"], keys, len(keys[0]))  # no target: the best level
    assert torch.equal(full.data, torch.cat([codec.decode(b).data for b in blobs], dim=3))
    err = [float((x.data.float() - setup["kv"].data.float()).pow(2).mean()) for x in (out, full)]
    assert err[0] > err[1]  # fewer layers, lower quality


def test_codecs_as_levels_through_context_cache(setup: dict[str, Any]) -> None:
    store = MemoryStore()
    model, spec, ids = setup["model"], setup["spec"], setup["ids"]
    loader = LoaderConfig(estimates_path="", compute_front=False, ewma=1.0)  # an estimate is the last sample
    with ContextCache(model, None, store=store, codec="lossless", levels=("fp8", "kivi"), spec=spec,
                      chunk_tokens=CHUNK, loader=loader) as cc:
        best_name, fp8, kivi = (codec_label(c) for c in cc.prefixes.codecs)
        cc.prefixes.save(setup["kv"], ids)
        assert cc.lookup(ids) == TOKENS
        best = cc.generate(ids, max_new_tokens=1, do_sample=False).stats
        assert best.chunks_by_level == {best_name: TOKENS // CHUNK}  # no target: the best level
        _force(cc.prefixes.loader, 2)
        low = cc.generate(ids, max_new_tokens=1, do_sample=False, ttft_slo=2.0).stats
        assert low.chunks_by_level == {kivi: TOKENS // CHUNK} and low.plan and low.plan.meets_slo
        for key in cc.prefixes.spaces[2].keys(ids[:TOKENS])[:3]:  # kivi lost three chunks: the next best level
            store.delete(key)
        mixed = cc.generate(ids, max_new_tokens=1, do_sample=False, ttft_slo=2.0).stats
        assert mixed.chunk_levels == [fp8] * 3 + [kivi] * 5
    assert [lv.name for lv in levels_of([codecs.get("fp8"), codecs.get("kivi")])] == [fp8, kivi]


class SlowingStore(FlakyStore):
    """Reads take ``delay_s`` each after the first ``fast`` reads (the link slowed down mid-request)."""

    def __init__(self, fast: int, delay_s: float) -> None:
        super().__init__()
        self.fast, self.delay_s = fast, delay_s

    def _tick(self) -> None:
        super()._tick()
        if self.fast <= 0:
            import time

            time.sleep(self.delay_s)
        self.fast -= 1


def test_chunks_arriving_late_make_the_loader_lower_the_rest(setup: dict[str, Any]) -> None:
    store = SlowingStore(fast=10**6, delay_s=0.0)
    _, name, keys, loader = _progressive(setup, store, prefetch=1)
    loader.load(setup["ids"], keys, len(keys[0]))  # measure every level's size (headers) and the fast link
    for names in loader.level_names:
        loader.estimates.update(names.decode, 1e12)  # decoding is free here: only the link matters
    plan = loader.plan(len(keys[0]), ttft_slo=1.0)
    assert plan.meets_slo and set(plan.levels) == {f"{name} 3/3"}
    store.fast, store.delay_s = 2, 0.05  # two chunks as planned, then 50 ms a read
    _, report = loader.load(setup["ids"], keys, len(keys[0]), ttft_slo=0.25)
    assert report.replans >= 1 and report.chunks_loaded == len(keys[0])
    levels = report.chunk_levels
    assert levels[-1] == f"{name} 3/3" and levels[0] != f"{name} 3/3"  # the first chunks went down a level
    assert f"{name} 3/3" not in levels[: len(levels) // 2]


def test_store_dying_mid_stream_of_ranged_reads_still_gives_the_prefix(setup: dict[str, Any]) -> None:
    store = FlakyStore()
    codec, name, keys, loader = _progressive(setup, store)
    _force(loader, 1)  # two layers of three
    n = len(keys[0])
    store.ok_reads = 6  # a few chunks come back (by one or two range reads each), then the backend fails
    with pytest.warns(Warning, match="failed"):
        out, report = loader.load(setup["ids"], keys, n, ttft_slo=0.5)
    h = len(report.failed_chunks)
    assert 0 < h < n and sorted(report.failed_chunks) == list(range(h))  # loaded from the back, then the outage
    assert report.chunk_levels == ["computed"] * h + [f"{name} 2/3"] * (n - h)
    for i in range(h, n):  # what loaded is the level's decode, bit for bit
        blob = store.inner_get(keys[0][i])
        assert torch.equal(out[i * CHUNK : (i + 1) * CHUNK].data,
                           codec.decode_prefix(blob, codec.layer_ends(blob)[1]).data)
    # the holes are the model's own KV for those tokens (computed from the start, float32)
    assert torch.allclose(out.data[:, :, :, : h * CHUNK], setup["kv"].data[:, :, :, : h * CHUNK], atol=1e-4)


def test_the_demo_shows_chunk_choices_as_runs() -> None:
    from kvpack.demo import chunk_runs

    assert chunk_runs(["computed", "computed", "lossless", "fp8", "fp8"]) == "0-1 computed, 2 lossless, 3-4 fp8"
    assert chunk_runs([]) == "-"
