"""Attacks: the membership-inference summary against hand computations, and both attacks succeed on
an unprotected release and fail under heavy noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protofl.privacy import (
    igpp_release,
    invert_prototypes,
    membership_inference,
    prototype_distance_scores,
    reconstruction_scores,
    total_variation,
)


def test_membership_summary_equals_hand_computation():
    members = torch.tensor([0.9, 0.8, 0.3, 0.7])
    others = torch.tensor([0.1, 0.5, 0.2, 0.85, 0.0])
    r = membership_inference(members, others)
    # AUC = P(member score > non-member score) by counting pairs (Mann-Whitney)
    pairs = [(m > o) + 0.5 * (m == o) for m in members.tolist() for o in others.tolist()]
    assert r.auc == pytest.approx(np.mean(pairs))
    # thresholds 0.7: TPR 3/4 - FPR 1/5 = 0.55; 0.3: TPR 1 - FPR 2/5 = 0.6 (the best)
    assert r.advantage == pytest.approx(0.6)
    # below FPR 1e-2 no non-member may pass: threshold above 0.85 keeps 0.9 only
    assert r.tpr_at_fpr_1e2 == pytest.approx(0.25) and r.tpr_at_fpr_1e3 == pytest.approx(0.25)
    assert (r.members, r.non_members) == (4, 5)


def _client(seed=0, n=6, d=64, classes=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n * classes, d, generator=g)
    y = torch.arange(classes).repeat_interleave(2 * n)
    member = (torch.arange(len(y)) % (2 * n)) < n
    return z, y, member


def test_membership_inference_succeeds_on_clean_prototypes_and_fails_under_noise():
    z, y, member = _client()
    clipped = z  # norms are about 8; clip at a bound above them so "clean" is really clean
    clean = igpp_release(z[member], y[member], 5, 100.0, 1e-6, torch.Generator().manual_seed(1))
    scores = prototype_distance_scores(clipped, y, clean.classes, clean.prototypes)
    leaky = membership_inference(scores[member], scores[~member])
    assert leaky.auc > 0.9
    noisy = igpp_release(z[member], y[member], 5, 100.0, 50.0, torch.Generator().manual_seed(1))
    aucs = []
    for seed in range(20):
        noisy = igpp_release(z[member], y[member], 5, 100.0, 50.0, torch.Generator().manual_seed(seed))
        s = prototype_distance_scores(clipped, y, noisy.classes, noisy.prototypes)
        aucs.append(membership_inference(s[member], s[~member]).auc)
    assert abs(np.mean(aucs) - 0.5) < 0.08


def test_inversion_recovers_an_image_through_an_invertible_feature_map():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 1, 12, 12)
    image[..., 3:9, 5:7] = 1.0  # a bar: smooth, so the TV prior does not fight it much
    mixing = torch.randn(144, 144, generator=g) / 12

    def feature_fn(x):
        return x.flatten(1) @ mixing

    rec, history = invert_prototypes(
        feature_fn, feature_fn(image), (1, 12, 12), steps=400, lr=0.1, tv_weight=1e-4, patience=400, generator=g
    )
    assert history[-1] < 0.05 * history[0]
    scores = reconstruction_scores(rec, [image])
    assert scores["psnr"] > 18 and scores["ssim"] > 0.6
    blank = reconstruction_scores(torch.full_like(image, 0.5), [image])
    assert scores["psnr"] > blank["psnr"] + 8


def test_total_variation_of_constant_and_checkerboard():
    assert float(total_variation(torch.ones(2, 3, 8, 8))) == 0.0
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    assert float(total_variation(board.float()[None, None])) == pytest.approx(2.0)
