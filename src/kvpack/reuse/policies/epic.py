"""`epic(k)`: recompute the first ``k`` tokens of each moved segment (EPIC, Hu et al., arXiv 2410.15332).

EPIC's observation: a segment encoded on its own puts attention-sink mass on its first tokens (they were the start
of a sequence when it was encoded); in the assembled prompt those tokens should not be sinks. Its LegoLink
algorithm recomputes only the first few (at most 32, often far fewer) tokens of every chunk but the first, and reports
up to 8x lower TTFT than CacheBlend at similar quality (REFERENCES §5).

Implemented exactly as a selection: the first ``k`` tokens of each moved segment (segments that sit in their own
caching context are exact and never recomputed). Simplified: EPIC runs the recompute inside the serving engine's
attention kernel; here the chosen tokens go through the model as queries on top of the assembled cache
(:mod:`kvpack.reuse.recompute`), which recomputes them at every layer exactly but does not save EPIC's kernel time.
If the exact prefix loaded from the store ends inside a segment, that segment's first tokens are already exact and
only its candidate part is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.reuse.policies.base import RepairJob, RepairPolicy, check_int, register


@register
@dataclass(frozen=True)
class Epic(RepairPolicy):
    """Recompute the first ``k`` tokens of each moved segment."""

    name = "epic"
    k: int = 16

    def __post_init__(self) -> None:
        check_int(self.name, "k", self.k, False, " (tokens per segment)")

    def select(self, job: RepairJob) -> torch.Tensor:
        starts = torch.cat([torch.arange(a, min(b, a + self.k), dtype=torch.int64) for a, b in job.segments]
                           + [job.candidates[:0]])
        return starts[torch.isin(starts, job.candidates)]  # edited tokens of a moved segment are recomputed anyway
