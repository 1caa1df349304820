"""Is the rANS decoder's 2-thread scaling bounded by the host (docs/entropy.md)? One thread decodes a
`kvpack bench entropy` stream alone; then two separate processes, one thread each, decode it at the same time (no
numba threading layer between them); then one process with two threads. If two processes together reach no more
than two threads do, what caps the scaling is shared by the two cores (clock, caches, the hypervisor), not the
threading layer or the coder's work split. Run from the repository root:

    .venv/bin/python docs/results/zen3/rans_two_processes.py laplace-a16 40"""

import subprocess
import sys
import time

import numpy as np

from kvpack import cpu
from kvpack.bench.entropy import case_stream
from kvpack.entropy.rans import decode_lanes, encode_lanes

name = sys.argv[1] if len(sys.argv) > 1 else "laplace-a16"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
rounds = 7
symbols, starts, table, freqs = case_stream(name)
words, offsets = encode_lanes(symbols, starts, table, freqs)
for threads in (1, 2):
    assert np.array_equal(decode_lanes(words, offsets, starts, table, freqs, threads=threads), symbols)  # compiles


def rate(threads: int) -> float:
    """Msym/s of ``reps`` decodes with ``threads`` threads."""
    start = time.perf_counter()
    for _ in range(reps):
        decode_lanes(words, offsets, starts, table, freqs, threads=threads)
    return symbols.size * reps / (time.perf_counter() - start) / 1e6


if len(sys.argv) > 3:  # a worker: wait for the start time, then measure one thread
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
    print(f"{rate(1):.1f}")
    sys.exit()

print(f"{cpu.model_name()}, {name}, {reps} decodes of {symbols.size} symbols per measurement, {rounds} rounds")
alone, pairs, threads2 = [], [], []
for _ in range(rounds):  # interleaved, so that the host's drift reaches the three alike
    alone.append(rate(1))
    at = time.time() + 3.0
    workers = [subprocess.Popen([sys.executable, __file__, name, str(reps), str(at)], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    pairs.append(sum(float(w.communicate(timeout=600)[0]) for w in workers))
    threads2.append(rate(2))
    print(f"1 thread alone {alone[-1]:.0f} Msym/s; two processes at once {pairs[-1]:.0f} together; "
          f"one process, 2 threads {threads2[-1]:.0f}")
one = float(np.median(alone))
print(f"medians: 1 thread {one:.0f}; two processes {np.median(pairs):.0f} ({np.median(pairs) / one:.2f}x); "
      f"2 threads {np.median(threads2):.0f} ({np.median(threads2) / one:.2f}x)")
