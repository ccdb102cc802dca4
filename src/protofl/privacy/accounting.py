"""Privacy accounting: what each release costs, composed over a whole run, through ``dp-accounting``.

A release is described by an :class:`Event` (a Gaussian mechanism with its noise multiplier, a
Poisson-subsampled Gaussian — one DP-SGD step —, a Laplace mechanism with its noise multiplier, or a
mechanism proven pure ε-DP); an
:class:`Accountant` composes events and answers ε at δ. Two accountants, one interface, one
registry (:data:`ACCOUNTANTS`), as in Opacus:

- ``rdp``: Rényi DP through ``dp_accounting.rdp.RdpAccountant`` (a pure ε-DP event enters as
  ε²/2-zCDP, Bun & Steinke 2016, Prop. 1.4);
- ``pld``: privacy loss distributions through ``dp_accounting.pld`` (a pure ε-DP event enters as
  the PLD of a generic (ε, 0)-DP mechanism), the tighter of the two.

The noise multiplier of a Gaussian or Laplace event is the noise scale divided by the mechanism's
sensitivity under the neighbouring relation of the release (for prototypes: replace one example),
so the accountant needs no sensitivity of its own. :func:`calibrate_noise_multiplier` finds the
smallest multiplier whose composed ε is at most the target (dp-accounting's calibration, which
guarantees the gap is not positive). :class:`PrivacyLedger` is one party's record of its releases,
cheap to keep per client (a few ``(event, count)`` pairs) and checkpointable.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetExceededError",
    "Event",
    "GaussianEvent",
    "LEDGER_KEY",
    "LaplaceEvent",
    "PldAccountant",
    "PrivacyLedger",
    "PureDpEvent",
    "RdpAccountant",
    "SampledGaussianEvent",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "create_accountant",
    "make_accountant",
    "register_accountant",
    "remember_calibrations",
    "spend_report",
]


class BudgetExceededError(RuntimeError):
    """A release would take a party past its privacy budget; it was not made."""


# --------------------------------------------------------------------------------------------------
# Events


@dataclasses.dataclass(frozen=True)
class Event:
    """One release of a mechanism; subclasses carry its parameter."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Event:
        data = dict(data)
        kind = data.pop("kind")
        for cls in (GaussianEvent, SampledGaussianEvent, LaplaceEvent, PureDpEvent):
            if cls.kind == kind:
                return cls(**data)
        raise ValueError(f"unknown privacy event kind {kind!r}")


@dataclasses.dataclass(frozen=True)
class GaussianEvent(Event):
    """Gaussian mechanism: noise standard deviation = ``noise_multiplier`` × L2 sensitivity."""

    kind: ClassVar[str] = "gaussian"
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")


@dataclasses.dataclass(frozen=True)
class SampledGaussianEvent(Event):
    """One DP-SGD step: a Gaussian mechanism on a Poisson sample of the data, each example included
    with probability ``sampling_rate`` (add-or-remove-one neighbours, sensitivity = the clip norm)."""

    kind: ClassVar[str] = "sampled-gaussian"
    sampling_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")


@dataclasses.dataclass(frozen=True)
class LaplaceEvent(Event):
    """Laplace mechanism: noise scale b = ``noise_multiplier`` × L1 sensitivity (ε = 1/multiplier)."""

    kind: ClassVar[str] = "laplace"
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")


@dataclasses.dataclass(frozen=True)
class PureDpEvent(Event):
    """A mechanism proven ε-DP (δ = 0), e.g. private top-k selection by report-noisy-max."""

    kind: ClassVar[str] = "pure"
    epsilon: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")


# --------------------------------------------------------------------------------------------------
# Accountants


class Accountant(abc.ABC):
    """Composes events; ``epsilon(delta)`` is the ε of everything composed so far at ``delta``."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.events: list[tuple[Event, int]] = []

    def compose(self, event: Event | Iterable[tuple[Event, int]], count: int = 1) -> Accountant:
        """Add ``count`` applications of ``event`` (or an iterable of ``(event, count)`` pairs)."""
        pairs = [(event, count)] if isinstance(event, Event) else list(event)
        for e, c in pairs:
            if c < 0:
                raise ValueError(f"count must be >= 0, got {c}")
            if c:
                self.events.append((e, c))
        return self

    @abc.abstractmethod
    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` of the composition (0 when nothing has been released)."""

    # dp-accounting's calibration asks a fresh accountant for its ledger.
    @property
    def ledger(self):
        import dp_accounting

        return dp_accounting.NoOpDpEvent() if not self.events else self.events

    def get_epsilon(self, delta: float) -> float:  # the name dp-accounting's calibration calls
        return self.epsilon(delta)


class RdpAccountant(Accountant):
    """Rényi-DP accounting (``dp_accounting.rdp.RdpAccountant`` with its default orders)."""

    name = "rdp"

    def epsilon(self, delta: float) -> float:
        import dp_accounting
        from dp_accounting import rdp

        if not self.events:
            return 0.0
        accountant = rdp.RdpAccountant()
        for event, count in self.events:
            if isinstance(event, GaussianEvent):
                dp_event = dp_accounting.GaussianDpEvent(event.noise_multiplier)
            elif isinstance(event, SampledGaussianEvent):
                dp_event = dp_accounting.PoissonSampledDpEvent(
                    event.sampling_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
                )
            elif isinstance(event, LaplaceEvent):
                dp_event = dp_accounting.LaplaceDpEvent(event.noise_multiplier)
            else:
                assert isinstance(event, PureDpEvent)
                dp_event = dp_accounting.ZCDpEvent(rho=event.epsilon**2 / 2)
            accountant.compose(dp_event, count)
        return float(accountant.get_epsilon(delta))


class PldAccountant(Accountant):
    """Privacy-loss-distribution accounting (``dp_accounting.pld``), pessimistic discretisation."""

    name = "pld"
    #: dp-accounting's default discretisation of the privacy loss.
    value_discretization_interval = 1e-4

    def epsilon(self, delta: float) -> float:
        if not self.events:
            return 0.0
        total: Any = None
        for event, count in self.events:
            pld = _pld_of(event, self.value_discretization_interval).self_compose(count)
            total = pld if total is None else total.compose(pld)
        return float(total.get_epsilon_for_delta(delta))


def _pld_of(event: Event, interval: float):
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld

    if isinstance(event, GaussianEvent):
        return pld.from_gaussian_mechanism(event.noise_multiplier, value_discretization_interval=interval)
    if isinstance(event, SampledGaussianEvent):
        return pld.from_gaussian_mechanism(
            event.noise_multiplier, sampling_prob=event.sampling_rate, value_discretization_interval=interval
        )
    if isinstance(event, LaplaceEvent):
        return pld.from_laplace_mechanism(event.noise_multiplier, value_discretization_interval=interval)
    assert isinstance(event, PureDpEvent)
    return pld.from_privacy_parameters(
        common.DifferentialPrivacyParameters(event.epsilon, 0.0), value_discretization_interval=interval
    )


#: The accountants by name (``privacy.accountant``); add one with :func:`register_accountant`.
ACCOUNTANTS: dict[str, type[Accountant]] = {}


def register_accountant(cls: type[Accountant]) -> type[Accountant]:
    """Class decorator: make an :class:`Accountant` subclass available by its ``name``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no name")
    if ACCOUNTANTS.get(cls.name, cls) is not cls:
        raise ValueError(f"accountant {cls.name!r} is registered twice")
    ACCOUNTANTS[cls.name] = cls
    return cls


def create_accountant(name: str) -> Accountant:
    """A fresh accountant of the registered kind ``name`` (ValueError naming the valid ones otherwise)."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; valid: {', '.join(sorted(ACCOUNTANTS))}") from None


#: The name the rest of the code used before the registry (kept for callers outside protofl).
make_accountant = create_accountant


register_accountant(RdpAccountant)
register_accountant(PldAccountant)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(accountant: str, events: tuple[tuple[Event, int], ...], delta: float) -> float:
    return create_accountant(accountant).compose(events).epsilon(delta)


def compute_epsilon(accountant: str, events: Sequence[tuple[Event, int]], delta: float) -> float:
    """ε at ``delta`` of ``events`` under ``accountant`` (memoised: every client of a run composes the
    same few events, so thousands of clients cost a handful of accountant calls)."""
    return _cached_epsilon(accountant, tuple(events), delta)


#: Calibrations made in this process, by their arguments (every client of a run asks for the same few).
_CALIBRATIONS: dict[str, float] = {}
#: Where calibrations are also remembered across processes (see :func:`remember_calibrations`).
_CALIBRATION_FILE: list[Path] = []


def remember_calibrations(path: str | Path | None) -> None:
    """Also keep calibration results in the JSON file ``path`` (``None``: stop). A process that starts
    afresh for every message, as a Flower ClientApp does, then calibrates once per run instead of once per
    message. The file holds only noise multipliers keyed by the public arguments that determine them."""
    _CALIBRATION_FILE.clear()
    if path is not None:
        _CALIBRATION_FILE.append(Path(path))


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    releases: int,
    accountant: str = "pld",
    extra_events: Sequence[tuple[Event, int]] = (),
    sampling_rate: float | None = None,
) -> float:
    """The smallest Gaussian noise multiplier σ such that ``releases`` Gaussian releases at σ (Poisson
    subsampled at ``sampling_rate`` when given: DP-SGD steps), composed with ``extra_events``, are
    (``epsilon``, ``delta``)-DP under ``accountant`` (the composed ε is at most ``epsilon``: calibration
    hits the target from below). Memoised: a calibration is a root search (up to seconds), made once
    per process for the same arguments (and once per run with :func:`remember_calibrations`)."""
    key = repr(
        (
            float(epsilon),
            float(delta),
            int(releases),
            accountant,
            tuple((e.to_dict(), int(c)) for e, c in extra_events),
            sampling_rate,
        )
    )
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    stored = _read_calibrations()
    if key not in stored:
        stored[key] = _calibrate(epsilon, delta, releases, accountant, extra_events, sampling_rate)
        _write_calibrations(key, stored[key])
    _CALIBRATIONS[key] = stored[key]
    return stored[key]


def _read_calibrations() -> dict[str, float]:
    if not _CALIBRATION_FILE:
        return {}
    import json

    path = _CALIBRATION_FILE[0]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or torn by a concurrent writer: calibrate again
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_calibrations(key: str, sigma: float) -> None:
    if not _CALIBRATION_FILE:
        return
    import json

    from protofl._io import atomic_write

    known = {**_read_calibrations(), key: sigma}
    atomic_write(_CALIBRATION_FILE[0], lambda fh: fh.write(json.dumps(known).encode()))


def _calibrate(
    epsilon: float,
    delta: float,
    releases: int,
    accountant: str = "pld",
    extra_events: Sequence[tuple[Event, int]] = (),
    sampling_rate: float | None = None,
) -> float:
    """The smallest Gaussian noise multiplier σ such that ``releases`` Gaussian releases at σ (Poisson
    subsampled at ``sampling_rate`` when given: DP-SGD steps), composed with ``extra_events``, are
    (``epsilon``, ``delta``)-DP under ``accountant`` (the composed ε is at most ``epsilon``: calibration
    hits the target from below)."""
    import dp_accounting

    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    floor = create_accountant(accountant).compose(list(extra_events)).epsilon(delta)
    if floor >= epsilon:
        raise ValueError(f"the other releases alone already spend epsilon {floor:.4g} >= {epsilon}")
    extra = list(extra_events)

    def make_event(sigma: float) -> Event:
        return GaussianEvent(sigma) if sampling_rate is None else SampledGaussianEvent(sampling_rate, sigma)

    def calibrate(name: str, bracket) -> float:
        # The search visits small sigmas where dp-accounting drops RDP orders it cannot evaluate (it
        # logs a warning for each; dropping orders only makes epsilon larger, i.e. conservative).
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: create_accountant(name),
                lambda sigma: [(make_event(sigma), releases), *extra],
                epsilon,
                delta,
                bracket_interval=bracket,
                tol=1e-4,
            )
        )

    # RDP first (cheap at any sigma); PLD is tighter, so its sigma lies below RDP's: search there, never
    # at tiny sigmas whose discretised privacy-loss distributions would not fit in memory.
    sigma_rdp = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if accountant == "rdp":
        return sigma_rdp
    try:
        return calibrate(accountant, dp_accounting.ExplicitBracketInterval(max(sigma_rdp / 4, 0.05), sigma_rdp))
    except ValueError:  # the PLD sigma lies outside that bracket (discretisation over very many releases)
        return calibrate(accountant, dp_accounting.LowerEndpointAndGuess(max(sigma_rdp / 4, 0.05), sigma_rdp))


# --------------------------------------------------------------------------------------------------
# A party's record


#: Where a client's ledger lives in its state (a list of ``(event dict, count)`` pairs): the one key every
#: engine and mechanism uses.
LEDGER_KEY = "privacy_ledger"


@dataclasses.dataclass
class PrivacyLedger:
    """The releases one party (a client) has made: ``(event, count)`` pairs in the order made.

    ``spend(events)`` refuses, before anything is recorded, a release that would take the party past
    ``budget`` (ε at ``delta`` under ``accountant``) and raises :class:`BudgetExceededError`.

    ``plan`` (optional, not part of the state): the releases the noise was calibrated for, e.g.
    ``[(GaussianEvent(σ), T)]``. While everything recorded after a release is part of the plan (each
    event of the plan, at most its planned count), the release is a sub-composition of the plan: its
    mechanism is a post-processing of the plan's, so its ε is at most the plan's, which is computed
    (once per plan, memoised) and compared with the budget; no accountant runs for the count of this
    round. Anything else (an event outside the plan, more releases than planned, a plan over budget)
    takes the exact computation. Reported ε (:meth:`epsilon`) is always computed."""

    accountant: str
    delta: float
    budget: float = math.inf
    events: list[tuple[Event, int]] = dataclasses.field(default_factory=list)
    plan: Sequence[tuple[Event, int]] = ()

    def epsilon(self, accountant: str | None = None) -> float:
        return compute_epsilon(accountant or self.accountant, _merged(self.events), self.delta)

    def epsilon_after(self, events: Sequence[tuple[Event, int]]) -> float:
        return compute_epsilon(self.accountant, _merged([*self.events, *events]), self.delta)

    def within_plan(self, events: Sequence[tuple[Event, int]]) -> bool:
        """Whether the record after releasing ``events`` is a part of a plan whose (computed) ε fits the
        budget, which answers the budget check without a new accountant computation."""
        if not self.plan:
            return False
        planned = _plan_counts(tuple(self.plan))
        if any(count > planned.get(event, 0) for event, count in _merged([*self.events, *events])):
            return False
        return compute_epsilon(self.accountant, list(planned.items()), self.delta) <= self.budget * (1 + 1e-9)

    def check(self, events: Sequence[tuple[Event, int]], who: str = "this party") -> None:
        """Raise :class:`BudgetExceededError` if releasing ``events`` would exceed the budget."""
        if self.within_plan(events):
            return
        after = self.epsilon_after(events)
        if after > self.budget * (1 + 1e-9):
            raise BudgetExceededError(
                f"{who}: the next release would bring epsilon to {after:.4f} > budget {self.budget:g} "
                f"(delta={self.delta:g}, {self.accountant} accountant; {self.epsilon():.4f} spent so far): "
                "stopped before releasing it"
            )

    def spend(self, events: Sequence[tuple[Event, int]], who: str = "this party") -> None:
        self.check(events, who)
        self.record(events)

    def record(self, events: Sequence[tuple[Event, int]]) -> None:
        """Add ``events`` to the record with no budget check: for a caller that has just checked them
        (:meth:`check`), e.g. for several ledgers at once before any records."""
        self.events = _merged([*self.events, *events])

    def state_dict(self) -> list[tuple[dict[str, Any], int]]:
        return [(e.to_dict(), c) for e, c in self.events]

    def load_state_dict(self, state: Sequence[tuple[dict[str, Any], int]]) -> None:
        self.events = [(Event.from_dict(e), int(c)) for e, c in state]


@functools.lru_cache(maxsize=64)
def _plan_counts(plan: tuple[tuple[Event, int], ...]) -> dict[Event, int]:
    """A plan's ``{event: count}`` (memoised: every ledger of a run shares one plan; read-only)."""
    return dict(_merged(plan))


def _merged(events: Iterable[tuple[Event, int]]) -> list[tuple[Event, int]]:
    """Equal events summed into one ``(event, count)`` pair (order of first appearance)."""
    counts: dict[Event, int] = {}
    for event, count in events:
        counts[event] = counts.get(event, 0) + count
    return list(counts.items())


#: Below this Gaussian noise multiplier dp-accounting's discretised privacy-loss distributions grow to
#: gigabytes (their support scales like 1/σ²); the PLD figure is then not computed as a secondary report.
PLD_MIN_NOISE_MULTIPLIER = 0.3


def pld_practical(events: Iterable[tuple[Event, int]]) -> bool:
    """Whether the PLD of ``events`` is cheap enough to compute (every Gaussian multiplier >= 0.3)."""
    return all(
        getattr(e, "noise_multiplier", math.inf) >= PLD_MIN_NOISE_MULTIPLIER
        for e, _ in events
        if not isinstance(e, (PureDpEvent, LaplaceEvent))
    )


def spend_report(
    ledgers: Iterable[PrivacyLedger],
    *,
    accountant: str,
    delta: float,
    budget: float,
    mechanism: str,
    noise_multiplier: float,
    planned_releases: int,
    counted: Iterable[str] = ("gaussian", "sampled-gaussian"),
    all_accountants: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """What a run spent, for summary.json and the round metrics: ε at δ of every party under both
    accountants (max and mean over parties; only under ``accountant`` with ``all_accountants=False``, as
    the per-round metrics need), the releases of the busiest party (events of the kinds in ``counted``),
    the calibration, and ``epsilon`` = the max under ``accountant``."""
    counted = set(counted)
    spent: dict[str, list[float]] = {name: [] for name in sorted(ACCOUNTANTS)}
    releases = []
    for ledger in ledgers:
        releases.append(sum(n for e, n in ledger.events if e.kind in counted))
        for name in spent:
            if name != accountant and (not all_accountants or (name == "pld" and not pld_practical(ledger.events))):
                spent[name].append(math.nan)  # a secondary figure: not asked for, or not worth gigabytes
            else:
                spent[name].append(compute_epsilon(name, ledger.events, delta) if ledger.events else 0.0)
    out: dict[str, Any] = {
        "mechanism": mechanism,
        "accountant": accountant,
        "epsilon_budget": budget,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "selection_epsilon_per_release": None,
        "planned_releases": planned_releases,
        "max_releases_by_a_client": max(releases, default=0),
        **extra,
    }
    for name, values in spent.items():
        if any(math.isnan(v) for v in values):
            out[f"epsilon_{name}_max"] = out[f"epsilon_{name}_mean"] = None
            continue
        out[f"epsilon_{name}_max"] = max(values, default=0.0)
        out[f"epsilon_{name}_mean"] = sum(values) / len(values) if values else 0.0
    out["epsilon"] = out[f"epsilon_{accountant}_max"]
    return out
