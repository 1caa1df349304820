"""kvpack.store.open(url): the URL forms the CLI and configuration files use."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvpack.store
from kvpack.errors import StoreError
from kvpack.store import DiskStore, MemoryStore, RedisStore


def test_memory_urls() -> None:
    with kvpack.store.open("memory://") as s:
        assert isinstance(s, MemoryStore)
    with kvpack.store.open("memory://?max_bytes=12345") as s:
        assert isinstance(s, MemoryStore) and s.config.max_bytes == 12345


def test_file_urls_and_bare_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with kvpack.store.open(f"file://{tmp_path}/a?max_bytes=5000&fsync=0") as s:
        assert isinstance(s, DiskStore)
        assert (s.config.path, s.config.max_bytes, s.config.fsync) == (tmp_path / "a", 5000, False)
    with kvpack.store.open(str(tmp_path / "b")) as s:
        assert isinstance(s, DiskStore) and s.config.path == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    with kvpack.store.open("file://rel/dir") as s:
        assert isinstance(s, DiskStore) and s.config.path == Path("rel/dir")
    monkeypatch.setenv("KVPACK_CACHE_DIR", str(tmp_path / "default"))
    with kvpack.store.open("file://") as s:
        assert isinstance(s, DiskStore) and s.config.path == tmp_path / "default"


def test_redis_urls() -> None:
    s = kvpack.store.open("redis://127.0.0.1:6390/2?prefix=svc:a:&ttl=60&socket_timeout=0.5&connect_timeout=0.25")
    assert isinstance(s, RedisStore)
    c = s.config
    assert (c.url, c.namespace_prefix, c.ttl_seconds) == ("redis://127.0.0.1:6390/2", "svc:a:", 60.0)
    assert (c.socket_timeout, c.connect_timeout) == (0.5, 0.25)
    s.close()
    s = kvpack.store.open("redis://127.0.0.1:6390/0?health_check_interval=10")  # other options go to redis-py
    assert isinstance(s, RedisStore) and s.config.url == "redis://127.0.0.1:6390/0?health_check_interval=10"
    s.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "gs://bucket/x",
        "memory://host",
        "memory://?max_bytes=abc",
        "memory://?max_bytes=0",
        "memory://?color=red",
        "file:///tmp/x?max_bytes=1&fsync=maybe",
        "file:///tmp/x?unknown=1",
        "redis://127.0.0.1:6379/0?ttl=soon",
        "redis://127.0.0.1:6379/0?prefix=bad%20prefix",
        "redis://127.0.0.1:notaport/0",
        "redis://user:secret@127.0.0.1:6379/0?bogus_option=1",
    ],
)
def test_bad_urls_raise_store_error(url: str) -> None:
    with pytest.raises(StoreError) as info:
        kvpack.store.open(url)
    assert "secret" not in str(info.value), "passwords must not appear in messages"
