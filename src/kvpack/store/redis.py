"""Redis / Valkey store through redis-py: shared by every serving process that points at the same server.

- Keys are ``namespace_prefix + key``; reads are batched (pipelined ``MGET`` of ``batch_size`` keys each, one round
  trip per ``get_many``); puts may carry a TTL.
- Timeouts are always set, and a connection error is retried once (immediately, to replace a stale pooled
  connection after a server restart); a timeout is not retried.
- Any server failure (down, killed mid-request, timed out, out of memory) is degraded by the
  :class:`~kvpack.store.base.Store` layer: reads miss, writes are skipped, ``errors`` counts them, one
  :class:`~kvpack.store.base.StoreWarning` per failure streak. The pool reconnects by itself when the server is back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from kvpack.errors import StoreError
from kvpack.store import redact_url
from kvpack.store.base import Store

try:
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # redis-py is the optional extra kvpack[redis]
    raise StoreError(
        f"Redis stores need redis-py ({exc}); install kvpack[redis]: pip install 'kvpack[redis]'"
    ) from exc

_PREFIX_RE = re.compile(r"[A-Za-z0-9._:/-]{0,100}")
_SCHEMES = ("redis://", "rediss://", "unix://")
SOCKET_READ_BYTES = 1 << 20  # redis-py reads 64 KiB at a time by default: half the speed on 1 MB entries


@dataclass(frozen=True)
class RedisStoreConfig:
    """Settings of a :class:`RedisStore`.

    Attributes:
        url: ``redis://[user:password@]HOST:PORT/DB``, ``rediss://...`` (TLS) or ``unix:///path.sock?db=N``.
        namespace_prefix: prepended to every key (``[A-Za-z0-9._:/-]``, at most 100 characters); give each
            deployment its own so that ``FLUSH``-free cleanup (``SCAN`` + ``DEL`` by prefix) stays possible.
        ttl_seconds: expiry set on every put, or ``None`` for none (then rely on ``maxmemory-policy allkeys-lru``).
        socket_timeout: seconds a read or write on the connection may take before the request counts as failed.
        connect_timeout: seconds a connection attempt may take.
        batch_size: keys per ``MGET`` in ``get_many``.
    """

    url: str
    namespace_prefix: str = "kvpack:"
    ttl_seconds: float | None = None
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(_SCHEMES):
            raise ValueError(f"Redis URL must start with one of {', '.join(_SCHEMES)}, got {self.url!r}")
        if not isinstance(self.namespace_prefix, str) or not _PREFIX_RE.fullmatch(self.namespace_prefix):
            raise ValueError(
                f"namespace_prefix must be at most 100 characters from [A-Za-z0-9._:/-], got {self.namespace_prefix!r}"
            )
        if self.ttl_seconds is not None and not (math.isfinite(self.ttl_seconds) and self.ttl_seconds >= 0.001):
            raise ValueError(f"ttl_seconds must be None or at least 0.001, got {self.ttl_seconds!r}")
        for name in ("socket_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")


class RedisStore(Store):
    """Entries in Redis or Valkey under ``namespace_prefix``.

    Connects lazily (a server that is down at construction is just a failure streak). A malformed URL raises
    :class:`StoreError`, bad settings :class:`ValueError`.
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (redis_py.RedisError, OSError)

    def __init__(
        self,
        url: str,
        namespace_prefix: str = "kvpack:",
        ttl_seconds: float | None = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(url, str) or not url.startswith(_SCHEMES):
            raise StoreError(
                f"a Redis store URL starts with one of {', '.join(_SCHEMES)}, got {redact_url(str(url))!r}"
            )
        self.config = RedisStoreConfig(
            url=url,
            namespace_prefix=namespace_prefix,
            ttl_seconds=ttl_seconds,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            batch_size=batch_size,
        )
        try:
            self._client = redis_py.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                socket_read_size=SOCKET_READ_BYTES,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis_py.ConnectionError,)),
            )
            # Builds (without connecting) one connection from the URL's options, so that bad options fail here.
            self._client.connection_pool.make_connection().disconnect()
        except (ValueError, TypeError) as exc:
            raise StoreError(f"bad Redis store URL {redact_url(url)!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"RedisStore({redact_url(self.config.url)!r}, namespace_prefix={self.config.namespace_prefix!r})"

    def _name(self, key: str) -> str:
        return self.config.namespace_prefix + key

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        names = [self._name(k) for k in keys]
        size = self.config.batch_size
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(names), size):
            pipe.mget(names[start : start + size])
        return [value for batch in pipe.execute() for value in batch]

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        # GETRANGE cannot tell an absent key from an empty range (and its end is inclusive, -1 meaning the last
        # byte), so EXISTS goes in the same round trip and an empty range is not sent at all.
        name = self._name(key)
        pipe = self._client.pipeline(transaction=False)
        pipe.exists(name)
        if stop > start:
            pipe.getrange(name, start, stop - 1)
        found, *data = pipe.execute()
        if not found:
            return None
        return bytes(data[0]) if data else b""

    def _write(self, key: str, data: bytes) -> bool:
        ttl = self.config.ttl_seconds
        self._client.set(self._name(key), data, px=None if ttl is None else max(1, round(ttl * 1000)))
        return True

    def _exists(self, key: str) -> bool:
        return bool(self._client.exists(self._name(key)))

    def _exists_many(self, keys: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._name(key))
        return [bool(n) for n in pipe.execute()]

    def _remove(self, key: str) -> bool:
        return bool(self._client.delete(self._name(key)))

    def _usage(self) -> None:
        return None

    def _close(self) -> None:
        self._client.close()
