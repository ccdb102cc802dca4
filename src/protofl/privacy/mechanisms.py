"""Clipping, noise and the two prototype releases of VPDR (IGPP and VPP), as tensor functions.

Neighbouring relation (one rule for every release here): two local datasets are neighbours when
one example is replaced by another *of the same class*. Class counts and the set of classes a client
holds are therefore the same on both and are not protected.

Sensitivity, by ``SENSITIVITY_RULES``:

- ``fixed-features`` (the VPDR paper's analysis): the feature map is taken as fixed, i.e. not itself a
  function of the replaced example. Then the per-class mean of features clipped to norm ``R`` moves by
  at most ``2R / n_c`` (L2) and a change touches one class only, so releasing all classes at once is one
  Gaussian mechanism of that sensitivity (parallel composition over classes). This does **not** hold
  when the client's feature map was trained on the same data without DP (as in every personalised
  host here): replacing one example then changes the model and so every feature.
- ``trained-features``: valid whatever the feature map: every class mean of clipped features lies in
  the R-ball and can move by at most ``2R``, so the whole release (C classes) has L2 sensitivity
  ``2R·√C``, used for every class.

A class with a single example is released like any other (sensitivity ``2R`` under ``fixed-features``:
no special case, its noise is simply large).

Randomness comes from a caller's ``torch.Generator`` so simulations are reproducible; a deployment
that needs cryptographic noise should draw from the operating system's generator instead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from protofl.privacy.accounting import Event, GaussianEvent, PureDpEvent

SENSITIVITY_RULES = ("fixed-features", "trained-features")

__all__ = [
    "SENSITIVITY_RULES",
    "PrototypeRelease",
    "anova_scores",
    "clip_groups",
    "clip_rows",
    "gaussian_noise",
    "igpp_release",
    "laplace_noise",
    "private_top_k",
    "soft_clip",
    "vpp_group_noise",
    "vpp_release",
]


# --------------------------------------------------------------------------------------------------
# Clipping


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale every row to L2 norm at most ``bound`` (rows already inside are unchanged)."""
    norms = x.norm(dim=1, keepdim=True)
    return x * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)


def clip_groups(x: torch.Tensor, groups: list[torch.Tensor], bounds: list[float]) -> torch.Tensor:
    """Clip each row's coordinates ``groups[i]`` to L2 norm at most ``bounds[i]`` independently."""
    out = x.clone()
    for index, bound in zip(groups, bounds):
        if len(index):
            out[:, index] = clip_rows(x[:, index], bound)
    return out


def soft_clip(z: torch.Tensor, bound: float, tau: float) -> torch.Tensor:
    """DCR's differentiable clip ``z · min(1, R / (‖z‖ + τR))``: a clipped norm ``‖z‖R / (‖z‖ + τR)``
    stays below ``R``, and the gradient keeps flowing through clipped features."""
    return z * torch.clamp(bound / (z.norm(dim=1, keepdim=True) + tau * bound), max=1.0)


# --------------------------------------------------------------------------------------------------
# Noise


def gaussian_noise(shape: tuple[int, ...], std: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise (``std`` broadcast against ``shape``)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64) * torch.as_tensor(std, dtype=torch.float64)


def laplace_noise(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) noise by inversion of the CDF."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).numpy() - 0.5
    return torch.from_numpy(-scale * np.sign(u) * np.log1p(-2 * np.minimum(np.abs(u), 0.5 - 1e-16)))


# --------------------------------------------------------------------------------------------------
# VPP's pieces


def anova_scores(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-dimension one-way ANOVA F score of the features ``z`` (N, d) across the classes in ``y``:
    between-class mean square over (within-class mean square + ζ), ζ = 1e-3 × median of the
    between-class term. Zero everywhere when fewer than two classes or no within-class degrees of
    freedom are present (nothing to rank)."""
    return torch.from_numpy(_anova(z.detach().double().numpy(), y.numpy()))


def _anova(z: np.ndarray, y: np.ndarray, groups: _Groups | None = None) -> np.ndarray:
    """:func:`anova_scores` on float64 numpy arrays (a release runs it per client: numpy's per-call cost
    is a fraction of torch's on these small arrays). ζ takes the lower middle value, as ``torch.median``."""
    g = groups if groups is not None else _Groups.of(y)
    n, c = len(y), len(g.counts)
    if c < 2 or n <= c:
        return np.zeros(z.shape[1])
    means = g.sums(z) / g.counts[:, None]
    between = (g.counts[:, None] * (means - z.mean(0)) ** 2).sum(0) / (c - 1)
    within = ((z - means[g.inverse]) ** 2).sum(0) / (n - c)
    zeta = 1e-3 * np.sort(between)[(len(between) - 1) // 2]
    return between / np.maximum(within + zeta, 1e-300)


@dataclasses.dataclass(frozen=True)
class _Groups:
    """The classes present in labels ``y`` (sorted), their counts, each row's index among them and the
    (classes × rows) indicator matrix, so that per-class sums are one small matrix product."""

    classes: np.ndarray
    counts: np.ndarray
    inverse: np.ndarray
    indicator: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, num_classes: int = 0) -> _Groups:
        counts = np.bincount(y, minlength=num_classes)
        classes = np.flatnonzero(counts)
        inverse = np.searchsorted(classes, y)
        indicator = (inverse[None, :] == np.arange(len(classes))[:, None]).astype(np.float64)
        return cls(classes, counts[classes], inverse, indicator)

    def sums(self, z: np.ndarray) -> np.ndarray:
        return self.indicator @ z


def private_top_k(scores: torch.Tensor, k: int, cap: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """``epsilon``-DP choice of ``k`` high-scoring dimensions, by peeling: ``k`` rounds of
    report-noisy-max on the scores clipped to ``[0, cap]`` (per-score sensitivity ``cap``), each with
    fresh Laplace noise of scale ``λ = 2k·cap/ε`` (ε/k-DP per round, Dwork & Roth, Claim 3.9). The
    VPDR spec adds noise once and takes the top k (one-shot) with the same λ; fresh noise per round is
    the variant whose guarantee is the textbook one. Returns the sorted chosen indices."""
    d = len(scores)
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if k == d:
        return torch.arange(d)
    return torch.from_numpy(_top_k(scores.detach().double().numpy(), k, cap, epsilon, generator))


def _top_k(scores: np.ndarray, k: int, cap: float, epsilon: float, generator: torch.Generator) -> np.ndarray:
    """:func:`private_top_k`'s peeling (``0 < k < d``): all k rounds' noise in one draw (row i is round
    i's fresh noise, drawn in the same order as k draws of d); round i takes the first dimension of its
    row's descending (stable: ties to the lower index, as argmax) order not taken by an earlier round."""
    scale = 2 * k * cap / epsilon
    noisy = np.minimum(np.maximum(scores, 0), cap)[None, :] + laplace_noise((k, len(scores)), scale, generator).numpy()
    taken: set[int] = set()
    # Round i (0-based) skips at most i taken dimensions: the first k of each row's order suffice.
    for order in np.argsort(-noisy, axis=1, kind="stable")[:, :k].tolist():
        taken.add(next(j for j in order if j not in taken))
    return np.array(sorted(taken), dtype=np.int64)


def vpp_group_noise(d: int, k: int, noise_multiplier: float) -> tuple[float, float, float, float]:
    """``(κ_A, κ_B, s_A, s_B)``: VPP's clipping fractions and the noise multipliers of the two groups
    (noise std of group g = ``s_g × Δ``). With ``w_A = κ_B / (κ_A + κ_B)``, ``w_B = 1 − w_A`` and
    ``s_g = σ κ_g / √w_g``, ``κ_A²/s_A² + κ_B²/s_B² = 1/σ²``: the release is exactly as private as the
    isotropic Gaussian mechanism with multiplier σ. With an empty group B (k = d) it is IGPP."""
    kappa_a, kappa_b = math.sqrt(k / d), math.sqrt((d - k) / d)
    if k == d:
        return 1.0, 0.0, noise_multiplier, 0.0
    w_a = kappa_b / (kappa_a + kappa_b)
    w_b = 1 - w_a
    return kappa_a, kappa_b, noise_multiplier * kappa_a / math.sqrt(w_a), noise_multiplier * kappa_b / math.sqrt(w_b)


# --------------------------------------------------------------------------------------------------
# Releases


@dataclasses.dataclass(frozen=True, eq=False)
class PrototypeRelease:
    """What a client may publish: the classes it holds and their noisy prototypes, plus (kept local)
    the noise standard deviation used per class and coordinate, the selected group A (VPP) and the
    accounting events the release cost."""

    classes: torch.Tensor
    prototypes: torch.Tensor
    counts: torch.Tensor
    noise_std: torch.Tensor
    events: tuple[tuple[Event, int], ...]
    selected: torch.Tensor | None = None


def igpp_release(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    bound: float,
    noise_multiplier: float,
    generator: torch.Generator,
    sensitivity: str = "fixed-features",
) -> PrototypeRelease:
    """IGPP: clip every feature to norm ``bound``, average per class, add N(0, (σΔ)² I), Δ = 2R/n_c
    (``fixed-features``) or 2R√C (``trained-features``)."""
    if sensitivity not in SENSITIVITY_RULES:
        raise ValueError(f"unknown sensitivity rule {sensitivity!r}; valid: {', '.join(SENSITIVITY_RULES)}")
    # In float64 numpy (clip_rows and the class means, as in vpp_release), once per client per round.
    x, labels = z.detach().double().numpy(), y.numpy()
    clipped = x * np.minimum(bound / np.maximum(np.sqrt((x * x).sum(1)), 1e-12), 1.0)[:, None]
    groups = _Groups.of(labels, num_classes)
    counts = groups.counts
    means = groups.sums(clipped) / counts[:, None]
    delta = (
        2 * bound / counts
        if sensitivity == "fixed-features"
        else np.full(len(counts), 2 * bound * math.sqrt(len(counts)))
    )
    std = torch.from_numpy(noise_multiplier * delta)[:, None].expand(-1, x.shape[1])
    noisy = torch.from_numpy(means) + gaussian_noise(tuple(means.shape), std, generator)
    return PrototypeRelease(
        torch.from_numpy(groups.classes),
        noisy.float(),
        torch.from_numpy(counts),
        std,
        ((GaussianEvent(noise_multiplier), 1),),
    )


def vpp_release(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    bound: float,
    noise_multiplier: float,
    rho: float,
    score_cap: float,
    selection_epsilon: float,
    generator: torch.Generator,
    sensitivity: str = "fixed-features",
) -> PrototypeRelease:
    """VPP: private top-⌈ρd⌉ selection of discriminative dimensions (``selection_epsilon``-DP), groupwise
    clipping to ``R κ_A`` and ``R κ_B``, per-class means, and group noise ``s_A Δ`` on A, ``s_B Δ`` on B
    (see :func:`vpp_group_noise`); costs one pure-DP selection and one Gaussian release at σ."""
    if sensitivity not in SENSITIVITY_RULES:
        raise ValueError(f"unknown sensitivity rule {sensitivity!r}; valid: {', '.join(SENSITIVITY_RULES)}")
    # In float64 numpy (the same steps as anova_scores, private_top_k, clip_groups and the class means;
    # noise from ``generator`` in the same order), as this runs once per client per round.
    x, labels = z.detach().double().numpy(), y.numpy()
    d = x.shape[1]
    k = math.ceil(rho * d)
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    groups = _Groups.of(labels, num_classes)
    selected = np.arange(d) if k == d else _top_k(_anova(x, labels, groups), k, score_cap, selection_epsilon, generator)
    in_a = np.zeros(d, dtype=bool)
    in_a[selected] = True
    kappa_a, kappa_b, s_a, s_b = vpp_group_noise(d, k, noise_multiplier)
    # Groupwise clipping: each row's group-A coordinates to norm R κ_A, its group-B ones to R κ_B.
    sq = x * x
    scale_a = np.minimum(bound * kappa_a / np.maximum(np.sqrt(sq @ in_a), 1e-12), 1.0)
    scale_b = np.minimum(bound * kappa_b / np.maximum(np.sqrt(sq @ ~in_a), 1e-12), 1.0)
    clipped = x * scale_b[:, None]
    np.multiply(x, scale_a[:, None], out=clipped, where=in_a[None, :])
    present, counts = groups.classes, groups.counts
    means = groups.sums(clipped) / counts[:, None]
    per_coordinate = np.where(in_a, s_a, s_b)
    delta = (
        2 * bound / counts
        if sensitivity == "fixed-features"
        else np.full(len(counts), 2 * bound * math.sqrt(len(counts)))
    )
    std = torch.from_numpy(delta[:, None] * per_coordinate[None, :])
    noisy = torch.from_numpy(means) + gaussian_noise(tuple(means.shape), std, generator)
    classes_t, counts_t = torch.from_numpy(present), torch.from_numpy(counts)
    selected_t = torch.from_numpy(selected)
    events = ((PureDpEvent(selection_epsilon), 1), (GaussianEvent(noise_multiplier), 1))
    return PrototypeRelease(classes_t, noisy.float(), counts_t, std, events, selected_t)
