"""Encryption at rest: :class:`EncryptedStore` seals every entry with AES-256-GCM before it reaches a store.

A KV cache can be inverted back to the text it was computed from, so a stored chunk is as sensitive as the prompt.
The sealed entry (the *envelope*) is itself a small kvpack container, so every backend stores and checks it like any
other entry::

    header   {"envelope": "kvpack/aes-256-gcm/v1", "key_id": "2026-12", "nonce": "<24 hex>"}   (clear text)
    section  "sealed": AES-256-GCM(key, nonce, plaintext entry, aad) = ciphertext || 16-byte tag

    aad = field(b"kvpack/envelope/v1") || field(namespace) || field(key_id) || field(store key)

- A fresh random 96-bit nonce per entry; the key id in the clear header says which key of the namespace's
  :class:`KeyRing` sealed it. New entries use the ring's current key; entries sealed with older keys in the ring stay
  readable (rotation). Rotate well before 2**32 entries per key (the bound for random GCM nonces).
- The associated data binds an envelope to its namespace and its store key: an envelope copied under another key,
  or into another namespace, fails authentication.
- A wrong or missing key, a tampered envelope, or a plain (unsealed) entry where a sealed one belongs is a miss,
  counted in :class:`EncryptedStoreStats`, never an exception and never someone else's bytes. Such entries are not
  deleted (another process may hold the key); the next put of that key replaces them.

Keys come from the secrets file (``$KVPACK_SECRETS_FILE``, table ``[namespaces."NS"]``: ``encryption_keys`` maps key
ids to 64 hex characters, ``encryption_key`` names the current one) or from ``$KVPACK_ENCRYPTION_KEYS_<NS>`` as
``ID:HEX,ID:HEX`` (the first is current). Needs the ``cryptography`` package, the extra ``kvpack[crypto]``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from kvpack.errors import FormatError, StoreError
from kvpack.format import read_container, write_container
from kvpack.keys import env_name, namespace_settings
from kvpack.store.base import Store, StoreStats

ENVELOPE_KIND = "kvpack/aes-256-gcm/v1"
AAD_TAG = b"kvpack/envelope/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
ENCRYPTION_KEYS_ENV_PREFIX = "KVPACK_ENCRYPTION_KEYS_"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LEN = struct.Struct("<Q")


def cryptography_api() -> tuple[Any, type[Exception]]:
    """``AESGCM`` and ``InvalidTag`` of the ``cryptography`` package, or :class:`StoreError` naming the extra."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise StoreError(
            f"encrypted stores need the cryptography package ({exc}); install kvpack[crypto]: "
            "pip install 'kvpack[crypto]'"
        ) from exc
    return AESGCM, InvalidTag


@dataclass(frozen=True)
class KeyRing:
    """The AES-256 keys of one namespace: ``current`` seals new entries, every key opens entries it sealed.

    Attributes:
        keys: key id (``[A-Za-z0-9._-]``, at most 64 characters) -> 32-byte key. Not shown in ``repr``.
        current: the id of the key new entries use.
    """

    keys: Mapping[str, bytes] = field(repr=False)
    current: str

    def __post_init__(self) -> None:
        if not isinstance(self.keys, Mapping) or not self.keys:
            raise ValueError("a key ring needs at least one key")
        for key_id, key in self.keys.items():
            if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
                raise ValueError(f"key ids are 1 to 64 characters from [A-Za-z0-9._-], got {key_id!r}")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must be {KEY_BYTES} bytes (64 hex characters)")
        if self.current not in self.keys:
            raise ValueError(f"the current key {self.current!r} is not in the ring ({sorted(self.keys)})")
        object.__setattr__(self, "keys", dict(self.keys))

    @classmethod
    def load(cls, namespace: str, secrets_file: str | os.PathLike[str] | None = None) -> KeyRing:
        """The ring of ``namespace``: ``$KVPACK_ENCRYPTION_KEYS_<NS>`` (``ID:HEX,ID:HEX``, the first current), else
        ``encryption_keys``/``encryption_key`` in the secrets file. :class:`StoreError` if neither has one or it is
        malformed (the message names the source, never a key)."""
        variable = env_name(ENCRYPTION_KEYS_ENV_PREFIX, namespace)
        try:
            if os.environ.get(variable):
                pairs = [item.strip().partition(":") for item in os.environ[variable].split(",")]
                if not all(sep for _, sep, _ in pairs):
                    raise ValueError("expected ID:HEX,ID:HEX,... (the first key is current)")
                return cls(keys={kid: _hex_key(kid, text) for kid, _, text in pairs}, current=pairs[0][0])
            table = namespace_settings(namespace, secrets_file)
            if "encryption_keys" in table:
                keys = table["encryption_keys"]
                if not isinstance(keys, dict):
                    raise ValueError("encryption_keys must be a table of key id = \"64 hex characters\"")
                return cls(keys={kid: _hex_key(kid, text) for kid, text in keys.items()},
                           current=table.get("encryption_key", ""))
        except ValueError as exc:
            raise StoreError(f"bad encryption keys for namespace {namespace!r}: {exc}") from None
        raise StoreError(
            f"no encryption keys for namespace {namespace!r}: set ${variable}=ID:HEX or add encryption_keys and "
            f"encryption_key to [namespaces.\"{namespace}\"] in the secrets file ($KVPACK_SECRETS_FILE)"
        )


def _hex_key(key_id: str, text: object) -> bytes:
    try:
        key = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key {key_id!r} must be 64 hex characters (32 bytes)")
    return key


@dataclass(frozen=True)
class EncryptedStoreStats(StoreStats):
    """:class:`~kvpack.store.base.StoreStats` plus why sealed entries could not be opened (each also a miss).

    Attributes:
        missing_keys: entries sealed with a key id this ring lacks (another tenant's, or a key removed too early).
        auth_failures: entries whose tag did not verify: tampered, moved to another key or namespace, or a key id
            that names a different key here.
        unsealed_entries: entries that are not envelopes at all (written unencrypted, or foreign bytes).
    """

    missing_keys: int = 0
    auth_failures: int = 0
    unsealed_entries: int = 0


def _aad(namespace: str, key_id: str, key: str) -> bytes:
    return b"".join(_LEN.pack(len(part)) + part for part in
                    (AAD_TAG, namespace.encode("utf-8"), key_id.encode("ascii"), key.encode("ascii")))


class EncryptedStore(Store):
    """Seals entries of ``namespace`` with its :class:`KeyRing` before they reach ``inner`` (any store).

    ``keyring`` defaults to :meth:`KeyRing.load` (environment or secrets file). Construction raises
    :class:`StoreError` if ``cryptography`` is missing or the namespace has no keys. ``get_range`` reads and opens
    the whole entry (GCM authenticates all of it or nothing), then slices.
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = ()  # the inner store degrades its own failures

    def __init__(
        self,
        inner: Store,
        namespace: str,
        keyring: KeyRing | None = None,
        *,
        secrets_file: str | os.PathLike[str] | None = None,
        close_inner: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(inner, Store):
            raise ValueError(f"inner must be a Store, got {type(inner).__name__}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        aesgcm, self._invalid_tag = cryptography_api()
        self.inner = inner
        self.namespace = namespace
        self.keyring = keyring if keyring is not None else KeyRing.load(namespace, secrets_file)
        self._ciphers = {kid: aesgcm(key) for kid, key in self.keyring.keys.items()}
        self._close_inner = close_inner
        self._why = {"missing_keys": 0, "auth_failures": 0, "unsealed_entries": 0}

    def __repr__(self) -> str:
        return f"EncryptedStore({self.inner!r}, namespace={self.namespace!r}, key={self.keyring.current!r})"

    def stats(self) -> EncryptedStoreStats:
        """The usual counters (misses include the entries that could not be opened) and why they could not."""
        base = super().stats()
        with self._stats_lock:
            why = dict(self._why)
        return EncryptedStoreStats(**{f.name: getattr(base, f.name) for f in fields(StoreStats)}, **why)

    def seal(self, key: str, data: bytes) -> bytes:
        """The envelope of ``data`` stored under ``key``, sealed with the current key and a fresh nonce."""
        key_id = self.keyring.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, data, _aad(self.namespace, key_id, key))
        return write_container({"envelope": ENVELOPE_KIND, "key_id": key_id, "nonce": nonce.hex()}, {"sealed": sealed})

    def open_envelope(self, key: str, envelope: bytes) -> bytes | None:
        """The plaintext of an envelope stored under ``key``, or ``None`` (counted) if it cannot be opened."""
        try:
            container = read_container(envelope)
            header = container.header
            key_id, nonce = header.get("key_id"), bytes.fromhex(header.get("nonce", ""))
            sealed = container.section("sealed")
            if header.get("envelope") != ENVELOPE_KIND or not isinstance(key_id, str) or len(nonce) != NONCE_BYTES:
                raise FormatError("not a kvpack envelope")
        except (FormatError, ValueError, TypeError, AttributeError):
            self._count_why(unsealed_entries=1)
            return None
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            self._count_why(missing_keys=1)
            return None
        try:
            return bytes(cipher.decrypt(nonce, bytes(sealed), _aad(self.namespace, key_id, key)))
        except self._invalid_tag:
            self._count_why(auth_failures=1)
            return None

    # ------------------------------------------------------------------------------------------ raw operations
    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        envelopes = self.inner.get_many(keys)
        return [None if env is None else self.open_envelope(k, env) for k, env in zip(keys, envelopes, strict=True)]

    def _write(self, key: str, data: bytes) -> bool:
        self.inner.put(key, self.seal(key, data))
        return True

    def _exists(self, key: str) -> bool:
        return self.inner.contains(key)

    def _exists_many(self, keys: list[str]) -> list[bool]:
        return self.inner.exists_many(keys)

    def _remove(self, key: str) -> bool:
        return self.inner.delete(key)

    def _usage(self) -> tuple[int, int] | None:
        inner = self.inner.stats()
        if inner.entries is None or inner.bytes_stored is None:
            return None
        return inner.entries, inner.bytes_stored

    def _close(self) -> None:
        if self._close_inner:
            self.inner.close()

    def _count_why(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._why[name] += delta
