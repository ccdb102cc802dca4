"""The algorithm contract and the pieces every algorithm shares.

An algorithm is small and declarative. It declares its own ``Config`` dataclass and implements:

- ``init_server_state(seed)`` / ``init_client_state(seed)``: plain dicts of tensors, cheap to keep
  for many clients and to checkpoint;
- ``broadcast(server_state)``: the :class:`~protofl.payload.Payload` sent to the sampled clients;
- ``client_step(client_state, data, received, generator)`` -> ``(client_state, reply, metrics)``;
- ``server_step(server_state, replies)`` -> ``(server_state, metrics)``;
- ``evaluate_global`` (``None`` where the method has no global model) and ``evaluate_client``.

Server and clients only ever see payloads (the engine sends them through bytes). A method that
trains a model on its clients derives from :class:`ModelAlgorithm` and declares its client step in
pieces (the starting parameters, the round's context, ONE per-example-weighted loss, the reply); the
generic per-client and batched client steps both call those pieces (see :class:`ModelAlgorithm`).
The loss is a function of ``(parameters, batch, weight, context)`` through
``torch.func.functional_call`` on a template module, not a live model per client, so that client
state stays a dict of tensors and many clients train as one batched program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.func import functional_call

from protofl.compiled import COMPILED, CompiledRound
from protofl.config import (
    ConfigError,
    ModelConfig,
    PrivacyConfig,
    check,
    check_choice,
    from_mapping,
)
from protofl.errors import CompileError
from protofl.models import FeatureNet, build_model
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.layer import create_privacy_layer
from protofl.prototypes import PrototypeAccumulator
from protofl.stacked import STACKED_STEP, VMAP_STEP, is_stackable, model_unstackable, stackable
from protofl.training import (
    ClientBatch,
    batched_features,
    broadcast_params,
    masked_cross_entropy,
    stack_params,
    take,
    train_batched,
    train_local,
    unstack_params,
)

Params = dict[str, torch.Tensor]
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LocalTrainingConfig:
    """Local optimisation settings; every algorithm's ``Config`` extends this."""

    local_epochs: int = 1
    batch_size: int = 50
    #: ``sgd``, ``adam`` or ``adamw`` (decoupled weight decay). Optimiser state is reset every round
    #: (the common FL practice).
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check(self.local_epochs >= 1, "local_epochs", f"must be >= 1, got {self.local_epochs}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_choice(self.optimizer, ("sgd", "adam", "adamw"), "optimizer")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class Task:
    """What an algorithm knows of the problem: input shape, number of classes, the model to build."""

    input_shape: tuple[int, ...]
    num_classes: int
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    #: Where the method keeps its model, state and training tensors (``federation.device`` resolved:
    #: ``cpu``, ``cuda``, ``cuda:i``). Payloads and checkpoints stay on the CPU whatever it is.
    device: str = "cpu"
    #: Whether a batched round compiles its local step and feature pass (``federation.compile``;
    #: :mod:`protofl.compiled`).
    compile: bool = False

    def build_model(self) -> FeatureNet:
        return build_model(self.model, self.input_shape, self.num_classes)


@dataclasses.dataclass(frozen=True, eq=False)
class ClientData:
    """One client's private data: its train split and its own test split."""

    client_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.y_train)


class Algorithm:
    """Base class of every federated algorithm (see the module docstring for the contract)."""

    name: ClassVar[str]
    #: One line for ``protofl methods``.
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = LocalTrainingConfig
    #: Whether the method has a global model to evaluate on the global test set.
    has_global_model: ClassVar[bool] = False
    #: Whether clients and server exchange payloads at all (``local`` does not).
    communicates: ClassVar[bool] = True

    #: The ``[privacy]`` mechanisms this method hosts (``igpp``/``vpp`` protect released prototypes,
    #: ``dp-sgd`` the local training); the privacy layer of the run is built from the section.
    privacy_mechanisms: ClassVar[tuple[str, ...]] = ()
    #: Whether the method is private by construction (DP-SGD methods): ``[privacy]`` must name a mechanism.
    requires_privacy: ClassVar[bool] = False

    def __init__(self, config: Any, task: Task, privacy: PrivacyConfig | None = None):
        self.config = config
        self.task = task
        self.privacy = privacy or PrivacyConfig()
        self.validate_privacy(config, self.privacy)
        #: The client-side privacy layer of this run (``None`` without a mechanism): it calibrates, spends
        #: from each client's ledger, releases and reports (:mod:`protofl.privacy.layer`).
        self.privacy_layer = create_privacy_layer(self.privacy, task.num_classes)
        #: The device of the method's model, states and training tensors (``task.device``).
        self.device = torch.device(task.device)
        self.model: FeatureNet = cpu_model(task).to(self.device)
        self.model.requires_grad_(False)
        self._features_view = _FeaturesView(self.model)
        self._initial_params: dict[int, Params] = {}

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, config: Any, run_config: Any) -> Any:
        """The method's config with anything left to the run filled in (e.g. a schedule from
        ``federation.rounds``); called once by :func:`protofl.api.resolve_config`."""
        return config

    @classmethod
    def validate_privacy(cls, config: Any, privacy: PrivacyConfig) -> None:
        """Refuse a ``[privacy]`` section this method cannot honour (:class:`ConfigError`)."""
        if privacy.mechanism != "none" and privacy.mechanism not in cls.privacy_mechanisms:
            hosts = privacy_hosts(privacy.mechanism)
            raise ConfigError(
                f"privacy.mechanism: method {cls.name!r} does not host {privacy.mechanism!r}"
                + (f" (it hosts {', '.join(cls.privacy_mechanisms)})" if cls.privacy_mechanisms else "")
                + f"; methods that do: {', '.join(hosts) or 'none'}"
            )
        if privacy.dcr and "igpp" not in cls.privacy_mechanisms:
            raise ConfigError(
                f"privacy.dcr: method {cls.name!r} releases no prototypes; DCR trains prototype hosts "
                f"({', '.join(privacy_hosts('igpp'))})"
            )
        if cls.requires_privacy and privacy.mechanism == "none":
            raise ConfigError(
                f"privacy.mechanism: method {cls.name!r} trains with "
                f"{' or '.join(cls.privacy_mechanisms)}; set privacy.mechanism = "
                f"{cls.privacy_mechanisms[0]!r} (and privacy.epsilon, privacy.delta)"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any], task: Task, privacy: PrivacyConfig | None = None) -> Algorithm:
        return cls(from_mapping(cls.Config, options, "method."), task, privacy)

    def initial_params(self, seed: int) -> Params:
        """The model's initial parameters for ``seed`` (the same for every client and the server).

        Built once per seed and shared, so clients that have not trained yet cost no memory of their own.
        Contract: nothing updates state tensors in place (:func:`protofl.training.train_local` trains copies)."""
        cache = self._initial_params
        if seed not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                cache[seed] = {
                    k: v.detach().clone().to(self.device) for k, v in cpu_model(self.task).named_parameters()
                }
        return cache[seed]

    # -- the contract ------------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        return {}

    def init_client_state(self, seed: int) -> State:
        return {}

    def row_metrics(self) -> tuple[str, ...]:
        """Metrics of a client's training step (besides ``train_loss``) that the in-process engine
        averages over the round's clients into the round row (NaN ignored). Every row carries them:
        ``None`` where no client sent them (on Flower they stay in the nodes' logs)."""
        return ()

    def broadcast(self, server_state: State) -> Payload:
        return Payload({}, {"method": self.name})

    def broadcast_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {})

    def reply_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {})

    def reply_spec_for(self, broadcast: Payload) -> PayloadSpec:
        """What a reply to ``broadcast`` must be, checked by the engines (a reply that fails is rejected):
        :meth:`reply_spec` unless a method's rounds send different arrays (FedHypeVAE's statistics round).
        :meth:`reply_spec` stays the spec of every array the method may ever release."""
        return self.reply_spec()

    def client_step(
        self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator
    ) -> tuple[State, Payload, dict[str, float]]:
        raise NotImplementedError

    def server_step(self, server_state: State, replies: list[Payload]) -> tuple[State, dict[str, float]]:
        return server_state, {}

    def evaluate_global(self, server_state: State, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
        return None

    # -- privacy (hosts of a release mechanism override) ---------------------------------------------
    def check_release(self, client_state: State, client_id: int) -> None:
        """Raise :class:`~protofl.privacy.BudgetExceededError` if the client's next reply would exceed
        its privacy budget; the engine asks before every round, so a run stops before that release."""
        if self.privacy_layer is not None:
            self.privacy_layer.check_next(client_state, f"client {client_id}")

    def privacy_report(self, client_states: Mapping[int, State], all_accountants: bool = True) -> dict[str, Any] | None:
        """Spent privacy per client (``None`` where nothing is protected); with ``all_accountants=False``
        only under the run's own accountant (the per-round metrics)."""
        if self.privacy_layer is None:
            return None
        return self.privacy_layer.report(client_states.values(), all_accountants)

    def evaluate_client(self, client_state: State, received: Payload, data: ClientData) -> dict[str, float]:
        raise NotImplementedError

    # -- batched execution (``federation.execution = "batched"``; see protofl.training) ---------------
    def batched_unsupported(self) -> str | None:
        """Why this method, so configured, cannot train its clients as one batched program (``None``
        when :meth:`client_step_batched` serves it); the engine then runs it per client and says so."""
        return f"method {self.name!r} has no batched client step"

    def client_step_batched(
        self,
        client_states: Sequence[State],
        datas: Sequence[ClientData],
        received: Payload,
        generators: Sequence[torch.Generator],
    ) -> list[tuple[State, Payload, dict[str, float]]]:
        """``client_step`` for several clients at once; the same results within float tolerance, in
        the same order. Only called when :meth:`batched_unsupported` returns ``None``."""
        raise NotImplementedError(self.batched_unsupported() or f"{self.name}: client_step_batched is missing")

    def batched_step(self) -> str:
        """Which local step a batched round of this method runs (the run's summary records it)."""
        return VMAP_STEP

    def compiled_round(self) -> CompiledRound:
        """The compiled step and feature pass of this method's batched rounds (``federation.compile``);
        a method that has none refuses the setting here, in one line."""
        raise CompileError(f"federation.compile: method {self.name!r} has no batched step to compile")

    # -- shared helpers ----------------------------------------------------------------------------
    @stackable
    def forward(self, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of the template model under ``params``."""
        return functional_call(self.model, params, (x,))

    @stackable
    def forward_features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The features of :meth:`forward` alone: a :class:`~protofl.models.FeatureNet` with FeatureNet's
        own ``forward`` (features, then the head on them) computes them without its head, the same values;
        any other model runs its whole forward."""
        if type(self.model).forward is not FeatureNet.forward:
            return self.forward(params, x)[0]
        if self._features_view.net is not self.model:  # the model was replaced after construction
            self._features_view = _FeaturesView(self.model)
        return functional_call(self._features_view, {"net." + k: v for k, v in params.items()}, (x,))

    @torch.no_grad()
    def accuracy(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((predict_logits(self, params, x).argmax(1) == y).float().mean()) if len(y) else float("nan")


@dataclasses.dataclass(frozen=True, eq=False)
class LocalOutcome:
    """What one client's local training produced, for :meth:`ModelAlgorithm.reply` (the same on the
    per-client and the batched path)."""

    client_state: State
    data: ClientData
    received: Payload
    #: The trained parameters (the client's own tensors).
    params: Params
    #: The train split's features under ``params`` where the method asks for them
    #: (:attr:`ModelAlgorithm.reply_uses_features`), else ``None`` (in a batched round, given by
    #: :meth:`ModelAlgorithm.replies` to the reply that reads them).
    features: torch.Tensor | None
    #: Their per-class sums and counts (with the train labels), where ``features`` are given.
    feature_stats: PrototypeAccumulator | None
    #: The client's generator, as training left it (e.g. for a privacy mechanism's noise).
    generator: torch.Generator
    #: ``{"train_loss", ...}``; the reply may add its own.
    metrics: dict[str, float]
    #: Reply arrays computed before training (:meth:`ModelAlgorithm.before_training`).
    before: dict[str, np.ndarray]
    #: State the training itself keeps across rounds (:meth:`ModelAlgorithm.train_client`).
    trainer_state: State


@dataclasses.dataclass(frozen=True, eq=False)
class StackedFeatures:
    """The train features of a batched round's clients under their trained parameters, padded:
    ``features`` (K, n_max, d), ``labels`` (K, n_max) and ``weight`` (K, n_max; 1 on a client's own rows,
    0 on padding). Client k's own rows are the first ``num_train`` of its row. ``sums`` (K, C, d) and
    ``counts`` (K, C): every client's per-class sums and counts of its rows (the state of its
    :attr:`LocalOutcome.feature_stats`)."""

    features: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor


class ModelAlgorithm(Algorithm):
    """A method whose clients train model parameters on ONE per-example-weighted local loss.

    It declares a few pieces and inherits both client steps, which call the same pieces:

    - :meth:`start_params` -- the parameters a client starts from (its own or the received ones);
    - :meth:`context` -- what the loss needs from the broadcast, parsed once per round;
    - :meth:`loss` ``(params, x, y, weight, context) -> scalar`` -- the weighted mean over the real
      samples of a batch (``weight`` is 1 on real samples, 0 on padding): the per-client path calls it
      with unit weights, the batched path under ``vmap`` on padded batches, so it must be written
      without data-dependent Python branches;
    - :meth:`before_training` (optional) -- reply arrays computed on the received model, before
      training, with the client's generator;
    - :meth:`reply` -- the new client state, the reply and the metrics from a :class:`LocalOutcome`.

    A subclass that overrides only these pieces stays batched. A method that cannot be batched says
    why in :meth:`batched_unsupported`.
    """

    #: Whether :meth:`reply` needs the train split's features under the trained parameters.
    reply_uses_features: ClassVar[bool] = False
    #: The methods :meth:`loss` and the batched feature pass call; the stacked step needs each of them
    #: marked :func:`~protofl.stacked.stackable` (a subclass that adds a part to its loss names it here).
    loss_parts: ClassVar[tuple[str, ...]] = ("loss", "forward", "forward_features")
    #: The compiled step and feature pass of this method's batched rounds (``federation.compile``), once built.
    _compiled_round: CompiledRound | None = None

    def start_params(self, client_state: State, received: Payload) -> Params:
        raise NotImplementedError

    def received_params(self, received: Payload) -> Params:
        """The model parameters in ``received``, parsed once per payload: the clients of a round start
        from the same tensors (nothing trains them in place), and the batched step stacks them once."""
        memo = getattr(self, "_received_memo", None)
        if memo is None or memo[0] is not received:
            memo = self._received_memo = (received, arrays_to_params(received, self.device))
        return memo[1]

    def context(self, received: Payload) -> Any:
        return None

    @stackable
    def loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, context: Any
    ) -> torch.Tensor:
        """Cross-entropy of the model's logits, weighted mean over the real samples."""
        return masked_cross_entropy(self.forward(params, x)[1], y, weight)

    def before_training(
        self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator
    ) -> dict[str, np.ndarray]:
        return {}

    def train_client(
        self, client_state: State, data: ClientData, start: Params, context: Any, generator: torch.Generator
    ) -> tuple[Params, dict[str, float], State]:
        """The per-client training: :meth:`loss` with unit weights; returns the trained parameters, the
        metrics and any state the training keeps (none here). The batched step does not call it: a
        method whose override trains differently from :meth:`loss` returns its reason from
        :meth:`batched_unsupported` whenever that override is in effect."""
        params, metrics = train_local(
            start, data.x_train, data.y_train, self.loss, self.config, generator, shared=(context,)
        )
        return params, metrics, {}

    def reply(self, outcome: LocalOutcome) -> tuple[State, Payload, dict[str, float]]:
        raise NotImplementedError

    def client_step(self, client_state: State, data: ClientData, received: Payload, generator: torch.Generator):
        before = self.before_training(client_state, data, received, generator)
        context = self.context(received)
        start = self.start_params(client_state, received)
        params, metrics, trainer_state = self.train_client(client_state, data, start, context, generator)
        features = stats = None
        if self.reply_uses_features:
            features = compute_features(self, params, data.x_train)
            stats = PrototypeAccumulator(self.task.num_classes, self.model.feature_dim, device=self.device)
            stats.update(features, data.y_train)
        return self.reply(
            LocalOutcome(
                client_state, data, received, params, features, stats, generator, metrics, before, trainer_state
            )
        )

    def batched_unsupported(self) -> str | None:
        if type(self).client_step is not ModelAlgorithm.client_step:
            return (
                f"method {self.name!r} defines its own client_step, which the batched client step "
                "(built from start_params, context, loss and reply) would bypass"
            )
        return None

    def stacked_unsupported(self) -> str | None:
        """Why a batched round of this method trains with ``vmap(grad)`` rather than the stacked step
        (:mod:`protofl.stacked`; ``None`` when the stacked step serves it): the model must run on
        stacked parameters (:func:`~protofl.stacked.model_unstackable`) and every method of
        :attr:`loss_parts` must be marked :func:`~protofl.stacked.stackable`."""
        unmarked = [name for name in self.loss_parts if not is_stackable(getattr(type(self), name))]
        if unmarked:
            return f"method {self.name!r}: {', '.join(unmarked)} not marked stackable"
        return model_unstackable(self.model)

    def batched_step(self) -> str:
        step = VMAP_STEP if self.stacked_unsupported() else STACKED_STEP
        return f"{step}, {COMPILED}" if self.task.compile and step == STACKED_STEP else step

    def compiled_round(self) -> CompiledRound:
        """The compiled stacked step and feature pass of this method's batched rounds
        (``federation.compile``), built on first use and kept, so that each form compiles once per run."""
        if self._compiled_round is None:
            why = self.stacked_unsupported()
            if why is not None:
                raise CompileError(
                    f"federation.compile: compiles the stacked step only, and this run's batched rounds take the "
                    f"vmap step ({why}); set federation.compile = false"
                )
            self._compiled_round = CompiledRound(self.loss, self.forward_features)
        return self._compiled_round

    def client_step_batched(self, client_states, datas, received, generators):
        stacked_step = self.stacked_unsupported() is None
        compiled = self.compiled_round() if self.task.compile else None
        befores = [self.before_training(s, d, received, g) for s, d, g in zip(client_states, datas, generators)]
        context = self.context(received)
        starts = [self.start_params(s, received) for s in client_states]
        shared = all(p is starts[0] for p in starts)
        start = broadcast_params(starts[0], len(starts)) if shared else stack_params(starts)
        batch = ClientBatch.of([d.x_train for d in datas], [d.y_train for d in datas])
        # the compiled step and feature pass in place of the eager ones (``federation.compile``); off, the calls
        # are the eager rounds' own
        step_fn = {"step_fn": compiled.step} if compiled else {}
        forward = {"forward": compiled.features} if compiled else {}
        trained, metrics = train_batched(
            start, batch, self.loss, self.config, generators, (context,), stacked_step, **step_fn
        )
        stacked = None
        if self.reply_uses_features:
            z, weight, index = batched_features(self.forward_features, trained, batch, stacked_step, **forward)
            labels = take(batch.y, index)
            sums, counts = PrototypeAccumulator.stacked_sums(z, labels, weight, self.task.num_classes)
            stacked = StackedFeatures(z, labels, weight, sums, counts)
        # each client's features and class sums are views of ``stacked``, taken where a reply reads them
        # (:meth:`replies`), not for a method that releases from the stack
        outcomes = [
            LocalOutcome(s, d, received, p, None, None, g, m, b, {})
            for s, d, p, g, m, b in zip(client_states, datas, unstack_params(trained), generators, metrics, befores)
        ]
        return self.replies(outcomes, stacked)

    def replies(
        self, outcomes: list[LocalOutcome], stacked: StackedFeatures | None
    ) -> list[tuple[State, Payload, dict[str, float]]]:
        """The replies of a batched round's clients, in order: :meth:`reply` of each, its outcome given its
        train features and their class sums from ``stacked`` (their padded stack, where
        :attr:`reply_uses_features`). A method whose reply has a part that runs as one program over every
        client (a prototype release) overrides this and reads ``stacked`` itself."""
        if stacked is not None:
            outcomes = [
                dataclasses.replace(
                    outcome,
                    features=stacked.features[c, : outcome.data.num_train],
                    feature_stats=PrototypeAccumulator.of(stacked.sums[c], stacked.counts[c]),
                )
                for c, outcome in enumerate(outcomes)
            ]
        return [self.reply(outcome) for outcome in outcomes]


class _FeaturesView(torch.nn.Module):
    """A FeatureNet seen through its ``features`` (for ``functional_call``; its parameters are ``net.*``)."""

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def cpu_model(task: Task) -> FeatureNet:
    """``task``'s model built on the CPU (whatever torch's default device), so that a seed initialises
    the same parameters on every device; the caller moves them."""
    with torch.device("cpu"):
        return task.build_model()


@torch.no_grad()
def predict_logits(algorithm: Algorithm, params: Params, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([algorithm.forward(params, x[i : i + batch_size])[1] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_features_and_logits(
    algorithm: Algorithm, params: Params, x: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits in one batched pass."""
    outputs = [algorithm.forward(params, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not outputs:
        return (
            torch.zeros(0, algorithm.model.feature_dim, device=x.device),
            torch.zeros(0, algorithm.task.num_classes, device=x.device),
        )
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


@torch.no_grad()
def compute_features(algorithm: Algorithm, params: Params, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([algorithm.forward_features(params, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


# -- parameters <-> payload arrays -----------------------------------------------------------------
PARAM_PREFIX = "param/"


def params_to_arrays(params: Params) -> dict[str, np.ndarray]:
    return {PARAM_PREFIX + k: v.detach().cpu().numpy() for k, v in params.items()}


def arrays_to_params(payload: Payload, device: Any = "cpu") -> Params:
    return {
        k[len(PARAM_PREFIX) :]: torch.from_numpy(np.array(v, copy=True)).to(device)
        for k, v in payload.arrays.items()
        if k.startswith(PARAM_PREFIX)
    }


def param_specs(params: Params) -> dict[str, ArraySpec]:
    return {PARAM_PREFIX + k: ArraySpec(tuple(v.shape)) for k, v in params.items()}


# -- registry --------------------------------------------------------------------------------------
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} is registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def privacy_hosts(mechanism: str) -> list[str]:
    """Names of the registered methods that host the ``[privacy]`` mechanism ``mechanism``."""
    return sorted(name for name, cls in ALGORITHMS.items() if mechanism in cls.privacy_mechanisms)


def prototype_hosts() -> list[str]:
    """Names of the registered methods whose prototype releases ``[privacy]`` can protect."""
    return privacy_hosts("igpp")


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method {name!r}; valid methods are {', '.join(sorted(ALGORITHMS))}"
        ) from None
