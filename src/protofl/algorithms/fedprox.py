"""FedProx (Li et al., MLSys 2020): FedAvg with the proximal term (mu/2)||theta - theta_global||^2 in
the local objective, which limits client drift under heterogeneity."""

from __future__ import annotations

import dataclasses

import torch

from protofl.algorithms.base import Params, arrays_to_params, register
from protofl.algorithms.fedavg import FedAvg, FedAvgConfig
from protofl.config import check
from protofl.payload import Payload
from protofl.training import masked_cross_entropy


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

    def context(self, received: Payload) -> Params:
        """The received global model: the anchor of the proximal term."""
        return arrays_to_params(received, self.device)

    def loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, global_params: Params
    ) -> torch.Tensor:
        proximal = sum(((params[k] - global_params[k]) ** 2).sum() for k in params)
        return masked_cross_entropy(self.forward(params, x)[1], y, weight) + 0.5 * self.config.mu * proximal
