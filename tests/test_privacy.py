"""The privacy layer: noise scales, accounting against independent computations, clipping, budget
stops and resume, what reaches the payload, config errors, DCR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import protofl
from protofl.config import ConfigError, PrivacyConfig, RunConfig
from protofl.privacy import (
    LEDGER_KEY,
    BudgetExceededError,
    DistillationClipping,
    GaussianEvent,
    LaplaceEvent,
    PrivacyLedger,
    PureDpEvent,
    SampledGaussianEvent,
    anova_scores,
    calibrate_noise_multiplier,
    clip_groups,
    clip_rows,
    igpp_release,
    laplace_noise,
    make_accountant,
    private_top_k,
    soft_clip,
    vpp_group_noise,
    vpp_release,
)

#: The VPDR paper's rule: fixed features, one example replaced by another of its class.
OLD = ("fixed-features", "replace-one")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- noise scales --------------------------------------------------------------------------------------


def _features(n_per_class=(40, 1, 7), d=16, seed=0):
    g = _gen(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    z = torch.randn(len(y), d, generator=g) * 3 + y[:, None].float()
    return z, y


def test_igpp_noise_std_matches_calibration_including_a_single_example_class():
    z, y = _features()
    sigma, bound = 1.7, 5.0
    clean = igpp_release(z, y, 3, bound, sigma, _gen(), *OLD).prototypes.double() - 0  # one draw for the shape
    draws = torch.stack([igpp_release(z, y, 3, bound, sigma, _gen(s), *OLD).prototypes.double() for s in range(3000)])
    clipped = clip_rows(z.double(), bound)
    means = torch.stack([clipped[y == c].mean(0) for c in range(3)])
    assert clean.shape == means.shape
    empirical = (draws - means).std(0)  # (3, d)
    for c, n_c in enumerate((40, 1, 7)):
        expected = sigma * 2 * bound / n_c  # the one-example class gets sensitivity 2R / 1
        # 3000 draws x 16 coordinates: the pooled std is within ~0.5% of the truth; allow 3%.
        assert float(empirical[c].pow(2).mean().sqrt()) == pytest.approx(expected, rel=0.03)
        assert float((draws - means)[:, c].mean().abs()) < 4 * expected / math.sqrt(3000 * 16) + 1e-9


def test_trained_features_rule_scales_every_class_by_2r_sqrt_c():
    z, y = _features()  # 3 classes
    sigma, bound = 1.7, 5.0
    clipped = clip_rows(z.double(), bound)
    means = torch.stack([clipped[y == c].mean(0) for c in range(3)])
    draws = torch.stack(
        [
            igpp_release(z, y, 3, bound, sigma, _gen(s), "trained-features", "replace-one").prototypes.double()
            for s in range(2000)
        ]
    )
    expected = sigma * 2 * bound * math.sqrt(3)
    for c in range(3):
        assert float((draws - means)[:, c].pow(2).mean().sqrt()) == pytest.approx(expected, rel=0.03)
    r = vpp_release(z, y, 3, bound, sigma, 0.3, 0.1, 1.0, _gen(), "trained-features", "replace-one")
    _, _, s_a, s_b = vpp_group_noise(16, math.ceil(0.3 * 16), sigma)
    assert float(r.noise_std[0, r.selected[0]]) == pytest.approx(s_a * 2 * bound * math.sqrt(3))
    assert float(r.noise_std[1].max()) == pytest.approx(s_b * 2 * bound * math.sqrt(3))


def test_vpp_group_noise_std_matches_calibration():
    z, y = _features(n_per_class=(30, 20), d=20)
    sigma, bound, rho = 2.0, 5.0, 0.3
    k = math.ceil(rho * 20)
    kappa_a, kappa_b, s_a, s_b = vpp_group_noise(20, k, sigma)
    dev_a, dev_b = [], []
    for s in range(2000):
        r = vpp_release(z, y, 2, bound, sigma, rho, 0.1, 1.0, _gen(s), *OLD)
        rest = torch.tensor([j for j in range(20) if j not in set(r.selected.tolist())])
        clipped = clip_groups(z.double(), [r.selected, rest], [bound * kappa_a, bound * kappa_b])
        means = torch.stack([clipped[y == c].mean(0) for c in range(2)])
        noise = r.prototypes.double() - means
        dev_a.append(noise[0, r.selected] * 30)  # rescale class 0 (n=30) to unit sensitivity 2R
        dev_b.append(noise[0, rest] * 30)
    assert float(torch.cat(dev_a).std()) == pytest.approx(s_a * 2 * bound, rel=0.03)
    assert float(torch.cat(dev_b).std()) == pytest.approx(s_b * 2 * bound, rel=0.03)
    # rho = 0.3: about 0.70x isotropic noise on the selected group and 1.33x on the rest (the spec's figures)
    assert s_a / sigma == pytest.approx(0.70, abs=0.02) and s_b / sigma == pytest.approx(1.33, abs=0.02)


@pytest.mark.parametrize("d,k", [(128, 39), (64, 1), (10, 9), (2, 1), (512, 154)])
def test_vpp_is_exactly_as_private_as_isotropic(d, k):
    sigma, delta_s = 3.7, 0.25
    kappa_a, kappa_b, s_a, s_b = vpp_group_noise(d, k, sigma)
    assert kappa_a**2 + kappa_b**2 == pytest.approx(1.0)
    # (kA·D)^2/sA^2 + (kB·D)^2/sB^2 = 1/s^2 with group noise stds sA = s_a·D, sB = s_b·D
    lhs = (kappa_a * delta_s) ** 2 / (s_a * delta_s) ** 2 + (kappa_b * delta_s) ** 2 / (s_b * delta_s) ** 2
    assert lhs == pytest.approx(1 / sigma**2, rel=1e-12)


def test_laplace_noise_scale():
    x = laplace_noise((200_000,), 0.7, _gen())
    assert float(x.std()) == pytest.approx(math.sqrt(2) * 0.7, rel=0.02)
    assert float(x.abs().mean()) == pytest.approx(0.7, rel=0.02)


def test_laplace_of_uniform_is_the_inverse_cdf_for_every_shape():
    from protofl.privacy.mechanisms import _laplace_of_uniform

    u = np.array([1e-12, 0.2, 0.5, 0.7, 1 - 1e-12])
    want = -0.7 * np.sign(u - 0.5) * np.log1p(-2 * np.abs(u - 0.5))
    np.testing.assert_allclose(_laplace_of_uniform(u, 0.7), want, rtol=1e-12)
    assert _laplace_of_uniform(u.reshape(5, 1), 0.7).shape == (5, 1)
    assert _laplace_of_uniform(np.float64(0.7), 0.7) == pytest.approx(want[3])  # a 0-d draw, in place too
    assert np.isfinite(_laplace_of_uniform(np.array([0.0]), 0.7)).all()  # the edge of [0, 1) stays finite


# -- accounting ------------------------------------------------------------------------------------


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std ratio ``mu`` (Balle & Wang 2018)."""
    from scipy.optimize import brentq

    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(delta_of, 0, 100)


@pytest.mark.parametrize("sigma,releases", [(2.0, 20), (10.0, 5), (1.0, 1)])
def test_pld_epsilon_of_gaussian_releases_equals_the_analytic_gaussian(sigma, releases):
    # T Gaussian releases at multiplier sigma are one Gaussian mechanism at sigma / sqrt(T).
    eps = make_accountant("pld").compose(GaussianEvent(sigma), releases).epsilon(1e-5)
    exact = _analytic_gaussian_epsilon(math.sqrt(releases) / sigma, 1e-5)
    assert exact <= eps <= exact * 1.01 + 1e-3  # pessimistic discretisation: never below the truth


def test_accountants_equal_independent_dp_accounting_computations():
    import dp_accounting
    from dp_accounting import rdp
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld

    events = [(PureDpEvent(0.02), 20), (GaussianEvent(3.0), 20), (LaplaceEvent(5.0), 2)]
    expected_rdp = rdp.RdpAccountant()
    expected_rdp.compose(dp_accounting.ZCDpEvent(0.02**2 / 2), 20)  # eps-DP => eps^2/2-zCDP
    expected_rdp.compose(dp_accounting.GaussianDpEvent(3.0), 20)
    expected_rdp.compose(dp_accounting.LaplaceDpEvent(5.0), 2)
    assert make_accountant("rdp").compose(events).epsilon(1e-5) == pytest.approx(
        expected_rdp.get_epsilon(1e-5), rel=1e-9
    )

    composed = (
        pld.from_privacy_parameters(common.DifferentialPrivacyParameters(0.02, 0.0))
        .self_compose(20)
        .compose(pld.from_gaussian_mechanism(3.0).self_compose(20))
        .compose(pld.from_laplace_mechanism(5.0).self_compose(2))
    )
    assert make_accountant("pld").compose(events).epsilon(1e-5) == pytest.approx(
        composed.get_epsilon_for_delta(1e-5), rel=1e-9
    )
    # basic composition bounds the pure part: 20 x 0.02 alone costs at most 0.4
    assert make_accountant("pld").compose(PureDpEvent(0.02), 20).epsilon(1e-5) <= 0.4 + 1e-6


def test_sampled_gaussian_steps_equal_independent_dp_accounting_and_calibrate_from_below():
    import dp_accounting
    from dp_accounting import rdp
    from dp_accounting.pld import privacy_loss_distribution as pld

    expected = rdp.RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 300)
    ours = make_accountant("rdp").compose(SampledGaussianEvent(0.02, 1.1), 300).epsilon(1e-4)
    assert ours == pytest.approx(expected.get_epsilon(1e-4), rel=1e-9)
    composed = pld.from_gaussian_mechanism(1.1, sampling_prob=0.02).self_compose(300)
    assert make_accountant("pld").compose(SampledGaussianEvent(0.02, 1.1), 300).epsilon(1e-4) == pytest.approx(
        composed.get_epsilon_for_delta(1e-4), rel=1e-9
    )
    sigma = calibrate_noise_multiplier(1.0, 1e-4, 300, "rdp", sampling_rate=0.02)
    assert 0.998 <= make_accountant("rdp").compose(SampledGaussianEvent(0.02, sigma), 300).epsilon(1e-4) <= 1.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_calibration_hits_the_target_from_below(accountant, epsilon):
    extra = [(PureDpEvent(0.1 * epsilon / 20), 20)]
    sigma = calibrate_noise_multiplier(epsilon, 1e-5, 20, accountant, extra)
    spent = make_accountant(accountant).compose([(GaussianEvent(sigma), 20), *extra]).epsilon(1e-5)
    assert spent <= epsilon
    assert spent >= epsilon * (1 - 2e-3)  # tight: little budget left unspent
    slightly_less_noise = make_accountant(accountant).compose([(GaussianEvent(sigma * 0.99), 20), *extra]).epsilon(1e-5)
    assert slightly_less_noise > epsilon


def test_reference_sigma_figures_of_the_spec_are_looser_than_the_accountants():
    # The VPDR reference calibrates by min_a [T a/(2 s^2) + ln(1/d)/(a-1)] = eps; its figure for IGPP at
    # eps=1, T=20, d=1e-5 is s = 21.9. A real accountant needs less noise for the same guarantee.
    def classic(sigma):
        return min(20 * a / (2 * sigma**2) + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 500, 50_000))

    assert classic(21.9) == pytest.approx(1.0, abs=0.01)
    assert calibrate_noise_multiplier(1.0, 1e-5, 20, "rdp") < 21.9
    assert calibrate_noise_multiplier(1.0, 1e-5, 20, "pld") < calibrate_noise_multiplier(1.0, 1e-5, 20, "rdp")


def test_ledger_refuses_the_release_that_would_exceed_and_records_nothing():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 3, "rdp")
    ledger = PrivacyLedger("rdp", 1e-5, budget=2.0)
    for _ in range(3):
        ledger.spend([(GaussianEvent(sigma), 1)])
    assert ledger.epsilon() <= 2.0
    before = ledger.state_dict()
    with pytest.raises(BudgetExceededError, match="budget 2"):
        ledger.spend([(GaussianEvent(sigma), 1)], "client 7")
    assert ledger.state_dict() == before
    restored = PrivacyLedger("rdp", 1e-5, budget=2.0)
    restored.load_state_dict(before)
    assert restored.epsilon() == ledger.epsilon()


def _decision(ledger: PrivacyLedger, events) -> bool:
    try:
        ledger.check(events)
    except BudgetExceededError:
        return False
    return True


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_planned_budget_check_decides_as_the_exact_computation_and_runs_no_accountant(accountant, mechanism):
    from protofl.privacy import accounting, create_privacy_layer

    planned = 4
    mech = create_privacy_layer(
        PrivacyConfig(mechanism=mechanism, epsilon=2.0, accountant=accountant, planned_releases=planned), 3
    )
    events = mech.release_events()
    state: dict = {}
    for release in range(1, planned + 2):
        fast = mech.ledger(state)
        exact = PrivacyLedger(accountant, fast.delta, fast.budget, list(fast.events))  # no plan: always computed
        assert fast.within_plan(events) == (release <= planned)
        if release <= planned:
            mech.ledger(state).check(events)  # the plan's epsilon is memoised now
            misses = accounting._cached_epsilon.cache_info().misses
            assert _decision(fast, events)
            assert accounting._cached_epsilon.cache_info().misses == misses  # no accountant ran for this count
        assert _decision(fast, events) == _decision(exact, events) == (release <= planned)
        if release <= planned:
            ledger = mech.ledger(state)
            ledger.spend(events)
            state = {LEDGER_KEY: ledger.state_dict()}
    # The first release past the plan is refused by the exact computation, and nothing is recorded.
    ledger = mech.ledger(state)
    with pytest.raises(BudgetExceededError, match="budget 2"):
        ledger.spend(events, "client 3")
    assert ledger.state_dict() == state[LEDGER_KEY]
    assert ledger.epsilon() <= 2.0 * (1 + 1e-9)  # the reported figure is computed, and within the budget


def test_a_plan_outside_the_budget_or_events_outside_the_plan_take_the_exact_computation():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 3, "rdp")
    # A plan of 10 releases does not fit the budget: it must not vouch for the 4th release.
    ledger = PrivacyLedger("rdp", 1e-5, budget=2.0, plan=[(GaussianEvent(sigma), 10)])
    for _ in range(3):
        assert ledger.within_plan([(GaussianEvent(sigma), 1)]) is False
        ledger.spend([(GaussianEvent(sigma), 1)])
    with pytest.raises(BudgetExceededError):
        ledger.spend([(GaussianEvent(sigma), 1)])
    # An event the plan does not hold (a smaller sigma) is computed, and refused when it exceeds.
    ledger = PrivacyLedger("rdp", 1e-5, budget=2.0, plan=[(GaussianEvent(sigma), 3)])
    assert ledger.within_plan([(GaussianEvent(sigma), 3)])
    assert not ledger.within_plan([(GaussianEvent(sigma / 2), 1)])
    with pytest.raises(BudgetExceededError):
        ledger.spend([(GaussianEvent(sigma / 2), 1)])
    assert ledger.events == []


# -- clipping and selection ------------------------------------------------------------------------


def test_clipping_bounds_hold_for_every_example():
    z = torch.randn(500, 32, generator=_gen()) * torch.logspace(-3, 3, 500)[:, None]
    assert bool((clip_rows(z, 5.0).norm(dim=1) <= 5.0 * (1 + 1e-6)).all())
    inside = z.norm(dim=1) <= 5.0
    assert torch.equal(clip_rows(z, 5.0)[inside], z[inside])
    a, b = torch.arange(10), torch.arange(10, 32)
    c = clip_groups(z, [a, b], [2.0, 3.0])
    assert bool((c[:, a].norm(dim=1) <= 2.0 * (1 + 1e-6)).all()) and bool(
        (c[:, b].norm(dim=1) <= 3.0 * (1 + 1e-6)).all()
    )
    assert bool((soft_clip(z, 5.0, 0.05).norm(dim=1) < 5.0).all())


def test_anova_scores_agree_with_scikit_learn():
    from sklearn.feature_selection import f_classif

    z, y = _features(n_per_class=(50, 30, 20), d=12)
    ours = anova_scores(z, y).numpy()
    f, _ = f_classif(z.numpy(), y.numpy())
    np.testing.assert_allclose(ours, f, rtol=1e-2)  # ours adds zeta = 1e-3 * median(between) to the denominator


def _top_k_one_round_at_a_time(scores, k, cap, epsilon, generator):
    """private_top_k as first written: one fresh Laplace draw of d per peeling round."""
    clipped, scale = scores.double().clamp(0, cap), 2 * k * cap / epsilon
    available, chosen = torch.ones(len(scores), dtype=torch.bool), []
    for _ in range(k):
        j = int((clipped + laplace_noise((len(scores),), scale, generator)).masked_fill(~available, -math.inf).argmax())
        chosen.append(j)
        available[j] = False
    return sorted(chosen)


def test_private_top_k_draws_as_one_round_at_a_time():
    for seed in range(20):
        scores = torch.rand(40, generator=_gen(100 + seed)) * 0.2
        for k, epsilon in ((1, 1.0), (7, 0.5), (39, 100.0)):
            assert private_top_k(scores, k, 0.1, epsilon, _gen(seed)).tolist() == _top_k_one_round_at_a_time(
                scores, k, 0.1, epsilon, _gen(seed)
            )


@pytest.mark.parametrize("sensitivity", ["fixed-features", "trained-features"])
def test_releases_equal_their_steps_composed_from_the_public_pieces(sensitivity):
    """Under replace-one, VPP and IGPP run as one numpy program per client; the same steps through anova_scores,
    private_top_k, clip_groups / clip_rows, per-class means and gaussian_noise on the same generator
    give the same release."""
    z, y = _features(n_per_class=(40, 1, 7, 0, 12), d=24, seed=5)
    z = z * 3
    bound, sigma, rho, cap, eps = 2.0, 1.3, 0.3, 0.1, 0.5
    for seed in range(5):
        got = vpp_release(z, y, 5, bound, sigma, rho, cap, eps, _gen(seed), sensitivity, "replace-one")
        g = _gen(seed)
        k = math.ceil(rho * 24)
        selected = private_top_k(anova_scores(z, y), k, cap, eps, g)
        rest = torch.tensor([j for j in range(24) if j not in set(selected.tolist())])
        kappa_a, kappa_b, s_a, s_b = vpp_group_noise(24, k, sigma)
        clipped = clip_groups(z.double(), [selected, rest], [bound * kappa_a, bound * kappa_b])
        classes = torch.tensor([0, 1, 2, 4])
        counts = torch.tensor([40, 1, 7, 12])
        means = torch.stack([clipped[y == c].mean(0) for c in classes.tolist()])
        per_coordinate = torch.full((24,), s_b, dtype=torch.float64)
        per_coordinate[selected] = s_a
        delta = (
            2 * bound / counts.double()
            if sensitivity == "fixed-features"
            else torch.full((4,), 2 * bound * 2.0, dtype=torch.float64)
        )
        std = delta[:, None] * per_coordinate[None, :]
        want = (means + torch.randn(means.shape, generator=g, dtype=torch.float64) * std).float()
        assert torch.equal(got.selected, selected) and torch.equal(got.classes, classes)
        assert torch.equal(got.counts, counts)
        torch.testing.assert_close(got.noise_std, std)
        torch.testing.assert_close(got.prototypes, want, rtol=1e-5, atol=1e-5)

        got = igpp_release(z, y, 5, bound, sigma, _gen(seed), sensitivity, "replace-one")
        clipped = clip_rows(z.double(), bound)
        means = torch.stack([clipped[y == c].mean(0) for c in classes.tolist()])
        std = (sigma * delta)[:, None].expand(-1, 24)
        want = (means + torch.randn(means.shape, generator=_gen(seed), dtype=torch.float64) * std).float()
        assert torch.equal(got.classes, classes) and torch.equal(got.counts, counts)
        torch.testing.assert_close(got.noise_std, std)
        torch.testing.assert_close(got.prototypes, want, rtol=1e-5, atol=1e-5)


def test_private_top_k_follows_the_scores_at_large_epsilon_and_not_at_tiny_epsilon():
    scores = torch.linspace(0, 0.2, 50)
    top = private_top_k(scores, 5, 0.1, 1e6, _gen())
    assert set(top.tolist()) <= set(range(25, 50))  # everything above the cap ties at 0.1
    hits = sum(len(set(private_top_k(scores, 5, 0.1, 1e-3, _gen(s)).tolist()) & set(range(25, 50))) for s in range(200))
    assert hits / (200 * 5) == pytest.approx(0.5, abs=0.08)  # pure noise: half land in the top half


# -- runs: budget stop, resume, payload, config errors ----------------------------------------------


def _config(rounds=3, planned=0, mechanism="igpp", **privacy):
    return {
        "seed": 0,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
        "federation": {"rounds": rounds, "progress": False, "checkpoint_every": 1},
        "model": {"feature_dim": 16},
        "privacy": {"mechanism": mechanism, "epsilon": 2.0, "planned_releases": planned, **privacy},
        "method": {"name": "fedproto", "local_epochs": 1, "lr": 0.05},
    }


def test_budget_stop_triggers_before_the_release_that_would_exceed_and_resume_keeps_the_spend(tmp_path):
    from protofl.engine.checkpoint import load_checkpoint

    with pytest.raises(BudgetExceededError, match="client 0: the next release would bring epsilon"):
        protofl.run(_config(rounds=3, planned=2), out=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert state["round"] == 2
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 2, "pld")
    for k in range(3):
        ledger = PrivacyLedger("pld", 1e-5, 2.0)
        ledger.load_state_dict(state["client_states"][k][LEDGER_KEY])
        assert ledger.events == [(GaussianEvent(sigma), 2)]
        assert 2.0 * (1 - 2e-3) <= ledger.epsilon() <= 2.0
    with pytest.raises(BudgetExceededError):  # resuming does not reset what was spent
        protofl.run(None, out=tmp_path / "run", resume=True)


def test_resumed_run_reports_the_same_epsilon_as_an_uninterrupted_one(tmp_path):
    whole = protofl.run(_config(rounds=3, mechanism="vpp", dcr=True))
    with pytest.raises(protofl.RunInterrupted):
        protofl.run(_config(rounds=3, mechanism="vpp", dcr=True), out=tmp_path / "r", stop_after=1)
    resumed = protofl.run(None, out=tmp_path / "r", resume=True)
    assert resumed.summary["privacy"] == whole.summary["privacy"]
    assert resumed.summary["final"] == whole.summary["final"]
    p = whole.summary["privacy"]
    assert p["max_releases_by_a_client"] == 3 and p["epsilon"] <= 2.0 and whole.summary["epsilon"] == p["epsilon"]
    assert p["epsilon_rdp_max"] >= p["epsilon_pld_max"]  # RDP's conversion is the looser one
    assert [row["privacy_epsilon_max"] for row in whole.history] == sorted(
        row["privacy_epsilon_max"] for row in whole.history
    )


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_clean_prototypes_never_reach_the_payload(mechanism):
    from protofl.algorithms import ClientData, Task, get_algorithm
    from protofl.config import ModelConfig

    torch.manual_seed(0)
    x = torch.randn(60, 20)
    y = torch.arange(60) % 3
    data = ClientData(0, x, y, x[:6], y[:6])
    task = Task((20,), 3, ModelConfig(feature_dim=8, hidden_dim=16))
    privacy = PrivacyConfig(mechanism=mechanism, epsilon=1.0, planned_releases=5)
    algo = get_algorithm("fedproto").from_options({"lr": 0.01}, task, privacy)
    received = algo.broadcast(algo.init_server_state(0))
    state, reply, _ = algo.client_step(algo.init_client_state(0), data, received, _gen())
    _, clean, _ = algo.local_prototypes(state["params"], data)
    wire = reply.to_bytes()
    assert clean.numpy().astype(np.float32).tobytes() not in wire
    for row in clean.numpy().astype(np.float32):
        assert row.tobytes() not in wire
        assert row[:4].tobytes() not in wire
    assert not np.allclose(reply["prototypes"], clean.numpy(), atol=1e-3)
    assert len(state[LEDGER_KEY]) == (2 if mechanism == "vpp" else 1)


@pytest.mark.parametrize(
    "key,value",
    [
        ("epsilon", 0.0),
        ("epsilon", -1.0),
        ("delta", 0.0),
        ("delta", 1.0),
        ("clip_bound", 0.0),
        ("rho", 0.0),
        ("rho", 1.5),
    ],
)
def test_bad_privacy_values_fail_at_config_time_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"privacy\.{key}"):
        RunConfig.from_dict({"privacy": {"mechanism": "vpp", key: value}, "method": {"name": "fedproto"}})


def test_a_method_without_prototypes_is_refused_with_the_valid_hosts():
    from protofl.api import resolve_config

    with pytest.raises(ConfigError, match="methods that do: fedgh, fedproto, fedtgp, fpl"):
        resolve_config({"privacy": {"mechanism": "igpp"}, "method": {"name": "fedavg"}})
    with pytest.raises(ConfigError, match="methods that do: dpfedavg, fedhypevae"):
        resolve_config({"privacy": {"mechanism": "dp-sgd"}, "method": {"name": "fedproto"}})
    with pytest.raises(ConfigError, match="set privacy.mechanism = 'dp-sgd'"):
        resolve_config({"method": {"name": "dpfedavg"}})
    with pytest.raises(ConfigError, match="privacy.accountant: 'moments' is not one of pld, rdp"):
        resolve_config({"privacy": {"mechanism": "igpp", "accountant": "moments"}, "method": {"name": "fedproto"}})
    with pytest.raises(ConfigError, match="privacy.dcr"):
        resolve_config({"privacy": {"dcr": True}, "method": {"name": "fedavg"}})
    with pytest.raises(ConfigError, match="model_sharing"):
        resolve_config({"privacy": {"mechanism": "igpp"}, "method": {"name": "fpl"}})
    resolve_config({"privacy": {"mechanism": "igpp"}, "method": {"name": "fpl", "model_sharing": "none"}})


# -- DCR -------------------------------------------------------------------------------------------------


def test_dcr_loss_equals_a_hand_computation():
    torch.manual_seed(1)
    config = PrivacyConfig(
        dcr=True,
        clip_bound=1.0,
        soft_clip_tau=0.1,
        kd_weight=0.5,
        kd_temperature=2.0,
        ema_momentum=0.9,
        kd_warmup_steps=1,
    )
    w, b = torch.randn(3, 4), torch.randn(3)
    params = {"head.weight": w, "head.bias": b}
    z = torch.randn(5, 4) * 3
    y = torch.tensor([0, 1, 2, 0, 1])

    def features(p, x):
        return x

    def head(p, v):
        return v @ p["head.weight"].t() + p["head.bias"]

    dcr = DistillationClipping(config)
    host = lambda v, labels: v.pow(2).mean()
    first = dcr.loss(params, z, y, features, head, host)  # warm-up step: no KD
    sc = z * torch.clamp(1.0 / (z.norm(dim=1, keepdim=True) + 0.1), max=1.0)
    student = sc @ w.t() + b
    assert float(first) == pytest.approx(
        float(torch.nn.functional.cross_entropy(student, y) + sc.pow(2).mean()), rel=1e-6
    )
    assert dcr.teacher is None and dcr.steps == 1

    params2 = {"head.weight": w + 1.0, "head.bias": b}
    second = dcr.loss(params2, z, y, features, head, host)  # KD on: the teacher starts as the current head
    student2 = sc @ (w + 1).t() + b
    teacher = z @ (w + 1).t() + b  # on unclipped features
    p_t = torch.softmax(teacher / 2, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student2 / 2, 1))).sum(1).mean()
    expected = torch.nn.functional.cross_entropy(student2, y) + sc.pow(2).mean() + 0.5 * 4 * kl
    assert float(second) == pytest.approx(float(expected), rel=1e-5)
    dcr.loss({"head.weight": w + 2.0, "head.bias": b}, z, y, features, head, host)
    assert torch.allclose(dcr.teacher["head.weight"], 0.9 * (w + 1) + 0.1 * (w + 2))


def test_the_secondary_pld_figure_is_skipped_where_it_would_take_gigabytes():
    from protofl.privacy.accounting import spend_report

    ledger = PrivacyLedger("rdp", 1e-5, 1e9)
    ledger.events = [(SampledGaussianEvent(0.05, 0.1), 100)]  # sigma 0.1: a PLD of ~1e8 points per event
    report = spend_report(
        [ledger],
        accountant="rdp",
        delta=1e-5,
        budget=1e9,
        mechanism="dp-sgd",
        noise_multiplier=0.1,
        planned_releases=100,
    )
    assert report["epsilon_pld_max"] is None and report["epsilon"] == report["epsilon_rdp_max"] > 0


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_a_non_finite_feature_row_is_released_as_a_zero_row(mechanism):
    """One example driven to overflow must not make the release NaN (the server's rejection of a NaN reply
    would reveal it outside ε): its row counts as a zero feature, inside the R-ball."""
    from protofl.privacy.layer import create_privacy_layer

    config = PrivacyConfig(mechanism=mechanism, epsilon=4.0, planned_releases=1)
    layer = create_privacy_layer(config, 3)
    z = torch.randn(30, 8)
    y = torch.arange(30) % 3
    broken = z.clone()
    broken[4] = float("nan")
    broken[7, 2] = float("inf")
    zeroed = z.clone()
    zeroed[[4, 7]] = 0.0
    got = layer.noisy_prototypes(broken, y, torch.Generator().manual_seed(1))
    want = layer.noisy_prototypes(zeroed, y, torch.Generator().manual_seed(1))
    assert torch.isfinite(got.prototypes).all()
    assert torch.equal(got.prototypes, want.prototypes)
