"""A Gaussian release of clipped per-class statistics: counts, sums and second moments.

``privacy.mechanism = "class-statistics"``: every release publishes, for every class c, the noisy count
N_c, the noisy sum S_c = Σ x_i and the noisy second moment M_c = Σ x_i x_iᵀ (upper triangle) of the
client's examples of class c, each x_i clipped to norm ``privacy.clip_bound`` = R first. Under add/remove
one example moves one class's count by 1, its sum by at most R and its second moment's upper triangle by
at most ‖x‖² ≤ R² (Frobenius norm of the triangle of x xᵀ). With precision shares f_n, f_s, f_m (summing
to 1), part j gets Gaussian noise of standard deviation σ·Δ_j/√f_j (Δ_j its sensitivity): the release
rescaled by √f_j/Δ_j per part has L2 sensitivity √(f_n + f_s + f_m) = 1 and noise σ, so it is one Gaussian
mechanism of noise multiplier σ (the split of :func:`~protofl.privacy.mechanisms.split_multiplier`, in
three parts). Every class is released, with a noisy count, so the class set a client holds is not
published.

σ is calibrated so that ``planned_releases`` such releases compose to (ε, δ) under the run's accountant,
and each release is recorded in the client's ledger before any noise is drawn.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy.layer import PlannedReleaseLayer, State, register_privacy_layer
from protofl.privacy.mechanisms import clip_rows

__all__ = ["ClassStatisticsLayer", "ClassStatistics", "class_statistics_stds", "noisy_class_statistics"]

MECHANISM = "class-statistics"


class ClassStatistics:
    """The noisy statistics of one release: ``counts`` (C,), ``sums`` (C, D), ``moments`` (C, D, D)
    (symmetric; ``None`` where the release leaves the second moments out)."""

    def __init__(self, counts: torch.Tensor, sums: torch.Tensor, moments: torch.Tensor | None):
        self.counts, self.sums, self.moments = counts, sums, moments


def class_statistics_stds(
    noise_multiplier: float, clip_bound: float, shares: tuple[float, float, float]
) -> tuple[float, float, float | None]:
    """The noise standard deviations of a count, a sum's coordinate and a moment's entry of one release
    at ``noise_multiplier`` σ: part j (sensitivity Δ_j: 1, R, R²) gets σ·Δ_j/√f_j with its precision
    share f_j (``shares``, summing to 1). A share of 0 leaves that part out of the release (only the
    moments may be left out): ``None``."""
    check = abs(sum(shares) - 1) < 1e-9 and all(f >= 0 for f in shares) and shares[0] > 0 and shares[1] > 0
    if not check:
        raise ValueError(f"class-statistics shares must be >= 0 (counts and sums > 0) and sum to 1, got {shares}")
    sensitivities = (1.0, clip_bound, clip_bound**2)
    std_n, std_s, std_m = (noise_multiplier / math.sqrt(f) * s if f else None for f, s in zip(shares, sensitivities))
    assert std_n is not None and std_s is not None  # their shares are > 0
    return std_n, std_s, std_m


def noisy_class_statistics(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    clip_bound: float,
    stds: tuple[float, float, float | None],
    generator: torch.Generator,
) -> ClassStatistics:
    """The mechanism itself (the caller records its cost first): every class's count, sum and (unless its
    standard deviation is ``None``) second moment of ``x`` (N, D), each row clipped to ``clip_bound``,
    plus Gaussian noise of the standard deviations ``stds`` (:func:`class_statistics_stds`)."""
    k, d = num_classes, x.shape[1]
    x = clip_rows(x.double(), clip_bound)
    onehot = torch.nn.functional.one_hot(y, k).double()
    std_n, std_s, std_m = stds
    counts = onehot.sum(0)
    counts = (
        counts + torch.randn(k, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_n
    )
    sums = onehot.T @ x
    sums = (
        sums + torch.randn(k, d, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_s
    )
    if std_m is None:
        return ClassStatistics(counts.float(), sums.float(), None)
    moments = torch.einsum("nc,ni,nj->cij", onehot, x, x)
    upper = torch.triu(
        torch.randn(k, d, d, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_m
    )
    moments = moments + upper + torch.triu(upper, 1).transpose(1, 2)  # one draw per entry of the triangle
    return ClassStatistics(counts.float(), sums.float(), moments.float())


class ClassStatisticsLayer(PlannedReleaseLayer):
    """See the module docstring. ``shares``: the precision shares (count, sum, moment)."""

    def __init__(self, config: PrivacyConfig, num_classes: int):
        super().__init__(config, num_classes)
        if config.relation != "add-remove":
            raise ConfigError(
                "privacy.relation: class-statistics is accounted under add-remove (the noisy counts hide the "
                "class sizes); set privacy.relation = 'add-remove'"
            )

    def noise_stds(self, mean_share: float) -> tuple[float, float, float]:
        """The noise standard deviations of a count, a sum's coordinate and a moment's entry: the count
        gets ``privacy.count_fraction`` of the precision, the sums ``mean_share`` of the rest, the
        moments what is left."""
        c = self.config
        rest = 1 - c.count_fraction
        stds = class_statistics_stds(
            self.noise_multiplier, c.clip_bound, (c.count_fraction, rest * mean_share, rest * (1 - mean_share))
        )
        return cast(tuple[float, float, float], stds)

    def release(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        client_state: State,
        who: str,
        mean_share: float,
    ) -> tuple[ClassStatistics, list]:
        """The noisy statistics of ``x`` (N, D) with labels ``y`` and the client's new ledger state; the
        release is recorded (or refused, past the budget) before any noise is drawn."""
        ledger = self.spend(client_state, self.release_events(), who)
        stats = noisy_class_statistics(
            x, y, self.num_classes, self.config.clip_bound, self.noise_stds(mean_share), generator
        )
        return stats, ledger

    def report_details(self) -> dict[str, Any]:
        return {"relation": self.config.relation, "clip_bound": self.config.clip_bound}


register_privacy_layer(MECHANISM, ClassStatisticsLayer)
