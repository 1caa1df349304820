"""Chained, content-addressed chunk keys.

A token sequence is cut into chunks of ``chunk_tokens`` tokens; every *full* chunk gets a key (a trailing partial
chunk gets none: it is recomputed, never stored). A chunk's key is the BLAKE2b-256 digest (lowercase hex, 64
characters) of a canonical byte string::

    field(b"kvpack/chunk-key/v1")          domain and version tag
    field(namespace as UTF-8)              tenant isolation
    field(model_fingerprint as UTF-8)      which model the cache belongs to
    field(codec_id as UTF-8)               codec name + parameters + profile hash, as the codec states them
    field(parent key as 32 raw bytes)      empty for the first chunk
    field(token ids as little-endian int64)

where ``field(b) = len(b) as 8-byte little-endian unsigned || b``. Because the parent's key is part of the input,
a key names the whole prefix up to and including its chunk, not just the chunk's tokens. Only ``hashlib`` and
explicit byte encodings are involved (never Python's salted ``hash()``), so keys are identical in every process, on
every machine. The full specification is in docs/store.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

    TokenIds: TypeAlias = Sequence[int] | np.ndarray | torch.Tensor

KEY_TAG = b"kvpack/chunk-key/v1"
DIGEST_BYTES = 32
KEY_CHARS = 2 * DIGEST_BYTES
DEFAULT_CHUNK_TOKENS = 256

_LEN = struct.Struct("<Q")


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _utf8(name: str, value: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not encodable as UTF-8: {exc}") from None


def _as_int64(token_ids: Any) -> np.ndarray:
    """Token ids as a 1-D little-endian int64 array; a ``[1, n]`` batch of one is accepted too."""
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # a torch.Tensor, possibly on a GPU
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be 1-D (or [1, n]), got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<i8")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("token ids do not fit in int64")
    if int(arr.min()) < 0:
        raise ValueError(f"token ids must be non-negative, got {int(arr.min())}")
    return arr.astype("<i8", copy=False)


@dataclass(frozen=True)
class KeySpace:
    """Everything besides the tokens that a chunk key depends on; derives the keys of token sequences.

    Attributes:
        namespace: isolates tenants or deployments; keys of one namespace never equal keys of another.
        model_fingerprint: the model's fingerprint (config, weights, tokenizer), e.g. ``ModelSpec.fingerprint``.
        codec_id: the codec's identity string, including its parameters and profile hash.
        chunk_tokens: tokens per chunk (256 by default).
    """

    namespace: str
    model_fingerprint: str
    codec_id: str
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        _utf8("namespace", self.namespace)
        _utf8("model_fingerprint", self.model_fingerprint)
        _utf8("codec_id", self.codec_id)
        if not isinstance(self.chunk_tokens, int) or isinstance(self.chunk_tokens, bool) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")

    def _prelude(self) -> bytes:
        return b"".join(
            _field(part)
            for part in (
                KEY_TAG,
                self.namespace.encode("utf-8"),
                self.model_fingerprint.encode("utf-8"),
                self.codec_id.encode("utf-8"),
            )
        )

    def chunk_key(self, parent: str | None, chunk_token_ids: TokenIds) -> str:
        """The key of one chunk (of any length) following the chunk keyed ``parent`` (``None`` for the first)."""
        return self._key(self._prelude(), _parent_bytes(parent), _as_int64(chunk_token_ids))

    def iter_keys(self, token_ids: TokenIds) -> Iterator[str]:
        """Yield the keys of the full chunks of ``token_ids`` in order, each chained to the previous one."""
        ids = _as_int64(token_ids)
        prelude = self._prelude()
        parent = b""
        n = self.chunk_tokens
        for start in range(0, len(ids) - n + 1, n):
            key = self._key(prelude, parent, ids[start : start + n])
            parent = bytes.fromhex(key)
            yield key

    def keys(self, token_ids: TokenIds) -> list[str]:
        """The keys of the full chunks of ``token_ids`` (``len(token_ids) // chunk_tokens`` of them)."""
        return list(self.iter_keys(token_ids))

    @staticmethod
    def _key(prelude: bytes, parent: bytes, ids: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        h.update(prelude)
        h.update(_field(parent))
        h.update(_LEN.pack(ids.nbytes))
        h.update(ids.tobytes())
        return h.hexdigest()


def _parent_bytes(parent: str | None) -> bytes:
    if parent is None or parent == "":
        return b""
    if not isinstance(parent, str) or len(parent) != KEY_CHARS:
        raise ValueError(f"parent must be a {KEY_CHARS}-character chunk key or None, got {parent!r}")
    try:
        return bytes.fromhex(parent)
    except ValueError:
        raise ValueError(f"parent must be a hex chunk key, got {parent!r}") from None


def chunk_keys(
    *,
    namespace: str,
    model_fingerprint: str,
    codec_id: str,
    token_ids: TokenIds,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> list[str]:
    """One chained key per full chunk of ``token_ids``; see :class:`KeySpace` and the module docstring."""
    space = KeySpace(
        namespace=namespace, model_fingerprint=model_fingerprint, codec_id=codec_id, chunk_tokens=chunk_tokens
    )
    return space.keys(token_ids)
