"""FedTGP (Zhang et al., AAAI 2024): trainable global prototypes with an adaptive-margin contrast.

Clients train with FedProto's loss ``CE + λ MSE(z, P_y)`` (λ = 1) and upload their class means. The
server holds a prototype generator ``P = Linear(ReLU(Linear(E)))`` over a class embedding
``E ∈ R^{C×d}`` and trains it for ``server_epochs`` on the uploaded client prototypes ``p`` (class ``y``)
to minimise the cross-entropy of the logits ``−(‖p − P_c‖ + δ·1[c = y])``, with the adaptive margin
``δ = min(max_c gap_c, margin_cap)``, ``gap_c`` the smallest distance from class ``c``'s average uploaded
prototype to another class's. Inference: the nearest ``P`` (``personal_proto_acc``).

Choices: the generator's tensors live in the server state and persist across rounds (initialised from
the run seed: ``E`` ~ N(0, 1), linear layers U(−1/√d, 1/√d), PyTorch's rules); the broadcast carries
``P_c`` for every class uploaded at least once; δ = 0 while fewer than two classes have been uploaded
in a round; the margin uses the unweighted mean of the client prototypes of each class. Under an add/remove
prototype release (every class uploaded, with noisy counts) the server uses the uploads whose noisy count
passes the presence threshold (:attr:`~protofl.algorithms.fedproto.FedProto.presence_threshold`). The reference
code trains the generator for 1000 server epochs; our default is 100 (``server_epochs``).

The server metric ``generator_live_units`` is the share of the generator's hidden ReLU units that are
positive for at least one class. At 0 every class gets the same prototype (``fc2``'s bias) and
nearest-prototype inference puts every example in one class. Too large a ``server_lr`` does this where the
features are wide: the class embeddings' squared norm (about d) scales each step of ``fc1``, so on the
1,280-d EfficientNet-Lite0 embeddings of the ``linear`` model the default 0.1 leaves no unit alive after
one round while 0.01 keeps them (d = 128 trains at 0.1). A round that ends with under 1 % of the units live
logs a warning that says so.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from protofl.algorithms.base import State, register
from protofl.algorithms.creff import _seed
from protofl.algorithms.fedproto import FedProto, FedProtoConfig, aggregate_prototypes, present_rows
from protofl.config import check, check_choice
from protofl.payload import Payload
from protofl.training import minibatches

GENERATOR_KEYS = ("embedding", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


log = logging.getLogger("protofl.fedtgp")


@dataclasses.dataclass(frozen=True)
class FedTGPConfig(FedProtoConfig):
    #: Server training of the prototype generator: epochs over the uploaded prototypes, optimiser,
    #: learning rate and batch size.
    server_epochs: int = 100
    server_optimizer: str = "sgd"
    server_lr: float = 0.1
    server_batch_size: int = 32
    #: Cap of the adaptive margin δ (FedTGP: 100).
    margin_cap: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.server_epochs >= 0, "server_epochs", f"must be >= 0, got {self.server_epochs}")
        check_choice(self.server_optimizer, ("sgd", "adam"), "server_optimizer")
        check(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        check(self.server_batch_size >= 1, "server_batch_size", f"must be >= 1, got {self.server_batch_size}")
        check(self.margin_cap >= 0, "margin_cap", f"must be >= 0, got {self.margin_cap}")


def adaptive_margin(class_means: torch.Tensor, cap: float) -> float:
    """``min(max_c min_{c'≠c} ‖m_c − m_{c'}‖, cap)`` over the rows of ``class_means`` (0 for fewer than 2)."""
    if len(class_means) < 2:
        return 0.0
    distance = torch.cdist(class_means.double(), class_means.double())
    distance.fill_diagonal_(float("inf"))
    return float(min(float(distance.min(1).values.max()), cap))


def generate_prototypes(generator: dict[str, torch.Tensor]) -> torch.Tensor:
    """``P = fc2(relu(fc1(E)))`` for every class."""
    hidden = torch.relu(generator["embedding"] @ generator["fc1.weight"].t() + generator["fc1.bias"])
    return hidden @ generator["fc2.weight"].t() + generator["fc2.bias"]


#: Below this share of live hidden units a round's end logs a warning: with none (or a handful of 1,280) the
#: global prototypes coincide or lie on a line.
LIVE_UNITS_WARNING = 0.01


def live_units(generator: dict[str, torch.Tensor]) -> float:
    """Share of the hidden ReLU units of ``P = fc2(relu(fc1(E)))`` positive for at least one class."""
    hidden = generator["embedding"] @ generator["fc1.weight"].t() + generator["fc1.bias"]
    return float((hidden > 0).any(0).float().mean())


def margin_loss(prototypes: torch.Tensor, labels: torch.Tensor, generated: torch.Tensor, margin: float) -> torch.Tensor:
    """Cross-entropy of the logits ``−(‖p_i − P_c‖ + margin·1[c = y_i])``."""
    logits = -(torch.cdist(prototypes, generated) + margin * F.one_hot(labels, generated.shape[0]).to(generated.dtype))
    return F.cross_entropy(logits, labels)


@register
class FedTGP(FedProto):
    name = "fedtgp"
    summary = "FedTGP (Zhang et al., 2024): server-trained global prototypes with an adaptive margin; nearest-prototype inference"
    Config = FedTGPConfig

    def init_server_state(self, seed: int) -> State:
        state = super().init_server_state(seed)
        c, d = self.task.num_classes, self.dim
        g = torch.Generator(device="cpu").manual_seed(_seed(seed, 0x7C9))  # drawn on the CPU: the same on every device
        bound = 1.0 / d**0.5
        state["generator"] = {
            "embedding": torch.randn(c, d, generator=g, device="cpu").to(self.device),
            "fc1.weight": ((torch.rand(d, d, generator=g, device="cpu") * 2 - 1) * bound).to(self.device),
            "fc1.bias": ((torch.rand(d, generator=g, device="cpu") * 2 - 1) * bound).to(self.device),
            "fc2.weight": ((torch.rand(d, d, generator=g, device="cpu") * 2 - 1) * bound).to(self.device),
            "fc2.bias": ((torch.rand(d, generator=g, device="cpu") * 2 - 1) * bound).to(self.device),
        }
        state["seen"] = torch.zeros(c, dtype=torch.bool, device=self.device)
        state["seed"] = torch.tensor(int(seed), dtype=torch.int64, device=self.device)
        state["round"] = torch.tensor(0, dtype=torch.int64, device=self.device)
        return state

    def server_prototypes(self, server_state: State, replies: list[Payload]):
        cfg = self.config
        threshold = self.presence_threshold
        labels, uploaded = present_rows(replies, threshold)
        labels, uploaded = labels.to(self.device), uploaded.float().to(self.device)
        _, means = aggregate_prototypes(replies, self.task.num_classes, self.dim, weighted=False, min_count=threshold)
        margin = adaptive_margin(means, cfg.margin_cap)
        round_index = int(server_state["round"]) + 1
        shuffle = torch.Generator(device="cpu").manual_seed(_seed(int(server_state["seed"]), round_index, 0x7C9))

        leaves = {k: server_state["generator"][k].detach().clone().requires_grad_(True) for k in GENERATOR_KEYS}
        params = list(leaves.values())
        optimizer = (
            torch.optim.Adam(params, lr=cfg.server_lr)
            if cfg.server_optimizer == "adam"
            else torch.optim.SGD(params, lr=cfg.server_lr)
        )
        first = last = float("nan")
        for epoch in range(cfg.server_epochs):
            for step, index in enumerate(minibatches(len(labels), cfg.server_batch_size, shuffle)):
                loss = margin_loss(uploaded[index], labels[index], generate_prototypes(leaves), margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if epoch == 0 and step == 0:
                    first = float(loss.detach())
        with torch.no_grad():
            generated = generate_prototypes(leaves)
            if len(labels):
                last = float(margin_loss(uploaded, labels, generated, margin))
        seen = server_state["seen"].clone()
        seen[labels] = True
        classes = torch.nonzero(seen).flatten()
        state = {
            "classes": classes,
            "prototypes": generated[classes].detach().clone(),
            "generator": {k: v.detach() for k, v in leaves.items()},
            "seen": seen,
            "seed": server_state["seed"],
            "round": torch.tensor(round_index, dtype=torch.int64, device=self.device),
        }
        live = live_units(state["generator"])
        if live < LIVE_UNITS_WARNING and len(classes) > 1:
            log.warning(
                "round %d: FedTGP's prototype generator has %.1f%% of its hidden units live, so the classes' global "
                "prototypes (nearly) coincide; a smaller method.server_lr keeps it training (0.01 did on "
                "1,280-d embeddings)",
                round_index,
                100 * live,
            )
        return state, {
            "global_classes": float(len(classes)),
            "margin": margin,
            "server_loss_first": first,
            "server_loss_last": last,
            "generator_live_units": live,
        }
