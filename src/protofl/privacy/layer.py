"""The client-side privacy layer: one object per run, built from the ``[privacy]`` section.

A method computes clean statistics on a client (the features and labels of its train split for a
prototype release; per-example gradients for DP-SGD). The layer is what stands between them and the
reply: it calibrates the noise (lazily, on first use, memoised in :mod:`protofl.privacy.accounting`),
spends from the client's one ledger (kept in the client's state under
:data:`~protofl.privacy.accounting.LEDGER_KEY`) before anything is released, releases, and reports the
spend. Both engines reach it through the same algorithm hooks (``check_release`` before a round,
``privacy_report`` for the rows and summary.json), so a method never wires a ledger or an accountant
by hand.

The layer of a run comes from the registry :data:`PRIVACY_LAYERS` by ``privacy.mechanism``
(:func:`create_privacy_layer`); a method declares the mechanisms it hosts
(``Algorithm.privacy_mechanisms``).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy.accounting import (
    ACCOUNTANTS,
    LEDGER_KEY,
    Event,
    GaussianEvent,
    PrivacyLedger,
    PureDpEvent,
    SampledGaussianEvent,
    calibrate_noise_multiplier,
    spend_report,
)
from protofl.privacy.class_gradients import ClassGradientRelease, class_gradient_release
from protofl.privacy.mechanisms import (
    SELECTIONS,
    PrototypeRelease,
    ReleaseSettings,
    broadcast_top_k,
    igpp_release_batch,
    split_multiplier,
    vpp_release_batch,
)

__all__ = [
    "NEXT_ROUND_KEY",
    "PRIVACY_LAYERS",
    "ClassGradientLayer",
    "DPSGDLayer",
    "IGPPLayer",
    "PlannedReleaseLayer",
    "PrivacyLayer",
    "VPPLayer",
    "PrototypeReleaseLayer",
    "create_privacy_layer",
    "register_privacy_layer",
]

State = Mapping[str, Any]


class PrivacyLayer(abc.ABC):
    """What every mechanism's layer shares: the configuration, the client's ledger, the report."""

    def __init__(self, config: PrivacyConfig, num_classes: int):
        if config.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"privacy.accountant: {config.accountant!r} is not one of {', '.join(sorted(ACCOUNTANTS))}"
            )
        if config.planned_releases < 1:
            raise ConfigError(
                "privacy.planned_releases: must be resolved to >= 1 (resolving the run's "
                "configuration sets it to federation.rounds)"
            )
        self.config = config
        self.num_classes = num_classes

    @property
    def mechanism(self) -> str:
        return self.config.mechanism

    def plan(self) -> tuple[tuple[Event, int], ...]:
        """The releases the noise was calibrated for (lets a ledger answer budget checks without an
        accountant run while a client stays within them; empty where it depends on the client)."""
        return ()

    def ledger(self, client_state: State) -> PrivacyLedger:
        """The client's ledger from its state (empty for a client that has not released yet)."""
        c = self.config
        ledger = PrivacyLedger(c.accountant, c.delta, c.epsilon, plan=self.plan())
        ledger.load_state_dict(client_state.get(LEDGER_KEY, ()))
        return ledger

    def spend(self, client_state: State, events: Sequence[tuple[Event, int]], who: str) -> list:
        """Record ``events`` in the client's ledger and return its new state; raises
        :class:`~protofl.privacy.accounting.BudgetExceededError` (recording nothing) if they would take
        the client past its budget. Call it before anything the events cover is released."""
        ledger = self.ledger(client_state)
        ledger.spend(events, who)
        return ledger.state_dict()

    def spend_together(
        self, client_states: Sequence[State], events: Sequence[tuple[Event, int]], whos: Sequence[str]
    ) -> list[list]:
        """:meth:`spend` for several clients at once: every ledger is checked before any records, so a
        client that would exceed its budget raises (:class:`~protofl.privacy.accounting.BudgetExceededError`)
        with nothing recorded for any of them. Returns their new ledger states, in order."""
        # Clients whose ledgers hold the same record (in a run that samples every client, all of them) get
        # the same answer: each distinct record is loaded, checked and recorded once, in the order of its
        # first client, and every client gets its own copy of the new state.
        groups: dict[tuple, list[int]] = {}
        for k, state in enumerate(client_states):
            groups.setdefault(_record_key(state.get(LEDGER_KEY, ())), []).append(k)
        ledgers = {key: self.ledger(client_states[members[0]]) for key, members in groups.items()}
        for key, members in groups.items():
            ledgers[key].check(events, whos[members[0]])
        out: list[list] = [[] for _ in client_states]
        for key, members in groups.items():
            ledgers[key].record(events)
            new = ledgers[key].state_dict()
            for k in members:
                out[k] = [(dict(event), count) for event, count in new]
        return out

    def check_next(self, client_state: State, who: str) -> None:  # noqa: B027 (a hook: no check by default)
        """Raise :class:`~protofl.privacy.accounting.BudgetExceededError` if the client's next release
        would exceed its budget (where the layer knows that release in advance)."""

    @abc.abstractmethod
    def report(self, client_states: Iterable[State], all_accountants: bool = True) -> dict[str, Any]:
        """Spent ε at δ per client (max and mean over clients) and the calibration."""

    def ledger_report(
        self,
        client_states: Iterable[State],
        all_accountants: bool,
        noise_multiplier: float,
        counted: tuple[str, ...],
        **extra: Any,
    ) -> dict[str, Any]:
        """:func:`~protofl.privacy.accounting.spend_report` of the clients' ledgers under this run's
        configuration (what every layer's :meth:`report` shares); ``extra`` adds the layer's own keys."""
        c = self.config
        return spend_report(
            [self.ledger(state) for state in client_states],
            accountant=c.accountant,
            delta=c.delta,
            budget=c.epsilon,
            mechanism=c.mechanism,
            noise_multiplier=noise_multiplier,
            planned_releases=c.planned_releases,
            counted=counted,
            all_accountants=all_accountants,
            **extra,
        )


class PlannedReleaseLayer(PrivacyLayer):
    """A layer whose every release costs the same events, known in advance (:meth:`release_events`): one
    Gaussian release at σ plus the layer's :meth:`side_events`. σ is calibrated so that
    ``planned_releases`` such releases compose to at most (ε, δ) under the configured accountant."""

    def side_events(self) -> tuple[tuple[Event, int], ...]:
        """What a release costs besides its Gaussian mechanism (e.g. VPP's private selection); none here."""
        return ()

    @functools.cached_property
    def noise_multiplier(self) -> float:
        c = self.config
        side = [(event, count * c.planned_releases) for event, count in self.side_events()]
        return calibrate_noise_multiplier(c.epsilon, c.delta, c.planned_releases, c.accountant, side)

    def release_events(self) -> tuple[tuple[Event, int], ...]:
        """What one release costs."""
        return (*self.side_events(), (GaussianEvent(self.noise_multiplier), 1))

    def plan(self) -> tuple[tuple[Event, int], ...]:
        return tuple((event, count * self.config.planned_releases) for event, count in self.release_events())

    def check_next(self, client_state: State, who: str) -> None:
        # The answer depends on the release's events and the client's record alone: a record already found
        # to allow this release (in a round that samples every client, they all hold the same one) is not
        # loaded and checked again. A refusal is not remembered: it raises.
        events = self.release_events()
        key = (events, _record_key(client_state.get(LEDGER_KEY, ())))
        if key in self._allowed:
            return
        self.ledger(client_state).check(events, who)
        if len(self._allowed) >= _ALLOWED_RECORDS:
            self._allowed.clear()
        self._allowed.add(key)

    @functools.cached_property
    def _allowed(self) -> set[tuple]:
        """``(release events, record)`` pairs found within the budget by :meth:`check_next`."""
        return set()

    def report_details(self) -> dict[str, Any]:
        """The layer's own keys of its :meth:`report` (after the shared ones)."""
        return {}

    def report(self, client_states: Iterable[State], all_accountants: bool = True, **extra: Any) -> dict[str, Any]:
        return self.ledger_report(
            client_states, all_accountants, self.noise_multiplier, ("gaussian",), **self.report_details(), **extra
        )


class PrototypeReleaseLayer(PlannedReleaseLayer):
    """A prototype release (VPDR's IGPP and VPP): the noisy per-class prototypes a client may publish
    (under ``privacy.relation = "add-remove"`` every class, with noisy counts; see
    :mod:`protofl.privacy.mechanisms`).

    σ is calibrated so that ``planned_releases`` releases (with VPP, each also one private selection at
    ``selection_fraction · ε / planned_releases``, pure DP) compose to at most (ε, δ) under the configured
    accountant. The VPDR reference gives 0.9 ε to the Gaussian part by the classic RDP conversion;
    composing both parts with the accountant is tighter, so σ comes out lower at the same ε."""

    #: The share of ε per release spent on a private selection (VPP), or None.
    selection_epsilon: float | None = None

    def side_events(self) -> tuple[tuple[Event, int], ...]:
        return ((PureDpEvent(self.selection_epsilon), 1),) if self.selection_epsilon else ()

    @property
    def settings(self) -> ReleaseSettings:
        """The release's settings from the configuration at the calibrated σ."""
        c = self.config
        return ReleaseSettings(
            self.num_classes, c.clip_bound, self.noise_multiplier, c.sensitivity, c.relation, c.count_fraction
        )

    @property
    def count_noise_std(self) -> float:
        """Standard deviation of the noise on every released count (σ_n = σ/√f under add/remove: one
        count moves by 1); 0 under replace-one, where the counts are published exactly. Public: a
        server may use it (e.g. to tell a class a client holds from noise)."""
        c = self.config
        return 0.0 if c.relation == "replace-one" else split_multiplier(self.noise_multiplier, c.count_fraction)[1]

    def release(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        client_state: State,
        who: str = "client",
        received: torch.Tensor | None = None,
    ) -> tuple[PrototypeRelease, list]:
        """The noisy prototypes of features ``z`` (labels ``y``) and the client's new ledger state; the
        budget is checked and the release recorded before any noise is drawn. ``received``: the global
        prototypes the client received this round (one row per class; public), for a mechanism that
        uses them. The release runs on the CPU whatever the run's device: the features come here, the
        noise is drawn from the client's CPU generator, so a seed releases the same values on every device."""
        ledger = self.spend(client_state, self.release_events(), who)
        public = None if received is None else received.cpu()
        return self.noisy_prototypes(z.cpu(), y.cpu(), generator, public), ledger

    def release_batch(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        generators: Sequence[torch.Generator],
        client_states: Sequence[State],
        whos: Sequence[str],
        received: torch.Tensor | None = None,
    ) -> list[tuple[PrototypeRelease, list]]:
        """:meth:`release` of the ``K`` clients of a batched round as one program: features ``z`` (K, n, d),
        labels ``y`` (K, n), ``weight`` (K, n: 0 on padding rows), each client's generator, state and
        name. Every ledger is checked and records the release before any noise is drawn
        (:meth:`spend_together`); client k's noise comes from ``generators[k]`` alone, so its release
        and its ledger are those of :meth:`release` on its own rows. It runs on the CPU, as :meth:`release`."""
        ledgers = self.spend_together(client_states, self.release_events(), whos)
        public = None if received is None else received.cpu()
        rows = None if weight is None else weight.cpu()
        return list(zip(self.noisy_prototypes_batch(z.cpu(), y.cpu(), rows, generators, public), ledgers))

    def noisy_prototypes(
        self, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator, received: torch.Tensor | None = None
    ) -> PrototypeRelease:
        """The mechanism itself (its cost is :meth:`release_events`): :meth:`noisy_prototypes_batch` of one
        client."""
        return self.noisy_prototypes_batch(z[None], y[None], None, [generator], received)[0]

    @abc.abstractmethod
    def noisy_prototypes_batch(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        generators: Sequence[torch.Generator],
        received: torch.Tensor | None = None,
    ) -> list[PrototypeRelease]:
        """:meth:`noisy_prototypes` of ``K`` clients as one program (see :meth:`release_batch`)."""

    def report_details(self) -> dict[str, Any]:
        c = self.config
        return {
            "selection_epsilon_per_release": self.selection_epsilon,
            "sensitivity": c.sensitivity,
            "relation": c.relation,
            "count_noise_multiplier": self.count_noise_std or None,
        }


class IGPPLayer(PrototypeReleaseLayer):
    """IGPP: every class mean of clipped features plus isotropic Gaussian noise."""

    def noisy_prototypes_batch(self, z, y, weight, generators, received=None) -> list[PrototypeRelease]:
        return igpp_release_batch(z, y, weight, self.settings, generators)


class VPPLayer(PrototypeReleaseLayer):
    """VPP: a selection of the discriminative dimensions (``privacy.selection``), each group clipped and
    noised apart. A private selection (``private-anova``) spends ``selection_fraction`` of ε per release;
    one from the broadcast (``broadcast-variance``) spends nothing, so σ is calibrated on the Gaussian
    releases alone (as IGPP's at the same ε), and a release in a round whose broadcast holds fewer than
    two global prototypes selects every dimension (IGPP-shaped)."""

    def __init__(self, config: PrivacyConfig, num_classes: int):
        super().__init__(config, num_classes)
        rule = SELECTIONS.get(config.selection)
        if rule is None:
            raise ConfigError(f"privacy.selection: {config.selection!r} is not one of {', '.join(sorted(SELECTIONS))}")
        self.private_selection = rule.private
        if rule.private:
            self.selection_epsilon = config.selection_fraction * config.epsilon / config.planned_releases

    def public_selection(self, received: torch.Tensor | None, d: int) -> torch.Tensor | None:
        """The group A chosen from the broadcast (every dimension when it holds fewer than two global
        prototypes), or ``None`` for a private selection (made inside the release)."""
        if self.private_selection:
            return None
        k = math.ceil(self.config.rho * d)
        chosen = None if received is None else broadcast_top_k(received, k)
        return torch.arange(d, device="cpu") if chosen is None else torch.from_numpy(chosen)

    def noisy_prototypes_batch(self, z, y, weight, generators, received=None) -> list[PrototypeRelease]:
        c = self.config
        selected = self.public_selection(received, z.shape[2])
        return vpp_release_batch(
            z, y, weight, self.settings, generators, c.rho, c.score_cap, self.selection_epsilon, selected
        )

    def report_details(self) -> dict[str, Any]:
        return {**super().report_details(), "selection": self.config.selection}


class DPSGDLayer(PrivacyLayer):
    """DP-SGD: Poisson-sampled steps of clipped per-example gradients plus Gaussian noise (the
    pieces are in :mod:`protofl.privacy.dpsgd`). A client's sampling rate depends on its size, so σ is
    calibrated per rate (memoised), for every step the client will take over the run plus any other
    release the method plans (``extra``)."""

    def __init__(self, config: PrivacyConfig, num_classes: int):
        super().__init__(config, num_classes)
        #: The noise multipliers handed out in this process, by sampling rate (for the report).
        self.used: dict[float, float] = {}

    @property
    def clip_norm(self) -> float:
        return self.config.clip_norm

    @staticmethod
    def next_round_state(events: Sequence[tuple[Event, int]]) -> list:
        """What a client's next round will cost, for its state under :data:`NEXT_ROUND_KEY` (a DP-SGD
        method writes it after each round: it knows the client's sampling rate and step count)."""
        return [(event.to_dict(), int(count)) for event, count in events]

    def check_next(self, client_state: State, who: str) -> None:
        """Before a round: raise :class:`~protofl.privacy.accounting.BudgetExceededError` if the round the
        client's state announces (:data:`NEXT_ROUND_KEY`) would exceed its budget, so that the run stops
        before the round (with its checkpoint) rather than inside the client's step. A client that has
        not trained yet announces nothing (its first round is within the calibrated plan)."""
        announced = client_state.get(NEXT_ROUND_KEY)
        if announced:
            self.ledger(client_state).check([(Event.from_dict(e), int(c)) for e, c in announced], who)

    def noise_multiplier(self, rate: float, steps: int, extra: Sequence[tuple[Event, int]] = ()) -> float:
        """σ for a client sampled at ``rate`` that takes ``steps`` DP-SGD steps over the run, composed with
        the ``extra`` releases, at the run's (ε, δ)."""
        c = self.config
        sigma = calibrate_noise_multiplier(c.epsilon, c.delta, steps, c.accountant, tuple(extra), sampling_rate=rate)
        self.used[rate] = sigma
        return sigma

    def gaussian_multiplier(self, epsilon: float, releases: int = 1) -> float:
        """σ of ``releases`` plain Gaussian releases spending ``epsilon`` at the run's δ (e.g. a share of the
        budget set aside for one release outside the DP-SGD steps)."""
        c = self.config
        return calibrate_noise_multiplier(epsilon, c.delta, releases, c.accountant)

    @staticmethod
    def step_event(rate: float, noise_multiplier: float) -> SampledGaussianEvent:
        """The accounting event of one DP-SGD step."""
        return SampledGaussianEvent(rate, noise_multiplier)

    def report(self, client_states: Iterable[State], all_accountants: bool = True, **extra: Any) -> dict[str, Any]:
        sigmas = sorted(self.used.values())
        return self.ledger_report(
            client_states,
            all_accountants,
            sigmas[0] if sigmas else math.nan,
            ("sampled-gaussian",),
            noise_multipliers=sigmas,
            clip_norm=self.config.clip_norm,
            **extra,
        )


class ClassGradientLayer(DPSGDLayer):
    """``dp-gradients`` (private CReFF and FedHPro): DP-SGD local training protects the model a client
    uploads, and one noisy per-class gradient upload per round (:mod:`protofl.privacy.class_gradients`)
    protects the gradients it uploads next to it; both are spent from the client's one ledger before the
    round releases anything. The uploads get the share ``fraction`` of ε: their σ_u is calibrated so that
    ``planned_releases`` uploads alone spend ``fraction · ε``; a client's DP-SGD σ (per sampling rate) is
    then calibrated so that all its steps *composed with those uploads* spend at most ε under the
    accountant (tighter than splitting ε in two)."""

    def upload_multiplier(self, fraction: float) -> float:
        """σ_u of every per-class gradient upload when the uploads get the share ``fraction`` of ε."""
        c = self.config
        return self.gaussian_multiplier(fraction * c.epsilon, c.planned_releases)

    def step_multiplier(self, rate: float, steps_per_round: int, upload_sigma: float) -> float:
        """σ of the DP-SGD steps of a client sampled at ``rate`` (``steps_per_round`` per planned release),
        composed with the planned uploads at ``upload_sigma``."""
        releases = self.config.planned_releases
        return self.noise_multiplier(rate, releases * steps_per_round, [(GaussianEvent(upload_sigma), releases)])

    def round_events(
        self, rate: float, step_sigma: float, steps_per_round: int, upload_sigma: float
    ) -> tuple[tuple[Event, int], ...]:
        """What one round of a client costs: its DP-SGD steps and one upload."""
        return ((self.step_event(rate, step_sigma), steps_per_round), (GaussianEvent(upload_sigma), 1))

    def count_noise_std(self, upload_sigma: float) -> float:
        """σ_n, the (public) standard deviation of the noise on every uploaded class count."""
        return split_multiplier(upload_sigma, self.config.count_fraction)[1]

    def release(
        self, contributions: torch.Tensor, labels: torch.Tensor, clip: float, upload_sigma: float, generator
    ) -> ClassGradientRelease:
        """The noisy per-class release of per-example ``contributions`` (rows, clipped to ``clip``); the
        caller has spent its event (:meth:`round_events`) before calling."""
        return class_gradient_release(
            contributions, labels, self.num_classes, clip, upload_sigma, self.config.count_fraction, generator
        )


#: How many records :meth:`PlannedReleaseLayer.check_next` remembers as allowed (then it starts afresh).
_ALLOWED_RECORDS = 256

#: Client-state key of the events of a DP-SGD client's next round (:meth:`DPSGDLayer.check_next`).
NEXT_ROUND_KEY = "privacy_next_round"

#: The layer of each ``privacy.mechanism``; add one with :func:`register_privacy_layer`.
PRIVACY_LAYERS: dict[str, type[PrivacyLayer]] = {}


def register_privacy_layer(mechanism: str, cls: type[PrivacyLayer]) -> None:
    if PRIVACY_LAYERS.get(mechanism, cls) is not cls:
        raise ValueError(f"privacy mechanism {mechanism!r} is registered twice")
    PRIVACY_LAYERS[mechanism] = cls


register_privacy_layer("igpp", IGPPLayer)
register_privacy_layer("vpp", VPPLayer)
register_privacy_layer("dp-sgd", DPSGDLayer)
register_privacy_layer("dp-gradients", ClassGradientLayer)


def create_privacy_layer(config: PrivacyConfig, num_classes: int) -> PrivacyLayer | None:
    """The layer of ``config.mechanism`` (``None`` for ``none``)."""
    if config.mechanism == "none":
        return None
    try:
        cls = PRIVACY_LAYERS[config.mechanism]
    except KeyError:
        raise ConfigError(
            f"privacy.mechanism: {config.mechanism!r} has no privacy layer; registered: "
            f"{', '.join(sorted(PRIVACY_LAYERS))}"
        ) from None
    return cls(config, num_classes)


def _record_key(record: Iterable) -> tuple:
    """A ledger state's ``(event dict, count)`` pairs as a hashable key: equal keys hold the same record."""
    return tuple((tuple(event.items()), count) for event, count in record)
