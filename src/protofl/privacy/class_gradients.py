"""Noisy per-class gradient uploads (private CReFF and FedHPro; the model they upload next to them is
protected by DP-SGD, :func:`protofl.privacy.dpsgd.dp_sgd_steps`).

CReFF and FedHPro clients upload, per class, the gradient of the cross-entropy of the linear head
``(W, b)`` at the features ``z = φ(x)`` of their examples (the head gradient ``[dW, db]``) and, for
FedHPro, the gradient w.r.t. the features themselves (the feature gradient ``Wᵀ(softmax − e_y)``). Each is
a mean over the examples of a class of a per-example vector. Under ``privacy.mechanism =
"dp-gradients"`` the release is:

- every example's *contribution* (its head gradient, and its feature gradient, as one vector) clipped to
  L2 norm ``C`` (``method.upload_clip``);
- summed per class, for **every** class ``0..C-1`` (a class the client lacks has sum 0);
- plus N(0, (σ_f·C)² I) on the sums and N(0, σ_n²) on every class count, ``(σ_f, σ_n) =``
  :func:`~protofl.privacy.mechanisms.split_multiplier` ``(σ, privacy.count_fraction)``.

One example added or removed moves one class sum by at most ``C`` and one count by 1, so by the argument
of :mod:`protofl.privacy.mechanisms` (the add/remove prototype release with ``R`` replaced by ``C``) the
pair is exactly one Gaussian mechanism of multiplier σ: one ``GaussianEvent(σ)`` per upload. The
gradients are taken at the model the client *received* (public), before it trains, so no feature map
trained on the client's data enters the bound. What leaves the client is the post-processing
``noisy sum / max(noisy count, 1)`` per class (the clean mean of clipped contributions, plus noise) and
the noisy counts; the server weighs them by those counts (post-processing).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from protofl.privacy.mechanisms import gaussian_noise, split_multiplier

__all__ = [
    "ClassGradientRelease",
    "class_gradient_release",
    "clipped_class_sums",
    "head_contributions",
]


@dataclasses.dataclass(frozen=True, eq=False)
class ClassGradientRelease:
    """What a client may publish for every class ``0..C-1``: ``means`` (noisy sum / max(noisy count, 1)) and
    the noisy ``counts`` (float64); kept local: the noisy ``sums``, the noise standard deviation of every
    coordinate of a sum (``sum_std`` = σ_f·C) and of a count (``count_std`` = σ_n), and the share of the
    contributions that were clipped (a diagnostic of private data, not covered by ε)."""

    means: torch.Tensor
    counts: torch.Tensor
    sums: torch.Tensor
    sum_std: float
    count_std: float
    clipped_fraction: float


def head_contributions(
    weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, feature: bool = False
) -> torch.Tensor:
    """Each example's gradient of ``CE(W z_i + b, y_i)`` as one row: ``[vec(g_i z_iᵀ), g_i]`` (head
    gradient w.r.t. ``W`` and ``b``), followed by ``Wᵀ g_i`` (w.r.t. ``z_i``) when ``feature``, with
    ``g_i = softmax(W z_i + b) − e_{y_i}``. The mean of these rows over a class's examples is
    :func:`protofl.gradient_matching.head_gradients` (and ``input_gradients``) of that class."""
    z = z.double()
    w, b = weight.double(), bias.double()
    g = torch.softmax(z @ w.t() + b, dim=1) - F.one_hot(labels.long(), w.shape[0]).double()
    parts = [(g[:, :, None] * z[:, None, :]).reshape(len(z), -1), g]
    if feature:
        parts.append(g @ w)
    return torch.cat(parts, dim=1)


def clipped_class_sums(
    contributions: torch.Tensor, labels: torch.Tensor, num_classes: int, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sums (C, D), counts (C,), norms (n,))``: every row of ``contributions`` scaled to L2 norm at most
    ``clip`` and summed per class of ``labels`` (float64); ``norms`` are the rows' norms before clipping.
    A row with a non-finite value counts as a zero row (inside the ball: the bound holds)."""
    rows = contributions.double()
    rows = torch.where(torch.isfinite(rows).all(1, keepdim=True), rows, torch.zeros_like(rows))
    norms = rows.norm(dim=1)
    clipped = rows * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)[:, None]
    sums = torch.zeros(num_classes, rows.shape[1], dtype=torch.float64, device=rows.device).index_add_(
        0, labels.long(), clipped
    )
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    return sums, counts, norms


def class_gradient_release(
    contributions: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    clip: float,
    noise_multiplier: float,
    count_fraction: float,
    generator: torch.Generator,
) -> ClassGradientRelease:
    """The release of the module docstring at multiplier ``noise_multiplier`` (one ``GaussianEvent``): the
    sums' noise is drawn first, then the counts'."""
    sums, counts, norms = clipped_class_sums(contributions, labels, num_classes, clip)
    sigma_f, sigma_n = split_multiplier(noise_multiplier, count_fraction)
    noisy_sums = sums + gaussian_noise(tuple(sums.shape), sigma_f * clip, generator)
    noisy_counts = counts + gaussian_noise((num_classes,), sigma_n, generator)
    return ClassGradientRelease(
        means=noisy_sums / noisy_counts.clamp_min(1.0)[:, None],
        counts=noisy_counts,
        sums=noisy_sums,
        sum_std=sigma_f * clip,
        count_std=sigma_n,
        clipped_fraction=float((norms > clip).double().mean()) if len(norms) else 0.0,
    )
