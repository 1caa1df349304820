"""Helpers shared by the store tests: small valid entries, the StoreWarnings a call issues, threads that share a
store."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

from kvpack.format import write_container
from kvpack.store import StoreWarning


def entry(payload: bytes) -> bytes:
    """A valid container holding ``payload``."""
    return write_container({"t": 1}, {"p": payload})


def sized_entry(n: int, tag: str = "") -> bytes:
    """A container of exactly ``n`` (at least 300) bytes: the payload fills it, a header string tops it up."""
    payload = b"\x00" * (n - 200)
    short = len(write_container({"t": tag, "pad": ""}, {"p": payload}))
    data = write_container({"t": tag, "pad": "x" * (n - short)}, {"p": payload})
    assert len(data) == n
    return data


def failures(call: Callable[[], object]) -> tuple[object, list[warnings.WarningMessage], float]:
    """Run ``call()``; its result, the StoreWarnings it issued, and how long it took."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        result = call()
        elapsed = time.monotonic() - t0
    return result, [w for w in caught if issubclass(w.category, StoreWarning)], elapsed


def run_threads(work: Callable[[int], None], count: int = 4) -> None:
    """Run ``work(0) .. work(count - 1)`` in as many threads at once; raise the first error any of them raised."""
    errors: list[BaseException] = []

    def guarded(tid: int) -> None:
        try:
            work(tid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
