"""Edited documents: derive a new version's KV from a stored older version (PIE, Song et al., arXiv 2407.03157).

PIE (Positional Integrity Encoding) targets code editing: after an edit, the cached K/V of the tokens after the edit
are still usable once their keys are rotated to the tokens' new positions (RoPE makes that an exact change of
position), and only the edited tokens need computing; it reports over 85% less compute than full recompute at close
to full-recompute quality (REFERENCES §5). Implemented here exactly as that: the new version's tokens are aligned to
the old version's by a token-level diff (:class:`difflib.SequenceMatcher`, no junk heuristic); every token the diff
keeps takes the old K/V with keys re-rotated from its old position to its new one (values unchanged); inserted and
replaced tokens have no K/V and are always recomputed (the assembly adds them to the repair set, so the ``none``
policy on an edited segment is PIE, and other policies add their own repair set on top). Tokens before the first
change are exact. Simplified: PIE updates the cache in place inside the serving engine; here the new version is
assembled per request and not stored (its K/V is not what the model computes for it, so storing it under the new
version's keys would be wrong): the stored version stays the base of later edits until ``ContextCache.prefill``
stores a new one.

Finding the old version needs only a document id (``Segment(..., doc="src/app.py")``): when a segment with an id is
computed and stored, a *version record* (a container of kind ``kvpack/doc-version`` holding the version's token ids)
is stored under :func:`version_key`, per caching context.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import torch

from kvpack import rope
from kvpack.codecs.validate import MAX_TOKENS
from kvpack.errors import FormatError
from kvpack.format import read_container, write_container
from kvpack.keys import KeySpace
from kvpack.kv import KVCache

VERSION_KIND = "kvpack/doc-version"


def version_key(keys: KeySpace, parent: str | None, doc: str) -> str:
    """The key of document ``doc``'s version record in the caching context after the chunk keyed ``parent``.

    ``chunk_key(chunk_key(parent, []), utf8(doc))``: no unit has an empty chunk, so no chunk is ever chained after
    ``chunk_key(parent, [])`` and records never share a key with chunks; like chunk keys, it is keyed by the
    namespace's secret.
    """
    if not doc:
        raise ValueError("a document id must be a non-empty string")
    return keys.chunk_key(keys.chunk_key(parent, []), list(doc.encode("utf-8")))


def encode_version(doc: str, ids: torch.Tensor) -> bytes:
    """A version record: the token ids ``[n]`` of the stored version of ``doc``."""
    data = ids.to(torch.int64).numpy().astype("<i8").tobytes()
    return write_container({"kind": VERSION_KIND, "doc": doc, "tokens": len(ids)}, {"token_ids": data})


def decode_version(blob: bytes | None, doc: str) -> torch.Tensor | None:
    """The token ids of a version record of ``doc``, or ``None`` if ``blob`` is absent or not such a record."""
    if blob is None:
        return None
    try:
        container = read_container(blob)
        header, section = container.header, container.section("token_ids")
    except FormatError:
        return None
    count = header.get("tokens")
    if (header.get("kind") != VERSION_KIND or header.get("doc") != doc or not isinstance(count, int)
            or isinstance(count, bool) or not 0 < count <= MAX_TOKENS or len(section) != 8 * count):
        return None
    return torch.from_numpy(np.frombuffer(section, dtype="<i8").astype(np.int64))


@dataclass(frozen=True)
class Edit:
    """How a new version's tokens ``[n]`` derive from an old version's ``old [m]``.

    ``source[j]`` is the index in ``old`` of new token ``j`` (kept by the diff), or -1 for an inserted or replaced
    token; ``first_change`` the first ``j`` whose K/V from the old version is not exact (``source[j] != j``; ``n``
    when the new version is a prefix of the old one).
    """

    old: torch.Tensor
    source: torch.Tensor
    first_change: int

    @classmethod
    def diff(cls, old: torch.Tensor, new: torch.Tensor) -> Edit:
        """Align ``new`` to ``old`` with a token-level diff."""
        source = torch.full((len(new),), -1, dtype=torch.int64)
        matcher = difflib.SequenceMatcher(None, old.tolist(), new.tolist(), autojunk=False)
        for block in matcher.get_matching_blocks():
            source[block.b : block.b + block.size] = torch.arange(block.a, block.a + block.size)
        same = source == torch.arange(len(new))
        first = len(new) if bool(same.all()) else int((~same).nonzero()[0])
        return cls(old=old, source=source, first_change=first)

    @property
    def edited(self) -> torch.Tensor:
        """Indices ``[e]`` of the new tokens that have no K/V in the old version (to recompute)."""
        return (self.source < 0).nonzero().reshape(-1)

    def apply(self, old_kv: KVCache, new_ids: torch.Tensor) -> KVCache:
        """The new version's KV at the old version's caching positions (``old_kv.positions[0]`` on): kept tokens'
        K/V copied, keys re-rotated where the token's position changed; edited tokens' rows zero (recomputed)."""
        spec = old_kv.spec
        origin = int(old_kv.positions[0])
        kv = KVCache.empty(spec, len(new_ids), start_position=origin)
        kv.token_ids = new_ids.clone()
        kv.data.zero_()
        kept = (self.source >= 0).nonzero().reshape(-1)
        src = self.source[kept]
        kv.data[:, :, :, kept] = old_kv.data[:, :, :, src]
        moved, frm = kept[src != kept], src[src != kept]  # tokens at their old position keep their bytes
        kv.data[:, 0, :, moved] = rope.by_layer(
            lambda k, r: rope.rerotate(k, old_kv.positions[frm], kv.positions[moved], r, spec.head_dim),
            old_kv.data[:, 0, :, frm], spec).to(spec.torch_dtype)
        return kv
