"""A client's side of a Flower run: its data, its algorithm, and its state kept across rounds.

Everything here is plain protofl (no Flower import), so the ClientApp is a thin adapter and the same
logic can be tested without Flower. A node holds one partition (``partition-id`` of ``num-partitions``
in its node config); its state — model, prototypes, the privacy ledger and its noise secret — never
leaves it.

Noise secret: under a mechanism with ``privacy.noise`` ``secret`` (``auto`` on Flower), every random draw
of the node's client step comes from a generator seeded with HMAC-SHA256(secret, round, partition), the
secret being 32 bytes from the operating system's CSPRNG drawn at the node's first training of the run
and kept with its state (on disk in its state-dir, file mode 0600). The server knows the run seed, not
the secret, so it cannot replay the noise; a restarted node continues with the same secret, so a round it
repeats draws the same noise (no second independent release of that round).

State protocol: a training step leaves a *pending* state; the server's decision on that reply (accepted,
or rejected/lost) arrives with the node's next message and commits either the new state or, when the
reply was not taken, the old state with the new ledger (what went on the wire was spent, accepted or
not), exactly as the in-process engine keeps it (a client whose reply was rejected keeps its old state). Committed states are kept per round, so a server that
restarts from an earlier checkpoint and repeats a round starts it from the state of that round's eve.
The privacy ledger alone never rolls back: the store keeps its high-water mark (every release the node
ever made, a dropped pending round's included) and every round starts with it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.config import ConfigError, RunConfig
from protofl.data.shared import NodeSplit, PartitionStore, data_key, node_split
from protofl.engine.checkpoint import on_device
from protofl.engine.client import client_evaluation, client_round
from protofl.payload import Payload, validate
from protofl.privacy.accounting import LEDGER_KEY, remember_calibrations
from protofl.seeds import new_secret

log = logging.getLogger("protofl.flower")

#: Committed states kept per node (the current one and its predecessor, for a repeated round).
KEEP_STATES = 2


class StateLostError(RuntimeError):
    """A node lacks the state a message needs (its state was lost, or the server went back too far)."""


@dataclasses.dataclass(frozen=True, eq=False)
class NodeTask:
    """One node's part of a run: the algorithm, its partition's data, the run's seed; whether its draws
    come from its noise secret, and whether its training loss, personalised metrics and data profile go
    to the server (see :mod:`protofl.privacy.statement`)."""

    algorithm: Algorithm
    data: ClientData
    partition: int
    seed: int
    secret_noise: bool = False
    shares_diagnostics: bool = True

    @property
    def who(self) -> str:
        return f"client {self.partition}"


@dataclasses.dataclass(frozen=True, eq=False)
class _RunSetup:
    """What every node of a run on this machine shares: the configuration, the algorithm (its clients'
    state is passed to it, as in process), and where its partition's rows come from."""

    config: RunConfig
    algorithm: Algorithm
    device: Any
    split: NodeSplit


@functools.lru_cache(maxsize=4)
def _run_setup(config_text: str, cache_dir: str) -> _RunSetup:
    import tomllib

    from protofl.algorithms import Task, get_algorithm
    from protofl.runner import prepare_data, resolve_config
    from protofl.runtime import resolve_device

    config: RunConfig = resolve_config(tomllib.loads(config_text))
    # the machine's store of the run's data fingerprint, or this node's own split (never the server's files)
    split = node_split(PartitionStore.default(), data_key(config), lambda: prepare_data(config))
    device = resolve_device(config.federation.device)  # this node's: "auto" is its own CUDA device or CPU
    torch.manual_seed(config.seed)
    task = Task(split.input_shape, split.num_classes, config.model, device=str(device))
    if cache_dir:
        # Flower may start a fresh process for every message: calibrate each noise level once per run.
        remember_calibrations(Path(cache_dir) / "calibration.json")
    algorithm = get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)
    return _RunSetup(config, algorithm, device, split)


@functools.lru_cache(maxsize=4)
def node_task(config_text: str, partition: int, num_partitions: int, cache_dir: str = "") -> NodeTask:
    """The node's part of the run: the run's algorithm (built once per process and run) and its
    partition's rows, read from the run's shared partition store (:mod:`protofl.data.shared`: built once
    per machine, since Flower starts a fresh ClientApp process for every message in a deployment and
    serves many nodes from one process in the simulation), or, where this machine holds none for the run's
    data fingerprint, from the node's own split (:func:`~protofl.data.shared.node_split`)."""
    run = _run_setup(config_text, cache_dir)
    if num_partitions != run.config.partition.num_clients:
        raise ConfigError(
            f"node config num-partitions={num_partitions}, but the run has "
            f"partition.num_clients={run.config.partition.num_clients}"
        )
    if not 0 <= partition < num_partitions:
        raise ConfigError(f"node config partition-id={partition} is not in [0, {num_partitions})")
    rows = run.split.client(partition)
    client = ClientData(
        partition,
        *(torch.from_numpy(getattr(rows, k)).to(run.device) for k in ("x_train", "y_train", "x_test", "y_test")),
    )
    from protofl.privacy.statement import shares_diagnostics, uses_secret_noise

    return NodeTask(
        run.algorithm,
        client,
        partition,
        run.config.seed,
        secret_noise=uses_secret_noise(run.config.privacy, "flower"),
        shares_diagnostics=shares_diagnostics(run.config.privacy, "flower"),
    )


@dataclasses.dataclass
class ClientStore:
    """A node's committed states by round and its pending (not yet decided) one."""

    committed: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    pending_round: int | None = None
    pending: dict[str, Any] | None = None
    #: The privacy ledger's high-water mark: the ledger of every release this node ever made (committed,
    #: pending or dropped). It never rolls back: a round repeated after a server restart is a new release
    #: and counts again, so every state a round starts from carries this ledger.
    ledger: Any = None
    #: The node's noise secret for this run (drawn at its first training under secret noise); never sent.
    secret: bytes | None = None

    def __post_init__(self) -> None:
        for state in [*self.committed.values(), self.pending]:
            if state is not None:
                self._raise_ledger(state)

    def _raise_ledger(self, state: Mapping[str, Any]) -> None:
        """Keep the high-water mark: for every event, the larger count of the two ledgers (a ledger that
        records more of one event and less of another is never taken whole over the other)."""
        if LEDGER_KEY not in state:
            return
        if self.ledger is None:
            self.ledger = state[LEDGER_KEY]
            return
        counts: dict[str, tuple[Any, int]] = {}
        for event, count in [*self.ledger, *state[LEDGER_KEY]]:
            key = repr(sorted(dict(event).items()))
            counts[key] = (event, max(int(count), counts.get(key, (event, 0))[1]))
        self.ledger = [[event, count] for event, count in counts.values()]

    def latest(self, before: int) -> tuple[int, dict[str, Any]] | None:
        rounds = [r for r in self.committed if r < before]
        return (max(rounds), self.committed[max(rounds)]) if rounds else None

    def state(self, task: NodeTask, before: int) -> dict[str, Any]:
        """The state to start round ``before`` from (or to evaluate after round ``before - 1``), carrying the
        node's ledger high-water mark. A node with committed state but none before ``before`` (the server went
        back further than the states a node keeps) raises :class:`StateLostError`: starting from a fresh
        model would be a different run."""
        found = self.latest(before)
        if found is not None:
            state = on_device(found[1], task.algorithm.device)  # read back from bytes: on the CPU
        elif self.committed:
            raise StateLostError(
                f"{task.who} holds the state of rounds {sorted(self.committed)} but none from before round "
                f"{before} (a node keeps its last {KEEP_STATES}): the server resumed from a checkpoint older "
                "than this node's state; resume from a later checkpoint or start a new run"
            )
        else:
            state = task.algorithm.init_client_state(task.seed)
        if self.ledger is not None:
            state = {**state, LEDGER_KEY: self.ledger}
        return state

    def noise_secret(self, task: NodeTask) -> bytes | None:
        """The secret the node's draws come from (drawn now, from the OS CSPRNG, at its first use);
        ``None`` where they come from the run seed."""
        if not task.secret_noise:
            return None
        if self.secret is None:
            self.secret = new_secret()
        return self.secret

    def has_state(self) -> bool:
        return bool(self.committed)

    def has_any_state(self) -> bool:
        """Whether this node holds anything of the run (a committed or pending state, or a ledger)."""
        return bool(self.committed) or self.pending is not None or self.ledger is not None

    def decide(self, task: NodeTask, decisions: Mapping[int, bool]) -> None:
        """Apply the server's decisions ``{round: accepted}`` to the pending state: commit it whole when its
        reply was accepted, else only its ledger (what went on the wire was spent). A pending state of a
        round after every decision is one the server has no record of (it restarted from an earlier
        checkpoint and will repeat that round with the same seed): it is dropped. One older than every
        decision the server still sends is treated as not accepted."""
        if self.pending is None or self.pending_round is None:
            return
        r, new = self.pending_round, self.pending
        if r in decisions:
            accepted = decisions[r]
        elif not decisions or r > max(decisions):
            self.pending_round = self.pending = None
            log.info("%s: the server has no record of round %s; it will be repeated", task.who, r)
            return
        else:
            accepted = False
        self.pending_round = self.pending = None
        base = self.state(task, r)
        if accepted:
            self.committed[r] = new
        elif LEDGER_KEY in new:
            self.committed[r] = {**base, LEDGER_KEY: new[LEDGER_KEY]}
        else:
            return
        for old in sorted(self.committed)[:-KEEP_STATES]:
            del self.committed[old]

    def train(self, task: NodeTask, r: int, received: Payload) -> tuple[Payload, dict[str, float]]:
        """One client step of round ``r`` (budget check first); the new state is left pending."""
        algo = task.algorithm
        state = self.state(task, r)
        algo.check_release(state, task.partition)
        validate(received, algo.broadcast_spec())
        new_state, reply, metrics = client_round(
            algo, state, task.data, received, round_index=r, seed=task.seed, secret=self.noise_secret(task)
        )
        self.pending_round, self.pending = r, new_state
        self._raise_ledger(new_state)
        return reply, metrics

    @torch.no_grad()
    def evaluate(self, task: NodeTask, r: int, received: Payload) -> dict[str, float]:
        """Personalised metrics after round ``r`` (empty when the client holds no test split)."""
        if not len(task.data.y_test):
            return {}
        validate(received, task.algorithm.broadcast_spec())
        return client_evaluation(task.algorithm, self.state(task, r + 1), task.data, received)

    def privacy_report(self, task: NodeTask, r: int, all_accountants: bool) -> dict[str, Any] | None:
        if not self.has_state() and self.ledger is None:
            return None
        return task.algorithm.privacy_report({task.partition: self.state(task, r + 1)}, all_accountants=all_accountants)

    # -- persistence -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "committed": on_device(self.committed, "cpu"),
                "pending_round": self.pending_round,
                "pending": on_device(self.pending, "cpu"),
                "ledger": self.ledger,
                "secret": None if self.secret is None else torch.frombuffer(bytearray(self.secret), dtype=torch.uint8),
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientStore:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        secret = state.get("secret")
        return cls(
            state["committed"],
            state["pending_round"],
            state["pending"],
            state.get("ledger"),
            None if secret is None else bytes(secret.tolist()),
        )

    @classmethod
    def load(cls, path: Path | None) -> ClientStore | None:
        if path is None or not path.exists():
            return None
        return cls.from_bytes(path.read_bytes())

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        from protofl._io import atomic_write

        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        # the node's own: its model, ledger and noise secret (readable by its owner only)
        atomic_write(path, lambda fh: fh.write(data), mode=0o600)


def diagnostics_path(state_dir: str, run_key: str, partition: int) -> Path | None:
    """Where a node of a private run keeps its training loss, personalised metrics and data profile (one
    JSON line per round; None: no state-dir, the node's log only)."""
    if not state_dir:
        return None
    return Path(state_dir).expanduser() / run_key / f"partition-{partition}-diagnostics.jsonl"


def keep_diagnostics(path: Path | None, task: NodeTask, entry: Mapping[str, Any]) -> None:
    """Keep a private run's diagnostics on the node: in its log (logger ``protofl.flower``) and, with a
    state-dir, appended to ``path`` (readable by its owner only). They are not sent."""
    import json

    log.info("%s (kept on this node): %s", task.who, dict(entry))
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(dict(entry)) + "\n")


def store_path(state_dir: str, run_key: str, partition: int) -> Path | None:
    """Where a node keeps its state on disk (None: in Flower's context only)."""
    if not state_dir:
        return None
    return Path(state_dir).expanduser() / run_key / f"partition-{partition}.pt"
