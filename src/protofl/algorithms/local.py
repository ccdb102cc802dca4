"""Local-only training: every client trains its own model on its own data and nothing is exchanged.
The floor every personalised method must beat."""

from __future__ import annotations

import dataclasses

from protofl.algorithms.base import (
    ClientData,
    LocalOutcome,
    LocalTrainingConfig,
    ModelAlgorithm,
    Params,
    State,
    register,
)
from protofl.payload import Payload


@dataclasses.dataclass(frozen=True)
class LocalConfig(LocalTrainingConfig):
    pass


@register
class Local(ModelAlgorithm):
    name = "local"
    summary = "Local-only training, no communication (the floor for personalised methods)"
    Config = LocalConfig
    communicates = False

    def init_client_state(self, seed: int) -> State:
        return {"params": self.initial_params(seed)}

    def start_params(self, client_state: State, received: Payload) -> Params:
        return client_state["params"]

    def reply(self, outcome: LocalOutcome):
        return {"params": outcome.params}, Payload({}, {"method": self.name}), outcome.metrics

    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        return {"personal_acc": self.accuracy(client_state["params"], data.x_test, data.y_test)}
