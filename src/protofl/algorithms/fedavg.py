"""FedAvg (McMahan et al., AISTATS 2017): clients train the broadcast global model locally; the
server replaces it with the average of the returned models weighted by the clients' sample counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from protofl.algorithms.base import (Algorithm, ClientData, LocalTrainingConfig, Params, State, arrays_to_params,
                                     param_specs, params_to_arrays, register)
from protofl.payload import ArraySpec, Payload, PayloadSpec


@dataclasses.dataclass(frozen=True)
class FedAvgConfig(LocalTrainingConfig):
    pass


def weighted_average(params_list: list[Params], weights: list[float]) -> Params:
    """Sum of ``w_k * params_k / sum(w)`` per tensor."""
    total = float(sum(weights))
    return {
        name: sum(p[name] * (w / total) for p, w in zip(params_list, weights))
        for name in params_list[0]
    }


@register
class FedAvg(Algorithm):
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

    def local_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, global_params: Params) -> torch.Tensor:
        return F.cross_entropy(self.forward(params, x)[1], y)

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        global_params = arrays_to_params(received)
        params, metrics = self.train_local(
            global_params, data, lambda p, x, y: self.local_loss(p, x, y, global_params), generator
        )
        arrays = params_to_arrays(params)
        arrays["num_samples"] = np.int64(data.num_train)
        return client_state, Payload(arrays, {"method": self.name}), metrics

    # -- batched execution -------------------------------------------------------------------------
    def batched_local_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                           global_params: Params) -> torch.Tensor:
        """:meth:`local_loss` on one client's padded batch (``weight``: 1 on real samples)."""
        from protofl.engine.batched import masked_cross_entropy

        return masked_cross_entropy(self.forward(params, x)[1], y, weight)

    def batched_unsupported(self):
        return self.batched_unsupported_overrides(FedAvg, ("client_step", "train_local", "forward"), ("local_loss",))

    def client_step_batched(self, client_states, datas, received, generators):
        from protofl.engine.batched import broadcast_params

        global_params = arrays_to_params(received)
        params, metrics, _ = self.train_local_batched(
            broadcast_params(global_params, len(datas)), datas, self.batched_local_loss, generators, (global_params,)
        )
        out = []
        for c, (state, data) in enumerate(zip(client_states, datas)):
            arrays = params_to_arrays({name: v[c] for name, v in params.items()})
            arrays["num_samples"] = np.int64(data.num_train)
            out.append((state, Payload(arrays, {"method": self.name}), metrics[c]))
        return out

    def server_step(self, server_state: State, replies: list[Payload]):
        models = [arrays_to_params(r) for r in replies]
        weights = [int(r["num_samples"]) for r in replies]
        return {"params": weighted_average(models, weights)}, {}

    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        return {"global_acc": self.accuracy(server_state["params"], x, y)}

    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        return {"personal_acc": self.accuracy(arrays_to_params(received), data.x_test, data.y_test)}
