"""FedHPro (2026): federated hyper-prototypes learned by gradient matching (spec: specs/fedhpro.md).

A global model (FedAvg) with CReFF's classifier re-training, plus ``L`` learnable *hyper-prototypes*
(HPs) per class kept on the server, ``H ∈ R^{C×L×d}`` (init N(0, 1) from the run seed).

Client ``k``, each round, on the model ``θ = (φ, W, b)`` and the HPs it receives:

1. *Gradient distillation* (before local training): for each class ``c`` it holds, up to
   ``grad_samples`` real samples, augmented (``distill_augmentation``: ``random-shift``, a random
   translation of up to ``shift_pixels`` pixels with zero padding, label-preserving; the reference uses
   differentiable siamese augmentation), ``z = φ(x)`` without gradient into φ; it uploads CReFF's head
   gradient ``∇_{W,b} mean CE(W z + b, c)`` and the *feature gradient* ``mean_i ∂CE(W z_i + b, c)/∂z_i``.
2. Local training with ``CE + hpcl_weight · HPCL + hpal_weight · HPAL`` (``ẑ = z/‖z‖``):
   ``HPCL = mean_i [log(Σ_c exp(ẑ_i·m_c/τ) + κ_k) − ẑ_i·m_{y_i}/τ]`` with ``m_c`` the mean of the
   normalised HPs of class ``c``; ``κ_k = Σ_{a≠b} ⟨p_a, p_b⟩ / (C−1)²`` over the client's local class
   means ``p_a`` (eval mode, recomputed once per local epoch, no gradient; ``C`` the task's classes);
   ``HPAL = SmoothL1_β(ẑ_i, h̄_{y_i}/‖h̄_{y_i}‖)`` averaged over batch and dimensions, ``h̄_c = mean_l H_{c,l}``.
3. Upload: model, sample count, head and feature gradients per class held, with counts.

Server: FedAvg; CReFF (federated features matched to the mean head gradients, head re-trained on
them); then ``hp_steps`` SGD steps on ``H`` minimising ``Σ_c D(mean_l ∂CE(h*(H_{c,l}), c)/∂H_{c,l}, ḡ_c)``
with the re-trained head ``h*`` and ``ḡ_c`` the clients' mean feature gradient for class ``c``.

Where we chose (all switchable, see :class:`FedHProConfig`):

- The feature gradient is the per-sample gradient averaged over samples on both sides (client and
  server), so they are on one scale; the spec's ``∂ℓ_c/∂z_i`` of the *mean* loss carries an extra
  ``1/n`` that would make the ``mse`` distance depend on the client's sample count.
- HPCL and HPAL use only classes whose HPs have been matched at least once (``hp_classes`` in the
  broadcast): never-matched HPs are random N(0, 1) vectors and carry no information. So round 1 is
  plain CE. Classes absent from every upload keep their previous HPs.
- ``κ_k`` is clamped at 0 (local means of ReLU features have non-negative inner products anyway); a
  negative κ could make the log's argument negative.
- The reference divides HPCL by the batch size once more; we expose ``hpcl_weight`` (default 1)
  instead of hiding such a factor.
- CReFF's head re-training is warm-started from the FedAvg head (``retrain_init="aggregated"``); the
  reference re-trains from scratch (``"scratch"``), which on our models leaves the global head near
  chance for many rounds.
- ``global_signal = "averaged"`` is the ablation "averaged prototypes instead of hyper-prototypes":
  clients also upload their class means and the server uses their count-weighted average (as every
  ``H_{c,l}``) in place of gradient-matched HPs.

Ablations of what carries FedHPro's gain: ``hp_steps = 0`` (the HPs are never matched: they stay their
random initialisation, which HPCL and HPAL still use as class anchors once a class has been uploaded);
``hpcl_normalisation = "batch-size"`` (HPCL at the reference's strength, divided by ``batch_size``);
``hp_matching = "each"`` (every HP's own gradient matched to the class target, as the reference does,
instead of the mean of the L gradients); ``hp_init_scale`` (the standard deviation of H's initialisation).
The matching loss depends on H only through ``W·H``, so it moves H only inside the span of the head's
rows; ``evaluate_global`` logs the consistency inside that span (``global_signal_cos_head_span``) and the
share of the HPs' energy that lies in it (``global_hp_head_span_energy``).

**Private FedHPro** (``[privacy] mechanism = "dp-gradients"``): as private CReFF (see
:mod:`protofl.algorithms.creff`), each example's contribution being its head gradient *and* its feature
gradient, clipped together. HPCL's client margin κ_k is a statistic of the whole train split, which a
per-example clipped gradient cannot bound, so a private run needs ``client_margin = false`` (or
``hpcl_weight = 0``); ``global_signal = "averaged"`` uploads clean class means and is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protofl.algorithms.base import (
    ClientData,
    LocalOutcome,
    Params,
    State,
    compute_features,
    predict_features_and_logits,
    register,
)
from protofl.algorithms.creff import HEAD_B, HEAD_W, CReFF, CReFFConfig, _seed, upload_weights
from protofl.algorithms.fedproto import signal_consistency
from protofl.config import ConfigError, check, check_choice
from protofl.gradient_matching import (
    DISTANCES,
    OPTIMIZERS,
    head_gradients,
    input_gradients,
    match_synthetic,
)
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.prototypes import PrototypeAccumulator
from protofl.training import masked_cross_entropy, masked_mean, train_local

AUGMENTATIONS = ("none", "random-shift")
GLOBAL_SIGNALS = ("hyper", "averaged")
HPCL_NORMALISATIONS = ("mean", "batch-size")
HP_MATCHINGS = ("mean", "each")


@dataclasses.dataclass(frozen=True)
class FedHProConfig(CReFFConfig):
    #: M, CReFF federated features per class (FedHPro reference: 50).
    features_per_class: int = 50
    #: Head re-training epochs on the federated features (FedHPro reference: 100).
    retrain_epochs: int = 100
    #: Warm-start the head re-training from the FedAvg head (the reference re-trains from scratch every
    #: round, which leaves round 1 at chance; measured both ways in docs/benchmarks.md).
    retrain_init: str = "aggregated"
    #: L, hyper-prototypes per class (reference 5).
    hp_per_class: int = 5
    #: Standard deviation of the N(0, s²) initialisation of the hyper-prototypes (small: near-zero anchors).
    hp_init_scale: float = 1.0
    #: S_H, SGD steps (0: the HPs are never matched, they stay their random initialisation), learning rate
    #: and momentum of the HP gradient-matching step (reference 30, 0.1).
    hp_steps: int = 30
    hp_lr: float = 0.1
    hp_momentum: float = 0.0
    #: ``sgd`` (the reference) or ``adam`` (scale-free steps: the input-gradient Jacobian of a small
    #: head is tiny, so SGD at lr 0.1 barely moves the HPs on our small models; see docs/benchmarks.md).
    hp_optimizer: str = "sgd"
    #: Distance of the HP step (a name in protofl.gradient_matching.DISTANCES; the reference code runs
    #: ``coordinate``, the paper's description reads as ``cos``).
    hp_distance: str = "cos"
    #: How the server averages the clients' feature gradients per class: ``mean`` or ``count``-weighted.
    feature_gradient_weighting: str = "mean"
    #: What the HP step matches to a class's target: ``mean`` (the mean of its L HPs' gradients) or
    #: ``each`` (every HP's own gradient, the distances summed, as the reference code does).
    hp_matching: str = "mean"
    #: Weight of HPCL (0 switches it off) and its temperature τ (reference 0.05).
    hpcl_weight: float = 1.0
    temperature: float = 0.05
    #: HPCL over a batch: ``mean`` (the batch mean) or ``batch-size`` (the mean divided by batch_size once
    #: more, the reference's strength).
    hpcl_normalisation: str = "mean"
    #: The client-specific margin κ_k in HPCL (false: κ = 0).
    client_margin: bool = True
    #: Weight of HPAL (0 switches it off) and SmoothL1's β.
    hpal_weight: float = 1.0
    hpal_beta: float = 1.0
    #: Augmentation of the real samples in gradient distillation: ``random-shift`` (images) or ``none``.
    distill_augmentation: str = "random-shift"
    shift_pixels: int = 2
    #: ``hyper`` (FedHPro) or ``averaged`` (ablation: averaged class means replace the HPs).
    global_signal: str = "hyper"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.hp_per_class >= 1, "hp_per_class", f"must be >= 1, got {self.hp_per_class}")
        check(
            0 < self.hp_init_scale < float("inf"), "hp_init_scale", f"must be finite and > 0, got {self.hp_init_scale}"
        )
        check_choice(self.hp_matching, HP_MATCHINGS, "hp_matching")
        check_choice(self.hpcl_normalisation, HPCL_NORMALISATIONS, "hpcl_normalisation")
        check(self.hp_steps >= 0, "hp_steps", f"must be >= 0, got {self.hp_steps}")
        check(self.hp_lr > 0, "hp_lr", f"must be > 0, got {self.hp_lr}")
        check(0 <= self.hp_momentum < 1, "hp_momentum", f"must be in [0, 1), got {self.hp_momentum}")
        check_choice(self.hp_distance, DISTANCES, "hp_distance")
        check_choice(self.hp_optimizer, OPTIMIZERS, "hp_optimizer")
        check_choice(self.feature_gradient_weighting, ("mean", "count"), "feature_gradient_weighting")
        check(self.hpcl_weight >= 0, "hpcl_weight", f"must be >= 0, got {self.hpcl_weight}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.hpal_weight >= 0, "hpal_weight", f"must be >= 0, got {self.hpal_weight}")
        check(self.hpal_beta > 0, "hpal_beta", f"must be > 0, got {self.hpal_beta}")
        check_choice(self.distill_augmentation, AUGMENTATIONS, "distill_augmentation")
        check(self.shift_pixels >= 1, "shift_pixels", f"must be >= 1, got {self.shift_pixels}")
        check_choice(self.global_signal, GLOBAL_SIGNALS, "global_signal")


# -- the losses and the margin, as functions of tensors ------------------------------------------------
def client_margin(class_means: torch.Tensor, num_classes: int) -> float:
    """``κ = Σ_{a≠b} ⟨p_a, p_b⟩ / (C−1)²`` over the rows ``p_a`` of ``class_means`` (the client's local
    class means), clamped at 0."""
    if num_classes < 2 or len(class_means) < 2:
        return 0.0
    gram = class_means @ class_means.t()
    off_diagonal = gram.sum() - gram.diagonal().sum()
    return max(float(off_diagonal) / (num_classes - 1) ** 2, 0.0)


def hpcl_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    class_summaries: torch.Tensor,
    temperature: float,
    margin: float = 0.0,
    classes: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_i [log(Σ_c exp(ẑ_i·m_c/τ) + κ) − ẑ_i·m_{y_i}/τ]``, weighted by ``weight`` (default: every
    sample counts). ``class_summaries`` holds ``m_c`` (rows) for the classes ``classes`` (default
    ``0..n−1``); every ``y_i`` of non-zero weight must be among them."""
    classes = torch.arange(len(class_summaries), device=class_summaries.device) if classes is None else classes
    weight = torch.ones(len(y), dtype=z.dtype, device=z.device) if weight is None else weight
    logits = F.normalize(z, dim=-1) @ class_summaries.t() / temperature
    positive = (logits * (classes[None, :] == y[:, None]).to(logits.dtype)).sum(-1)
    if margin:
        # log(Σ exp(l) + κ) = logsumexp over the logits and log κ
        log_sum = torch.logsumexp(torch.cat([logits, torch.full_like(logits[:, :1], float(np.log(margin)))], -1), -1)
    else:
        log_sum = torch.logsumexp(logits, -1)
    return masked_mean(log_sum - positive, weight)


def hpal_loss(
    z: torch.Tensor, targets: torch.Tensor, beta: float = 1.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """SmoothL1 (``beta``) between ``ẑ_i`` and the normalised target rows, averaged over dimensions and
    over the samples (weighted by ``weight``, default: every sample counts)."""
    weight = torch.ones(len(z), dtype=z.dtype, device=z.device) if weight is None else weight
    per_sample = F.smooth_l1_loss(
        F.normalize(z, dim=-1), F.normalize(targets, dim=-1), beta=beta, reduction="none"
    ).mean(-1)
    return masked_mean(per_sample, weight)


def hp_summaries(hyper_prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, h̄)`` per class from ``H`` (C×L×d): the mean of the normalised HPs and the mean HP."""
    return F.normalize(hyper_prototypes, dim=2).mean(1), hyper_prototypes.mean(1)


def head_span_projector(weight: torch.Tensor) -> torch.Tensor:
    """The (d×d) orthogonal projector onto the span of the head's rows (``weight``: C×d): the only
    directions of the feature space the head, and so the HP matching step, can see."""
    _, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    v = vh[s > s.max() * max(weight.shape) * torch.finfo(torch.float64).eps]
    return (v.t() @ v).to(weight.dtype)


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (N, C, H, W) by an independent random offset in ``[−pixels, pixels]`` on
    each axis, filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=generator, device=generator.device).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def aggregate_vectors(
    classes_list, vectors_list, counts_list, num_classes: int, dim: int, weighting: str, min_count: float = 1.0
):
    """Per class, the mean (``mean``) or count-weighted mean (``count``) of per-class vectors (weights:
    :func:`~protofl.algorithms.creff.upload_weights`; a class whose weights are all 0 is left out)."""
    acc = PrototypeAccumulator(num_classes, dim, dtype=torch.float64, device="cpu")
    for classes, vectors, counts in zip(classes_list, vectors_list, counts_list):
        c = torch.from_numpy(np.asarray(classes))
        weights = torch.from_numpy(upload_weights(counts, weighting, min_count))
        acc.update_means(c, torch.from_numpy(np.asarray(vectors)).double(), weights)
    classes, means, _ = acc.compute()
    return classes, means.float()


@register
class FedHPro(CReFF):
    name = "fedhpro"
    summary = (
        "FedHPro (2026): gradient-matched hyper-prototypes + CReFF head re-training, HPCL with client margin, HPAL"
    )
    Config = FedHProConfig
    uploads_feature_gradient = True

    def __init__(self, config, task, privacy=None):
        super().__init__(config, task, privacy)
        if self.dp is not None and self._updates_margin:
            raise ConfigError(
                f"method.client_margin: HPCL's client margin is a statistic of the client's whole train split, "
                f"which per-example clipping cannot bound; set it to false (or hpcl_weight = 0) under "
                f"privacy.mechanism = {self.privacy.mechanism!r}"
            )
        if self.dp is not None and config.global_signal == "averaged":
            raise ConfigError(
                "method.global_signal: 'averaged' uploads the clients' clean class means, which no mechanism "
                f"protects; use 'hyper' under privacy.mechanism = {self.privacy.mechanism!r}"
            )
        if config.distill_augmentation == "random-shift" and len(task.input_shape) != 3:
            raise ConfigError(
                "method.distill_augmentation: 'random-shift' needs image inputs (C, H, W), got inputs of shape "
                f"{task.input_shape}; use 'none'"
            )

    @property
    def _hp_shape(self) -> tuple[int, int, int]:
        num_classes, d = self._dims
        return num_classes, self.config.hp_per_class, d

    # -- state and payloads ------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        state = super().init_server_state(seed)
        generator = torch.Generator(device="cpu").manual_seed(_seed(seed, 0x4B9))  # CPU draws: the same on every device
        hp = torch.randn(*self._hp_shape, generator=generator, device="cpu") * self.config.hp_init_scale
        state["hyper_prototypes"] = hp.to(self.device)
        state["hp_matched"] = torch.zeros(self._dims[0], dtype=torch.bool, device=self.device)
        return state

    def broadcast(self, server_state: State) -> Payload:
        payload = super().broadcast(server_state)
        arrays = {
            **payload.arrays,
            "hyper_prototypes": server_state["hyper_prototypes"].cpu().numpy(),
            "hp_classes": torch.nonzero(server_state["hp_matched"]).flatten().cpu().numpy().astype(np.int64),
        }
        return Payload(arrays, {"method": self.name})

    def broadcast_spec(self) -> PayloadSpec:
        spec = super().broadcast_spec()
        num_classes = self._dims[0]
        return PayloadSpec(
            self.name,
            {
                **spec.arrays,
                "hyper_prototypes": ArraySpec(self._hp_shape),
                "hp_classes": ArraySpec((None,), "int64", class_bound=num_classes, unique=True),
            },
        )

    def reply_spec(self) -> PayloadSpec:
        num_classes, d = self._dims
        spec = super().reply_spec()
        arrays = {**spec.arrays, "feature_grad": ArraySpec((None if self.dp is None else num_classes, d))}
        same_length = (*spec.same_length, "feature_grad")
        if self.config.global_signal == "averaged":
            arrays["class_means"] = ArraySpec((None, d))
            same_length = (*same_length, "class_means")
        return PayloadSpec(self.name, arrays, same_length=same_length)

    # -- client ------------------------------------------------------------------------------------
    def distill_inputs(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.config.distill_augmentation == "random-shift":
            return random_shift(x, self.config.shift_pixels, generator)
        return x

    def client_gradients(self, params: Params, data: ClientData, generator: torch.Generator) -> dict[str, np.ndarray]:
        """CReFF's head gradients plus the feature gradient, both on the same augmented real samples."""
        rows, feature_grads = [], []
        with torch.no_grad():
            for c, index, count in self.class_samples(data, generator):
                z = self.forward(params, self.distill_inputs(data.x_train[index], generator))[0]
                rows.append((c, count, z, head_gradients(params[HEAD_W], params[HEAD_B], z, c)))
                feature_grads.append(input_gradients(params[HEAD_W], params[HEAD_B], z, c, create_graph=False)[0])
        arrays = self.gradient_arrays(params, rows)
        d = self._dims[1]
        arrays["feature_grad"] = (
            torch.stack(feature_grads).cpu().numpy() if feature_grads else np.zeros((0, d))
        ).astype(np.float32)
        return arrays

    def context(self, received: Payload) -> dict[str, Any]:
        """The HP summaries of the classes matched at least once (``hp_classes``) and the client margin
        κ (0 until :meth:`train_client` computes it)."""
        cfg = self.config
        num_classes = self._dims[0]
        summaries, means = hp_summaries(torch.from_numpy(received["hyper_prototypes"]).float().to(self.device))
        ready = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        ready[torch.from_numpy(received["hp_classes"]).to(self.device)] = True
        classes = torch.nonzero(ready).flatten()
        return {
            "ready": ready,
            "classes": classes,
            "summaries": summaries[classes],
            "means": means,
            "kappa": 0.0,
            "use_hp": bool(ready.any()) and (cfg.hpcl_weight > 0 or cfg.hpal_weight > 0),
        }

    def loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, context: dict[str, Any]
    ) -> torch.Tensor:
        """``CE + hpcl_weight · HPCL + hpal_weight · HPAL``, the HP terms over the samples of matched classes."""
        cfg = self.config
        z, logits = self.forward(params, x)
        loss = masked_cross_entropy(logits, y, weight)
        if not context["use_hp"]:
            return loss
        has = context["ready"][y].to(z.dtype) * weight
        if cfg.hpcl_weight:
            scale = cfg.hpcl_weight / (cfg.batch_size if cfg.hpcl_normalisation == "batch-size" else 1)
            loss = loss + scale * hpcl_loss(
                z, y, context["summaries"], cfg.temperature, context["kappa"], context["classes"], has
            )
        if cfg.hpal_weight:
            loss = loss + cfg.hpal_weight * hpal_loss(z, context["means"][y], cfg.hpal_beta, has)
        return loss

    @property
    def _updates_margin(self) -> bool:
        return self.config.hpcl_weight > 0 and self.config.client_margin

    def train_client(
        self, client_state: State, data: ClientData, start: Params, context: dict[str, Any], generator: torch.Generator
    ):
        """:meth:`loss` with unit weights, κ recomputed from the client's class means before every epoch."""
        num_classes = self._dims[0]

        def update_margin(params: Params) -> None:
            if context["use_hp"] and self._updates_margin:
                context["kappa"] = client_margin(self.class_means(params, data), num_classes)

        params, metrics = train_local(
            start,
            data.x_train,
            data.y_train,
            self.loss,
            self.config,
            generator,
            on_epoch=update_margin,
            shared=(context,),
        )
        metrics["client_margin"] = context["kappa"]
        return params, metrics, {}

    def class_means(self, params: Params, data: ClientData) -> torch.Tensor:
        """The client's per-class mean features (classes it holds) under ``params``."""
        acc = PrototypeAccumulator(*self._dims, device=self.device)
        acc.update(compute_features(self, params, data.x_train), data.y_train)
        return acc.compute()[1]

    def reply(self, outcome: LocalOutcome):
        client_state, reply, metrics = super().reply(outcome)
        arrays = dict(reply.arrays)
        if self.config.global_signal == "averaged":
            arrays["class_means"] = self.class_means(outcome.params, outcome.data).cpu().numpy().astype(np.float32)
        metrics = dict(metrics)
        metrics.setdefault("client_margin", 0.0)  # κ stays 0 where it is not recomputed (see batched_unsupported)
        return client_state, Payload(arrays, {"method": self.name}), metrics

    def batched_unsupported(self) -> str | None:
        if self._updates_margin:
            return (
                "HPCL's client margin κ_k is recomputed from the client's whole train split before every "
                "local epoch, a per-client statistic that changes during training, while the batched "
                "program takes one context per round (method.client_margin = false or hpcl_weight = 0 "
                "run batched)"
            )
        return super().batched_unsupported()

    # -- server ------------------------------------------------------------------------------------
    def server_step(self, server_state: State, replies: list[Payload]):
        cfg = self.config
        num_classes, d = self._dims
        state, metrics = super().server_step(server_state, replies)  # FedAvg + CReFF head re-training
        hp = server_state["hyper_prototypes"]
        matched = server_state["hp_matched"].clone()
        if cfg.global_signal == "averaged":
            classes, means = aggregate_vectors(
                [r["grad_classes"] for r in replies],
                [r["class_means"] for r in replies],
                [r["grad_counts"] for r in replies],
                num_classes,
                d,
                "count",
            )
            hp = hp.clone()
            classes, means = classes.to(hp.device), means.to(hp.device)
            hp[classes] = means[:, None, :].expand(-1, cfg.hp_per_class, -1)
            hp_metrics = {}
        else:
            classes, targets = aggregate_vectors(
                [r["grad_classes"] for r in replies],
                [r["feature_grad"] for r in replies],
                [r["grad_counts"] for r in replies],
                num_classes,
                d,
                cfg.feature_gradient_weighting,
                self.presence_threshold,
            )
            head_w, head_b = state["params"][HEAD_W].detach(), state["params"][HEAD_B].detach()
            hp, match_metrics = self.match_hyper_prototypes(hp, classes, targets, head_w, head_b)
            hp_metrics = {f"hp_{k}": v for k, v in match_metrics.items()}
        matched[classes] = True
        state["hyper_prototypes"] = hp
        state["hp_matched"] = matched
        return state, {**metrics, **hp_metrics, "hp_classes_updated": float(len(classes))}

    def match_hyper_prototypes(self, hp, classes, targets, head_w, head_b):
        """The HP step: ``hp`` (C×L×d) with the classes in ``classes`` matched to their ``targets`` under
        the head ``(head_w, head_b)``; ``hp_matching = "mean"`` matches the mean of a class's L HP
        gradients, ``"each"`` every HP's own gradient (one synthetic tensor per HP, same target)."""
        cfg = self.config
        num_classes, per_class, _ = hp.shape
        each = cfg.hp_matching == "each"
        # keys: a class (mean), or class·L + l (each); the class of a key is key // groups
        groups = per_class if each else 1
        synthetic = {k: hp[k // groups, k % groups][None] if each else hp[k] for k in range(num_classes * groups)}
        wanted = {int(c) * groups + j: [t.to(hp.device)] for c, t in zip(classes, targets) for j in range(groups)}
        new, metrics = match_synthetic(
            synthetic,
            wanted,
            lambda k, h: input_gradients(head_w, head_b, h, k // groups),
            cfg.hp_distance,
            cfg.hp_steps,
            cfg.hp_lr,
            cfg.hp_momentum,
            cfg.hp_optimizer,
        )
        rows = [new[k] for k in range(num_classes * groups)]
        return (torch.cat(rows).reshape(hp.shape) if each else torch.stack(rows)), metrics

    # -- evaluation --------------------------------------------------------------------------------
    def global_signal(self, server_state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes, h̄)``: the mean HP of every class matched at least once."""
        classes = torch.nonzero(server_state["hp_matched"]).flatten()
        return classes, hp_summaries(server_state["hyper_prototypes"])[1][classes]

    @torch.no_grad()
    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        features, logits = predict_features_and_logits(self, server_state["params"], x)
        out = {"global_acc": float((logits.argmax(1) == y).float().mean())}
        classes, signal = self.global_signal(server_state)
        if len(classes):
            out["global_signal_cos"] = signal_consistency(features, y, classes, signal)
            project = head_span_projector(server_state["params"][HEAD_W])
            out["global_signal_cos_head_span"] = signal_consistency(features @ project, y, classes, signal @ project)
            hp = server_state["hyper_prototypes"]
            out["global_hp_head_span_energy"] = float((hp @ project).pow(2).sum() / hp.pow(2).sum().clamp_min(1e-30))
        return out
