"""`full`: recompute every token after the exact prefix: the reference every other policy is measured against.

Segments are not loaded at all: the prompt takes exactly today's prefix path (the longest stored chain of leading
chunks is loaded, the model prefills the rest), so the output is bit-identical to
:meth:`ContextCache.generate <kvpack.context.ContextCache.generate>` on the concatenated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.reuse.policies.base import RepairJob, RepairPolicy, register


@register
@dataclass(frozen=True)
class FullRecompute(RepairPolicy):
    """Recompute every reused token (segments are then not loaded: plain prefix reuse)."""

    name = "full"
    reuses_segments = False

    def select(self, job: RepairJob) -> torch.Tensor:
        return job.candidates
