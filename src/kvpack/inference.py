"""Running a transformers causal LM on top of a KV cache: prefill, continuation logits, greedy decoding.

All functions take batch-of-one ``input_ids`` (``[tokens]`` or ``[1, tokens]``) and run under ``torch.no_grad``.
A transformers cache passed in is extended in place (as transformers does); pass ``kv.to_hf()`` for a fresh copy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvpack.kv import KVCache
from kvpack.spec import ModelSpec


def as_batch(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[1, tokens]`` int64 from ``[tokens]``, ``[1, tokens]`` or a list."""
    tensor = torch.as_tensor(ids, dtype=torch.int64)
    return tensor.reshape(1, -1)


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``: transformers 5.24 names the argument
    ``cache`` and keeps ``past_key_values`` as a deprecated alias; the 5.19 that vLLM 0.32 pins knows only
    ``past_key_values``."""
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def new_cache(model: Any) -> Any:
    """An empty transformers ``DynamicCache`` for ``model`` that keeps every token of every layer.

    Layers are those transformers itself builds for the model (sliding-window layers included), with past recording
    on: a sliding layer still shows the model exactly its window (so logits are bit-identical to transformers'
    default cache), but keeps the tokens that fell out of it, which kvpack stores.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    return cache


@torch.no_grad()
def forward(model: Any, ids: torch.Tensor | Sequence[int], cache: Any, step: int | None = None,
            on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run ``ids`` through ``model`` on top of ``cache``; returns the float32 logits ``[tokens, vocab]``.

    With ``step`` the tokens go through in slices of that many (for progress reporting and bounded memory);
    ``on_progress`` gets the number of tokens done after each slice.
    """
    batch = as_batch(ids)
    total = batch.shape[1]
    step = step or max(total, 1)
    outputs = []
    for start in range(0, total, step):
        piece = batch[:, start : start + step]
        outputs.append(model(piece, use_cache=True, **cache_arg(model, cache)).logits[0].float())
        if on_progress is not None:
            on_progress(min(start + step, total))
    return torch.cat(outputs) if outputs else torch.empty(0)


def prefill(model: Any, spec: ModelSpec, ids: torch.Tensor | Sequence[int], step: int | None = None,
            on_progress: Callable[[int], None] | None = None) -> tuple[KVCache, torch.Tensor]:
    """Compute the KV cache of ``ids`` from scratch; returns it and the logits of the last token ``[vocab]``."""
    batch = as_batch(ids)
    cache = new_cache(model)
    logits = forward(model, batch, cache, step=step, on_progress=on_progress)
    return KVCache.from_hf(cache, spec, token_ids=batch[0]), logits[-1]


@torch.no_grad()
def answer_logprob(model: Any, cache: Any, question: torch.Tensor, answer: torch.Tensor) -> float:
    """Teacher-forced log-probability (nats) of ``answer`` ``[A]`` read after ``question`` ``[Q]`` on top of ``cache``
    (extended in place by ``Q + A - 1`` tokens): the sum over the answer's tokens of log p(token | all before it)."""
    logits = forward(model, torch.cat([question, answer])[:-1], cache)[len(question) - 1:]
    return float(torch.log_softmax(logits, -1).gather(1, answer[:, None]).sum())


@torch.no_grad()
def greedy(model: Any, cache: Any, first_token: int, max_new_tokens: int,
           eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding: feed ``first_token`` after ``cache``, then the argmax token each step.

    Returns up to ``max_new_tokens`` generated ids (stops after ``eos_token_id``).
    """
    out: list[int] = []
    token = first_token
    for _ in range(max_new_tokens):
        logits = model(as_batch([token]), use_cache=True, **cache_arg(model, cache)).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id:
            break
    return out
