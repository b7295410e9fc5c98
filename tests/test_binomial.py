"""The binomial tests behind a calibration's claims, against values known in closed form."""

from __future__ import annotations

import math

import pytest

from facesvc.models.binomial import binomial_pmf, shown_above


def test_pmf_is_the_binomial_distribution() -> None:
    assert binomial_pmf(10, 3, 0.2) == pytest.approx(math.comb(10, 3) * 0.2**3 * 0.8**7)
    assert sum(binomial_pmf(50, k, 0.03) for k in range(51)) == pytest.approx(1.0)
    # Tens of thousands of pairs, where the direct product underflows.
    assert binomial_pmf(40_000, 40, 1e-3) == pytest.approx(0.06298, abs=1e-5)


def test_one_event_in_one_trial_shows_a_rate_above_5_percent_not_above_6() -> None:
    # P(X >= 1) = bound: below 1 - 0.95 shown, above it not.
    assert shown_above(1, 1, 0.04, 0.95)
    assert not shown_above(1, 1, 0.06, 0.95)


def test_a_few_events_above_the_bound_show_nothing_many_do() -> None:
    assert not shown_above(2, 631, 0.002, 0.95)  # 1.26 expected: P(X >= 2) = 0.36
    assert shown_above(6, 631, 0.002, 0.95)  # P(X >= 6) = 0.0019
    assert not shown_above(0, 631, 0.0, 0.95)
    assert shown_above(1, 631, 0.0, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        shown_above(1, 10, 0.1, 1.0)
