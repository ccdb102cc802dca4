"""The statistics of auditing against independent computations and against mechanisms of known ε:
the one-run bound (pure and approximate DP), the guess grid, the fewest canaries a bound needs, and the
two-world Clopper–Pearson bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from protofl.privacy import (
    GUESS_FRACTIONS,
    OneRunBound,
    guess_and_bound,
    minimum_canaries,
    one_run_epsilon_lower,
    one_run_p_value,
    two_worlds_epsilon_lower,
)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@pytest.mark.parametrize(
    ("canaries", "guesses", "correct", "confidence"),
    [(1000, 100, 90, 0.95), (1000, 1000, 700, 0.95), (50, 10, 10, 0.9), (10_000, 500, 400, 0.99), (200, 40, 31, 0.5)],
)
def test_pure_dp_bound_is_the_clopper_pearson_inversion_of_the_binomial_tail(canaries, guesses, correct, confidence):
    # P[Binomial(r, q) >= v] = I_q(v, r - v + 1): the q at which the tail reaches 1 - confidence is a beta
    # quantile, and the bound is its log-odds.
    q = stats.beta.ppf(1.0 - confidence, correct, guesses - correct + 1)
    expected = max(0.0, logit(q))
    assert one_run_epsilon_lower(canaries, guesses, correct, 0.0, confidence) == pytest.approx(expected, abs=1e-7)
    assert expected > 0.0


def test_pure_dp_bound_is_zero_when_guessing_is_no_better_than_a_coin():
    assert one_run_epsilon_lower(1000, 100, 50, 0.0) == 0.0
    assert one_run_epsilon_lower(1000, 100, 0, 0.0) == 0.0
    assert one_run_epsilon_lower(1000, 0, 0, 0.0) == 0.0


def test_approximate_dp_p_value_equals_a_direct_evaluation_of_the_theorem():
    # Steinke, Nasr & Jagielski, approximate DP: P[W >= v] <= T(v) + 2 m δ max_{1<=i<=v} (T(v-i) - T(v)) / i
    # with T(v) = P[Binomial(r, q) >= v]; here T from exact binomial coefficients.
    m, r, v, eps, delta = 60, 25, 21, 1.3, 1e-3
    q = math.exp(eps) / (1.0 + math.exp(eps))

    def tail(k: int) -> float:
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

    direct = tail(v) + 2 * m * delta * max((tail(v - i) - tail(v)) / i for i in range(1, v + 1))
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(direct, rel=1e-9)
    assert one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(tail(v), rel=1e-9)


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [one_run_epsilon_lower(2000, 200, v, 1e-4) for v in range(0, 201)]
    assert all(b <= a + 1e-9 for b, a in zip(bounds, bounds[1:]))
    positive = [b for b in bounds if b > 0]
    assert len(positive) > 50
    assert all(a < b for a, b in zip(positive, positive[1:]))
    for v in (130, 160, 190, 200):
        assert one_run_epsilon_lower(2000, 200, v, 1e-4) < one_run_epsilon_lower(2000, 200, v, 0.0)
    # The same evidence at higher confidence bounds ε less.
    assert one_run_epsilon_lower(2000, 200, 170, 0.0, 0.99) < one_run_epsilon_lower(2000, 200, 170, 0.0, 0.9)


@pytest.mark.parametrize(("canaries", "guesses", "correct"), [(1000, 100, 90), (4000, 800, 700), (100_000, 1000, 900)])
def test_approximate_dp_p_value_rises_with_epsilon(canaries, guesses, correct):
    # The bound is found by bisection over ε: that needs the p-value to rise with ε, δ term included.
    p = [one_run_p_value(canaries, guesses, correct, eps, 1e-5) for eps in np.linspace(0.0, 12.0, 241)]
    assert all(a <= b + 1e-15 for a, b in zip(p, p[1:]))
    assert p[0] < 0.01 and p[-1] > 0.5


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 11, 5, 0.0), "guesses"),
        ((10, 5, 6, 0.0), "correct"),
        ((0, 0, 0, 0.0), "canaries"),
        ((10, 5, -1, 0.0), "correct"),
        ((10, 5.0, 3, 0.0), "guesses"),
        ((10, 5, 3, 1.0), "delta"),
        ((10, 5, 3, -0.1), "delta"),
    ],
)
def test_one_run_bound_rejects_bad_counts(args, match):
    with pytest.raises(ValueError, match=match):
        one_run_epsilon_lower(*args)


def test_one_run_bound_rejects_bad_confidence():
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            one_run_epsilon_lower(10, 5, 3, 0.0, confidence)


def randomized_response_run(rng, canaries, epsilon):
    """One run of per-canary randomised response at ``epsilon``: each canary's bit is reported truly with
    probability e^ε / (1 + e^ε). Changing one canary changes one report: the run is ε-DP."""
    included = rng.random(canaries) < 0.5
    truthful = rng.random(canaries) < math.exp(epsilon) / (1.0 + math.exp(epsilon))
    reported = np.where(truthful, included, ~included)
    return reported.astype(float), included


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_randomized_response_never_shows_more_than_its_epsilon(delta):
    rng = np.random.default_rng(11)
    epsilon = 2.0
    runs = 200
    bounds = [guess_and_bound(*randomized_response_run(rng, 4000, epsilon), delta).epsilon_lower for _ in range(runs)]
    # At 95 % confidence at most 5 % of runs may exceed ε (about 3 % do: randomised response is the worst case
    # of the one-run bound). Without the union correction over the guess grid about 24 % do, which fails here.
    assert sum(b > epsilon for b in bounds) <= 0.075 * runs
    # ... and the audit has power: it proves a good part of ε in a typical run.
    assert np.median(bounds) > 0.5 * epsilon


def test_randomized_response_weaker_than_claimed_is_caught():
    rng = np.random.default_rng(12)
    claimed, actual = 1.0, 3.0
    bounds = [guess_and_bound(*randomized_response_run(rng, 4000, actual), 1e-5).epsilon_lower for _ in range(20)]
    assert min(bounds) > claimed + 0.5


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of the Gaussian mechanism with sensitivity 1 and noise σ at ``delta`` (the exact curve of Balle &
    Wang: δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ))."""

    def gap(eps):
        return (
            stats.norm.cdf(0.5 / sigma - eps * sigma)
            - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)
            - delta
        )

    return optimize.brentq(gap, 0.0, 100.0)


def dirac_gaussian_run(rng, canaries, sigma):
    """The Gaussian mechanism on Dirac canaries: canary i adds the basis vector e_i when included, and the
    release is that sum plus N(0, σ² I); the auditor scores canary i by coordinate i of the release."""
    included = rng.random(canaries) < 0.5
    release = included.astype(float) + rng.normal(0.0, sigma, canaries)
    return release, included


def test_gaussian_mechanism_on_dirac_canaries_stays_below_its_epsilon():
    rng = np.random.default_rng(13)
    sigma, delta = 0.6, 1e-5
    epsilon = gaussian_epsilon(sigma, delta)
    assert 7.0 < epsilon < 9.0
    bounds = [guess_and_bound(*dirac_gaussian_run(rng, 5000, sigma), delta).epsilon_lower for _ in range(30)]
    assert sum(b > epsilon for b in bounds) <= 2
    assert np.median(bounds) > 1.0  # the audit shows part of ε (one run is not tight for the Gaussian)


def test_gaussian_mechanism_with_less_noise_than_claimed_is_caught():
    rng = np.random.default_rng(14)
    delta = 1e-5
    claimed_sigma = 4.0
    claimed = gaussian_epsilon(claimed_sigma, delta)
    assert 0.8 < claimed < 1.1
    bounds = [
        guess_and_bound(*dirac_gaussian_run(rng, 5000, claimed_sigma / 8), delta).epsilon_lower for _ in range(10)
    ]
    assert min(bounds) > claimed


def test_guess_and_bound_counts_guesses_and_hits_from_the_ranking():
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    result = guess_and_bound(scores, included, 0.0, 0.95, guesses=[(3, 3), (2, 0), (1, 4)])
    assert isinstance(result, OneRunBound)
    # (2, 0): the two highest are both included -> 2 of 2; (3, 3): 2 + 3 = 5 of 6; (1, 4): 1 + 3 = 4 of 5.
    per_test = 1.0 - 0.05 / 3
    candidates = {
        (3, 3): one_run_epsilon_lower(10, 6, 5, 0.0, per_test),
        (2, 0): one_run_epsilon_lower(10, 2, 2, 0.0, per_test),
        (1, 4): one_run_epsilon_lower(10, 5, 4, 0.0, per_test),
    }
    best = max(candidates, key=candidates.get)
    assert (result.k_plus, result.k_minus) == best
    assert result.epsilon_lower == pytest.approx(candidates[best])
    assert result.correct == {(3, 3): 5, (2, 0): 2, (1, 4): 4}[best]
    assert result.guesses == sum(best)
    assert result.confidence == 0.95


def test_guess_and_bound_applies_the_union_correction():
    rng = np.random.default_rng(15)
    scores, included = randomized_response_run(rng, 3000, 2.0)
    alone = guess_and_bound(scores, included, 0.0, guesses=[(150, 150)])
    with_others = guess_and_bound(scores, included, 0.0, guesses=[(150, 150), (3000, 0), (0, 3000), (2999, 1)])
    # The three extra entries prove nothing (all canaries guessed one way) but cost confidence.
    assert (with_others.k_plus, with_others.k_minus) == (150, 150)
    assert with_others.correct == alone.correct
    assert 0.0 < with_others.epsilon_lower < alone.epsilon_lower


def test_guess_and_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="one length"):
        guess_and_bound([1.0, 2.0], [True], 0.0)
    with pytest.raises(ValueError, match="empty"):
        guess_and_bound([], [], 0.0)
    with pytest.raises(ValueError, match="finite"):
        guess_and_bound([1.0, float("nan")], [True, False], 0.0)
    with pytest.raises(ValueError, match="included"):
        guess_and_bound([1.0, 2.0], [2, 0], 0.0)
    with pytest.raises(ValueError, match="guesses pair"):
        guess_and_bound([1.0, 2.0], [True, False], 0.0, guesses=[(2, 1)])
    with pytest.raises(ValueError, match="guesses is empty"):
        guess_and_bound([1.0, 2.0], [True, False], 0.0, guesses=[])


@pytest.mark.parametrize(
    ("epsilon", "delta", "tests"), [(1.0, 0.0, 1), (4.0, 1e-5, 1), (2.0, 1e-5, 10), (8.0, 1e-6, 10)]
)
def test_minimum_canaries_is_the_fewest_with_which_perfect_guessing_shows_epsilon(epsilon, delta, tests):
    confidence = 0.95
    per_test = 1.0 - (1.0 - confidence) / tests
    n = minimum_canaries(epsilon, delta, confidence, tests)
    assert one_run_epsilon_lower(n, n, n, delta, per_test) >= epsilon
    assert one_run_epsilon_lower(n - 1, n - 1, n - 1, delta, per_test) < epsilon


def test_minimum_canaries_under_pure_dp_is_the_closed_form():
    # m right out of m has probability q^m under ε-DP: the fewest m with q^m < 1 - confidence.
    for epsilon in (0.5, 1.0, 3.0, 6.0):
        q = math.exp(epsilon) / (1.0 + math.exp(epsilon))
        assert minimum_canaries(epsilon, 0.0, 0.95) == math.floor(math.log(0.05) / math.log(q)) + 1


def test_minimum_canaries_with_the_default_grid_lets_perfect_scores_show_epsilon():
    epsilon, delta = 3.0, 1e-5
    n = minimum_canaries(epsilon, delta, 0.95, tests=len(GUESS_FRACTIONS))
    n += n % 2  # the deepest grid entry guesses half "in" and half "out"
    included = np.arange(n) < n // 2
    assert guess_and_bound(included.astype(float), included, delta).epsilon_lower >= epsilon
    fewer = n - 40
    included = np.arange(fewer) < fewer // 2
    assert guess_and_bound(included.astype(float), included, delta).epsilon_lower < epsilon


def test_minimum_canaries_refuses_what_no_number_of_canaries_shows():
    # With δ > 0 the 2 m δ term caps the one-run bound near ln((1 - confidence) / (2 δ)).
    with pytest.raises(ValueError, match="no number of canaries"):
        minimum_canaries(8.0, 1e-4, 0.95)
    with pytest.raises(ValueError, match="epsilon"):
        minimum_canaries(0.0, 1e-5)
    with pytest.raises(ValueError, match="tests"):
        minimum_canaries(1.0, 1e-5, tests=0)


def test_two_worlds_bound_is_the_clopper_pearson_formula():
    fp, n0, fn, n1, delta, confidence = 120, 100_000, 4_000, 100_000, 1e-5, 0.95
    fpr = stats.beta.ppf(1 - 0.025, fp + 1, n0 - fp)
    fnr = stats.beta.ppf(1 - 0.025, fn + 1, n1 - fn)
    expected = max(math.log((1 - delta - fnr) / fpr), math.log((1 - delta - fpr) / fnr))
    assert two_worlds_epsilon_lower(fp, n0, fn, n1, delta, confidence) == pytest.approx(expected, rel=1e-12)
    # Symmetric in the two worlds.
    assert two_worlds_epsilon_lower(fn, n1, fp, n0, delta, confidence) == pytest.approx(expected, rel=1e-12)


def test_two_worlds_bound_is_zero_for_a_useless_test_and_grows_with_trials_for_a_perfect_one():
    assert two_worlds_epsilon_lower(5000, 10_000, 5000, 10_000, 1e-5) == 0.0
    assert two_worlds_epsilon_lower(10_000, 10_000, 0, 10_000, 1e-5) == 0.0
    perfect = [two_worlds_epsilon_lower(0, n, 0, n, 0.0) for n in (10, 100, 1000, 10_000)]
    assert all(a < b for a, b in zip(perfect, perfect[1:]))
    # Zero errors in n trials: FPR⁺ = 1 - (α/2)^(1/n).
    n = 1000
    up = 1 - 0.025 ** (1 / n)
    assert perfect[2] == pytest.approx(math.log((1 - up) / up), rel=1e-9)


def test_two_worlds_bound_stays_below_the_epsilon_of_randomized_response():
    rng = np.random.default_rng(16)
    epsilon, trials = 1.5, 200_000
    keep = math.exp(epsilon) / (1.0 + math.exp(epsilon))
    exceed = 0
    for _ in range(40):
        false_positives = int((rng.random(trials) >= keep).sum())  # world 0 reported as 1
        false_negatives = int((rng.random(trials) >= keep).sum())
        exceed += two_worlds_epsilon_lower(false_positives, trials, false_negatives, trials, 0.0) > epsilon
    assert exceed <= 2
    # ... while randomised response at 2.5 is caught by the same test.
    keep = math.exp(2.5) / (1.0 + math.exp(2.5))
    fp, fn = int((rng.random(trials) >= keep).sum()), int((rng.random(trials) >= keep).sum())
    assert two_worlds_epsilon_lower(fp, trials, fn, trials, 0.0) > epsilon


def test_two_worlds_bound_rejects_bad_counts():
    with pytest.raises(ValueError, match="false_positives"):
        two_worlds_epsilon_lower(11, 10, 0, 10, 0.0)
    with pytest.raises(ValueError, match="trials_0"):
        two_worlds_epsilon_lower(0, 0, 0, 10, 0.0)
    with pytest.raises(ValueError, match="false_negatives"):
        two_worlds_epsilon_lower(0, 10, -1, 10, 0.0)
    with pytest.raises(ValueError, match="delta"):
        two_worlds_epsilon_lower(0, 10, 0, 10, 1.0)
