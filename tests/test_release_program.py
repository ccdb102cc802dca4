"""The batched prototype release's program against written-out references: the peeling selection (k
rounds of report-noisy-max, each on its own row of Laplace noise), the within-class spread of the ANOVA
(two-pass, also on features far from the origin), each client's noise drawn from its own generator
(features first, then counts) and the release settings' validation."""

import math

import numpy as np
import pytest
import torch

from protofl.privacy import mechanisms as M


def stacked(k=4, n=30, d=12, classes=3, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (k, n), generator=g)
    z = torch.randn(k, n, d, generator=g) + offset + y[..., None].float() * torch.linspace(0, 2, d)
    return z, y


def reference_peel(scores, k, cap, epsilon, generator):
    """Report-noisy-max k times: round j adds row j of a (k, d) Laplace draw to the capped scores and takes
    the best dimension not taken yet (ties to the lower index)."""
    noise = M.laplace_noise((k, len(scores)), 2 * k * cap / epsilon, generator).numpy()
    capped = np.clip(scores, 0, cap)
    taken = []
    for j in range(k):
        order = sorted(range(len(scores)), key=lambda i: (-(capped[i] + noise[j, i]), i))
        taken.append(next(i for i in order if i not in taken))
    return sorted(taken)


def test_vpp_selection_is_the_peeling_written_out():
    z, y = stacked(k=5, d=16)
    settings = M.ReleaseSettings(3, 2.0, 1.0)
    # a cap far above the scores, so that the selection depends on them and on the noise
    releases = M.vpp_release_batch(
        z, y, None, settings, [torch.Generator().manual_seed(s) for s in range(5)], 0.25, 50.0, 40.0
    )
    for client, release in enumerate(releases):
        scores = M.anova_scores(z[client], y[client]).numpy()
        expected = reference_peel(scores, 4, 50.0, 40.0, torch.Generator().manual_seed(client))
        assert release.selected.tolist() == expected
    assert len({tuple(r.selected.tolist()) for r in releases}) > 1  # not one fixed answer


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_anova_spread_equals_the_two_pass_computation(offset):
    z, y = stacked(k=1, n=50, d=8, offset=offset)
    x, labels = z[0].double().numpy(), y[0].numpy()
    classes = np.unique(labels)
    grand = x.mean(0)
    between = sum((labels == c).sum() * (x[labels == c].mean(0) - grand) ** 2 for c in classes) / (len(classes) - 1)
    within = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum(0) for c in classes) / (len(x) - len(classes))
    zeta = 1e-3 * np.sort(between)[(len(between) - 1) // 2]
    np.testing.assert_allclose(M.anova_scores(z[0], y[0]).numpy(), between / (within + zeta), rtol=1e-6)


@pytest.mark.parametrize("relation", ["add-remove", "replace-one"])
def test_each_client_noise_comes_from_its_own_generator_features_first(relation):
    z, y = stacked(k=3)
    settings = M.ReleaseSettings(3, 1.5, 0.7, "fixed-features", relation, 0.2)
    noiseless = M.ReleaseSettings(3, 1.5, 1e-300, "fixed-features", relation, 0.2)
    gens = [torch.Generator().manual_seed(10 + s) for s in range(3)]
    got = M.igpp_release_batch(z, y, None, settings, gens)
    clean = M.igpp_release_batch(z, y, None, noiseless, [torch.Generator().manual_seed(0)] * 3)
    sigma_f, sigma_n = settings.multipliers
    for client, (release, base) in enumerate(zip(got, clean)):
        g = torch.Generator().manual_seed(10 + client)
        shape = tuple(release.statistic.shape)
        features = torch.randn(shape, generator=g, dtype=torch.float64) * release.noise_std
        torch.testing.assert_close(release.statistic - base.statistic, features, rtol=1e-9, atol=1e-9)
        if sigma_n is None:
            assert release.counts.tolist() == base.counts.tolist() and release.count_std == 0.0
        else:
            counts = torch.randn((3,), generator=g, dtype=torch.float64) * sigma_n
            torch.testing.assert_close(release.counts - base.counts, counts, rtol=1e-9, atol=1e-9)
            assert math.isclose(float(release.noise_std.max()), sigma_f * 1.5, rel_tol=1e-12)  # sums: Δ = R


def test_release_settings_refuse_what_no_rule_covers():
    with pytest.raises(ValueError, match="sensitivity rule 'exact'"):
        M.ReleaseSettings(3, 1.0, 1.0, "exact")
    with pytest.raises(ValueError, match="count_fraction"):
        M.ReleaseSettings(3, 1.0, 1.0, count_fraction=1.0)
    assert M.ReleaseSettings(3, 1.0, 1.0, relation="replace-one", count_fraction=1.0).multipliers == (1.0, None)


def test_vpp_groupwise_clipping_holds_for_a_row_dominated_by_its_other_group():
    """A row whose group-A part is huge and whose group-B part is just above its bound: group B is still
    clipped to R·κ_B. Reading group B's norm as the row's norm minus group A's loses it to rounding (here
    1e30 + 1 - 1e30 = 0 in float64), which would release group B unclipped: a sensitivity the noise does not
    cover."""
    d, bound = 4, 1.0
    z = torch.tensor([[[1e15, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float32)
    y = torch.tensor([[0, 1]])
    settings = M.ReleaseSettings(2, bound, 1e-300, "fixed-features", "add-remove", 0.2)
    (release,) = M.vpp_release_batch(
        z, y, None, settings, [torch.Generator().manual_seed(0)], 0.25, 1.0, None, torch.tensor([0])
    )
    _, kappa_b, _, _ = M.vpp_group_noise(d, 1, settings.multipliers[0])
    group_b = release.statistic[0, 1:].double()
    assert float(group_b.norm()) <= bound * kappa_b * (1 + 1e-9)
    assert float(group_b.norm()) > 0.5 * bound * kappa_b  # clipped, not dropped
