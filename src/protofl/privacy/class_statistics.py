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
from typing import Any

import torch

from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy.layer import PlannedReleaseLayer, State, register_privacy_layer
from protofl.privacy.mechanisms import clip_rows

__all__ = ["ClassStatisticsLayer", "ClassStatistics"]

MECHANISM = "class-statistics"


class ClassStatistics:
    """The noisy statistics of one release: ``counts`` (C,), ``sums`` (C, D), ``moments`` (C, D, D)
    (symmetric)."""

    def __init__(self, counts: torch.Tensor, sums: torch.Tensor, moments: torch.Tensor):
        self.counts, self.sums, self.moments = counts, sums, moments


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
        shares = (c.count_fraction, rest * mean_share, rest * (1 - mean_share))
        sensitivities = (1.0, c.clip_bound, c.clip_bound**2)
        return tuple(self.noise_multiplier / math.sqrt(f) * s for f, s in zip(shares, sensitivities))  # type: ignore[return-value]

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
        k, d = self.num_classes, x.shape[1]
        x = clip_rows(x.double(), self.config.clip_bound)
        onehot = torch.nn.functional.one_hot(y, k).double()
        counts = onehot.sum(0)
        sums = onehot.T @ x
        moments = torch.einsum("nc,ni,nj->cij", onehot, x, x)
        std_n, std_s, std_m = self.noise_stds(mean_share)
        counts = (
            counts
            + torch.randn(k, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_n
        )
        sums = (
            sums
            + torch.randn(k, d, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_s
        )
        upper = torch.triu(
            torch.randn(k, d, d, generator=generator, dtype=torch.float64, device=generator.device).to(x.device) * std_m
        )
        moments = moments + upper + torch.triu(upper, 1).transpose(1, 2)  # one draw per entry of the triangle
        return ClassStatistics(counts.float(), sums.float(), moments.float()), ledger

    def report_details(self) -> dict[str, Any]:
        return {"relation": self.config.relation, "clip_bound": self.config.clip_bound}


register_privacy_layer(MECHANISM, ClassStatisticsLayer)
