"""The transformers-level API (load_prefix/save_prefix), batched lookup, and ContextCache under concurrent requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import kvpack
from kvpack.inference import forward, new_cache
from kvpack.loader import LoaderConfig
from kvpack.store import MemoryStore
from test_families import BASE, EXACT, prompt, tiny

CHUNK = 8


class CountingStore(MemoryStore):
    """A real memory store that counts the batched existence checks it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.exists_calls = 0

    def _exists_many(self, keys: list[str]) -> list[bool]:
        self.exists_calls += 1
        return super()._exists_many(keys)


def test_save_then_load_prefix_with_model_generate() -> None:
    model = tiny("gemma2")
    ids = prompt()
    store = MemoryStore()
    gen = {"max_new_tokens": 6, "do_sample": False}
    past, hit = kvpack.load_prefix(store, model, ids, codec="lossless", chunk_tokens=CHUNK)
    assert hit == 0
    with torch.no_grad():
        cold = model.generate(ids[None], cache=past, **gen)
    assert kvpack.save_prefix(store, model, ids, past, codec="lossless", chunk_tokens=CHUNK) == len(ids) // CHUNK
    assert kvpack.save_prefix(store, model, ids, past, codec="lossless", chunk_tokens=CHUNK,
                              skip_tokens=len(ids) // CHUNK * CHUNK) == 0
    past, hit = kvpack.load_prefix(store, model, ids, codec="lossless", chunk_tokens=CHUNK)
    assert hit == (len(ids) - 1) // CHUNK * CHUNK  # one token is always left for the model
    with torch.no_grad():
        warm = model.generate(ids[None], cache=past, **gen)
        plain = new_cache(model)
        forward(model, ids[:hit], plain)
        split = model.generate(ids[None], cache=plain, **gen)
    assert torch.equal(warm, split)
    assert torch.equal(warm[0, : len(ids)], cold[0, : len(ids)])
    _, hit = kvpack.load_prefix(store, model, ids, codec="raw", chunk_tokens=CHUNK)  # another codec: other keys
    assert hit == 0


def test_lookup_asks_the_store_once() -> None:
    model = tiny("llama")
    store = CountingStore()
    ids = prompt()
    with kvpack.ContextCache(model, None, store=store, chunk_tokens=CHUNK) as cc:
        cc.prefill(ids[:24])
        cc.flush()
        store.exists_calls = 0
        assert cc.lookup(ids) == 24
        assert store.exists_calls == 1


def test_concurrent_requests_equal_sequential_runs() -> None:
    model = tiny("qwen2-sliding")
    vocab = BASE["vocab_size"]
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(3, vocab, (24,), generator=gen)
    # distinct tails, so every prompt hits exactly the shared chunks whatever order the requests run in
    prompts = [torch.cat([shared, torch.randint(3, vocab, (n,), generator=gen)]) for n in (5, 9, 13, 17, 11, 20)]
    prompts += [torch.randint(3, vocab, (30,), generator=gen) for _ in range(2)]  # misses
    kwargs = {"max_new_tokens": 5, "do_sample": False}

    def run(cc: kvpack.ContextCache, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        result = cc.generate(ids, attention_mask=torch.ones(1, len(ids), dtype=torch.int64), **kwargs)
        return result.sequences, result.stats.tokens_hit

    with kvpack.ContextCache(model, None, store=MemoryStore(), codec="lossless", chunk_tokens=CHUNK,
                             loader=EXACT) as cc:
        cc.prefill(shared)
        cc.flush()
        sequential = [run(cc, ids) for ids in prompts]
    with kvpack.ContextCache(model, None, store=MemoryStore(), codec="lossless", chunk_tokens=CHUNK,
                             loader=EXACT) as cc:
        cc.prefill(shared)
        cc.flush()
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(lambda ids: run(cc, ids), prompts))  # write-backs race with decodes
    assert [hit for _, hit in sequential] == [24] * 6 + [0, 0]
    for (seq, hit), (con, con_hit) in zip(sequential, concurrent, strict=True):
        assert torch.equal(seq, con) and con_hit == hit


def test_warm_up_codes_one_chunk_per_codec_and_touches_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny("llama")
    store = MemoryStore()
    calls: list[str] = []
    for label, cls in (("Lossless", kvpack.Lossless), ("Kivi", kvpack.Kivi)):
        for method in ("encode", "decode"):
            original = getattr(cls, method)

            def spy(self: Any, *args: Any, _original: Any = original, _name: str = f"{label}.{method}",
                    **kwargs: Any) -> Any:
                calls.append(_name)
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, spy)
    with kvpack.ContextCache(model, None, store=store, codec=kvpack.Lossless(), levels=[kvpack.Kivi(bits=4)],
                             chunk_tokens=CHUNK, loader=LoaderConfig(estimates_path="")) as cc:
        assert cc.warm_up() > 0
    # each codec twice: a chunk in buffers of its own, and one of a longer buffer decoded into a slice of one
    assert sorted(calls) == [f"{c}.{m}" for c in ("Kivi", "Lossless") for m in ("decode", "encode") for _ in range(2)]
    stats = store.stats()
    assert stats.puts == stats.hits == stats.misses == stats.bytes_read == 0
