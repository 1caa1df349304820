"""`prophet(ratio, depth)`: recompute the tokens the query attends to most (query-aware selection, after ProphetKV).

ProphetKV (arXiv 2602.02579) observes that the tokens worth recomputing in a cache assembled from separately encoded
chunks are the ones that matter to the request's query, not the ones whose K/V deviate most (CacheBlend) or that
start a chunk (EPIC); it reports 96-101% of full-prefill accuracy at 20% recompute (REFERENCES §5). Training-free
form implemented here: the prompt's uncached tail (``job.query``: the question, after the cached segments) goes
through layers ``0..L-1`` on top of the assembled, unrepaired cache (the cheap part: only the query's tokens run);
at layer ``L = round(depth * (layers - 1))`` its queries are taken from the attention module's input (``q_proj``,
``q_norm`` where the model has it, RoPE at the query's positions) and scored against the loaded keys of that layer;
token ``j``'s score is its softmax attention weight averaged over heads and the last ``query_tokens`` query tokens.
The ``round(ratio * candidates)`` candidates of highest score are recomputed at every layer. Simplified against the
paper: a single attention read-out at one layer stands in for ProphetKV's prediction of each token's effect on the
answer. Supports attention modules with ``q_proj`` (Llama, Mistral, Qwen2/3, Gemma 2 and their kin); others are
refused with :class:`~kvpack.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from kvpack import rope
from kvpack.errors import UnsupportedModelError
from kvpack.inference import as_batch
from kvpack.kv import KVCache, hf_cache
from kvpack.reuse.policies.base import (
    PolicyError,
    RepairJob,
    RepairPolicy,
    check_fraction,
    check_int,
    register,
    top_tokens,
)
from kvpack.reuse.recompute import _Stop, attention_mask


@register
@dataclass(frozen=True)
class Prophet(RepairPolicy):
    """Recompute the ``ratio`` of candidate tokens that the query's last ``query_tokens`` attend to most."""

    name = "prophet"
    ratio: float = 0.15
    depth: float = 0.5
    query_tokens: int = 32

    def __post_init__(self) -> None:
        check_fraction(self.name, "ratio", self.ratio)
        check_fraction(self.name, "depth", self.depth)
        check_int(self.name, "query_tokens", self.query_tokens, True)

    def select(self, job: RepairJob) -> torch.Tensor:
        count = round(self.ratio * job.candidates.numel())
        if count == 0:
            return job.candidates[:0]
        if job.query.numel() == 0:
            raise PolicyError("prophet needs the query: give the prompt uncached segments after the cached ones "
                              "(Segment(question, cache=False))")
        layer = round(self.depth * (job.kv.spec.num_layers - 1))
        scores = query_attention(job.model, job.kv, job.query, layer, self.query_tokens)
        return top_tokens(job.candidates, scores[job.candidates], count)


def query_attention(model: Any, kv: KVCache, query: torch.Tensor, layer: int, last: int) -> torch.Tensor:
    """Mean attention weight ``[kv.num_tokens]`` (float32) that the last ``last`` of the ``query [q]`` tokens, placed
    right after ``kv`` (positions ``kv.positions[-1] + 1`` on), give each token of ``kv`` at ``layer``: softmax over
    ``kv``'s keys, averaged over query heads and query tokens. Only layers ``0..layer-1`` run (for the query only)."""
    spec = kv.spec
    positions = torch.arange(len(query), dtype=torch.int64) + int(kv.positions[-1]) + 1
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()
    attn = model.get_decoder().layers[layer].self_attn
    if not hasattr(attn, "q_proj"):
        raise UnsupportedModelError(f"prophet reads queries from the attention's q_proj; {type(attn).__name__} "
                                    "has none")

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != owner:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        q = module.q_proj(hidden[0, -last:]).reshape(min(last, hidden.shape[1]), -1, spec.head_dim)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        captured.append(q.transpose(0, 1))  # [heads, q', dim]
        raise _Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    mask = attention_mask(model, spec.sliding_windows, positions, torch.cat([kv.positions, positions]))
    try:
        with torch.no_grad():
            model(as_batch(query), position_ids=positions.reshape(1, -1), attention_mask=mask,
                  cache=hf_cache(kv.data), use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    q_pos = positions[-last:]
    q = rope.rotate(captured[0].detach(), q_pos, spec.rope_of(layer), spec.head_dim)  # [heads, q', dim]
    keys = kv.data[layer, 0].float()  # [kv_heads, tokens, dim]
    q = q.reshape(spec.num_kv_heads, -1, spec.head_dim)  # query heads grouped by the KV head they share
    logits = q @ keys.transpose(1, 2) / spec.head_dim**0.5  # [kv_heads, group * q', tokens]
    window = spec.sliding_windows[layer]
    if window is not None:
        far = (q_pos.repeat(logits.shape[1] // q_pos.numel()).reshape(-1, 1) - kv.positions.reshape(1, -1)) >= window
        logits = logits.masked_fill(far[None], float("-inf"))
    return logits.softmax(-1).mean(dim=(0, 1))
