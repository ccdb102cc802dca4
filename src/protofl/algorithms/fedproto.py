"""FedProto (Tan et al., AAAI 2022): clients share only per-class mean features (prototypes) with
their counts; no weights are averaged.

Local objective: CE + lambda * MSE(f(x), P_y), where P_y is the global prototype of the sample's
class (mean over feature dimensions; samples of classes without a global prototype contribute only
CE). Server: per-class average of the uploaded prototypes, weighted by class counts as in the paper
(``aggregation = "weighted"``, our default) or unweighted as in the authors' public code
(``aggregation = "unweighted"``). Clients keep their own models. Inference is reported both ways:
the client's classifier (``personal_acc``) and the nearest global prototype in Euclidean distance
(``personal_proto_acc``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from protofl.algorithms.base import (Algorithm, ClientData, LocalTrainingConfig, State, compute_features,
                                     register)
from protofl.config import check, check_choice
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.prototypes import PrototypeAccumulator


@dataclasses.dataclass(frozen=True)
class FedProtoConfig(LocalTrainingConfig):
    #: Weight of the prototype-alignment term (lambda = 1 in the paper).
    proto_weight: float = 1.0
    #: ``weighted`` (by class counts, the paper) or ``unweighted`` (the authors' code).
    aggregation: str = "weighted"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.proto_weight >= 0, "proto_weight", f"must be >= 0, got {self.proto_weight}")
        check_choice(self.aggregation, ("weighted", "unweighted"), "aggregation")


def aggregate_prototypes(replies: list[Payload], num_classes: int, dim: int, weighted: bool):
    """Per-class mean of the uploaded prototypes, weighted by their counts or unweighted."""
    acc = PrototypeAccumulator(num_classes, dim, dtype=torch.float64)
    for reply in replies:
        classes = torch.from_numpy(reply["classes"])
        counts = torch.from_numpy(reply["counts"]).double() if weighted else torch.ones(len(classes), dtype=torch.float64)
        acc.update_means(classes, torch.from_numpy(reply["prototypes"]).double(), counts)
    classes, protos, _ = acc.compute()
    return classes, protos.float()


def nearest_prototype(features: torch.Tensor, classes: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Class of the nearest prototype (Euclidean) for each feature vector."""
    return classes[torch.cdist(features, prototypes).argmin(1)]


@register
class FedProto(Algorithm):
    name = "fedproto"
    summary = "FedProto (Tan et al., 2022): per-class prototypes, no weight sharing"
    Config = FedProtoConfig

    @property
    def dim(self) -> int:
        return self.model.feature_dim

    def init_server_state(self, seed: int) -> State:
        return {"classes": torch.zeros(0, dtype=torch.int64), "prototypes": torch.zeros(0, self.dim)}

    def init_client_state(self, seed: int) -> State:
        return {"params": self.initial_params(seed)}

    def broadcast(self, server_state: State) -> Payload:
        return Payload(
            {"classes": server_state["classes"].numpy(), "prototypes": server_state["prototypes"].numpy()},
            {"method": self.name},
        )

    def broadcast_spec(self) -> PayloadSpec:
        c = self.task.num_classes
        return PayloadSpec(
            self.name,
            {"classes": ArraySpec((None,), "int64", class_bound=c, unique=True), "prototypes": ArraySpec((None, self.dim))},
            same_length=("classes", "prototypes"),
        )

    def reply_spec(self) -> PayloadSpec:
        spec = self.broadcast_spec()
        return PayloadSpec(
            self.name, {**spec.arrays, "counts": ArraySpec((None,), "int64", minimum=1)}, same_length=("classes", "prototypes", "counts")
        )

    @staticmethod
    def global_lookup(received: Payload, num_classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(C, d)`` table of global prototypes and a mask of the classes that have one."""
        table = torch.zeros(num_classes, dim)
        mask = torch.zeros(num_classes, dtype=torch.bool)
        classes = torch.from_numpy(received["classes"])
        table[classes] = torch.from_numpy(received["prototypes"]).float()
        mask[classes] = True
        return table, mask

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        table, mask = self.global_lookup(received, self.task.num_classes, self.dim)
        weight = self.config.proto_weight

        def loss_fn(params, x, y):
            z, logits = self.forward(params, x)
            loss = F.cross_entropy(logits, y)
            has = mask[y]
            if weight and has.any():
                loss = loss + weight * F.mse_loss(z[has], table[y[has]])
            return loss

        params, metrics = self.train_local(client_state["params"], data, loss_fn, generator)
        acc = PrototypeAccumulator(self.task.num_classes, self.dim)
        acc.update(compute_features(self, params, data.x_train), data.y_train)
        classes, protos, counts = acc.compute()
        reply = Payload(
            {"classes": classes.numpy(), "prototypes": protos.numpy(), "counts": counts.long().numpy()},
            {"method": self.name},
        )
        return {"params": params}, reply, metrics

    def server_step(self, server_state: State, replies: list[Payload]):
        classes, protos = aggregate_prototypes(
            replies, self.task.num_classes, self.dim, weighted=self.config.aggregation == "weighted"
        )
        return {"classes": classes, "prototypes": protos}, {"global_classes": float(len(classes))}

    @torch.no_grad()
    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        params = client_state["params"]
        out = {"personal_acc": self.accuracy(params, data.x_test, data.y_test)}
        if len(received["classes"]) and len(data.y_test):
            features = compute_features(self, params, data.x_test)
            pred = nearest_prototype(features, torch.from_numpy(received["classes"]),
                                     torch.from_numpy(received["prototypes"]).float())
            out["personal_proto_acc"] = float((pred == data.y_test).float().mean())
        return out
