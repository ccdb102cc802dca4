"""Differential privacy for what clients release: clipping, Gaussian and Laplace noise, the VPDR
prototype releases (IGPP, VPP) and DCR, accounting through ``dp-accounting`` (RDP and PLD) with
per-client ledgers and budget stops, and attacks that measure what a release leaks
(:mod:`protofl.privacy.attacks`)."""

from protofl.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    BudgetExceededError,
    Event,
    GaussianEvent,
    LaplaceEvent,
    PldAccountant,
    PrivacyLedger,
    PureDpEvent,
    RdpAccountant,
    SampledGaussianEvent,
    calibrate_noise_multiplier,
    compute_epsilon,
    make_accountant,
)
from protofl.privacy.attacks import (
    MembershipResult,
    invert_prototypes,
    membership_inference,
    prototype_distance_scores,
    reconstruction_scores,
    total_variation,
)
from protofl.privacy.mechanisms import (
    PrototypeRelease,
    anova_scores,
    clip_groups,
    clip_rows,
    gaussian_noise,
    igpp_release,
    laplace_noise,
    private_top_k,
    soft_clip,
    vpp_group_noise,
    vpp_release,
)
from protofl.privacy.vpdr import DistillationClipping, PrototypePrivacy

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetExceededError",
    "DistillationClipping",
    "Event",
    "GaussianEvent",
    "LaplaceEvent",
    "MembershipResult",
    "PldAccountant",
    "PrivacyLedger",
    "PrototypePrivacy",
    "PrototypeRelease",
    "PureDpEvent",
    "RdpAccountant",
    "SampledGaussianEvent",
    "anova_scores",
    "calibrate_noise_multiplier",
    "clip_groups",
    "clip_rows",
    "compute_epsilon",
    "gaussian_noise",
    "igpp_release",
    "invert_prototypes",
    "laplace_noise",
    "make_accountant",
    "membership_inference",
    "private_top_k",
    "prototype_distance_scores",
    "reconstruction_scores",
    "soft_clip",
    "total_variation",
    "vpp_group_noise",
    "vpp_release",
]
