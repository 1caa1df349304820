"""How kvpack's numba kernels run their threads: without spin-waiting, and safely from several Python threads.

Imported first by :mod:`kvpack` (and by :mod:`kvpack.entropy`, hence by every codec), because both settings are
read once: the wait policy when the OpenMP runtime is loaded (torch loads GNU OpenMP, which numba's OpenMP layer
shares, at ``import torch``), the layer when numba first runs a parallel kernel. A program that imports torch before
kvpack should export ``OMP_WAIT_POLICY=passive`` itself (or install ``tbb``: numba then prefers its TBB layer, whose
workers do not spin either).

* ``OMP_WAIT_POLICY=passive`` (and ``KMP_BLOCKTIME=0`` for Intel's runtime): GNU OpenMP's workers otherwise spin for
  a while after every parallel region. On a machine whose cores are shared with other busy processes the spinning
  workers take CPU from the thread that still has work, and two threads were measured slower than one
  (docs/entropy.md, "Threading"). Passive workers sleep; waking them costs microseconds per region.
* numba's threading layer ``"threadsafe"`` (TBB if installed, else OpenMP) instead of a fallback to ``workqueue``,
  which aborts the process when two Python threads run parallel kernels at once (the store's background writer
  encodes while a request decodes). Only where numba ships OpenMP (Linux); elsewhere numba's default stands.

Both are defaults: an environment variable the user set (``OMP_WAIT_POLICY``, ``KMP_BLOCKTIME``,
``NUMBA_THREADING_LAYER``) wins.
"""

from __future__ import annotations

import os
import sys

import numba

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("KMP_BLOCKTIME", "0")
if sys.platform.startswith("linux") and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"  # type: ignore[attr-defined]

__all__: list[str] = []
