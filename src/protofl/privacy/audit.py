"""``protofl audit``: an empirical lower bound on a run's ε from one run of the real pipeline.

After Steinke, Nasr & Jagielski (2023), "Privacy auditing with one training run": ``m`` canaries, each
included by its own fair coin (the auditor's secret), go into one federated run as configured (the
in-process engine, the real :class:`~protofl.engine.rounds.RoundDriver`, the run's privacy layer and
ledgers). After the run, every canary gets a score computed from what the server received (the replies)
and sent (the broadcasts), plus what the auditor knows (the canaries, the data without them, the
configuration); the auditor guesses "in" for the highest scores and "out" for the lowest, and the number
of right guesses gives, at the chosen confidence, a lower bound ε_lower on the ε of every client: a run
whose ε_lower exceeds its reported ε does not have the privacy it claims.

The canary designs (:data:`CANARY_DESIGNS`, each with its threat model in ``threat``):

- ``release`` (``igpp``, ``vpp``), white box: each canary shifts one coordinate (class, dimension) of one
  client's release, in every release of that client, by the most one example may move that release as
  the run claims: ``std / σ`` of the noise the release says it used, whose privacy loss is the whole
  Gaussian release's (``1/σ``; under replace-one that is the sensitivity Δ itself, under add/remove it
  also carries the counts' share). VPP: one coordinate of each group, by its group's share. The auditor
  also sees the clean statistic at the client. It audits the noise, its calibration and the accounting
  as they run, not the sensitivity rule.
- ``gradient`` (``dp-sgd``), white box: each canary is an extra clipped per-example gradient, a Dirac
  direction of norm ``clip_norm`` on one parameter of one client's model, Poisson-sampled into that
  client's DP-SGD steps at the client's rate; its score is the step the client's released update took
  against that direction. The released arrays it audits are a method's ``dp_sgd_released()`` (FedHypeVAE's
  shared φ) or the model parameters it releases (DP-FedAvg).
- ``example`` (``igpp``, ``vpp``, add/remove), white box: canary ``(client, round)`` is one out-of-range
  example added to that client's train split in that round by its coin. The auditor computes the
  client's clean release (features and counts) with and without it, from the same state and generator;
  the score is the likelihood ratio of those two worlds over the whole release, under the noise it
  claims. It audits the sensitivity rule on the trained feature map and the counts, and reports every
  canary whose two worlds lie further apart than ``1/σ`` (the most a correct rule allows) as a broken
  sensitivity (:attr:`AuditResult.sensitivity_exceeded`).

``replay_seed``: the server also knows the run seed (as with ``privacy.noise = "seeded"`` on Flower) and
replays each client's draws (``derive_seed``) to compute the release it would have made without any
canary; the score then subtracts that replay. Noise from a secret the server lacks is not replayed.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from protofl.config import ConfigError, RunConfig, check
from protofl.payload import Payload

__all__ = [
    "CANARY_DESIGNS",
    "AuditResult",
    "AuditSettings",
    "AuditTransport",
    "Canary",
    "CanaryDesign",
    "ExampleCanaries",
    "GradientCanaries",
    "ReleaseCanaries",
    "audit_run",
    "check_audit",
    "design_for",
]

#: A tag that separates the auditor's coins and samples from every stream of the run itself.
AUDIT_STREAM = 0x6A0D17


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """How a run is audited: ``canaries`` (m), the ``confidence`` of the bound, the canary ``design``
    (``auto``: the one for the run's mechanism), ``replay_seed`` (the server knows the run seed) and the
    auditor's own ``seed`` (its coins; not the run's)."""

    canaries: int
    confidence: float = 0.95
    design: str = "auto"
    replay_seed: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check(
            isinstance(self.canaries, int) and self.canaries >= 1,
            "audit.canaries",
            f"must be a whole number >= 1, got {self.canaries!r}",
        )
        check(0.5 <= self.confidence < 1, "audit.confidence", f"must be in [0.5, 1), got {self.confidence}")
        check(
            self.design == "auto" or self.design in CANARY_DESIGNS,
            "audit.design",
            f"{self.design!r} is not one of auto, {', '.join(sorted(CANARY_DESIGNS))}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Canary:
    """One canary: its number, the client it belongs to, its place (design-specific integers) and its
    coin (``included``)."""

    id: int
    client: int
    place: tuple[int, ...]
    included: bool


# --------------------------------------------------------------------------------------------------
# Canary designs


class CanaryDesign(abc.ABC):
    """Where canaries go into a run, and how each is scored from the server's view."""

    name: ClassVar[str]
    #: The ``privacy.mechanism`` values this design audits.
    mechanisms: ClassVar[tuple[str, ...]]
    #: Who the auditor is and what it knows (audit.json and docs/privacy.md).
    threat: ClassVar[str]

    def __init__(self, config: RunConfig, settings: AuditSettings):
        self.config = config
        self.settings = settings
        self.canaries: list[Canary] = []
        #: Per canary: its score, summed over the rounds its client released in.
        self.score_sum: dict[int, float] = {}
        #: While True (a replay), nothing is inserted or recorded.
        self.disabled = False
        self.round = 0

    # -- placement ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def slots(self, algorithm: Any, clients: Sequence[Any]) -> list[tuple[int, tuple[int, ...]]]:
        """Every ``(client, place)`` a canary can take (distinct places never interfere)."""

    def place(self, algorithm: Any, clients: Sequence[Any]) -> list[Canary]:
        """Draw ``settings.canaries`` slots and their coins from the auditor's seed (the same on resume)."""
        slots = self.slots(algorithm, clients)
        m = self.settings.canaries
        if m > len(slots):
            raise ConfigError(
                f"audit.canaries: this run has room for {len(slots)} {self.name} canaries, fewer than the "
                f"{m} asked for (more clients, classes or dimensions make more room)"
            )
        rng = np.random.default_rng([self.settings.seed, AUDIT_STREAM])
        chosen = sorted(rng.choice(len(slots), size=m, replace=False).tolist())
        coins = rng.random(m) < 0.5
        self.canaries = [
            Canary(i, slots[s][0], slots[s][1], bool(coin)) for i, (s, coin) in enumerate(zip(chosen, coins))
        ]
        return self.canaries

    def of_client(self, client: int) -> list[Canary]:
        return [c for c in self.canaries if c.client == client]

    # -- the run -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def install(self, algorithm: Any) -> None:
        """Put the canaries' insertion into ``algorithm`` (an instance-level wrapper; nothing global)."""

    #: Whether the server's replay of a client's draws (``replay_seed``) can leave this design's canaries out.
    replayable: ClassVar[bool] = True

    def check(self) -> None:
        """Refuse (one line) a run this design cannot audit, beyond its mechanism; nothing by default."""
        return None

    def begin_round(self, r: int) -> None:
        self.round = r

    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, transport: Any, run: Any) -> Any:
        """Round ``r``'s exchange: ``run()`` runs it; a design that changes the clients' data for the round
        or needs their state from before it wraps that call."""
        return run()

    @abc.abstractmethod
    def observe(self, r: int, client: int, reply: Payload, broadcast: Payload, replay: Payload | None) -> None:
        """Score the canaries of ``client`` from its round-``r`` reply as the server received it, the
        ``broadcast`` the server sent, and (``replay_seed``) the reply replayed without canaries."""

    def add_score(self, canary: Canary, value: float) -> None:
        self.score_sum[canary.id] = self.score_sum.get(canary.id, 0.0) + float(value)

    def scores(self) -> np.ndarray:
        return np.array([self.score_sum.get(c.id, 0.0) for c in self.canaries])

    def findings(self) -> dict[str, Any]:
        """What this design measured besides the scores (in audit.json); nothing by default."""
        return {}

    def sensitivity_exceeded(self) -> bool:
        """Whether the design saw one example move a release by more than the run's sensitivity rule
        allows (only a design that computes both worlds can tell)."""
        return False

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"design": self.name, "canaries": [dataclasses.astuple(c) for c in self.canaries], **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("design") != self.name or [tuple(c) for c in state["canaries"]] != [
            dataclasses.astuple(c) for c in self.canaries
        ]:
            raise ConfigError("the checkpoint holds another audit's canaries; start the audit in a new folder")
        self._load(state)

    def _state(self) -> dict[str, Any]:
        return {"score_sum": dict(self.score_sum)}

    def _load(self, state: Mapping[str, Any]) -> None:
        self.score_sum = {int(k): float(v) for k, v in state["score_sum"].items()}


def watch_releases(algorithm: Any, on_release: Any) -> None:
    """Wrap ``algorithm``'s prototype release (this instance only) so that every release of a client goes
    through ``on_release(client, release, clean, sigma)``, which returns what is released; ``clean`` is
    the same release with a vanishing noise (1e-300 σ: nothing left in float32), drawn from a copy of the
    client's generator, so VPP's private selection picks the same dimensions."""
    layer = algorithm.privacy_layer
    release_prototypes = algorithm.release_prototypes
    noisy_prototypes = layer.noisy_prototypes
    current = [-1]

    def release_hook(z, y, clean, generator, client_state, client_id, *args, **kwargs):
        current[0] = client_id
        return release_prototypes(z, y, clean, generator, client_state, client_id, *args, **kwargs)

    def noisy_hook(z, y, generator, *args, **kwargs):
        quiet = copy.copy(layer)
        quiet.__dict__.pop("noisy_prototypes")  # the layer's own method, not this hook
        quiet.__dict__["noise_multiplier"] = 1e-300
        clean = quiet.noisy_prototypes(
            z, y, torch.Generator(device=generator.device).set_state(generator.get_state()), *args, **kwargs
        )
        released = noisy_prototypes(z, y, generator, *args, **kwargs)
        return on_release(current[0], released, clean, layer.noise_multiplier)

    algorithm.release_prototypes = release_hook
    layer.noisy_prototypes = noisy_hook
    algorithm.batch_releases = False  # every release goes through the hooks above, one client at a time


class ReleaseCanaries(CanaryDesign):
    """White-box canaries in the prototype releases (see the module docstring). A canary's place is
    ``(class, index)``: IGPP shifts dimension ``index``; VPP shifts the ``index``-th selected and the
    ``index``-th unselected dimension of the release, by ``κ_A Δ`` and ``κ_B Δ``."""

    name = "release"
    mechanisms = ("igpp", "vpp")
    threat = (
        "white box: the auditor inserts each canary into one client's release as a shift of the full claimed "
        "per-example sensitivity in every release, and knows the clean statistic; it does not know the noise"
    )

    def __init__(self, config: RunConfig, settings: AuditSettings):
        super().__init__(config, settings)
        #: (round, client) -> canary id -> (coordinates, shift, noise std, clean value), from the client.
        self.inserted: dict[tuple[int, int], dict[int, tuple[list[int], list[float], list[float], list[float]]]] = {}

    def per_class(self, dim: int) -> int:
        """Canary places per class of a client: every dimension (IGPP), or as many as both VPP groups can
        give one coordinate each (``k`` alone when group B is empty)."""
        if self.config.privacy.mechanism != "vpp":
            return dim
        k = math.ceil(self.config.privacy.rho * dim)
        return k if k == dim else min(k, dim - k)

    def slots(self, algorithm: Any, clients: Sequence[Any]) -> list[tuple[int, tuple[int, ...]]]:
        n = self.per_class(algorithm.model.feature_dim)
        return [
            (data.client_id, (c, i)) for data in clients for c in torch.unique(data.y_train).tolist() for i in range(n)
        ]

    def install(self, algorithm: Any) -> None:
        def on_release(client: int, release: Any, clean: Any, sigma: float) -> Any:
            mine = [] if self.disabled else self.of_client(client)
            return self._insert(client, release, clean, sigma, mine) if mine else release

        watch_releases(algorithm, on_release)

    def _coordinates(self, release: Any, row: int, index: int, sigma: float) -> tuple[list[int], list[float]]:
        """The coordinates a canary shifts in ``release``'s class ``row`` and by how much: ``std / σ`` of the
        noise the release says it used (IGPP), or its VPP split over the two groups (same loss, ``1/σ``)."""
        from protofl.privacy.mechanisms import vpp_group_noise

        std = release.noise_std[row].double()
        d = len(std)
        if release.selected is None:
            return [index], [float(std[index]) / sigma]
        in_a = torch.zeros(d, dtype=torch.bool, device=std.device)
        in_a[release.selected] = True
        group_a, group_b = torch.nonzero(in_a).flatten(), torch.nonzero(~in_a).flatten()
        kappa_a, kappa_b, s_a, s_b = vpp_group_noise(d, len(group_a), sigma)
        a = int(group_a[index])
        sensitivity = float(std[a]) / s_a
        if not len(group_b):
            return [a], [kappa_a * sensitivity]
        return [a, int(group_b[index])], [kappa_a * sensitivity, kappa_b * sensitivity]

    def _insert(self, client: int, release: Any, clean: Any, sigma: float, mine: list[Canary]) -> Any:
        statistic = getattr(release, "statistic", None)
        if statistic is not None and not torch.equal(statistic.float(), release.prototypes):
            raise ConfigError(
                "audit.design: release canaries shift the released prototypes by the noise they claim, but this "
                "release's prototypes are not its noisy statistic (noisy sums divided by noisy counts)"
            )
        protos = release.prototypes.double().clone()
        record = self.inserted.setdefault((self.round, client), {})
        rows = {int(c): i for i, c in enumerate(release.classes.tolist())}
        for canary in mine:
            cls, index = canary.place
            if cls not in rows:
                continue
            row = rows[cls]
            coords, shift = self._coordinates(release, row, index, sigma)
            std = [float(release.noise_std[row, j]) for j in coords]
            record[canary.id] = (coords, shift, std, [float(clean.prototypes[row, j]) for j in coords])
            if canary.included:
                protos[row, coords] += torch.tensor(shift, dtype=torch.float64, device=protos.device)
        return dataclasses.replace(release, prototypes=protos.float())

    def observe(self, r: int, client: int, reply: Payload, broadcast: Payload, replay: Payload | None) -> None:
        record = self.inserted.pop((r, client), {})
        rows = {int(c): i for i, c in enumerate(reply["classes"].tolist())}
        replay_rows = {int(c): i for i, c in enumerate(replay["classes"].tolist())} if replay is not None else {}
        by_id = {c.id: c for c in self.of_client(client)}
        for cid, (coords, shift, std, clean) in record.items():
            cls = by_id[cid].place[0]
            if cls not in rows:
                continue
            seen = reply["prototypes"][rows[cls], coords].astype(np.float64)
            if replay is not None:
                if cls not in replay_rows:
                    continue
                expected = replay["prototypes"][replay_rows[cls], coords].astype(np.float64)
            else:
                expected = np.asarray(clean)
            # The likelihood-ratio statistic of a Gaussian shift: Σ u_i (x_i − expected_i) / std_i².
            self.add_score(by_id[cid], float(np.sum(np.asarray(shift) * (seen - expected) / np.square(std))))


class GradientCanaries(CanaryDesign):
    """White-box gradient canaries in the DP-SGD steps (see the module docstring). A canary's place is
    ``(parameter number, flat index)`` in the model's parameters (sorted by name)."""

    name = "gradient"
    mechanisms = ("dp-sgd", "dp-gradients")
    threat = (
        "white box: the auditor inserts each canary as an extra clipped per-example gradient (a Dirac direction "
        "of norm clip_norm) Poisson-sampled into one client's DP-SGD steps; it scores from the released update"
    )

    def __init__(self, config: RunConfig, settings: AuditSettings):
        super().__init__(config, settings)
        self.names: list[tuple[str, str]] = []
        self.sizes: dict[int, int] = {}

    @staticmethod
    def released(algorithm: Any) -> dict[str, str]:
        """Every array a client releases that its DP-SGD steps train, with that parameter's name in the
        steps' clipped sum: a method's own ``dp_sgd_released()`` (FedHypeVAE's shared φ), else the model
        parameters it releases (DP-FedAvg)."""
        from protofl.algorithms.base import PARAM_PREFIX

        own = getattr(algorithm, "dp_sgd_released", None)
        if own is not None:
            return dict(own())
        model = getattr(algorithm, "model", None)
        named = model.named_parameters() if model is not None else ()
        released = algorithm.reply_spec().arrays
        return {PARAM_PREFIX + k: k for k, _ in named if PARAM_PREFIX + k in released}

    def slots(self, algorithm: Any, clients: Sequence[Any]) -> list[tuple[int, tuple[int, ...]]]:
        pairs = self.released(algorithm)
        if not pairs:
            raise ConfigError(
                f"audit.design: gradient canaries are scored on the model parameters a client releases, and "
                f"method {algorithm.name!r} releases none of its model's (dpfedavg does)"
            )
        spec = algorithm.reply_spec().arrays
        #: (released array, its name in the clipped sum), sorted by the released name.
        self.names = sorted(pairs.items())
        self.sizes = {data.client_id: data.num_train for data in clients}
        return [
            (data.client_id, (p, j))
            for data in clients
            for p, (name, _) in enumerate(self.names)
            for j in range(math.prod(spec[name].shape))
        ]

    def install(self, algorithm: Any) -> None:
        from protofl.privacy.dpsgd import inserted_gradients

        client_step = algorithm.client_step
        clip = self.config.privacy.clip_norm

        def step_hook(client_state, data, received, generator):
            mine = [] if self.disabled else [c for c in self.of_client(data.client_id) if c.included]
            if not mine:
                return client_step(client_state, data, received, generator)
            rng = np.random.default_rng([self.settings.seed, AUDIT_STREAM, self.round, data.client_id])

            def insert(summed: dict[str, torch.Tensor], expected_batch: float) -> dict[str, torch.Tensor]:
                rate = expected_batch / data.num_train  # the client's Poisson rate, as for its examples
                out = {k: v.clone() for k, v in summed.items()}
                for canary, coin in zip(mine, rng.random(len(mine))):
                    p, j = canary.place
                    gradient = self.names[p][1]
                    # A step that does not train the canary's parameter (FedHypeVAE's meta-code steps) skips it.
                    if coin < rate and gradient in out:
                        out[gradient].view(-1)[j] += clip
                return out

            with inserted_gradients(insert):
                return client_step(client_state, data, received, generator)

        algorithm.client_step = step_hook

    def observe(self, r: int, client: int, reply: Payload, broadcast: Payload, replay: Payload | None) -> None:
        base = replay if replay is not None else broadcast
        for canary in self.of_client(client):
            p, j = canary.place
            name = self.names[p][0]
            # SGD steps against the gradient: the canary pulls its coordinate down.
            moved = float(reply[name].reshape(-1)[j]) - float(base[name].reshape(-1)[j])
            self.add_score(canary, -moved)


class ExampleCanaries(CanaryDesign):
    """White-box example canaries (see the module docstring). Canary ``(round r, client k)`` is one real
    example: an out-of-range input (every input value ``±magnitude`` times the largest in the data, signs
    from the auditor's seed) labelled with the client's most frequent class, added to client k's train
    split in round r when its coin says so. At the client, the auditor also runs the other world: the same
    step from the same state with the same generator, with the example where the run had none or none
    where it had one, and keeps both worlds' clean releases (features and counts). The score of what the
    server received is the log-likelihood ratio of the two worlds under the noise the release claims, over
    the whole release: ``Σ (a − b)(x − (a + b)/2) / std²`` over the feature statistic (the released
    prototypes, times the noisy counts where the statistic is the class sums) and over the counts, with
    ``a``/``b`` the world with/without the example. It measures what one example really moves, trained
    feature map included, against the noise calibrated for the sensitivity rule."""

    name = "example"
    mechanisms = ("igpp", "vpp")
    threat = (
        "white box: the auditor adds one out-of-range example to one client's train split in one round by a "
        "coin, and computes at the client the clean release (features and counts) with and without it (same "
        "state, same generator); it audits the sensitivity rule on the trained feature map and the counts"
    )
    replayable = False
    #: The canary's input values, in units of the largest input value in the data.
    magnitude = 3.0

    def __init__(self, config: RunConfig, settings: AuditSettings):
        super().__init__(config, settings)
        #: This round's clean releases by world (``real``, ``other``) and client:
        #: (classes, clean statistic, clean counts, feature noise std, count noise std).
        self.clean: dict[str, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]]] = {
            "real": {},
            "other": {},
        }
        self.world = "real"
        self.scale = 1.0
        #: Per canary: how far apart its two worlds' clean releases lie, in the release's noise
        #: (``sqrt(Σ ((a − b)/std)²)`` over features and counts), and ``1/σ``, the most the run claims.
        self.separation: dict[int, float] = {}
        self.claimed: float = 0.0

    def check(self) -> None:
        if self.config.privacy.relation != "add-remove":
            raise ConfigError(
                "privacy.relation: example canaries add an example to a client's data, which is the add-remove "
                "relation; a replace-one claim says nothing about that (audit it with the release design)"
            )

    def slots(self, algorithm: Any, clients: Sequence[Any]) -> list[tuple[int, tuple[int, ...]]]:
        self.scale = self.magnitude * max(float(data.x_train.abs().max()) for data in clients if data.num_train)
        return [
            (data.client_id, (r, int(torch.bincount(data.y_train).argmax())))
            for data in clients
            if data.num_train
            for r in range(1, self.config.federation.rounds + 1)
        ]

    def install(self, algorithm: Any) -> None:
        def on_release(client: int, release: Any, clean: Any, sigma: float) -> Any:
            if not self.disabled:
                self.clean[self.world][client] = (
                    release.classes.numpy(),
                    clean.statistic.double().numpy(),
                    clean.counts.double().numpy(),
                    release.noise_std.double().numpy(),
                    float(release.count_std),
                )
                self.claimed = 1.0 / sigma
            return release

        watch_releases(algorithm, on_release)

    def this_round(self, client: int) -> Canary | None:
        return next((c for c in self.of_client(client) if c.place[0] == self.round), None)

    def with_example(self, data: Any, canary: Canary) -> Any:
        """``data`` with the canary's example added to its train split."""
        rng = np.random.default_rng([self.settings.seed, AUDIT_STREAM, canary.id])
        signs = rng.choice([-1.0, 1.0], size=tuple(data.x_train.shape[1:]))
        x = torch.as_tensor(signs * self.scale, dtype=data.x_train.dtype, device=data.x_train.device)
        y = torch.tensor([canary.place[1]], dtype=data.y_train.dtype, device=data.y_train.device)
        return dataclasses.replace(
            data, x_train=torch.cat([data.x_train, x[None]]), y_train=torch.cat([data.y_train, y])
        )

    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, transport: Any, run: Any) -> Any:
        from protofl.engine.client import client_generator

        inner = transport.inner
        self.clean = {"real": {}, "other": {}}
        canaries = {k: c for k in active if (c := self.this_round(k)) is not None}
        before = {k: copy.deepcopy(inner.client_state(k)) for k in canaries}
        original = list(inner.clients)
        inner.clients = [
            self.with_example(d, canaries[d.client_id])
            if d.client_id in canaries and canaries[d.client_id].included
            else d
            for d in original
        ]
        try:
            exchange = run()
        finally:
            inner.clients = original
        self.world = "other"
        try:
            for k, canary in canaries.items():
                data = original[k] if canary.included else self.with_example(original[k], canary)
                received = Payload.from_bytes(broadcast.to_bytes())
                generator = client_generator(inner.seed, r, k, inner.client_secret(k))
                inner.algorithm.client_step(before[k], data, received, generator)
        finally:
            self.world = "real"
        return exchange

    def observe(self, r: int, client: int, reply: Payload, broadcast: Payload, replay: Payload | None) -> None:
        from protofl.privacy.mechanisms import sensitivity_rule

        canary = self.this_round(client)
        if canary is None or client not in self.clean["real"] or client not in self.clean["other"]:
            return
        classes, real, real_counts, std, count_std = self.clean["real"][client]
        other_classes, other, other_counts, _, _ = self.clean["other"][client]
        if not np.array_equal(classes, other_classes) or not np.array_equal(classes, reply["classes"]):
            raise ConfigError("audit.design: example canaries need a release of every class (privacy.relation)")
        counts = np.asarray(reply["counts"], dtype=np.float64)
        x = reply["prototypes"].astype(np.float64)
        p = self.config.privacy
        if sensitivity_rule(p.sensitivity, p.relation).sums:
            x = x * np.maximum(counts, 1.0)[:, None]  # the noisy class sums the prototypes were divided from
        (a, b), (na, nb) = (
            ((real, other), (real_counts, other_counts))
            if canary.included
            else ((other, real), (other_counts, real_counts))
        )
        score = float(np.sum((a - b) * (x - (a + b) / 2) / np.square(std)))
        score += float(np.sum((na - nb) * (counts - (na + nb) / 2))) / count_std**2
        self.add_score(canary, score)
        self.separation[canary.id] = math.sqrt(
            float(np.sum(np.square((a - b) / std))) + float(np.sum(np.square(na - nb))) / count_std**2
        )

    def findings(self) -> dict[str, Any]:
        seen = np.array(list(self.separation.values()))
        return {
            "claimed_separation": self.claimed,
            "largest_separation": float(seen.max()) if len(seen) else 0.0,
            "median_separation": float(np.median(seen)) if len(seen) else 0.0,
            "separations_over_claim": int((seen > self.claimed * (1 + 1e-6)).sum()),
            "sensitivity_exceeded": self.sensitivity_exceeded(),
        }

    def sensitivity_exceeded(self) -> bool:
        # A relative margin for float32 features and float64 sums: a correct rule stays within 1/σ exactly.
        return any(v > self.claimed * (1 + 1e-6) for v in self.separation.values())

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "separation": dict(self.separation), "claimed": self.claimed}

    def _load(self, state: Mapping[str, Any]) -> None:
        super()._load(state)
        self.separation = {int(k): float(v) for k, v in state["separation"].items()}
        self.claimed = float(state["claimed"])


#: The canary designs by name; ``auto`` picks the first whose ``mechanisms`` hold the run's mechanism.
CANARY_DESIGNS: dict[str, type[CanaryDesign]] = {
    d.name: d for d in (ReleaseCanaries, GradientCanaries, ExampleCanaries)
}


def design_for(config: RunConfig, settings: AuditSettings) -> CanaryDesign:
    """The design ``settings.design`` names (or the first that audits the run's mechanism), checked to
    audit it."""
    mechanism = config.privacy.mechanism
    if settings.design == "auto":
        fitting = [d for d in CANARY_DESIGNS.values() if mechanism in d.mechanisms]
        if not fitting:
            raise ConfigError(f"privacy.mechanism: no canary design audits {mechanism!r}")
        return fitting[0](config, settings)
    cls = CANARY_DESIGNS[settings.design]
    if mechanism not in cls.mechanisms:
        raise ConfigError(
            f"audit.design: {cls.name!r} audits {', '.join(cls.mechanisms)}, not this run's privacy.mechanism "
            f"{mechanism!r}"
        )
    return cls(config, settings)


# --------------------------------------------------------------------------------------------------
# The observer between the round driver and the clients


class AuditTransport:
    """The in-process transport with an auditor on the wire: it passes every round through unchanged and
    shows the canary design each accepted reply next to the broadcast it answered (and, with
    ``replay_seed``, the reply replayed from the run seed without canaries). Its state, in every
    checkpoint, carries the scores so far, so a killed audit resumes where its run does. Everything else
    (the rest of the :class:`~protofl.engine.rounds.Transport` protocol) is the inner transport's."""

    def __init__(self, inner: Any, design: CanaryDesign, *, replay_seed: int | None = None):
        self.inner = inner
        self.design = design
        self.replay_seed = replay_seed

    def __getattr__(self, name: str) -> Any:
        # Everything but the exchange and the state is the inner transport's, whatever the protocol holds.
        if name in ("inner", "design", "replay_seed"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, owed: int | None) -> Any:
        self.design.begin_round(r)
        before = {k: copy.deepcopy(self.inner.client_state(k)) for k in active} if self.replay_seed is not None else {}
        exchange = self.design.exchange(
            r, active, broadcast, self, lambda: self.inner.exchange(r, active, broadcast, owed)
        )
        replied = [k for k in active if exchange.status.get(k) == "ok"]
        for k, reply in zip(replied, exchange.accepted):
            replay = (
                self._replay(r, k, before[k], broadcast, self.replay_seed) if self.replay_seed is not None else None
            )
            self.design.observe(r, k, reply, broadcast, replay)
        return exchange

    def _replay(self, r: int, k: int, state: dict[str, Any], broadcast: Payload, seed: int) -> Payload:
        """Client ``k``'s round-``r`` reply as the server can compute it from the run seed alone: the
        client's step with the generator ``derive_seed(seed, r, k)`` gives, no canary inserted."""
        from protofl.engine.client import client_generator

        algo = self.inner.algorithm
        received = Payload.from_bytes(broadcast.to_bytes())
        self.design.disabled = True
        try:
            _, reply, _ = algo.client_step(state, self.inner.clients[k], received, client_generator(seed, r, k))
        finally:
            self.design.disabled = False
        return Payload.from_bytes(reply.to_bytes())

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "audit": self.design.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "audit" not in state:
            raise ConfigError("the checkpoint is a plain run's, not an audit's; start the audit in a new folder")
        self.inner.load_state_dict(state)
        self.design.load_state_dict(state["audit"])


# --------------------------------------------------------------------------------------------------
# The audit


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What an audit found (audit.json holds the same and the scores)."""

    epsilon_lower: float
    epsilon: float
    delta: float
    design: str
    canaries: int
    guesses: int
    correct: int
    confidence: float
    run_dir: Path | None
    summary: dict[str, Any]
    #: Whether one example was seen to move a release by more than the sensitivity rule allows (example
    #: canaries): the premise of the reported ε fails, whatever ε_lower shows.
    sensitivity_exceeded: bool = False

    @property
    def violated(self) -> bool:
        """Whether the run was shown to leak more than its reported ε, or to break the sensitivity its ε
        rests on."""
        return self.epsilon_lower > self.epsilon or self.sensitivity_exceeded


def check_audit(config: RunConfig, settings: AuditSettings) -> CanaryDesign:
    """The design that audits ``config``, or one line on why it cannot be audited (before any work)."""
    p = config.privacy
    if p.mechanism == "none":
        raise ConfigError(
            "privacy.mechanism: 'none' releases nothing under a privacy claim; an audit needs igpp, vpp or dp-sgd"
        )
    if not math.isfinite(p.epsilon):
        raise ConfigError("privacy.epsilon: an infinite ε claims nothing; there is nothing to audit")
    design = design_for(config, settings)
    design.check()
    if settings.replay_seed and not design.replayable:
        raise ConfigError(
            f"audit.replay_seed: {design.name} canaries are in the clients' data, which a replay from the run "
            "seed cannot leave out; use the release or gradient design"
        )
    m = settings.canaries
    if perfect_bound(m, p.delta, settings.confidence) <= 0:
        least = m + 1
        while perfect_bound(least, p.delta, settings.confidence) <= 0:
            least += 1
        raise ConfigError(
            f"audit.canaries: {m} canaries cannot show any ε > 0 at {settings.confidence:.0%} confidence even if "
            f"every guess is right; use at least {least}"
        )
    return design


def perfect_bound(canaries: int, delta: float, confidence: float) -> float:
    """The bound an audit of ``canaries`` canaries (half of them included) shows when every score ranks
    them perfectly: the most any attack can show with that many."""
    from protofl.privacy.audit_bounds import guess_and_bound

    included = np.arange(canaries) < (canaries + 1) // 2
    return guess_and_bound(included.astype(float), included, delta, confidence).epsilon_lower


def canaries_to_show(epsilon: float, delta: float, confidence: float) -> int | None:
    """The fewest canaries with which perfect guesses show ``epsilon`` (None: no number can, at this δ)."""
    from protofl.privacy.audit_bounds import GUESS_FRACTIONS, minimum_canaries

    try:
        return minimum_canaries(epsilon, delta, confidence, tests=len(GUESS_FRACTIONS))
    except ValueError:
        return None


def audit_run(
    config: RunConfig | Mapping[str, Any] | str | Path,
    settings: AuditSettings,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stop_after: int | None = None,
) -> AuditResult:
    """Audit one run of ``config`` with ``settings``. With ``out``, the run folder holds the run's records,
    audit.json, audit_scores.png and an audit section at the end of report.md; ``resume`` continues a
    killed audit from its last checkpoint (the configuration and settings must be the same);
    ``stop_after=r`` stops it after round r, as a kill would (:class:`~protofl.engine.RunInterrupted`)."""
    from protofl.engine.inprocess import InProcessTransport
    from protofl.engine.rounds import RoundDriver
    from protofl.rundir import RunFolder
    from protofl.runner import prepare_data, resolve_config, run_rounds
    from protofl.runtime import apply_threads, resolve_device, resolve_threads

    folder = RunFolder(out, resume=resume) if out is not None else None
    run_dir = folder.path if folder is not None else None
    if resume and folder is None:
        raise ConfigError("cannot resume: name the audit's folder (out)")
    config = resolve_config(config, overrides)
    design = check_audit(config, settings)
    if folder is not None:
        folder.check()
    if run_dir is not None:
        _check_settings(run_dir, config, settings, resume)
    with folder.lock() if folder is not None else contextlib.nullcontext():
        if run_dir is not None and not resume:
            from protofl.records import write_json

            write_json(run_dir / "audit_settings.json", _settings_record(config, settings))
        device = str(resolve_device(config.federation.device))
        runtime = {**apply_threads(resolve_threads(config.federation.threads)), "device": device}
        torch.manual_seed(config.seed)
        data = prepare_data(config, device=torch.device(device))

        def driver_for(algorithm: Any, **kwargs: Any) -> RoundDriver:
            design.place(algorithm, data.clients)
            design.install(algorithm)
            transport = AuditTransport(
                InProcessTransport(algorithm, data.clients, config.federation, config.seed),
                design,
                replay_seed=config.seed if settings.replay_seed else None,
            )
            return RoundDriver(
                algorithm,
                transport,
                config.federation,
                config.seed,
                test_x=data.test_x,
                test_y=data.test_y,
                test_groups=data.test_groups,
                **kwargs,
            )

        summary, _ = run_rounds(config, data, driver_for, run_dir, resume=resume, stop_after=stop_after, extra=runtime)
        result = _conclude(config, settings, design, summary, run_dir)
    return result


def _conclude(
    config: RunConfig, settings: AuditSettings, design: CanaryDesign, summary: dict[str, Any], run_dir: Path | None
) -> AuditResult:
    from protofl.privacy.audit_bounds import guess_and_bound

    scores = design.scores()
    included = np.array([c.included for c in design.canaries])
    delta = config.privacy.delta
    bound = guess_and_bound(scores, included, delta, settings.confidence)
    epsilon = float(summary["epsilon"])
    result = AuditResult(
        epsilon_lower=bound.epsilon_lower,
        epsilon=epsilon,
        delta=delta,
        design=design.name,
        canaries=len(design.canaries),
        guesses=bound.guesses,
        correct=bound.correct,
        confidence=settings.confidence,
        run_dir=run_dir,
        summary=summary,
        sensitivity_exceeded=design.sensitivity_exceeded(),
    )
    if run_dir is not None:
        from protofl.records import write_atomic, write_json

        record = {
            "epsilon_lower": result.epsilon_lower,
            "epsilon": epsilon,
            "delta": delta,
            "verdict": "violated" if result.violated else "consistent",
            "design": design.name,
            "threat_model": design.threat,
            "mechanism": config.privacy.mechanism,
            "canaries": result.canaries,
            "included": int(included.sum()),
            "guesses": result.guesses,
            "correct": result.correct,
            "confidence": settings.confidence,
            "replay_seed": settings.replay_seed,
            "most_shown_by_perfect_guesses": perfect_bound(len(scores), delta, settings.confidence),
            "canaries_to_show_epsilon": canaries_to_show(epsilon, delta, settings.confidence),
            **design.findings(),
            "scores": scores.tolist(),
            "included_mask": included.tolist(),
        }
        write_json(run_dir / "audit.json", record)
        plot_scores(scores, included, run_dir / "audit_scores.png", title=f"{design.name} canaries")
        report = run_dir / "report.md"
        text = report.read_text() if report.exists() else ""
        write_atomic(report, text.rstrip("\n") + "\n\n" + audit_section(record) + "\n")
    return result


def audit_section(record: Mapping[str, Any]) -> str:
    """The audit's section of report.md."""
    verdict = (
        "**the run leaks more than its reported ε**"
        if record["verdict"] == "violated"
        else "consistent with the reported ε"
    )
    lines = [
        "## Privacy audit",
        "",
        f"- ε lower bound at {record['confidence']:.0%} confidence: **{record['epsilon_lower']:.3f}** "
        f"(reported ε = {record['epsilon']:.3f} at δ = {record['delta']:g}): {verdict}",
        f"- design: {record['design']} canaries ({record['threat_model']})"
        + ("; the server replays the seeded noise" if record["replay_seed"] else ""),
        f"- {record['canaries']} canaries ({record['included']} included by their coins); "
        f"{record['correct']} of {record['guesses']} guesses right",
    ]
    if record["most_shown_by_perfect_guesses"] < record["epsilon"]:
        needed = record["canaries_to_show_epsilon"]
        lines.append(
            f"- with {record['canaries']} canaries even perfect guesses show at most ε ≥ "
            f"{record['most_shown_by_perfect_guesses']:.3f}, so this audit cannot reach the reported ε ("
            + (f"that takes {needed} canaries" if needed else f"no number of canaries can at δ = {record['delta']:g}")
            + ")"
        )
    if "claimed_separation" in record:
        lines.append(
            f"- one example moved a release by up to {record['largest_separation']:.3g} noise units (median "
            f"{record['median_separation']:.3g}); the sensitivity rule allows {record['claimed_separation']:.3g}"
            + (
                f": **exceeded by {record['separations_over_claim']} canaries, so the reported ε rests on a "
                "sensitivity the run does not have**"
                if record["sensitivity_exceeded"]
                else ""
            )
        )
    lines.append("- score distributions: audit_scores.png")
    return "\n".join(lines)


def plot_scores(scores: np.ndarray, included: np.ndarray, path: Path, title: str = "") -> Path:
    """Histograms of the canaries' scores, included against excluded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, len(scores) // 5))).tolist()
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.set_xlabel("score")
    ax.set_ylabel("canaries")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _settings_record(config: RunConfig, settings: AuditSettings) -> dict[str, Any]:
    from protofl.runner import fingerprint

    return {"settings": settings.to_dict(), "fingerprint": fingerprint(config)}


def _check_settings(run_dir: Path, config: RunConfig, settings: AuditSettings, resume: bool) -> None:
    """On resume, the folder's audit must be this one (same configuration and settings)."""
    if not resume:
        return
    path = run_dir / "audit_settings.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path}: no readable audit settings; this folder holds no audit to resume") from None
    if stored != json.loads(json.dumps(_settings_record(config, settings))):
        raise ConfigError(
            f"{path}: the audit in this folder was started with other settings or another configuration; "
            "resume it with the same CONFIG, --set and --canaries, or start a new folder"
        )
