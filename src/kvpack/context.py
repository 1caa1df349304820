"""`ContextCache`: prefix reuse for a transformers model through a kvpack store.

A prompt is cut into chunks of ``chunk_tokens`` tokens (:class:`~kvpack.prefix.PrefixStore`). ``generate`` loads the
longest run of stored leading chunks into one KV buffer, hands transformers views of it, lets ``model.generate``
prefill only the rest, and writes the prompt's new full chunks back in a background thread. A chunk that is missing,
corrupted or undecodable ends the reused prefix there: the model recomputes the rest, so a store failure costs time,
never a wrong answer.

Each call returns its own statistics (:class:`Generation`, :class:`~kvpack.prefix.RequestStats`), so one
ContextCache can serve concurrent requests from several threads.

Exactness: with a bit-exact codec (``raw``, ``lossless``) the loaded cache is bit-identical to the one the model
produced when it prefilled those tokens, so outputs equal plain transformers code that prefills the same prefix and
continues from it (same split point). Against one-shot ``model.generate`` on the whole prompt, outputs may differ in
rare places: split and one-shot prefill add floating-point numbers in different orders, as in every prefix cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack.codecs.base import Codec
from kvpack.inference import as_batch, cache_arg, forward, new_cache
from kvpack.keys import DEFAULT_CHUNK_TOKENS, KeySpace
from kvpack.kv import KVCache
from kvpack.loader import LoaderConfig
from kvpack.prefix import PrefixStore, RequestStats, spec_for
from kvpack.reuse.segments import Prompt, SegmentReuse
from kvpack.spec import ModelSpec
from kvpack.store import Store


@dataclass(frozen=True)
class Generation:
    """What :meth:`ContextCache.generate` returns: ``sequences [1, tokens]`` (prompt + new tokens) and the stats."""

    sequences: torch.Tensor
    stats: RequestStats

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated token ids ``[new]`` (after the prompt)."""
        return self.sequences[0, self.stats.prompt_tokens :]


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
    ``codec`` an instance (``kvpack.codecs.get("lossless")``) or a registered name. ``namespace`` isolates tenants.
    ``loader`` configures how stored prefixes come back (:class:`~kvpack.loader.LoaderConfig`). ``levels``: more
    codecs, lower quality than ``codec`` and best first, that every chunk is also stored with, for the loader to pick
    from per chunk under a TTFT target (``generate(..., ttft_slo=)``; docs/loader.md). A progressive codec
    (``Transform(layers=k)``) gives ``k`` levels by itself, stored once.
    Thread-safe: requests may run concurrently; background writes are serialized on one writer thread.
    """

    model: Any
    tokenizer: Any
    store: Store | str = "memory://"
    codec: Codec | str = "raw"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    namespace: str = "default"
    spec: ModelSpec | None = None
    loader: LoaderConfig | None = None
    levels: Sequence[Codec | str] = ()
    prefixes: PrefixStore = field(init=False, repr=False)
    segments: SegmentReuse = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.spec = self.spec or spec_for(self.model, self.tokenizer)
        self.prefixes = PrefixStore(self.store, self.model, self.spec, self.codec, self.chunk_tokens, self.namespace,
                                    self.loader, self.levels)
        self.segments = SegmentReuse(self.prefixes, self.tokenizer, self._submit)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpack-write")
        self._pending: list[Future[int]] = []
        self._lock = threading.Lock()

    @property
    def keys(self) -> KeySpace:
        """The chunk keys of this cache's namespace, model, codec and chunk size."""
        return self.prefixes.keys

    # ------------------------------------------------------------------------------------------------ public API
    def lookup(self, ids: torch.Tensor | Sequence[int] | str) -> int:
        """How many leading tokens of ``ids`` (or a text) would be loaded from the store, without loading them."""
        return self.prefixes.lookup(self._ids(ids))

    def generate(self, prompt: str | torch.Tensor | Sequence[int] | Prompt, *, ttft_slo: float | None = None,
                 **generate_kwargs: Any) -> Generation:
        """``model.generate`` on ``prompt`` reusing stored chunks; returns the sequences and this request's stats.

        ``ttft_slo``: a time-to-first-token target in seconds: the loader picks per chunk the best quality level
        whose predicted TTFT meets it, else the fastest plan (:mod:`kvpack.loader`); without it, the best level.

        A :class:`~kvpack.reuse.Prompt` of segments also reuses each stored segment wherever it lands, repaired by
        its policy (docs/reuse.md); its stats are a :class:`~kvpack.reuse.SegmentStats`.
        """
        stats: RequestStats
        if isinstance(prompt, Prompt):
            start = time.perf_counter()
            ids, kv, stats, exact = self.segments.assemble(prompt)
        else:
            ids, exact = self._ids(prompt), None
            stats = RequestStats(prompt_tokens=len(ids))
            start = time.perf_counter()
            # at least one prompt token is left for the model to read
            kv = self.prefixes.load(ids[:-1], stats, ttft_slo=ttft_slo, after=1)
        cache = kv.to_hf() if kv is not None else new_cache(self.model)
        clock = _FirstTokenClock()
        processors = list(generate_kwargs.pop("logits_processor", None) or [])
        generate_kwargs.setdefault("attention_mask", torch.ones(1, len(ids), dtype=torch.int64))
        with torch.no_grad():
            out = self.model.generate(as_batch(ids), **cache_arg(self.model, cache),
                                      logits_processor=[clock, *processors], **generate_kwargs)
        stats.ttft_s = (clock.at or time.perf_counter()) - start
        stats.prefill_s = stats.ttft_s - stats.load_s
        self.prefixes.loader.observe_prefill(len(ids) - (kv.num_tokens if kv is not None else 0), stats.prefill_s)
        stats.chunks_written = self._write_back(cache, ids[:exact], stats)  # never K/V computed out of context
        self._probe_after(ids, stats)
        return Generation(sequences=out, stats=stats)

    def prefill(self, text: str | torch.Tensor | Sequence[int] | Prompt) -> RequestStats:
        """Warm the store with the full chunks of ``text`` without generating (writes finish in the background).

        For a :class:`~kvpack.reuse.Prompt`: store each cached segment not stored yet, in its caching context.
        """
        if isinstance(text, Prompt):
            return self.segments.prefill(text)
        ids = self._ids(text)
        stats = RequestStats(prompt_tokens=len(ids))
        start = time.perf_counter()
        _, full = self.prefixes.chunk_span(ids, 0)
        kv = self.prefixes.load(ids[:full], stats)
        cache = kv.to_hf() if kv is not None else new_cache(self.model)
        forward(self.model, ids[stats.tokens_hit : full], cache)
        stats.prefill_s = time.perf_counter() - start - stats.load_s
        self.prefixes.loader.observe_prefill(full - stats.tokens_hit, stats.prefill_s)
        stats.chunks_written = self._write_back(cache, ids, stats)
        self._probe_after(ids, stats)
        return stats

    def warm_up(self) -> float:
        """Pay the codecs' one-time setup now, not in the first request that stores or loads (a calibrated codec
        prepares its projections, numba loads its compiled kernels, torch starts its threads: otherwise a
        process's first decode is much slower than the next). Optional: call it once at startup. Encodes and
        decodes synthetic chunks with every codec (:meth:`~kvpack.codecs.base.Codec.warm_up`), nothing stored;
        returns the seconds it took."""
        start = time.perf_counter()
        self.prefixes.warm_up()
        return time.perf_counter() - start

    def flush(self) -> None:
        """Wait until every background write has reached the store (re-raises a write's error)."""
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

    def _submit(self, fn: Callable[..., int], *args: Any) -> None:
        """Run ``fn(*args)`` (a store write) on the writer thread; :meth:`flush` waits for it."""
        future = self._writer.submit(fn, *args)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]

    def _probe_after(self, ids: torch.Tensor, stats: RequestStats) -> None:
        """After a request that recomputed a stored prefix, re-measure loading it on the writer thread when the
        loader says it is time (:meth:`~kvpack.loader.Loader.recomputed`): without it, one slow load could keep
        every later request recomputing."""
        if stats.plan is not None and stats.plan.recompute and self.prefixes.loader.recomputed():
            self._submit(self.prefixes.probe, ids)

    def _write_back(self, cache: Any, ids: torch.Tensor, stats: RequestStats) -> int:
        """Queue for storing: the prompt's full chunks after the stored prefix, and the ones that failed to load."""
        assert self.spec is not None
        c = self.chunk_tokens
        start, stop = self.prefixes.chunk_span(ids, max(stats.tokens_hit, stats.chunks_hit * c))  # stored already
        spans = [(i * c, (i + 1) * c) for i in stats.failed_chunks] + ([(start, stop)] if stop > start else [])
        if not spans:
            return 0
        parts = [KVCache.from_hf(cache, self.spec, token_ids=ids, span=span) for span in spans]
        futures = [self._writer.submit(self.prefixes.save, kv, ids) for kv in parts]
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + futures
        return sum(kv.num_tokens for kv in parts) // c
