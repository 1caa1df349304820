"""glibc's malloc kept from handing each chunk's working memory back to the kernel between chunks.

A codec allocates and frees tens of MB per 256-token chunk (the widened float32 cache, the symbols, the rANS
scratch). glibc serves blocks above a dynamic threshold with ``mmap`` and gives the top of its heap back to the kernel
once more than twice that threshold is free there; with kvpack's block sizes both happen on every chunk, so every
page of the next chunk's arrays faults in again, zero-filled. Measured on 256-token fp8 encodes of 36 real SmolLM2
chunks (2 cores, 3 rounds of alternating processes): 269-293 MB/s with glibc's defaults, 392-429 MB/s with the
settings below, the difference in page faults of kernels that write fresh memory (widening, histograms, rANS); kivi
and lossless encodes and every decode unchanged (their blocks happen not to cross glibc's trim threshold).

At import kvpack sets, through ``mallopt`` (glibc on Linux only):

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's own ceiling for its dynamic threshold): blocks below it come from the heap;
* ``M_TRIM_THRESHOLD`` = 128 MiB: the heap keeps up to that much free memory at its top rather than returning it.

So a process holds up to 128 MiB more than it uses after its peak (per malloc arena), and no more: the usual trade of
allocators made for servers (jemalloc and tcmalloc, which PyTorch recommends for CPU inference, keep freed memory
too). The user's choice wins: with ``KVPACK_MALLOC=default``, or with glibc's own ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or malloc ``GLIBC_TUNABLES`` set, kvpack leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune() -> bool:
    """Apply the settings of the module docstring; True if they were applied (glibc, not opted out)."""
    if os.environ.get("KVPACK_MALLOC", "") == "default" or any(name in os.environ for name in _USER_SETTINGS) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


#: Whether kvpack tuned malloc in this process (benchmarks record it with the machine).
TUNED = tune()

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "TUNED", "tune"]
