"""Binomial probabilities behind the rates a calibration states: whether k false matches
among n impostor pairs show a false-match rate above or below a bound."""

from __future__ import annotations

import math


def binomial_pmf(n: int, k: int, p: float) -> float:
    """P(X = k) for X ~ Binomial(n, p), 0 < p < 1, computed in logs (n in the tens of
    thousands)."""
    log_term = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    return math.exp(log_term)


def shown_above(k: int, n: int, bound: float, confidence: float) -> bool:
    """Whether k events in n trials show the rate to be above ``bound`` with one-sided
    ``confidence`` (e.g. 0.95): at rate ``bound``, k or more would happen with probability
    at most 1 - confidence (the Clopper-Pearson lower bound exceeds ``bound``)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if k <= 0 or n <= 0:
        return False
    if bound <= 0.0:
        return True
    if bound >= 1.0:
        return False
    fewer = sum(binomial_pmf(n, i, bound) for i in range(min(k, n + 1)))
    return 1.0 - fewer <= 1.0 - confidence
