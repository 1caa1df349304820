"""ContextCache on the real model: bit-exact reuse with the raw codec, stats, failures degrade to recompute."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import PROSE
from kvpack.context import ContextCache
from kvpack.inference import forward, new_cache
from kvpack.kv import KVCache
from kvpack.loader import LoaderConfig
from kvpack.prefix import RequestStats
from kvpack.store import MemoryStore

pytestmark = pytest.mark.model
CHUNK = 32
GEN = {"max_new_tokens": 12, "do_sample": False}
EXACT = LoaderConfig(compute_front=False, estimates_path="")  # load every stored chunk: comparable outputs


def prompt_ids(tokenizer: Any, n: int) -> torch.Tensor:
    ids = tokenizer(PROSE * 12, return_tensors="pt").input_ids[0]
    assert ids.numel() >= n
    return ids[:n]


def plain_split_generate(model: Any, ids: torch.Tensor, *splits: int) -> torch.Tensor:
    """Plain transformers: prefill up to each split in turn, then generate (the reference for a prefix cache)."""
    cache = new_cache(model)
    for start, stop in zip((0, *splits), splits, strict=False):
        forward(model, ids[start:stop], cache)
    with torch.no_grad():
        return model.generate(ids[None], cache=cache, attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                              **GEN)


def test_raw_reuse_is_bit_exact_and_matches_split_prefill(smollm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, spec = smollm
    ids = prompt_ids(tokenizer, 100)
    with ContextCache(model, tokenizer, store=MemoryStore(), codec="raw", chunk_tokens=CHUNK, spec=spec,
                      loader=EXACT) as cc:
        assert cc.lookup(ids) == 0
        warm = cc.prefill(ids[:64])
        assert warm.chunks_written == 2
        cc.flush()
        assert cc.lookup(ids) == 64
        result = cc.generate(ids, **GEN)
        stats = result.stats
        assert (stats.tokens_hit, stats.chunks_hit, stats.prompt_tokens) == (64, 2, 100)
        assert stats.bytes_read > 64 * spec.elements_per_token * 2 and stats.ttft_s > 0
        # the loaded cache is bit-identical to what the model produced for those tokens
        loaded = cc.prefixes.load(ids[:64], RequestStats())
        assert loaded is not None
        cache = new_cache(model)
        forward(model, ids[:64], cache)
        assert loaded.equal(KVCache.from_hf(cache, spec, token_ids=ids[:64]))
        cc.flush()
        assert cc.lookup(ids) == 96  # generate wrote the prompt's third full chunk back
    assert torch.equal(result.sequences, plain_split_generate(model, ids, 64))


def test_corrupted_entry_is_computed_and_restored(smollm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, spec = smollm
    ids = prompt_ids(tokenizer, 70)
    store = MemoryStore()
    with ContextCache(model, tokenizer, store=store, codec="raw", chunk_tokens=CHUNK, spec=spec,
                      loader=EXACT) as cc:
        cc.prefill(ids)
        cc.flush()
        second = cc.keys.keys(ids)[1]
        data = bytearray(store.get(second) or b"")
        data[-5] ^= 0xFF
        store._write(second, bytes(data))  # damage the stored bytes behind the store's back
        result = cc.generate(ids, **GEN)  # the store finds the checksum broken: a miss for that chunk
        stats = result.stats
        assert (stats.tokens_hit, stats.chunks_loaded, stats.failed_chunks) == (2 * CHUNK, 1, [1])
        assert store.stats().corrupt_entries == 1
        cc.flush()
        assert cc.generate(ids, **GEN).stats.failed_chunks == []  # the computed chunk was stored again
    # chunk 0 loaded, chunk 1 computed on top of it, the rest of the prompt prefilled
    assert torch.equal(result.sequences, plain_split_generate(model, ids, CHUNK, 2 * CHUNK))


def test_namespaces_isolate(smollm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, spec = smollm
    ids = prompt_ids(tokenizer, 40)
    store = MemoryStore()
    with ContextCache(model, tokenizer, store=store, chunk_tokens=CHUNK, namespace="a", spec=spec) as a:
        a.prefill(ids)
    with ContextCache(model, tokenizer, store=store, chunk_tokens=CHUNK, namespace="b", spec=spec) as b:
        assert b.lookup(ids) == 0
