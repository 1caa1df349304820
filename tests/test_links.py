"""ShapedLink: a redis-server behind a tbf-shaped veth pair in its own network namespace (needs root).

Timing bounds are generous and relative: the machine is shared, so only "no faster than the shaper allows" and
"a much faster rate is much faster" are asserted, never an absolute speed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py

from kvpack.bench.links import LinkError, LinkShape, ShapedLink, links_available

AVAILABLE, WHY = links_available()
pytestmark = [pytest.mark.redis, pytest.mark.skipif(not AVAILABLE, reason=f"shaped links unavailable: {WHY}")]

PAYLOAD = b"\x5a" * 20_000_000


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def device_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True, timeout=10, check=False).returncode == 0


def timed_get(client: redis_py.Redis) -> float:
    """Seconds one GET of the 20 MB value takes (checking that it came back whole)."""
    t0 = time.perf_counter()
    value = client.get("v")
    elapsed = time.perf_counter() - t0
    assert value == PAYLOAD
    return elapsed


@pytest.fixture
def link() -> Iterator[ShapedLink]:
    with ShapedLink(0.2) as shaped:
        yield shaped


def test_the_link_is_no_faster_than_its_rate_and_set_rate_changes_it(link: ShapedLink) -> None:
    client = redis_py.Redis.from_url(link.url, socket_timeout=30)
    client.set("v", PAYLOAD)
    slow = timed_get(client)
    assert len(PAYLOAD) * 8 / slow < 0.2e9 * 1.2  # bytes/second measured stays below the shaped rate
    link.set_rate(4.0)
    assert link.gbps == 4.0
    fast = min(timed_get(client) for _ in range(2))  # the first read after a change may still be in slow start
    assert len(PAYLOAD) * 8 / fast < 4e9 * 1.2
    assert slow > 3 * fast  # 20x the rate: at least 3x faster even on a busy machine
    link.set_rate(0.2)
    assert timed_get(client) > 2 * fast
    client.close()


def test_teardown_leaves_nothing_behind_also_after_an_error() -> None:
    shaped = ShapedLink(1.0)
    with pytest.raises(RuntimeError, match="inside"), shaped:
        assert shaped.netns in netns_names() and device_exists(shaped.host_dev)
        assert shaped.addr.startswith("10.213.") and redis_py.Redis.from_url(shaped.url).ping()
        pid = shaped.server_pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
        raise RuntimeError("inside the link")
    assert shaped.netns not in netns_names()
    assert not device_exists(shaped.host_dev)
    assert shaped.server_pid is None and not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_two_links_get_their_own_namespace_and_subnet() -> None:
    with ShapedLink(1.0) as a, ShapedLink(1.0) as b:
        assert a.netns != b.netns and a.addr != b.addr and a.host_addr != b.host_addr
        assert redis_py.Redis.from_url(a.url).ping() and redis_py.Redis.from_url(b.url).ping()


def test_bad_settings_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="Gbit/s"):
        ShapedLink(0.0)
    with pytest.raises(ValueError, match="burst_ms"):
        LinkShape(burst_ms=-1.0)
    with pytest.raises(LinkError, match="inside `with ShapedLink"):
        ShapedLink(1.0).set_rate(2.0)
