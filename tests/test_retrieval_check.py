"""The retrieval check of codecs on calibration haystacks (kvpack.eval.retrieval_check), on the bundled model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import PROSE
from kvpack import codecs
from kvpack.codecs.transform.retrieval import haystacks
from kvpack.eval.retrieval_check import SEED, check

TEXTS = [PROSE * 8, "def f(x):\n    return x + 1\n" * 20]


def test_exact_codecs_lose_nothing_and_lossy_ones_are_scored(smollm: tuple[Any, Any, Any]) -> None:
    model, tokenizer, spec = smollm
    done: list[int] = []
    exact, lossy = check(model, tokenizer, spec, [codecs.get("lossless"), codecs.get("kivi", bits=2, sink=0)],
                         TEXTS, 3, 160, on_progress=done.append)
    assert done == [1, 2, 3]
    assert exact.coded == exact.reference and exact.delta == 0.0 and exact.interval == (0.0, 0.0)
    assert lossy.reference == exact.reference and lossy.coded != lossy.reference
    low, high = lossy.interval
    assert low <= lossy.delta <= high and low < high
    # the reference is the key's log-probability after the question with the whole haystack in view: the same
    # numbers as one forward pass over haystack + question + key without any cache (bf16: to a small tolerance)
    for (ids, q), got in zip(haystacks(tokenizer, TEXTS, 3, 160, seed=SEED), exact.reference, strict=True):
        with torch.no_grad():
            logits = model(ids[None, :-1]).logits[0].float()
        answer = ids[160 + q :]
        whole = torch.log_softmax(logits[160 + q - 1 :], -1).gather(1, answer[:, None]).sum()
        assert got == pytest.approx(float(whole), abs=0.05)


def test_refuses_fewer_than_two_haystacks(smollm: tuple[Any, Any, Any]) -> None:
    model, tokenizer, spec = smollm
    with pytest.raises(ValueError, match="at least 2 haystacks"):
        check(model, tokenizer, spec, [codecs.get("lossless")], TEXTS, 1, 160)
