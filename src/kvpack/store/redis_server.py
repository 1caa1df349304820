"""A throwaway ``redis-server`` on a free loopback port, without persistence: for tests, benchmarks and demos.

with RedisServer(Path(tmp) / "redis") as server:
    store = RedisStore(server.url)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis as redis_py

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


class RedisServer:
    """One ``redis-server`` bound to 127.0.0.1 on ``port`` (a free one if not given), its files in ``workdir``.

    No RDB snapshots and no AOF: a restart is an empty server. A context manager starts it on entry and stops it
    (and removes ``workdir``) on exit. :meth:`kill` and :meth:`signal` simulate crashes and stalls.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_py.Redis:
        """A plain redis-py client with short timeouts, for looking at the server directly."""
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> RedisServer:
        """Start the server (on the same port after a :meth:`kill`) and wait until it answers ``PING``."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StoreError("redis-server is not installed; run `make redis-server` or apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--logfile", str(log)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise StoreError(f"redis-server exited with status {self._proc.returncode}; see {log}")
                try:
                    client.ping()
                    return self
                except (redis_py.ConnectionError, redis_py.TimeoutError):
                    time.sleep(0.05)
        finally:
            client.close()
        self.kill()
        raise StoreError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S:g} s; see {log}")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server (``SIGSTOP``/``SIGCONT`` make it stall and resume)."""
        if self._proc is None:
            raise StoreError("redis-server is not running")
        os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server and reap it: a crash, not a shutdown."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Stop the server (resuming it first if it was stopped) and remove ``workdir``."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)
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
