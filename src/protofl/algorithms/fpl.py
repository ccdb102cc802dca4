"""FPL (Huang et al., CVPR 2023, "Rethinking federated learning with domain shift: a prototype view").

FedAvg on the weights plus prototypes. Server: for each class, the clients' prototypes of that class
are clustered with FINCH (cosine); the cluster means are the *cluster prototypes* ``c_{y,m}`` and their
plain mean is the *unbiased prototype* ``u_y`` (so a domain uploaded by many clients counts once per
cluster, not once per client). Client loss ``CE + cpcl_weight · L_CPCL + proto_weight · MSE(z, u_y)``:

    L_CPCL = −log [ Σ_m exp(cos(z, c_{y,m})/τ) / Σ_{all cluster prototypes c} exp(cos(z, c)/τ) ],  τ = 0.02.

Choices:

- FINCH level (``finch_level``): the FPL paper does not say which partition of FINCH's hierarchy it
  uses; the authors' code takes the last one, i.e. the coarsest partition with more than one cluster
  (the first partition when that is already a single cluster). That is our default (``"last"``);
  ``"first"`` takes the finest partition (the first-neighbour groups). Our FINCH is
  :func:`protofl.finch.finch`; its differences from the authors' FINCH code are listed there.
- A class uploaded by a single client has one cluster, that prototype.
- The prototype terms apply to samples whose class has a global prototype (none in round 1).

With τ = 0.02 the CPCL gradient is large (∝ 1/(τ‖z‖)): keep FPL's learning rate (SGD 0.01); on our
small ReLU nets lr ≥ 0.02 (momentum 0.9) drove the features to zero within a few rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protofl.algorithms.base import State, register
from protofl.algorithms.fedproto import FedProto, FedProtoConfig, alignment_loss, present_rows
from protofl.config import check, check_choice
from protofl.finch import cluster_means, finch
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.training import masked_mean, take


@dataclasses.dataclass(frozen=True)
class FPLConfig(FedProtoConfig):
    #: FPL averages the models (FedAvg).
    model_sharing: str = "fedavg"
    #: Weight of the cluster-prototype contrastive loss and its temperature (FPL: 1, 0.02).
    cpcl_weight: float = 1.0
    temperature: float = 0.02
    #: FINCH partition used: ``last`` (the coarsest with more than one cluster, as FPL's code) or ``first``.
    finch_level: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.cpcl_weight >= 0, "cpcl_weight", f"must be >= 0, got {self.cpcl_weight}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check_choice(self.finch_level, ("first", "last"), "finch_level")


def cpcl_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    cluster_classes: torch.Tensor,
    cluster_prototypes: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over samples of ``logsumexp_all(cos/τ) − logsumexp_{clusters of y}(cos/τ)``, weighted by
    ``weight`` (default: every sample counts). Every sample of non-zero weight must have at least one
    cluster prototype of its class; the others may have none (their term is kept finite and dropped)."""
    weight = torch.ones(len(y), dtype=z.dtype, device=z.device) if weight is None else weight
    logits = F.normalize(z, dim=-1) @ F.normalize(cluster_prototypes, dim=-1).t() / temperature
    # Rows of weight 0 (e.g. padding, or a class without clusters) see every cluster as positive, so that
    # their (dropped) term and its gradient stay finite.
    positive = (cluster_classes[None, :] == y[:, None]) | (weight[:, None] == 0)
    per_sample = torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), -1)
    return masked_mean(per_sample, weight)


def cluster_prototypes(replies: list[Payload], dim: int, level: str = "last", min_count: float = 1.0):
    """Per class, FINCH (cosine) over the uploaded prototypes whose count is at least ``min_count``
    (:func:`~protofl.algorithms.fedproto.present_rows`: under an add/remove release, those whose noisy
    count passes the presence threshold): ``(cluster_classes, cluster_prototypes, classes, unbiased)``
    with ``unbiased[i]`` the mean of class ``classes[i]``'s cluster prototypes."""
    by_class: dict[int, list[np.ndarray]] = {}
    labels, prototypes = present_rows(replies, min_count)
    for c, p in zip(labels.tolist(), prototypes.cpu().numpy()):
        by_class.setdefault(int(c), []).append(p)
    cluster_cls, clusters, unbiased = [], [torch.zeros(0, dim, device="cpu")], []
    classes = sorted(by_class)
    for c in classes:
        x = torch.from_numpy(np.stack(by_class[c])).double()
        levels = finch(x, "cosine")
        means = cluster_means(x, levels[0] if level == "first" else levels[-1]).float()
        cluster_cls += [c] * len(means)
        clusters.append(means)
        unbiased.append(means.mean(0))
    return (
        torch.tensor(cluster_cls, dtype=torch.int64, device="cpu"),
        torch.cat(clusters),
        torch.tensor(classes, dtype=torch.int64, device="cpu"),
        torch.stack(unbiased) if unbiased else torch.zeros(0, dim, device="cpu"),
    )


@register
class FPL(FedProto):
    name = "fpl"
    summary = (
        "FPL (Huang et al., 2023): FedAvg + FINCH cluster prototypes, contrastive (CPCL) and unbiased-prototype losses"
    )
    Config = FPLConfig

    def init_server_state(self, seed: int) -> State:
        state = super().init_server_state(seed)
        state["cluster_classes"] = torch.zeros(0, dtype=torch.int64, device=self.device)
        state["cluster_prototypes"] = torch.zeros(0, self.dim, device=self.device)
        return state

    def broadcast(self, server_state: State) -> Payload:
        payload = super().broadcast(server_state)
        return Payload(
            {
                **payload.arrays,
                "cluster_classes": server_state["cluster_classes"].cpu().numpy(),
                "cluster_prototypes": server_state["cluster_prototypes"].cpu().numpy(),
            },
            {"method": self.name},
        )

    def broadcast_spec(self) -> PayloadSpec:
        spec = super().broadcast_spec()
        return PayloadSpec(
            self.name,
            {
                **spec.arrays,
                "cluster_classes": ArraySpec((None,), "int64", class_bound=self.task.num_classes),
                "cluster_prototypes": ArraySpec((None, self.dim)),
            },
            same_length=spec.same_length,
        )

    def context(self, received: Payload) -> Any:
        table, mask = super().context(received)
        cluster_classes = torch.from_numpy(received["cluster_classes"]).to(self.device)
        clustered = torch.zeros_like(mask)
        clustered[cluster_classes] = True
        clusters = torch.from_numpy(received["cluster_prototypes"]).float().to(self.device)
        return table, mask & clustered, cluster_classes, clusters

    def prototype_loss(self, z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, context: Any) -> torch.Tensor:
        table, mask, cluster_classes, clusters = context
        has = take(mask, y).to(z.dtype) * weight
        loss = self.config.proto_weight * alignment_loss(z, take(table, y), has)
        if self.config.cpcl_weight and len(cluster_classes):
            loss = loss + self.config.cpcl_weight * cpcl_loss(
                z, y, cluster_classes, clusters, self.config.temperature, has
            )
        return loss

    def server_prototypes(self, server_state: State, replies: list[Payload]):
        cluster_cls, clusters, classes, unbiased = cluster_prototypes(
            replies, self.dim, self.config.finch_level, self.presence_threshold
        )
        state = {
            "classes": classes.to(self.device),
            "prototypes": unbiased.to(self.device),
            "cluster_classes": cluster_cls.to(self.device),
            "cluster_prototypes": clusters.to(self.device),
        }
        return state, {"global_classes": float(len(classes)), "cluster_prototypes": float(len(clusters))}
