"""DP-FedAvg with record-level DP per client: FedAvg whose local training is DP-SGD.

Each client runs ``steps_per_round`` DP-SGD steps on the broadcast model (``[privacy] mechanism =
"dp-sgd"``; Poisson sampling at q = batch_size / n_k, each example's gradient clipped to
C = ``privacy.clip_norm`` (by ghost clipping where every trainable layer is an
``nn.Linear``, as on embeddings: :mod:`protofl.privacy.ghost`; otherwise materialised with ``torch.func``), noise N(0, σ²C²), SGD with
momentum on the noisy gradient) and returns the model; the server averages the models uniformly (n_k is
not released). σ is calibrated per client, before its first step, for all its planned steps at the
target (ε, δ); a client whose next round would exceed its budget stops the run before that round.
The baseline FedHypeVAE is measured against on real embeddings, at the same budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F

from protofl.algorithms.base import (
    ClientData,
    State,
    arrays_to_params,
    params_to_arrays,
    register,
)
from protofl.algorithms.fedavg import FedAvg, FedAvgConfig
from protofl.config import ConfigError, check, check_choice
from protofl.payload import Payload, PayloadSpec
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.dpsgd import (
    add_noise,  # noqa: F401 (kept importable here; every step draws through dpsgd's)
    dp_sgd_steps,
    materialised_clipped_sum,
)
from protofl.privacy.ghost import module_clipped_sum
from protofl.privacy.layer import NEXT_ROUND_KEY, DPSGDLayer


@dataclasses.dataclass(frozen=True)
class DPFedAvgConfig(FedAvgConfig):
    #: DP-SGD steps per round (the privacy settings, clip norm included, are the ``[privacy]`` section's).
    steps_per_round: int = 20
    #: How each example's clipped gradient is computed: ``auto`` (ghost clipping when every trainable layer
    #: is an ``nn.Linear``, else materialised), ``ghost`` (an error if the model has other layers) or
    #: ``materialised`` (``torch.func`` per-example gradients). Same clipping, noise and accounting.
    per_example_grads: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.steps_per_round >= 1, "steps_per_round", f"must be >= 1, got {self.steps_per_round}")
        check_choice(self.per_example_grads, ("auto", "ghost", "materialised"), "per_example_grads")


@register
class DPFedAvg(FedAvg):
    name = "dpfedavg"
    summary = "DP-FedAvg: FedAvg with DP-SGD local training, per-client (epsilon, delta) accounting"
    Config = DPFedAvgConfig
    privacy_mechanisms = ("dp-sgd",)
    requires_privacy = True

    def __init__(self, config, task, privacy=None):
        super().__init__(config, task, privacy)
        self.dp = cast(DPSGDLayer, self.privacy_layer)  # validate_privacy made it dp-sgd
        linear_only = all(
            isinstance(m, torch.nn.Linear)
            for m in self.model.modules()
            if any(True for _ in m.parameters(recurse=False))
        )
        if config.per_example_grads == "ghost" and not linear_only:
            raise ConfigError(
                "method.per_example_grads: ghost clipping needs a model whose trainable layers are all "
                "nn.Linear (embedding inputs); use 'auto' or 'materialised'"
            )
        #: The path this run uses (``auto`` resolved), reported in every client's metrics.
        self.gradient_path = "ghost" if config.per_example_grads != "materialised" and linear_only else "materialised"
        self._live = None

    def reply_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, self._param_specs())

    def sigma(self, rate: float) -> float:
        """σ of a client sampled at ``rate``, for every step it takes over the planned releases."""
        return self.dp.noise_multiplier(rate, self.privacy.planned_releases * self.config.steps_per_round)

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        c = self.config
        if not bool(torch.isfinite(data.x_train).all()):
            raise ValueError(
                f"client {data.client_id}: its inputs contain NaN or infinite values; nothing was released"
            )
        if data.num_train < c.batch_size:
            raise ValueError(
                f"client {data.client_id}: {data.num_train} training examples, fewer than method.batch_size="
                f"{c.batch_size}; nothing was released"
            )
        rate = c.batch_size / data.num_train
        sigma = self.sigma(rate)
        clip = self.dp.clip_norm
        round_events = [(self.dp.step_event(rate, sigma), c.steps_per_round)]
        ledger = self.dp.spend(client_state, round_events, f"client {data.client_id}")
        params = {k: v.clone() for k, v in arrays_to_params(received, self.device).items()}
        optimizer = torch.optim.SGD(list(params.values()), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

        def example_loss(p, xi, yi):
            return F.cross_entropy(self.forward(p, xi[None])[1], yi[None])

        def clipped_sum(index):
            x, y = data.x_train[index], data.y_train[index]
            if self.gradient_path == "ghost":
                return self._ghost_clipped_sum(params, x, y)
            return materialised_clipped_sum(example_loss, params, x, y, clip)

        metrics: dict[str, Any] = dp_sgd_steps(
            params, clipped_sum, data.num_train, rate, sigma, clip, c.steps_per_round, optimizer, generator
        )
        # Every round of this client costs the same: announce it, so the next one is checked before it starts.
        state = {LEDGER_KEY: ledger, NEXT_ROUND_KEY: self.dp.next_round_state(round_events)}
        return state, Payload(params_to_arrays(params), {"method": self.name}), metrics

    def _ghost_clipped_sum(self, params, x, y):
        """The clipped gradient sum of a sample by ghost clipping (:data:`~protofl.privacy.dpsgd.ClippedSum`)
        on a live copy of the template model (the forward hooks need real modules), by parameter name in
        the order of ``params``, so that the noise is drawn as on the materialised path."""
        if self._live is None:
            import copy

            self._live = copy.deepcopy(self.model).requires_grad_(True)
        model = self._live
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        summed, norms, example_losses = module_clipped_sum(
            model, lambda: F.cross_entropy(model(x)[1], y, reduction="none"), self.dp.clip_norm
        )
        return {k: summed[k] for k in params}, norms, float(example_losses.mean())

    def server_step(self, server_state: State, replies: list[Payload]):
        models = [arrays_to_params(r, self.device) for r in replies]
        return {"params": {k: torch.stack([m[k] for m in models]).mean(0) for k in models[0]}}, {}


__all__ = ["DPFedAvg", "DPFedAvgConfig"]
