"""What a run's ε means: the unit, the neighbouring relation, the sensitivity rule, where the noise comes
from and what ε does not cover. summary.json (``privacy``) and report.md state it for every private run.
"""

from __future__ import annotations

from typing import Any

from protofl.config import ConfigError, PrivacyConfig, RunConfig
from protofl.privacy.mechanisms import sensitivity_rule

__all__ = [
    "ENGINES",
    "check_sensitivity",
    "diagnostics_text",
    "noise_source",
    "privacy_statement",
    "shares_diagnostics",
    "uses_secret_noise",
]

#: The engines a run can use: ``in-process`` (one process plays the server and every client) and
#: ``flower`` (clients are Flower nodes; the server sees only their replies).
ENGINES = ("in-process", "flower")

RELATION_TEXT = {
    "add-remove": "one example added to or removed from one client's train split",
    "replace-one": "one example of one client's train split replaced by another of the same class",
}


#: The ``sensitivity`` word of a gradient mechanism's statement.
GRADIENT_SENSITIVITY = {"dp-gradients": "clipped per-example gradients and per-class gradient contributions"}


def check_sensitivity(config: RunConfig, user_model: bool = False) -> None:
    """Refuse (:class:`ConfigError` naming ``privacy.sensitivity``) ``fixed-features`` on a prototype
    release whose clients train the feature map before it: that rule's bound assumes the map is not a
    function of the client's data. Known from the configuration alone (``model.name``), before any
    work; a model of the user's (``user_model``, a factory passed to ``protofl.run``) counts as trained.
    The one place this is decided (resolving a configuration calls it)."""
    privacy = config.privacy
    if privacy.mechanism not in ("igpp", "vpp") or privacy.sensitivity != "fixed-features":
        return
    if user_model:
        raise ConfigError(
            "privacy.sensitivity: 'fixed-features' needs a feature map no client trains, and protofl cannot "
            "tell that of a model of your own; use 'trained-features' (valid whatever the map)"
        )
    if config.model.trains_features:
        raise ConfigError(
            f"privacy.sensitivity: 'fixed-features' needs a feature map no client trains, but model.name = "
            f"{config.model.name!r} trains its features on the client's data just before each release; use "
            "'trained-features' (the default), or model.name = 'linear' (e.g. on frozen embeddings)"
        )


def noise_source(config: PrivacyConfig, engine: str) -> str:
    """``seeded`` or ``secret``: ``privacy.noise`` with ``auto`` resolved for ``engine``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if config.noise != "auto":
        return config.noise
    return "secret" if engine == "flower" else "seeded"


def uses_secret_noise(config: PrivacyConfig, engine: str) -> bool:
    """Whether a client's random draws (release noise, VPP's selection, DP-SGD's sampling and noise, its
    shuffles) come from its own secret rather than the run seed: a mechanism is on and the noise source
    is ``secret``. Without a mechanism nothing is protected and the draws stay seeded (reproducible)."""
    return config.mechanism != "none" and noise_source(config, engine) == "secret"


def shares_diagnostics(config: PrivacyConfig, engine: str) -> bool:
    """Whether the clients' training loss, personalised test metrics and data profile (training samples,
    classes held) reach the server: always in-process (one process holds everything) and without a
    mechanism; on Flower under a mechanism only with ``privacy.share_diagnostics``, else they stay on the
    nodes (each node's own log)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    return engine == "in-process" or config.mechanism == "none" or config.share_diagnostics


def diagnostics_text(config: PrivacyConfig, engine: str) -> str:
    """Where a private run's training loss, personalised test metrics and per-client data profile go."""
    if engine == "in-process":
        return (
            "computed in this process by the experimenter (a measurement of the run, not a release: no server "
            "of a deployment would see them)"
        )
    if shares_diagnostics(config, engine):
        return "sent to the server with every reply (privacy.share_diagnostics = true; not covered by epsilon)"
    return "kept on the nodes (each node's own log); replies carry only the protected release and the spend report"


def privacy_statement(config: PrivacyConfig, engine: str) -> dict[str, Any]:
    """``relation``, ``sensitivity`` (and ``sensitivity_text``, in words), ``noise_source`` and
    ``not_covered`` (what ε says nothing about) of a private run on ``engine``; empty for a run without a
    mechanism."""
    if config.mechanism == "none":
        return {}
    source = noise_source(config, engine)
    not_covered: list[str] = []
    if config.relation == "replace-one" and config.mechanism in ("igpp", "vpp"):
        not_covered.append(
            "the number of examples of each class and the set of classes each client holds (public under "
            "the replace-one relation)"
        )
    if config.mechanism in ("dp-sgd", "dp-gradients"):
        not_covered.append(
            "each client's number of train examples n: it sets the DP-SGD sampling rate (batch_size / n) and "
            "with it the noise multiplier, both treated as public (under add/remove, n differs by one on "
            "neighbouring datasets)"
        )
    if source == "seeded":
        not_covered.append(
            "the noise is drawn from the run seed: whoever knows the seed"
            + (" (on Flower: the server)" if engine == "flower" else "")
            + " can replay it and remove it"
        )
    if engine == "flower" and config.share_diagnostics:
        not_covered.append("the training loss and the personalised test metrics in every reply")
    if engine == "flower":
        not_covered.append("whether and when a node replies (a node's error, its reply time): outside every mechanism")
    return {
        "unit": "one example of one client's train split",
        "relation": config.relation,
        "relation_text": RELATION_TEXT[config.relation],
        "sensitivity": config.sensitivity
        if config.mechanism in ("igpp", "vpp")
        else GRADIENT_SENSITIVITY.get(config.mechanism, "clipped per-example gradients"),
        "sensitivity_text": sensitivity_text(config),
        "noise_source": source,
        "diagnostics": diagnostics_text(config, engine),
        "not_covered": not_covered,
    }


def sensitivity_text(config: PrivacyConfig) -> str:
    """The sensitivity rule of a private run, in words (``privacy.sensitivity`` under
    ``privacy.relation`` for a prototype release)."""
    if config.mechanism == "dp-gradients":
        return (
            "DP-SGD steps: each example's gradient clipped to norm privacy.clip_norm, one example changes one "
            "gradient; per-class gradient uploads: each example's contribution (its head gradient, with "
            "FedHPro also its feature gradient) clipped to norm method.upload_clip and summed per class, every "
            "class released with a noisy count, so one example moves one class sum by at most upload_clip and "
            "one count by 1"
        )
    if config.mechanism not in ("igpp", "vpp"):
        return "clipped per-example gradients (norm privacy.clip_norm); one example changes one gradient"
    return f"{config.sensitivity}: {sensitivity_rule(config.sensitivity, config.relation).text}"
