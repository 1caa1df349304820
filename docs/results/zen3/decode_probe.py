"""rANS decode speed of one thread on `kvpack bench entropy`'s streams, in-process (docs/entropy.md, "The decoder's
refill on AMD Zen"). Run from the repository root with a fresh numba cache, so the decoder compiles for the target
named (or the host):

    NUMBA_CACHE_DIR=$(mktemp -d) .venv/bin/python docs/results/zen3/decode_probe.py laplace-a16 20
    NUMBA_CACHE_DIR=$(mktemp -d) NUMBA_CPU_NAME=skylake .venv/bin/python docs/results/zen3/decode_probe.py laplace-a16 20

Since 2d79f99 the first decodes with the shifts-and-masks refill on AMD Zen hosts and the second with the select; the
select compiled for Zen (113 Msym/s on the Zen 3 of the docs) needs the code before it (a worktree of 644a3aa, with
PYTHONPATH pointing at its src)."""

import sys
import time

import numpy as np

from kvpack.bench.entropy import case_stream
from kvpack.entropy.rans import decode_lanes, encode_lanes

name = sys.argv[1] if len(sys.argv) > 1 else "laplace-a16"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
symbols, starts, table, freqs = case_stream(name)
words, offsets = encode_lanes(symbols, starts, table, freqs)
assert np.array_equal(decode_lanes(words, offsets, starts, table, freqs, threads=1), symbols)  # also compiles
start = time.perf_counter()
for _ in range(reps):
    decode_lanes(words, offsets, starts, table, freqs, threads=1)
seconds = (time.perf_counter() - start) / reps
print(f"{name}: decode {symbols.size / seconds / 1e6:.0f} Msym/s on 1 thread")
