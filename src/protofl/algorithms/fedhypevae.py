"""FedHypeVAE (2026): a shared hypernetwork turns private client codes into conditional-VAE decoders and
class-conditional priors; trained with DP-SGD; its synthetic embeddings train a downstream classifier.

Spec: ../shared/specs/fedhypevae.md. What the paper leaves open is marked *inferred* there; our choices:

- **Inputs** are frozen-encoder embeddings. By default (``public_basis = "photos"``) they are projected
  onto the first ``public_dims`` principal components of the same encoder's embeddings of *public*
  images (crops of the photos bundled with scikit-image and scikit-learn; ``"mnist"``: MNIST digits,
  closer to Fashion-MNIST), in standardised coordinates (the public projection's mean and standard
  deviation; :mod:`protofl.data.public_basis`); the decoder's output is then linear. The generators,
  the MMD and the downstream classifier all work in that space, and the test embeddings are projected
  the same way. The 1280-d embeddings sit in a thin band of the public range, and a generator of
  1280-d outputs has too many numbers for DP-SGD at the clients' sizes (docs/benchmarks.md). With
  ``public_basis = "none"`` they are min-max normalised per dimension with a *public* range
  (``range_reference = "photos"``, values outside clipped) or already in [0, 1] (``"unit"``), and the
  decoder ends in a sigmoid.
- **Per client, private, never released**: an encoder q_ψ(z | x, y) (MLP) and a code c ∈ R^{d_c}.
- **Shared, φ**: base decoder layers (W_l, b_l) (3 hidden layers + output), a hypernetwork
  h(c) -> (s_l, β_l) with W_l^(c) = diag(1 + s_l) W_l, b_l^(c) = b_l + β_l (its last layer starts at
  zero, so every client starts at the base decoder), and a prior network (c, y) -> (μ, log σ²).
  ``hyper_rank = r >= 1`` (the default) replaces the hypernetwork's last layer by a rank-r pair
  (hidden -> r -> modulations, no non-linearity between, the second factor starting at zero) that
  modulates the hidden layers only, never the output layer; ``hyper_rank = 0`` is the full-rank head
  over every layer.
  ``code_dim = 0`` is the DP-CVAE baseline: one shared decoder, prior N(0, I), no hypernetwork.
- **Local objective per example**: ‖x − D_c(z, y)‖² (z ~ q_ψ; with ``output_variance``, the default,
  Σ_d (x_d − D_c(z, y)_d)² / σ_d² + log σ_d² with a learned σ², and synthesis draws D_c(z, y) + σ ⊙ ε)
  + β_KL KL(q_ψ ‖ p_c(·|y))
  + λ_MMD [k(x̃, x̃') − 2 k(x, x̃)] + λ_Lip R_Lip, with x̃, x̃' = D_c(z̃), z̃ ~ p_c(·|y), k an RBF kernel.
  *MMD decomposition*: the batch MMD² between real and generated samples couples examples; we use the
  per-example unbiased estimate: for each real example two generated samples of its class, the
  real–real term k(x, x') dropped (it has no gradient). Summed over a batch it is an unbiased estimate
  of the class-conditional MMD² up to that constant, and each term depends on one example only, so
  per-example clipping bounds every example's influence. R_Lip = ‖h(c + ξ) − h(c)‖² / ‖ξ‖²,
  ξ ~ N(0, r² I) (inferred form), included in every example's loss (it depends on c, so it is clipped too).
- **DP-SGD** (``[privacy] mechanism = "dp-sgd"``): per-example clipping by ghost clipping
  (:func:`ghost_clipped_sum`, from :mod:`protofl.privacy.ghost`'s pieces: norms from the layers' inputs
  and output gradients, then one re-weighted backward pass; exact, no per-example gradient tensors) or, with ``per_example_grads = "materialised"``, per-example gradients with
  ``torch.func`` (``vmap(grad)``: the decoder weights are generated, hooks would not see them), Poisson sampling at rate q = batch_size / n_k, clipping to C,
  noise N(0, σ²C²), Adam on the noisy gradient. *Where we differ*: the spec updates ψ and c with
  ordinary gradients; but they shape every later gradient of φ, so one example would then influence
  later φ updates outside its clipped contribution and the accounting would not hold. We clip and noise
  the gradient of (φ, ψ, c) as one vector; ψ and c still never leave the client. After each step the
  code is projected onto the ball of radius ``code_clip`` it is later released from (post-processing),
  so the released code is the trained one plus noise. The hypernetwork and the prior network take their
  own learning rate ``hyper_lr``: all examples share one code, so the hypernetwork's outputs move by
  O(hyper_hidden · lr) per Adam step, and at the decoder's rate they shut the decoder's ReLUs off. Only φ
  leaves, with the client's noise multiplier σ_k. The sampling rate uses the client's size n_k, which is
  treated as public (as Opacus does), and σ_k is a function of it. The server averages the clients' φ
  with weights 1/σ_k², normalised (``aggregation = "inverse-noise"``; ``"uniform"``: a plain mean), and
  applies the averaged update through server momentum (``server_momentum``, its buffer in the server
  state, so checkpointed with it); each client's Adam starts afresh every round.
- **Accounting per client** over every step of every round (RDP or PLD, Poisson-subsampled Gaussian),
  σ calibrated per client before its first step for the whole planned run: the φ rounds, the meta-code
  rounds and, if a code-based sampler is asked for, one release of the client's clipped code (Gaussian,
  sensitivity 2·code_clip, ``code_release_fraction`` of ε) and, with ``stats_fraction``, the first
  round's release of noisy class statistics (the DP class-Gaussian's mechanism,
  :mod:`protofl.privacy.class_statistics`, ``stats_fraction`` of ε; the server starts the decoder's
  output path at the released class means, or draws synthesis's within-class noise from the released
  pooled covariance). A client whose next round would exceed ε stops the run before that round.
- **After training**: the last ``meta_rounds`` rounds learn the *neutral meta-code* c₀ with φ frozen:
  clients send DP-SGD updates of c₀ (per-example MMD of D_{c₀} against their data). In the last round
  clients also release their noisy clipped codes when a code sampler is on. The server then synthesises
  ``synthetic_per_class`` embeddings per class with each sampler — ``neutral`` (c₀), ``mixture``
  (the mean of the released codes, c_π with uniform π) and ``clients`` (an equal mixture of the
  released codes' generators) — and trains one downstream classifier per sampler (an MLP on the
  normalised embeddings), broadcast for the clients' own test splits.
- **Bad input**: NaN or infinite embeddings, or fewer examples than ``batch_size``, stop the run at that
  client's step with the client named, before it trains or releases anything. A class no client holds
  is still synthesised (from its untrained prior); the server cannot know which classes are missing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vmap

from protofl.algorithms.base import Algorithm, ClientData, State, register
from protofl.config import ConfigError, check, check_choice
from protofl.data.public_basis import PUBLIC_SOURCES
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.accounting import LEDGER_KEY, Event, GaussianEvent, PrivacyLedger
from protofl.privacy.class_statistics import class_statistics_stds, noisy_class_statistics
from protofl.privacy.dpsgd import add_noise, noisy_clipped_mean, per_example_gradients, poisson_sample
from protofl.privacy.ghost import clip_factors, linear_sq_norms, reweighted_sum
from protofl.privacy.layer import NEXT_ROUND_KEY, DPSGDLayer

SAMPLERS = ("neutral", "mixture", "clients")
#: What the server does with the first round's class statistics (``stats_uses``).
STATS_USES = ("init", "covariance")
#: With ``meta_rounds`` unset, one planned round in this many learns the meta-code.
META_ROUND_SHARE = 10


def _uniform_weights(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.full_like(sigmas, 1 / len(sigmas))


def _inverse_noise_weights(sigmas: torch.Tensor) -> torch.Tensor:
    precision = 1 / sigmas.clamp_min(1e-12) ** 2
    return precision / precision.sum()


#: The server's weights of the clients' φ from their noise multipliers σ_k (see ``aggregation``).
AGGREGATIONS = {"uniform": _uniform_weights, "inverse-noise": _inverse_noise_weights}
Params = dict[str, torch.Tensor]
PHI_PREFIX = "phi/"
#: Client-state key of the client's DP-SGD noise multiplier (for the report).
SIGMA_KEY = "noise_multiplier"
#: Reply keys of the first round's class statistics (``stats_fraction``).
STATS_PREFIX = "stats/"


@dataclasses.dataclass(frozen=True)
class FedHypeVAEConfig:
    #: Sizes: latent z, hidden width of encoder/decoder, client code (0: the DP-CVAE baseline), hypernetwork.
    latent_dim: int = 32
    hidden_dim: int = 256
    code_dim: int = 32
    hyper_hidden: int = 64
    #: Loss weights: beta_KL (predecessor 0.1), MMD, Lipschitz penalty and its probe radius r. The
    #: synthetic data come from the prior, so the KL term has to hold the encoder's posterior to it: at 0.1
    #: the posterior drifts off and prior samples decode near the centre (Fashion-MNIST, 10 rounds, the
    #: output layer at 3e-2: without noise 61.5 % at 0.1, 63.5 % at 4; at epsilon 1 with the Gaussian
    #: decoder 59.9 % at 1, 61.5 % at 4).
    beta_kl: float = 4.0
    mmd_weight: float = 1.0
    lip_weight: float = 0.01
    lip_radius: float = 0.01
    #: RBF kernel bandwidth as a multiple of sqrt(D) in the generator's space (``None``: 0.05 in the [0, 1]
    #: range space, 1.0 in a public basis's standardised coordinates).
    mmd_bandwidth: float | None = None
    #: Local DP-SGD (``[privacy] mechanism = "dp-sgd"``, whose section holds ε, δ, the accountant and the
    #: clip norm C): steps per round, expected (Poisson) batch size, learning rates (Adam) of phi and of
    #: the private encoder and code.
    steps_per_round: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    private_lr: float = 3e-3
    #: Adam learning rate of the hypernetwork and the prior network (``None``: ``lr``). Every output of
    #: the hypernetwork's last layer sums ``hyper_hidden`` inputs that move together (the whole batch shares
    #: one code), so at the decoder's rate the modulations jump by O(hyper_hidden · lr) a step and can shut
    #: whole ReLU layers off; we measured dead decoders within 40 steps at lr 1e-2.
    hyper_lr: float | None = None
    #: Adam learning rate of the decoder's output layer, its bias and the label's output weights (the
    #: per-class path) included (``None``: ``lr``). Each Adam step moves a parameter by about its rate, so
    #: at lr 3e-3 the 400 steps of a 20-round run move the output bias by about 1 per coordinate at most,
    #: while Fashion-MNIST's centre in the public MNIST space has norm 11 and its class means sit about 10
    #: from their centre: the generator then stopped at 52 % without noise, below the class means alone.
    output_lr: float | None = 3e-2
    #: The neutral meta-code c0: the last meta_rounds of the planned rounds learn it (``None``: one in ten of
    #: them, at least one and never all, so 3 rounds give 1 and 20 give 2), with meta_steps DP-SGD steps a
    #: round at Adam learning rate meta_lr. A short run thus keeps most of its rounds for the generator
    #: (:meth:`meta_rounds_of`); a one-round run learns no meta-code.
    meta_rounds: int | None = None
    meta_steps: int = 20
    meta_lr: float = 0.05
    #: Code release for the code samplers: share of epsilon and the clip norm of a code.
    code_release_fraction: float = 0.1
    code_clip: float = 1.0
    #: A release of noisy class statistics in the first round (the DP class-Gaussian's mechanism,
    #: :mod:`protofl.privacy.class_statistics`: every class's count and sum of the client's embeddings in
    #: the public space, each clipped to ``privacy.clip_bound``, and with ``"covariance"`` in
    #: ``stats_uses`` their second moments), costing ``stats_fraction`` of ε in the client's one ledger; the
    #: DP-SGD steps get σ for what is left (composed by the accountant). 0: no release, every round trains.
    #: The first round then trains nothing: the server sums the releases and uses them (post-processing)
    #: as ``stats_uses`` says: ``init`` sets the decoder's output bias to the noisy global mean and the
    #: label's output weights to the noisy class offsets, so that DP-SGD refines the class directions
    #: rather than learns them; ``covariance`` draws synthesis's within-class noise from the noisy pooled
    #: covariance (its Cholesky factor, eigenvalues floored at ``stats_min_eigenvalue``) instead of the
    #: Gaussian decoder's learned diagonal.
    stats_fraction: float = 0.0
    stats_uses: tuple[str, ...] = ("init",)
    #: Of the precision the counts leave (``privacy.count_fraction``), the sums' share when the second
    #: moments are released too (``covariance``); without them the sums get all of it.
    stats_mean_share: float = 0.5
    stats_min_eigenvalue: float = 0.05
    #: Shrink each released class offset (mean − global mean) towards the global mean by the positive-part
    #: James–Stein factor max(0, 1 − D·v_c / ‖offset_c‖²), v_c = K·s² / n_c² the public noise variance of a
    #: coordinate of the summed class mean (K releases, s the sums' noise, n_c the noisy count):
    #: post-processing that damps the offsets of classes too small for the release's noise.
    stats_shrink: bool = False
    #: Where the synthetic embeddings come from, one downstream classifier each: ``neutral`` (c0),
    #: ``mixture`` (the mean released code), ``clients`` (the released codes' generators); the first is the
    #: headline.
    samplers: tuple[str, ...] = SAMPLERS
    #: Downstream: synthetic examples per class, classifier epochs and hidden width.
    synthetic_per_class: int = 500
    classifier_epochs: int = 30
    classifier_hidden: int = 256
    #: ``photos`` (public range from embedded photo crops; needs ``encoder``) or ``unit`` (inputs in [0, 1]);
    #: used only with ``public_basis = "none"``.
    range_reference: str = "photos"
    #: The space the generators and the downstream classifier work in: ``none`` (the embeddings themselves,
    #: scaled to [0, 1] by ``range_reference``) or the public images (``photos``, ``mnist``;
    #: :mod:`protofl.data.public_basis`, never client data) whose embeddings' first ``public_dims``
    #: principal components, in standardised coordinates, make the space (declared in summary.json).
    public_basis: str = "photos"
    public_dims: int = 64
    #: Hypernetwork head: 0 is the full-rank head modulating every decoder layer (the paper's form); r >= 1 a
    #: rank-r head modulating the hidden layers only (never the output layer), far fewer DP-trained numbers.
    hyper_rank: int = 4
    #: The class label enters the decoder's output layer too (its input is [h, one-hot y]), not only the
    #: first layer: a direct, linear per-class path (C x D numbers) that carries the class means. Through
    #: the first layer alone the label has to survive three ReLU layers while the encoder's z, which sees
    #: x, carries the class as well; at the benchmark's sizes, trained centrally without noise, synthetic
    #: data from prior samples then trains a classifier to 43 % on Fashion-MNIST, against 57-60 % with
    #: the label at the output (and 61 % for the class means alone). ``False``: the label at the first
    #: layer only (the earlier form).
    label_at_output: bool = True
    #: A Gaussian decoder with a learned per-dimension variance σ² (in φ, DP-trained like the rest): the
    #: reconstruction term becomes Σ_d (x_d − μ_d)² / σ_d² + log σ_d² (twice the Gaussian negative
    #: log-likelihood; at σ² = 1, where it starts, the plain squared error) and synthesis draws
    #: μ + σ ⊙ ε instead of the decoder's mean alone. Needs a public basis (a linear output).
    output_variance: bool = True
    #: Rank r of a learned low-rank factor A (D x r, in φ, DP-trained like the rest) added to the Gaussian
    #: decoder's covariance, diag(σ²) + A Aᵀ: the reconstruction term is then the full Gaussian's (Woodbury
    #: form, an r x r solve per example) and synthesis adds A u, u ~ N(0, I_r), to μ + σ ⊙ ε. 0: the
    #: diagonal alone. Needs ``output_variance``.
    output_rank: int = 0
    #: φ holds A / ``output_factor_scale``: the factor's share of each example's clipped gradient (and its
    #: Adam step, at the output layer's rate) shrinks by this factor, so that under DP noise it does not
    #: take the clip budget from the class path.
    output_factor_scale: float = 0.1
    #: How the server averages the clients' φ: ``inverse-noise`` (weights 1/σ_k², normalised; σ_k follows
    #: from the client's size, treated as public as for the sampling rate) or ``uniform``.
    aggregation: str = "inverse-noise"
    #: Server momentum on the averaged update of φ (0: none; the server keeps the buffer) and the server's
    #: step size on it.
    server_momentum: float = 0.5
    server_lr: float = 1.0
    #: The encoder of the data's embeddings and its input size: the public images are embedded the same way.
    encoder: str = "efficientnet-lite0"
    image_size: int = 32
    #: How DP-SGD gets each example's clipped gradient: ``ghost`` (per-example norms from activations and
    #: output gradients, then one re-weighted backward pass; :mod:`protofl.privacy.ghost`) or
    #: ``materialised`` (``torch.func`` per-example gradients). Same clipping and noise, same accounting.
    per_example_grads: str = "ghost"

    def __post_init__(self) -> None:
        for key in (
            "latent_dim",
            "hidden_dim",
            "hyper_hidden",
            "steps_per_round",
            "batch_size",
            "synthetic_per_class",
            "classifier_hidden",
            "meta_steps",
        ):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.code_dim >= 0, "code_dim", f"must be >= 0 (0: DP-CVAE baseline), got {self.code_dim}")
        for key in ("beta_kl", "mmd_weight", "lip_weight"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("hyper_lr", "output_lr"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be > 0, got {value}")
        for key in ("lip_radius", "lr", "private_lr", "meta_lr", "code_clip"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        check(self.meta_rounds is None or self.meta_rounds >= 0, "meta_rounds", f"must be >= 0, got {self.meta_rounds}")
        check(self.classifier_epochs >= 1, "classifier_epochs", f"must be >= 1, got {self.classifier_epochs}")
        check(
            0 < self.code_release_fraction < 1,
            "code_release_fraction",
            f"must be in (0, 1), got {self.code_release_fraction}",
        )
        check(len(self.samplers) >= 1, "samplers", "name at least one sampler")
        for s in self.samplers:
            check_choice(s, SAMPLERS, "samplers")
        check(
            self.code_dim > 0 or self.samplers == ("neutral",) or set(self.samplers) == {"neutral"},
            "samplers",
            "code_dim = 0 (DP-CVAE) has no codes: use samplers = ['neutral']",
        )
        check_choice(self.range_reference, ("photos", "unit"), "range_reference")
        check_choice(self.public_basis, ("none", *PUBLIC_SOURCES), "public_basis")
        check(self.public_dims >= 1, "public_dims", f"must be >= 1, got {self.public_dims}")
        check(self.hyper_rank >= 0, "hyper_rank", f"must be >= 0 (0: full-rank head), got {self.hyper_rank}")
        check_choice(self.aggregation, tuple(AGGREGATIONS), "aggregation")
        check(0 <= self.server_momentum < 1, "server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        check(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        check(
            self.mmd_bandwidth is None or self.mmd_bandwidth > 0,
            "mmd_bandwidth",
            f"must be > 0, got {self.mmd_bandwidth}",
        )
        check_choice(self.per_example_grads, ("ghost", "materialised"), "per_example_grads")
        check(0 <= self.stats_fraction < 1, "stats_fraction", f"must be in [0, 1), got {self.stats_fraction}")
        check(
            not (self.stats_fraction and self.releases_codes) or self.stats_fraction + self.code_release_fraction < 1,
            "stats_fraction",
            f"with code_release_fraction {self.code_release_fraction} must leave DP-SGD a share of epsilon "
            f"(their sum < 1), got {self.stats_fraction}",
        )
        check(len(self.stats_uses) >= 1, "stats_uses", "name at least one use: 'init', 'covariance'")
        for use in self.stats_uses:
            check_choice(use, STATS_USES, "stats_uses")
        check(0 < self.stats_mean_share < 1, "stats_mean_share", f"must be in (0, 1), got {self.stats_mean_share}")
        check(self.stats_min_eigenvalue > 0, "stats_min_eigenvalue", f"must be > 0, got {self.stats_min_eigenvalue}")
        check(
            not self.stats_fraction or self.public_basis != "none",
            "stats_fraction",
            "needs a public basis (the statistics are released in its space)",
        )
        check(
            not self.stats_fraction or "init" not in self.stats_uses or self.label_at_output,
            "stats_uses",
            "'init' sets the label's output weights: needs label_at_output = true",
        )
        check(
            not self.stats_fraction or "covariance" not in self.stats_uses or self.output_variance,
            "stats_uses",
            "'covariance' replaces the Gaussian decoder's diagonal at synthesis: needs output_variance = true",
        )
        check(self.output_factor_scale > 0, "output_factor_scale", f"must be > 0, got {self.output_factor_scale}")
        check(self.output_rank >= 0, "output_rank", f"must be >= 0 (0: diagonal only), got {self.output_rank}")
        check(
            not self.output_rank or self.output_variance,
            "output_rank",
            "needs output_variance (the low-rank factor extends the Gaussian decoder's covariance)",
        )
        check(
            not self.output_variance or self.public_basis != "none",
            "output_variance",
            "needs a public basis (public_basis = 'none' ends the decoder in a sigmoid)",
        )

    def meta_rounds_of(self, planned: int) -> int:
        """How many of ``planned`` rounds learn the meta-code: none without codes (DP-CVAE), ``meta_rounds``
        when set, else one in ``META_ROUND_SHARE`` (at least one, never all of them)."""
        if not self.code_dim:
            return 0
        if self.meta_rounds is not None:
            return self.meta_rounds
        return max(0, min(max(1, planned // META_ROUND_SHARE), planned - 1))

    @property
    def releases_stats(self) -> bool:
        return self.stats_fraction > 0

    @property
    def releases_codes(self) -> bool:
        return self.code_dim > 0 and bool(set(self.samplers) & {"mixture", "clients"})

    @property
    def bandwidth_multiple(self) -> float:
        if self.mmd_bandwidth is not None:
            return self.mmd_bandwidth
        return 0.05 if self.public_basis == "none" else 1.0


# --------------------------------------------------------------------------------------------------
# The model, as functions of parameter dicts (so vmap(grad) sees through the generated weights)


def _linear_init(out_dim: int, in_dim: int, generator: torch.Generator, zero: bool = False):
    if zero:
        return torch.zeros(out_dim, in_dim, device=generator.device), torch.zeros(out_dim, device=generator.device)
    bound = 1 / math.sqrt(in_dim)
    return (
        (torch.rand(out_dim, in_dim, generator=generator, device=generator.device) * 2 - 1) * bound,
        (torch.rand(out_dim, generator=generator, device=generator.device) * 2 - 1) * bound,
    )


def decoder_sizes(c: FedHypeVAEConfig, input_dim: int, num_classes: int) -> list[tuple[int, int]]:
    h = c.hidden_dim
    return [(h, c.latent_dim + num_classes), (h, h), (h, h), (input_dim, h + num_classes * c.label_at_output)]


def init_phi(
    c: FedHypeVAEConfig, input_dim: int, num_classes: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The shared parameters φ: base decoder, hypernetwork (last layer zero), prior network."""
    phi: dict[str, torch.Tensor] = {}
    sizes = decoder_sizes(c, input_dim, num_classes)
    for l, (o, i) in enumerate(sizes):
        phi[f"dec{l}.w"], phi[f"dec{l}.b"] = _linear_init(o, i, generator)
    if c.output_variance:  # log σ² of the Gaussian decoder, per output dimension, starting at σ² = 1
        phi[output_logvar_key(sizes)] = torch.zeros(input_dim, device=generator.device)
    if c.output_rank:  # the covariance's low-rank factor A; small, not zero (at A = 0 its gradient is zero)
        a = torch.randn(input_dim, c.output_rank, generator=generator, device=generator.device)
        phi[output_factor_key(sizes)] = 0.1 * a / c.output_factor_scale
    if c.code_dim:
        modulation = sum(2 * o for o, _ in sizes[: modulated_layers(c, len(sizes))])
        phi["hyper0.w"], phi["hyper0.b"] = _linear_init(c.hyper_hidden, c.code_dim, generator)
        if c.hyper_rank:  # low rank: hidden -> rank -> modulations, the last factor starts at zero
            phi["hyper1.w"], phi["hyper1.b"] = _linear_init(c.hyper_rank, c.hyper_hidden, generator)
            phi["hyper2.w"], phi["hyper2.b"] = _linear_init(modulation, c.hyper_rank, generator, zero=True)
        else:
            phi["hyper1.w"], phi["hyper1.b"] = _linear_init(modulation, c.hyper_hidden, generator, zero=True)
        phi["prior0.w"], phi["prior0.b"] = _linear_init(c.hyper_hidden, c.code_dim + num_classes, generator)
        phi["prior1.w"], phi["prior1.b"] = _linear_init(2 * c.latent_dim, c.hyper_hidden, generator)
    return phi


#: The Gaussian decoder's log σ² is used clamped to ±this in the loss and at synthesis (the encoder's and
#: the prior's log-variances are clamped alike): a value driven far out by noisy steps cannot overflow.
LOGVAR_BOUND = 8.0


def output_logvar_key(sizes: list[tuple[int, int]]) -> str:
    """φ's key of the Gaussian decoder's log σ² (``output_variance``): with the output layer's parameters,
    so that it takes the output layer's learning rate."""
    return f"dec{len(sizes) - 1}.logvar"


def output_factor_key(sizes: list[tuple[int, int]]) -> str:
    """φ's key of the low-rank covariance factor A (``output_rank``), with the output layer's parameters."""
    return f"dec{len(sizes) - 1}.factor"


def gaussian_nll2(e: torch.Tensor, logvar: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """Twice the Gaussian negative log-likelihood of residuals ``e`` (B, D), up to a constant, under the
    covariance diag(exp ``logvar``) + A Aᵀ with ``factor`` A (B, D, r; ``None``: the diagonal alone).
    Woodbury: eᵀΣ⁻¹e = eᵀD⁻¹e − wᵀM⁻¹w and log|Σ| = Σ log σ² + log|M|, M = I + AᵀD⁻¹A, w = AᵀD⁻¹e."""
    inv = (-logvar).exp()
    out = (e**2 * inv + logvar).sum(-1)
    if factor is None:
        return out
    m = torch.eye(factor.shape[-1], dtype=e.dtype, device=e.device) + factor.mT @ (factor * inv[..., None])
    w = (factor.mT @ (e * inv)[..., None]).squeeze(-1)
    chol = torch.linalg.cholesky(m)
    v = torch.cholesky_solve(w[..., None], chol).squeeze(-1)
    return out - (w * v).sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def modulated_layers(c: FedHypeVAEConfig, layers: int) -> int:
    """How many decoder layers (from the first) the hypernetwork modulates: all of them with the full-rank
    head, the hidden ones (never the output layer) with the low-rank head."""
    return layers - 1 if c.hyper_rank else layers


def hyper_head(phi: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The hypernetwork's head: its hidden activations -> all modulations (one linear layer, or the
    low-rank pair ``hyper2 ∘ hyper1`` with no non-linearity between)."""
    out = F.linear(hidden, phi["hyper1.w"], phi["hyper1.b"])
    return F.linear(out, phi["hyper2.w"], phi["hyper2.b"]) if "hyper2.w" in phi else out


def modulations(phi: dict[str, torch.Tensor], code: torch.Tensor, sizes: list[tuple[int, int]]):
    """Per decoder layer ``(s_l, β_l)`` from the code (``(None, None)`` for a layer it does not modulate,
    and for every layer without a hypernetwork)."""
    if "hyper0.w" not in phi:
        return [(None, None)] * len(sizes)
    flat = hyper_head(phi, torch.tanh(F.linear(code, phi["hyper0.w"], phi["hyper0.b"])))
    out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    start = 0
    for o, _ in sizes:
        if start + 2 * o > flat.shape[-1]:  # the low-rank head leaves the output layer alone
            out.append((None, None))
            continue
        out.append((flat[start : start + o], flat[start + o : start + 2 * o]))
        start += 2 * o
    return out


def decode(
    phi, z: torch.Tensor, y1h: torch.Tensor, mods, squash: bool = True, *, label_at_output: bool
) -> torch.Tensor:
    """D_c(z, y): W_l^(c) = diag(1 + s_l) W_l, b_l^(c) = b_l + β_l, ReLU, then a sigmoid output in [0, 1]
    (``squash``, the range space) or a linear one (a public basis's standardised coordinates). The label
    enters the first layer, and the output layer too with ``label_at_output`` (the configuration's flag,
    the same rule as :func:`batch_losses` and :func:`decoder_sizes`).

    Row-scaling a weight matrix scales that layer's outputs, (diag(1 + s) W) h = (1 + s) ⊙ (W h), so the
    modulated weights are never formed (per-example gradients would otherwise hold one copy each)."""
    h = torch.cat([z, y1h], dim=-1)
    last = len(mods) - 1
    for l, (s, beta) in enumerate(mods):
        w, b = phi[f"dec{l}.w"], phi[f"dec{l}.b"]
        if l == last and label_at_output:
            h = torch.cat([h, y1h], dim=-1)
        h = F.linear(h, w, b) if s is None else F.linear(h, w) * (1 + s) + (b + beta)
        if l < last:
            h = F.relu(h)
        elif squash:
            h = torch.sigmoid(h)
    return h


def prior(phi, code: torch.Tensor, y1h: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p_c(z | y): (μ, log σ²); N(0, I) without a hypernetwork."""
    if "prior0.w" not in phi:
        zeros = torch.zeros(*y1h.shape[:-1], latent_dim, device=y1h.device)
        return zeros, zeros
    inp = torch.cat([code.expand(*y1h.shape[:-1], -1), y1h], dim=-1)
    out = F.linear(torch.tanh(F.linear(inp, phi["prior0.w"], phi["prior0.b"])), phi["prior1.w"], phi["prior1.b"])
    return out[..., :latent_dim], out[..., latent_dim:].clamp(-8, 8)


def init_encoder(c: FedHypeVAEConfig, input_dim: int, num_classes: int, generator: torch.Generator):
    psi = {}
    for l, (o, i) in enumerate(
        [(c.hidden_dim, input_dim + num_classes), (c.hidden_dim, c.hidden_dim), (2 * c.latent_dim, c.hidden_dim)]
    ):
        psi[f"enc{l}.w"], psi[f"enc{l}.b"] = _linear_init(o, i, generator)
    return psi


def encode(psi, x: torch.Tensor, y1h: torch.Tensor, latent_dim: int):
    h = torch.cat([x, y1h], dim=-1)
    for l in range(3):
        h = F.linear(h, psi[f"enc{l}.w"], psi[f"enc{l}.b"])
        if l < 2:
            h = F.relu(h)
    return h[..., :latent_dim], h[..., latent_dim:].clamp(-8, 8)


def rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-((a - b) ** 2).sum(-1) / (2 * bandwidth**2))


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)), summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


def mmd_squared(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD² between samples ``a`` and ``b`` with an RBF kernel (a report metric)."""

    def kernel(x, y):
        return torch.exp(-(torch.cdist(x.double(), y.double()) ** 2) / (2 * bandwidth**2))

    def mean_offdiag(x):
        k = kernel(x, x)
        n = len(x)
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    return float(mean_offdiag(a) + mean_offdiag(b) - 2 * kernel(a, b).mean())


# --------------------------------------------------------------------------------------------------
# The objective over a batch, and DP-SGD's clipped gradient sum by ghost clipping


def batch_noise(
    config: FedHypeVAEConfig, batch_size: int, device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of a batch's per-example losses, from the global generator of ``device``: the
    encoder's reparameterisation ε_z (B, L), the two generated samples' ε (B, 2, L), the Lipschitz probe
    ξ (B, d_c) (radius r applied here)."""
    return (
        torch.randn(batch_size, config.latent_dim, device=device),
        torch.randn(batch_size, 2, config.latent_dim, device=device),
        torch.randn(batch_size, config.code_dim, device=device) * config.lip_radius,
    )


def ghost_clipped_sum(
    algo: FedHypeVAE,
    params: Params,
    x: torch.Tensor,
    y1h: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    clip_norm: float,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Σ_i clip_C(∇L_i) over FedHypeVAE's DP-SGD parameters (``phi/…``, ``psi/…``, ``code``) with
    ghost norms (:mod:`protofl.privacy.ghost`); L_i is :func:`batch_losses`' loss of example i with the
    random numbers ``noise[·][i]``.
    Returns ``(summed clipped gradients, per-example norms, per-example losses)``.

    The batch runs in one pass: the encoder on (B, ·); the decoder on (B, T, ·) with T = 3 uses per
    example (the reconstruction and the two MMD samples; T = 1 without MMD). Per parameter group:

    - ψ (encoder), prior network: per-example linear layers, T = 1: ‖g‖²(‖a‖² + 1).
    - decoder base W_l, b_l: the modulated layer is u = (1 + s) ⊙ (W a) + b + β, so with g = ∂L_i/∂u,
      ∂L_i/∂W = Σ_t ((1 + s) ⊙ g_t) a_tᵀ (still rank one per use) and ∂L_i/∂b = Σ_t g_t: the T-use
      Gram formula with the output gradients scaled by 1 + s.
    - hypernetwork: its output m = h(c) (all s_l, β_l) is shared by the batch. It is replicated per
      example, so the first backward pass gives v_i = ∂L_i/∂m. The per-example gradient of a parameter θ
      behind m is Jᵀv_i, of squared norm v_iᵀ(J Jᵀ)v_i; for the two-layer hypernetwork m = W₁ tanh(W₀c +
      b₀) + b₁ that Gram form factorises layer by layer: W₁'s rows see the shared input tanh(·) (rank
      one), and W₀'s output gradient is p_i = (1 − tanh²) ⊙ W₁ᵀv_i, a (B, hyper_hidden) product, so
      no (B, |θ|) tensor and no |m| x |m| Gram matrix is formed.
    - The Lipschitz term runs the hypernetwork again on c + ξ_i, a per-example input: W₀, b₀, W₁, b₁ are
      then used twice per example (shared use and probe), handled by the T = 2 Gram formula, which keeps
      the cross terms (the norm of a sum is not the sum of norms).
    - the code c (d_c numbers) enters the hypernetwork twice and the prior's input; its per-example
      gradient W₀ᵀp_i + W₀ᵀp'_i + (prior₀ input gradient)[:d_c] is formed: (B, d_c) is small.

    The MMD term is already a per-example sum (each example's two generated samples are its own), so it
    is just two more decoder uses of that example; nothing couples examples."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    rec: dict[str, Any] = {}
    loss = batch_losses(algo, leaves, x, y1h, noise, rec)
    taps = rec["taps"]
    grads = dict(zip(taps, torch.autograd.grad(loss.sum(), list(taps.values()), retain_graph=True)))
    with torch.no_grad():
        phi = {k[4:]: v.detach() for k, v in leaves.items() if k.startswith("phi/")}
        sq = _ghost_sq_norms(
            algo, phi, leaves["code"].detach(), rec["acts"], grads, rec["scales"], rec["hid"], rec["lip"]
        )
    weights, norms = clip_factors(sq, clip_norm)
    return reweighted_sum(loss, weights, leaves), norms, loss.detach()


def batch_losses(
    algo: FedHypeVAE,
    params: Params,
    x: torch.Tensor,
    y1h: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    record: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The local objective: the per-example losses (B,) of a batch (see the module docstring), with the
    random numbers ``noise`` (:func:`batch_noise`; the MMD and Lipschitz draws may be ``None`` when those
    terms are off). The one definition of the loss: :meth:`FedHypeVAE.example_loss` is it on a batch of
    one, and ghost clipping reads the linear layers' inputs and outputs it leaves in ``record`` (``taps``,
    ``acts``, ``scales``, ``hid``, ``lip``). Without clipping, ``losses.sum()`` is the plain step's
    objective."""
    c = algo.config
    lat = c.latent_dim
    phi = {k[4:]: v for k, v in params.items() if k.startswith("phi/")}
    psi = {k[4:]: v for k, v in params.items() if k.startswith("psi/")}
    code = params["code"]
    eps_z, eps_gen, xi = noise
    b = x.shape[0]
    taps: dict[str, torch.Tensor] = {}  # tensors whose per-example gradients the first pass computes
    acts: dict[str, torch.Tensor] = {}  # the inputs of the linear layers at those taps

    h = torch.cat([x, y1h], -1)
    for l in range(3):
        acts[f"psi/enc{l}"] = h
        h = taps[f"psi/enc{l}"] = F.linear(h, psi[f"enc{l}.w"], psi[f"enc{l}.b"])
        if l < 2:
            h = F.relu(h)
    mu_q, logvar_q = h[:, :lat], h[:, lat:].clamp(-8, 8)
    z = mu_q + eps_z * (0.5 * logvar_q).exp()

    hyper = "hyper0.w" in phi
    if hyper:
        hid = torch.tanh(F.linear(code, phi["hyper0.w"], phi["hyper0.b"]))
        m = taps["m"] = hyper_head(phi, hid).expand(b, -1)
        pin = acts["phi/prior0"] = torch.cat([code.expand(b, -1), y1h], -1)
        u = taps["phi/prior0"] = F.linear(pin, phi["prior0.w"], phi["prior0.b"])
        acts["phi/prior1"] = ph = torch.tanh(u)
        out = taps["phi/prior1"] = F.linear(ph, phi["prior1.w"], phi["prior1.b"])
        mu_p, logvar_p = out[:, :lat], out[:, lat:].clamp(-8, 8)
    else:
        mu_p = logvar_p = torch.zeros(b, lat, device=y1h.device)
    kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)

    zs = z[:, None]
    if c.mmd_weight:
        assert eps_gen is not None  # drawn whenever the MMD term is on
        zs = torch.cat([zs, mu_p[:, None] + eps_gen * (0.5 * logvar_p).exp()[:, None]], 1)
    h = torch.cat([zs, y1h[:, None].expand(-1, zs.shape[1], -1)], -1)
    scales: dict[str, torch.Tensor] = {}
    start, last = 0, len(algo.sizes) - 1
    modulated = modulated_layers(c, len(algo.sizes)) if hyper else 0
    for l, (o, _) in enumerate(algo.sizes):
        w, bias = phi[f"dec{l}.w"], phi[f"dec{l}.b"]
        if l == last and c.label_at_output:
            h = torch.cat([h, y1h[:, None].expand(-1, h.shape[1], -1)], -1)
        acts[f"phi/dec{l}"] = h
        if l < modulated:
            s, beta = m[:, start : start + o], m[:, start + o : start + 2 * o]
            start += 2 * o
            scales[f"phi/dec{l}"] = (1 + s)[:, None].detach()
            h = taps[f"phi/dec{l}"] = F.linear(h, w) * (1 + s)[:, None] + (bias + beta)[:, None]
        else:
            h = taps[f"phi/dec{l}"] = F.linear(h, w, bias)
        if l < last:
            h = F.relu(h)
        elif algo.squash:
            h = torch.sigmoid(h)
    if c.output_variance:
        logvar = taps["logvar"] = phi[output_logvar_key(algo.sizes)].expand(b, -1)
        factor = None
        if c.output_rank:
            taps["factor"] = phi[output_factor_key(algo.sizes)].expand(b, -1, -1)
            factor = c.output_factor_scale * taps["factor"]
        # bounded as the encoder's and the prior's are, so a drifting log σ² cannot overflow exp(−log σ²)
        loss = gaussian_nll2(x - h[:, 0], logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND), factor) + c.beta_kl * kl
    else:
        loss = ((x - h[:, 0]) ** 2).sum(-1) + c.beta_kl * kl
    if c.mmd_weight:
        loss = loss + c.mmd_weight * (rbf(h[:, 1], h[:, 2], algo.bandwidth) - 2 * rbf(x, h[:, 1], algo.bandwidth))
    lip = bool(c.lip_weight and c.code_dim)
    if lip:
        assert xi is not None  # drawn whenever the Lipschitz term is on
        shifted = acts["probe0"] = code + xi
        u = taps["probe0"] = F.linear(shifted, phi["hyper0.w"], phi["hyper0.b"])
        acts["probe1"] = hs = torch.tanh(u)
        m2 = taps["probe1"] = hyper_head(phi, hs)
        loss = loss + c.lip_weight * ((m2 - m) ** 2).sum(-1) / (xi**2).sum(-1)
    if record is not None:
        record.update(taps=taps, acts=acts, scales=scales, hid=hid.detach() if hyper else None, lip=lip)
    return loss


def _ghost_sq_norms(algo, phi, code, acts, grads, scales, hid, lip):
    """Σ over FedHypeVAE's parameters of the per-example squared gradient norms (see
    :func:`ghost_clipped_sum`)."""
    c = algo.config
    b = grads["psi/enc0"].shape[0]
    hyper = hid is not None
    sq = torch.zeros(b, dtype=grads["psi/enc0"].dtype, device=grads["psi/enc0"].device)
    for name in ("psi/enc0", "psi/enc1", "psi/enc2", "phi/prior0", "phi/prior1"):
        if name in grads:
            sq = sq + sum(linear_sq_norms(acts[name], grads[name]))
    if "logvar" in grads:  # replicated per example, so its tap's gradient is each example's own
        sq = sq + grads["logvar"].square().sum(-1)
    if "factor" in grads:  # the same: (B, D, r)
        sq = sq + grads["factor"].square().sum((-2, -1))
    for l in range(len(algo.sizes)):
        name = f"phi/dec{l}"
        g = grads[name]
        w_sq, _ = linear_sq_norms(acts[name], g * scales[name] if name in scales else g)
        sq = sq + w_sq + g.sum(1).square().sum(-1)
    if hyper:
        # The head's layers, last first: (name, input of the shared use, input of the probe or None). Each
        # sees the output gradient of its use; the next one down gets it through the layer's weights.
        uses = [(hid[None], acts["probe1"] if lip else None)]
        if "hyper2.w" in phi:
            mid = F.linear(hid, phi["hyper1.w"], phi["hyper1.b"])
            mid_probe = F.linear(acts["probe1"], phi["hyper1.w"], phi["hyper1.b"]) if lip else None
            uses.insert(0, (mid[None], mid_probe))
        names = ["hyper2", "hyper1"][-len(uses) :]
        v, v_probe = grads["m"], grads["probe1"] if lip else None
        for name, (shared_in, probe_in) in zip(names, uses):
            a, g = shared_in.expand(b, -1)[:, None], v[:, None]
            if lip:
                a, g = torch.cat([a, probe_in[:, None]], 1), torch.cat([g, v_probe[:, None]], 1)
            sq = sq + sum(linear_sq_norms(a, g))
            v = v @ phi[f"{name}.w"]
            v_probe = v_probe @ phi[f"{name}.w"] if lip else None
        p = v * (1 - hid**2)  # ∂L_i/∂(W₀c + b₀) through the shared use
        a0, g0 = code[None, None], p[:, None]
        code_grad = p @ phi["hyper0.w"] + (grads["phi/prior0"] @ phi["prior0.w"])[:, : c.code_dim]
        if lip:
            a0 = torch.cat([a0.expand(b, 1, -1), acts["probe0"][:, None]], 1)
            g0 = torch.cat([g0, grads["probe0"][:, None]], 1)
            code_grad = code_grad + grads["probe0"] @ phi["hyper0.w"]
        sq = sq + sum(linear_sq_norms(a0, g0)) + code_grad.square().sum(-1)
    return sq


# --------------------------------------------------------------------------------------------------


@register
class FedHypeVAE(Algorithm):
    name = "fedhypevae"
    summary = "FedHypeVAE (2026): hypernetwork-generated CVAE decoders/priors from private codes, DP-SGD, synthetic embeddings"
    Config = FedHypeVAEConfig
    has_global_model = True
    privacy_mechanisms = ("dp-sgd",)
    requires_privacy = True

    def __init__(self, config: FedHypeVAEConfig, task, privacy=None):
        super().__init__(config, task, privacy)
        if len(task.input_shape) != 1:
            raise ConfigError(
                f"method.name: fedhypevae works on embeddings (D,), got inputs of shape {task.input_shape}; "
                "set data.features = 'efficientnet-lite0'"
            )
        self.dp = cast(DPSGDLayer, self.privacy_layer)
        #: The rounds the run plans (the schedule: the last ``meta_rounds`` of them learn the meta-code).
        self.planned_rounds = self.privacy.planned_releases
        #: The embeddings' dimension, and that of the space the generators work in (a public basis's).
        self.data_dim = task.input_shape[0]
        self.input_dim = self.data_dim if config.public_basis == "none" else config.public_dims
        if self.input_dim > self.data_dim:
            raise ConfigError(
                f"method.public_dims: must be <= the embeddings' {self.data_dim} dims, got {self.input_dim}"
            )
        #: Decoder output: a sigmoid into the [0, 1] range space, linear in standardised coordinates.
        self.squash = config.public_basis == "none"
        self.num_classes = task.num_classes
        self.sizes = decoder_sizes(config, self.input_dim, self.num_classes)
        self.bandwidth = config.bandwidth_multiple * math.sqrt(self.input_dim)
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None
        self._basis: Any = None
        self._metric_samples: dict[Any, Any] = {}

    @classmethod
    def validate_privacy(cls, config: FedHypeVAEConfig, privacy) -> None:
        super().validate_privacy(config, privacy)
        planned = privacy.planned_releases
        if config.code_dim and planned and config.meta_rounds is not None and planned <= config.meta_rounds:
            raise ConfigError(
                f"method.meta_rounds: must be < privacy.planned_releases ({planned}), got {config.meta_rounds}"
            )
        # (the release is accounted under add/remove, as DP-SGD is: the layer refuses replace-one)
        if config.releases_stats and planned and planned < 2 + config.meta_rounds_of(planned):
            raise ConfigError(
                f"method.stats_fraction: the statistics release takes the first round and DP-SGD needs one "
                f"more before the {config.meta_rounds_of(planned)} meta-code round(s); privacy.planned_releases "
                f"is {planned}"
            )

    # -- normalisation ---------------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) -> the generator's space: the public basis's standardised coordinates, or the
        [0, 1] range space."""
        if self.config.public_basis != "none":
            return self.basis().project(x)
        if self.config.range_reference == "unit":
            return x.clamp(0, 1)
        if self._range is None:
            from protofl.data.public import public_embedding_range

            low, high = public_embedding_range(self.config.encoder, self.config.image_size)
            if len(low) != self.input_dim:
                raise ConfigError(
                    f"method.encoder: {self.config.encoder} gives {len(low)}-d embeddings, the data has "
                    f"{self.data_dim}-d"
                )
            self._range = torch.from_numpy(low).to(x.device), torch.from_numpy(high).to(x.device)
        lo, hi = self._range
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    def basis(self):
        """The public basis (:func:`protofl.data.public_basis.public_basis`), fitted on first use."""
        if self._basis is None:
            from protofl.data.public_basis import basis_for_embeddings

            c = self.config
            self._basis = basis_for_embeddings(c.public_basis, c.encoder, c.public_dims, c.image_size, self.data_dim)
        return self._basis

    def dp_trained_numbers(self) -> int:
        """How many numbers each DP-SGD step clips and noises: φ, the client's encoder ψ and its code."""
        g = torch.Generator(device="cpu").manual_seed(0)
        phi = init_phi(self.config, self.input_dim, self.num_classes, g)
        psi = init_encoder(self.config, self.input_dim, self.num_classes, g)
        return sum(v.numel() for v in (*phi.values(), *psi.values())) + self.config.code_dim

    def privacy_report(self, client_states, all_accountants: bool = True):
        """The DP-SGD spend, plus what a reader needs to judge it: the DP-trained numbers, each client's
        noise multiplier σ, the server's weighting, and the public space the generators work in."""
        sigmas = {str(k): float(s[SIGMA_KEY]) for k, s in client_states.items() if SIGMA_KEY in s}
        space = (
            self.basis().describe()
            if self.config.public_basis != "none"
            else {"source": f"range:{self.config.range_reference}", "dims": self.input_dim}
        )
        return self.dp.report(
            client_states.values(),
            all_accountants,
            dp_trained_numbers=self.dp_trained_numbers(),
            noise_multiplier_per_client=sigmas,
            aggregation=self.config.aggregation,
            meta_rounds=self.meta_rounds,
            public_space=space,
            **self.stats_report(),
        )

    def stats_report(self) -> dict[str, Any]:
        """The class-statistics release's entries of the privacy report (none without one)."""
        c = self.config
        if not c.releases_stats:
            return {}
        std_n, std_s, std_m = self.stats_stds()
        return {
            "stats_release": {
                "epsilon_share": c.stats_fraction,
                "noise_multiplier": self.stats_sigma,
                "uses": list(c.stats_uses),
                "clip_bound": self.privacy.clip_bound,
                "noise_std_count": std_n,
                "noise_std_sum": std_s,
                "noise_std_moment": std_m,
                "round": 1,
            }
        }

    # -- schedule and budget ---------------------------------------------------------------------------
    @property
    def meta_rounds(self) -> int:
        """Rounds that learn the neutral meta-code (none without codes: DP-CVAE)."""
        return self.config.meta_rounds_of(self.planned_rounds)

    @property
    def stats_rounds(self) -> int:
        """Rounds that release class statistics and train nothing: the first, with ``stats_fraction``."""
        return 1 if self.config.releases_stats else 0

    @property
    def phi_rounds(self) -> int:
        return self.planned_rounds - self.meta_rounds - self.stats_rounds

    def round_kind(self, round_index: int) -> str:
        """What round ``round_index`` (1-based) does: ``stats`` (the class-statistics release), ``phi``
        (DP-SGD on the generator) or ``meta`` (the neutral meta-code)."""
        if round_index <= self.stats_rounds:
            return "stats"
        return "phi" if round_index <= self.stats_rounds + self.phi_rounds else "meta"

    @functools.cached_property
    def stats_sigma(self) -> float | None:
        """σ of the class-statistics release (``stats_fraction`` of ε alone at the run's δ), or None."""
        c = self.config
        return self.dp.gaussian_multiplier(c.stats_fraction * self.privacy.epsilon) if c.releases_stats else None

    def stats_stds(self) -> tuple[float, float, float | None]:
        """The release's noise standard deviations (count, sum coordinate, moment entry): the counts get
        ``privacy.count_fraction`` of its precision, the sums the rest, or ``stats_mean_share`` of the rest
        with the second moments (the ``covariance`` use)."""
        c, f = self.config, self.privacy.count_fraction
        assert self.stats_sigma is not None  # only with a statistics release
        rest = 1 - f
        shares = (f, rest * c.stats_mean_share, rest * (1 - c.stats_mean_share)) if self.stats_moments else (f, rest, 0)
        return class_statistics_stds(self.stats_sigma, self.privacy.clip_bound, shares)

    @property
    def stats_moments(self) -> bool:
        return "covariance" in self.config.stats_uses

    def planned_steps(self) -> int:
        return self.phi_rounds * self.config.steps_per_round + self.meta_rounds * self.config.meta_steps

    def noise(self, rate: float) -> tuple[float, float | None]:
        """``(σ of DP-SGD, σ of the code release or None)`` for a client sampled at ``rate``."""
        c = self.config
        extra: list[tuple[Event, int]] = []
        code_sigma = None
        if c.releases_codes:
            code_sigma = self.dp.gaussian_multiplier(c.code_release_fraction * self.privacy.epsilon)
            extra.append((GaussianEvent(code_sigma), 1))
        if self.stats_sigma is not None:
            extra.append((GaussianEvent(self.stats_sigma), 1))
        return self.dp.noise_multiplier(rate, self.planned_steps(), extra), code_sigma

    def rate(self, n: int) -> float:
        return self.config.batch_size / n

    def round_events(self, state: State, n: int, round_index: int):
        """What a client's participation in round ``round_index`` (1-based) costs."""
        c = self.config
        sigma, code_sigma = self.noise(self.rate(n))
        kind = self.round_kind(round_index)
        if kind == "stats":
            assert self.stats_sigma is not None  # a stats round exists only with a statistics release
            return [(GaussianEvent(self.stats_sigma), 1)]
        steps = c.steps_per_round if kind == "phi" else c.meta_steps
        events: list[tuple[Event, int]] = [(self.dp.step_event(self.rate(n), sigma), steps)]
        if round_index == self.planned_rounds and c.releases_codes:
            assert code_sigma is not None  # set whenever codes are released
            events.append((GaussianEvent(code_sigma), 1))
        return events

    def ledger(self, state: State) -> PrivacyLedger:
        return self.dp.ledger(state)

    # -- state and payloads ----------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        g = torch.Generator(device="cpu").manual_seed(seed)  # CPU draws: the same on every device
        state: State = {
            "round": 0,
            "phi": {
                k: v.to(self.device) for k, v in init_phi(self.config, self.input_dim, self.num_classes, g).items()
            },
            "meta_code": torch.zeros(self.config.code_dim, device=self.device),
        }
        if self.config.server_momentum:
            state["momentum"] = {k: torch.zeros_like(v) for k, v in state["phi"].items()}
        return state

    def init_client_state(self, seed: int) -> State:
        return {}  # built at the first participation (needs the client's id for its own seed)

    def _fresh_client(self, seed: int, client_id: int) -> State:
        g = torch.Generator(device="cpu").manual_seed(seed * 100_003 + client_id + 1)
        return {
            "psi": {
                k: v.to(self.device) for k, v in init_encoder(self.config, self.input_dim, self.num_classes, g).items()
            },
            "code": (0.1 * torch.randn(self.config.code_dim, generator=g, device="cpu")).to(self.device),
            LEDGER_KEY: [],
        }

    def dp_sgd_released(self) -> dict[str, str]:
        """The released arrays DP-SGD trains, each with its name in the steps' clipped sum (the privacy
        audit's gradient canaries): every shared parameter φ, under the same name."""
        return {name: name for name in self._phi_specs()}

    def _phi_specs(self) -> dict[str, ArraySpec]:
        g = torch.Generator(device="cpu").manual_seed(0)
        return {
            PHI_PREFIX + k: ArraySpec(tuple(v.shape))
            for k, v in init_phi(self.config, self.input_dim, self.num_classes, g).items()
        }

    def broadcast(self, server_state: State) -> Payload:
        arrays = {PHI_PREFIX + k: v.cpu().numpy() for k, v in server_state["phi"].items()}
        arrays["meta_code"] = server_state["meta_code"].cpu().numpy()
        arrays["round"] = np.int64(server_state["round"] + 1)
        for name, clf in server_state.get("classifiers", {}).items():
            arrays.update({f"clf/{name}/{k}": v.cpu().numpy() for k, v in clf.items()})
        return Payload(arrays, {"method": self.name})

    def broadcast_spec(self) -> PayloadSpec:
        specs = {
            **self._phi_specs(),
            "meta_code": ArraySpec((self.config.code_dim,)),
            "round": ArraySpec((), "int64", minimum=1),
        }
        clf = {
            "0.w": (self.config.classifier_hidden, self.input_dim),
            "0.b": (self.config.classifier_hidden,),
            "1.w": (self.num_classes, self.config.classifier_hidden),
            "1.b": (self.num_classes,),
        }
        for name in self.config.samplers:
            specs.update({f"clf/{name}/{k}": ArraySpec(shape) for k, shape in clf.items()})
        return PayloadSpec(self.name, specs, optional=tuple(k for k in specs if k.startswith("clf/")))

    def reply_spec(self) -> PayloadSpec:
        specs = {
            **self._phi_specs(),
            "meta_code": ArraySpec((self.config.code_dim,)),
            SIGMA_KEY: ArraySpec((), minimum=0),
        }
        if self.config.releases_codes:
            specs["noisy_code"] = ArraySpec((self.config.code_dim,))
        k, d = self.num_classes, self.input_dim
        if self.config.releases_stats:
            specs.update({STATS_PREFIX + "counts": ArraySpec((k,)), STATS_PREFIX + "sums": ArraySpec((k, d))})
            if self.stats_moments:
                specs[STATS_PREFIX + "moments"] = ArraySpec((k, d, d))
        return PayloadSpec(self.name, specs, optional=("noisy_code", *(n for n in specs if n.startswith(STATS_PREFIX))))

    def reply_spec_for(self, broadcast: Payload) -> PayloadSpec:
        """The reply to ``broadcast``: in the statistics round the ``stats/*`` arrays are required (a reply
        without them is malformed, and rejected, not summed), in every other round they are not allowed."""
        spec = self.reply_spec()
        stats_round = self.round_kind(int(broadcast["round"])) == "stats"
        arrays = {n: a for n, a in spec.arrays.items() if stats_round or not n.startswith(STATS_PREFIX)}
        optional = tuple(n for n in spec.optional if not n.startswith(STATS_PREFIX))
        return dataclasses.replace(spec, arrays=arrays, optional=optional)

    # -- client ----------------------------------------------------------------------------------------
    def example_loss(self, phi, psi, code, x, y1h, noise=None):
        """The local objective of one example (x, y) (shapes (D,), (C,)): :func:`batch_losses` on a batch of
        one. ``noise``: its random numbers (ε_z (L,), ε_gen (2, L), ξ (d_c,) with radius applied) instead of
        drawing them (in that order, each only where its term is on)."""
        c = self.config
        if noise is None:
            noise = (
                torch.randn(c.latent_dim, device=x.device),
                torch.randn(2, c.latent_dim, device=x.device) if c.mmd_weight else None,
                torch.randn(c.code_dim, device=x.device) * c.lip_radius if c.lip_weight and c.code_dim else None,
            )
        params = {**{"phi/" + k: v for k, v in phi.items()}, **{"psi/" + k: v for k, v in psi.items()}, "code": code}
        batch = tuple(None if n is None else n[None] for n in noise)
        return batch_losses(self, params, x[None], y1h[None], batch)[0]

    def meta_example_loss(self, meta_code, phi, x, y1h):
        """Per-example MMD of the generator at the meta-code against one real example."""
        c = self.config
        mods = modulations(phi, meta_code, self.sizes)
        mu_p, logvar_p = prior(phi, meta_code, y1h, c.latent_dim)
        gen = decode(
            phi,
            mu_p + torch.randn(2, c.latent_dim, device=x.device) * (0.5 * logvar_p).exp(),
            y1h.expand(2, -1),
            mods,
            self.squash,
            label_at_output=c.label_at_output,
        )
        return rbf(gen[0], gen[1], self.bandwidth) - 2 * rbf(x, gen[0], self.bandwidth)

    def _check_data(self, data: ClientData) -> None:
        if not bool(torch.isfinite(data.x_train).all()):
            raise ValueError(
                f"client {data.client_id}: its embeddings contain NaN or infinite values; nothing was released"
            )
        if data.num_train < self.config.batch_size:
            raise ValueError(
                f"client {data.client_id}: {data.num_train} training examples, fewer than method.batch_size="
                f"{self.config.batch_size}; lower the batch size or leave the client out (nothing was released)"
            )

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        self._check_data(data)
        c = self.config
        round_index = int(received["round"])
        if "psi" in client_state:
            state = client_state
        else:  # first training: its own encoder and code, but whatever it spent before (a rejected reply) stays
            state = {
                **self._fresh_client(int(generator.initial_seed()) % 2**31, data.client_id),
                LEDGER_KEY: client_state.get(LEDGER_KEY, []),
            }
        events = self.round_events(state, data.num_train, round_index)
        ledger = self.dp.spend(state, events, f"client {data.client_id}")  # raises before any training or release
        rate = self.rate(data.num_train)
        sigma, code_sigma = self.noise(rate)
        x = self.normalise(data.x_train)
        y1h = F.one_hot(data.y_train, self.num_classes).float()
        phi = {
            k[len(PHI_PREFIX) :]: torch.from_numpy(np.array(v)).to(self.device)
            for k, v in received.arrays.items()
            if k.startswith(PHI_PREFIX)
        }
        meta_code = torch.from_numpy(np.array(received["meta_code"])).to(self.device)
        metrics: dict[str, float] = {}
        kind = self.round_kind(round_index)
        arrays: dict[str, Any] = {}
        if kind == "stats":  # spent above: the release alone, φ goes back as received
            stats = noisy_class_statistics(
                x, data.y_train, self.num_classes, self.privacy.clip_bound, self.stats_stds(), generator
            )
            released = {"counts": stats.counts, "sums": stats.sums, "moments": stats.moments}
            arrays.update({STATS_PREFIX + k: v.cpu().numpy() for k, v in released.items() if v is not None})
        else:
            with torch.random.fork_rng(devices=[]):
                # vmap's per-example random numbers (the reparameterisation noise) come from the global generator
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
                torch.manual_seed(seed)
                if kind == "phi":
                    phi, psi, code, loss = self._train_phi(
                        phi, state["psi"], state["code"], x, y1h, rate, sigma, generator
                    )
                    state = {**state, "psi": psi, "code": code}
                else:
                    meta_code, loss = self._train_meta_code(meta_code, phi, x, y1h, rate, sigma, generator)
            metrics["train_loss"] = loss
        arrays.update({PHI_PREFIX + k: v.cpu().numpy() for k, v in phi.items()})
        arrays["meta_code"] = meta_code.cpu().numpy()
        arrays[SIGMA_KEY] = np.float32(sigma)  # a function of the client's size, public like its sampling rate
        if round_index == self.planned_rounds and c.releases_codes:
            assert code_sigma is not None  # set whenever codes are released
            clipped = state["code"] * min(1.0, c.code_clip / max(float(state["code"].norm()), 1e-12))
            noise = torch.randn(c.code_dim, generator=generator, device=generator.device)  # on the CPU: released
            arrays["noisy_code"] = (clipped.cpu() + noise * code_sigma * 2 * c.code_clip).numpy()
        state = {**state, LEDGER_KEY: ledger, SIGMA_KEY: float(sigma)}
        # Announce what the next round would cost (checked before it starts; the round after this one,
        # which is what a client sampled every round takes next, and past the plan a round of meta-steps).
        state[NEXT_ROUND_KEY] = self.dp.next_round_state(self.round_events(state, data.num_train, round_index + 1))
        return state, Payload(arrays, {"method": self.name}), metrics

    def _train_phi(self, phi, psi, code, x, y1h, rate, sigma, generator):
        """DP-SGD on (φ, ψ, c) jointly: each example's gradient with respect to all three is clipped as one
        vector and noised. ψ and c never leave the client, but they shape every later gradient of φ, so
        updating them with ordinary gradients (as a plain reading of the paper would) would let every
        example influence the later φ updates outside the clipping; noised, they are post-processing."""
        c = self.config
        params = {
            **{"phi/" + k: v.clone() for k, v in phi.items()},
            **{"psi/" + k: v.clone() for k, v in psi.items()},
            "code": code.clone(),
        }
        hyper, output = ("phi/hyper", "phi/prior"), f"phi/dec{len(self.sizes) - 1}."
        opt_phi = torch.optim.Adam(
            [
                {
                    "params": [
                        v for k, v in params.items() if k.startswith("phi/") and not k.startswith((*hyper, output))
                    ],
                    "lr": c.lr,
                },
                {"params": [v for k, v in params.items() if k.startswith(output)], "lr": c.output_lr or c.lr},
                {"params": [v for k, v in params.items() if k.startswith(hyper)], "lr": c.hyper_lr or c.lr},
            ]
        )
        opt_private = torch.optim.Adam([v for k, v in params.items() if not k.startswith("phi/")], lr=c.private_lr)

        def loss(p, xi, yi):
            return self.example_loss(
                {k[4:]: v for k, v in p.items() if k.startswith("phi/")},
                {k[4:]: v for k, v in p.items() if k.startswith("psi/")},
                p["code"],
                xi,
                yi,
            )

        losses = []
        for _ in range(c.steps_per_round):
            index = poisson_sample(len(x), rate, generator)
            ghost = len(index) and c.per_example_grads == "ghost"
            if ghost:  # the same clipped sum and noise, without per-example gradient tensors
                summed, _, example_losses = ghost_clipped_sum(
                    self, params, x[index], y1h[index], batch_noise(c, len(index), x.device), self.dp.clip_norm
                )
                noisy = add_noise(summed, self.dp.clip_norm, sigma, rate * len(x), generator)
            else:
                grads = (
                    per_example_gradients(loss, params, x[index], y1h[index])
                    if len(index)
                    else {k: torch.zeros(0, *v.shape, device=v.device) for k, v in params.items()}
                )
                noisy, _ = noisy_clipped_mean(grads, self.dp.clip_norm, sigma, rate * len(x), generator)
            for k, v in params.items():
                v.grad = noisy[k]
            opt_phi.step()
            opt_private.step()
            with torch.no_grad():  # keep the code in the ball it is released from (post-processing)
                params["code"].mul_(min(1.0, c.code_clip / max(float(params["code"].norm()), 1e-12)))
            if ghost:  # a local diagnostic, never sent
                losses.append(float(example_losses[:64].mean()))
            elif len(index):
                with torch.no_grad():
                    losses.append(
                        float(
                            vmap(lambda xi, yi: loss(params, xi, yi), randomness="different")(
                                x[index][:64], y1h[index][:64]
                            ).mean()
                        )
                    )
        out = {k: v.detach() for k, v in params.items()}
        return (
            {k[4:]: v for k, v in out.items() if k.startswith("phi/")},
            {k[4:]: v for k, v in out.items() if k.startswith("psi/")},
            out["code"],
            float(np.mean(losses)) if losses else float("nan"),
        )

    def _train_meta_code(self, meta_code, phi, x, y1h, rate, sigma, generator):
        c = self.config
        meta = meta_code.clone()
        optimizer = torch.optim.Adam([meta], lr=c.meta_lr)
        losses = []
        for _ in range(c.meta_steps):
            index = poisson_sample(len(x), rate, generator)
            if len(index):
                grads = per_example_gradients(
                    lambda m, xi, yi: self.meta_example_loss(m["code"], phi, xi, yi),
                    {"code": meta},
                    x[index],
                    y1h[index],
                )
                with torch.no_grad():
                    losses.append(
                        float(
                            vmap(lambda xi, yi: self.meta_example_loss(meta, phi, xi, yi), randomness="different")(
                                x[index], y1h[index]
                            ).mean()
                        )
                    )
            else:
                grads = {"code": torch.zeros(0, c.code_dim, device=meta.device)}
            noisy, _ = noisy_clipped_mean(grads, self.dp.clip_norm, sigma, rate * len(x), generator)
            meta.grad = noisy["code"]
            optimizer.step()
        return meta.detach(), float(np.mean(losses)) if losses else float("nan")

    # -- server ----------------------------------------------------------------------------------------
    def server_step(self, server_state: State, replies: list[Payload]):
        r = server_state["round"] + 1
        c = self.config
        sigmas = torch.tensor([float(np.array(rep[SIGMA_KEY])) for rep in replies], dtype=torch.float64, device="cpu")
        weights = AGGREGATIONS[c.aggregation](sigmas).float().to(self.device)

        def average(key: str) -> torch.Tensor:
            stacked = torch.stack([torch.from_numpy(np.array(rep[key])).to(self.device) for rep in replies])
            return torch.tensordot(weights, stacked, dims=1)

        old = server_state["phi"]
        state: State = {"round": r, "phi": old, "meta_code": server_state["meta_code"]}
        state.update({k: server_state[k] for k in ("stats_means", "stats_factor") if k in server_state})
        kind = self.round_kind(r)
        if kind == "stats":
            state.update(self.use_statistics(old, replies))
            if "momentum" in server_state:
                state["momentum"] = server_state["momentum"]
        elif kind == "phi":
            update = {k: average(PHI_PREFIX + k) - v for k, v in old.items()}
            if c.server_momentum:
                update = {k: c.server_momentum * server_state["momentum"][k] + u for k, u in update.items()}
                state["momentum"] = update
            state["phi"] = {k: v + c.server_lr * update[k] for k, v in old.items()}
        else:
            state["meta_code"] = average("meta_code")
            if "momentum" in server_state:
                state["momentum"] = server_state["momentum"]
        metrics: dict[str, float] = {"aggregation_weight_max": float(weights.max())}
        if r == self.planned_rounds:
            codes = [
                torch.from_numpy(np.array(rep["noisy_code"])).to(self.device)
                for rep in replies
                if "noisy_code" in rep.arrays
            ]
            state["released_codes"] = (
                torch.stack(codes) if codes else torch.zeros(0, self.config.code_dim, device=self.device)
            )
            state["classifiers"] = {
                name: self.train_classifier(*self.synthesise(state, name, r)) for name in self.config.samplers
            }
            metrics["synthetic_per_class"] = float(self.config.synthetic_per_class)
        return state, metrics

    def use_statistics(self, phi: Params, replies: list[Payload]) -> State:
        """The server's use of the first round's class-statistics releases (post-processing): the summed
        noisy counts and sums give every class's mean (a count below one counts as one; a mean outside the
        clip ball, where no true mean lies, is projected onto it) and the count-weighted global mean.
        ``init``: the decoder's output bias becomes the global mean and the label's output weights the
        class offsets. ``covariance``: the pooled within-class covariance from the summed second moments,
        projected onto the matrices with eigenvalues >= ``stats_min_eigenvalue``, and its Cholesky factor
        kept for synthesis. Returns the server-state entries that change."""
        c = self.config
        names = [STATS_PREFIX + k for k in ("counts", "sums", *(("moments",) if self.stats_moments else ()))]
        lacking = [i for i, rep in enumerate(replies) if not set(names) <= rep.arrays.keys()]
        if lacking or not replies:
            # the engines reject such replies (reply_spec_for); a caller that skips them gets this line
            raise ValueError(
                f"the statistics round needs {', '.join(names)} in every reply; replies {lacking} lack them"
                if lacking
                else "the statistics round needs at least one reply"
            )

        def total(key: str) -> torch.Tensor:
            # summed on the CPU in float64 (not every device has it); the results move to the device below
            arrays = [torch.from_numpy(np.array(rep[STATS_PREFIX + key])).to("cpu", torch.float64) for rep in replies]
            return torch.stack(arrays).sum(0)

        n = total("counts").clamp_min(1.0)
        means = total("sums") / n[:, None]
        radius = self.privacy.clip_bound
        means = means * (radius / means.norm(dim=1, keepdim=True).clamp_min(radius))
        centre = (n[:, None] * means).sum(0) / n.sum()
        if c.stats_shrink:
            # K noisy sums were added up (one per reply, every reply carries one): K times the variance
            noise_var = len(replies) * self.stats_stds()[1] ** 2 / n**2
            offsets = means - centre
            factor = (1 - means.shape[1] * noise_var / offsets.square().sum(1).clamp_min(1e-12)).clamp_min(0)
            means = centre + factor[:, None] * offsets
        out: State = {"stats_means": means.float().to(self.device)}
        if "init" in c.stats_uses:
            last = len(self.sizes) - 1
            weight = phi[f"dec{last}.w"].clone()
            weight[:, -self.num_classes :] = (means - centre).T.float().to(self.device)
            out["phi"] = {**phi, f"dec{last}.w": weight, f"dec{last}.b": centre.float().to(self.device)}
        if "covariance" in c.stats_uses:
            pooled = total("moments").sum(0) / n.sum() - torch.einsum("c,ci,cj->ij", n / n.sum(), means, means)
            values, vectors = torch.linalg.eigh((pooled + pooled.T) / 2)
            floored = vectors @ torch.diag(values.clamp_min(c.stats_min_eigenvalue)) @ vectors.T
            out["stats_factor"] = torch.linalg.cholesky(floored).float().to(self.device)
        return out

    # -- synthesis and the downstream classifier --------------------------------------------------------
    @torch.no_grad()
    def synthesise(self, state: State, sampler: str, seed: int, per_class: int | None = None, temperature: float = 1.0):
        """Class-balanced synthetic (normalised) embeddings from ``sampler``: ``(x, y)``; ``temperature``
        scales the prior's standard deviation of z (1: the prior itself)."""
        c = self.config
        n = per_class or c.synthetic_per_class
        g = torch.Generator(device="cpu").manual_seed(seed)  # CPU draws: the same on every device
        y = torch.arange(self.num_classes, device=self.device).repeat_interleave(n)
        if sampler == "neutral" or not c.code_dim:
            codes = state["meta_code"].expand(len(y), -1) if c.code_dim else torch.zeros(len(y), 1, device=self.device)
        elif sampler == "mixture":
            codes = state["released_codes"].mean(0).expand(len(y), -1)
        else:  # an equal mixture of the released codes' generators
            pick = torch.randint(0, len(state["released_codes"]), (len(y),), generator=g, device="cpu")
            codes = state["released_codes"][pick]
        phi = state["phi"]
        out = torch.empty(len(y), self.input_dim, device=self.device)
        y1h = F.one_hot(y, self.num_classes).float()
        unique, which = torch.unique(codes, dim=0, return_inverse=True)
        for j, code in enumerate(unique):  # one decoder per distinct code
            rows = torch.nonzero(which == j).flatten()
            mods = modulations(phi, code, self.sizes)
            mu, logvar = prior(phi, code, y1h[rows], c.latent_dim)
            z = (
                mu
                + torch.randn(len(rows), c.latent_dim, generator=g, device="cpu").to(mu.device)
                * (0.5 * logvar).exp()
                * temperature
            )
            out[rows] = decode(phi, z, y1h[rows], mods, self.squash, label_at_output=c.label_at_output)
            if "stats_factor" in state:  # the released pooled covariance instead of the learned diagonal
                eps = torch.randn(len(rows), self.input_dim, generator=g, device="cpu").to(self.device)
                out[rows] += eps @ state["stats_factor"].T
            elif c.output_variance:  # the Gaussian decoder's draw, not its mean alone
                std = (0.5 * phi[output_logvar_key(self.sizes)].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)).exp()
                out[rows] += torch.randn(len(rows), self.input_dim, generator=g, device="cpu").to(std.device) * std
            if c.output_rank:  # the low-rank part of the covariance: A u
                u = torch.randn(len(rows), c.output_rank, generator=g, device="cpu").to(self.device)
                out[rows] += u @ (c.output_factor_scale * phi[output_factor_key(self.sizes)]).T
        return out, y

    def train_classifier(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """An MLP (D -> hidden -> C, ReLU) trained with Adam on ``(x, y)`` (:func:`train_mlp`)."""
        c = self.config
        return train_mlp(x, y, self.num_classes, c.classifier_hidden, c.classifier_epochs, seed)

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor):
        classifiers = server_state.get("classifiers")
        if not classifiers:
            return None
        from sklearn.metrics import balanced_accuracy_score, f1_score

        xn = self.normalise(x)
        out: dict[str, float] = {}
        for name, clf in classifiers.items():
            pred = classify(clf, xn).argmax(1)
            out[f"global_acc_{name}"] = float((pred == y).float().mean())
            out[f"global_balanced_acc_{name}"] = float(balanced_accuracy_score(y.cpu().numpy(), pred.cpu().numpy()))
            out[f"global_macro_f1_{name}"] = float(f1_score(y.cpu().numpy(), pred.cpu().numpy(), average="macro"))
            synth = self._metric_sample(server_state, name)
            real = xn[
                torch.randperm(len(xn), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")[:1000]
            ]
            out[f"global_mmd_{name}"] = mmd_squared(real, synth, self.bandwidth)
        out["global_acc"] = out[f"global_acc_{self.config.samplers[0]}"]
        return out

    def _metric_sample(self, state: State, sampler: str) -> torch.Tensor:
        """The synthetic sample the MMD metric uses, drawn once per round and sampler: evaluation runs
        again on every test subset (e.g. each domain) and should not synthesise again."""
        if self._metric_samples.get("round") != state["round"]:
            self._metric_samples = {"round": state["round"]}
        if sampler not in self._metric_samples:
            self._metric_samples[sampler] = self.synthesise(
                state, sampler, 12345, per_class=max(1, 1000 // self.num_classes)
            )[0]
        return self._metric_samples[sampler]

    @torch.no_grad()
    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        out = {}
        xn = self.normalise(data.x_test)
        for name in self.config.samplers:
            prefix = f"clf/{name}/"
            clf = {
                k[len(prefix) :]: torch.from_numpy(np.array(v)).to(self.device)
                for k, v in received.arrays.items()
                if k.startswith(prefix)
            }
            if clf and len(data.y_test):
                out[f"personal_acc_{name}"] = float((classify(clf, xn).argmax(1) == data.y_test).float().mean())
        if out:
            out["personal_acc"] = out[f"personal_acc_{self.config.samplers[0]}"]
        return out


def classify(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.relu(F.linear(x, p["0.w"], p["0.b"])), p["1.w"], p["1.b"])


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, hidden: int, epochs: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """An MLP (D -> hidden -> C, ReLU; :func:`classify`) trained with Adam (lr 1e-3, batches of 128) on
    ``(x, y)``: the downstream classifier of the synthetic-data methods."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # CPU draws: the same on every device
    p = {}
    p["0.w"], p["0.b"] = _linear_init(hidden, x.shape[1], g)
    p["1.w"], p["1.b"] = _linear_init(num_classes, hidden, g)
    p = {k: v.to(x.device).requires_grad_(True) for k, v in p.items()}
    optimizer = torch.optim.Adam(list(p.values()), lr=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g, device="cpu")
            for s in range(0, len(y), 128):
                i = order[s : s + 128]
                loss = F.cross_entropy(classify(p, x[i]), y[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return {k: v.detach() for k, v in p.items()}
