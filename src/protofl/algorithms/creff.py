"""CReFF (Shang et al., IJCAI 2022): classifier re-training with federated features.

Clients run FedAvg local training and, before it (on the model as received, as in CReFF), upload for
each class they hold the gradient of the mean cross-entropy w.r.t. the linear head ``(W, b)`` on
their real features ``z = φ(x)`` (no gradient into φ). The server averages the models (FedAvg),
averages the per-class head gradients, learns ``M`` federated features per class whose head
gradient matches them (gradient matching, :mod:`protofl.gradient_matching`), and re-trains a linear
head on those features; the re-trained head goes into the global model.

Choices (see :class:`CReFFConfig`):

- The server's synthetic head gradients are taken at the head the clients received this round (the
  one their target gradients were computed at).
- The federated features are initialised N(0, 1) once (from the run seed) and persist across rounds
  in the server state, as in CReFF; only classes that have received a client gradient at least once
  are matched and used for re-training (never-matched features are pure noise).
- ``retrain_init="scratch"`` (default, as CReFF) re-trains a freshly initialised head every round
  (``U(−1/√d, 1/√d)``, PyTorch's ``nn.Linear`` rule, from a generator seeded by (seed, round));
  ``"aggregated"`` warm-starts from the FedAvg head.
- ``head_to_clients="retrained"`` (default) broadcasts the global model with the re-trained head;
  ``"aggregated"`` broadcasts the FedAvg head and uses the re-trained one for global evaluation only.
- The server state holds plain tensors only (features, flags, seed and round counter), so it
  checkpoints and resumes exactly.

**Private CReFF** (``[privacy] mechanism = "dp-gradients"``): everything a client uploads is protected
under one ledger (:class:`~protofl.privacy.layer.ClassGradientLayer`). The per-class head gradients are
the noisy release of :mod:`protofl.privacy.class_gradients` (every example's head gradient clipped to
``upload_clip``, summed per class, every class with a noisy count, at the model as received); the model is
trained by ``steps_per_round`` DP-SGD steps (Poisson rate ``batch_size / n``, clip ``privacy.clip_norm``)
instead of ``local_epochs``, and uploaded without its sample count (the server averages models uniformly).
Every example of a class enters its gradient (``grad_samples = 0``: a fixed-size subsample would let one
example displace another). The server uses a client's class row where its noisy count reaches the presence
threshold ``max(1, 2σ_n)`` (``gradient_weighting = "mean"``) or weighs it by that count clamped at 0
(``"count"``): post-processing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from protofl.algorithms.base import (
    ClientData,
    LocalOutcome,
    Params,
    State,
    arrays_to_params,
    compute_features,
    params_to_arrays,
    register,
)
from protofl.algorithms.fedavg import FedAvg, FedAvgConfig, weighted_average
from protofl.config import ConfigError, check, check_choice
from protofl.gradient_matching import (
    DISTANCES,
    head_gradients,
    match_features,
)
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.class_gradients import head_contributions
from protofl.privacy.dpsgd import dp_sgd_steps, materialised_clipped_sum
from protofl.privacy.layer import NEXT_ROUND_KEY, ClassGradientLayer
from protofl.seeds import derive_seed as _seed  # noqa: F401 (also imported by fedtgp, fedhpro)
from protofl.training import minibatches

HEAD_W, HEAD_B = "head.weight", "head.bias"


@dataclasses.dataclass(frozen=True)
class CReFFConfig(FedAvgConfig):
    #: M, federated features per class (CReFF: 100).
    features_per_class: int = 100
    #: Gradient-matching steps per round, SGD learning rate and momentum on the features (CReFF: 100, 0.1).
    match_steps: int = 100
    match_lr: float = 0.1
    match_momentum: float = 0.0
    #: A name in :data:`protofl.gradient_matching.DISTANCES`.
    match_distance: str = "layerwise-cos"
    #: How the server averages client head gradients per class: plain ``mean`` or ``count``-weighted.
    gradient_weighting: str = "mean"
    #: Real samples per class a client uses for its head gradient (drawn with its generator); 0 = all.
    grad_samples: int = 100
    #: Head re-training on the federated features: epochs (CReFF: 300), SGD lr (0.01), batch (50).
    retrain_epochs: int = 300
    retrain_lr: float = 0.01
    retrain_batch_size: int = 50
    retrain_momentum: float = 0.0
    #: ``scratch`` (CReFF) or ``aggregated`` (warm start from the FedAvg head).
    retrain_init: str = "scratch"
    #: Head the clients receive: ``retrained`` or ``aggregated``.
    head_to_clients: str = "retrained"
    #: Private runs (``privacy.mechanism = "dp-gradients"``): DP-SGD steps per round (replacing
    #: ``local_epochs``; SGD with ``lr``, ``momentum``, ``weight_decay``).
    steps_per_round: int = 20
    #: Private runs: the share of epsilon calibrated for the per-class gradient uploads (the DP-SGD steps
    #: get the rest, composed by the accountant).
    upload_fraction: float = 0.5
    #: Private runs: L2 bound C of each example's contribution to the uploaded per-class gradients.
    upload_clip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.features_per_class >= 1, "features_per_class", f"must be >= 1, got {self.features_per_class}")
        check(self.match_steps >= 0, "match_steps", f"must be >= 0, got {self.match_steps}")
        check(self.match_lr > 0, "match_lr", f"must be > 0, got {self.match_lr}")
        check(0 <= self.match_momentum < 1, "match_momentum", f"must be in [0, 1), got {self.match_momentum}")
        check_choice(self.match_distance, DISTANCES, "match_distance")
        check_choice(self.gradient_weighting, ("mean", "count"), "gradient_weighting")
        check(self.grad_samples >= 0, "grad_samples", f"must be >= 0, got {self.grad_samples}")
        check(self.retrain_epochs >= 0, "retrain_epochs", f"must be >= 0, got {self.retrain_epochs}")
        check(self.retrain_lr > 0, "retrain_lr", f"must be > 0, got {self.retrain_lr}")
        check(self.retrain_batch_size >= 1, "retrain_batch_size", f"must be >= 1, got {self.retrain_batch_size}")
        check(0 <= self.retrain_momentum < 1, "retrain_momentum", f"must be in [0, 1), got {self.retrain_momentum}")
        check_choice(self.retrain_init, ("scratch", "aggregated"), "retrain_init")
        check_choice(self.head_to_clients, ("retrained", "aggregated"), "head_to_clients")
        check(self.steps_per_round >= 1, "steps_per_round", f"must be >= 1, got {self.steps_per_round}")
        check(0 < self.upload_fraction < 1, "upload_fraction", f"must be in (0, 1), got {self.upload_fraction}")
        check(0 < self.upload_clip < float("inf"), "upload_clip", f"must be finite and > 0, got {self.upload_clip}")


def upload_weights(counts, weighting: str, min_count: float = 1.0) -> np.ndarray:
    """The weight of each uploaded class row in a per-class average: ``count``, its count clamped at 0;
    ``mean``, 1 where its count is at least ``min_count``, else 0. Exact counts are at least 1, so with
    ``min_count = 1`` these are the counts and the ones; noisy counts (a private upload covers every class)
    make this post-processing, with ``min_count`` the presence threshold."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.maximum(counts, 0.0) if weighting == "count" else (counts >= min_count).astype(np.float64)


def aggregate_head_gradients(
    replies: list[Payload], weighting: str = "mean", min_count: float = 1.0, device: Any = "cpu"
) -> dict[int, list[torch.Tensor]]:
    """Per class, the mean (``mean``) or count-weighted mean (``count``) of the clients' ``[dW, db]`` on
    ``device`` (weights: :func:`upload_weights`; a class whose weights are all 0 gets no target)."""
    sums: dict[int, list] = {}
    for r in replies:
        weights = upload_weights(r["grad_counts"], weighting, min_count)
        for c, gw, gb, w in zip(r["grad_classes"], r["grad_weight"], r["grad_bias"], weights):
            if w <= 0:
                continue
            w = float(w)
            acc = sums.setdefault(int(c), [0.0, 0.0, 0.0])
            acc[0] = acc[0] + w * torch.from_numpy(np.array(gw, dtype=np.float32)).to(device)
            acc[1] = acc[1] + w * torch.from_numpy(np.array(gb, dtype=np.float32)).to(device)
            acc[2] += w
    return {c: [acc[0] / acc[2], acc[1] / acc[2]] for c, acc in sorted(sums.items())}


def retrain_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Minibatch SGD on ``mean CE(W f + b, y)`` over shuffled (``generator``) batches; the gradient
    is the closed form of :func:`head_gradients`. Returns the head and its final mean loss on all features."""
    w, b = weight.detach().clone(), bias.detach().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    n = len(labels)
    with torch.no_grad():
        for _ in range(epochs):
            for index in minibatches(n, batch_size, generator):
                f, y = features[index], labels[index]
                dw, db = head_gradients(w, b, f, y)
                if momentum:
                    vw.mul_(momentum).add_(dw)
                    vb.mul_(momentum).add_(db)
                    dw, db = vw, vb
                w.sub_(lr * dw)
                b.sub_(lr * db)
        logits = features @ w.t() + b
        last = float(torch.nn.functional.cross_entropy(logits, labels)) if n else float("nan")
    return w, b, last


@register
class CReFF(FedAvg):
    name = "creff"
    summary = "CReFF (Shang et al., 2022): FedAvg + classifier re-training on gradient-matched federated features"
    Config = CReFFConfig
    #: ``dp-gradients``: DP-SGD local training plus noisy per-class gradient uploads (module docstring).
    privacy_mechanisms = ("dp-gradients",)
    #: Whether an upload carries the feature gradient next to the head gradient (FedHPro).
    uploads_feature_gradient = False

    def __init__(self, config, task, privacy=None):
        super().__init__(config, task, privacy)
        #: The privacy layer of a private run (``None`` without a mechanism).
        self.dp = self.privacy_layer if isinstance(self.privacy_layer, ClassGradientLayer) else None
        if self.dp is not None and config.grad_samples:
            raise ConfigError(
                f"method.grad_samples: must be 0 (every example) under privacy.mechanism = "
                f"{self.privacy.mechanism!r}, got {config.grad_samples}: in a fixed-size subsample one "
                "example can displace another, which doubles the sensitivity the noise is calibrated for"
            )

    @property
    def upload_sigma(self) -> float:
        """σ_u of every per-class gradient upload (private runs)."""
        assert self.dp is not None
        return self.dp.upload_multiplier(self.config.upload_fraction)

    @property
    def presence_threshold(self) -> float:
        """The count from which a client's class row enters a ``mean`` average: 1 with exact counts,
        ``max(1, 2σ_n)`` with the noisy counts of a private upload (σ_n public)."""
        return 1.0 if self.dp is None else max(1.0, 2 * self.dp.count_noise_std(self.upload_sigma))

    @property
    def _dims(self) -> tuple[int, int]:
        head = self.model.head
        return head.out_features, head.in_features

    # -- state -------------------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        num_classes, d = self._dims
        generator = torch.Generator(device="cpu").manual_seed(
            _seed(seed, 0xC8EFF)
        )  # CPU draws: the same on every device
        params = self.initial_params(seed)
        return {
            "params": params,
            "aggregated_head": {"weight": params[HEAD_W], "bias": params[HEAD_B]},
            "features": torch.randn(
                num_classes, self.config.features_per_class, d, generator=generator, device="cpu"
            ).to(self.device),
            "feature_matched": torch.zeros(num_classes, dtype=torch.bool, device=self.device),
            "seed": torch.tensor(int(seed), dtype=torch.int64, device=self.device),
            "round": torch.tensor(0, dtype=torch.int64, device=self.device),
        }

    def _client_params(self, server_state: State) -> Params:
        params = dict(server_state["params"])
        if self.config.head_to_clients == "aggregated":
            params[HEAD_W] = server_state["aggregated_head"]["weight"]
            params[HEAD_B] = server_state["aggregated_head"]["bias"]
        return params

    def broadcast(self, server_state: State) -> Payload:
        return Payload(params_to_arrays(self._client_params(server_state)), {"method": self.name})

    def reply_spec(self) -> PayloadSpec:
        num_classes, d = self._dims
        spec = super().reply_spec()
        rows = None if self.dp is None else num_classes  # a private upload covers every class
        arrays = {
            **(spec.arrays if self.dp is None else self._param_specs()),  # no sample count when private
            "grad_classes": ArraySpec((rows,), "int64", class_bound=num_classes, unique=True),
            "grad_weight": ArraySpec((rows, num_classes, d), "float32"),
            "grad_bias": ArraySpec((rows, num_classes), "float32"),
            "grad_counts": ArraySpec((None,), "int64", minimum=1)
            if self.dp is None
            else ArraySpec((num_classes,), "float64"),
        }
        return PayloadSpec(self.name, arrays, same_length=("grad_classes", "grad_weight", "grad_bias", "grad_counts"))

    # -- client ------------------------------------------------------------------------------------
    def class_samples(self, data: ClientData, generator: torch.Generator):
        """For each class held: ``(class, index of up to grad_samples samples drawn with generator, count)``."""
        for c in torch.unique(data.y_train).tolist():
            index = torch.nonzero(data.y_train == c).flatten()
            count = len(index)
            if self.config.grad_samples and count > self.config.grad_samples:
                index = index[
                    torch.randperm(count, generator=generator, device=generator.device)[: self.config.grad_samples]
                ]
            yield c, index, count

    def distill_inputs(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The real inputs a client's gradients are computed on (CReFF: as they are)."""
        return x

    def client_gradients(self, params: Params, data: ClientData, generator: torch.Generator) -> dict[str, np.ndarray]:
        """Per class held: ``[dW, db]`` of the mean CE of the head on real features (up to
        ``grad_samples`` of them, drawn with ``generator``), and the class's sample count."""
        rows = []
        with torch.no_grad():
            for c, index, count in self.class_samples(data, generator):
                z = self.forward(params, self.distill_inputs(data.x_train[index], generator))[0]
                rows.append((c, count, z, head_gradients(params[HEAD_W], params[HEAD_B], z, c)))
        return self.gradient_arrays(params, rows)

    def gradient_arrays(self, params: Params, rows: list) -> dict[str, np.ndarray]:
        num_classes, d = self._dims
        if not rows:
            return {
                "grad_classes": np.zeros(0, np.int64),
                "grad_counts": np.zeros(0, np.int64),
                "grad_weight": np.zeros((0, num_classes, d), np.float32),
                "grad_bias": np.zeros((0, num_classes), np.float32),
            }
        return {
            "grad_classes": np.array([r[0] for r in rows], dtype=np.int64),
            "grad_counts": np.array([r[1] for r in rows], dtype=np.int64),
            "grad_weight": np.stack([r[3][0].cpu().numpy() for r in rows])
            .astype(np.float32)
            .reshape(-1, num_classes, d),
            "grad_bias": np.stack([r[3][1].cpu().numpy() for r in rows]).astype(np.float32).reshape(-1, num_classes),
        }

    def before_training(
        self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator
    ) -> dict[str, np.ndarray]:
        """Gradients on the model as received (before local training, with the client's generator), as in CReFF."""
        return self.client_gradients(arrays_to_params(received, self.device), data, generator)

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        if self.dp is None:
            return super().client_step(client_state, data, received, generator)
        return self.private_client_step(client_state, data, received, generator)

    def private_client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        """A private round (module docstring): the round's events are spent from the client's ledger,
        then the noisy per-class gradients are taken at the received model, then DP-SGD trains it."""
        c, dp = self.config, self.dp
        assert dp is not None
        who = f"client {data.client_id}"
        if not bool(torch.isfinite(data.x_train).all()):
            raise ValueError(f"{who}: its inputs contain NaN or infinite values; nothing was released")
        if data.num_train < c.batch_size:
            raise ValueError(
                f"{who}: {data.num_train} training examples, fewer than method.batch_size={c.batch_size}; "
                "nothing was released"
            )
        rate = c.batch_size / data.num_train
        upload_sigma = self.upload_sigma
        step_sigma = dp.step_multiplier(rate, c.steps_per_round, upload_sigma)
        events = dp.round_events(rate, step_sigma, c.steps_per_round, upload_sigma)
        ledger = dp.spend(client_state, events, who)
        start = self.received_params(received)
        contributions = self.upload_contributions(start, data, generator)
        # the release runs on the CPU, where its noise is drawn
        release = dp.release(contributions.cpu(), data.y_train.cpu(), c.upload_clip, upload_sigma, generator)
        context = self.context(received)
        params = {k: v.detach().clone() for k, v in start.items()}
        optimizer = torch.optim.SGD(list(params.values()), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

        def example_loss(p, xi, yi):
            return self.loss(p, xi[None], yi[None], torch.ones(1, device=self.device), context)

        metrics = dp_sgd_steps(
            params,
            lambda index: materialised_clipped_sum(
                example_loss, params, data.x_train[index], data.y_train[index], dp.clip_norm
            ),
            data.num_train,
            rate,
            step_sigma,
            dp.clip_norm,
            c.steps_per_round,
            optimizer,
            generator,
        )
        metrics["upload_clipped_fraction"] = release.clipped_fraction
        state = {**client_state, LEDGER_KEY: ledger, NEXT_ROUND_KEY: dp.next_round_state(events)}
        arrays = {**params_to_arrays({k: v.detach() for k, v in params.items()}), **self.release_arrays(release)}
        return state, Payload(arrays, {"method": self.name}), metrics

    def upload_contributions(self, params: Params, data: ClientData, generator: torch.Generator) -> torch.Tensor:
        """Every train example's contribution to the uploaded gradients (one row each, in the order of
        ``data.y_train``), at ``params`` (the received model), on the inputs :meth:`distill_inputs` gives."""
        with torch.no_grad():
            z = compute_features(self, params, self.distill_inputs(data.x_train, generator))
        return head_contributions(params[HEAD_W], params[HEAD_B], z, data.y_train, self.uploads_feature_gradient)

    def release_arrays(self, release) -> dict[str, np.ndarray]:
        """The reply arrays of a private upload (every class, noisy means and counts)."""
        num_classes, d = self._dims
        means = release.means
        arrays = {
            "grad_classes": np.arange(num_classes, dtype=np.int64),
            "grad_counts": release.counts.cpu().numpy().astype(np.float64),
            "grad_weight": means[:, : num_classes * d]
            .reshape(num_classes, num_classes, d)
            .cpu()
            .numpy()
            .astype(np.float32),
            "grad_bias": means[:, num_classes * d : num_classes * d + num_classes].cpu().numpy().astype(np.float32),
        }
        if self.uploads_feature_gradient:
            arrays["feature_grad"] = means[:, num_classes * (d + 1) :].cpu().numpy().astype(np.float32)
        return arrays

    def batched_unsupported(self) -> str | None:
        if self.dp is not None:
            return (
                "a private CReFF or FedHPro round runs DP-SGD steps on Poisson samples of each client, which "
                "the batched program (minibatch epochs) does not"
            )
        if type(self).client_step is CReFF.client_step:
            return None  # the override above only routes private rounds
        return super().batched_unsupported()

    def privacy_report(self, client_states, all_accountants: bool = True):
        if self.dp is None:
            return super().privacy_report(client_states, all_accountants)
        sigma = self.upload_sigma
        return self.dp.report(
            client_states.values(),
            all_accountants,
            upload_noise_multiplier=sigma,
            upload_count_noise_multiplier=self.dp.count_noise_std(sigma),
            upload_clip=self.config.upload_clip,
            upload_fraction=self.config.upload_fraction,
        )

    def reply(self, outcome: LocalOutcome):
        """FedAvg's model upload plus the gradients taken before training."""
        client_state, reply, metrics = super().reply(outcome)
        return client_state, Payload({**reply.arrays, **outcome.before}, {"method": self.name}), metrics

    # -- server ------------------------------------------------------------------------------------
    def server_step(self, server_state: State, replies: list[Payload]):
        cfg = self.config
        round_index = int(server_state["round"]) + 1
        # The head the clients received (and computed their gradients at).
        sent = self._client_params(server_state)
        models = [arrays_to_params(r, self.device) for r in replies]
        # A private reply carries no sample count: the models are averaged uniformly.
        params = weighted_average(models, [1 if self.dp else int(r["num_samples"]) for r in replies])
        aggregated_head = {"weight": params[HEAD_W], "bias": params[HEAD_B]}

        targets = aggregate_head_gradients(replies, cfg.gradient_weighting, self.presence_threshold, self.device)
        features = server_state["features"]
        current = {c: features[c] for c in range(len(features))}
        matched, match_metrics = match_features(
            current,
            targets,
            sent[HEAD_W],
            sent[HEAD_B],
            cfg.match_distance,
            cfg.match_steps,
            cfg.match_lr,
            cfg.match_momentum,
        )
        features = torch.stack([matched[c] for c in range(len(features))])
        flags = server_state["feature_matched"].clone()
        for c in targets:
            flags[c] = True

        generator = torch.Generator(device="cpu").manual_seed(_seed(int(server_state["seed"]), round_index, 0xC8EFF))
        num_classes, d = self._dims
        if cfg.retrain_init == "scratch" and bool(flags.any()):
            bound = 1.0 / d**0.5
            w0 = ((torch.rand(num_classes, d, generator=generator, device="cpu") * 2 - 1) * bound).to(self.device)
            b0 = ((torch.rand(num_classes, generator=generator, device="cpu") * 2 - 1) * bound).to(self.device)
        else:
            w0, b0 = aggregated_head["weight"], aggregated_head["bias"]
        used = torch.nonzero(flags).flatten()
        m = features.shape[1]
        train_f = features[used].reshape(-1, d)
        train_y = used.repeat_interleave(m)
        w, b, retrain_loss = retrain_head(
            train_f,
            train_y,
            w0,
            b0,
            cfg.retrain_epochs,
            cfg.retrain_lr,
            cfg.retrain_batch_size,
            cfg.retrain_momentum,
            generator,
        )
        params = {**params, HEAD_W: w.to(params[HEAD_W].dtype), HEAD_B: b.to(params[HEAD_B].dtype)}
        state = {
            "params": params,
            "aggregated_head": aggregated_head,
            "features": features,
            "feature_matched": flags,
            "seed": server_state["seed"],
            "round": torch.tensor(round_index, dtype=torch.int64, device=self.device),
        }
        metrics = {**match_metrics, "retrain_loss": retrain_loss, "classes_matched": float(len(targets))}
        return state, metrics
