"""Passkey retrieval's paired statistics (the model-level runs are in test_cli and the benchmarks)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpack.eval.passkey import Outcome, mcnemar_p, paired_interval


def test_flips_count_each_direction() -> None:
    reference = Outcome(hits=(True, True, False, False, True), key_logprob=(-1.0,) * 5)
    codec = Outcome(hits=(True, False, True, False, False), key_logprob=(-2.0, -3.0, -1.0, -4.0, -5.0))
    assert codec.flips(reference) == (1, 2) and reference.flips(codec) == (2, 1)
    assert codec.accuracy == 0.4 and codec.mean_key_logprob == -3.0


def test_mcnemar_exact_values() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == 2 / 32  # all five discordant trials one way
    assert math.isclose(mcnemar_p(2, 7), 2 * (1 + 9 + 36) / 512)  # the exact binomial tail, doubled
    assert mcnemar_p(4, 4) == 1.0


@given(st.integers(0, 200), st.integers(0, 200))
def test_mcnemar_is_symmetric_and_a_probability(gained: int, lost: int) -> None:
    p = mcnemar_p(gained, lost)
    assert p == mcnemar_p(lost, gained) and 0.0 < p <= 1.0
    if gained != lost:
        assert mcnemar_p(min(gained, lost), max(gained, lost) + 1) <= p  # one more trial the same way: no larger


@given(st.lists(st.tuples(st.floats(-50, 0), st.floats(-50, 0)), min_size=2, max_size=40), st.floats(-5, 5))
def test_paired_interval_is_the_mean_difference_with_a_normal_interval(pairs: list[tuple[float, float]],
                                                                       shift: float) -> None:
    x, y = [a for a, _ in pairs], [b for _, b in pairs]
    mean, low, high = paired_interval(x, y)
    assert mean == pytest.approx(sum(x) / len(x) - sum(y) / len(y), abs=1e-9)
    assert low <= mean + 1e-12 and mean - 1e-12 <= high and mean - low == pytest.approx(high - mean, abs=1e-9)
    same = paired_interval([v + shift for v in y], y)  # every pair differs by the same amount: no spread
    assert same[0] == pytest.approx(shift, abs=1e-9) and same[2] - same[1] == pytest.approx(0.0, abs=1e-6)


def test_paired_interval_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_interval([1.0], [0.0])
    assert paired_interval([1.0, 3.0], [0.0, 0.0]) == pytest.approx((2.0, 2.0 - 1.96, 2.0 + 1.96))
