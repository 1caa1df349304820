"""The loader: planning from injected estimates, pipelined load equal to a sequential one, compute from the front,
store failures mid-stream, estimates that survive a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kvpack import codecs
from kvpack.context import ContextCache
from kvpack.inference import forward, new_cache
from kvpack.keys import KeySpace
from kvpack.kv import KVCache
from kvpack.loader import MAX_ESTIMATES, Estimates, Loader, LoaderConfig, Plan
from kvpack.spec import ModelSpec
from kvpack.store import MemoryStore
from test_families import prompt, tiny

CHUNK = 8


class FlakyStore(MemoryStore):
    """A real memory store whose backend starts failing after ``ok_reads`` reads (an outage mid-stream)."""

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (ConnectionError,)

    def __init__(self, ok_reads: int) -> None:
        super().__init__()
        self.ok_reads = ok_reads

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        if self.ok_reads <= 0:
            raise ConnectionError("backend went away")
        self.ok_reads -= 1
        return super()._read_many(keys)


class SlowStore(MemoryStore):
    """A real memory store behind a slow link: every read waits ``delay_s`` (an emulated transport)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        time.sleep(self.delay_s)
        return super()._read_many(keys)


def stored(model: Any, codec: str, store: MemoryStore | None = None) -> tuple[ModelSpec, MemoryStore, Any,
                                                                            KVCache, torch.Tensor, list[str]]:
    """The prompt's KV (one prefill), stored chunk by chunk with ``codec``."""
    spec = ModelSpec.from_model(model)
    ids = prompt()
    cache = new_cache(model)
    forward(model, ids, cache)
    full = (len(ids) // CHUNK) * CHUNK
    kv = KVCache.from_hf(cache, spec, token_ids=ids, span=(0, full))
    store = store if store is not None else MemoryStore()
    the_codec = codecs.get(codec)
    keys = KeySpace(namespace="t", model_fingerprint=spec.fingerprint, codec_id=the_codec.codec_id,
                    chunk_tokens=CHUNK).keys(ids[:full])
    for key, part in zip(keys, kv.chunks(CHUNK), strict=True):
        store.put(key, the_codec.encode(part))
    return spec, store, the_codec, kv, ids, keys


def loader(model: Any, spec: ModelSpec, store: MemoryStore, codec: Any, **config: Any) -> Loader:
    return Loader(model, spec, store, codec, CHUNK, LoaderConfig(estimates_path="", **config))


def test_plan_from_injected_estimates() -> None:
    model = tiny("llama")
    spec = ModelSpec.from_model(model)
    load = loader(model, spec, MemoryStore(), codecs.get("raw"))
    assert not load.plan(4).compute_front  # nothing measured yet: load only, and measure
    fp16 = 2 * CHUNK * spec.elements_per_token
    est = load.estimates
    est.update(load.names.chunk_bytes, fp16)
    est.update(load.names.decode, fp16 * 1000.0)  # decode: 1 ms per chunk
    est.update(load.names.prefill, CHUNK / 0.01)  # compute: 10 ms per chunk
    est.update(load.names.fetch, fp16 * 1000.0)  # a fast link: 1 ms per chunk
    plan = load.plan(4)
    assert not plan.compute_front and plan.predicted_load_s == pytest.approx(0.004)
    assert plan.predicted_chunk_compute_s == pytest.approx(0.01)
    slow = Estimates(None, alpha=1.0)  # alpha 1: the last sample is the estimate
    load.estimates = slow
    for name, value in est._values.items():
        slow.update(name, value)
    slow.update(load.names.fetch, fp16 * 10.0)  # a slow link: 100 ms per chunk
    assert load.plan(4).compute_front and load.plan(4).predicted_load_s == pytest.approx(0.04)  # computing all 4
    assert not Loader(model, spec, MemoryStore(), codecs.get("raw"), CHUNK,
                      LoaderConfig(compute_front=False, estimates_path="")).plan(4).compute_front


def test_plan_to_recompute_when_one_prefill_is_sooner_than_any_load() -> None:
    model = tiny("llama")
    spec = ModelSpec.from_model(model)
    load = loader(model, spec, MemoryStore(), codecs.get("raw"))
    load.estimates = est = Estimates(None, alpha=1.0)
    fp16 = 2 * CHUNK * spec.elements_per_token
    est.update(load.names.chunk_bytes, fp16)
    est.update(load.names.decode, fp16 * 1000.0)  # decode: 1 ms per chunk
    est.update(load.names.fetch, fp16 * 10.0)  # a slow link: 100 ms per chunk
    est.update(load.names.prefill, CHUNK / 0.01)  # one call: 10 ms per chunk's worth of tokens
    est.update(load.names.chunk_prefill, 0.05)  # the front, chunk by chunk: 50 ms a chunk
    plan = load.plan(4, allow_recompute=True)  # 40 ms in one call against >= 100 ms for any load
    assert plan.recompute and plan.levels == ("recompute",) * 4 and plan.predicted_ttft_s == pytest.approx(0.04)
    assert not load.plan(4).recompute  # a caller that cannot prefill the prompt itself gets a load
    assert load.plan(4).predicted_chunk_compute_s == pytest.approx(0.05)  # the front's own measurement
    assert load.plan(4, ttft_slo=0.05, allow_recompute=True).recompute  # exact and in time
    unknown = Loader(model, spec, MemoryStore(), codecs.get("raw"), CHUNK, LoaderConfig(estimates_path=""))
    unknown.estimates.update(unknown.names.prefill, CHUNK / 0.01)
    assert not unknown.plan(4, allow_recompute=True).recompute  # no load measured yet: load, and measure
    first = unknown.plan(4)  # a new store, with this model's prefill known: still load only (no front racing it)
    assert not first.compute_front and first.levels == (load.levels[0].name,) * 4
    assert not load.plan(4, ttft_slo=0.03, allow_recompute=True).recompute  # too slow for the target
    est.update(load.names.fetch, fp16 * 1e6)  # a fast link: loading is sooner
    assert not load.plan(4, allow_recompute=True).recompute
    only_load = Loader(model, spec, MemoryStore(), codecs.get("raw"), CHUNK,
                       LoaderConfig(compute_front=False, estimates_path=""))
    only_load.estimates = est
    est.update(load.names.fetch, fp16 * 10.0)
    assert not only_load.plan(4, allow_recompute=True).recompute  # load-only never recomputes


def test_a_recompute_plan_reads_nothing_and_gives_the_plain_output() -> None:
    model = tiny("llama", torch.float32)
    ids = prompt()
    store = SlowStore(delay_s=0.2)
    with ContextCache(model, None, store=store, codec="raw", chunk_tokens=CHUNK,
                      loader=LoaderConfig(estimates_path="")) as cc:
        cc.prefill(ids)
        cc.flush()
        chunks = (len(ids) - 1) // CHUNK  # the stored run a request loads (its last token is always computed)
        loader_ = cc.prefixes.loader
        loader_.observe_prefill(len(ids), 0.001)  # one call of the whole prompt: 1 ms
        loader_.estimates.update(loader_.names.fetch, 1000.0)  # the link: 1 kB/s
        loader_.estimates.update(loader_.names.chunk_prefill, 0.05)  # the front: 50 ms a chunk
        loader_.estimates.update(loader_.names.decode, 1e9)  # (stored sizes are known from the writes)
        first = len(store.get(cc.keys.keys(ids)[0]) or b"")
        read = store.stats().bytes_read
        result = cc.generate(ids, max_new_tokens=3, do_sample=False)
        stats = result.stats
        assert stats.plan is not None and stats.plan.recompute and stats.chunk_levels == ["recomputed"] * chunks
        assert stats.tokens_hit == 0 and stats.chunks_hit == chunks and stats.bytes_read == 0
        assert stats.chunks_written == len(ids) // CHUNK - chunks  # only what was not stored
        cc.flush()
        # the request read nothing; after it, the writer re-measured loading on the first chunk (and only that)
        assert store.stats().bytes_read == read + first
        assert loader_.estimates.get(loader_.names.fetch) != 1000.0  # the link's estimate was measured again
        plain = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                               max_new_tokens=3, do_sample=False)
    assert torch.equal(result.sequences, plain)


def test_recompute_plans_are_followed_by_probes_ever_further_apart() -> None:
    model = tiny("llama")
    load = loader(model, ModelSpec.from_model(model), MemoryStore(), codecs.get("raw"))
    due = [n for n in range(1, 300) if load.recomputed()]
    assert due == [1, 3, 7, 15, 31, 63, 127, 191, 255]  # gaps 1, 2, 4, ... up to MAX_PROBE_GAP = 64
    spec, store, the_codec, _, ids, keys = stored(model, "raw")
    load = loader(model, spec, store, the_codec)
    assert [load.recomputed() for _ in range(3)] == [True, False, True]
    load.load(ids, keys, len(keys))  # a load measures: the next recompute plan is probed at once
    assert load.recomputed()


def test_a_level_s_first_decode_is_not_a_sample_and_a_probe_warms_up_first() -> None:
    model = tiny("llama")
    spec, store, the_codec, _, ids, keys = stored(model, "raw")
    load = loader(model, spec, store, the_codec)
    load.load(ids, keys[:1], 1)  # one chunk: the level's first decode pays one-time setup, so no estimate
    assert load.estimates.get(load.names.decode) is None and load.estimates.get(load.names.fetch)
    load.load(ids, keys[:1], 1)
    assert load.estimates.get(load.names.decode)
    cold = loader(model, spec, store, the_codec)
    assert cold.probe(ids, keys) == 1 and cold.estimates.get(cold.names.decode)  # decoded twice, timed once
    assert cold.probe(ids, keys, stored=[[False] * len(keys)]) == 0  # chunk 0 not stored: nothing to measure
    store._write(keys[0], b"garbage")  # damaged behind the store's back: read, not measured
    assert loader(model, spec, store, the_codec).probe(ids, keys) == 0


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_pipelined_load_is_bit_identical_to_sequential_decode(codec: str) -> None:
    model = tiny("gemma2")
    spec, store, the_codec, kv, ids, keys = stored(model, codec)
    events: list[tuple[str, int]] = []
    out, report = loader(model, spec, store, the_codec, prefetch=2).load(ids, keys, len(keys),
                                                                        on_chunk=lambda k, i: events.append((k, i)))
    assert out.equal(kv) and report.chunks_loaded == len(keys) and report.chunks_computed == 0
    assert events == [("loaded", i) for i in reversed(range(len(keys)))]  # from the back
    assert report.bytes_read == sum(len(store.get(k) or b"") for k in keys)


def test_compute_front_meets_the_loader() -> None:
    model = tiny("qwen2-sliding", torch.float32)
    spec, store, the_codec, kv, ids, keys = stored(model, "raw", SlowStore(delay_s=0.05))
    load = loader(model, spec, store, the_codec, prefetch=1)
    load.plan = lambda chunks, *_: Plan(chunks, True, None, None)  # type: ignore[method-assign]
    out, report = load.load(ids, keys, len(keys))
    k = report.chunks_computed
    assert report.chunks_loaded + k == len(keys) and not report.failed_chunks
    assert k >= 1 and report.chunks_loaded >= 1  # 50 ms a chunk over the link: both sides get some
    reference = new_cache(model)  # the front as the loader computes it: chunk-sized steps from the start
    for j in range(k):
        forward(model, ids[j * CHUNK : (j + 1) * CHUNK], reference)
    assert out[: k * CHUNK].equal(KVCache.from_hf(reference, spec, token_ids=ids[: k * CHUNK]))
    assert out[k * CHUNK :].equal(kv[k * CHUNK :])  # the loaded back, bit for bit


def test_outage_mid_stream_computes_the_rest_and_output_is_correct() -> None:
    model = tiny("llama", torch.float32)
    spec, store, the_codec, kv, ids, keys = stored(model, "raw", FlakyStore(ok_reads=10**6))
    store.ok_reads = 2  # two chunks come back, then the backend fails
    with pytest.warns(Warning, match="failed"):
        out, report = loader(model, spec, store, the_codec, prefetch=1).load(ids, keys, len(keys))
    assert report.chunks_loaded == 2 and sorted(report.failed_chunks) == list(range(len(keys) - 2))
    assert report.chunks_computed == len(keys) - 2 and store.stats().errors > 0
    assert out[(len(keys) - 2) * CHUNK :].equal(kv[(len(keys) - 2) * CHUNK :])  # the loaded back is exact
    assert torch.allclose(out.data.float(), kv.data.float(), atol=1e-4)  # the computed rest is the same KV


def test_corrupted_chunk_is_a_hole_filled_on_top_of_the_loaded_prefix() -> None:
    model = tiny("mistral", torch.float32)
    spec, store, the_codec, kv, ids, keys = stored(model, "lossless")
    data = bytearray(store.get(keys[1]) or b"")
    data[-3] ^= 0x10
    store._write(keys[1], bytes(data))  # damaged behind the store's back
    out, report = loader(model, spec, store, the_codec).load(ids, keys, len(keys))
    assert report.failed_chunks == [1] and report.chunks_computed == 1 and report.chunks_loaded == len(keys) - 1
    assert out[:CHUNK].equal(kv[:CHUNK]) and out[2 * CHUNK :].equal(kv[2 * CHUNK :])
    assert torch.allclose(out.data.float(), kv.data.float(), atol=1e-4)


def test_estimates_survive_a_restart_and_bad_files_are_ignored(tmp_path: Path) -> None:
    model = tiny("llama")
    spec, store, the_codec, _, ids, keys = stored(model, "raw")
    path = tmp_path / "estimates.json"
    first = Loader(model, spec, store, the_codec, CHUNK, LoaderConfig(estimates_path=str(path)))
    first.load(ids, keys, len(keys))
    assert path.exists() and first.estimates.get(first.names.decode)
    again = Loader(model, spec, store, the_codec, CHUNK, LoaderConfig(estimates_path=str(path)))
    assert again.estimates.get(again.names.decode) == first.estimates.get(first.names.decode)
    many = Estimates(path, alpha=0.5)
    for i in range(MAX_ESTIMATES + 10):  # e.g. a new temporary store per run: only the most recent are kept
        many.update(f"fetch_Bps/store{i}", 1.0 + i)
    many.update("fetch_Bps/store10", 1.0)  # the oldest kept, updated again: now the most recent
    many.update("fetch_Bps/new", 1.0)  # so this one pushes out store11 instead
    many.save()
    kept = Estimates(path, alpha=0.5)
    assert len(kept._values) == MAX_ESTIMATES and kept.get("fetch_Bps/store10") == 6.0 and kept.get("fetch_Bps/new")
    assert kept.get("fetch_Bps/store9") is None and kept.get("fetch_Bps/store11") is None
    path.write_text("{not json")
    with pytest.warns(Warning, match="unreadable"):
        fresh = Loader(model, spec, store, the_codec, CHUNK, LoaderConfig(estimates_path=str(path)))
    assert fresh.estimates.get(fresh.names.decode) is None


def test_context_cache_reports_the_load_and_repairs_failed_chunks() -> None:
    model = tiny("llama", torch.float32)
    ids = prompt()
    store = MemoryStore()
    with ContextCache(model, None, store=store, codec="raw", chunk_tokens=CHUNK,
                      loader=LoaderConfig(compute_front=False, estimates_path="")) as cc:
        cc.prefill(ids)
        cc.flush()
        victim = cc.keys.keys(ids)[2]
        store.delete(victim)
        assert cc.lookup(ids) == 2 * CHUNK  # the stored run ends at the missing chunk
        store.put(victim, store.get(cc.keys.keys(ids)[3]) or b"")  # a valid container, for other tokens
        with pytest.warns(UserWarning, match="chunk 2 could not be decoded"):
            result = cc.generate(ids, max_new_tokens=3, do_sample=False)
        stats = result.stats
        assert stats.failed_chunks == [2] and stats.chunks_computed == 1
        assert stats.chunks_loaded == stats.chunks_hit - 1 and stats.plan is not None
        cc.flush()
        again = cc.generate(ids, max_new_tokens=3, do_sample=False)
    assert again.stats.failed_chunks == [] and torch.equal(again.sequences, result.sequences)


class BrokenStore(MemoryStore):
    """A real memory store with a bug: reads raise an error that is not a backend failure."""

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        raise RuntimeError("a bug, not an outage")


def test_an_unexpected_loader_error_is_raised_not_served_as_data() -> None:
    model = tiny("llama")
    spec, store, the_codec, _, ids, keys = stored(model, "raw", BrokenStore())
    with pytest.raises(RuntimeError, match="a bug"):
        loader(model, spec, store, the_codec).load(ids, keys, len(keys))
