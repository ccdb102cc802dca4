"""The DP class-conditional Gaussian baseline: the release's noise and ε against independent
computations, clipping, the budget stop, the estimates, bad input, and a short end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy import BudgetExceededError, GaussianEvent
from protofl.privacy.class_statistics import ClassStatisticsLayer


def _privacy(epsilon=1.0, releases=2, **extra):
    return PrivacyConfig(
        mechanism="class-statistics",
        epsilon=epsilon,
        delta=1e-4,
        accountant="rdp",
        planned_releases=releases,
        clip_bound=2.0,
        **extra,
    )


def test_noise_and_epsilon_equal_independent_computations_and_the_budget_stops_a_third_release():
    import dp_accounting
    from dp_accounting import rdp

    layer = ClassStatisticsLayer(_privacy(), num_classes=20)
    sigma = layer.noise_multiplier
    expected = rdp.RdpAccountant()
    expected.compose(dp_accounting.GaussianDpEvent(sigma), 2)
    assert expected.get_epsilon(1e-4) == pytest.approx(1.0, abs=0.01)  # two releases spend the budget
    # the parts' noise: count 0.1 of the precision, sums 0.45, moments 0.45, each at its own sensitivity
    assert layer.noise_stds(0.5) == pytest.approx(
        (sigma / math.sqrt(0.1), sigma / math.sqrt(0.45) * 2, sigma / math.sqrt(0.45) * 4)
    )
    # the parts' precisions (in units of their sensitivities) add up to one Gaussian release at sigma
    n, s, m = layer.noise_stds(0.5)
    assert 1 / (n / 1) ** 2 + 1 / (s / 2) ** 2 + 1 / (m / 4) ** 2 == pytest.approx(1 / sigma**2)

    x, y = torch.zeros(50, 20), torch.zeros(50, dtype=torch.long)  # clean statistics known: all zero but a count
    stats, ledger = layer.release(x, y, torch.Generator().manual_seed(0), {}, "client 7", 0.5)
    assert float(stats.sums.std()) == pytest.approx(s, rel=0.1)  # 400 draws
    upper = torch.triu_indices(20, 20)
    assert float(stats.moments[:, upper[0], upper[1]].std()) == pytest.approx(m, rel=0.05)  # 4,200 draws
    assert float((stats.counts - torch.eye(20)[0] * 50).std()) == pytest.approx(n, rel=0.35)  # 20 draws
    torch.testing.assert_close(stats.moments, stats.moments.transpose(1, 2))  # symmetric: one draw per entry
    state = {"privacy_ledger": ledger}
    _, ledger = layer.release(x, y, torch.Generator().manual_seed(1), state, "client 7", 0.5)
    assert layer.ledger({"privacy_ledger": ledger}).events == [(GaussianEvent(sigma), 2)]
    with pytest.raises(BudgetExceededError, match="client 7"):
        layer.release(x, y, torch.Generator().manual_seed(2), {"privacy_ledger": ledger}, "client 7", 0.5)


def test_every_example_is_clipped_to_the_bound_before_its_statistics_are_summed():
    layer = ClassStatisticsLayer(_privacy(epsilon=1000.0, releases=1), num_classes=2)  # noise negligible
    x = torch.tensor([[100.0, 0.0], [0.0, 1.0]])
    stats, _ = layer.release(x, torch.tensor([0, 1]), torch.Generator().manual_seed(0), {}, "client 0", 0.5)
    n, s, m = layer.noise_stds(0.5)  # within five standard deviations of the clipped statistics (unclipped: 100, 10^4)
    torch.testing.assert_close(stats.sums, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), atol=5 * s, rtol=0)
    torch.testing.assert_close(stats.moments[0], torch.tensor([[4.0, 0.0], [0.0, 0.0]]), atol=5 * m, rtol=0)
    torch.testing.assert_close(stats.counts, torch.tensor([1.0, 1.0]), atol=5 * n, rtol=0)
    assert 5 * m < 1 and 5 * s < 1


def test_replace_one_is_refused_with_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="privacy.relation"):
        ClassStatisticsLayer(_privacy(relation="replace-one"), num_classes=2)


def _algo(**options):
    return get_algorithm("dpgauss").from_options(
        {"public_dims": 3, **options}, Task((1280,), 2), _privacy(epsilon=1000.0, releases=1)
    )


@pytest.mark.parametrize("covariance", ["class", "pooled"])
def test_the_estimates_recover_the_classes_means_and_covariances(covariance):
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]])
    scales = torch.tensor(
        [[1.0, 0.5, 0.2], [1.0, 0.5, 0.2]] if covariance == "pooled" else [[1.0, 0.5, 0.2], [0.3, 1.0, 0.6]]
    )
    y = torch.arange(20000) % 2
    x = means[y] + torch.randn(20000, 3, generator=g) * scales[y]
    onehot = torch.nn.functional.one_hot(y, 2).float()
    state = {"counts": onehot.sum(0), "sums": onehot.T @ x, "moments": torch.einsum("nc,ni,nj->cij", onehot, x, x)}
    algo = _algo(covariance=covariance, min_eigenvalue=0.01)
    est_means, est_cov = algo.estimate(state)
    torch.testing.assert_close(est_means, means, atol=0.05, rtol=0)
    torch.testing.assert_close(est_cov, torch.diag_embed(scales**2), atol=0.05, rtol=0)
    xs, ys = algo.synthesise(est_means, est_cov, seed=1, per_class=5000)
    assert torch.bincount(ys).tolist() == [5000, 5000]
    torch.testing.assert_close(xs[ys == 1].mean(0), means[1], atol=0.05, rtol=0)


def test_the_eigenvalue_floor_turns_a_noisy_indefinite_estimate_into_a_covariance():
    algo = _algo(min_eigenvalue=0.1, covariance="class")
    state = {
        "counts": torch.tensor([10.0, 10.0]),
        "sums": torch.zeros(2, 3),
        "moments": torch.diag_embed(torch.tensor([[-50.0, 10.0, 1.0], [5.0, 5.0, 5.0]])),
    }
    _, cov = algo.estimate(state)
    values = torch.linalg.eigvalsh(cov.double())
    assert float(values.min()) >= 0.1 - 1e-6
    torch.testing.assert_close(torch.linalg.eigvalsh(cov[1].double()).float(), torch.full((3,), 0.5))  # left alone


def test_bad_input_is_refused_before_anything_is_released():
    algo = _algo()
    x = torch.zeros(8, 1280)
    x[2, 5] = float("nan")
    data = ClientData(4, x, torch.zeros(8, dtype=torch.long), x[:2], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="client 4: its embeddings contain NaN"):
        algo.client_step({}, data, algo.broadcast(algo.init_server_state(0)), torch.Generator())
    with pytest.raises(ConfigError, match="method.covariance"):
        _algo(covariance="full")
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        get_algorithm("dpgauss").from_options({}, Task((1280,), 2), PrivacyConfig(mechanism="dp-sgd"))


def test_short_run_on_real_embeddings_learns_within_its_budget(tmp_path):
    import protofl

    config = {
        "seed": 0,
        "data": {"dataset": "optdigits", "features": "efficientnet-lite0"},
        "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
        "federation": {"rounds": 1, "progress": False},
        "method": {"name": "dpgauss", "synthetic_per_class": 200, "classifier_epochs": 10},
        "privacy": {
            "mechanism": "class-statistics",
            "epsilon": 8.0,
            "delta": 1e-4,
            "accountant": "rdp",
            "clip_bound": 10.0,
        },
    }
    result = protofl.run(config, out=tmp_path / "run")
    p = result.summary["privacy"]
    # about 420 examples per client: at epsilon 1 the noisy class means are off by more than their spread
    assert 7.9 <= result.summary["epsilon"] <= 8.0
    assert p["public_space"]["source"] == "photos" and p["public_space"]["dims"] == 64
    assert result.summary["final"]["global_acc"] > 0.5  # ten classes: chance is 0.1
