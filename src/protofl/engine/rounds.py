"""The round loop: one driver for every transport.

A round samples clients (``client_fraction``), drops some (``client_dropout``), hands the server's
broadcast to a :class:`Transport`, which brings back the accepted replies (validated against the
algorithm's payload spec, in client order), lets the server aggregate them, counts bytes, evaluates and
writes a checkpoint on the configured cadence. The transport is the only part that differs between
running every client in this process (:mod:`protofl.engine.inprocess`) and talking to Flower nodes
(:mod:`protofl.flower.transport`); so the two engines agree on everything else by construction.

Randomness is derived from ``(seed, round, client)``, so a resumed run repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from protofl.algorithms.base import Algorithm
from protofl.config import FederationConfig
from protofl.engine.checkpoint import load_checkpoint, on_device, save_checkpoint
from protofl.payload import Payload
from protofl.runtime import check_stop, frozen_heap, retain_freed_memory

log = logging.getLogger("protofl.engine")

RoundCallback = Callable[[dict[str, Any]], None]

#: A client's part in a round, in its per-client record.
STATUSES = ("ok", "not-sampled", "dropped", "rejected", "lost")


def sample_clients(num_clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """Clients taking part in a round: ``max(1, round(fraction * N))`` drawn without replacement."""
    count = max(1, int(round(fraction * num_clients)))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_index, 1])
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


def simulated_dropouts(sampled: Sequence[int], rate: float, seed: int, round_index: int) -> set[int]:
    """Sampled clients that drop out of a round (each with probability ``rate``), seeded per round."""
    if not rate:
        return set()
    rng = np.random.default_rng([seed, round_index, 2])
    return {k for k, u in zip(sampled, rng.random(len(sampled))) if u < rate}


def summarize_client_metrics(per_client: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_std`` over the clients' personalised metrics (in client order)."""
    values: dict[str, list[float]] = {}
    for metrics in per_client:
        for key, value in metrics.items():
            values.setdefault(key, []).append(value)
    out: dict[str, float] = {}
    for key, vals in values.items():
        arr = np.asarray(vals, dtype=float)
        out[f"{key}_mean"] = float(arr.mean())
        out[f"{key}_std"] = float(arr.std())
    return out


def privacy_metrics(report: Mapping[str, Any] | None) -> dict[str, float]:
    """The per-round privacy metrics of a spend report (empty where nothing is protected)."""
    if not report:
        return {}
    return {
        "privacy_epsilon_max": report["epsilon"],
        "privacy_epsilon_mean": report[f"epsilon_{report['accountant']}_mean"],
    }


def merge_privacy_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One spend report from per-client ones (each over a single client), as
    :func:`protofl.privacy.accounting.spend_report` would give over all of their ledgers at once."""
    if not reports:
        return None
    out = dict(reports[0])
    keys = dict.fromkeys(key for r in reports for key in r)  # a client's report may hold more accountants
    for key in keys:
        if key.startswith("epsilon_") and key.endswith(("_max", "_mean")):
            values = [r.get(key) for r in reports]
            present = [v for v in values if v is not None]
            if len(present) < len(values):
                out[key] = None
            elif key.endswith("_max"):
                out[key] = max(present)
            else:
                out[key] = sum(present) / len(present)
    out["max_releases_by_a_client"] = max(r["max_releases_by_a_client"] for r in reports)
    out["epsilon"] = out[f"epsilon_{out['accountant']}_max"]
    return out


def method_options(config: Any) -> dict[str, str]:
    """The method's options as resolved for the run (defaults filled in), each as its ``repr``: what a
    checkpoint records so that a resume notices options the config file left to defaults that have since
    changed. Empty for a method whose config is not a dataclass."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return {}
    return {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _option_defaults(config: Any) -> dict[str, str]:
    """``repr`` of the default of every option of ``config`` that has one."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = repr(f.default_factory())
    return out


def _check_method_options(recorded: Any, current: Mapping[str, str], defaults: Mapping[str, str]) -> None:
    """Refuse to resume where the method's resolved options differ from those the checkpoint was
    written with (the config file is the same: its fingerprint matched, so a default has changed, or an
    option was added or removed). An option added since, at its default, is no change: adding an option
    whose default keeps the earlier behaviour leaves older checkpoints resumable."""
    from protofl.errors import CheckpointError

    if not isinstance(recorded, Mapping):
        raise CheckpointError("the checkpoint's method_options is not a table; refusing to resume")
    changed = sorted(set(recorded) | set(current), key=str)
    changed = [
        k
        for k in changed
        if recorded.get(k) != current.get(k) and not (k not in recorded and current.get(k) == defaults.get(k))
    ]
    if not changed:
        return
    shown = ", ".join(f"{k}: {recorded.get(k, '(absent)')} -> {current.get(k, '(absent)')}" for k in changed[:4]) + (
        f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    )
    raise CheckpointError(
        "the method's options differ from the checkpoint's although the configuration is the same, so "
        f"their defaults (or the options themselves) changed since it was written ({shown}); refusing to "
        "resume a run that would mix "
        "both: resume it with the protofl version that wrote it, or start the run over"
    )


def _nanmean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if len(arr) else float("nan")


def metrics_row(
    r: int,
    evaluation: Mapping[str, Any],
    train_losses: Sequence[float],
    *,
    sampled: int,
    dropped: int,
    rejected: int,
    up: int,
    down: int,
    up_total: int,
    down_total: int,
    server_metrics: Mapping[str, float],
    privacy: Mapping[str, float],
    execution: str = "per-client",
    round_seconds: float,
    eval_seconds: float,
    elapsed_seconds: float,
    reply_metrics: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """One line of metrics.jsonl, in the engine's key order."""
    return {
        "round": r,
        **evaluation,
        "train_loss": _nanmean(train_losses),
        **{key: _nanmean(values) for key, values in (reply_metrics or {}).items()},
        "clients_sampled": sampled,
        "clients_dropped": dropped,
        "clients_rejected": rejected,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_up_total": up_total,
        "bytes_down_total": down_total,
        **{f"server_{k}": v for k, v in server_metrics.items()},
        **privacy,
        "execution": execution,
        "round_seconds": round_seconds,
        "eval_seconds": eval_seconds,
        "elapsed_seconds": elapsed_seconds,
    }


class RunInterrupted(RuntimeError):
    """Raised when a run is stopped on purpose after a round (``stop_after``), e.g. in tests."""


@dataclasses.dataclass(frozen=True)
class Exchange:
    """What a transport brings back from one round's exchange with the active clients."""

    #: The replies that passed validation, in client order (what ``server_step`` aggregates).
    accepted: list[Payload] = dataclasses.field(default_factory=list)
    #: The training loss of every client that replied (NaN where it reported none).
    train_losses: list[float] = dataclasses.field(default_factory=list)
    #: The values of the method's ``row_metrics`` the clients that replied reported, by name.
    reply_metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    #: Each active client's part: ``ok``, ``rejected`` or ``lost``.
    status: dict[int, str] = dataclasses.field(default_factory=dict)
    #: Bytes each active client received and sent this round (protofl's wire format).
    bytes_down: dict[int, int] = dataclasses.field(default_factory=dict)
    bytes_up: dict[int, int] = dataclasses.field(default_factory=dict)
    #: The clients' evaluation of the round owed (see :meth:`Transport.evaluate`), when one was owed.
    evaluation: ClientEvaluation | None = None
    #: Why the run stops after this exchange (a client over its privacy budget, too few replies): the
    #: driver finishes the owed row, writes a checkpoint of the rounds finished (this one is not taken)
    #: and raises it.
    stop: BaseException | None = None

    def __post_init__(self) -> None:
        unknown = set(self.status.values()) - set(STATUSES)
        if unknown:
            raise ValueError(f"Exchange.status: unknown statuses {sorted(unknown)}")


@dataclasses.dataclass(frozen=True)
class ClientEvaluation:
    """The clients' side of an evaluation: personalised metrics of each client that evaluated (those with
    a test split), each client's training samples and classes, its ε spent, and the merged spend report."""

    metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    profiles: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)
    epsilon: dict[int, float | None] = dataclasses.field(default_factory=dict)
    privacy: dict[str, Any] | None = None


class Transport(Protocol):
    """How a round's messages reach the clients and come back."""

    #: ``per-client`` or ``batched``: how the clients' steps run (reported in every row).
    execution: str
    #: Whether clients can be lost (rows then carry ``clients_lost``).
    counts_lost: bool
    #: ``in-process`` or ``flower`` (see :data:`protofl.privacy.statement.ENGINES`): who can see what.
    kind: str
    #: Whether the clients' training loss, personalised metrics and data profiles stay with them (a
    #: private Flower run without ``privacy.share_diagnostics``): rows then carry ``None`` for them.
    kept_on_nodes: bool

    @property
    def num_clients(self) -> int: ...

    def start(self) -> None:
        """Before the first round (e.g. wait for nodes to connect)."""

    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, owed: int | None) -> Exchange:
        """Round ``r``'s exchange with the ``active`` clients: send ``broadcast``, bring back their replies
        validated against the algorithm's reply spec; with ``owed``, also the clients' evaluation of that
        earlier round (one the transport deferred)."""
        ...

    def evaluate(self, r: int, broadcast: Payload, final: bool) -> ClientEvaluation | None:
        """The clients' evaluation after round ``r`` (``broadcast``: the server state after it); ``None``
        when it rides on the next round's exchange instead (never for the ``final`` round)."""
        ...

    def privacy_report(self) -> dict[str, Any] | None:
        """The run's spend so far under every accountant (for summary.json)."""
        ...

    def summary_fields(self) -> dict[str, Any]:
        """Transport-specific fields of summary.json."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Round:
    """A trained round whose row waits for its evaluation."""

    round: int
    sampled: list[int]
    dropped: set[int]
    exchange: Exchange
    server_metrics: dict[str, float]
    up_total: int
    down_total: int
    round_seconds: float
    elapsed: float


class RoundDriver:
    """Runs ``algorithm``'s rounds over ``transport``.

    ``checkpoint_dir`` (optional) receives a checkpoint at the end of every ``checkpoint_every``-th round
    and of the last; :meth:`resume` continues from the last complete one. ``on_round`` is called with each
    evaluated round's row, which also carries ``clients`` (one record per client; not kept in
    :attr:`history`).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        transport: Transport,
        federation: FederationConfig,
        seed: int,
        *,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        test_groups: Mapping[str, torch.Tensor] | None = None,
        checkpoint_dir: Path | None = None,
        fingerprint: str = "",
        on_round: RoundCallback | None = None,
    ):
        self.algorithm = algorithm
        self.transport = transport
        self.federation = federation
        self.seed = seed
        self.test_x, self.test_y = test_x, test_y
        #: Named subsets of the test set (e.g. one per domain): ``global_acc@name`` is reported for each.
        self.test_groups = dict(test_groups or {})
        self.checkpoint_dir = checkpoint_dir
        #: A digest of the run's configuration; a checkpoint written under another config is refused.
        self.fingerprint = fingerprint
        self.on_round = on_round
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.server_state = algorithm.init_server_state(seed)
        self.bytes_up = 0
        self.bytes_down = 0
        self.elapsed = 0.0
        #: Wall time of earlier processes of this run (restored on resume) and when this one began.
        self.wall_before = 0.0
        self._wall_start = time.perf_counter()
        #: The last evaluated round, while its evaluation rides on the next round's exchange.
        self.owed: _Round | None = None

    @property
    def execution(self) -> str:
        return self.transport.execution

    # -- state -------------------------------------------------------------------------------------
    @property
    def wall_seconds(self) -> float:
        """Wall time of the whole run so far, over every process that worked on it."""
        return self.wall_before + time.perf_counter() - self._wall_start

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "fingerprint": self.fingerprint,
            "method_options": method_options(self.algorithm.config),
            "server_state": self.server_state,
            "history": self.history,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "elapsed": self.elapsed,
            "wall_seconds": self.wall_seconds,
            "transport": self.transport.kind,
            **self.transport.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the checkpoint was written by a run with a different configuration; refusing to resume")
        if "method_options" in state:  # checkpoints from before it was recorded resume as they did
            config = self.algorithm.config
            _check_method_options(state["method_options"], method_options(config), _option_defaults(config))
        self.round = state["round"]
        self.server_state = on_device(state["server_state"], self.algorithm.device)
        self.history = state["history"]
        self.bytes_up = state["bytes_up"]
        self.bytes_down = state["bytes_down"]
        self.elapsed = state["elapsed"]
        self.wall_before = state["wall_seconds"]
        self._wall_start = time.perf_counter()
        self.owed = None
        self.transport.load_state_dict(state)

    def resume(self) -> bool:
        """Load the last complete checkpoint, if any; returns whether one was loaded."""
        if self.checkpoint_dir is None:
            return False
        state = load_checkpoint(self.checkpoint_dir)
        if state is None:
            return False
        # checkpoints from before the transport was recorded: in-process ones hold the clients' states
        written_by = state.get("transport", "in-process" if "client_states" in state else "flower")
        if written_by != self.transport.kind:
            from protofl.errors import CheckpointError

            how = "protofl flower run --resume --out DIR" if written_by == "flower" else "protofl run --resume DIR"
            raise CheckpointError(
                f"{self.checkpoint_dir}: written by a run on the {written_by} engine; it cannot be resumed on the "
                f"{self.transport.kind} engine (the clients' state lives "
                + ("on the Flower nodes" if written_by == "flower" else "in the checkpoint")
                + f"): resume it as it was run ({how})"
            )
        self.load_state_dict(state)
        log.info("resumed from round %d", self.round)
        return True

    def _save(self) -> None:
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.state_dict())

    # -- running -----------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run the remaining rounds; ``stop_after=r`` raises :class:`RunInterrupted` after round r. The
        objects alive before the first round are kept out of the garbage collector's full collections
        while the rounds run (:func:`protofl.runtime.frozen_heap`), and the C allocator keeps freed memory
        for the next round (:func:`protofl.runtime.retain_freed_memory`)."""
        log.debug("freed memory kept for reuse: %s", retain_freed_memory())
        with frozen_heap():
            return self._run_rounds(stop_after)

    def _run_rounds(self, stop_after: int | None) -> list[dict[str, Any]]:
        fed = self.federation
        self.transport.start()
        bar = _progress(range(self.round + 1, fed.rounds + 1), fed.progress, self.round, fed.rounds)
        for r in bar:
            check_stop()
            row = self.run_round(r)
            if row is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    {
                        k: f"{v:.3f}"
                        for k, v in row.items()
                        if k.endswith("acc_mean") or k == "global_acc"
                        if isinstance(v, float)
                    }
                )
            if stop_after is not None and r >= stop_after and r < fed.rounds:
                raise RunInterrupted(f"stopped after round {r}")
        return self.history

    def run_round(self, r: int) -> dict[str, Any] | None:
        """Round ``r``; returns its row when it is evaluated now (``None`` on rounds not evaluated, and
        while the row waits for an evaluation riding on the next round's exchange)."""
        fed, algo = self.federation, self.algorithm
        start = time.perf_counter()
        sampled = sample_clients(self.transport.num_clients, fed.client_fraction, self.seed, r)
        dropped = simulated_dropouts(sampled, fed.client_dropout, self.seed, r)
        if dropped:
            log.info("round %d: clients %s dropped out", r, sorted(dropped))
        active = [k for k in sampled if k not in dropped]
        broadcast = algo.broadcast(self.server_state)
        owed, self.owed = self.owed, None
        exchange = self.transport.exchange(r, active, broadcast, owed.round if owed is not None else None)
        if owed is not None:
            # the clients' side of this evaluation was part of the exchange above (counted in this round's
            # round_seconds); its eval_seconds is the server's side
            self._finish(owed, exchange.evaluation or ClientEvaluation(), time.perf_counter())
        if exchange.stop is not None:
            self._save()  # the rounds finished; round r is not taken
            raise exchange.stop
        server_metrics: dict[str, float] = {}
        if algo.communicates and exchange.accepted:
            self.server_state, server_metrics = algo.server_step(self.server_state, exchange.accepted)
        self.bytes_up += sum(exchange.bytes_up.values())
        self.bytes_down += sum(exchange.bytes_down.values())
        train_seconds = time.perf_counter() - start
        self.elapsed += train_seconds
        self.round = r

        if r % fed.eval_every == 0 or r == fed.rounds:
            done = _Round(
                r,
                sampled,
                dropped,
                exchange,
                server_metrics,
                self.bytes_up,
                self.bytes_down,
                train_seconds,
                self.elapsed,
            )
            eval_start = time.perf_counter()
            evaluation = self.transport.evaluate(r, algo.broadcast(self.server_state), final=r == fed.rounds)
            if evaluation is None:
                self.owed = done  # evaluated with the next round's exchange
                return None
            return self._finish(done, evaluation, eval_start)
        if fed.checkpoint_every and r % fed.checkpoint_every == 0:
            self._save()
        return None

    def _finish(self, done: _Round, clients: ClientEvaluation, eval_start: float) -> dict[str, Any]:
        """Round ``done.round``'s row (the server state is still the one after it), then its checkpoint."""
        r, fed, exchange = done.round, self.federation, done.exchange
        evaluation = self.evaluate_global()
        per_client = [clients.metrics[k] for k in sorted(clients.metrics)]
        evaluation.update(summarize_client_metrics(per_client))
        evaluation["clients_evaluated"] = len(per_client)
        status = exchange.status
        row = metrics_row(
            r,
            evaluation,
            exchange.train_losses,
            sampled=len(done.sampled),
            dropped=len(done.dropped),
            rejected=sum(1 for s in status.values() if s == "rejected"),
            up=sum(exchange.bytes_up.values()),
            down=sum(exchange.bytes_down.values()),
            up_total=done.up_total,
            down_total=done.down_total,
            server_metrics=done.server_metrics,
            privacy=privacy_metrics(clients.privacy),
            execution=self.execution,
            round_seconds=done.round_seconds,
            eval_seconds=time.perf_counter() - eval_start,
            elapsed_seconds=done.elapsed,
            reply_metrics=exchange.reply_metrics,
        )
        if self.transport.kept_on_nodes:
            row["train_loss"] = None  # kept on the nodes, not lost: None, not NaN
        for key in self.algorithm.row_metrics():
            row.setdefault(key, None)  # no client sent it (on Flower: kept on the nodes)
        if self.transport.counts_lost:
            row["clients_lost"] = sum(1 for s in status.values() if s == "lost")
        self.history.append(row)
        if self.on_round is not None:
            self.on_round({**row, "clients": self.client_records(done, clients)})
        if r == fed.rounds or (fed.checkpoint_every and r % fed.checkpoint_every == 0):
            self._save()
        return row

    def client_records(self, done: _Round, clients: ClientEvaluation) -> list[dict[str, Any]]:
        """One record per client of round ``done.round``: its data, personalised metrics, ε spent, bytes
        and part in the round."""
        sampled = set(done.sampled)
        records = []
        for k in range(self.transport.num_clients):
            status = (
                "not-sampled"
                if k not in sampled
                else "dropped"
                if k in done.dropped
                else done.exchange.status.get(k, "lost")
            )
            profile = clients.profiles.get(k, {})
            records.append(
                {
                    "client": k,
                    "samples": profile.get("samples"),
                    "classes": profile.get("classes"),
                    **clients.metrics.get(k, {}),
                    # a client that has released nothing yet has spent nothing (None: nothing is protected)
                    "epsilon": clients.epsilon.get(k, None if clients.privacy is None else 0.0),
                    "bytes_up": done.exchange.bytes_up.get(k, 0),
                    "bytes_down": done.exchange.bytes_down.get(k, 0),
                    "status": status,
                }
            )
        return records

    @torch.no_grad()
    def evaluate_global(self) -> dict[str, Any]:
        """Global accuracy on the server's test set (``None`` for methods without a global model), and per
        named test group."""
        algo = self.algorithm
        out: dict[str, Any] = {"global_acc": None}
        global_metrics = algo.evaluate_global(self.server_state, self.test_x, self.test_y)
        if global_metrics:
            out.update(global_metrics)
            for name, index in self.test_groups.items():
                group = algo.evaluate_global(self.server_state, self.test_x[index], self.test_y[index])
                assert group is not None  # a method with a global model evaluates it on any test set
                out[f"global_acc@{name}"] = group.get("global_acc")
        return out


def _progress(iterable, enabled: bool, initial: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="rounds", initial=initial, total=total, unit="round", dynamic_ncols=True)
