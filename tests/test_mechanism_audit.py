"""The prototype releases audited as black boxes in two worlds.

The real release (IGPP, VPP, through their layer objects, σ calibrated by the layer for one release at
ε) runs about a million times on each of two neighbouring feature sets that attain the claimed
sensitivity. The test is the likelihood ratio of the two clean releases under the stated noise (a
statistic that is N(0, 1) in the first world and N(Δ, 1) in the second when the mechanism is what it
claims, Δ ≤ 1/σ); over a small fixed set of thresholds (union-corrected), the Clopper–Pearson bound of
:func:`protofl.privacy.two_worlds_epsilon_lower` must stay at or below the claimed ε for the real code,
and must exceed it for a mutant whose noise is halved and for ``fixed-features`` sensitivity applied to a
pair that differs like a trained feature map (every class mean moves).

The noise is drawn in bulk through the mechanism's own noise function: :func:`gaussian_noise` is
wrapped to draw a leading batch dimension, so one call of the release gives a whole batch of
independent releases of the same clean prototypes (for VPP: under one private selection, drawn first
from the same generator; seeds whose selection differs between the worlds are left out, so the audit
is of the Gaussian part at a fixed selection, whose claim is the Gaussian event's ε).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protofl.config import PrivacyConfig
from protofl.privacy import GaussianEvent, IGPPLayer, VPPLayer, compute_epsilon, mechanisms, two_worlds_epsilon_lower

DELTA = 1e-5
EPSILON = 2.0
#: Decision thresholds of the standardised likelihood-ratio statistic ("second world" above), fixed
#: before any release is drawn; each is one test of the union correction.
THRESHOLDS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
CLIP = 5.0


class BulkNoise:
    """Stands in for :func:`mechanisms.gaussian_noise`: the real function with ``batch`` releases drawn at
    once (``batch = 0``: no noise, for the clean release), times ``scale`` (1: the real mechanism)."""

    def __init__(self, real):
        self.real = real
        self.batch = 0
        self.scale = 1.0

    def __call__(self, shape, std, generator):
        if self.batch == 0:
            return torch.zeros(shape, dtype=torch.float64)
        return self.real((self.batch, *shape), std, generator) * self.scale


@pytest.fixture
def bulk_noise(monkeypatch):
    noise = BulkNoise(mechanisms.gaussian_noise)
    monkeypatch.setattr(mechanisms, "gaussian_noise", noise)
    return noise


def layer_for(mechanism: str, sensitivity: str, num_classes: int, **extra):
    config = PrivacyConfig(
        mechanism=mechanism,
        epsilon=EPSILON,
        delta=DELTA,
        planned_releases=1,
        accountant="pld",
        clip_bound=CLIP,
        sensitivity=sensitivity,
        relation="replace-one",
        **extra,
    )
    return (IGPPLayer if mechanism == "igpp" else VPPLayer)(config, num_classes)


def statistics(layer, worlds, labels, noise: BulkNoise, seeds, batch: int):
    """The standardised likelihood-ratio statistic of every release in each world, and the largest
    Mahalanobis distance Δ between the two clean releases (in units of the stated noise)."""
    out: list[list[np.ndarray]] = [[], []]
    largest = 0.0
    for seed in seeds:
        noise.batch = 0
        clean = [layer.noisy_prototypes(z, labels, torch.Generator().manual_seed(seed)) for z in worlds]
        if clean[0].selected is not None and not torch.equal(clean[0].selected, clean[1].selected):
            continue  # a VPP selection that differs between the worlds: not this audit's conditional case
        mean0, mean1 = (c.prototypes.double().numpy() for c in clean)
        std = clean[0].noise_std.double().numpy()
        assert np.array_equal(std, clean[1].noise_std.double().numpy())
        weights = (mean1 - mean0) / std**2
        distance = float(np.sqrt(((mean1 - mean0) ** 2 / std**2).sum()))
        largest = max(largest, distance)
        noise.batch = batch
        for world, z in enumerate(worlds):
            release = layer.noisy_prototypes(z, labels, torch.Generator().manual_seed(seed))
            drawn = release.prototypes.double().numpy()
            assert drawn.shape == (batch, *mean0.shape), "the release no longer draws its noise in bulk"
            out[world].append(((drawn - mean0) * weights).sum(axis=(1, 2)) / distance)
        noise.batch = 0
    assert out[0], "no seed gave the same selection in both worlds"
    return np.concatenate(out[0]), np.concatenate(out[1]), largest


def audit(layer, worlds, labels, noise, seeds, batch) -> tuple[float, float]:
    """(ε lower bound at 95 % over the threshold grid, Δ of the pair)."""
    first, second, distance = statistics(layer, worlds, labels, noise, seeds, batch)
    per_test = 1.0 - 0.05 / len(THRESHOLDS)
    best = 0.0
    for t in THRESHOLDS:
        false_positives = int((first > t).sum())
        false_negatives = int((second <= t).sum())
        bound = two_worlds_epsilon_lower(false_positives, len(first), false_negatives, len(second), DELTA, per_test)
        best = max(best, bound)
    return best, distance


def replace_one_pair(num_classes: int, per_class: int, dim: int, seed: int = 0):
    """Two feature sets that differ in one example of class 0, replaced by its opposite; every feature
    has norm at least ``2 CLIP`` (so clipped to ``CLIP``, and under VPP's group clipping each group is
    saturated too): class 0's clipped mean moves by exactly 2R / n_0, the ``fixed-features`` sensitivity."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    signs = rng.choice([-1.0, 1.0], size=(len(labels), dim))
    z0 = signs * (2.0 * CLIP)  # every coordinate ±2R: each group of coordinates has norm above its bound
    z0 += rng.normal(0.0, 0.1, z0.shape)
    z1 = z0.copy()
    z1[0] = -z0[0]
    return torch.from_numpy(z0), torch.from_numpy(z1), torch.from_numpy(labels)


def trained_map_pair(num_classes: int, per_class: int, dim: int, seed: int = 0):
    """Two feature sets of the same labels whose every feature differs, as when one replaced example
    changes the trained feature map: each class's features point one way in the first world and the
    opposite way in the second, so every class mean moves by 2R (the whole release by 2R·√C, the
    ``trained-features`` sensitivity)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    directions = rng.normal(size=(num_classes, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    z0 = directions[labels] * (4.0 * CLIP)
    return torch.from_numpy(z0), torch.from_numpy(-z0), torch.from_numpy(labels)


SEEDS_IGPP = range(5)
BATCH = 200_000  # 5 × 200,000 = 10^6 releases per world


def test_igpp_at_its_sensitivity_stays_below_its_epsilon(bulk_noise):
    layer = layer_for("igpp", "fixed-features", 2)
    z0, z1, labels = replace_one_pair(2, 4, 4)
    bound, distance = audit(layer, (z0, z1), labels, bulk_noise, SEEDS_IGPP, BATCH)
    # The pair attains the claimed sensitivity: Δ = 1/σ (the audit is as strong as this test can be).
    assert distance == pytest.approx(1.0 / layer.noise_multiplier, rel=1e-6)
    assert 0.5 * EPSILON < bound <= EPSILON


def test_igpp_with_halved_noise_is_caught(bulk_noise):
    layer = layer_for("igpp", "fixed-features", 2)
    z0, z1, labels = replace_one_pair(2, 4, 4)
    bulk_noise.scale = 0.5
    bound, _ = audit(layer, (z0, z1), labels, bulk_noise, SEEDS_IGPP, BATCH)
    assert bound > EPSILON + 0.5


def test_trained_features_sensitivity_covers_a_trained_map(bulk_noise):
    layer = layer_for("igpp", "trained-features", 3)
    z0, z1, labels = trained_map_pair(3, 4, 4)
    bound, distance = audit(layer, (z0, z1), labels, bulk_noise, SEEDS_IGPP, BATCH)
    assert distance == pytest.approx(1.0 / layer.noise_multiplier, rel=1e-6)
    assert 0.5 * EPSILON < bound <= EPSILON


def test_fixed_features_sensitivity_fails_for_a_trained_map(bulk_noise):
    layer = layer_for("igpp", "fixed-features", 3)
    z0, z1, labels = trained_map_pair(3, 4, 4)
    bound, distance = audit(layer, (z0, z1), labels, bulk_noise, range(1), BATCH)
    # 2R per class against noise for 2R/n_c: Δ = n_c √C / σ, far beyond 1/σ.
    assert distance == pytest.approx(4 * np.sqrt(3) / layer.noise_multiplier, rel=1e-6)
    assert bound > 2 * EPSILON


def vpp_claim(layer) -> float:
    """ε of VPP's Gaussian part alone (the audit holds the selection fixed)."""
    return compute_epsilon("pld", [(GaussianEvent(layer.noise_multiplier), 1)], DELTA)


SEEDS_VPP = range(20)
BATCH_VPP = 50_000  # up to 20 × 50,000 = 10^6 releases per world


def test_vpp_at_its_sensitivity_stays_below_its_gaussian_epsilon(bulk_noise):
    layer = layer_for("vpp", "fixed-features", 2, rho=0.5)
    z0, z1, labels = replace_one_pair(2, 4, 8)
    claim = vpp_claim(layer)
    assert claim < EPSILON
    bound, distance = audit(layer, (z0, z1), labels, bulk_noise, SEEDS_VPP, BATCH_VPP)
    # Both groups of the replaced example are saturated: κ_A²/s_A² + κ_B²/s_B² = 1/σ² is attained.
    assert distance == pytest.approx(1.0 / layer.noise_multiplier, rel=1e-6)
    assert 0.5 * claim < bound <= claim


def test_vpp_with_halved_noise_is_caught(bulk_noise):
    layer = layer_for("vpp", "fixed-features", 2, rho=0.5)
    z0, z1, labels = replace_one_pair(2, 4, 8)
    bulk_noise.scale = 0.5
    bound, _ = audit(layer, (z0, z1), labels, bulk_noise, SEEDS_VPP, BATCH_VPP)
    assert bound > vpp_claim(layer) + 0.5


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_igpp_ten_million_releases_resolve_a_fifth_less_noise(bulk_noise, scale):
    # Ten times the releases: the real mechanism still stays below ε, and noise 20 % too small is caught.
    layer = layer_for("igpp", "fixed-features", 2)
    z0, z1, labels = replace_one_pair(2, 4, 4)
    bulk_noise.scale = scale
    bound, _ = audit(layer, (z0, z1), labels, bulk_noise, range(50), BATCH)
    if scale == 1.0:
        assert bound <= EPSILON
    else:
        assert bound > EPSILON
