"""Run configuration: small frozen dataclasses, validated on construction.

A run's configuration is TOML. Each section is one dataclass here, except ``[method]``: its ``name``
picks an algorithm from the registry and the remaining keys are validated by that algorithm's own
``Config`` dataclass (every algorithm declares its own hyperparameters; there is no shared namespace).

``key=value`` overrides address a dotted key (``partition.alpha=0.1``, ``method.lr=0.05``); values are
parsed as TOML literals, falling back to a plain string.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from protofl.errors import ConfigError

#: Every integer in a configuration lies in [-INT_LIMIT, INT_LIMIT] unless its field declares a
#: ``range`` in its metadata (see :func:`bounded`); every float is finite and in [-FLOAT_LIMIT, FLOAT_LIMIT].
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 1e15
#: Upper bounds of the numbers that size a run's work or memory.
MAX_ROUNDS = 1_000_000
MAX_CLIENTS = 1_000_000
MAX_RELEASES = 1_000_000
MAX_WIDTH = 65_536
MAX_IMAGE_SIZE = 1024
#: Privacy calibration: the noise search must end in seconds (the PLD accountant's grows with epsilon
#: and with the number of releases; a smaller delta is cheap).
MAX_EPSILON = 1e6
MAX_EPSILON_PLD = 100.0
MIN_DELTA = 1e-30


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def bounded(default: Any, low: float, high: float) -> Any:
    """A dataclass field whose value must lie in ``[low, high]`` (checked by :func:`check_number`)."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


def number_range(f: dataclasses.Field, value: int | float) -> tuple[float, float]:
    """The allowed range of a number in field ``f``: the field's own ``range``, else the generic one."""
    if "range" in f.metadata:
        return f.metadata["range"]
    return (-INT_LIMIT, INT_LIMIT) if isinstance(value, int) else (-FLOAT_LIMIT, FLOAT_LIMIT)


def check_number(value: Any, f: dataclasses.Field, key: str) -> None:
    """Refuse a number (or a number in a tuple) of field ``f`` that is not finite or lies outside its
    range, naming ``key`` and the range. Anything that is not a number passes."""
    if isinstance(value, (tuple, list)):
        for item in value:
            check_number(item, f, key)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = number_range(f, value)
    finite = not isinstance(value, float) or math.isfinite(value)
    check(
        finite and low <= value <= high,
        key,
        f"must be a finite number in [{low:g}, {high:g}], got {value!r}"
        if isinstance(value, float)
        else f"must be an integer in [{low}, {high}], got {value}",
    )


def check_numbers(obj: Any) -> None:
    """:func:`check_number` on every field of dataclass instance ``obj`` (its ``__post_init__`` calls it)."""
    for f in dataclasses.fields(obj):
        check_number(getattr(obj, f.name), f, f.name)


def check_choice(value: str, choices: typing.Iterable[str], key: str) -> None:
    choices = sorted(choices)
    check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> mapping conversion with clear errors


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, key) for v in value)
    if annotation is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            check(isinstance(value, Mapping), prefix + name, "expected a table")
            kwargs[name] = from_mapping(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, prefix + name)
    try:
        obj = cls(**kwargs)
        check_numbers(obj)  # every dataclass, whether or not its __post_init__ calls it
        return obj
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def to_mapping(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (None values dropped: TOML has no null)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_mapping(value)
        elif isinstance(value, Mapping):
            out[f.name] = dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif value is not None:
            out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset, and whether clients see pixels or frozen-encoder embeddings."""

    dataset: str = "fashion-mnist"
    #: ``pixels`` (a small CNN on the images) or the name of a frozen encoder (``efficientnet-lite0``),
    #: whose embeddings are computed once and cached on disk.
    features: str = "pixels"
    #: Side length the images are resized to before the encoder (ignored for ``pixels``).
    image_size: int = bounded(32, 8, MAX_IMAGE_SIZE)
    #: Use at most this many training samples (0: all), drawn class-stratified with the run's seed.
    max_train_samples: int = 0

    def __post_init__(self) -> None:
        check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        check(self.max_train_samples >= 0, "max_train_samples", "must be >= 0 (0 means all)")
        check_numbers(self)


PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "domain")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """How the training pool is split among clients (see :mod:`protofl.data.partition`)."""

    scheme: str = "iid"
    num_clients: int = bounded(10, 1, MAX_CLIENTS)
    #: Dirichlet concentration (``dirichlet``); smaller is more skewed.
    alpha: float = 0.5
    #: Classes per client (``pathological``).
    classes_per_client: int = 2
    #: Every client gets at least this many samples (train + test), else the partition is redrawn.
    min_client_size: int = 10
    #: Long tail: ratio of the largest to the smallest class after subsampling (1: none). Applied to the
    #: training pool before partitioning; the global test set stays balanced.
    imbalance_factor: float = bounded(1.0, 1.0, 1e6)
    #: Fraction of each client's samples kept as its own test split (same label distribution).
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        check_choice(self.scheme, PARTITION_SCHEMES, "scheme")
        check(self.num_clients >= 1, "num_clients", f"must be >= 1, got {self.num_clients}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(self.classes_per_client >= 1, "classes_per_client", f"must be >= 1, got {self.classes_per_client}")
        check(self.min_client_size >= 1, "min_client_size", f"must be >= 1, got {self.min_client_size}")
        check(self.imbalance_factor >= 1, "imbalance_factor", f"must be >= 1, got {self.imbalance_factor}")
        check(0 < self.test_fraction < 1, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check_numbers(self)


#: ``federation.client_store`` and ``federation.client_state_precision`` choices.
CLIENT_STORES = ("memory", "disk")
CLIENT_STATE_PRECISIONS = ("exact", "float16")


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """The engine's schedule: rounds, client sampling, evaluation and checkpoints."""

    rounds: int = bounded(10, 1, MAX_ROUNDS)
    #: Fraction of clients sampled each round (at least one client is always sampled).
    client_fraction: float = 1.0
    #: Evaluate every this many rounds (the last round is always evaluated).
    eval_every: int = 1
    #: Write a checkpoint every this many rounds (0: never; the last round always is).
    checkpoint_every: int = 1
    #: Probability that a sampled client drops out of a round (its update is lost; the round goes on).
    client_dropout: float = 0.0
    #: Show progress bars.
    progress: bool = True
    #: ``per-client`` (the reference: one client after another) or ``batched`` (the clients of a round
    #: train as one vectorised program, ``batch_clients`` at a time; same results within float
    #: tolerance). A method that cannot be batched runs per client, with a warning; the execution used
    #: is recorded in every metrics row and in summary.json.
    execution: str = "per-client"
    #: Batched execution: at most this many clients are stacked into one program (bounds the memory
    #: of the stacked parameters, optimiser state and data).
    batch_clients: int = bounded(256, 1, MAX_CLIENTS)
    #: Where tensors live: ``cpu``, ``auto`` (the first CUDA device when there is one, else the CPU),
    #: ``cuda`` or ``cuda:i``. Every method keeps its model, state and training tensors there; payloads,
    #: releases and random draws stay on the CPU, and checkpoints hold CPU tensors that load on any device.
    device: str = "cpu"
    #: torch threads of this process (intra-op and inter-op); 0: the cores available to this process
    #: divided by the number of worker processes (a sweep's workers), at least 1.
    threads: int = bounded(0, 0, 4096)
    #: Where the in-process engine keeps its clients' personal state between their rounds: ``memory``
    #: (every state in memory) or ``disk`` (the ``client_cache`` most recently used in memory, the others
    #: in files under the run's checkpoint folder; see :mod:`protofl.engine.client_store`). Same results.
    client_store: str = "memory"
    #: The disk store: how many client states stay in memory between rounds.
    client_cache: int = bounded(256, 0, MAX_CLIENTS)
    #: ``exact`` or ``float16``: round the floating-point tensors of a stored client state to float16
    #: (halves the disk store's files; changes results, so it is off by default and named in summary.json).
    client_state_precision: str = "exact"
    #: Batched execution: compile the round's local step and feature pass with ``torch.compile``
    #: (:mod:`protofl.compiled`; the same results up to float rounding, a one-off compile of seconds, more
    #: with an empty inductor cache). Off: the eager step. Named in summary.json's ``batched_step``.
    compile: bool = False

    def __post_init__(self) -> None:
        check(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "device",
            f"{self.device!r} is not one of auto, cpu, cuda, cuda:INDEX",
        )
        check(self.threads >= 0, "threads", f"must be >= 0 (0: automatic), got {self.threads}")
        check_choice(self.execution, ("per-client", "batched"), "execution")
        check_choice(self.client_store, CLIENT_STORES, "client_store")
        check_choice(self.client_state_precision, CLIENT_STATE_PRECISIONS, "client_state_precision")
        check(isinstance(self.compile, bool), "compile", f"must be true or false, got {self.compile!r}")
        check(
            not self.compile or self.execution == "batched",
            "compile",
            f'compiles the batched round\'s step: it needs execution = "batched", got {self.execution!r}',
        )
        check(self.batch_clients >= 1, "batch_clients", f"must be >= 1, got {self.batch_clients}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(0 < self.client_fraction <= 1, "client_fraction", f"must be in (0, 1], got {self.client_fraction}")
        check(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(0 <= self.client_dropout < 1, "client_dropout", f"must be in [0, 1), got {self.client_dropout}")
        check_numbers(self)


#: ``model.name``: ``auto`` (``cnn`` on images, ``adapter`` on embeddings), ``cnn``, ``adapter`` or
#: ``linear`` (features = the input vector as is, head = one linear layer). Each name says whether a
#: client trains the feature map (what ``privacy.sensitivity = "fixed-features"`` needs to know before
#: any work): only ``linear`` does not.
MODEL_TRAINS_FEATURES = {"auto": True, "cnn": True, "adapter": True, "linear": False}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The client model: a small CNN on pixels, a residual adapter + MLP head on embeddings, or a linear
    head on the input as it is (``linear``: e.g. frozen public-encoder embeddings)."""

    #: ``auto``, ``cnn``, ``adapter`` or ``linear`` (:data:`MODEL_TRAINS_FEATURES`).
    name: str = "auto"
    #: Width of the feature (prototype) layer (``linear``: the input's size, this is ignored).
    feature_dim: int = bounded(128, 2, MAX_WIDTH)
    #: Hidden width of the embedding adapter (embeddings only).
    hidden_dim: int = bounded(256, 2, MAX_WIDTH)

    def __post_init__(self) -> None:
        check_choice(self.name, MODEL_TRAINS_FEATURES, "name")
        check(self.feature_dim >= 2, "feature_dim", f"must be >= 2, got {self.feature_dim}")
        check(self.hidden_dim >= 2, "hidden_dim", f"must be >= 2, got {self.hidden_dim}")
        check_numbers(self)

    @property
    def trains_features(self) -> bool:
        """Whether a client trains this model's feature map (known from the name, before any work)."""
        return MODEL_TRAINS_FEATURES[self.name]


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Experiment tracking besides the run folder's own records."""

    #: Write TensorBoard event files (every metric of every round, epsilon, bytes, per-client
    #: histograms) to the run folder's ``tensorboard/`` (needs the ``tensorboard`` package).
    tensorboard: bool = False
    #: Log every numeric metric of every evaluated round, and the resolved configuration as parameters,
    #: to an MLflow run (needs ``pip install 'protofl[mlflow]'``).
    mlflow: bool = False
    #: The MLflow tracking URI (e.g. ``sqlite:///runs/mlflow.db`` or a tracking server's ``http://...``);
    #: empty: MLflow's own choice (``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working folder).
    mlflow_uri: str = ""
    #: The MLflow experiment the run is logged under (created when missing).
    mlflow_experiment: str = "protofl"

    def __post_init__(self) -> None:
        check(
            not self.mlflow_uri or self.mlflow,
            "mlflow_uri",
            "is set but logging.mlflow is off: set logging.mlflow = true to log there",
        )
        check(bool(self.mlflow_experiment.strip()), "mlflow_experiment", "name an experiment")


#: The mechanisms ``[privacy] mechanism`` names: prototype releases (VPDR's IGPP and VPP) and DP-SGD. The
#: privacy layer (:mod:`protofl.privacy.layer`) holds the implementation of each; an algorithm declares
#: which ones it hosts (``Algorithm.privacy_mechanisms``).
PRIVACY_MECHANISMS = ("none", "igpp", "vpp", "dp-sgd", "dp-gradients", "class-statistics")
PRIVACY_RELATIONS = ("add-remove", "replace-one")
NOISE_SOURCES = ("auto", "seeded", "secret")
#: How VPP picks its discriminative dimensions (:data:`protofl.privacy.mechanisms.SELECTIONS`).
VPP_SELECTIONS = ("private-anova", "broadcast-variance")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Every privacy mechanism of a run, in one section (see :mod:`protofl.privacy` and docs/privacy.md).

    ``igpp`` and ``vpp`` protect the per-class prototypes a prototype host (``fedproto``, ``fpl``,
    ``fedtgp``, ...) releases; ``dp-sgd`` is the local training of the DP-SGD methods (``dpfedavg``,
    ``fedhypevae``), whose updates it protects. ``dcr`` is a training option of the prototype releases."""

    #: ``none``, ``igpp`` (isotropic Gaussian), ``vpp`` (variance-adaptive), ``dp-sgd`` or ``dp-gradients``
    #: (DP-SGD local training plus noisy per-class gradient uploads: private ``creff`` and ``fedhpro``).
    #: ``class-statistics``: noisy per-class counts, sums and second moments (the ``dpgauss`` baseline).
    mechanism: str = "none"
    #: Distillation-guided clipping regularisation in the local training of a prototype host (DCR; alone,
    #: or with ``igpp`` or ``vpp``).
    dcr: bool = False
    #: Per-client budget over the whole run, at ``delta``; the noise is calibrated to spend it over
    #: ``planned_releases`` releases.
    epsilon: float = bounded(8.0, 0.0, MAX_EPSILON)
    delta: float = bounded(1e-5, MIN_DELTA, 1.0)
    #: The rounds in which a client releases (each release: one prototype upload, or one round of
    #: DP-SGD steps); 0: one per round of the run, filled in when the configuration is resolved.
    planned_releases: int = bounded(0, 0, MAX_RELEASES)
    #: The accountant that calibrates the noise and enforces the budget, by name from the registry
    #: (:func:`protofl.privacy.create_accountant`: ``pld``, ``rdp``). For DP-SGD, ``rdp`` calibrates in
    #: about a second per client sampling rate, ``pld`` in about ten (and gives slightly less noise).
    accountant: str = "pld"
    #: Prototype releases: clipping bound R of every feature (VPDR: 5).
    clip_bound: float = 5.0
    #: Prototype releases: ``trained-features`` (the default): every class mean lies in the R-ball, so the
    #: whole release (every class) moves by at most 2R·sqrt(C), valid whatever the feature map.
    #: ``fixed-features``: the VPDR paper's analysis (2R/n_c per class under replace-one, R per class sum
    #: under add/remove), valid only where no client trains the map before the prototype (e.g. the
    #: ``linear`` model on frozen public embeddings); refused otherwise.
    sensitivity: str = "trained-features"
    #: The neighbouring relation ε is stated for. ``add-remove`` (the default, the relation of DP-SGD's
    #: Poisson accounting): one example added or removed; no exact count and no class set leaves a client
    #: (every class is released, with noisy counts). ``replace-one``: one example replaced by another of
    #: the same class (the VPDR paper's analysis): class counts and the class set are public.
    relation: str = "add-remove"
    #: Prototype releases under ``add-remove``: the share of each release's Gaussian precision (1/σ²)
    #: spent on the noisy per-class counts; the rest protects the per-class features (see
    #: docs/privacy.md for the measurement behind the default).
    count_fraction: float = 0.1
    #: Where the random draws that protect a release come from: ``seeded`` (from the run seed: reproducible
    #: simulations, but whoever knows the seed can replay the noise), ``secret`` (from the operating
    #: system's CSPRNG, kept by the client: on Flower, a secret that never leaves the node), or ``auto``
    #: (``seeded`` in-process, ``secret`` on Flower).
    noise: str = "auto"
    #: Prototype releases: the server projects every noisy prototype it receives onto the R-ball
    #: (``clip_bound``), which holds every true class mean of clipped features (post-processing, no ε;
    #: never moves an estimate further from the truth). Off: the noisy prototypes are used as they are.
    bound_uploads: bool = True
    #: Flower: let replies of a private run also carry the training loss and the personalised test
    #: metrics (not covered by ε; summary.json then says so). Off: they stay in the node's log.
    share_diagnostics: bool = False
    #: VPP: fraction of dimensions in the discriminative group (rho), share of the budget spent on the
    #: private selection, and the cap of the ANOVA scores (s_max).
    rho: float = 0.3
    selection_fraction: float = 0.1
    score_cap: float = 0.1
    #: VPP: how the discriminative dimensions are picked. ``private-anova`` (the VPDR paper): a pure-DP
    #: top-k of the client's capped ANOVA scores, costing ``selection_fraction`` of ε (at the default
    #: ``score_cap`` the scores are all capped and the choice is random). ``broadcast-variance``: the
    #: top-k by the between-class variance of the global prototypes the client received (post-processing
    #: of the broadcast: no ε spent on it); a round with fewer than two global prototypes releases as
    #: IGPP. See docs/privacy.md for the measurement.
    selection: str = "private-anova"
    #: DCR: soft-clip slack tau_s, KD weight and temperature, EMA momentum of the teacher head, warm-up
    #: local steps before KD starts.
    soft_clip_tau: float = 0.05
    kd_weight: float = 0.05
    kd_temperature: float = 4.0
    ema_momentum: float = 0.999
    kd_warmup_steps: int = 5
    #: DP-SGD: per-example clip norm C of the gradient.
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.mechanism, PRIVACY_MECHANISMS, "mechanism")
        check(isinstance(self.accountant, str) and bool(self.accountant), "accountant", "name an accountant")
        check_choice(self.sensitivity, ("fixed-features", "trained-features"), "sensitivity")
        check_choice(self.relation, PRIVACY_RELATIONS, "relation")
        check_choice(self.noise, NOISE_SOURCES, "noise")
        check(0 < self.count_fraction < 1, "count_fraction", f"must be in (0, 1), got {self.count_fraction}")
        check(self.epsilon > 0 and self.epsilon == self.epsilon, "epsilon", f"must be > 0, got {self.epsilon}")
        check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}")
        check(
            self.accountant != "pld" or self.epsilon <= MAX_EPSILON_PLD,
            "epsilon",
            f"must be <= {MAX_EPSILON_PLD:g} with the pld accountant (its calibration takes minutes beyond); "
            f"use accountant = 'rdp' for epsilon {self.epsilon:g}",
        )
        check(
            self.planned_releases >= 0,
            "planned_releases",
            f"must be >= 0 (0: one per round), got {self.planned_releases}",
        )
        check(self.clip_bound > 0, "clip_bound", f"must be > 0, got {self.clip_bound}")
        check(
            self.clip_norm > 0 and self.clip_norm < float("inf"),
            "clip_norm",
            f"must be finite and > 0, got {self.clip_norm}",
        )
        check(0 < self.rho <= 1, "rho", f"must be in (0, 1], got {self.rho}")
        check(
            0 < self.selection_fraction < 1, "selection_fraction", f"must be in (0, 1), got {self.selection_fraction}"
        )
        check(self.score_cap > 0, "score_cap", f"must be > 0, got {self.score_cap}")
        check_choice(self.selection, VPP_SELECTIONS, "selection")
        check(self.soft_clip_tau >= 0, "soft_clip_tau", f"must be >= 0, got {self.soft_clip_tau}")
        check(self.kd_weight >= 0, "kd_weight", f"must be >= 0, got {self.kd_weight}")
        check(self.kd_temperature > 0, "kd_temperature", f"must be > 0, got {self.kd_temperature}")
        check(0 <= self.ema_momentum < 1, "ema_momentum", f"must be in [0, 1), got {self.ema_momentum}")
        check(self.kd_warmup_steps >= 0, "kd_warmup_steps", f"must be >= 0, got {self.kd_warmup_steps}")
        check(
            self.mechanism not in ("dp-sgd", "dp-gradients") or self.relation == "add-remove",
            "relation",
            f"{self.mechanism} is accounted under add-remove (Poisson sampling of one example more or less); "
            "'replace-one' would need twice the sensitivity, set privacy.relation = 'add-remove'",
        )
        check(
            not self.dcr or self.mechanism not in ("dp-sgd", "dp-gradients"),
            "dcr",
            f"is a training option of the prototype hosts (alone, or with igpp or vpp), not of {self.mechanism}",
        )
        check_numbers(self)

    @property
    def enabled(self) -> bool:
        """Whether anything private happens (a mechanism or DCR)."""
        return self.mechanism != "none" or self.dcr

    def resolved(self, rounds: int) -> PrivacyConfig:
        """This section with ``planned_releases`` filled in (one release per round of a ``rounds``-round
        run when left at 0). The one place where it is resolved."""
        if self.mechanism == "none" or self.planned_releases:
            return self
        return dataclasses.replace(self, planned_releases=rounds)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run. ``method`` holds the algorithm name and its (not yet validated) options."""

    #: Seeds numpy's and scikit-learn's generators too, which take 32-bit seeds.
    seed: int = bounded(0, 0, 2**32 - 1)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    method: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"name": "fedavg"})

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(isinstance(self.method, Mapping), "method", "expected a table")
        check(isinstance(self.method.get("name"), str), "method.name", "missing: name an algorithm")
        object.__setattr__(self, "method", types.MappingProxyType(dict(self.method)))
        check_numbers(self)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    # -- I/O ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return from_mapping(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder, not a TOML file") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not text (TOML is UTF-8)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        if "sweep" in data:
            raise ConfigError(f"sweep: {path} describes a sweep; run it with protofl sweep {path} --out DIR")
        return cls.from_dict(apply_overrides(data, overrides))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, *overrides: str) -> RunConfig:
        """A copy with ``key=value`` overrides applied."""
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. partition.alpha=0.1")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (returns a new dict)."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def effective_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that determine a run's results, as flat ``section.key`` -> value: what a run's
    fingerprint digests and what ``protofl report`` groups runs by. Left out: progress bars, the schedule
    of checkpoints, how many clients share a batched program, threads, device and tracking (how fast and
    where, not what), where the clients' state is kept (same results), the exact client state precision,
    the eager batched step and the reference per-client execution (so earlier fingerprints stay valid), and
    the privacy settings while privacy is off."""
    data = config.to_dict()
    for key in ("progress", "checkpoint_every", "batch_clients", "threads", "device", "client_store", "client_cache"):
        data["federation"].pop(key, None)
    if data["federation"].get("client_state_precision") == "exact":
        data["federation"].pop("client_state_precision")
    if data["federation"].get("compile") is False:  # the eager step: earlier fingerprints stay valid
        data["federation"].pop("compile")
    if data["model"].get("name") == "auto":  # the models before model.name: earlier fingerprints stay valid
        data["model"].pop("name")
    data.pop("logging", None)
    if data["federation"].get("execution") == "per-client":
        data["federation"].pop("execution")
    if not config.privacy.enabled:
        data.pop("privacy", None)
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
