"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...) through boto3.

- Object name = ``prefix + key`` in one bucket. Entries are immutable and content-addressed, so several processes
  on several machines may share a bucket and prefix: concurrent writers of one key write the same bytes.
- ``get_many`` fetches objects concurrently on a small thread pool (``max_workers``); ``get_range`` sends one
  ranged ``GET`` (``Range: bytes=a-b``) and returns raw, unverified bytes.
- Every request is bounded: ``connect_timeout``, ``read_timeout`` and at most ``max_attempts`` tries (botocore's
  ``standard`` retry mode, which retries throttling, 5xx and connection errors with jittered backoff).
- A failure after the retries (server down or killed mid-request, 5xx, timeout, denied access, missing bucket) is
  degraded by the :class:`~kvpack.store.base.Store` layer: reads miss, writes are skipped, ``errors`` counts them,
  one :class:`~kvpack.store.base.StoreWarning` per failure streak.
- Credentials come from boto3's usual chain (environment, ``~/.aws``, instance or container roles); the store
  never takes them as arguments.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from kvpack.errors import StoreError

try:
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError as URLLib3Error
except ImportError as exc:  # boto3 is the optional extra kvpack[s3]
    raise StoreError(f"S3 stores need boto3 ({exc}); install kvpack[s3]: pip install 'kvpack[s3]'") from exc

from kvpack.store.base import Store

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:/-]{0,200}")
_ABSENT = ("404", "NoSuchKey", "NotFound")
_EMPTY_RANGE = ("416", "InvalidRange")


@dataclass(frozen=True)
class S3StoreConfig:
    """Settings of an :class:`S3Store`.

    Attributes:
        bucket: an existing bucket (3-63 characters from ``[a-z0-9.-]``).
        prefix: prepended to every key (``[A-Za-z0-9._:/-]``, at most 200 characters), e.g. ``"prod/"``.
        endpoint_url: the server for S3-compatible storage (``http://127.0.0.1:8333``); ``None`` for AWS.
        region: the region name, or ``None`` for boto3's default.
        connect_timeout: seconds a connection attempt may take.
        read_timeout: seconds a response may stall before the attempt fails.
        max_attempts: tries per request, the first included (1 means no retry).
        max_workers: concurrent requests of one ``get_many`` or ``exists_many``.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    max_attempts: int = 2
    max_workers: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.bucket, str) or not _BUCKET_RE.fullmatch(self.bucket):
            raise ValueError(f"bucket must be 3 to 63 characters from [a-z0-9.-], got {self.bucket!r}")
        if not isinstance(self.prefix, str) or not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"prefix must be at most 200 characters from [A-Za-z0-9._:/-], got {self.prefix!r}")
        if self.endpoint_url is not None and not re.fullmatch(r"https?://[^\s/]+/?", str(self.endpoint_url)):
            raise ValueError(f"endpoint_url must be http(s)://HOST[:PORT], got {self.endpoint_url!r}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name, top in (("max_attempts", 10), ("max_workers", 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise ValueError(f"{name} must be an int from 1 to {top}, got {value!r}")


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status)


class S3Store(Store):
    """Entries as objects ``prefix + key`` in ``bucket``; see the module docstring for what is guaranteed.

    Construction does not contact the server (a server that is down at start-up is just a failure streak).
    Bad settings raise :class:`ValueError`.
    """

    # URLLib3Error: a server killed while a response body streams in (botocore passes urllib3's ProtocolError on)
    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (BotoCoreError, ClientError, URLLib3Error, OSError)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
        max_workers: int = 8,
    ) -> None:
        super().__init__()
        self.config = S3StoreConfig(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint_url,
            region=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_workers=max_workers,
        )
        boto_config = BotoConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_workers,
        )
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=boto_config
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvpack-s3")

    def __repr__(self) -> str:
        where = f", endpoint_url={self.config.endpoint_url!r}" if self.config.endpoint_url else ""
        return f"S3Store({self.config.bucket!r}, prefix={self.config.prefix!r}{where})"

    def object_name(self, key: str) -> str:
        """The object name that holds ``key``'s entry."""
        return self.config.prefix + key

    # ------------------------------------------------------------------------------------------ raw operations
    def _get_one(self, key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.config.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if _code(exc) in _ABSENT:
                return None
            raise
        with response["Body"] as body:
            return bytes(body.read())

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        if len(keys) == 1:
            return [self._get_one(keys[0])]
        return list(self._pool.map(self._get_one, keys))

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        if stop == start:
            return b"" if self._exists(key) else None
        try:
            response = self._client.get_object(
                Bucket=self.config.bucket, Key=self.object_name(key), Range=f"bytes={start}-{stop - 1}"
            )
        except ClientError as exc:
            code = _code(exc)
            if code in _ABSENT:
                return None
            if code in _EMPTY_RANGE:  # start at or past the end of an existing object
                return b""
            raise
        with response["Body"] as body:
            data = bytes(body.read())
        if "ContentRange" not in response:  # a server that ignored Range sent the whole object
            data = data[start:stop]
        return data

    def _write(self, key: str, data: bytes) -> bool:
        self._client.put_object(Bucket=self.config.bucket, Key=self.object_name(key), Body=data)
        return True

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if _code(exc) in _ABSENT:
                return False
            raise
        return True

    def _exists_many(self, keys: list[str]) -> list[bool]:
        return list(self._pool.map(self._exists, keys))

    def _remove(self, key: str) -> bool:
        # DELETE answers 204 whether or not the object existed, so ask first.
        if not self._exists(key):
            return False
        self._client.delete_object(Bucket=self.config.bucket, Key=self.object_name(key))
        return True

    def _usage(self) -> None:
        return None  # counting would list the whole prefix

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
