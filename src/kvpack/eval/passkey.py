"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300): a 5-digit key hidden at a random
depth in a haystack of filler text; the model must repeat it after the haystack.

The haystack with the key is the cached prefix (encoded and decoded by the codec under test); the question is the
suffix the model reads on top of the cache. A trial succeeds when the key's digits appear in the greedy answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from kvpack.codecs.base import Codec
from kvpack.inference import forward, greedy, prefill
from kvpack.spec import ModelSpec

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8


@dataclass(frozen=True)
class Trial:
    """One haystack: its prefix token ids and the key hidden in it."""

    prefix_ids: torch.Tensor
    key: str


def make_trials(tokenizer: Any, haystack_tokens: int, trials: int, seed: int = 0) -> list[Trial]:
    """``trials`` haystacks of about ``haystack_tokens`` tokens, keys and depths drawn from ``seed``."""
    rng = random.Random(seed)
    filler_ids = tokenizer(FILLER, add_special_tokens=False).input_ids
    repeats = max(1, haystack_tokens // len(filler_ids))
    out = []
    for _ in range(trials):
        key = f"{rng.randrange(10_000, 100_000)}"
        depth = rng.randrange(repeats)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        text = FILLER * depth + needle + FILLER * (repeats - depth)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:haystack_tokens]
        if key not in tokenizer.decode(ids):  # the needle fell beyond the cut: move it to the middle
            text = FILLER * (repeats // 2) + needle + FILLER * (repeats - repeats // 2)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:haystack_tokens]
        out.append(Trial(prefix_ids=ids, key=key))
    return out


def accuracy(model: Any, tokenizer: Any, spec: ModelSpec, trials: list[Trial],
             codecs: list[Codec | None]) -> list[float]:
    """Passkey accuracy for each entry of ``codecs`` (``None`` is the original, uncompressed cache).

    Every haystack is prefilled once; each codec then encodes and decodes that cache.
    """
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]
    hits = [0] * len(codecs)
    for trial in trials:
        kv, _ = prefill(model, spec, trial.prefix_ids, step=512)
        for i, codec in enumerate(codecs):
            restored = kv if codec is None else codec.decode(codec.encode(kv), spec)
            cache = restored.to_hf()
            logits = forward(model, question[:-1], cache)
            del logits
            answer = greedy(model, cache, int(question[-1]), ANSWER_TOKENS)
            hits[i] += trial.key in tokenizer.decode(answer).replace(" ", "")
    return [h / len(trials) for h in hits]
