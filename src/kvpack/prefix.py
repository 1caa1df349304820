"""Prefix reuse through a store: :class:`PrefixStore`, and :func:`load_prefix`/:func:`save_prefix` for transformers.

A token sequence is cut into chunks of ``chunk_tokens`` tokens; each full chunk has a chained content key
(:mod:`kvpack.keys`), so a key names the whole prefix up to its chunk. Loading asks the store once which chunks
exist, reads the leading run of them in one batch, allocates the KV buffer of the whole reused prefix once
(:meth:`KVCache.empty`) and decodes every chunk into its slice of it (``decode(..., out=)``); transformers gets views
of that buffer (:meth:`KVCache.to_hf`). Any chunk that is missing, corrupted or undecodable ends the reused prefix
there: the model recomputes the rest, so a store failure costs time, never a wrong answer.

:class:`~kvpack.context.ContextCache` is built on :class:`PrefixStore`; :func:`load_prefix` and :func:`save_prefix`
serve people who call ``model.generate`` themselves::

    past, hit = kvpack.load_prefix(store, model, input_ids)             # a transformers Cache, tokens reused
    out = model.generate(input_ids, cache=past, ...)
    kvpack.save_prefix(store, model, input_ids, past)                   # store the prompt's new full chunks
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack import codecs
from kvpack.codecs.base import Codec
from kvpack.errors import KvpackError
from kvpack.inference import new_cache
from kvpack.keys import DEFAULT_CHUNK_TOKENS, KeySpace
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec
from kvpack.store import Store
from kvpack.store import open as open_store

_SPECS_ATTR = "_kvpack_specs"


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


@dataclass
class PrefixStore:
    """A store, a codec and a model spec bound together: chunk keys, batched lookup, load into one buffer, save.

    ``store`` is a :class:`~kvpack.store.Store` or a URL; ``codec`` an instance or a registered name. ``namespace``
    isolates tenants: nothing written under one namespace is found under another. Thread-safe when the store is.
    """

    store: Store | str
    spec: ModelSpec
    codec: Codec | str = "raw"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    namespace: str = "default"
    keys: KeySpace = field(init=False)

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if isinstance(self.store, str):
            self.store = open_store(self.store)
        if isinstance(self.codec, str):
            self.codec = codecs.get(self.codec)
        self.keys = KeySpace(namespace=self.namespace, model_fingerprint=self.spec.fingerprint,
                             codec_id=self.codec.codec_id, chunk_tokens=self.chunk_tokens)

    @property
    def backend(self) -> Store:
        assert isinstance(self.store, Store)
        return self.store

    @property
    def the_codec(self) -> Codec:
        assert isinstance(self.codec, Codec)
        return self.codec

    def lookup(self, ids: torch.Tensor) -> int:
        """How many leading tokens of ``ids`` are stored (whole chunks), asking the store once."""
        found = self.backend.exists_many(self.keys.keys(ids))
        hit = next((i for i, ok in enumerate(found) if not ok), len(found))
        return hit * self.chunk_tokens

    def load(self, ids: torch.Tensor, stats: RequestStats) -> KVCache | None:
        """Fetch and decode the longest run of stored leading full chunks of ``ids`` into one buffer.

        Fills ``stats`` (tokens/chunks hit, bytes read, fetch and decode time, decode errors).
        """
        keys = self.keys.keys(ids)
        if not keys:
            return None
        t0 = time.perf_counter()
        blobs = self.backend.get_many(keys)
        t1 = time.perf_counter()
        run = next((i for i, blob in enumerate(blobs) if blob is None), len(blobs))
        if run == 0:
            stats.load_s = t1 - t0
            return None
        c = self.chunk_tokens
        kv = KVCache.empty(self.spec, run * c)
        kv.token_ids = ids[: run * c].clone()
        loaded = 0
        for i, blob in enumerate(blobs[:run]):
            assert blob is not None
            try:
                self.the_codec.decode(blob, self.spec, token_ids=ids[i * c : (i + 1) * c], out=kv[i * c : (i + 1) * c])
            except KvpackError as exc:
                warnings.warn(f"kvpack: chunk {i} could not be decoded ({exc}); recomputing from there", stacklevel=3)
                stats.decode_errors += 1
                break
            if int(kv.positions[i * c]) != i * c:  # a chunk stored for other positions: not this prefix
                stats.decode_errors += 1
                break
            stats.bytes_read += len(blob)
            loaded += 1
        stats.load_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
        stats.chunks_hit = loaded
        stats.tokens_hit = loaded * c
        return kv[: loaded * c] if loaded else None

    def chunk_span(self, ids: torch.Tensor, tokens_hit: int) -> tuple[int, int]:
        """The token range ``[tokens_hit, full)`` of ``ids`` whose full chunks are not stored yet."""
        full = len(ids) // self.chunk_tokens * self.chunk_tokens
        return tokens_hit, max(tokens_hit, full)

    def save(self, kv: KVCache, ids: torch.Tensor) -> int:
        """Encode and store the full chunks of ``kv`` (tokens ``[kv.positions[0], ...)`` of ``ids``); how many."""
        start = int(kv.positions[0]) if kv.num_tokens else 0
        if start % self.chunk_tokens:
            raise ValueError(f"chunks start at multiples of {self.chunk_tokens} tokens, not at {start}")
        stop = start + kv.num_tokens // self.chunk_tokens * self.chunk_tokens
        keys = self.keys.keys(ids[:stop])[start // self.chunk_tokens :]
        for key, part in zip(keys, kv[: stop - start].chunks(self.chunk_tokens), strict=True):
            self.backend.put(key, self.the_codec.encode(part))
        return len(keys)


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
    prefixes = PrefixStore(store, spec_for(model, tokenizer), codec, chunk_tokens, namespace)
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
    prefixes = PrefixStore(store, spec, codec, chunk_tokens, namespace)
    start, stop = prefixes.chunk_span(ids, skip_tokens)
    if stop <= start:
        return 0
    kv = KVCache.from_hf(cache, spec, token_ids=ids, span=(start, stop))
    return prefixes.save(kv, ids)
