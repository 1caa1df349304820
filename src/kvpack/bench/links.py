"""Real throttled links: a ``redis-server`` behind a veth pair shaped by the kernel, in its own network namespace.

::

    ok, why = links_available()
    with ShapedLink(1.0) as link:          # 1 Gbit/s each way
        store = RedisStore(link.url)
        ...
        link.set_rate(0.1)                 # mid-run: ``tc qdisc change``

A :class:`ShapedLink` creates a network namespace (a unique name per process and link), a veth pair with one end
inside it, addresses from one free ``10.213.X.Y/30`` for that pair only, a ``tbf`` qdisc (token bucket: rate,
burst, queue latency) on the egress of *both* ends, so requests and replies are both throttled, and a
``redis-server`` inside the namespace bound to its end. Traffic to :attr:`ShapedLink.url` is real TCP through the
kernel's shaper: slow start, queueing and the shaper's bursts are in every measurement, unlike a ``sleep``.

No delay is added: the kernel here has ``tbf`` and ``htb`` but not ``netem``; a benchmark that wants a latency
term adds it in its transport and says so. Through Redis a 1 Gbit/s ``tbf`` carries about 0.8 Gbit/s of values
(TCP/IP and Ethernet headers count against the rate, and Redis adds its own turnaround).

Needs root (``CAP_NET_ADMIN``), iproute2 (``ip``, ``tc``) and ``redis-server``; :func:`links_available` says
whether this machine has them, and why not. Everything is torn down on exit, also after an error, with bounded
waits; a process killed with ``SIGKILL`` leaves its namespace behind (``ip netns list``, names ``kvpack-PID-N``).
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import itertools
import math
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kvpack.bench.redis_server import RedisServer
from kvpack.errors import KvpackError

#: The project's own test addresses: /30 subnets of 10.213.0.0/16, used only on the veth pairs created here.
SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")
COMMAND_TIMEOUT_S = 10.0
MAX_GBPS = 100.0
_LOCK_PATH = Path("/run/lock/kvpack-links.lock")
_serial = itertools.count()
_serial_lock = threading.Lock()


class LinkError(KvpackError):
    """A shaped link could not be set up or torn down (not root, iproute2 or redis-server missing, a command
    failed). The message names the command; :func:`links_available` tells in advance."""


@dataclass(frozen=True)
class LinkShape:
    """How a :class:`ShapedLink` shapes traffic, besides its rate.

    Attributes:
        burst_ms: the token bucket's depth as time at the rate (bytes the link may send back to back); at least
            64 KiB, so one GSO segment always fits.
        queue_ms: tbf ``latency``: the longest a packet may wait in the shaper's queue (beyond that, it is dropped
            and TCP backs off, as at a real bottleneck).
        port: the Redis port inside the namespace.
    """

    burst_ms: float = 5.0
    queue_ms: float = 20.0
    port: int = 6379

    def __post_init__(self) -> None:
        for name in ("burst_ms", "queue_ms"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1000):
                raise ValueError(f"{name} must be in (0, 1000] milliseconds, got {value!r}")
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"port must be in [1, 65535], got {self.port!r}")


def _check_rate(gbps: float) -> float:
    if not (isinstance(gbps, int | float) and math.isfinite(gbps) and 0 < gbps <= MAX_GBPS):
        raise ValueError(f"a link rate must be in (0, {MAX_GBPS:g}] Gbit/s, got {gbps!r}")
    return float(gbps)


def _run(*args: str) -> None:
    """Run one iproute2 command (bounded); :class:`LinkError` with its stderr if it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinkError(f"`{' '.join(args)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise LinkError(f"`{' '.join(args)}` failed with status {done.returncode}: {done.stderr.strip()}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks on the interfaces of this (root) namespace."""
    try:
        done = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LinkError(f"`ip -4 -o addr show` failed ({exc}); is iproute2 installed?") from exc
    words = done.stdout.split()
    return [ipaddress.IPv4Interface(w).network for prev, w in itertools.pairwise(words) if prev == "inet"]


class ShapedLink:
    """A ``redis-server`` at :attr:`url`, reached over a veth pair shaped to ``gbps`` each way (module docstring).

    A context manager: entering builds the namespace, the link and the server (:class:`LinkError` if it cannot,
    with everything built so far removed again); leaving removes them all. :meth:`set_rate` changes the rate while
    it runs. Not reusable after exit.
    """

    def __init__(self, gbps: float, shape: LinkShape | None = None) -> None:
        self.gbps = _check_rate(gbps)
        self.shape = shape or LinkShape()
        with _serial_lock:
            serial = next(_serial)
        pid = os.getpid()
        self.netns = f"kvpack-{pid}-{serial}"
        self.host_dev = f"kvh{pid:06x}{serial % 4096:03x}"  # interface names have at most 15 characters
        self.ns_dev = f"kvn{pid:06x}{serial % 4096:03x}"
        self.host_addr = self.addr = ""
        self._server: RedisServer | None = None
        self._built: list[str] = []

    @property
    def url(self) -> str:
        """``redis://ADDR:PORT/0`` of the server inside the namespace."""
        return f"redis://{self.addr}:{self.shape.port}/0"

    @property
    def server_pid(self) -> int | None:
        """The process id of the ``redis-server`` inside the namespace, while it runs."""
        return self._server.pid if self._server is not None else None

    def _tbf(self, verb: str, gbps: float) -> list[list[str]]:
        """The two ``tc qdisc VERB ... tbf`` commands: the host end's egress and the namespace end's egress."""
        rate_bytes = gbps * 1e9 / 8
        burst = max(64 * 1024, int(rate_bytes * self.shape.burst_ms / 1e3))
        tbf = ["root", "tbf", "rate", f"{int(gbps * 1e9)}bit", "burst", str(burst),
               "latency", f"{self.shape.queue_ms:g}ms"]
        return [["tc", "qdisc", verb, "dev", self.host_dev, *tbf],
                ["tc", "-n", self.netns, "qdisc", verb, "dev", self.ns_dev, *tbf]]

    def set_rate(self, gbps: float) -> None:
        """Shape both directions to ``gbps`` Gbit/s from now on (``tc qdisc change``; connections stay open)."""
        rate = _check_rate(gbps)
        if self._server is None:
            raise LinkError("set_rate needs a running link: use it inside `with ShapedLink(...)`")
        for command in self._tbf("change", rate):
            _run(*command)
        self.gbps = rate

    def _claim_subnet(self) -> None:
        """Pick a free /30 and put its two addresses on the pair, under a lock shared by every kvpack process."""
        _LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        with open(_LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            used = [net for net in _used_networks() if net.overlaps(SUBNETS)]
            subnets = list(SUBNETS.subnets(new_prefix=30))
            start = hash(self.netns) % len(subnets)  # spread concurrent processes out
            free = next((s for s in subnets[start:] + subnets[:start] if not any(s.overlaps(n) for n in used)), None)
            if free is None:
                raise LinkError(f"every /30 of {SUBNETS} is in use; remove stale links (`ip netns list`)")
            host, inside = list(free.hosts())
            _run("ip", "addr", "add", f"{host}/30", "dev", self.host_dev)
        self.host_addr, self.addr = str(host), str(inside)

    def __enter__(self) -> ShapedLink:
        if self._built or self._server is not None:
            raise LinkError("a ShapedLink is entered once; make a new one")
        try:
            _run("ip", "netns", "add", self.netns)
            self._built.append("netns")
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev, "netns", self.netns)
            self._built.append("veth")
            self._claim_subnet()
            _run("ip", "link", "set", self.host_dev, "up")
            _run("ip", "-n", self.netns, "addr", "add", f"{self.addr}/30", "dev", self.ns_dev)
            _run("ip", "-n", self.netns, "link", "set", self.ns_dev, "up")
            _run("ip", "-n", self.netns, "link", "set", "lo", "up")
            for command in self._tbf("add", self.gbps):
                _run(*command)
            workdir = Path(tempfile.mkdtemp(prefix=f"{self.netns}-"))
            server = RedisServer(workdir, self.shape.port, host=self.addr, netns=self.netns)
            try:
                self._server = server.start()
            except KvpackError as exc:
                raise LinkError(f"redis-server did not start in namespace {self.netns}: {exc}") from exc
        except BaseException as exc:
            try:
                self.close()
            except LinkError as left:
                exc.add_note(str(left))
            raise
        return self

    def close(self) -> None:
        """Stop the server and remove the veth pair and the namespace; :class:`LinkError` naming what is left."""
        left: list[str] = []
        if self._server is not None:
            self._server.stop()
            self._server = None
        if "veth" in self._built:
            try:
                _run("ip", "link", "del", self.host_dev)  # removes both ends
            except LinkError as exc:
                if "Cannot find device" not in str(exc):
                    left.append(str(exc))
        if "netns" in self._built:
            try:
                _run("ip", "netns", "del", self.netns)
            except LinkError as exc:
                left.append(str(exc))
        self._built.clear()
        if left:
            raise LinkError(f"link {self.netns} not fully removed ({'; '.join(left)}); remove it with "
                            f"`ip link del {self.host_dev}; ip netns del {self.netns}`")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShapedLink({self.gbps:g} Gbps, {self.netns}, {self.url if self.addr else 'not running'})"


@functools.cache
def links_available() -> tuple[bool, str]:
    """Whether :class:`ShapedLink` works here, and why not: checks root, ``ip``, ``tc`` and ``redis-server``, then
    builds and removes one link (once per process)."""
    if os.geteuid() != 0:
        return False, "shaped links need root (network namespaces and tc need CAP_NET_ADMIN)"
    for binary, package in (("ip", "iproute2"), ("tc", "iproute2"), ("redis-server", "redis-server")):
        if shutil.which(binary) is None:
            return False, f"`{binary}` is not installed (apt-get install {package})"
    try:
        with ShapedLink(1.0):
            pass
    except LinkError as exc:
        return False, f"a shaped link could not be built here: {exc}"
    return True, "network namespaces, veth, tbf and redis-server work"
