"""Prefix reuse through a store: :class:`PrefixStore`, and :func:`load_prefix`/:func:`save_prefix` for transformers.

A token sequence is cut into chunks of ``chunk_tokens`` tokens; each full chunk has a chained content key
(:mod:`kvpack.keys`), so a key names the whole prefix up to its chunk. Loading asks the store once which chunks
exist, and the :class:`~kvpack.loader.Loader` brings the leading run of them back into one buffer allocated once,
loading from the back while computing from the front; transformers gets views of that buffer
(:meth:`KVCache.to_hf`). A chunk that cannot be read or decoded is computed instead, so a store failure costs time,
never a wrong answer.

:class:`~kvpack.context.ContextCache` is built on :class:`PrefixStore`; :func:`load_prefix` and :func:`save_prefix`
serve people who call ``model.generate`` themselves::

    past, hit = kvpack.load_prefix(store, model, input_ids)             # a transformers Cache, tokens reused
    out = model.generate(input_ids, cache=past, ...)
    kvpack.save_prefix(store, model, input_ids, past)                   # store the prompt's new full chunks
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from kvpack import codecs
from kvpack.codecs.base import Codec
from kvpack.inference import new_cache
from kvpack.keys import DEFAULT_CHUNK_TOKENS, KeySpace
from kvpack.kv import KVCache
from kvpack.loader import Loader, LoaderConfig, LoadReport
from kvpack.spec import ModelSpec
from kvpack.store import Store
from kvpack.store import open as open_store

_SPECS_ATTR = "_kvpack_specs"


@dataclass
class RequestStats(LoadReport):
    """What one request did (times in seconds): its load (the fields of :class:`~kvpack.loader.LoadReport`) and the
    rest of the request.

    ``tokens_hit``/``chunks_hit``: the stored prefix the request reused, and the chunks of it that were stored (a
    failed chunk is computed, and stored again; when the loader's plan is to recompute, ``plan.recompute``, the
    stored chunks are left unread: ``tokens_hit`` is 0). ``prefill_s``: the prefill of the rest of the prompt;
    ``ttft_s``: the time to the first token; ``chunks_written``: the chunks the request stored.
    """

    prompt_tokens: int = 0
    tokens_hit: int = 0
    chunks_hit: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    chunks_written: int = 0


@dataclass
class PrefixStore:
    """A model, a store and a codec bound together: chunk keys, batched lookup, loading (:class:`Loader`), saving.

    ``store`` is a :class:`~kvpack.store.Store` or a URL; ``codec`` an instance or a registered name. ``levels``:
    more codecs (lower quality, best first) each chunk is also stored with, under that codec's keys, for the loader to
    choose from per chunk (:mod:`kvpack.loader`). ``namespace`` isolates tenants: nothing written under one namespace
    is found under another. Thread-safe when the store is.
    """

    store: Store | str
    model: Any
    spec: ModelSpec
    codec: Codec | str = "raw"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    namespace: str = "default"
    loader_config: LoaderConfig | None = None
    levels: Sequence[Codec | str] = ()
    keys: KeySpace = field(init=False)
    loader: Loader = field(init=False)
    codecs: tuple[Codec, ...] = field(init=False)
    spaces: tuple[KeySpace, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if isinstance(self.store, str):
            self.store = open_store(self.store)
        self.codecs = tuple(codecs.get(c) if isinstance(c, str) else c for c in (self.codec, *self.levels))
        self.codec = self.codecs[0]
        if len({c.codec_id for c in self.codecs}) < len(self.codecs):
            raise ValueError("the codec and the levels must be different codecs (or parameters)")
        self.spaces = tuple(KeySpace(namespace=self.namespace, model_fingerprint=self.spec.fingerprint,
                                     codec_id=c.codec_id, chunk_tokens=self.chunk_tokens) for c in self.codecs)
        self.keys = self.spaces[0]
        self.loader = Loader(self.model, self.spec, self.store, self.codecs, self.chunk_tokens, self.loader_config)

    @property
    def backend(self) -> Store:
        assert isinstance(self.store, Store)
        return self.store

    @property
    def the_codec(self) -> Codec:
        assert isinstance(self.codec, Codec)
        return self.codec

    def _stored(self, ids: torch.Tensor) -> tuple[list[list[str]], list[list[bool]], int]:
        """Keys per codec, which exist (one batched question to the store), and the leading run of chunks that
        exist at some level."""
        keys = [space.keys(ids) for space in self.spaces]
        n = len(keys[0])
        found = self.backend.exists_many([k for ks in keys for k in ks]) if n else []
        stored = [found[j * n : (j + 1) * n] for j in range(len(keys))]
        run = next((i for i in range(n) if not any(s[i] for s in stored)), n)
        return keys, stored, run

    def lookup(self, ids: torch.Tensor) -> int:
        """How many leading tokens of ``ids`` are stored (whole chunks, at any level), asking the store once."""
        return self._stored(ids)[2] * self.chunk_tokens

    def load(self, ids: torch.Tensor, stats: RequestStats, ttft_slo: float | None = None,
             after: int = 0, allow_recompute: bool = True) -> KVCache | None:
        """The KV of the longest stored run of leading full chunks of ``ids``, in one buffer; fills ``stats``.

        Chunks that fail to load are computed instead, so the result is always the prefix's KV. ``ttft_slo``: a TTFT
        target (:meth:`Loader.load`); ``after``: prompt tokens that follow ``ids`` (prefilled after the load too).
        With ``allow_recompute`` the loader may plan to read nothing (:meth:`Loader.plan`): then ``None``, with
        ``stats.plan.recompute`` set, and the caller prefills the whole prompt.
        """
        keys, stored, chunks = self._stored(ids)
        if chunks == 0:
            return None
        tail = len(ids) + after - chunks * self.chunk_tokens
        plan = self.loader.plan(chunks, ttft_slo, tail, allow_recompute=allow_recompute)
        if plan.recompute:  # prefilling the whole prompt is predicted sooner: the stored chunks stay unread
            stats.plan, stats.chunks_hit, stats.tokens_hit = plan, chunks, 0
            stats.chunk_levels = ["recomputed"] * chunks
            return None
        kv, report = self.loader.load(ids, keys, chunks, stored=stored, ttft_slo=ttft_slo, tail_tokens=tail,
                                       plan=plan)
        stats.chunks_hit, stats.tokens_hit = chunks, chunks * self.chunk_tokens
        for f in fields(LoadReport):
            setattr(stats, f.name, getattr(report, f.name))
        return kv

    def warm_up(self) -> None:
        """Every codec's one-time setup, paid now (:meth:`Codec.warm_up` with a chunk's tokens); the store is not
        touched."""
        for codec in self.codecs:
            codec.warm_up(self.spec, self.chunk_tokens)

    def probe(self, ids: torch.Tensor) -> int:
        """Measure loading the first stored chunk of ``ids`` again (:meth:`Loader.probe`), after a request that
        followed a ``recompute`` plan; 1 if measured, else 0."""
        keys, stored, chunks = self._stored(ids)
        return self.loader.probe(ids, keys, stored) if chunks else 0

    def chunk_span(self, ids: torch.Tensor, tokens_hit: int) -> tuple[int, int]:
        """The token range ``[tokens_hit, full)`` of ``ids`` whose full chunks are not stored yet."""
        full = len(ids) // self.chunk_tokens * self.chunk_tokens
        return tokens_hit, max(tokens_hit, full)

    def save(self, kv: KVCache, ids: torch.Tensor) -> int:
        """Encode and store the full chunks of ``kv`` (tokens ``[kv.positions[0], ...)`` of ``ids``) with the codec and
        each level; how many chunks."""
        start = int(kv.positions[0]) if kv.num_tokens else 0
        if start % self.chunk_tokens:
            raise ValueError(f"chunks start at multiples of {self.chunk_tokens} tokens, not at {start}")
        stop = start + kv.num_tokens // self.chunk_tokens * self.chunk_tokens
        parts = list(kv[: stop - start].chunks(self.chunk_tokens))
        for j, (codec, space) in enumerate(zip(self.codecs, self.spaces, strict=True)):
            keys = space.keys(ids[:stop])[start // self.chunk_tokens :]
            for key, part in zip(keys, parts, strict=True):
                blob = codec.encode(part)
                self.backend.put(key, blob)
                self.loader.observe_stored(j, len(blob))
        return len(parts)


def spec_for(model: Any, tokenizer: Any = None) -> ModelSpec:
    """``ModelSpec.from_model(model, tokenizer)``, computed once per model and tokenizer object."""
    specs = model.__dict__.setdefault(_SPECS_ATTR, {})
    key = id(tokenizer)
    if key not in specs:
        specs[key] = ModelSpec.from_model(model, tokenizer)
    spec: ModelSpec = specs[key]
    return spec


def _ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.int64)
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError(f"kvpack handles a batch of one sequence; got input_ids of shape {tuple(ids.shape)}")
    return ids.reshape(-1)


def load_prefix(store: Store | str, model: Any, input_ids: torch.Tensor | Sequence[int], codec: Codec | str = "raw",
                *, tokenizer: Any = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                namespace: str = "default") -> tuple[Any, int]:
    """The stored KV of the longest chunk-aligned prefix of ``input_ids`` as a transformers ``Cache``.

    Returns ``(cache, tokens_reused)``; pass both ``input_ids`` and the cache to ``model.generate`` (it
    computes only the tokens after the prefix). At least one token is always left to compute. The cache holds every
    token of every layer (sliding-window layers included; the model's mask applies the window). Use the same
    ``codec``, ``tokenizer``, ``chunk_tokens`` and ``namespace`` as when the chunks were saved.
    """
    ids = _ids(input_ids)
    prefixes = PrefixStore(store, model, spec_for(model, tokenizer), codec, chunk_tokens, namespace)
    kv = prefixes.load(ids[:-1], RequestStats(prompt_tokens=len(ids)))
    if kv is None:
        return new_cache(model), 0
    return kv.to_hf(), kv.num_tokens


def save_prefix(store: Store | str, model: Any, input_ids: torch.Tensor | Sequence[int], cache: Any,
                codec: Codec | str = "raw", *, tokenizer: Any = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                namespace: str = "default", skip_tokens: int = 0) -> int:
    """Encode and store the full chunks of ``input_ids`` from ``past_key_values``; returns how many were written.

    ``cache`` is a transformers cache holding at least those tokens (e.g. after ``model.generate``); it
    must keep every token of every layer (:func:`kvpack.inference.new_cache` or the cache :func:`load_prefix`
    returned). ``skip_tokens`` (a multiple of ``chunk_tokens``, e.g. the ``tokens_reused`` of :func:`load_prefix`)
    skips chunks already stored. Synchronous: the chunks are in the store when it returns.
    """
    ids = _ids(input_ids)
    spec = spec_for(model, tokenizer)
    prefixes = PrefixStore(store, model, spec, codec, chunk_tokens, namespace)
    start, stop = prefixes.chunk_span(ids, skip_tokens)
    if stop <= start:
        return 0
    kv = KVCache.from_hf(cache, spec, token_ids=ids, span=(start, stop))
    return prefixes.save(kv, ids)
