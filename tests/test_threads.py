"""Concurrency: the store's background writer encodes while a request decodes, each in its own Python thread.

numba's parallel kernels must give the same bytes and values as when run alone, and must not abort (the
``workqueue`` layer does when two threads launch kernels at once; :mod:`kvpack.entropy.workers` picks a thread-safe
layer), nor leave the thread-count setting of one thread in the other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numba
import numpy as np
import pytest
import torch

import kvpack
from conftest import make_kv
from kvpack.codecs import get
from kvpack.codecs.common import PARALLEL_MIN_ELEMENTS
from kvpack.entropy import counts_to_tables, decode_lanes, encode_lanes

ROUNDS = 4


def _together(*jobs: Callable[[], object]) -> list[list[object]]:
    """Run every job ``ROUNDS`` times, each job in its own thread, all starting at once; their results per job."""
    barrier = threading.Barrier(len(jobs))
    results: list[list[object]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                results[i].append(jobs[i]())
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a concurrent encode/decode hung"
    return results


def test_layer_is_thread_safe_and_workers_sleep() -> None:
    kvpack.decode(get("lossless").encode(make_kv(tokens=4)))  # a kernel has run: the layer is loaded
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.threading_layer() in ("tbb", "omp")
    assert os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"


@pytest.mark.parametrize("name", ["lossless", "fp8", "kivi"])
def test_encode_and_decode_at_once_equal_sequential(name: str) -> None:
    """Big enough for the threaded kernels (``PARALLEL_MIN_ELEMENTS``) on both sides."""
    kv_a = make_kv(tokens=320, seed=1, layers=4, heads=2, head_dim=64)
    kv_b = make_kv(tokens=300, seed=2, layers=4, heads=2, head_dim=64)
    assert kv_b.num_tokens * kv_b.spec.elements_per_token >= PARALLEL_MIN_ELEMENTS
    codec = get(name)
    blob_a, blob_b = codec.encode(kv_a), codec.encode(kv_b)
    decoded_b = kvpack.decode(blob_b).data
    encodes, decodes = _together(lambda: codec.encode(kv_a), lambda: kvpack.decode(blob_b).data)
    assert all(e == blob_a for e in encodes)
    assert all(torch.equal(d.view(torch.int16), decoded_b.view(torch.int16)) for d in decodes)  # type: ignore[union-attr]


def test_rans_threads_setting_stays_per_thread() -> None:
    """One thread codes with 2 numba threads, the other with 1, at once: same words and symbols as alone, and each
    thread's own numba thread count is unchanged afterwards."""
    rng = np.random.default_rng(5)
    lane = 8192
    symbols = np.clip(np.round(rng.laplace(8.0, 2.0, 64 * lane)), 0, 15).astype(np.uint8)
    starts = np.arange(65, dtype=np.int64) * lane
    tables = np.arange(64, dtype=np.int32)
    freqs = counts_to_tables(symbols, starts, 16)
    words, offsets = encode_lanes(symbols, starts, tables, freqs)
    before = numba.get_num_threads()

    def enc() -> bool:
        w, o = encode_lanes(symbols, starts, tables, freqs, threads=min(2, numba.config.NUMBA_NUM_THREADS))
        return np.array_equal(w, words) and np.array_equal(o, offsets) and numba.get_num_threads() == before

    def dec() -> bool:
        out = decode_lanes(words, offsets, starts, tables, freqs, threads=1)
        return np.array_equal(out, symbols) and numba.get_num_threads() == before

    ok_enc, ok_dec = _together(enc, dec)
    assert all(ok_enc) and all(ok_dec)
