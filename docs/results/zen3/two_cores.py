"""Are a VM's two vCPUs two cores or the two threads of one (docs/entropy.md)? Eight independent multiply chains
per thread keep a core's multipliers busy: two cores run about twice the one-thread throughput, two hardware threads
of one core about the same. Run from the repository root:

    .venv/bin/python docs/results/zen3/two_cores.py"""

import time

import numpy as np
from numba import njit, prange


@njit(nogil=True)
def chains(n, seed):  # type: ignore[no-untyped-def]
    a = np.arange(8, dtype=np.uint64) + seed
    for i in range(n):
        for k in range(8):
            a[k] = a[k] * a[k] + np.uint64(i)
    return a.sum()


@njit(parallel=True)
def spread(n, k):  # type: ignore[no-untyped-def]
    out = np.zeros(k, np.uint64)
    for t in prange(k):
        out[t] = chains(n, np.uint64(t + 3))
    return out


n = 100_000_000
spread(10, 2)
for k in (1, 2, 1, 2):
    start = time.perf_counter()
    spread(n, k)
    print(f"{k} thread(s): {k * n * 8 / (time.perf_counter() - start) / 1e9:.2f} G multiply-adds/s")
