"""Local-only training: every client trains its own model on its own data and nothing is exchanged.
The floor every personalised method must beat."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from protofl.algorithms.base import Algorithm, ClientData, LocalTrainingConfig, State, register
from protofl.payload import Payload


@dataclasses.dataclass(frozen=True)
class LocalConfig(LocalTrainingConfig):
    pass


@register
class Local(Algorithm):
    name = "local"
    summary = "Local-only training, no communication (the floor for personalised methods)"
    Config = LocalConfig
    communicates = False

    def init_client_state(self, seed: int) -> State:
        return {"params": self.initial_params(seed)}

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        def loss_fn(params, x, y):
            return F.cross_entropy(self.forward(params, x)[1], y)

        params, metrics = self.train_local(client_state["params"], data, loss_fn, generator)
        return {"params": params}, Payload({}, {"method": self.name}), metrics

    # -- batched execution -------------------------------------------------------------------------
    def batched_local_loss(self, params, x, y, weight):
        from protofl.engine.batched import masked_cross_entropy

        return masked_cross_entropy(self.forward(params, x)[1], y, weight)

    def batched_unsupported(self):
        return self.batched_unsupported_overrides(Local, ("client_step", "train_local", "forward"), ())

    def client_step_batched(self, client_states, datas, received, generators):
        from protofl.engine.batched import stack_params, unstack_params

        start = stack_params([s["params"] for s in client_states])
        params, metrics, _ = self.train_local_batched(start, datas, self.batched_local_loss, generators)
        return [({"params": p}, Payload({}, {"method": self.name}), m) for p, m in zip(unstack_params(params), metrics)]

    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        return {"personal_acc": self.accuracy(client_state["params"], data.x_test, data.y_test)}
