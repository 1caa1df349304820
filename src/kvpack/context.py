"""`ContextCache`: prefix reuse for a transformers model through a kvpack store.

A prompt is cut into chunks of ``chunk_tokens`` tokens; each full chunk has a chained content key
(:mod:`kvpack.keys`). ``generate`` loads the longest run of cached leading chunks, decodes them into a transformers
cache, lets ``model.generate`` prefill only the rest, and writes the prompt's new full chunks back in a background
thread. Any chunk that is missing, corrupted or undecodable ends the reused prefix there: the model recomputes the
rest, so a store failure costs time, never a wrong answer.

Exactness: with a bit-exact codec (``raw``) the loaded cache is bit-identical to the one the model produced when it
prefilled those tokens, so outputs equal plain transformers code that prefills the same prefix and continues from it
(same split point). Against one-shot ``model.generate`` on the whole prompt, outputs may differ in rare places:
split and one-shot prefill add floating-point numbers in different orders, as in every prefix cache.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack import codecs
from kvpack.codecs.base import Codec
from kvpack.errors import KvpackError
from kvpack.inference import as_batch, forward, new_cache
from kvpack.keys import KeySpace
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec
from kvpack.store import Store
from kvpack.store import open as open_store


@dataclass
class RequestStats:
    """What one request did: tokens reused, bytes read, where the time went (seconds)."""

    prompt_tokens: int = 0
    tokens_hit: int = 0
    chunks_hit: int = 0
    bytes_read: int = 0
    load_s: float = 0.0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    chunks_written: int = 0
    decode_errors: int = 0


class _FirstTokenClock:
    """A logits processor that records when the first token's logits exist (time to first token)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


@dataclass
class ContextCache:
    """Model + tokenizer + store + codec; all reuse goes through :meth:`generate`, :meth:`prefill`, :meth:`lookup`.

    ``store`` is a :class:`~kvpack.store.Store` or a URL (``memory://``, ``file://PATH``, ``redis://HOST:PORT/DB``);
    ``codec`` an instance or a registered name. ``namespace`` isolates tenants: nothing written under one namespace
    is found under another.
    """

    model: Any
    tokenizer: Any
    store: Store | str = "memory://"
    codec: Codec | str = "raw"
    chunk_tokens: int = 256
    namespace: str = "default"
    spec: ModelSpec | None = None
    last_stats: RequestStats = field(default_factory=RequestStats, init=False)

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be positive")
        self._store: Store = open_store(self.store) if isinstance(self.store, str) else self.store
        self._codec: Codec = codecs.get(self.codec) if isinstance(self.codec, str) else self.codec
        self.spec = self.spec or ModelSpec.from_model(self.model, self.tokenizer)
        self.keys = KeySpace(namespace=self.namespace, model_fingerprint=self.spec.fingerprint,
                             codec_id=self._codec.codec_id, chunk_tokens=self.chunk_tokens)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpack-write")
        self._pending: list[Future[int]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ public API
    def lookup(self, ids: torch.Tensor | Sequence[int] | str) -> int:
        """How many leading tokens of ``ids`` (or a text) would be loaded from the store, without loading them."""
        hit = 0
        for key in self.keys.iter_keys(self._ids(ids)):
            if not self._store.contains(key):
                break
            hit += self.chunk_tokens
        return hit

    def generate(self, prompt: str | torch.Tensor | Sequence[int], **generate_kwargs: Any) -> torch.Tensor:
        """``model.generate`` on ``prompt`` reusing cached chunks; returns the full sequence ``[1, tokens]``.

        Per-request statistics are in :attr:`last_stats` afterwards.
        """
        ids = self._ids(prompt)
        stats = RequestStats(prompt_tokens=len(ids))
        start = time.perf_counter()
        kv = self._load(ids[:-1], stats)  # at least one prompt token is left for the model to read
        cache = kv.to_hf() if kv is not None else new_cache(self.model)
        clock = _FirstTokenClock()
        processors = list(generate_kwargs.pop("logits_processor", None) or [])
        generate_kwargs.setdefault("attention_mask", torch.ones(1, len(ids), dtype=torch.int64))
        with torch.no_grad():
            out = self.model.generate(as_batch(ids), cache=cache, logits_processor=[clock, *processors],
                                      **generate_kwargs)
        stats.ttft_s = (clock.at or time.perf_counter()) - start
        stats.prefill_s = stats.ttft_s - stats.load_s - stats.decode_s
        stats.chunks_written = self._write_back(cache, ids, stats.tokens_hit)
        self.last_stats = stats
        return out

    def prefill(self, text: str | torch.Tensor | Sequence[int]) -> RequestStats:
        """Warm the store with the full chunks of ``text`` without generating (writes finish in the background)."""
        ids = self._ids(text)
        stats = RequestStats(prompt_tokens=len(ids))
        start = time.perf_counter()
        full = len(ids) // self.chunk_tokens * self.chunk_tokens
        kv = self._load(ids[:full], stats)
        cache = kv.to_hf() if kv is not None else new_cache(self.model)
        forward(self.model, ids[stats.tokens_hit : full], cache)
        stats.prefill_s = time.perf_counter() - start - stats.load_s - stats.decode_s
        stats.chunks_written = self._write_back(cache, ids, stats.tokens_hit)
        self.last_stats = stats
        return stats

    def flush(self) -> None:
        """Wait until every background write has reached the store."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Flush pending writes and release the writer thread (the store stays open: it may be shared)."""
        self.flush()
        self._writer.shutdown(wait=True)

    def __enter__(self) -> ContextCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- internals
    def _ids(self, prompt: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        return as_batch(prompt)[0]

    def _load(self, ids: torch.Tensor, stats: RequestStats) -> KVCache | None:
        """Fetch and decode the longest run of cached leading full chunks of ``ids``."""
        keys = self.keys.keys(ids)
        if not keys:
            return None
        t0 = time.perf_counter()
        blobs = self._store.get_many(keys)
        t1 = time.perf_counter()
        parts: list[KVCache] = []
        for i, blob in enumerate(blobs):
            if blob is None:
                break
            chunk_ids = ids[i * self.chunk_tokens : (i + 1) * self.chunk_tokens]
            try:
                part = self._codec.decode(blob, self.spec, token_ids=chunk_ids)
            except KvpackError as exc:
                warnings.warn(f"kvpack: chunk {i} could not be decoded ({exc}); recomputing from there", stacklevel=3)
                stats.decode_errors += 1
                break
            if int(part.positions[0]) != i * self.chunk_tokens:
                stats.decode_errors += 1
                break
            stats.bytes_read += len(blob)
            parts.append(part)
        stats.load_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
        stats.chunks_hit = len(parts)
        stats.tokens_hit = len(parts) * self.chunk_tokens
        return KVCache.concat(parts) if parts else None

    def _write_back(self, cache: Any, ids: torch.Tensor, tokens_hit: int) -> int:
        """Queue the prompt's full chunks after ``tokens_hit`` for encoding and storing; returns how many."""
        full = len(ids) // self.chunk_tokens * self.chunk_tokens
        if full <= tokens_hit:
            return 0
        assert self.spec is not None
        kv = KVCache.from_hf(cache, self.spec)[tokens_hit:full]
        kv.token_ids = ids[tokens_hit:full].clone()
        keys = self.keys.keys(ids[:full])[tokens_hit // self.chunk_tokens :]
        future = self._writer.submit(self._store_chunks, kv, keys)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return len(keys)

    def _store_chunks(self, kv: KVCache, keys: list[str]) -> int:
        for key, part in zip(keys, kv.chunks(self.chunk_tokens), strict=True):
            self._store.put(key, self._codec.encode(part))
        return len(keys)
