"""In-process store: an LRU bounded by bytes. Nothing survives the process; nothing is shared between processes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvpack.store.base import Store

DEFAULT_MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class MemoryStoreConfig:
    """Settings of a :class:`MemoryStore`.

    Attributes:
        max_bytes: the most bytes of entries kept; least recently used entries are evicted beyond it, and an entry
            larger than this is not kept at all.
    """

    max_bytes: int = DEFAULT_MEMORY_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {self.max_bytes!r}")


class MemoryStore(Store):
    """Entries in a dict, least recently used (read or written) evicted first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        super().__init__()
        self.config = MemoryStoreConfig(max_bytes=max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __repr__(self) -> str:
        return f"MemoryStore(max_bytes={self.config.max_bytes})"

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                data = self._entries.get(key)
                if data is not None:
                    self._entries.move_to_end(key)
                out.append(data)
        return out

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                return None
            self._entries.move_to_end(key)
        return data[start:stop]

    def _write(self, key: str, data: bytes) -> bool:
        if len(data) > self.config.max_bytes:
            return False
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = data
            self._bytes += len(data)
            while self._bytes > self.config.max_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= len(victim)
                evicted += 1
        self._count(evictions=evicted)
        return True

    def _exists(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def _remove(self, key: str) -> bool:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is None:
                return False
            self._bytes -= len(old)
            return True

    def _usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), self._bytes

    def _close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
