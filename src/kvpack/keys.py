"""Chained, content-addressed chunk keys, keyed per namespace.

A token sequence is cut into chunks of ``chunk_tokens`` tokens; every *full* chunk gets a key (a trailing partial
chunk gets none: it is recomputed, never stored). A chunk's key is the keyed BLAKE2b-256 digest (lowercase hex, 64
characters; BLAKE2b's key is the namespace's secret) of a canonical byte string::

    field(b"kvpack/chunk-key/v2")          domain and version tag
    field(namespace as UTF-8)              tenant isolation
    field(model_fingerprint as UTF-8)      which model the cache belongs to
    field(codec_id as UTF-8)               codec name + parameters + profile hash, as the codec states them
    field(parent key as 32 raw bytes)      empty for the first chunk
    field(token ids as little-endian int64)

where ``field(b) = len(b) as 8-byte little-endian unsigned || b``. Because the parent's key is part of the input,
a key names the whole prefix up to and including its chunk, not just the chunk's tokens. Only ``hashlib`` and
explicit byte encodings are involved (never Python's salted ``hash()``), so keys are identical in every process, on
every machine that has the same secret.

The secret makes keys unguessable: someone who can list a shared store but lacks the secret cannot compute the key
of a text and so cannot test whether it is cached, and two tenants that pick the same namespace name but have
different secrets never share a key. The secret of a namespace is, in this order: the one given to
:class:`KeySpace`; the hex in ``$KVPACK_KEY_SECRET_<NAMESPACE>``; ``key_secret`` in the namespace's table of the
secrets file (``$KVPACK_SECRETS_FILE``); else the *public* default ``BLAKE2b-256(field(b"kvpack/namespace-secret/v1")
|| field(namespace))``, which keeps keys working without configuration but hides nothing from someone who knows the
namespace name. The full specification is in docs/store.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

    TokenIds: TypeAlias = Sequence[int] | np.ndarray | torch.Tensor

KEY_TAG = b"kvpack/chunk-key/v2"
DEFAULT_SECRET_TAG = b"kvpack/namespace-secret/v1"
DIGEST_BYTES = 32
KEY_CHARS = 2 * DIGEST_BYTES
DEFAULT_CHUNK_TOKENS = 256
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64  # BLAKE2b's key size limit
SECRETS_FILE_ENV = "KVPACK_SECRETS_FILE"
KEY_SECRET_ENV_PREFIX = "KVPACK_KEY_SECRET_"

_LEN = struct.Struct("<Q")


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def env_name(prefix: str, namespace: str) -> str:
    """The environment variable that holds a namespace's setting: ``prefix`` + the namespace upper-cased, every
    character outside ``[A-Z0-9]`` replaced by ``_`` (``tenant-a`` -> ``KVPACK_KEY_SECRET_TENANT_A``). Namespaces
    that differ only in those characters share the variable; give them their secrets in the secrets file."""
    return prefix + re.sub(r"[^A-Z0-9]", "_", namespace.upper())


def namespace_settings(namespace: str, secrets_file: str | os.PathLike[str] | None = None) -> Mapping[str, Any]:
    """The table ``[namespaces."NAMESPACE"]`` of the secrets file (``secrets_file``, else ``$KVPACK_SECRETS_FILE``);
    empty if no file is configured or it has no such table.

    Raises :class:`ValueError` naming the file if it cannot be read or is not valid TOML of that shape.
    """
    location = secrets_file if secrets_file is not None else os.environ.get(SECRETS_FILE_ENV)
    if not location:
        return {}
    path = Path(location).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the kvpack secrets file {path} (${SECRETS_FILE_ENV}): {exc}") from None
    tables = data.get("namespaces", {})
    table = tables.get(namespace, {}) if isinstance(tables, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"the kvpack secrets file {path} must hold tables [namespaces.\"NAME\"]")
    return table


def parse_secret(text: object, what: str) -> bytes:
    """A secret given as hex: :data:`MIN_SECRET_BYTES` to :data:`MAX_SECRET_BYTES` bytes, else :class:`ValueError`."""
    try:
        secret = bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        secret = None
    if secret is None or not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"{what} must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes written as hex (make one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return secret


def default_secret(namespace: str) -> bytes:
    """The public secret of a namespace that has none configured: ``BLAKE2b-256(field(tag) || field(namespace))``."""
    return hashlib.blake2b(
        _field(DEFAULT_SECRET_TAG) + _field(namespace.encode("utf-8")), digest_size=DIGEST_BYTES
    ).digest()


def namespace_secret(namespace: str, secrets_file: str | os.PathLike[str] | None = None) -> bytes:
    """The key-hashing secret of ``namespace``: ``$KVPACK_KEY_SECRET_<NS>``, else ``key_secret`` in the secrets
    file, else :func:`default_secret`."""
    variable = env_name(KEY_SECRET_ENV_PREFIX, namespace)
    if os.environ.get(variable):
        return parse_secret(os.environ[variable], f"${variable}")
    table = namespace_settings(namespace, secrets_file)
    if "key_secret" in table:
        return parse_secret(table["key_secret"], f"key_secret of namespace {namespace!r} in the secrets file")
    return default_secret(namespace)


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
        secret: the namespace's key-hashing secret (16 to 64 bytes); ``None`` looks it up once, at construction
            (:func:`namespace_secret`: environment, secrets file, else the public default). Not shown in ``repr``.
    """

    namespace: str
    model_fingerprint: str
    codec_id: str
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    secret: bytes | None = field(default=None, repr=False)
    _secret: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _utf8("namespace", self.namespace)
        _utf8("model_fingerprint", self.model_fingerprint)
        _utf8("codec_id", self.codec_id)
        if not isinstance(self.chunk_tokens, int) or isinstance(self.chunk_tokens, bool) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")
        if self.secret is None:
            resolved = namespace_secret(self.namespace)
        elif isinstance(self.secret, bytes) and MIN_SECRET_BYTES <= len(self.secret) <= MAX_SECRET_BYTES:
            resolved = self.secret
        else:
            raise ValueError(f"secret must be None or {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
        object.__setattr__(self, "_secret", resolved)

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
        return self._key(self._secret, self._prelude(), _parent_bytes(parent), _as_int64(chunk_token_ids))

    def iter_keys(self, token_ids: TokenIds) -> Iterator[str]:
        """Yield the keys of the full chunks of ``token_ids`` in order, each chained to the previous one."""
        ids = _as_int64(token_ids)
        prelude = self._prelude()
        parent = b""
        n = self.chunk_tokens
        for start in range(0, len(ids) - n + 1, n):
            key = self._key(self._secret, prelude, parent, ids[start : start + n])
            parent = bytes.fromhex(key)
            yield key

    def keys(self, token_ids: TokenIds) -> list[str]:
        """The keys of the full chunks of ``token_ids`` (``len(token_ids) // chunk_tokens`` of them)."""
        return list(self.iter_keys(token_ids))

    @staticmethod
    def _key(secret: bytes, prelude: bytes, parent: bytes, ids: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=DIGEST_BYTES, key=secret)
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
    secret: bytes | None = None,
) -> list[str]:
    """One chained key per full chunk of ``token_ids``; see :class:`KeySpace` and the module docstring."""
    space = KeySpace(
        namespace=namespace,
        model_fingerprint=model_fingerprint,
        codec_id=codec_id,
        chunk_tokens=chunk_tokens,
        secret=secret,
    )
    return space.keys(token_ids)
