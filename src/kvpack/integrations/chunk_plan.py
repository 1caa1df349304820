"""What a paged serving engine should load from and save to a kvpack store, step by step: pure arithmetic over token
counts, chunks and blocks, without the engine (the vLLM connector, :mod:`kvpack.integrations.vllm`, drives it).

A request's prompt is cut into chunks of ``chunk_tokens`` tokens with chained keys (:mod:`kvpack.keys`); a chunk is
a whole number of the engine's blocks, so loads and saves are block-aligned. Rules:

- **lookup**: one batched existence query over the keys of the chunks that end before the prompt's last token
  (the engine must compute at least that token to sample from it); the stored run is the leading run of hits.
  The engine asks for the tokens beyond those it has computed itself (its own prefix cache); the answer is the
  stored run minus those, never negative.
- **load**: the chunks overlapping ``[computed, computed + external)`` (the first may be loaded in part, when the
  engine's own prefix cache ends inside it), written into the request's blocks.
- **save**: every full prompt chunk that is in the engine's KV after this step (``computed + scheduled`` tokens)
  and not known to be stored, so long prompts are saved as chunked prefill goes, and a preempted request resumes
  where it was.

The key of a request also covers what changes its KV besides the tokens (:func:`request_fingerprint`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvpack.keys import KeySpace, namespace_secret
from kvpack.store import Store

_LEN = struct.Struct("<Q")
FINGERPRINT_TAG = b"kvpack/request-fingerprint/v1"


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def request_fingerprint(model_fingerprint: str, *, lora: str | None = None, cache_salt: str | None = None,
                        mm_hashes: Sequence[str] = ()) -> str:
    """The fingerprint that keys a request's chunks: the model's own when nothing else changes the KV, else a
    SHA-256 over the model's, the LoRA adapter (name and path), the cache salt and the multimodal inputs' hashes
    (all of them, in order: a request with images only hits chunks made with the same images)."""
    if lora is None and cache_salt is None and not mm_hashes:
        return model_fingerprint
    digest = hashlib.sha256(_field(FINGERPRINT_TAG) + _field(model_fingerprint.encode()))
    digest.update(_field(b"lora") + _field(b"" if lora is None else b"1" + lora.encode()))
    digest.update(_field(b"salt") + _field(b"" if cache_salt is None else b"1" + cache_salt.encode()))
    digest.update(_field(b"mm") + _LEN.pack(len(mm_hashes)) + b"".join(_field(h.encode()) for h in mm_hashes))
    return digest.hexdigest()


def loadable_chunks(prompt_tokens: int, chunk_tokens: int) -> int:
    """Full chunks that end before the prompt's last token: ``(prompt_tokens - 1) // chunk_tokens`` (0 if empty)."""
    return max(0, prompt_tokens - 1) // chunk_tokens


@dataclass(frozen=True)
class ChunkLoad:
    """Write tokens ``[start, stop)`` of the chunk stored under ``key`` (which begins at token ``chunk_start``)."""

    key: str
    chunk_start: int
    start: int
    stop: int


@dataclass(frozen=True)
class ChunkSave:
    """Store tokens ``[start, start + len(token_ids))`` of the request under ``key``."""

    key: str
    start: int
    token_ids: tuple[int, ...]


@dataclass
class RequestWork:
    """One step's loads and saves of one request, and its block table (block ids of its tokens, in order)."""

    req_id: str
    block_ids: list[int]
    loads: list[ChunkLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


@dataclass
class _Tracked:
    token_ids: list[int]
    keys: list[str]
    stored: int  # leading chunks known to be in the store (found by the lookup, or saved since)
    block_ids: list[int] = field(default_factory=list)
    external: int = 0  # tokens to load in the request's next scheduled step


class ChunkPlanner:
    """The scheduler side's state: lookups, and per step which chunks each request loads and saves.

    ``store`` answers the existence queries; keys are those of a :class:`KeySpace` with this ``namespace``,
    ``codec_id``, ``chunk_tokens`` and ``secret`` and the request's fingerprint. ``chunk_tokens`` must be a
    multiple of the engine's ``block_size``.
    """

    def __init__(self, store: Store, *, namespace: str, codec_id: str, chunk_tokens: int, block_size: int,
                 secret: bytes | None = None) -> None:
        if block_size < 1 or chunk_tokens < 1 or chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be a positive multiple of the engine's block size "
                             f"({block_size}), so that chunks are whole blocks")
        self.store = store
        self.chunk_tokens = chunk_tokens
        self.block_size = block_size
        self.namespace, self.codec_id = namespace, codec_id
        self._secret = namespace_secret(namespace) if secret is None else secret
        self._spaces: dict[str, KeySpace] = {}
        self._lookups: dict[str, _Tracked] = {}
        self._requests: dict[str, _Tracked] = {}

    def keys(self, fingerprint: str, token_ids: Sequence[int]) -> list[str]:
        """Chained keys of the full chunks of ``token_ids`` under ``fingerprint``."""
        space = self._spaces.get(fingerprint)
        if space is None:
            space = KeySpace(namespace=self.namespace, model_fingerprint=fingerprint, codec_id=self.codec_id,
                             chunk_tokens=self.chunk_tokens, secret=self._secret)
            self._spaces[fingerprint] = space
        return space.keys(list(token_ids))

    # ------------------------------------------------------------------------------------------- engine calls
    def lookup(self, req_id: str, token_ids: Sequence[int], fingerprint: str, computed: int) -> int:
        """Tokens beyond the ``computed`` ones (the engine's own prefix cache) that the store can supply: a
        multiple of ``chunk_tokens`` minus ``computed``, never reaching the last prompt token. One existence query.
        Remembers the answer for :meth:`allocated`; commits nothing."""
        ids = list(token_ids)
        keys = self.keys(fingerprint, ids)
        usable = keys[: loadable_chunks(len(ids), self.chunk_tokens)]
        found = self.store.exists_many(usable) if usable else []
        run = next((i for i, ok in enumerate(found) if not ok), len(found))
        self._lookups[req_id] = _Tracked(token_ids=ids, keys=keys, stored=run)
        return max(0, run * self.chunk_tokens - computed)

    def allocated(self, req_id: str, external: int) -> None:
        """The engine allocated blocks for the request and will take ``external`` tokens from the store."""
        looked = self._lookups.pop(req_id, None)
        tracked = self._requests.get(req_id)
        if looked is not None:
            if tracked is not None:
                looked.block_ids = tracked.block_ids
            tracked = self._requests[req_id] = looked
        if tracked is not None:
            tracked.external = external

    def scheduled(self, req_id: str, *, computed: int, scheduled: int, block_ids: Sequence[int] | None,
                  replace_blocks: bool) -> RequestWork | None:
        """The request runs this step: ``computed`` tokens are in its KV or loaded this step (external included),
        ``scheduled`` more are computed. ``block_ids`` are its new blocks, appended, or its whole table when
        ``replace_blocks`` (a new or resumed request). ``None`` if it has nothing to load or save."""
        tracked = self._requests.get(req_id)
        if tracked is None:
            return None
        if block_ids is not None:
            tracked.block_ids = list(block_ids) if replace_blocks else tracked.block_ids + list(block_ids)
        work = RequestWork(req_id=req_id, block_ids=list(tracked.block_ids))
        n = self.chunk_tokens
        if tracked.external:
            start, stop = computed - tracked.external, computed
            tracked.external = 0
            for chunk in range(start // n, (stop + n - 1) // n):
                work.loads.append(ChunkLoad(key=tracked.keys[chunk], chunk_start=chunk * n,
                                            start=max(start, chunk * n), stop=min(stop, (chunk + 1) * n)))
        done = min(computed + scheduled, len(tracked.token_ids)) // n
        for chunk in range(tracked.stored, done):
            work.saves.append(ChunkSave(key=tracked.keys[chunk], start=chunk * n,
                                        token_ids=tuple(tracked.token_ids[chunk * n : (chunk + 1) * n])))
        tracked.stored = max(tracked.stored, done)
        return work if work.loads or work.saves else None

    def finished(self, req_id: str) -> None:
        """Forget the request."""
        self._lookups.pop(req_id, None)
        self._requests.pop(req_id, None)


def failed_blocks(work: RequestWork, load: ChunkLoad, block_size: int) -> set[int]:
    """The block ids of the tokens a failed load was to write (the engine recomputes from the first of them)."""
    return {work.block_ids[b] for b in range(load.start // block_size, (load.stop + block_size - 1) // block_size)}
