"""Retrieval check of lossy codecs on calibration text: how much of a key hidden far back in the cache survives coding.

It hides a key in haystacks made of calibration text (:func:`kvpack.codecs.transform.retrieval.haystacks`: never
evaluation documents, and worded unlike :mod:`kvpack.eval.passkey`'s needle and question), encodes and decodes each
haystack's cache with every codec, and scores the key's teacher-forced log-probability after the question against
the uncompressed cache's, haystack by haystack: a continuous measure of the recall that the passkey benchmark
(Mohtashami & Jaggi, arXiv 2305.16300) counts in greedy answers, without evaluation documents. Built to choose
among calibrations of one transform recipe, which differ by up to 29 of 60 trials on the 7K benchmark at equal
perplexity; on those four profiles it does not rank them as the benchmark does (docs/transform.md, "A retrieval
check on calibration text"), so it is a measurement, not a selection rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvpack.codecs.base import Codec
from kvpack.codecs.transform.retrieval import haystacks
from kvpack.eval.passkey import paired_interval
from kvpack.inference import answer_logprob, prefill
from kvpack.spec import ModelSpec

#: Key seed of the check's haystacks (retrieval calibration draws its keys from seed 0).
SEED = 1


@dataclass(frozen=True)
class RetrievalCheck:
    """One codec's check: the key's log-probability (nats) per haystack, through the codec and uncompressed."""

    coded: tuple[float, ...]
    reference: tuple[float, ...]

    @property
    def delta(self) -> float:
        """Mean per-haystack loss of the key's log-probability to the codec (negative: recall got worse)."""
        return paired_interval(self.coded, self.reference)[0]

    @property
    def interval(self) -> tuple[float, float]:
        """95% interval of :attr:`delta` (:func:`kvpack.eval.passkey.paired_interval`)."""
        return paired_interval(self.coded, self.reference)[1:]


def check(model: Any, tokenizer: Any, spec: ModelSpec, codecs: Sequence[Codec], texts: Sequence[str], n: int,
          tokens: int, repeat: int = 0, on_progress: Callable[[int], None] | None = None) -> list[RetrievalCheck]:
    """The :class:`RetrievalCheck` of each codec on ``n`` (at least 2) haystacks of ``tokens`` tokens of ``texts``.

    Each haystack is prefilled once (``[tokens]`` ids, its cache ``[layers][tokens, kv_heads, head_dim]``) and
    every codec encodes and decodes that cache; ``repeat``: the filler, as in
    :func:`~kvpack.codecs.transform.retrieval.haystacks`; ``on_progress`` gets the haystacks done. ``ValueError``
    if ``n < 2`` or the texts hold too few tokens.
    """
    if n < 2:
        raise ValueError(f"a retrieval check needs at least 2 haystacks (it reports an interval), got {n}")
    coded: list[list[float]] = [[] for _ in codecs]
    reference: list[float] = []
    for done, (ids, question_len) in enumerate(haystacks(tokenizer, texts, n, tokens, seed=SEED, repeat=repeat), 1):
        question, answer = ids[tokens : tokens + question_len], ids[tokens + question_len :]
        kv, _ = prefill(model, spec, ids[:tokens], step=512)
        reference.append(answer_logprob(model, kv.to_hf(), question, answer))
        for i, codec in enumerate(codecs):
            coded[i].append(answer_logprob(model, codec.decode(codec.encode(kv), spec).to_hf(), question, answer))
        if on_progress is not None:
            on_progress(done)
    return [RetrievalCheck(tuple(c), tuple(reference)) for c in coded]
