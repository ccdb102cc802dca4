"""FedProx (Li et al., MLSys 2020): FedAvg with the proximal term (mu/2)||theta - theta_global||^2 in
the local objective, which limits client drift under heterogeneity."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from protofl.algorithms.base import Params, register
from protofl.algorithms.fedavg import FedAvg, FedAvgConfig
from protofl.config import check


@dataclasses.dataclass(frozen=True)
class FedProxConfig(FedAvgConfig):
    #: Weight of the proximal term.
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.mu >= 0, "mu", f"must be >= 0, got {self.mu}")


@register
class FedProx(FedAvg):
    name = "fedprox"
    summary = "FedProx (Li et al., 2020): FedAvg with a proximal term"
    Config = FedProxConfig

    def local_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, global_params: Params) -> torch.Tensor:
        proximal = sum(((params[k] - global_params[k]) ** 2).sum() for k in params)
        return F.cross_entropy(self.forward(params, x)[1], y) + 0.5 * self.config.mu * proximal

    def batched_local_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           global_params: Params) -> torch.Tensor:
        from protofl.engine.batched import masked_cross_entropy

        proximal = sum(((params[k] - global_params[k]) ** 2).sum() for k in params)
        return masked_cross_entropy(self.forward(params, x)[1], y, weight) + 0.5 * self.config.mu * proximal
