"""DP-FedAvg: the per-client spend equals an independent dp-accounting computation, lands at or under
the target, and the run stops before a round that would exceed it."""

from __future__ import annotations

import pytest

import protofl
from protofl.privacy import BudgetExceededError


def _config(rounds=5, planned=0):
    return {"seed": 0, "data": {"dataset": "optdigits"},
            "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
            "federation": {"rounds": rounds, "progress": False},
            "model": {"feature_dim": 16},
            "method": {"name": "dpfedavg", "steps_per_round": 20, "batch_size": 64, "lr": 1.0, "momentum": 0.5,
                       "epsilon": 8.0, "planned_rounds": planned}}


def test_dpfedavg_spends_what_an_independent_accountant_says_and_learns():
    import dp_accounting
    from dp_accounting import rdp

    result = protofl.run(_config())
    p = result.summary["privacy"]
    assert 8.0 * 0.99 <= p["epsilon"] <= 8.0 and p["max_releases_by_a_client"] == 100
    # every client: 100 Poisson-subsampled Gaussian steps at its own rate and sigma
    from protofl.api import prepare_data, resolve_config

    data = prepare_data(resolve_config(_config()))
    from protofl.privacy import calibrate_noise_multiplier

    worst = 0.0
    for client in data.clients:
        rate = 64 / client.num_train
        sigma = calibrate_noise_multiplier(8.0, 1e-4, 100, "rdp", sampling_rate=rate)
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), 100)
        worst = max(worst, acc.get_epsilon(1e-4))
    assert p["epsilon_rdp_max"] == pytest.approx(worst, rel=1e-9)
    assert result.summary["final"]["global_acc"] > 0.4  # measured 0.67 (chance: 0.1)


def test_dpfedavg_stops_before_the_round_that_would_exceed(tmp_path):
    with pytest.raises(BudgetExceededError, match="next release would bring epsilon"):
        protofl.run(_config(rounds=3, planned=2), out=tmp_path / "r")
