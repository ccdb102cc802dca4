"""What VPP's group noise buys over IGPP depends on where the features' norm lies, not only on where the
class signal lies: groupwise clipping scales group A to R·κ_A with κ_A² = ρ (a share of dimensions), so
when the selected dimensions hold more than ρ of the features' squared norm they are clipped harder than
under IGPP and the lower noise on A is spent on that. Per coordinate of A, VPP's signal-to-noise is
sqrt(w_A / ρ) times IGPP's when the norm is spread evenly (share g = ρ) and sqrt(w_A) times (below 1)
when all of it lies in A (g = 1), w_A = κ_B / (κ_A + κ_B) (the benchmarks' "VPP's selection under a
valid bound" explanation)."""

from __future__ import annotations

import math

import pytest
import torch

from protofl.privacy.mechanisms import igpp_release, vpp_group_noise, vpp_release

D, K, R, N = 20, 6, 1.0, 400  # rho = K / D = 0.3
SELECTED = torch.arange(K)


def _features(norm_in_a: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart only on the first K coordinates (+1 / -1); the other coordinates are 0
    (all the norm in A) or random signs that carry no class (norm spread evenly: g = K / D)."""
    y = torch.arange(N) % 2
    z = torch.zeros(N, D)
    z[:, :K] = (1 - 2 * y.float())[:, None]
    if not norm_in_a:
        g = torch.Generator().manual_seed(0)
        z[:, K:] = torch.randint(0, 2, (N, D - K), generator=g).float() * 2 - 1
    return z, y


def _snr_on_a(release_fn, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per coordinate of A: the clean gap between the two class means after the release's clipping,
    over the release's noise standard deviation (at σ = 1)."""
    clean = release_fn(z, y, 1e-12).statistic  # σ ~ 0: the clipped class means
    noisy = release_fn(z, y, 1.0)
    gap = (clean[0] - clean[1])[:K].abs()
    return gap / noisy.noise_std[0, :K]


def _igpp(z, y, sigma):
    return igpp_release(z, y, 2, R, sigma, torch.Generator().manual_seed(1))


def _vpp(z, y, sigma):
    return vpp_release(z, y, 2, R, sigma, K / D, 0.1, None, torch.Generator().manual_seed(1), selected=SELECTED)


@pytest.mark.parametrize(("norm_in_a", "expected"), [(False, "spread"), (True, "concentrated")])
def test_vpp_gain_over_igpp_follows_the_norm_share_of_the_selected_group(norm_in_a, expected):
    z, y = _features(norm_in_a)
    assert bool((z.norm(dim=1) > R).all())  # clipping is active under both mechanisms
    kappa_a, kappa_b, _, _ = vpp_group_noise(D, K, 1.0)
    w_a = kappa_b / (kappa_a + kappa_b)
    ratio = _snr_on_a(_vpp, z, y) / _snr_on_a(_igpp, z, y)
    predicted = math.sqrt(w_a / (K / D)) if expected == "spread" else math.sqrt(w_a)
    assert torch.allclose(ratio, torch.full_like(ratio, predicted), rtol=1e-4)
    # the selection is perfect (f = 1) in both cases; only the norm share decides the sign of the gain
    assert (predicted > 1) == (expected == "spread")
