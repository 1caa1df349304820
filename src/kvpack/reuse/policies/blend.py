"""`blend(ratio, layer, checks)`: recompute the tokens whose K/V deviate most, narrowing layer by layer (CacheBlend).

CacheBlend (Yao et al., EuroSys 2025, arXiv 2405.16444, §4.2-4.3): in a cache assembled from separately computed
chunks, few tokens carry most of the cross-chunk attention error, and the tokens whose K/V deviate most from a full
prefill in one layer tend to be the same in the next. It recomputes every token's K/V in the first layer(s), keeps
the tokens with the highest KV deviation ("HKVD tokens") and recomputes only those in the following layers, narrowing
the set over a few layers down to the target ``ratio`` (15% by default: "gradual filtering"). Reported: 2.2-3.3x lower
TTFT than full recompute at 1-3% quality loss (REFERENCES §5).

Implemented as that, in one pass over the model (:func:`~kvpack.reuse.recompute.recompute_narrowing`): every
candidate token (and every edited token) is recomputed in layers ``0..layer``; after layer ``layer + i``
(``i = 0 .. checks - 1``) the candidates are ranked by their deviation at that layer,
``||K_fresh - K_loaded||^2 + ||V_fresh - V_loaded||^2`` over its heads and channels (keys compared at the same
position, both post-RoPE), and the ``round(ratio ** ((i + 1) / checks) * candidates)`` of largest deviation go on
(a geometric schedule ending at ``ratio``; ``checks=1``: one selection at ``layer``); edited tokens always go on.
A token dropped at some layer keeps the fresh K/V of the layers it went through and the loaded K/V above. The
compute is the (token, layer) pairs recomputed (:attr:`~kvpack.reuse.policies.base.Repair.token_layers`):
``(layer + 1) / layers`` of a prefill of the candidates plus the narrowing set through the remaining layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpack.reuse.policies.base import (
    PolicyError,
    Repair,
    RepairJob,
    RepairPolicy,
    check_fraction,
    check_int,
    register,
    top_tokens,
)
from kvpack.reuse.recompute import recompute_narrowing


@register
@dataclass(frozen=True)
class Blend(RepairPolicy):
    """Recompute every candidate token through ``layer``, then narrow over ``checks`` layers to the ``ratio`` whose
    K/V deviate most."""

    name = "blend"
    ratio: float = 0.15
    layer: int = 1
    checks: int = 1

    def __post_init__(self) -> None:
        check_fraction(self.name, "ratio", self.ratio, " of the reused tokens")
        check_int(self.name, "layer", self.layer, False, " (the first layer that selects)")
        check_int(self.name, "checks", self.checks, True, " (layers over which the set narrows to ratio)")

    def kept(self, check: int, candidates: int) -> int:
        """Candidates kept after selection ``check`` (0-based) of ``candidates``."""
        return round(self.ratio ** ((check + 1) / self.checks) * candidates)

    def select(self, job: RepairJob) -> torch.Tensor:
        """The candidates recomputed at every layer (the last selection); :meth:`repair` does the work."""
        recomputed = self.repair(job).recomputed
        return recomputed[torch.isin(recomputed, job.candidates)]

    def repair(self, job: RepairJob) -> Repair:
        layers = job.kv.spec.num_layers
        if self.layer + self.checks >= layers:
            raise PolicyError(f"blend: selections at layers {self.layer}..{self.layer + self.checks - 1} leave no "
                              f"layer to narrow; the model has layers 0..{layers - 1}")
        first = torch.cat([job.candidates, job.required]).unique()

        def narrow(layer: int, tokens: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
            check = layer - self.layer
            if not 0 <= check < self.checks:
                return tokens
            movable = ~torch.isin(tokens, job.required)
            loaded = job.kv.data[layer].index_select(2, tokens[movable]).float()
            deviation = (fresh[:, :, movable].float() - loaded).square().sum(dim=(0, 1, 3))  # [candidates left]
            count = min(self.kept(check, job.candidates.numel()), int(movable.sum()))
            return torch.cat([top_tokens(tokens[movable], deviation, count), tokens[~movable]]).sort().values

        tokens, fresh = recompute_narrowing(job.model, job.kv, first, narrow)
        return Repair(tokens=tuple(tokens), kv=tuple(fresh))
