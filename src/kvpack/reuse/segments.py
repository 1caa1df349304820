"""Prompts given as segments: each segment's KV is cached on its own and reused wherever the segment lands.

A :class:`Prompt` is a list of :class:`Segment` (texts or token ids), e.g. ``[system, doc_a, doc_b, question]``.
Every cached segment is encoded in its *caching context* and stored under keys that name exactly that context:

- independently (``shared_prefix=0``): the segment alone, at positions ``0..n``;
- after a declared shared prefix (``shared_prefix=k``, as in APE, Yang et al. arXiv 2502.05431): the first ``k``
  segments together are the prefix ``P``, cached as one unit from position 0, and every later segment is encoded
  after ``P``, at positions ``len(P)..len(P)+n``.

A unit's chunks (``chunk_tokens`` tokens, the last may be shorter) have chained keys
(:meth:`KeySpace.chunk_key <kvpack.keys.KeySpace.chunk_key>`) whose first parent is ``P``'s last key (``None`` when
independent), so a key names the tokens *and* everything they were computed after, in every process. The full chunks
of a unit cached from position 0 have exactly the prefix keys of its tokens (:class:`~kvpack.prefix.PrefixStore`):
the two caches share entries, and a unit's entries are never wrong for a prefix or the reverse.

Assembling a prompt (:meth:`SegmentReuse.assemble`):

1. the exact path first: the longest stored chain of the whole prompt's leading chunks is loaded as today
   (:meth:`PrefixStore.load <kvpack.prefix.PrefixStore.load>`, bit-identical). A prompt whose every cached segment
   sits in its caching context (one document; or a shared prefix followed by one segment), or a ``full`` repair,
   stops here, so it is bit-identical to :meth:`ContextCache.generate <kvpack.context.ContextCache.generate>` on
   the concatenated tokens;
2. each unit still needed is loaded from the store; or derived from the stored older version of its document
   (segments with a ``doc`` id, :mod:`kvpack.reuse.edits`: PIE), its edited tokens then recomputed in step 4 whatever
   the policy; or, if neither is stored (or a chunk is undecodable), computed in its caching context and stored in
   the background, so the next request finds it;
3. a unit at a new offset has its keys re-rotated (:func:`kvpack.rope.rerotate`: RoPE is applied after the key
   projection, so a pre-RoPE key does not depend on position); values are unchanged;
4. the repair policy (:mod:`kvpack.reuse.policies`) picks tokens among the moved ones (every token after the first
   one computed in another context); they and the edited tokens are recomputed (:mod:`kvpack.reuse.recompute`)
   and their K/V replace the loaded ones.

Segments tokenize on their own (the first with the tokenizer's special tokens, the others without), so a segment's
tokens are the same wherever it lands; the concatenation may differ from tokenizing the joined text. Segments with
``cache=False`` (a question) must come last; the model prefills them on top of the assembled cache.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpack import rope
from kvpack.errors import KvpackError
from kvpack.inference import as_batch, forward, prefill
from kvpack.kv import KVCache
from kvpack.prefix import PrefixStore, RequestStats
from kvpack.reuse.edits import Edit, decode_version, encode_version, version_key
from kvpack.reuse.policies import RepairJob, RepairPolicy
from kvpack.reuse.policies import get as get_policy

SegmentContent = str | torch.Tensor | Sequence[int]


@dataclass(frozen=True, eq=False)
class Segment:
    """One piece of a :class:`Prompt`: a text or token ids; cached and reused on its own unless ``cache=False``.

    ``doc``: a stable id of the document this segment is a version of (e.g. a file path). When this version is not
    stored but an older one is (in the same caching context), the older one's K/V are reused for the tokens the edit
    kept and only the edited tokens are recomputed (:mod:`kvpack.reuse.edits`, PIE). Compared by identity (the
    content may be a tensor)."""

    content: SegmentContent
    cache: bool = True
    doc: str | None = None


@dataclass(frozen=True, eq=False)
class Prompt:
    """A prompt as segments, how each is cached, and how the assembled cache is repaired.

    ``segments``: :class:`Segment`, texts or token-id sequences, in prompt order. ``shared_prefix``: how many leading
    segments form the prefix every other segment is cached after (0: every segment is cached on its own).
    ``repair``: a :class:`~kvpack.reuse.policies.RepairPolicy` or a registered name (``none``, ``epic``, ``blend``,
    ``full``), the default being ``blend`` with its defaults.
    """

    segments: Sequence[Segment | SegmentContent]
    shared_prefix: int = 0
    repair: RepairPolicy | str = "blend"
    parts: tuple[Segment, ...] = field(init=False, repr=False)
    policy: RepairPolicy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = tuple(s if isinstance(s, Segment) else Segment(s) for s in self.segments)
        if not parts:
            raise ValueError("a Prompt needs at least one segment")
        cached = sum(1 for s in parts if s.cache)
        if any(s.cache for s in parts[cached:]):
            raise ValueError("segments with cache=False must come after every cached segment (e.g. the question)")
        if isinstance(self.shared_prefix, bool) or not 0 <= self.shared_prefix <= cached:
            raise ValueError(f"shared_prefix must count leading cached segments, 0..{cached}, got "
                             f"{self.shared_prefix!r}")
        if any(s.doc is not None and (i < self.shared_prefix or not s.cache) for i, s in enumerate(parts)):
            raise ValueError("document ids go on cached segments after the shared prefix (the prefix is one unit)")
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "policy", get_policy(self.repair) if isinstance(self.repair, str) else self.repair)


@dataclass
class SegmentStats(RequestStats):
    """:class:`~kvpack.prefix.RequestStats` of a segmented prompt, plus what the segments did.

    ``tokens_hit`` is still the exact prefix loaded by today's path. ``segments_loaded``/``segments_computed``:
    cached units (the shared prefix counts as one) loaded from the store, or computed in their caching context
    because they were not stored (and queued for storing); ``segments_edited``: loaded units that were an older
    version of the segment's document, with ``tokens_edited`` tokens inserted or replaced (always recomputed).
    ``tokens_moved``: tokens whose K/V were computed in another context (the repair candidates); ``recomputed``: the
    token indices recomputed at every layer (the policy's choice and the edited tokens);
    ``token_layers_recomputed``: (token, layer) pairs recomputed, which also counts tokens a policy recomputed in
    some layers only (CacheBlend's early layers); ``repair_s`` the time of choosing and recomputing them.
    ``load_s`` covers the whole assembly.
    """

    segments_loaded: int = 0
    segments_computed: int = 0
    segments_edited: int = 0
    tokens_edited: int = 0
    tokens_moved: int = 0
    recomputed: list[int] = field(default_factory=list)
    token_layers_recomputed: int = 0
    repair_s: float = 0.0

    @property
    def tokens_recomputed(self) -> int:
        return len(self.recomputed)


@dataclass(frozen=True)
class _Unit:
    """A cached unit: ``ids [n]`` computed after the chain ending at ``parent`` from position ``origin``, and
    placed at ``start`` in the prompt."""

    ids: torch.Tensor
    parent: str | None
    origin: int
    start: int
    doc: str | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.ids)

    @property
    def moved(self) -> bool:
        return self.origin != self.start


class SegmentReuse:
    """Assembles the KV of :class:`Prompt` s from segments stored through ``prefixes`` (its store, codec, keys).

    ``submit(fn, *args)`` runs a store write in the background (``ContextCache`` passes its writer thread).
    Thread-safe when the store is.
    """

    def __init__(self, prefixes: PrefixStore, tokenizer: Any, submit: Callable[..., None]) -> None:
        self.prefixes, self.tokenizer, self.submit = prefixes, tokenizer, submit

    # ------------------------------------------------------------------------------------------------ public API
    def tokens(self, prompt: Prompt) -> list[torch.Tensor]:
        """Each segment's token ids ``[n_i]`` (int64)."""
        out = []
        for i, part in enumerate(prompt.parts):
            if isinstance(part.content, str):
                if self.tokenizer is None:
                    raise ValueError("text segments need the ContextCache's tokenizer; give token ids instead")
                out.append(self.tokenizer(part.content, add_special_tokens=i == 0, return_tensors="pt").input_ids[0])
            else:
                out.append(as_batch(part.content)[0])
            if out[-1].numel() == 0:
                raise ValueError(f"segment {i} has no tokens")
        return out

    def assemble(self, prompt: Prompt) -> tuple[torch.Tensor, KVCache | None, SegmentStats, int]:
        """``(ids, kv, stats, exact)``: the prompt's tokens ``[n]``; the KV of its first ``kv.num_tokens`` tokens
        (``None`` if nothing is reused; at least one token is left for the model); this request's stats; and how
        many leading tokens of ``kv`` were computed in their true context (only those may be stored as prefix
        chunks)."""
        start = time.perf_counter()
        pieces = self.tokens(prompt)
        ids = torch.cat(pieces)
        stats = SegmentStats(prompt_tokens=len(ids))
        exact_kv = self.prefixes.load(ids[:-1], stats, allow_recompute=False)  # the segments build on what it reads
        units = self._units(prompt, pieces)
        limit = min(units[-1].stop, len(ids) - 1) if units else 0
        hit = stats.tokens_hit
        edits = {i: e for i, u in enumerate(units) if prompt.policy.reuses_segments and u.stop > hit
                 and u.start < limit and (e := self._edit(u))}
        dirty = [u.start for u in units if u.moved] + [units[i].start + e.first_change for i, e in edits.items()]
        dirty_from = max(hit, min(dirty, default=limit))  # every token from here on was computed in another context
        if not prompt.policy.reuses_segments or dirty_from >= limit:
            stats.load_s = time.perf_counter() - start
            return ids, exact_kv, stats, len(ids)
        self._check_movable()
        kv = KVCache.empty(self.prefixes.spec, limit)
        kv.token_ids = ids[:limit].clone()
        if exact_kv is not None:
            kv.data[:, :, :, :hit].copy_(exact_kv.data)
        resolve = self._resolver(prompt, units, stats)
        for i, unit in enumerate(units):
            if unit.stop > hit and unit.start < limit:
                source = self._edited_kv(unit, edits[i], stats) if i in edits else None
                self._place(unit, resolve(unit) if source is None else source, kv, hit, limit)
        edited = torch.cat([units[i].start + e.edited for i, e in edits.items()] + [torch.empty(0, dtype=torch.int64)])
        required = edited[(edited >= hit) & (edited < limit)].sort().values
        candidates = torch.arange(dirty_from, limit, dtype=torch.int64)
        candidates = candidates[~torch.isin(candidates, required)]
        segments = tuple((max(u.start, hit), min(u.stop, limit)) for u in units
                         if u.moved and min(u.stop, limit) > max(u.start, hit))
        stats.tokens_moved, stats.tokens_edited = candidates.numel(), required.numel()
        t0 = time.perf_counter()
        job = RepairJob(model=self.prefixes.model, kv=kv, candidates=candidates, segments=segments, required=required,
                        query=ids[limit:])
        repair = prompt.policy.repair(job)
        repair.apply(kv)
        stats.recomputed, stats.token_layers_recomputed = repair.recomputed.tolist(), repair.token_layers
        stats.repair_s = time.perf_counter() - t0
        stats.load_s = time.perf_counter() - start
        return ids, kv, stats, dirty_from

    def prefill(self, prompt: Prompt) -> SegmentStats:
        """Compute and store (in the background) every cached segment of ``prompt`` that is not stored yet, in its
        caching context; nothing is assembled or repaired. ``segments_loaded`` counts only the shared prefix when it
        had to be loaded to compute a segment after it."""
        start = time.perf_counter()
        pieces = self.tokens(prompt)
        stats = SegmentStats(prompt_tokens=sum(len(p) for p in pieces))
        units = self._units(prompt, pieces)
        resolve = self._resolver(prompt, units, stats)
        for unit in units:
            if not all(self.prefixes.backend.exists_many(self._chain(unit.parent, unit.ids))):
                resolve(unit)
        stats.prefill_s = time.perf_counter() - start
        return stats

    # ------------------------------------------------------------------------------------------------- internals
    def _units(self, prompt: Prompt, pieces: list[torch.Tensor]) -> list[_Unit]:
        """The cached units: the shared prefix (if declared) as one unit, then each other cached segment."""
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        k = prompt.shared_prefix
        cached = sum(1 for s in prompt.parts if s.cache)
        units, parent, origin = [], None, 0
        if k:
            prefix = torch.cat(pieces[:k])
            units.append(_Unit(ids=prefix, parent=None, origin=0, start=0))
            parent, origin = self._chain(None, prefix)[-1], len(prefix)
        for i in range(k, cached):
            units.append(_Unit(ids=pieces[i], parent=parent, origin=origin, start=starts[i], doc=prompt.parts[i].doc))
        return units

    def _resolver(self, prompt: Prompt, units: list[_Unit], stats: SegmentStats) -> Callable[[_Unit], KVCache]:
        """``resolve(unit)``: the unit's KV (:meth:`_unit_kv`), the shared prefix's loaded or computed only once."""
        memo: list[KVCache] = []

        def context() -> KVCache:
            if not memo:
                memo.append(self._unit_kv(units[0], stats, context))
            return memo[0]

        def resolve(unit: _Unit) -> KVCache:
            return context() if prompt.shared_prefix and unit is units[0] else self._unit_kv(unit, stats, context)

        return resolve

    def _chain(self, parent: str | None, ids: torch.Tensor) -> list[str]:
        """Chained keys of the chunks of ``ids`` (the last may be partial) after the chunk keyed ``parent``."""
        keys, c = [], self.prefixes.chunk_tokens
        for a in range(0, len(ids), c):
            parent = self.prefixes.keys.chunk_key(parent, ids[a : a + c])
            keys.append(parent)
        return keys

    def _check_movable(self) -> None:
        """:class:`UnsupportedModelError` unless every layer's keys can be moved with its RoPE (refuses dynamic
        scaling, whose frequencies depend on the sequence length)."""
        spec = self.prefixes.spec
        for rope_spec in spec.layer_ropes or (spec.rope,):
            rope.inverse_frequencies(rope_spec, spec.head_dim)

    def _unit_kv(self, unit: _Unit, stats: SegmentStats, context: Callable[[], KVCache]) -> KVCache:
        """The unit's KV at its caching positions: loaded, or computed in its caching context (``context()``: the
        shared prefix's KV) and queued for storing."""
        keys = self._chain(unit.parent, unit.ids)
        kv = self._load(unit, keys)
        if kv is not None:
            stats.segments_loaded += 1
            return kv
        if unit.parent is None:
            kv, _ = prefill(self.prefixes.model, self.prefixes.spec, unit.ids)
        else:
            prefix = context()
            cache = prefix.to_hf()
            forward(self.prefixes.model, unit.ids, cache)
            assert prefix.token_ids is not None
            kv = KVCache.from_hf(cache, self.prefixes.spec, token_ids=torch.cat([prefix.token_ids, unit.ids]),
                                 span=(unit.origin, unit.origin + len(unit.ids)))
        stats.segments_computed += 1
        self.submit(self._save, kv, keys)
        if unit.doc is not None:  # after the chunks (one writer thread, in order): a record names a stored version
            self.submit(self._save_version, unit)
        return kv

    def _edit(self, unit: _Unit) -> Edit | None:
        """How ``unit`` derives from the stored older version of its document, or ``None`` (no document id, this
        version stored, or no older version stored in this caching context)."""
        if unit.doc is None:
            return None
        store = self.prefixes.backend
        if all(store.exists_many(self._chain(unit.parent, unit.ids))):
            return None
        old = decode_version(store.get(version_key(self.prefixes.keys, unit.parent, unit.doc)), unit.doc)
        if old is None or not all(store.exists_many(self._chain(unit.parent, old))):
            return None
        return Edit.diff(old, unit.ids)

    def _edited_kv(self, unit: _Unit, edit: Edit, stats: SegmentStats) -> KVCache | None:
        """The new version's KV derived from the stored old one (:meth:`Edit.apply`), or ``None`` if the old one can
        no longer be loaded (the unit is then resolved as a miss, and its edited tokens recomputed all the same)."""
        old = _Unit(ids=edit.old, parent=unit.parent, origin=unit.origin, start=unit.start, doc=unit.doc)
        old_kv = self._load(old, self._chain(unit.parent, edit.old))
        if old_kv is None:
            return None
        stats.segments_loaded += 1
        stats.segments_edited += 1
        return edit.apply(old_kv, unit.ids)

    def _save_version(self, unit: _Unit) -> int:
        """Store the version record of ``unit``'s document: this version is the base of later edits."""
        assert unit.doc is not None
        self.prefixes.backend.put(version_key(self.prefixes.keys, unit.parent, unit.doc),
                                  encode_version(unit.doc, unit.ids))
        return 1

    def _load(self, unit: _Unit, keys: list[str]) -> KVCache | None:
        """The unit's KV from the store in one buffer, or ``None`` if any chunk is missing or undecodable."""
        store, c = self.prefixes.backend, self.prefixes.chunk_tokens
        if not all(store.exists_many(keys)):
            return None
        kv = KVCache.empty(self.prefixes.spec, len(unit.ids), start_position=unit.origin)
        kv.token_ids = unit.ids.clone()
        for i, blob in enumerate(store.get_many(keys)):
            a = i * c
            try:
                if blob is None:
                    return None
                part = self.prefixes.the_codec.decode(blob, self.prefixes.spec, token_ids=unit.ids[a : a + c],
                                                      out=kv[a : a + c])
            except KvpackError as exc:
                warnings.warn(f"kvpack: segment chunk {keys[i][:12]} could not be decoded ({exc}); computing the "
                              "segment instead", stacklevel=3)
                return None
            if int(part.positions[0]) != unit.origin + a:
                return None
        return kv

    def _save(self, kv: KVCache, keys: list[str]) -> int:
        """Encode and store the unit's chunks under ``keys``; how many."""
        for key, part in zip(keys, kv.chunks(self.prefixes.chunk_tokens), strict=True):
            self.prefixes.backend.put(key, self.prefixes.the_codec.encode(part))
        return len(keys)

    def _place(self, unit: _Unit, source: KVCache, kv: KVCache, hit: int, limit: int) -> None:
        """Copy the unit's rows in ``[hit, limit)`` into ``kv``, keys re-rotated when the unit moved."""
        a, b = max(unit.start, hit), min(unit.stop, limit)
        rows = source[a - unit.start : b - unit.start]
        target = kv.data[:, :, :, a:b]
        target[:, 1].copy_(rows.data[:, 1])
        if unit.moved:
            spec = kv.spec
            target[:, 0].copy_(rope.by_layer(lambda k, r: rope.rerotate(k, rows.positions, kv.positions[a:b], r,
                                                                        spec.head_dim), rows.data[:, 0], spec))
        else:
            target[:, 0].copy_(rows.data[:, 0])
