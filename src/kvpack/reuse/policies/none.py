"""`none`: recompute nothing; every reused token keeps the K/V of its own segment, re-rotated to where it lands.

The baseline of CacheBlend (Yao et al., arXiv 2405.16444, "full KV reuse") and of EPIC (arXiv 2410.15332): each
segment attends only to itself (and to the shared prefix it was cached after). Exact as described; the cheapest and
the least faithful repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.reuse.policies.base import RepairJob, RepairPolicy, register


@register
@dataclass(frozen=True)
class NoRepair(RepairPolicy):
    """Recompute no token."""

    name = "none"

    def select(self, job: RepairJob) -> torch.Tensor:
        return job.candidates[:0]
