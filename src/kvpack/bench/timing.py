"""Timing in rounds: the measurements a benchmark compares run one after the other, round after round.

A shared VM changes speed within seconds (another tenant on the host, a stolen second core). Timed in blocks (all
runs of one measurement, then the next), a slow spell lands on a few rows and makes them look slow against the others;
timed in rounds (one run of every measurement per round) it lands on one round of every row alike, and each row's
median over rounds skips it. Ratios between rows (two threads against one, a codec against the zstd anchor) then
compare like with like.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def round_medians(fns: Sequence[Callable[[], object]], repeats: int, primed: bool = False,
                  on_round: Callable[[int], None] | None = None) -> list[tuple[float, float]]:
    """Median wall-clock and process-CPU seconds (all threads) of each of ``fns`` over ``repeats`` rounds.

    Each function runs once untimed first (compilation, caches). Every round then times each function once, in
    order. ``primed``: each timed run follows an untimed run of the same function, so that it measures the steady
    state of a stream of calls (a thread that slept since its last call wakes slowly on a VM) at twice the cost.
    ``on_round(i)`` is called after round ``i`` (a progress display)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns:
        fn()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for fn, w, c in zip(fns, wall, cpu, strict=True):
            if primed:
                fn()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            w.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
        if on_round is not None:
            on_round(i)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu, strict=True)]
