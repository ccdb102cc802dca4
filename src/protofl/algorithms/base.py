"""The algorithm contract and the pieces every algorithm shares.

An algorithm is small and declarative. It declares its own ``Config`` dataclass and implements:

- ``init_server_state(seed)`` / ``init_client_state(seed)``: plain dicts of tensors, cheap to keep
  for many clients and to checkpoint;
- ``broadcast(server_state)``: the :class:`~protofl.payload.Payload` sent to the sampled clients;
- ``client_step(client_state, data, received, generator)`` -> ``(client_state, reply, metrics)``;
- ``server_step(server_state, replies)`` -> ``(server_state, metrics)``;
- ``evaluate_global`` (``None`` where the method has no global model) and ``evaluate_client``.

Server and clients only ever see payloads (the engine sends them through bytes). The local
objective is written as a function of ``(parameters, batch, received state)`` through
``torch.func.functional_call`` on a template module, not as a live model per client, so that client
state stays a dict of tensors and many clients can later be trained as one batched program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.func import functional_call

from protofl.config import (
    ConfigError,
    ModelConfig,
    PrivacyConfig,
    check,
    check_choice,
    from_mapping,
)
from protofl.models import FeatureNet, build_model
from protofl.payload import ArraySpec, Payload, PayloadSpec
from protofl.privacy.layer import create_privacy_layer

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
        self.model = task.build_model()
        self.model.requires_grad_(False)
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
            raise ConfigError(f"privacy.dcr: method {cls.name!r} releases no prototypes; DCR trains prototype hosts "
                              f"({', '.join(privacy_hosts('igpp'))})")
        if cls.requires_privacy and privacy.mechanism == "none":
            raise ConfigError(f"privacy.mechanism: method {cls.name!r} trains with "
                              f"{' or '.join(cls.privacy_mechanisms)}; set privacy.mechanism = "
                              f"{cls.privacy_mechanisms[0]!r} (and privacy.epsilon, privacy.delta)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], task: Task, privacy: PrivacyConfig | None = None) -> Algorithm:
        return cls(from_mapping(cls.Config, options, "method."), task, privacy)

    def initial_params(self, seed: int) -> Params:
        """The model's initial parameters for ``seed`` (the same for every client and the server).

        Built once per seed and shared, so clients that have not trained yet cost no memory of their own.
        Contract: nothing updates state tensors in place (``train_local`` trains copies)."""
        cache = self._initial_params
        if seed not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                cache[seed] = {k: v.detach().clone() for k, v in self.task.build_model().named_parameters()}
        return cache[seed]

    # -- the contract ------------------------------------------------------------------------------
    def init_server_state(self, seed: int) -> State:
        return {}

    def init_client_state(self, seed: int) -> State:
        return {}

    def broadcast(self, server_state: State) -> Payload:
        return Payload({}, {"method": self.name})

    def broadcast_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {})

    def reply_spec(self) -> PayloadSpec:
        return PayloadSpec(self.name, {})

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

    def evaluate_client(
        self, client_state: State, received: Payload, data: ClientData
    ) -> dict[str, float]:
        raise NotImplementedError

    # -- batched execution (``federation.execution = "batched"``; see protofl.engine.batched) ---------
    def batched_unsupported(self) -> str | None:
        """Why this method, so configured, cannot train its clients as one batched program (``None``
        when :meth:`client_step_batched` serves it); the engine then runs it per client and says so."""
        return f"method {self.name!r} has no batched client step"

    def client_step_batched(
        self, client_states: Sequence[State], datas: Sequence[ClientData], received: Payload,
        generators: Sequence[torch.Generator],
    ) -> list[tuple[State, Payload, dict[str, float]]]:
        """``client_step`` for several clients at once; the same results within float tolerance, in
        the same order. Only called when :meth:`batched_unsupported` returns ``None``."""
        raise NotImplementedError(self.batched_unsupported() or f"{self.name}: client_step_batched is missing")

    def batched_unsupported_overrides(self, owner: type, fixed: Sequence[str], paired: Sequence[str]) -> str | None:
        """For a batched client step written in class ``owner``: a reason if this object's class changed
        one of the ``fixed`` methods, or one of the ``paired`` ones (the per-client objective) without
        also giving its ``batched_local_loss`` next to it."""
        cls = type(self)
        changed = [n for n in fixed if _defined_in(cls, n) is not _defined_in(owner, n)]
        loss_owner = _defined_in(cls, "batched_local_loss")
        changed += [n for n in paired if not issubclass(loss_owner, _defined_in(cls, n))]
        if changed:
            return (f"method {self.name!r} overrides {', '.join(changed)} and has no batched form of it "
                    f"(the batched client step is {owner.__name__}'s)")
        return None

    def train_local_batched(
        self,
        params: Params,
        datas: Sequence[ClientData],
        loss_fn: Callable[..., torch.Tensor],
        generators: Sequence[torch.Generator],
        shared: tuple = (),
    ):
        """:meth:`train_local` for ``K`` clients at once: ``params`` are stacked ``(K, ...)`` tensors (a fresh
        stack: they are trained in place) and
        ``loss_fn(params, x, y, weight, *shared)`` is one client's loss on a padded batch (``weight``
        is 1 on real samples, 0 on padding). Returns ``(stacked params, per-client metrics, the
        concatenated train data)``."""
        from protofl.engine.batched import ClientBatch, train_batched

        batch = ClientBatch.of([d.x_train for d in datas], [d.y_train for d in datas])
        trained, metrics = train_batched(params, batch, loss_fn, self.config, generators, shared)
        return trained, metrics, batch

    # -- shared helpers ----------------------------------------------------------------------------
    def forward(self, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of the template model under ``params``."""
        return functional_call(self.model, params, (x,))

    def train_local(
        self,
        params: Params,
        data: ClientData,
        loss_fn: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor],
        generator: torch.Generator,
        on_epoch: Callable[[Params], None] | None = None,
    ) -> tuple[Params, dict[str, float]]:
        """Minibatch training of ``loss_fn(params, x, y)`` on the client's train split."""
        return train_local(params, data.x_train, data.y_train, loss_fn, self.config, generator, on_epoch)

    @torch.no_grad()
    def accuracy(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((predict_logits(self, params, x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def _defined_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose body defines attribute ``name``."""
    return next(c for c in cls.__mro__ if name in c.__dict__)


def make_optimizer(config: LocalTrainingConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_local(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor],
    config: LocalTrainingConfig,
    generator: torch.Generator,
    on_epoch: Callable[[Params], None] | None = None,
) -> tuple[Params, dict[str, float]]:
    """Run ``config.local_epochs`` epochs of shuffled minibatches; returns detached parameters.

    ``on_epoch(params)`` (optional) is called with the current detached parameters before each epoch
    (e.g. to recompute a per-epoch statistic of the local data)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = make_optimizer(config, list(leaves.values()))
    n = len(y)
    total, batches = 0.0, 0
    for _ in range(config.local_epochs):
        if on_epoch is not None:
            on_epoch({k: v.detach() for k, v in leaves.items()})
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            loss = loss_fn(leaves, x[index], y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return {k: v.detach() for k, v in leaves.items()}, {"train_loss": total / max(batches, 1)}


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
        return torch.zeros(0, algorithm.model.feature_dim), torch.zeros(0, algorithm.task.num_classes)
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


@torch.no_grad()
def compute_features(algorithm: Algorithm, params: Params, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([algorithm.forward(params, x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


# -- parameters <-> payload arrays -----------------------------------------------------------------
PARAM_PREFIX = "param/"


def params_to_arrays(params: Params) -> dict[str, np.ndarray]:
    return {PARAM_PREFIX + k: v.detach().cpu().numpy() for k, v in params.items()}


def arrays_to_params(payload: Payload) -> Params:
    return {
        k[len(PARAM_PREFIX):]: torch.from_numpy(np.array(v, copy=True))
        for k, v in payload.arrays.items() if k.startswith(PARAM_PREFIX)
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
        raise ConfigError(f"method.name: unknown method {name!r}; valid methods are {', '.join(sorted(ALGORITHMS))}") from None
