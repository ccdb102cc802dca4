"""Attacks that measure what released prototypes leak.

Threat model: the server (or anyone on the wire) sees a client's released prototypes. We evaluate the
strong, white-box version an auditor should use: the attacker also knows the client's feature map (the
frozen encoder and the client's adapter), so what it learns is bounded by the release alone.

- :func:`membership_inference`: for a candidate example (x, c), score ``−‖clip(z(x)) − p̃_c‖`` (members
  pulled the class mean towards themselves); AUC, TPR at fixed low FPRs and the attack advantage
  ``max(TPR − FPR)`` over thresholds, members = the client's training examples, non-members = its held-out
  examples of the same classes.
- :func:`invert_prototypes`: optimise images (parameterised through a sigmoid, so pixels stay in [0, 1])
  whose features match the released prototypes in squared error, with a total-variation prior
  (Adam, lr 0.01, TV weight 1e-3, early stopping on a loss plateau: the VPDR paper's recipe);
  :func:`reconstruction_scores` compares them with the class's real images (PSNR, SSIM against the
  closest real image) and in feature space (cosine with the clean prototype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from protofl.privacy.mechanisms import clip_rows

__all__ = [
    "MembershipResult",
    "invert_prototypes",
    "membership_inference",
    "prototype_distance_scores",
    "reconstruction_scores",
    "total_variation",
]


@dataclasses.dataclass(frozen=True)
class MembershipResult:
    auc: float
    tpr_at_fpr_1e2: float
    tpr_at_fpr_1e3: float
    advantage: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def prototype_distance_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    prototypes: torch.Tensor,
    clip_bound: float | None = None,
) -> torch.Tensor:
    """Membership score of each example: minus the distance of its (clipped) feature to its class's
    released prototype; examples of classes without a prototype get −inf."""
    z = clip_rows(features.double(), clip_bound) if clip_bound else features.double()
    rows = int(max(labels.max(), classes.max())) + 1
    table = torch.full((rows, z.shape[1]), float("nan"), dtype=torch.float64, device=z.device)
    table[classes.to(z.device)] = prototypes.double().to(z.device)
    distance = (z - table[labels]).norm(dim=1)
    minus_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=distance.device)
    return torch.where(torch.isnan(distance), minus_inf, -distance)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at the largest threshold whose FPR is at most ``target`` (0 if none)."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def membership_inference(member_scores: torch.Tensor, non_member_scores: torch.Tensor) -> MembershipResult:
    """ROC summary of a score that should be higher for members. With ``n`` non-members, TPR at
    FPR below ``1/n`` is measured at FPR 0 (report ``non_members`` with it)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    members = member_scores.double().numpy()
    others = non_member_scores.double().numpy()
    keep_m, keep_o = np.isfinite(members), np.isfinite(others)
    members, others = members[keep_m], others[keep_o]
    if not len(members) or not len(others):
        raise ValueError("membership inference needs at least one scored member and one non-member")
    y = np.r_[np.ones(len(members)), np.zeros(len(others))]
    s = np.r_[members, others]
    fpr, tpr, _ = roc_curve(y, s)
    return MembershipResult(
        auc=float(roc_auc_score(y, s)),
        tpr_at_fpr_1e2=_tpr_at(fpr, tpr, 1e-2),
        tpr_at_fpr_1e3=_tpr_at(fpr, tpr, 1e-3),
        advantage=float(np.max(tpr - fpr)),
        members=len(members),
        non_members=len(others),
    )


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV) per image, averaged."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_prototypes(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    steps: int = 300,
    lr: float = 0.01,
    tv_weight: float = 1e-3,
    patience: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Images ``(k, C, H, W)`` in [0, 1] whose ``feature_fn`` features approach ``targets`` ``(k, d)``;
    returns them and the loss per step. Stops early when the loss has not improved by 0.1 % for
    ``patience`` steps."""
    draws_on = "cpu" if generator is None else generator.device  # then moved to the targets' device
    noise = torch.randn((len(targets), *image_shape), generator=generator, device=draws_on).to(targets.device)
    logits = (0.1 * noise).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)  # on the pre-sigmoid pixels
    targets = targets.float()
    history: list[float] = []
    best, since = float("inf"), 0
    for _ in range(steps):
        x = torch.sigmoid(logits)
        loss = F.mse_loss(feature_fn(x), targets) + tv_weight * total_variation(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        history.append(value)
        if value < best * (1 - 1e-3):
            best, since = value, 0
        else:
            since += 1
            if since >= patience:
                break
    return torch.sigmoid(logits).detach(), history


def reconstruction_scores(reconstructions: torch.Tensor, references: list[torch.Tensor]) -> dict[str, float]:
    """Mean over reconstructions of the PSNR and SSIM against the closest (highest-SSIM) real image of
    its class (``references[i]``: that class's images ``(n, C, H, W)`` in [0, 1])."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims = [], []
    for rec, refs in zip(reconstructions, references):
        r = rec.permute(1, 2, 0).double().numpy()
        best = (-np.inf, 0.0)
        for ref in refs:
            t = ref.permute(1, 2, 0).double().numpy()
            ssim = structural_similarity(t, r, data_range=1.0, channel_axis=2, win_size=7)
            if ssim > best[0]:
                best = (ssim, peak_signal_noise_ratio(t, r, data_range=1.0))
        ssims.append(best[0])
        psnrs.append(best[1])
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
