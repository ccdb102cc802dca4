"""Statistics of privacy auditing: lower bounds on ε that an observed attack implies.

An audit runs a mechanism, attacks what it released, and turns the attack's success into a
statement "the mechanism is *not* (ε, δ)-DP for any ε below ``epsilon_lower``", which holds with
probability at least ``confidence`` over the audit's own randomness. A correct mechanism claiming
ε must therefore show ``epsilon_lower <= ε`` (up to the ``1 - confidence`` chance of a false alarm);
a bound above the claim is evidence of a bug.

Two designs are covered:

* **One run with canaries** (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one training
  run"): ``m`` canaries are each included by an independent fair coin, the mechanism runs once, and
  the auditor guesses "in" or "out" for ``r`` of them (abstaining on the rest). Under ε-DP the number of
  correct guesses is stochastically dominated by ``Binomial(r, e^ε / (1 + e^ε))``; under (ε, δ)-DP the
  paper's bound for approximate DP adds ``2 m δ · max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i`` to the
  tail probability of ``v`` or more correct guesses. :func:`one_run_epsilon_lower` inverts this tail,
  :func:`guess_and_bound` makes the guesses from attack scores over a small grid of guess counts, and
  :func:`minimum_canaries` says how many canaries a bound needs at all.
* **Two worlds** (the classic hypothesis-test audit): the mechanism runs many times on each of two
  neighbouring inputs, a test decides which input produced each output, and Clopper–Pearson
  intervals on its error rates bound ε through ``FPR + e^ε FNR >= 1 - δ`` (and the symmetric
  inequality): :func:`two_worlds_epsilon_lower`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

__all__ = [
    "GUESS_FRACTIONS",
    "MAX_CANARIES",
    "OneRunBound",
    "guess_and_bound",
    "minimum_canaries",
    "one_run_epsilon_lower",
    "one_run_p_value",
    "two_worlds_epsilon_lower",
]

#: The default grid of :func:`guess_and_bound`: ``(k_plus, k_minus)`` as fractions of the canaries.
#: Balanced guesses at growing depths, and "included"-only guesses for the most confident few.
#: Every entry is one test of the union (Bonferroni) correction, so its length is the ``tests`` of
#: :func:`minimum_canaries` for an audit that uses the default grid.
GUESS_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.01, 0.01),
    (0.025, 0.025),
    (0.05, 0.05),
    (0.1, 0.1),
    (0.25, 0.25),
    (0.5, 0.5),
    (0.02, 0.0),
    (0.05, 0.0),
    (0.1, 0.0),
    (0.2, 0.0),
)

#: ε beyond which the search stops: e^ε overflows a float near 709 and no audit gets near it.
_EPSILON_CAP = 700.0
#: The most canaries :func:`minimum_canaries` considers (an audit with more is not practical here).
MAX_CANARIES = 1 << 21
#: Bisection steps: the bracket [0, cap] shrinks below 1e-9 well within this many halvings.
_BISECTIONS = 80


def _check_level(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0 or not math.isfinite(delta):
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    for name, value in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if canaries < 1:
        raise ValueError("canaries must be >= 1")
    if guesses > canaries:
        raise ValueError(f"guesses ({guesses}) cannot exceed canaries ({canaries})")
    if correct > guesses:
        raise ValueError(f"correct ({correct}) cannot exceed guesses ({guesses})")


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The largest probability that an (``epsilon``, ``delta``)-DP mechanism lets an auditor get
    ``correct`` or more of ``guesses`` guesses right among ``canaries`` fair-coin canaries (the
    one-run bound; capped at 1). Small values reject the hypothesis that the mechanism is
    (``epsilon``, ``delta``)-DP."""
    _check_counts(canaries, guesses, correct)
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}")
    if correct == 0:
        return 1.0
    epsilon = min(epsilon, _EPSILON_CAP)
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    tail = float(special.bdtrc(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i, from the pmf at v-1, v-2, ... . The pmf is
    # summed down to 12 standard deviations (and 12) below the mean only: every longer window holds at
    # most P[B < v] and has a larger divisor than the last one summed, so P[B < v] / (that divisor) bounds
    # them all from above (the p-value can only come out too large, the ε bound too small), and the
    # far tail, negligible there, is not summed.
    spread = math.sqrt(guesses * q * (1.0 - q))
    floor = min(correct, max(0, int(guesses * q - 12.0 * spread - 12.0)))
    k = np.arange(correct - 1, floor - 1, -1, dtype=float)
    log_pmf = (
        special.gammaln(guesses + 1.0)
        - special.gammaln(k + 1.0)
        - special.gammaln(guesses - k + 1.0)
        - k * math.log1p(math.exp(-epsilon))  # k log q
        - (guesses - k) * (epsilon + math.log1p(math.exp(-epsilon)))  # (r - k) log(1 - q)
    )
    windows = np.cumsum(np.exp(log_pmf)) / np.arange(1, correct - floor + 1)
    largest = float(windows.max()) if windows.size else 0.0
    if floor > 0:
        largest = max(largest, float(special.bdtr(correct - 1, guesses, q)) / (correct - floor + 1))
    return min(tail + 2.0 * canaries * delta * largest, 1.0)


def one_run_epsilon_lower(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The one-run lower bound on ε (Steinke, Nasr & Jagielski 2023): every ε below it is rejected at
    level ``1 - confidence`` because ``correct`` or more right guesses out of ``guesses`` would be less
    likely than that under (ε, ``delta``)-DP; 0.0 when even ε = 0 is not rejected."""
    _check_counts(canaries, guesses, correct)
    _check_level(delta, confidence)
    level = 1.0 - confidence
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    if one_run_p_value(canaries, guesses, correct, _EPSILON_CAP, delta) < level:
        return _EPSILON_CAP
    low, high = 0.0, 1.0  # invariant: p(low) < level <= p(high)
    while one_run_p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2.0 * high
    for _ in range(_BISECTIONS):
        middle = 0.5 * (low + high)
        if one_run_p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
        if high - low < 1e-10:
            break
    return low


@dataclass(frozen=True)
class OneRunBound:
    """What :func:`guess_and_bound` found: the best bound over its grid and the guesses behind it."""

    epsilon_lower: float
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float

    def __post_init__(self) -> None:
        if not self.epsilon_lower >= 0.0:
            raise ValueError(f"epsilon_lower must be >= 0, got {self.epsilon_lower!r}")
        if self.guesses != self.k_plus + self.k_minus:
            raise ValueError("guesses must equal k_plus + k_minus")
        if not 0 <= self.correct <= self.guesses:
            raise ValueError(f"correct must lie in [0, guesses], got {self.correct}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence!r}")


def _default_guesses(canaries: int) -> list[tuple[int, int]]:
    grid = []
    for plus, minus in GUESS_FRACTIONS:
        k_plus = max(1, round(plus * canaries)) if plus > 0 else 0
        k_minus = max(1, round(minus * canaries)) if minus > 0 else 0
        while k_plus + k_minus > canaries:  # only with very few canaries
            if k_minus >= k_plus and k_minus > 0:
                k_minus -= 1
            else:
                k_plus -= 1
        grid.append((k_plus, k_minus))
    return grid


def guess_and_bound(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> OneRunBound:
    """Turn one run's attack ``scores`` (higher = more likely included) on fair-coin canaries into the
    one-run ε lower bound. For each ``(k_plus, k_minus)`` of ``guesses`` (default: :data:`GUESS_FRACTIONS`
    of the canaries) the auditor guesses "included" for the ``k_plus`` highest scores and "excluded"
    for the ``k_minus`` lowest and abstains on the rest; each pair is tested at level
    ``(1 - confidence) / len(guesses)`` (union bound), so the best of them holds at ``confidence``.
    Ties in ``scores`` are broken by canary index, which does not depend on inclusion."""
    _check_level(delta, confidence)
    score = np.asarray(scores, dtype=float)
    truth = np.asarray(included)
    if score.ndim != 1 or truth.shape != score.shape:
        raise ValueError(f"scores and included must be 1-D of one length, got shapes {score.shape} and {truth.shape}")
    if score.size == 0:
        raise ValueError("no canaries: scores is empty")
    if not np.all(np.isfinite(score)):
        raise ValueError("scores must be finite")
    if truth.dtype != bool:
        if not np.all(np.isin(truth, (0, 1))):
            raise ValueError("included must hold booleans (or 0/1)")
        truth = truth.astype(bool)
    canaries = int(score.size)
    grid = [(int(p), int(n)) for p, n in guesses] if guesses is not None else _default_guesses(canaries)
    if not grid:
        raise ValueError("guesses is empty: give at least one (k_plus, k_minus) pair")
    for k_plus, k_minus in grid:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > canaries:
            raise ValueError(
                f"guesses pair ({k_plus}, {k_minus}) must be non-negative, not both 0, and sum to at most {canaries}"
            )
    # Stable sort from the highest score: a canary's rank depends on the scores and its index only.
    order = np.argsort(-score, kind="stable")
    ranked = truth[order]
    hits_top = np.concatenate(([0], np.cumsum(ranked)))  # included among the j highest
    misses_bottom = np.concatenate(([0], np.cumsum(~ranked[::-1])))  # excluded among the j lowest
    per_test = 1.0 - (1.0 - confidence) / len(grid)
    best: OneRunBound | None = None
    for k_plus, k_minus in grid:
        correct = int(hits_top[k_plus] + misses_bottom[k_minus])
        bound = one_run_epsilon_lower(canaries, k_plus + k_minus, correct, delta, per_test)
        if best is None or bound > best.epsilon_lower:
            best = OneRunBound(bound, k_plus + k_minus, correct, k_plus, k_minus, confidence)
    assert best is not None
    return best


def minimum_canaries(epsilon: float, delta: float, confidence: float = 0.95, tests: int = 1) -> int:
    """The fewest canaries with which even perfect guessing of every canary shows a one-run bound of at
    least ``epsilon`` when each of ``tests`` union-corrected tests runs at ``(1 - confidence) / tests``
    (``len(GUESS_FRACTIONS)`` for :func:`guess_and_bound`'s default grid). Fewer canaries cannot show
    ``epsilon`` whatever the attack. Raises ValueError when no number of canaries can (δ too large:
    the ``2 m δ`` term grows with the canaries)."""
    if not epsilon > 0.0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    _check_level(delta, confidence)
    if isinstance(tests, bool) or not isinstance(tests, int) or tests < 1:
        raise ValueError(f"tests must be an integer >= 1, got {tests!r}")
    per_test = 1.0 - (1.0 - confidence) / tests
    level = 1.0 - per_test

    def p_value(m: int) -> float:
        # Perfect guessing shows ε_lower >= epsilon iff epsilon itself is rejected.
        return one_run_p_value(m, m, m, epsilon, delta)

    # Under ε-DP the tail of m correct out of m is q^m, and the δ term only adds to it: fewer than
    # ln(level) / ln(q) canaries never show epsilon.
    q = 1.0 / (1.0 + math.exp(-epsilon))
    start = max(1, math.ceil(math.log(level) / math.log(q)) - 1)
    while start > 1 and p_value(start - 1) < level:  # guard against rounding at the pure-DP limit
        start -= 1
    # With δ > 0 the p-value of perfect guessing first falls with m (the binomial tail) and then rises
    # towards about 2 δ (1 + e^ε) (the 2 m δ term), so it is searched on a geometric grid, refined
    # around the grid's minimum, and the first m below the level is found by bisection on the falling
    # part.
    grid = [start]
    while grid[-1] < MAX_CANARIES:
        grid.append(min(MAX_CANARIES, max(grid[-1] + 1, int(grid[-1] * 1.25))))
    values = []
    for m in grid:
        values.append(p_value(m))
        if values[-1] < level:
            break
    if values[-1] >= level:
        j = int(np.argmin(values))
        low, high = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
        while high - low > 2:  # integer ternary search for the minimum of the dip
            a, b = low + (high - low) // 3, high - (high - low) // 3
            if p_value(a) < p_value(b):
                high = b
            else:
                low = a
        best = min(range(low, high + 1), key=p_value)
        if p_value(best) >= level:
            raise ValueError(
                f"no number of canaries up to {MAX_CANARIES} can show epsilon {epsilon} at delta {delta} and "
                f"confidence {confidence} and {tests} test(s) (with delta > 0 the 2 m delta term of the one-run "
                "bound grows with the canaries and caps the epsilon any number of them can show)"
            )
        low, high = grid[max(j - 1, 0)], best
    else:
        low, high = grid[max(len(values) - 2, 0)], grid[len(values) - 1]
    if p_value(low) < level:
        return low
    while high - low > 1:  # p_value(high) < level <= p_value(low), p falling in between
        middle = (low + high) // 2
        if p_value(middle) < level:
            high = middle
        else:
            low = middle
    return high


def _clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided upper ``1 - alpha`` Clopper–Pearson bound on a rate seen as ``errors`` of ``trials``."""
    if errors >= trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, errors + 1, trials - errors))


def two_worlds_epsilon_lower(
    false_positives: int,
    trials_0: int,
    false_negatives: int,
    trials_1: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The two-world lower bound on ε: a test that says "world 1" in ``false_positives`` of ``trials_0``
    runs on the first input and "world 0" in ``false_negatives`` of ``trials_1`` runs on its neighbour.
    With one-sided Clopper–Pearson upper bounds FPR⁺ and FNR⁺ (each at ``(1 - confidence) / 2`` so
    that both hold at once), ε ≥ ln((1 − δ − FNR⁺) / FPR⁺) and ε ≥ ln((1 − δ − FPR⁺) / FNR⁺); the
    larger of the two, and 0.0 when neither is positive."""
    _check_level(delta, confidence)
    for name, value in (
        ("false_positives", false_positives),
        ("trials_0", trials_0),
        ("false_negatives", false_negatives),
        ("trials_1", trials_1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if trials_0 < 1 or trials_1 < 1:
        raise ValueError("trials_0 and trials_1 must be >= 1")
    if false_positives > trials_0:
        raise ValueError(f"false_positives ({false_positives}) cannot exceed trials_0 ({trials_0})")
    if false_negatives > trials_1:
        raise ValueError(f"false_negatives ({false_negatives}) cannot exceed trials_1 ({trials_1})")
    alpha = (1.0 - confidence) / 2.0
    fpr = _clopper_pearson_upper(int(false_positives), int(trials_0), alpha)
    fnr = _clopper_pearson_upper(int(false_negatives), int(trials_1), alpha)
    best = 0.0
    for error, other in ((fpr, fnr), (fnr, fpr)):
        numerator = 1.0 - delta - other
        if numerator > 0.0 and error > 0.0:
            best = max(best, math.log(numerator / error))
    return best
