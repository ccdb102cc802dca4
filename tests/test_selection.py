"""VPP's selection of discriminative dimensions: the paper's private ANOVA top-k (which, at the default
score cap, selects at random) and the top-k by the between-class variance of the received global
prototypes (post-processing of the broadcast: no ε, and it selects); its accounting, its diagnostics
and a run with each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import protofl
from protofl.config import VPP_SELECTIONS, ConfigError, PrivacyConfig
from protofl.privacy import IGPPLayer, VPPLayer, create_accountant
from protofl.privacy.accounting import GaussianEvent, PureDpEvent
from protofl.privacy.mechanisms import (
    SELECTIONS,
    anova_scores,
    broadcast_top_k,
    igpp_release,
    selection_diagnostics,
    vpp_release,
)

D, C, RHO = 20, 4, 0.3
K = math.ceil(RHO * D)  # 6


def _separable(seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features whose first K dimensions carry the class (with decreasing strength) and the rest is
    noise, their labels, and the exact class centres (what a good broadcast approximates)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(C, D)
    centres[:, :K] = torch.randn(C, K, generator=g) * torch.linspace(3.0, 1.5, K)
    y = torch.arange(n) % C
    z = centres[y] + 0.5 * torch.randn(n, D, generator=g)
    return z, y, centres


def _true_top_k(z: torch.Tensor, y: torch.Tensor) -> set[int]:
    return set(torch.argsort(anova_scores(z, y), descending=True)[:K].tolist())


def test_the_config_names_every_selection_rule_and_only_those():
    assert set(VPP_SELECTIONS) == set(SELECTIONS)
    assert SELECTIONS["private-anova"].private and not SELECTIONS["broadcast-variance"].private


def test_an_unknown_selection_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="selection.*'top-k' is not one of broadcast-variance, private-anova"):
        PrivacyConfig(mechanism="vpp", selection="top-k")


def test_broadcast_top_k_ranks_by_between_class_variance_and_needs_two_rows():
    table = np.array([[0.0, 1.0, 5.0, 0.0], [0.0, -1.0, -5.0, 0.1]])
    assert broadcast_top_k(table, 2).tolist() == [1, 2]  # variances 0, 1, 25, 0.0025
    assert broadcast_top_k(table, 1).tolist() == [2]
    assert broadcast_top_k(table[:1], 2) is None  # one class: nothing to rank
    assert broadcast_top_k(np.zeros((0, 4)), 2) is None
    with pytest.raises(ValueError, match="k must be in"):
        broadcast_top_k(table, 5)


def test_broadcast_variance_selects_the_discriminative_dimensions_private_anova_selects_at_random():
    """On separable data the selection from (noisy) global prototypes finds the true top-k, while the
    paper's private selection at its default cap (s_max = 0.1) does no better than chance (ρ): every
    real F score is far above the cap, so the capped scores are all equal."""
    overlap_broadcast, overlap_private = [], []
    for seed in range(40):
        z, y, centres = _separable(seed)
        truth = _true_top_k(z, y)
        assert anova_scores(z, y).median() > 0.1  # the defect's cause: real scores exceed s_max
        g = torch.Generator().manual_seed(1000 + seed)
        received = centres + 0.2 * torch.randn(C, D, generator=g)  # a noisy broadcast of the centres
        overlap_broadcast.append(len(truth & set(broadcast_top_k(received, K).tolist())) / K)
        private = vpp_release(z, y, C, 5.0, 1.0, RHO, 0.1, 0.1, g)
        overlap_private.append(len(truth & set(private.selected.tolist())) / K)
    assert np.mean(overlap_broadcast) > 0.9
    assert 0.2 < np.mean(overlap_private) < 0.4  # chance is K/D = 0.3


def test_private_anova_does_select_when_its_noise_does_not_drown_the_scores():
    """The defect is the noise scale (2k·s_max/ε against a capped range), not the peeling: with a cap
    above the scores and a huge selection budget the same code finds the true top-k."""
    z, y, _ = _separable(0)
    cap = float(anova_scores(z, y).max()) * 2
    release = vpp_release(z, y, C, 5.0, 1.0, RHO, cap, 1e7, torch.Generator().manual_seed(0))
    assert set(release.selected.tolist()) == _true_top_k(z, y)


def test_selection_diagnostics_measure_energy_share_and_overlap_on_the_clean_data():
    # The classes differ in dimension 0 only (by 2) and a little in dimension 1 (by 1): energies 4 : 1.
    y = torch.tensor([0, 0, 1, 1])
    z = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.0, -0.3], [2.0, 1.0, 0.3], [2.0, 1.0, -0.3]])
    assert selection_diagnostics(z, y, torch.tensor([0])) == {"vpp_selected_energy": 0.8, "vpp_overlap": 1.0}
    assert selection_diagnostics(z, y, torch.tensor([1])) == {
        "vpp_selected_energy": pytest.approx(0.2),
        "vpp_overlap": 0.0,
    }
    assert selection_diagnostics(z, y, torch.tensor([2])) == {"vpp_selected_energy": 0.0, "vpp_overlap": 0.0}
    one_class = selection_diagnostics(z, torch.zeros(4, dtype=torch.int64), torch.tensor([0]))
    assert all(math.isnan(v) for v in one_class.values())


def _layer(selection: str, epsilon: float = 4.0, mechanism: str = "vpp"):
    config = PrivacyConfig(
        mechanism=mechanism, epsilon=epsilon, accountant="rdp", planned_releases=5, selection=selection
    )
    return (VPPLayer if mechanism == "vpp" else IGPPLayer)(config, C)


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_broadcast_variance_spends_no_selection_and_calibrates_sigma_as_igpp(epsilon):
    layer = _layer("broadcast-variance", epsilon)
    sigma = layer.noise_multiplier
    assert layer.release_events() == ((GaussianEvent(sigma), 1),)
    assert layer.selection_epsilon is None
    # Independently: 5 Gaussian releases at σ spend ε, and a little less noise would spend more.
    spent = create_accountant("rdp").compose(GaussianEvent(sigma), 5).epsilon(1e-5)
    assert spent == pytest.approx(epsilon, rel=1e-3)
    assert create_accountant("rdp").compose(GaussianEvent(0.98 * sigma), 5).epsilon(1e-5) > epsilon
    assert sigma == pytest.approx(_layer("broadcast-variance", epsilon, "igpp").noise_multiplier)
    # the paper's selection spends its share, so its σ is larger at the same ε
    private = _layer("private-anova", epsilon)
    assert isinstance(private.release_events()[0][0], PureDpEvent) and private.noise_multiplier > sigma
    z, y, centres = _separable(0)
    release, ledger = layer.release(z, y, torch.Generator().manual_seed(0), {}, "client 0", received=centres)
    assert ledger == [(GaussianEvent(sigma).to_dict(), 1)]
    assert release.events == ((GaussianEvent(sigma), 1),)
    assert release.selected.tolist() == broadcast_top_k(centres, K).tolist()
    assert layer.report([{"privacy_ledger": ledger}])["selection"] == "broadcast-variance"


@pytest.mark.parametrize("received", [None, torch.zeros(0, D), torch.ones(1, D)])
def test_without_two_global_prototypes_the_release_is_igpp_shaped(received):
    """No broadcast to select from: every dimension is in group A, and the release is IGPP's, draw for
    draw (same clipping, same noise)."""
    layer = _layer("broadcast-variance")
    z, y, _ = _separable(3)
    vpp = layer.noisy_prototypes(z, y, torch.Generator().manual_seed(7), received)
    igpp = igpp_release(z, y, C, 5.0, layer.noise_multiplier, torch.Generator().manual_seed(7))
    assert vpp.selected.tolist() == list(range(D))
    assert torch.allclose(vpp.prototypes, igpp.prototypes, atol=1e-5)
    assert torch.allclose(vpp.counts, igpp.counts)


def test_vpp_release_refuses_a_selection_that_is_not_distinct_dimensions():
    z, y, _ = _separable(0)
    for bad in ([0, 0, 1], [3, D], []):
        with pytest.raises(ValueError, match="selected must be distinct dimensions"):
            vpp_release(z, y, C, 5.0, 1.0, RHO, 0.1, None, torch.Generator(), selected=np.array(bad, dtype=np.int64))


SMALL = {
    "seed": 1,
    "data": {"dataset": "optdigits", "max_train_samples": 240},
    "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 3},
    "federation": {"rounds": 3, "progress": False},
    "model": {"feature_dim": 16},
    "method": {"name": "fedproto", "local_epochs": 2, "lr": 0.05},
}


@pytest.mark.parametrize("selection", ["private-anova", "broadcast-variance"])
def test_a_fedproto_vpp_run_with_each_selection_logs_its_diagnostics(selection):
    config = {**SMALL, "privacy": {"mechanism": "vpp", "epsilon": 4.0, "accountant": "rdp", "selection": selection}}
    result = protofl.run(config)
    privacy = result.summary["privacy"]
    assert result.summary["status"] == "completed" and privacy["relation"] == "add-remove"
    assert privacy["selection"] == selection
    assert (privacy["selection_epsilon_per_release"] is None) == (selection == "broadcast-variance")
    assert 0 < privacy["epsilon"] <= 4.0 * (1 + 1e-9)
    k_share = math.ceil(RHO * 16) / 16
    for row in result.history:
        assert 0 <= row["vpp_selected_energy"] <= 1 and 0 <= row["vpp_overlap"] <= 1
        # round 1 has no global prototypes: broadcast-variance releases IGPP-shaped (and says so)
        igpp_round = selection == "broadcast-variance" and row["round"] == 1
        assert row["vpp_selected_fraction"] == pytest.approx(1.0 if igpp_round else k_share)
        if igpp_round:
            assert row["vpp_selected_energy"] == 1.0 and row["vpp_overlap"] == 1.0
