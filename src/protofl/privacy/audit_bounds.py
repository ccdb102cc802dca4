"""PROVISIONAL stand-in for the one-run audit statistics (the statistics branch replaces this file).

The δ = 0 form of the bound of Steinke, Nasr & Jagielski (2023): under ε-DP, the number of correct guesses
among r guesses about independent fair-coin canaries is dominated by Binomial(r, e^ε / (1 + e^ε)).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["guess_and_bound", "minimum_canaries", "one_run_epsilon_lower"]


def one_run_epsilon_lower(canaries: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest ε rejected at ``confidence`` by ``correct`` right out of ``guesses`` guesses (0 if none)."""
    if guesses == 0 or correct == 0:
        return 0.0

    def p_value(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(correct - 1, guesses, p))

    if p_value(0.0) > 1 - confidence:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) <= 1 - confidence and hi < 100:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(mid) <= 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def guess_and_bound(scores, included, delta: float, confidence: float) -> dict:
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    m = len(scores)
    best = {"guesses": 0, "correct": 0, "epsilon_lower": 0.0}
    for k in sorted({max(1, int(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)}):
        guess_in = order[: k // 2 + k % 2]
        guess_out = order[m - k // 2 :] if k // 2 else order[:0]
        correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
        eps = one_run_epsilon_lower(m, k, correct, delta, confidence)
        if eps > best["epsilon_lower"]:
            best = {"guesses": k, "correct": correct, "epsilon_lower": eps}
    return best


def minimum_canaries(epsilon: float, delta: float, confidence: float) -> int:
    m = 1
    while one_run_epsilon_lower(m, m, m, delta, confidence) < epsilon:
        m += 1
    return m
