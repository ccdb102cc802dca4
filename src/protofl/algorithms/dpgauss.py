"""DP class-conditional Gaussian: the baseline a private generator has to beat.

Every client projects its frozen-encoder embeddings onto a public basis (:mod:`protofl.data.public_basis`,
the same space FedHypeVAE's generators work in) and releases, once per round, noisy per-class counts,
sums and second moments (``[privacy] mechanism = "class-statistics"``,
:mod:`protofl.privacy.class_statistics`: clipping to ``privacy.clip_bound``, the Gaussian mechanism under
add/remove, the client's ledger and the run's accountant). The server adds up every release it has
received, estimates each class's mean and covariance (its own, or one pooled over classes), draws
``synthetic_per_class`` examples per class from those Gaussians and trains the downstream classifier on
them, which it broadcasts; it is scored on real held-out embeddings.

Releasing in R rounds at σ each composes exactly like one release at σ/√R (Gaussian mechanisms, RDP and
PLD alike), so the number of rounds changes nothing but the work: one round is the natural run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import numpy as np
import torch

from protofl.algorithms.base import Algorithm, ClientData, State, register
from protofl.algorithms.fedhypevae import classify, train_mlp
from protofl.config import ConfigError, check, check_choice
from protofl.data.public_basis import PUBLIC_SOURCES, basis_for_embeddings
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.class_statistics import MECHANISM, ClassStatisticsLayer
from protofl.privacy.mechanisms import clip_rows

STATS = ("counts", "sums", "moments")


@dataclasses.dataclass(frozen=True)
class DPGaussConfig:
    #: The public space (as FedHypeVAE's ``public_basis``/``public_dims``): public images whose embeddings'
    #: first ``public_dims`` principal components, standardised, make the space; never client data.
    public_basis: str = "photos"
    public_dims: int = 64
    #: The encoder of the data's embeddings and its input size: the public images are embedded the same way.
    encoder: str = "efficientnet-lite0"
    image_size: int = 32
    #: Covariance per class (``class``) or one pooled over the classes (``pooled``: C times the examples
    #: behind every entry, so far less noise per entry).
    covariance: str = "pooled"
    #: Of the precision left after the counts' share (``privacy.count_fraction``), the share of the sums;
    #: the second moments get the rest.
    mean_share: float = 0.5
    #: Eigenvalue floor of an estimated covariance (standardised units): the noisy estimate is projected
    #: onto the positive semi-definite matrices with eigenvalues at least this.
    min_eigenvalue: float = 0.05
    #: Downstream: synthetic examples per class, classifier epochs and hidden width.
    synthetic_per_class: int = 1000
    classifier_epochs: int = 20
    classifier_hidden: int = 256

    def __post_init__(self) -> None:
        check_choice(self.public_basis, tuple(PUBLIC_SOURCES), "public_basis")
        check_choice(self.covariance, ("class", "pooled"), "covariance")
        for key in ("public_dims", "synthetic_per_class", "classifier_epochs", "classifier_hidden", "image_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(0 < self.mean_share < 1, "mean_share", f"must be in (0, 1), got {self.mean_share}")
        check(self.min_eigenvalue > 0, "min_eigenvalue", f"must be > 0, got {self.min_eigenvalue}")


@register
class DPGauss(Algorithm):
    name = "dpgauss"
    summary = "DP class-conditional Gaussian: noisy per-class means and covariances in a public space, synthetic data"
    Config = DPGaussConfig
    has_global_model = True
    privacy_mechanisms = (MECHANISM,)
    requires_privacy = True

    def __init__(self, config: DPGaussConfig, task, privacy=None):
        super().__init__(config, task, privacy)
        if len(task.input_shape) != 1:
            raise ConfigError(
                f"method.name: dpgauss works on embeddings (D,), got inputs of shape {task.input_shape}; "
                "set data.features = 'efficientnet-lite0'"
            )
        if config.public_dims > task.input_shape[0]:
            raise ConfigError(
                f"method.public_dims: must be <= the embeddings' {task.input_shape[0]} dims, got {config.public_dims}"
            )
        self.layer = cast(ClassStatisticsLayer, self.privacy_layer)
        self.num_classes = task.num_classes
        self.dims = config.public_dims

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings -> the public space, each clipped to ``privacy.clip_bound`` as the release clips them
        (a fixed map, so the classifier sees real embeddings where the synthetic ones lie)."""
        c = self.config
        basis = basis_for_embeddings(c.public_basis, c.encoder, c.public_dims, c.image_size, self.task.input_shape[0])
        return clip_rows(basis.project(x), self.privacy.clip_bound)

    # -- state and payloads ----------------------------------------------------------------------------
    def _zero_stats(self) -> dict[str, torch.Tensor]:
        k, d = self.num_classes, self.dims
        dev = self.device
        return {
            "counts": torch.zeros(k, device=dev),
            "sums": torch.zeros(k, d, device=dev),
            "moments": torch.zeros(k, d, d, device=dev),
        }

    def init_server_state(self, seed: int) -> State:
        return {"round": 0, "seed": seed, **self._zero_stats()}

    def init_client_state(self, seed: int) -> State:
        return {}

    def broadcast(self, server_state: State) -> Payload:
        arrays: dict[str, Any] = {"round": np.int64(server_state["round"] + 1)}
        arrays.update({f"clf/{k}": v.cpu().numpy() for k, v in server_state.get("classifier", {}).items()})
        return Payload(arrays, {"method": self.name})

    def _classifier_shapes(self) -> dict[str, tuple[int, ...]]:
        h = self.config.classifier_hidden
        return {"0.w": (h, self.dims), "0.b": (h,), "1.w": (self.num_classes, h), "1.b": (self.num_classes,)}

    def broadcast_spec(self) -> PayloadSpec:
        specs = {"round": ArraySpec((), "int64", minimum=1)}
        specs.update({f"clf/{k}": ArraySpec(s) for k, s in self._classifier_shapes().items()})
        return PayloadSpec(self.name, specs, optional=tuple(k for k in specs if k.startswith("clf/")))

    def reply_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {k: ArraySpec(tuple(v.shape)) for k, v in self._zero_stats().items()})

    # -- client ----------------------------------------------------------------------------------------
    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        if not bool(torch.isfinite(data.x_train).all()):
            raise ValueError(
                f"client {data.client_id}: its embeddings contain NaN or infinite values; nothing was released"
            )
        x = self.project(data.x_train)
        stats, ledger = self.layer.release(
            x, data.y_train, generator, client_state, f"client {data.client_id}", self.config.mean_share
        )
        arrays = {k: getattr(stats, k).cpu().numpy() for k in STATS}
        # The training loss of a method that fits Gaussians: the mean squared distance of the client's
        # (clipped) embeddings to their class means, a local diagnostic like any method's training loss.
        means = torch.zeros(self.num_classes, x.shape[1], device=x.device).index_add_(0, data.y_train, x)
        means = means / torch.bincount(data.y_train, minlength=self.num_classes).clamp_min(1)[:, None]
        scatter = float((x - means[data.y_train]).square().sum(1).mean())
        return {**client_state, LEDGER_KEY: ledger}, Payload(arrays, {"method": self.name}), {"train_loss": scatter}

    # -- server ----------------------------------------------------------------------------------------
    def server_step(self, server_state: State, replies: list[Payload]):
        state: State = {**server_state, "round": server_state["round"] + 1}
        for k in STATS:
            state[k] = server_state[k] + sum(torch.from_numpy(np.array(rep[k])).to(self.device) for rep in replies)
        means, covariances = self.estimate(state)
        x, y = self.synthesise(means, covariances, state["seed"] * 1000 + state["round"])
        c = self.config
        state["classifier"] = train_mlp(x, y, self.num_classes, c.classifier_hidden, c.classifier_epochs, seed=0)
        return state, {"noisy_count_total": float(state["counts"].sum())}

    def estimate(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class means (C, D) and covariances (C, D, D) from the summed noisy statistics; a count below
        one (a class nobody holds, or noise) counts as one."""
        counts, sums, moments = state["counts"].double(), state["sums"].double(), state["moments"].double()
        n = counts.clamp_min(1.0)
        means = sums / n[:, None]
        if self.config.covariance == "pooled":
            total = n.sum()
            pooled = moments.sum(0) / total - torch.einsum("c,ci,cj->ij", n / total, means, means)
            covariances = pooled.expand(self.num_classes, -1, -1)
        else:
            covariances = moments / n[:, None, None] - means[:, :, None] * means[:, None, :]
        return means.float(), self._floor(covariances).float()

    def _floor(self, covariances: torch.Tensor) -> torch.Tensor:
        sym = (covariances + covariances.transpose(1, 2)) / 2
        values, vectors = torch.linalg.eigh(sym)
        values = values.clamp_min(self.config.min_eigenvalue)
        return vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2)

    def synthesise(self, means: torch.Tensor, covariances: torch.Tensor, seed: int, per_class: int | None = None):
        """``per_class`` (default ``synthetic_per_class``) draws per class from N(μ_c, Σ_c): ``(x, y)``."""
        n = per_class or self.config.synthetic_per_class
        g = torch.Generator(device="cpu").manual_seed(seed)  # CPU draws: the same on every device
        factors = torch.linalg.cholesky(covariances.double()).float()
        z = torch.randn(self.num_classes, n, self.dims, generator=g, device="cpu").to(means.device)
        x = means[:, None] + z @ factors.transpose(1, 2)
        return x.reshape(-1, self.dims), torch.arange(self.num_classes, device=means.device).repeat_interleave(n)

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        clf = server_state.get("classifier")
        if not clf:
            return None
        from sklearn.metrics import balanced_accuracy_score

        pred = classify(clf, self.project(x)).argmax(1)
        return {
            "global_acc": float((pred == y).float().mean()),
            "global_balanced_acc": float(balanced_accuracy_score(y.cpu().numpy(), pred.cpu().numpy())),
        }

    @torch.no_grad()
    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        clf = {
            k[4:]: torch.from_numpy(np.array(v)).to(self.device)
            for k, v in received.arrays.items()
            if k.startswith("clf/")
        }
        if not clf or not len(data.y_test):
            return {}
        pred = classify(clf, self.project(data.x_test)).argmax(1)
        return {"personal_acc": float((pred == data.y_test).float().mean())}

    def privacy_report(self, client_states, all_accountants: bool = True):
        c = self.config
        space = basis_for_embeddings(c.public_basis, c.encoder, c.public_dims, c.image_size, self.task.input_shape[0])
        std_n, std_s, std_m = self.layer.noise_stds(c.mean_share)
        return self.layer.report(
            client_states.values(),
            all_accountants,
            public_space=space.describe(),
            noise_std_count=std_n,
            noise_std_sum=std_s,
            noise_std_moment=std_m,
        )
