"""Real servers for tests: a throwaway ``redis-server`` that tests can inspect, crash and stall.

The benchmarks' launcher (:mod:`kvpack.bench.redis_server`) starts and stops the server; this fixture adds a direct
redis-py client and the failure injections the store tests need.
"""

from __future__ import annotations

import os
import signal as signals

import redis as redis_py

from kvpack.bench.redis_server import RedisServer as Launcher
from kvpack.bench.redis_server import redis_server_available
from kvpack.errors import StoreError

__all__ = ["RedisServer", "redis_server_available"]


class RedisServer(Launcher):
    """:class:`kvpack.bench.redis_server.RedisServer` plus :meth:`client`, :meth:`kill` and :meth:`signal`.

    :meth:`start` after :meth:`kill` restarts it on the same port, empty.
    """

    def client(self) -> redis_py.Redis:
        """A plain redis-py client with short timeouts, for looking at the server directly."""
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def signal(self, sig: signals.Signals) -> None:
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
        """Resume the server if a test left it stopped (SIGSTOP), then stop it."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signals.SIGCONT)
        super().stop()
