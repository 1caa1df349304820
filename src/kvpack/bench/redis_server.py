"""A throwaway ``redis-server`` on a free loopback port, without persistence, for the benchmarks that measure Redis.

with RedisServer(Path(tmp) / "redis") as server:
    store = RedisStore(server.url)

``host`` and ``netns`` run it elsewhere: inside a network namespace, bound to that namespace's address
(:class:`kvpack.bench.links.ShapedLink` does so to put it behind a throttled link).

Readiness is checked with a plain-socket ``PING``, so starting a server needs no redis-py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from kvpack.errors import StoreError

START_TIMEOUT_S = 10.0


def redis_server_available() -> bool:
    """Whether a ``redis-server`` binary is on ``PATH`` (``make redis-server`` installs one on Debian/Ubuntu)."""
    return shutil.which("redis-server") is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` bound to ``host`` (127.0.0.1) on ``port`` (a free one if not given), its files in
    ``workdir``; with ``netns``, started inside that network namespace (``ip netns exec``, as root).

    No RDB snapshots and no AOF: a restart is an empty server. A context manager starts it on entry and stops it
    (and removes ``workdir``) on exit.
    """

    def __init__(self, workdir: Path, port: int | None = None, *, host: str = "127.0.0.1",
                 netns: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.host, self.netns = host, netns
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://HOST:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``; :class:`StoreError` if it cannot."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StoreError("redis-server is not installed; run `make redis-server` or apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        args = ["ip", "netns", "exec", self.netns] if self.netns else []
        args += [binary, "--port", str(self.port), "--bind", self.host, "--protected-mode", "no"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(log)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StoreError(f"redis-server exited with status {self._proc.returncode}; see {log}")
            if _answers_ping(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise StoreError(f"redis-server did not answer on {self.host}:{self.port} within {START_TIMEOUT_S:g} s; "
                         f"see {log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove ``workdir``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
