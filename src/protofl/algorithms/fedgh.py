"""FedGH (Yi et al., ACM MM 2023, "FedGH: Heterogeneous federated learning with generalized global
header"): the server trains one classifier header on the clients' prototypes.

Each client keeps its own feature extractor. Every round it replaces its header (the linear ``head``)
by the global header it receives, trains its whole model on its data with cross-entropy, and uploads
its per-class mean features (prototypes) with their counts; nothing else leaves the client. The server
trains the global header on the uploaded ``(prototype, class)`` pairs with cross-entropy and broadcasts
it. A client classifies with its own extractor and the global header.

Choices (the paper leaves them open): the global header starts as the run's initial head and persists
on the server, trained further each round for ``server_epochs`` of shuffled minibatches (SGD,
``server_lr``, ``server_momentum``), the shuffles drawn from ``(seed, round)``; every uploaded pair
counts once (a client's class is one example of the header's training set, as in the paper's
algorithm); the broadcast also carries the count-weighted class means, so nearest-prototype accuracy
is reported as for FedProto. Under ``[privacy]`` (``igpp``, ``vpp``) the uploaded prototypes are the
privacy layer's noisy ones and the header is trained on them (post-processing: no extra ε); under the
add/remove relation (every class uploaded, with noisy counts) on the pairs whose noisy count passes the
presence threshold (:attr:`~protofl.algorithms.fedproto.FedProto.presence_threshold`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from protofl.algorithms.base import Params, State, register
from protofl.algorithms.fedproto import FedProto, FedProtoConfig, present_rows
from protofl.config import check, check_choice
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.seeds import derive_seed
from protofl.training import minibatches

HEADER = "header/"


@dataclasses.dataclass(frozen=True)
class FedGHConfig(FedProtoConfig):
    #: FedGH's local objective is cross-entropy alone (> 0 adds FedProto's alignment to the class means).
    proto_weight: float = 0.0
    #: Server training of the global header on the uploaded prototypes: epochs, SGD learning rate,
    #: momentum and batch size.
    server_epochs: int = 100
    server_lr: float = 0.01
    server_momentum: float = 0.9
    server_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.model_sharing, ("none",), "model_sharing")
        check(self.server_epochs >= 0, "server_epochs", f"must be >= 0, got {self.server_epochs}")
        check(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        check(0 <= self.server_momentum < 1, "server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        check(self.server_batch_size >= 1, "server_batch_size", f"must be >= 1, got {self.server_batch_size}")


@register
class FedGH(FedProto):
    name = "fedgh"
    summary = "FedGH (Yi et al., 2023): own feature extractors, a global classifier header trained by the server on the prototypes"
    Config = FedGHConfig

    def _header_keys(self) -> list[str]:
        return [k for k, _ in self.model.named_parameters() if k.startswith("head.")]

    # -- state and payloads ------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        initial = self.initial_params(seed)
        return {
            **super().init_server_state(seed),
            "header": {k: initial[k] for k in self._header_keys()},
            "seed": torch.tensor(int(seed), dtype=torch.int64, device=self.device),
            "round": torch.tensor(0, dtype=torch.int64, device=self.device),
        }

    def broadcast(self, server_state: State) -> Payload:
        arrays = dict(super().broadcast(server_state).arrays)
        arrays.update({HEADER + k: v.cpu().numpy() for k, v in server_state["header"].items()})
        return Payload(arrays, {"method": self.name})

    def broadcast_spec(self) -> PayloadSpec:
        spec = super().broadcast_spec()
        shapes = dict(self.model.named_parameters())
        return PayloadSpec(
            self.name,
            {**spec.arrays, **{HEADER + k: ArraySpec(tuple(shapes[k].shape)) for k in self._header_keys()}},
            same_length=spec.same_length,
        )

    # -- client: its own extractor under the global header (to train and to evaluate) ---------------
    def model_params(self, client_state: State, received: Payload) -> Params:
        header = {k: torch.from_numpy(np.array(received[HEADER + k])).to(self.device) for k in self._header_keys()}
        return {**client_state["params"], **header}

    # -- server: train the header on the prototypes ------------------------------------------------
    def server_prototypes(self, server_state: State, replies: list[Payload]) -> tuple[State, dict[str, float]]:
        state, metrics = super().server_prototypes(server_state, replies)  # the class means
        c = self.config
        round_index = int(server_state["round"]) + 1
        y, z = present_rows(replies, self.presence_threshold)
        y, z = y.to(self.device), z.float().to(self.device)
        header = {k: v.detach().clone().requires_grad_(True) for k, v in server_state["header"].items()}
        optimizer = torch.optim.SGD(list(header.values()), lr=c.server_lr, momentum=c.server_momentum)
        shuffle = torch.Generator(device="cpu").manual_seed(derive_seed(int(server_state["seed"]), round_index, 0xF6))
        for _ in range(c.server_epochs if len(y) else 0):
            for index in minibatches(len(y), c.server_batch_size, shuffle):
                loss = F.cross_entropy(self.head(header, z[index]), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            header_loss = float(F.cross_entropy(self.head(header, z), y)) if len(y) else float("nan")
            header_acc = float((self.head(header, z).argmax(1) == y).float().mean()) if len(y) else float("nan")
        state.update(
            header={k: v.detach() for k, v in header.items()},
            seed=server_state["seed"],
            round=torch.tensor(round_index, dtype=torch.int64, device=self.device),
        )
        return state, {**metrics, "header_loss": header_loss, "header_prototype_acc": header_acc}


__all__ = ["FedGH", "FedGHConfig"]
