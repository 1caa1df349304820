"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", arXiv 2305.16300): a 5-digit key hidden at a random
depth in a haystack of filler text; the model must repeat it after the haystack.

The haystack with the key is the cached prefix (encoded and decoded by the codec under test); the question is the
suffix the model reads on top of the cache. A trial succeeds when the key's digits appear in the greedy answer. Each
trial also records the key's teacher-forced log-probability, and two caches read the same haystacks, so they are
compared pairwise (:meth:`Outcome.flips`, :func:`mcnemar_p`: McNemar, Psychometrika 12(2), 1947).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpack.codecs.base import Codec
from kvpack.inference import answer_logprob, forward, greedy, prefill
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


@dataclass(frozen=True)
class Outcome:
    """One cache's passkey results, in trial order.

    ``hits``: whether the key's digits appear in the greedy answer; ``key_logprob``: the log-probability (nats) the
    model gives the key's tokens (``" " + key``) read after the question, teacher-forced, a continuous measure of
    the same retrieval that moves before a greedy answer flips (so fewer trials tell two caches apart).
    """

    hits: tuple[bool, ...]
    key_logprob: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        return sum(self.hits) / len(self.hits)

    @property
    def mean_key_logprob(self) -> float:
        return sum(self.key_logprob) / len(self.key_logprob)

    def flips(self, reference: Outcome) -> tuple[int, int]:
        """``(gained, lost)``: trials this cache answers and ``reference`` misses, and the reverse."""
        pairs = list(zip(self.hits, reference.hits, strict=True))
        return sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value of ``gained`` against ``lost`` discordant trials (a sign test on them): the
    chance that two caches that retrieve equally well differ at least this much on the same haystacks."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_interval(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the paired differences ``x - y`` and its 95% interval ``(mean, low, high)``: mean +- 1.96 standard
    errors (normal approximation, fine from about 30 pairs; wider in truth below). ``ValueError`` under 2 pairs."""
    d = [a - b for a, b in zip(x, y, strict=True)]
    if len(d) < 2:
        raise ValueError(f"a paired interval needs at least 2 pairs, got {len(d)}")
    mean = sum(d) / len(d)
    half = 1.96 * math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    return mean, mean - half, mean + half


def run(model: Any, tokenizer: Any, spec: ModelSpec, trials: list[Trial],
        codecs: list[Codec | None]) -> list[Outcome]:
    """The :class:`Outcome` of each entry of ``codecs`` (``None`` is the original, uncompressed cache).

    Every haystack is prefilled once; each codec then encodes and decodes that cache.
    """
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]
    hits: list[list[bool]] = [[] for _ in codecs]
    logprobs: list[list[float]] = [[] for _ in codecs]
    for trial in trials:
        kv, _ = prefill(model, spec, trial.prefix_ids, step=512)
        answer_ids = tokenizer(" " + trial.key, return_tensors="pt", add_special_tokens=False).input_ids[0]
        for i, codec in enumerate(codecs):
            restored = kv if codec is None else codec.decode(codec.encode(kv), spec)
            logprobs[i].append(answer_logprob(model, restored.to_hf(), question, answer_ids))
            cache = restored.to_hf()
            forward(model, question[:-1], cache)
            answer = greedy(model, cache, int(question[-1]), ANSWER_TOKENS)
            hits[i].append(trial.key in tokenizer.decode(answer).replace(" ", ""))
    return [Outcome(tuple(h), tuple(lp)) for h, lp in zip(hits, logprobs, strict=True)]
