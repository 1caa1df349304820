"""Retrieval sensitivity for calibration: the Fisher weights of a key recalled from far back in the cache.

The continuation Fisher (:func:`kvpack.codecs.transform.sensitivity.prefill_and_fisher` on a document's next tokens)
weighs the features by how much the next few hundred tokens depend on them, which is mostly local context. Recalling
a fact from thousands of tokens back leans on other features: on SmolLM2-135M, layer 18 holds 36% of the retrieval
Fisher and 5% of the continuation one (docs/transform.md, "Retrieval weights", which also measures that mixing it in
does not raise 7K passkey retrieval at 32x: the option stays off by default). This module
makes needle-in-a-haystack sequences from the calibration text (never from evaluation documents, and with a needle
and question worded unlike :mod:`kvpack.eval.passkey`'s, so that calibration does not learn the benchmark's
sentences) and differentiates only the answer's log-likelihood, the task of passkey retrieval (Mohtashami & Jaggi,
arXiv 2305.16300), applied here to sensitivity weighting as the continuation loss is in KVTC (arXiv 2511.01815).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from kvpack.codecs.transform.sensitivity import prefill_and_fisher
from kvpack.spec import ModelSpec

NEEDLE = "The secret number is {key}. Keep it in mind. {key} is the secret number. "
QUESTION = "\nWhat is the secret number? The secret number is"


def haystacks(tokenizer: Any, texts: Sequence[str], n: int, tokens: int, seed: int = 0, repeat: int = 0
              ) -> list[tuple[torch.Tensor, int]]:
    """``n`` sequences ``[tokens + question + answer]`` and the question's length in tokens.

    Haystack ``i`` is the calibration texts joined from text ``i mod len(texts)`` on (``repeat=0``), or the first
    ``repeat`` tokens of that text repeated (a filler with no other fact in it, as passkey retrieval's repeated
    sentences), cut to ``tokens`` with the needle (a 5-digit key drawn from ``seed``) inserted at a uniform depth;
    the question and ``" " + key`` follow. ``ValueError`` if the texts hold fewer than ``tokens`` tokens together, or
    a text fewer than ``repeat``.
    """
    if not texts:
        raise ValueError("retrieval calibration needs calibration texts")

    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]]

    ids = [encode(t) for t in texts]
    question = encode(QUESTION)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        needle = encode(NEEDLE.format(key=key))
        if tokens <= len(needle):
            raise ValueError(f"a retrieval haystack of {tokens} tokens has no room around its {len(needle)}-token "
                             f"needle; raise retrieval_tokens")
        if repeat:
            span = ids[i % len(ids)][:repeat]
            if len(span) < repeat:
                raise ValueError(f"text {i % len(ids)} holds {len(span)} tokens, fewer than the {repeat} a repeated "
                                 f"filler repeats")
            filler = (span * -(-(tokens - len(needle)) // repeat))[: tokens - len(needle)]
        else:
            filler = [t for doc in ids[i % len(ids):] + ids[: i % len(ids)] for t in doc][: tokens - len(needle)]
        if len(filler) < tokens - len(needle):
            raise ValueError(f"the calibration texts hold {sum(map(len, ids))} tokens, fewer than the {tokens} a "
                             f"retrieval haystack needs; give more or longer texts or lower retrieval_tokens")
        depth = rng.randrange(len(filler) + 1)
        answer = encode(" " + key)
        out.append((torch.tensor(filler[:depth] + needle + filler[depth:] + question + answer), len(question)))
    return out


def retrieval_fisher(model: Any, tokenizer: Any, spec: ModelSpec, texts: Sequence[str], n: int, tokens: int,
                     sinks: int) -> torch.Tensor:
    """Mean diagonal Fisher ``[D]`` (pre-RoPE features, as the continuation one) of the answers of ``n`` haystacks of
    ``tokens`` tokens: the squared gradient of the key's log-likelihood given the question, w.r.t. the cache."""
    parts = [prefill_and_fisher(model, spec, ids, tokens, sinks, scored_from=q - 1)[2]
             for ids, q in haystacks(tokenizer, texts, n, tokens)]
    return torch.stack(parts).mean(0)
