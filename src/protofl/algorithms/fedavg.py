"""FedAvg (McMahan et al., AISTATS 2017): clients train the broadcast global model locally; the
server replaces it with the average of the returned models weighted by the clients' sample counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from protofl.algorithms.base import (
    ClientData,
    LocalOutcome,
    LocalTrainingConfig,
    ModelAlgorithm,
    Params,
    State,
    arrays_to_params,
    param_specs,
    params_to_arrays,
    register,
)
from protofl.payload import ArraySpec, Payload, PayloadSpec


@dataclasses.dataclass(frozen=True)
class FedAvgConfig(LocalTrainingConfig):
    pass


def weighted_average(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    """Sum of ``w_k * params_k / sum(w)`` per tensor."""
    total = float(sum(weights))
    # ``params_list`` is not empty, so each sum is a tensor, never the start value 0
    return {
        name: cast(torch.Tensor, sum(p[name] * (w / total) for p, w in zip(params_list, weights)))
        for name in params_list[0]
    }


@register
class FedAvg(ModelAlgorithm):
    name = "fedavg"
    summary = "FedAvg (McMahan et al., 2017): sample-weighted model averaging"
    Config = FedAvgConfig
    has_global_model = True

    def init_server_state(self, seed: int) -> State:
        return {"params": self.initial_params(seed)}

    def broadcast(self, server_state: State) -> Payload:
        return Payload(params_to_arrays(server_state["params"]), {"method": self.name})

    def _param_specs(self):
        return param_specs(dict(self.model.named_parameters()))

    def broadcast_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, self._param_specs())

    def reply_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {**self._param_specs(), "num_samples": ArraySpec((), "int64", minimum=1)})

    def start_params(self, client_state: State, received: Payload) -> Params:
        return self.received_params(received)

    def reply(self, outcome: LocalOutcome):
        arrays = params_to_arrays(outcome.params)
        arrays["num_samples"] = np.array(outcome.data.num_train, dtype=np.int64)
        return outcome.client_state, Payload(arrays, {"method": self.name}), outcome.metrics

    def server_step(self, server_state: State, replies: list[Payload]):
        models = [arrays_to_params(r, self.device) for r in replies]
        weights = [int(r["num_samples"]) for r in replies]
        return {"params": weighted_average(models, weights)}, {}

    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        return {"global_acc": self.accuracy(server_state["params"], x, y)}

    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        return {"personal_acc": self.accuracy(arrays_to_params(received, self.device), data.x_test, data.y_test)}
