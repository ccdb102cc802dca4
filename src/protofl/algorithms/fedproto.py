"""FedProto (Tan et al., AAAI 2022): clients share only per-class mean features (prototypes) with
their counts; no weights are averaged.

Local objective: CE + lambda * MSE(f(x), P_y), where P_y is the global prototype of the sample's
class (mean over feature dimensions; samples of classes without a global prototype contribute only
CE). Server: per-class average of the uploaded prototypes, weighted by class counts as in the paper
(``aggregation = "weighted"``, our default) or unweighted as in the authors' public code
(``aggregation = "unweighted"``). Under a prototype release with ``privacy.relation = "add-remove"``
every reply covers every class with noisy counts: ``weighted`` uses the noisy counts clamped at 0, and
``unweighted`` counts a client for a class when its noisy count reaches
:attr:`FedProto.presence_threshold` (post-processing of the release). Clients keep their own models.
Inference is reported both ways: the client's classifier (``personal_acc``) and the nearest global
prototype in Euclidean distance (``personal_proto_acc``).

``model_sharing = "fedavg"`` is the *global variant* the FedHPro paper compares against under label
skew: clients also start every round from the sample-weighted average of the models (FedAvg), so
there is a global model, evaluated on the global test set (``global_acc``, ``global_proto_acc``) and
the consistency of the global prototypes with the class means of its features on that set
(``global_signal_cos``). :class:`FedProto` is also the base of the other prototype methods (FPL,
FedTGP): they override :meth:`FedProto.context`, :meth:`FedProto.prototype_loss` and
:meth:`FedProto.server_prototypes`, and stay batched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from protofl.algorithms.base import (
    ClientData,
    LocalOutcome,
    LocalTrainingConfig,
    ModelAlgorithm,
    Params,
    StackedFeatures,
    State,
    arrays_to_params,
    compute_features,
    param_specs,
    params_to_arrays,
    predict_features_and_logits,
    register,
)
from protofl.algorithms.fedavg import weighted_average
from protofl.config import ConfigError, check, check_choice
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.layer import PrototypeReleaseLayer
from protofl.privacy.mechanisms import clip_rows, selection_diagnostics_batch
from protofl.privacy.vpdr import DistillationClipping
from protofl.prototypes import PrototypeAccumulator
from protofl.stacked import stackable
from protofl.training import masked_cross_entropy, take, train_local

MODEL_SHARING = ("none", "fedavg")
#: What a VPP release reports of its selection, averaged over the round's clients into the round row:
#: the share of the dimensions selected (1 in a round released as IGPP, for want of a broadcast to
#: select from), the share of the clean between-class energy in them, and their overlap with the true
#: top-k of the clean ANOVA scores (:func:`protofl.privacy.mechanisms.selection_diagnostics`).
VPP_ROW_METRICS = ("vpp_selected_fraction", "vpp_selected_energy", "vpp_overlap")


@dataclasses.dataclass(frozen=True)
class FedProtoConfig(LocalTrainingConfig):
    #: Weight of the prototype-alignment term (lambda = 1 in the paper).
    proto_weight: float = 1.0
    #: ``weighted`` (by class counts, the paper) or ``unweighted`` (the authors' code); under an add/remove
    #: prototype release, by the noisy counts, or every client whose noisy count passes the presence
    #: threshold (:attr:`FedProto.presence_threshold`).
    aggregation: str = "weighted"
    #: ``none`` (FedProto: every client keeps its own model) or ``fedavg`` (the global variant: models
    #: are also averaged, and there is a global model).
    model_sharing: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.proto_weight >= 0, "proto_weight", f"must be >= 0, got {self.proto_weight}")
        check_choice(self.aggregation, ("weighted", "unweighted"), "aggregation")
        check_choice(self.model_sharing, MODEL_SHARING, "model_sharing")


def reply_weights(reply: Payload, weighted: bool, min_count: float = 1.0) -> torch.Tensor:
    """The weight of each uploaded prototype of ``reply`` in a per-class average: ``weighted``, its count
    clamped at 0; unweighted, 1 where its count is at least ``min_count``, else 0. Exact counts (no
    mechanism, or ``replace-one``) are at least 1, so with ``min_count = 1`` these are the counts and the
    ones. Under ``add-remove`` the counts are the release's noisy ones (every class is uploaded, and a
    class the client lacks has a count of pure noise): using them is post-processing of the release, and
    ``min_count`` (:attr:`FedProto.presence_threshold`) tells a class a client holds from noise."""
    return torch.from_numpy(_count_weights(reply["counts"], weighted, min_count))


def _count_weights(counts: np.ndarray, weighted: bool, min_count: float) -> np.ndarray:
    """:func:`reply_weights` of the ``counts`` of one reply or of several concatenated (float64)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.maximum(counts, 0.0) if weighted else (counts >= min_count).astype(np.float64)


def present_rows(replies: list[Payload], min_count: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, prototypes)``: every uploaded prototype whose count is at least ``min_count`` (the
    unweighted rule of :func:`reply_weights`), in reply order."""
    keep = [reply_weights(r, weighted=False, min_count=min_count).bool().numpy() for r in replies]
    if not replies:
        return torch.zeros(0, dtype=torch.int64, device="cpu"), torch.zeros(0, 0, device="cpu")
    return (
        torch.from_numpy(np.concatenate([r["classes"][k] for r, k in zip(replies, keep)])),
        torch.from_numpy(np.concatenate([r["prototypes"][k] for r, k in zip(replies, keep)])),
    )


def aggregate_prototypes(replies: list[Payload], num_classes: int, dim: int, weighted: bool, min_count: float = 1.0):
    """Per-class mean of the uploaded prototypes, weighted as :func:`reply_weights` says; a class whose
    weights are all 0 gets no prototype."""
    acc = PrototypeAccumulator(num_classes, dim, dtype=torch.float64, device="cpu")
    if replies:  # every upload in one update, in reply order: the sums of one update per reply
        acc.update_means(
            torch.from_numpy(np.concatenate([r["classes"] for r in replies])),
            torch.from_numpy(np.concatenate([r["prototypes"] for r in replies])).double(),
            torch.from_numpy(np.concatenate([_count_weights(r["counts"], weighted, min_count) for r in replies])),
        )
    classes, protos, _ = acc.compute()
    return classes, protos.float()


@stackable
def alignment_loss(z: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``MSE(z, targets)`` (mean over dimensions) averaged over the rows whose ``weight`` is 1 (0 when
    none is): FedProto's ``F.mse_loss(z[has], targets[has])`` in a form that works on padded batches
    (and on stacked clients' batches, one value per client)."""
    return (((z - targets) ** 2).sum(-1) * weight).sum(-1) / (weight.sum(-1).clamp_min(1.0) * z.shape[-1])


def nearest_prototype(features: torch.Tensor, classes: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Class of the nearest prototype (Euclidean) for each feature vector."""
    return classes[torch.cdist(features, prototypes).argmin(1)]


def signal_consistency(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, signal: torch.Tensor
) -> float:
    """Mean over ``classes`` (those with samples in ``labels``) of the cosine similarity between the
    class's global signal ``signal[i]`` (a ``(d,)`` vector) and the mean of its features."""
    cosines = []
    for c, s in zip(classes.tolist(), signal):
        mask = labels == c
        if mask.any():
            cosines.append(float(F.cosine_similarity(features[mask].mean(0), s.float(), dim=0)))
    return float(np.mean(cosines)) if cosines else float("nan")


@register
class FedProto(ModelAlgorithm):
    name = "fedproto"
    summary = (
        "FedProto (Tan et al., 2022): per-class prototypes, no weight sharing (model_sharing='fedavg': global variant)"
    )
    Config = FedProtoConfig
    #: With ``[privacy] mechanism = "igpp"`` or ``"vpp"`` the prototypes in a reply are the privacy layer's
    #: noisy ones, and the clean ones never leave the client step.
    privacy_mechanisms = ("igpp", "vpp")

    def row_metrics(self) -> tuple[str, ...]:
        return VPP_ROW_METRICS if self.privacy.mechanism == "vpp" else ()

    @classmethod
    def validate_privacy(cls, config, privacy) -> None:
        super().validate_privacy(config, privacy)
        if privacy.mechanism != "none" and config.model_sharing == "fedavg":
            raise ConfigError(
                "privacy.mechanism: protects the prototypes only, but method.model_sharing = 'fedavg' also "
                "releases the model weights unprotected; set method.model_sharing = 'none'"
            )

    @property
    def dim(self) -> int:
        return self.model.feature_dim

    @property
    def shares_model(self) -> bool:
        return self.config.model_sharing == "fedavg"

    # -- state and payloads ------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        state: State = {
            "classes": torch.zeros(0, dtype=torch.int64, device=self.device),
            "prototypes": torch.zeros(0, self.dim, device=self.device),
        }
        if self.shares_model:
            state["params"] = self.initial_params(seed)
        return state

    def init_client_state(self, seed: int) -> State:
        return {} if self.shares_model else {"params": self.initial_params(seed)}

    def broadcast(self, server_state: State) -> Payload:
        arrays = {
            "classes": server_state["classes"].cpu().numpy(),
            "prototypes": server_state["prototypes"].cpu().numpy(),
        }
        if self.shares_model:
            arrays.update(params_to_arrays(server_state["params"]))
        return Payload(arrays, {"method": self.name})

    def _model_specs(self) -> dict[str, ArraySpec]:
        return param_specs(dict(self.model.named_parameters())) if self.shares_model else {}

    def broadcast_spec(self) -> PayloadSpec:
        c = self.task.num_classes
        return PayloadSpec(
            self.name,
            {
                "classes": ArraySpec((None,), "int64", class_bound=c, unique=True),
                "prototypes": ArraySpec((None, self.dim)),
                **self._model_specs(),
            },
            same_length=("classes", "prototypes"),
        )

    @property
    def covers_every_class(self) -> bool:
        """Whether a reply covers every class with noisy counts (a prototype release under
        ``privacy.relation = "add-remove"``): its shape then does not depend on the client's classes."""
        return isinstance(self.privacy_layer, PrototypeReleaseLayer) and self.privacy.relation == "add-remove"

    @property
    def presence_threshold(self) -> float:
        """The count from which an upload counts for its class in an unweighted average (FedProto's
        ``unweighted``, FPL's clusters, FedTGP's generator): 1 with exact counts; under ``add-remove``
        ``max(1, 2 σ_n)``, σ_n the public std of the count noise, so a class a client lacks passes with
        probability about 2 % (and a held class of fewer examples may be left out)."""
        if not self.covers_every_class:
            return 1.0
        assert isinstance(self.privacy_layer, PrototypeReleaseLayer)
        return max(1.0, 2 * self.privacy_layer.count_noise_std)

    def reply_spec(self) -> PayloadSpec:
        c = self.task.num_classes
        every = self.covers_every_class
        arrays = {
            "classes": ArraySpec((c if every else None,), "int64", class_bound=c, unique=True),
            "prototypes": ArraySpec((c if every else None, self.dim)),
            "counts": ArraySpec((c,), "float64") if every else ArraySpec((None,), "int64", minimum=1),
            **self._model_specs(),
        }
        if self.shares_model:
            arrays["num_samples"] = ArraySpec((), "int64", minimum=1)
        return PayloadSpec(self.name, arrays, same_length=("classes", "prototypes", "counts"))

    @staticmethod
    def global_lookup(
        received: Payload, num_classes: int, dim: int, device: Any = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(C, d)`` table of global prototypes and a mask of the classes that have one (on ``device``)."""
        table = torch.zeros(num_classes, dim, device=device)
        mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        classes = torch.from_numpy(received["classes"]).to(device)
        table[classes] = torch.from_numpy(received["prototypes"]).float().to(device)
        mask[classes] = True
        return table, mask

    def model_params(self, client_state: State, received: Payload) -> Params:
        """The model a client trains and evaluates: the received global one, or its own."""
        return self.received_params(received) if self.shares_model else client_state["params"]

    # -- client ------------------------------------------------------------------------------------
    reply_uses_features = True

    def start_params(self, client_state: State, received: Payload) -> Params:
        return self.model_params(client_state, received)

    def context(self, received: Payload) -> Any:
        """What the local loss needs from the broadcast, parsed once per round (here the dense
        prototype table and its mask)."""
        return self.global_lookup(received, self.task.num_classes, self.dim, self.device)

    #: The methods :meth:`loss` calls (see :meth:`ModelAlgorithm.stacked_unsupported`).
    loss_parts = (*ModelAlgorithm.loss_parts, "prototype_loss")

    @stackable
    def prototype_loss(self, z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, context: Any) -> torch.Tensor:
        """The regulariser added to CE: ``lambda * MSE(z, P_y)`` over the (real) samples whose class has
        a global prototype (0 where none has)."""
        table, mask = context
        if not self.config.proto_weight:
            return z.new_zeros(())
        return self.config.proto_weight * alignment_loss(z, take(table, y), take(mask, y).to(z.dtype) * weight)

    @stackable
    def loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, context: Any
    ) -> torch.Tensor:
        z, logits = self.forward(params, x)
        return masked_cross_entropy(logits, y, weight) + self.prototype_loss(z, y, weight, context)

    def train_client(
        self, client_state: State, data: ClientData, start: Params, context: Any, generator: torch.Generator
    ):
        if not self.privacy.dcr:
            return super().train_client(client_state, data, start, context, generator)
        dcr = DistillationClipping.from_state(self.privacy, client_state)

        def loss_fn(p, x, y, weight):
            return dcr.loss(
                p, x, y, self.features, self.head, lambda z, labels: self.prototype_loss(z, labels, weight, context)
            )

        params, metrics = train_local(start, data.x_train, data.y_train, loss_fn, self.config, generator)
        return params, metrics, dcr.state()

    def local_prototypes(self, params: Params, data: ClientData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(classes, prototypes, counts)``: per-class mean features of the trained model on the train split."""
        acc = PrototypeAccumulator(self.task.num_classes, self.dim, device=self.device)
        acc.update(compute_features(self, params, data.x_train), data.y_train)
        return acc.compute()

    def release_prototypes(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        clean: PrototypeAccumulator,
        generator: torch.Generator,
        client_state: State,
        client_id: int,
        received: Payload | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, float]]:
        """The prototypes a client uploads from its train features ``z`` (labels ``y``; ``clean`` holds
        their per-class sums and counts): ``(classes, prototypes, counts, new ledger state or None,
        metrics)``. The clean per-class means, or, under a ``[privacy]`` mechanism, its noisy release
        (the only place a release happens), given the global prototypes of the broadcast ``received``
        (VPP's ``broadcast-variance`` selection reads them). A VPP release adds the diagnostics of its
        selection (:data:`VPP_ROW_METRICS`), computed from the clean features: they stay with the client
        (on Flower, in the node's log)."""
        if self.privacy_layer is None:
            return (*clean.compute(), None, {})
        # fedproto hosts only the prototype-release mechanisms (igpp, vpp)
        assert isinstance(self.privacy_layer, PrototypeReleaseLayer)
        public = None if received is None else torch.from_numpy(np.asarray(received["prototypes"]))
        release, ledger = self.privacy_layer.release(
            z, y, generator, client_state, who=f"client {client_id}", received=public
        )
        metrics = {"privacy_noise_std": float(release.noise_std.mean())}
        if release.selected is not None:
            metrics["vpp_selected_fraction"] = len(release.selected) / z.shape[1]
            # NumPy, on the CPU; from the spread the private selection ranked, where it did
            diagnostics = selection_diagnostics_batch(
                z.cpu()[None], y.cpu()[None], None, [release.selected], [release.clean]
            )
            metrics.update(diagnostics[0])
        return release.classes, release.prototypes, release.counts, ledger, metrics

    #: Whether a batched round releases its clients' prototypes as one program
    #: (:meth:`release_prototypes_batch`); an audit that watches every client's release one by one
    #: (:func:`protofl.privacy.audit.watch_releases`) turns it off for its run.
    batch_releases: bool = True

    def release_prototypes_batch(
        self, stacked: StackedFeatures, outcomes: list[LocalOutcome]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, float]]]:
        """:meth:`release_prototypes` of a batched round's clients (their padded train features
        ``stacked``): without a mechanism their clean prototypes (:meth:`clean_prototypes_batch`); under the
        run's prototype release, as one program: one clip, one ANOVA where the
        selection needs it, each client's noise from its own generator, the ledgers checked and updated
        together (:meth:`~protofl.privacy.layer.PrototypeReleaseLayer.release_batch`). Each client's
        release, ledger and metrics are those of its own :meth:`release_prototypes`."""
        layer = self.privacy_layer
        if layer is None:  # no mechanism: each client's clean class means
            return self.clean_prototypes_batch(stacked)
        assert isinstance(layer, PrototypeReleaseLayer)
        received = outcomes[0].received  # one broadcast serves the whole batch
        public = None if received is None else torch.from_numpy(np.asarray(received["prototypes"]))
        released = layer.release_batch(
            stacked.features,
            stacked.labels,
            stacked.weight,
            [o.generator for o in outcomes],
            [o.client_state for o in outcomes],
            [f"client {o.data.client_id}" for o in outcomes],
            received=public,
        )
        metrics: list[dict[str, float]] = [{"privacy_noise_std": float(r.noise_std.mean())} for r, _ in released]
        chosen = [r.selected for r, _ in released if r.selected is not None]
        if len(chosen) == len(released):
            diagnostics = (
                selection_diagnostics_batch(  # NumPy, on the CPU; from the selection's spread, where it ranked one
                    stacked.features.cpu(),
                    stacked.labels.cpu(),
                    stacked.weight.cpu(),
                    chosen,
                    [r.clean for r, _ in released],
                )
            )
            for m, s, extra in zip(metrics, chosen, diagnostics):
                m["vpp_selected_fraction"] = len(s) / stacked.features.shape[2]
                m.update(extra)
        return [(r.classes, r.prototypes, r.counts, ledger, m) for (r, ledger), m in zip(released, metrics)]

    def clean_prototypes_batch(self, stacked: StackedFeatures) -> list[tuple[Any, ...]]:
        """:meth:`release_prototypes` of a batched round's clients without a privacy mechanism: each client's
        classes, clean per-class means and counts from the stacked class sums, the means of all clients in
        one division (the same float32 values as each client's ``PrototypeAccumulator.compute``)."""
        sums, counts = stacked.sums.cpu().numpy(), stacked.counts.cpu().numpy()
        means = sums / np.maximum(counts, 1)[:, :, None]  # a held class has a count of at least 1
        # a client holding every class releases its rows of the stack as they are (views, one call for all)
        every = torch.arange(counts.shape[1], device=self.device)
        rows = zip(torch.from_numpy(means).to(self.device).unbind(), torch.from_numpy(counts).to(self.device).unbind())
        holds_every = np.all(counts > 0, axis=1).tolist()
        out: list[tuple[Any, ...]] = []
        for client_means, client_counts, (all_means, all_counts), holds_all in zip(means, counts, rows, holds_every):
            if holds_all:
                out.append((every, all_means, all_counts, None, {}))
                continue
            classes = np.flatnonzero(client_counts)
            held = (classes, client_means[classes], client_counts[classes])
            out.append((*(torch.from_numpy(a).to(self.device) for a in held), None, {}))
        return out

    def replies(self, outcomes: list[LocalOutcome], stacked: StackedFeatures | None):
        # A batched round releases through release_prototypes_batch, as a client's round through
        # release_prototypes: clean (no mechanism, where release_prototypes is FedProto's own) or under the
        # run's prototype release; anything else goes client by client.
        clean = self.privacy_layer is None and type(self).release_prototypes is FedProto.release_prototypes
        released = self.batch_releases and isinstance(self.privacy_layer, PrototypeReleaseLayer)
        if stacked is None or not (clean or released):
            return super().replies(outcomes, stacked)
        return [
            self.reply_with(outcome, released)
            for outcome, released in zip(outcomes, self.release_prototypes_batch(stacked, outcomes))
        ]

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.forward(params, x)[0]

    def head(self, params: Params, z: torch.Tensor) -> torch.Tensor:
        """The classifier head alone, on features ``z`` (``params`` holds at least the ``head.*`` keys)."""
        return functional_call(self.model.head, {k[5:]: v for k, v in params.items() if k.startswith("head.")}, (z,))

    def reply(self, outcome: LocalOutcome):
        # given, as this method asks for them (reply_uses_features)
        assert outcome.features is not None and outcome.feature_stats is not None
        released = self.release_prototypes(
            outcome.features,
            outcome.data.y_train,
            outcome.feature_stats,
            outcome.generator,
            outcome.client_state,
            outcome.data.client_id,
            outcome.received,
        )
        return self.reply_with(outcome, released)

    def reply_with(self, outcome: LocalOutcome, released: tuple[Any, ...]):
        """The reply of ``outcome`` given its prototypes ``released`` (:meth:`release_prototypes`'s
        ``(classes, prototypes, counts, ledger state or None, metrics)``)."""
        data = outcome.data
        new_state: State = {} if self.shares_model else {"params": outcome.params}
        new_state.update(outcome.trainer_state)
        classes, protos, counts, ledger, release_metrics = released
        if ledger is not None:
            new_state[LEDGER_KEY] = ledger
        arrays = {
            "classes": classes.cpu().numpy(),
            "prototypes": protos.cpu().numpy(),
            "counts": counts.double().cpu().numpy() if self.covers_every_class else counts.long().cpu().numpy(),
        }
        if self.shares_model:
            arrays.update(params_to_arrays(outcome.params))
            arrays["num_samples"] = np.array(data.num_train, dtype=np.int64)
        return new_state, Payload(arrays, {"method": self.name}), {**outcome.metrics, **release_metrics}

    # -- batched execution -------------------------------------------------------------------------
    def batched_unsupported(self):
        if self.privacy.dcr:
            return (
                "privacy.dcr (distillation-guided clipping) updates a per-client EMA teacher head at every "
                "local step, inside the loss; it has no batched form"
            )
        return super().batched_unsupported()

    # -- server ------------------------------------------------------------------------------------
    def server_prototypes(self, server_state: State, replies: list[Payload]) -> tuple[State, dict[str, float]]:
        """The new global prototypes (``{"classes", "prototypes"}`` plus any state of their own) from
        the uploads: here their per-class average."""
        classes, protos = aggregate_prototypes(
            replies,
            self.task.num_classes,
            self.dim,
            weighted=self.config.aggregation == "weighted",
            min_count=self.presence_threshold,
        )
        state = {"classes": classes.to(self.device), "prototypes": protos.to(self.device)}
        return state, {"global_classes": float(len(classes))}

    def bounded_uploads(self, replies: list[Payload]) -> list[Payload]:
        """The uploads with every noisy prototype projected onto the R-ball (``privacy.bound_uploads``).

        Every prototype a release protects is a class mean (or, for ``fixed-features`` under add/remove, a
        sum over a count) of features clipped to norm R — VPP's two groups to R·κ_A and R·κ_B, with
        κ_A² + κ_B² = 1 — so the true value lies in the R-ball, and projecting a noisy estimate onto that
        convex set never moves it further from the truth. It is post-processing of the release (no ε).
        Under a valid bound the noise is far larger than R (about σ·2R·√C per coordinate), and an
        unprojected prototype pulls the features it aligns toward a point far outside the data."""
        if not (self.privacy_layer is not None and isinstance(self.privacy_layer, PrototypeReleaseLayer)):
            return replies
        if not self.privacy.bound_uploads:
            return replies
        if not replies:
            return replies
        # every upload's rows projected in one program (a row's projection reads that row alone)
        uploads = [reply["prototypes"] for reply in replies]
        rows = torch.from_numpy(np.concatenate(uploads).astype(np.float64)).to("cpu")  # payload post-processing
        projected = np.split(
            clip_rows(rows, self.privacy.clip_bound).cpu().numpy(), np.cumsum([len(u) for u in uploads])[:-1]
        )
        return [
            Payload({**reply.arrays, "prototypes": rows_of.astype(upload.dtype)}, reply.metadata)
            for reply, upload, rows_of in zip(replies, uploads, projected)
        ]

    def server_step(self, server_state: State, replies: list[Payload]):
        replies = self.bounded_uploads(replies)
        state, metrics = self.server_prototypes(server_state, replies)
        if self.shares_model:
            state["params"] = weighted_average(
                [arrays_to_params(r, self.device) for r in replies], [int(r["num_samples"]) for r in replies]
            )
        return state, metrics

    # -- evaluation --------------------------------------------------------------------------------
    def global_signal(self, server_state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes, (n, d) signal)``: what the server tells clients each class looks like."""
        return server_state["classes"], server_state["prototypes"]

    @torch.no_grad()
    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        if not self.shares_model:
            return None
        features, logits = predict_features_and_logits(self, server_state["params"], x)
        out = {"global_acc": float((logits.argmax(1) == y).float().mean())}
        classes, signal = self.global_signal(server_state)
        if len(classes):
            out["global_signal_cos"] = signal_consistency(features, y, classes, signal)
            pred = nearest_prototype(features, server_state["classes"], server_state["prototypes"].float())
            out["global_proto_acc"] = float((pred == y).float().mean())
        return out

    @torch.no_grad()
    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        params = self.model_params(client_state, received)
        out = {"personal_acc": self.accuracy(params, data.x_test, data.y_test)}
        if len(received["classes"]) and len(data.y_test):
            features = compute_features(self, params, data.x_test)
            pred = nearest_prototype(
                features,
                torch.from_numpy(received["classes"]).to(self.device),
                torch.from_numpy(received["prototypes"]).float().to(self.device),
            )
            out["personal_proto_acc"] = float((pred == data.y_test).float().mean())
        return out
