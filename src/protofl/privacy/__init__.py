"""Differential privacy for what clients release: clipping, Gaussian and Laplace noise, the VPDR
prototype releases (IGPP, VPP) and DCR, accounting through ``dp-accounting`` (RDP and PLD) with
per-client ledgers and budget stops, attacks that measure what a release leaks
(:mod:`protofl.privacy.attacks`), and the statistics that turn an audit's attack into a lower bound on ε
(:mod:`protofl.privacy.audit_bounds`)."""

from typing import TYPE_CHECKING, Any

from protofl.privacy.accounting import (
    ACCOUNTANTS,
    LEDGER_KEY,
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
    create_accountant,
    make_accountant,
    register_accountant,
    remember_calibrations,
)
from protofl.privacy.attacks import (
    MembershipResult,
    invert_prototypes,
    membership_inference,
    prototype_distance_scores,
    reconstruction_scores,
    total_variation,
)
from protofl.privacy.class_gradients import ClassGradientRelease, class_gradient_release, clipped_class_sums
from protofl.privacy.layer import (
    PRIVACY_LAYERS,
    ClassGradientLayer,
    DPSGDLayer,
    IGPPLayer,
    PrivacyLayer,
    PrototypeReleaseLayer,
    VPPLayer,
    create_privacy_layer,
    register_privacy_layer,
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
    sensitivity_rule,
    soft_clip,
    split_multiplier,
    vpp_group_noise,
    vpp_release,
)
from protofl.privacy.vpdr import DistillationClipping

if TYPE_CHECKING:
    from protofl.privacy.audit_bounds import (
        GUESS_FRACTIONS,
        OneRunBound,
        guess_and_bound,
        minimum_canaries,
        one_run_epsilon_lower,
        one_run_p_value,
        two_worlds_epsilon_lower,
    )

#: The audit statistics (:mod:`protofl.privacy.audit_bounds`), imported on first use (``from
#: protofl.privacy import *`` imports them too): they need ``scipy.stats``, about half a second of imports
#: that a training process (a Flower node's ClientApp started for each message, a run's start-up) never uses.
_AUDIT_BOUNDS = (
    "GUESS_FRACTIONS",
    "OneRunBound",
    "guess_and_bound",
    "minimum_canaries",
    "one_run_epsilon_lower",
    "one_run_p_value",
    "two_worlds_epsilon_lower",
)


def __getattr__(name: str) -> Any:
    if name in _AUDIT_BOUNDS:
        from protofl.privacy import audit_bounds

        value = globals()[name] = getattr(audit_bounds, name)  # found here from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ACCOUNTANTS",
    "GUESS_FRACTIONS",
    "ClassGradientLayer",
    "ClassGradientRelease",
    "DPSGDLayer",
    "IGPPLayer",
    "LEDGER_KEY",
    "PRIVACY_LAYERS",
    "PrivacyLayer",
    "PrototypeReleaseLayer",
    "VPPLayer",
    "create_accountant",
    "create_privacy_layer",
    "register_accountant",
    "register_privacy_layer",
    "remember_calibrations",
    "Accountant",
    "BudgetExceededError",
    "DistillationClipping",
    "Event",
    "GaussianEvent",
    "LaplaceEvent",
    "MembershipResult",
    "OneRunBound",
    "PldAccountant",
    "PrivacyLedger",
    "PrototypeRelease",
    "PureDpEvent",
    "RdpAccountant",
    "SampledGaussianEvent",
    "anova_scores",
    "calibrate_noise_multiplier",
    "class_gradient_release",
    "clipped_class_sums",
    "clip_groups",
    "clip_rows",
    "compute_epsilon",
    "gaussian_noise",
    "guess_and_bound",
    "igpp_release",
    "invert_prototypes",
    "laplace_noise",
    "make_accountant",
    "membership_inference",
    "minimum_canaries",
    "one_run_epsilon_lower",
    "one_run_p_value",
    "private_top_k",
    "prototype_distance_scores",
    "reconstruction_scores",
    "sensitivity_rule",
    "soft_clip",
    "split_multiplier",
    "total_variation",
    "two_worlds_epsilon_lower",
    "vpp_group_noise",
    "vpp_release",
]
