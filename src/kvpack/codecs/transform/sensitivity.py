"""Sensitivity of the model's likelihood to its cache: per-feature diagonal Fisher information and the error weights
calibration derives from it.

The squared gradient of a log-likelihood with respect to the cached keys and values, averaged over tokens, is a
diagonal empirical Fisher information: the expected KL of a small cache error ``e`` is about ``0.5 * sum(F * e**2)``.
KVTC (arXiv 2511.01815, section 3) weighs its PCA by such a sensitivity of the continuation; docs/transform.md
measures the variant used here (per layer, K/V, head and channel, RoPE channel pairs tied, square root plus a floor).
:mod:`kvpack.codecs.transform.retrieval` scores a recalled key instead of the continuation;
:mod:`kvpack.codecs.transform.calibrate` turns the weights into a basis and bit allocation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpack.kv import KVCache
from kvpack.spec import ModelSpec


def prefill_and_fisher(model: Any, spec: ModelSpec, ids: torch.Tensor, tokens: int, sinks: int,
                       scored_from: int = 0) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Prefill ``ids[:tokens]``; run the rest as a continuation and differentiate its log-likelihood w.r.t. the cache
    (of the continuation's tokens from index ``scored_from + 1`` on: a question's answer alone, say).

    Returns the cache, the continuation log-probs ``[cont, vocab]`` and the squared gradient per pre-RoPE feature
    averaged over the non-sink prefix tokens ``[D]`` (a diagonal empirical Fisher information: the expected KL of a
    small error ``e`` is about ``0.5 * sum(F * e**2)``). RoPE channel pairs get their mean (the rotation mixes them).
    """
    from transformers import DynamicCache

    from kvpack.inference import cache_arg, prefill

    kv, _ = prefill(model, spec, ids[:tokens], step=512)
    cache = DynamicCache()
    leaves = []
    for layer in range(spec.num_layers):
        k = kv.keys[layer][None].clone().requires_grad_(True)
        v = kv.values[layer][None].clone().requires_grad_(True)
        cache.update(k, v, layer)
        leaves.append((k, v))
    cont = ids[tokens:]
    with torch.enable_grad():
        logits = model(cont[None], use_cache=True, **cache_arg(model, cache)).logits[0].float()
        logprobs = logits.log_softmax(-1)
        loss = -logprobs[scored_from:-1].gather(1, cont[scored_from + 1:, None]).sum()
        loss.backward()
    rot = 2 * (int(spec.head_dim * spec.rope.partial_rotary_factor) // 2) if spec.rope.type != "none" else 0
    keep = kv.positions >= sinks
    parts = []
    for k, v in leaves:
        assert k.grad is not None and v.grad is not None
        gk = k.grad[0].float()[:, keep].pow(2).mean(1)  # [heads, head_dim]
        if rot:
            half = rot // 2
            pair = (gk[:, :half] + gk[:, half:rot]) / 2
            gk = torch.cat([pair, pair, gk[:, rot:]], dim=1)
        gv = v.grad[0].float()[:, keep].pow(2).mean(1)
        parts += [gk.reshape(-1), gv.reshape(-1)]
    return kv, logprobs.detach(), torch.cat(parts)


def fisher_weights(continuation: torch.Tensor, retrieval: torch.Tensor | None = None, share: float = 0.5
                   ) -> np.ndarray:
    """Per-feature error weights ``[D]`` from diagonal Fisher informations ``[D]``: the square root of their mix
    (each scaled to mean 1; ``retrieval``, if given, makes ``share`` of it), plus a floor of 1e-3 so that no feature
    is free."""
    f = continuation.double() / continuation.double().mean()
    if retrieval is not None:
        f = (1 - share) * f + share * retrieval.double() / retrieval.double().mean()
    return (f + 1e-3).sqrt().numpy()
