"""Stores: bytes by key, with every entry a verified kvpack container.

Backends: :class:`MemoryStore` (in-process LRU), :class:`DiskStore` (local files, the embedded default),
:class:`RedisStore` (Redis or Valkey, shared between processes and machines) and :class:`S3Store` (S3-compatible
object storage); :class:`TieredStore` puts several of them in front of each other, :class:`EncryptedStore` seals
the entries of one namespace with AES-256-GCM before they reach any of them. :func:`open` builds one from
a URL or a TOML file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvpack.errors import StoreError
from kvpack.store.base import Store, StoreStats, StoreWarning, validate_key
from kvpack.store.crypto import EncryptedStore, EncryptedStoreStats, KeyRing
from kvpack.store.disk import DiskStore, default_cache_dir
from kvpack.store.memory import MemoryStore
from kvpack.store.tiered import TieredStore, TieredStoreStats, TierStats, open_config, open_tiered_url

if TYPE_CHECKING:
    from kvpack.store.redis import RedisStore
    from kvpack.store.s3 import S3Store

__all__ = [
    "DiskStore",
    "EncryptedStore",
    "EncryptedStoreStats",
    "KeyRing",
    "MemoryStore",
    "RedisStore",
    "S3Store",
    "Store",
    "StoreStats",
    "StoreWarning",
    "TierStats",
    "TieredStore",
    "TieredStoreStats",
    "default_cache_dir",
    "open",
    "redact_url",
    "validate_key",
]


def __getattr__(name: str) -> object:
    """``RedisStore`` and ``S3Store`` on first use: they import redis-py and boto3 (the optional extras
    kvpack[redis] and kvpack[s3]), which plain use of the other stores never needs. Without the package it raises
    :class:`StoreError` naming the extra."""
    if name == "RedisStore":
        from kvpack.store.redis import RedisStore

        return RedisStore
    if name == "S3Store":
        from kvpack.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages)."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


_Options = dict[str, tuple[str, Callable[[str], object]]]
_REDIS_OPTIONS: _Options = {
    "prefix": ("namespace_prefix", str),
    "ttl": ("ttl_seconds", float),
    "socket_timeout": ("socket_timeout", float),
    "connect_timeout": ("connect_timeout", float),
    "batch_size": ("batch_size", int),
}
_FILE_OPTIONS: _Options = {"max_bytes": ("max_bytes", int), "fsync": ("fsync", _parse_bool)}
_MEMORY_OPTIONS: _Options = {"max_bytes": ("max_bytes", int)}
_S3_OPTIONS: _Options = {
    "endpoint": ("endpoint_url", str),
    "region": ("region", str),
    "connect_timeout": ("connect_timeout", float),
    "read_timeout": ("read_timeout", float),
    "max_attempts": ("max_attempts", int),
    "max_workers": ("max_workers", int),
}


def open(url: str) -> Store:
    """Open a store from a URL.

    - ``memory://`` (``?max_bytes=N``): a :class:`MemoryStore`.
    - ``file:///abs/path``, ``file://relative/path``, ``file://~/path`` or a bare path (``?max_bytes=N&fsync=0``):
      a :class:`DiskStore`; ``file://`` alone means the default cache directory.
    - ``redis://HOST:PORT/DB``, ``rediss://...``, ``unix:///path.sock`` with optional ``prefix=``, ``ttl=``
      (seconds), ``socket_timeout=``, ``connect_timeout=``, ``batch_size=``; other query options go to redis-py.
    - ``s3://BUCKET/PREFIX`` with optional ``endpoint=http://HOST:PORT``, ``region=``, ``connect_timeout=``,
      ``read_timeout=``, ``max_attempts=``, ``max_workers=``: an :class:`S3Store` (credentials the boto3 way).
    - ``tiered://URL1|URL2|...``: a :class:`TieredStore` of those stores, fastest first.
    - a path ending in ``.toml``: the store that configuration file describes (:func:`open_config`).

    Raises :class:`StoreError` for an unknown scheme, an unknown or malformed option, an unusable directory, or a
    Redis or S3 URL without its package installed (install kvpack[redis] or kvpack[s3]).
    """
    if not isinstance(url, str) or not url:
        raise StoreError(f"a store URL is a non-empty string, got {url!r}")
    if "://" not in url:
        if url.endswith(".toml"):
            return open_config(url)
        return _build(DiskStore, {"path": url})
    if url.startswith("tiered://"):
        return open_tiered_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path:
            raise StoreError(
                f"memory store URL takes no host or path: {url!r} (use memory:// or memory://?max_bytes=N)"
            )
        return _build(MemoryStore, _options(url, parse_qsl(parts.query), _MEMORY_OPTIONS))
    if scheme == "file":
        kwargs = _options(url, parse_qsl(parts.query), _FILE_OPTIONS)
        location = parts.netloc + parts.path
        return _build(DiskStore, {"path": location or None, **kwargs})
    if scheme in ("redis", "rediss", "unix"):
        ours = [(k, v) for k, v in parse_qsl(parts.query) if k in _REDIS_OPTIONS]
        rest = [(k, v) for k, v in parse_qsl(parts.query) if k not in _REDIS_OPTIONS]
        kwargs = _options(url, ours, _REDIS_OPTIONS)
        from kvpack.store.redis import RedisStore  # StoreError naming kvpack[redis] when redis-py is missing

        return _build(RedisStore, {"url": urlunsplit(parts._replace(query=urlencode(rest))), **kwargs})
    if scheme == "s3":
        kwargs = _options(url, parse_qsl(parts.query), _S3_OPTIONS)
        from kvpack.store.s3 import S3Store  # StoreError naming kvpack[s3] when boto3 is missing

        return _build(S3Store, {"bucket": parts.netloc, "prefix": _s3_prefix(parts.path), **kwargs})
    raise StoreError(
        f"unknown store URL scheme {parts.scheme!r} in {redact_url(url)!r}; use memory://, file://PATH, redis://, "
        "s3://BUCKET/PREFIX, tiered://URL1|URL2 or a .toml file"
    )


def _s3_prefix(path: str) -> str:
    """``/a/b`` -> ``a/b/``: the URL's path names a folder of the bucket."""
    stripped = path.strip("/")
    return f"{stripped}/" if stripped else ""


def _options(url: str, query: list[tuple[str, str]], known: _Options) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, raw in query:
        if name not in known:
            raise StoreError(
                f"unknown option {name!r} in store URL {redact_url(url)!r}; known: {', '.join(sorted(known))}"
            )
        kwarg, parse = known[name]
        try:
            out[kwarg] = parse(raw)
        except ValueError as exc:
            raise StoreError(f"bad value {raw!r} for {name!r} in store URL {redact_url(url)!r}: {exc}") from None
    return out


def _build(factory: Callable[..., Store], kwargs: dict[str, object]) -> Store:
    try:
        return factory(**kwargs)
    except ValueError as exc:
        raise StoreError(f"bad store settings: {exc}") from None
