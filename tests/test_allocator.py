"""kvpack.allocator: glibc keeps freed working memory mapped between chunks, unless the user opts out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the tuning is glibc's mallopt")

# A codec's pattern: several arrays of a few MB, touched, all freed at the end of the chunk; page faults counted
# over the chunks after the first.
_CHUNKS = """
import json, resource
import numpy as np
import kvpack
def chunk():
    arrays = [np.ones(2_500_000, np.float32) for _ in range(4)]  # 4 x 10 MB, every page written
    return sum(float(a[-1]) for a in arrays)
chunk()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    chunk()
print(json.dumps({"tuned": kvpack.allocator.TUNED,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
"""


def _run(**env: str) -> dict[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "KVPACK_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _CHUNKS], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_tuned_malloc_keeps_chunk_memory_mapped() -> None:
    tuned, default = _run(), _run(KVPACK_MALLOC="default")
    assert tuned["tuned"] and not default["tuned"]
    # 40 MB per chunk is ~10,000 pages: with glibc's defaults thousands fault in anew every chunk (2,100 measured),
    # the tuned heap keeps them (0 measured)
    assert default["faults"] > 1000
    assert tuned["faults"] < default["faults"] / 10


def test_the_users_malloc_settings_win() -> None:
    assert not _run(MALLOC_TRIM_THRESHOLD_="1000000")["tuned"]
    assert not _run(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["tuned"]
