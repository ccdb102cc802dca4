"""The in-process simulation engine.

One process holds every client's compact state (a dict of tensors) and runs rounds: sample clients,
send them the server's broadcast *as bytes*, run each sampled client's step, receive each reply *as
bytes*, validate it against the algorithm's payload spec, let the server aggregate, evaluate, write a
checkpoint. Randomness is derived from ``(seed, round, client)`` so a run is deterministic and a
resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.privacy.vpdr import LEDGER_KEY
from protofl.config import FederationConfig
from protofl.engine.checkpoint import load_checkpoint, save_checkpoint
from protofl.payload import Payload, PayloadError, validate

log = logging.getLogger("protofl.engine")

RoundCallback = Callable[[dict[str, Any]], None]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


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
    return {"privacy_epsilon_max": report["epsilon"], "privacy_epsilon_mean": report[f"epsilon_{report['accountant']}_mean"]}


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
) -> dict[str, Any]:
    """One line of metrics.jsonl, in the engine's key order (shared by every engine)."""
    return {
        "round": r,
        **evaluation,
        "train_loss": float(np.nanmean(train_losses)) if len(train_losses) else float("nan"),
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


@dataclasses.dataclass
class Simulation:
    """Runs ``algorithm`` over ``clients`` in one process.

    ``checkpoint_dir`` (optional) receives a checkpoint at the end of every ``checkpoint_every``-th
    round and of the last; ``resume()`` continues from the last complete one.
    """

    algorithm: Algorithm
    clients: Sequence[ClientData]
    test_x: torch.Tensor
    test_y: torch.Tensor
    federation: FederationConfig
    seed: int
    checkpoint_dir: Path | None = None
    #: A digest of the run's configuration; a checkpoint written under another config is refused.
    fingerprint: str = ""
    on_round: RoundCallback | None = None
    #: Named subsets of the test set (e.g. one per domain): ``global_acc@name`` is reported for each.
    test_groups: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.server_state = self.algorithm.init_server_state(self.seed)
        self.client_states: dict[int, dict[str, Any]] = {}
        self.bytes_up = 0
        self.bytes_down = 0
        self.elapsed = 0.0
        #: Wall time of earlier processes of this run (restored on resume) and when this one began.
        self.wall_before = 0.0
        self._wall_start = time.perf_counter()
        #: The execution actually used: ``batched`` only where asked for and the method supports it.
        self.execution = self.federation.execution
        if self.execution == "batched":
            reason = self.algorithm.batched_unsupported()
            if reason is not None:
                log.warning("federation.execution = 'batched': %s; running it per client", reason)
                self.execution = "per-client"

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "fingerprint": self.fingerprint,
            "server_state": self.server_state,
            "client_states": self.client_states,
            "history": self.history,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "elapsed": self.elapsed,
            "wall_seconds": self.wall_seconds,
        }

    @property
    def wall_seconds(self) -> float:
        """Wall time of the whole run so far, over every process that worked on it."""
        return self.wall_before + time.perf_counter() - self._wall_start

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the checkpoint was written by a run with a different configuration; refusing to resume")
        self.round = state["round"]
        self.server_state = state["server_state"]
        self.client_states = state["client_states"]
        self.history = state["history"]
        self.bytes_up = state["bytes_up"]
        self.bytes_down = state["bytes_down"]
        self.elapsed = state["elapsed"]
        self.wall_before = state["wall_seconds"]
        self._wall_start = time.perf_counter()

    def resume(self) -> bool:
        """Load the last complete checkpoint, if any; returns whether one was loaded."""
        if self.checkpoint_dir is None:
            return False
        state = load_checkpoint(self.checkpoint_dir)
        if state is None:
            return False
        self.load_state_dict(state)
        log.info("resumed from round %d", self.round)
        return True

    def client_state(self, k: int) -> dict[str, Any]:
        state = self.client_states.get(k)
        if state is None:
            state = self.algorithm.init_client_state(self.seed)
        return state

    # -- running -----------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run the remaining rounds; ``stop_after=r`` raises :class:`RunInterrupted` after round r."""
        fed = self.federation
        bar = _progress(range(self.round + 1, fed.rounds + 1), fed.progress, self.round, fed.rounds)
        for r in bar:
            row = self.run_round(r)
            if row is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("acc_mean") or k == "global_acc"
                                 if isinstance(v, float)})
            if stop_after is not None and r >= stop_after and r < fed.rounds:
                raise RunInterrupted(f"stopped after round {r}")
        return self.history

    def run_round(self, r: int) -> dict[str, Any] | None:
        fed = self.federation
        algo = self.algorithm
        start = time.perf_counter()
        sampled = sample_clients(len(self.clients), fed.client_fraction, self.seed, r)
        dropped = self._dropouts(sampled, r)
        active = [k for k in sampled if k not in dropped]

        # Budget check before the round: a client whose next release would exceed its privacy budget
        # stops the run here, before anything is released (the last checkpoint stays the last round).
        for k in active:
            algo.check_release(self.client_state(k), k)
        broadcast = algo.broadcast(self.server_state)
        wire_down = broadcast.to_bytes() if algo.communicates else b""
        down = len(wire_down) * len(active)

        replies: list[Payload] = []
        rejected: list[int] = []
        train_losses = []
        up = 0
        up_by_client: dict[int, int] = {}
        for k, new_state, reply, metrics in self._client_steps(active, r, broadcast, wire_down):
            train_losses.append(metrics.get("train_loss", float("nan")))
            if algo.communicates:
                wire = reply.to_bytes()
                up += len(wire)
                up_by_client[k] = len(wire)
                try:
                    reply = self._through_wire(wire, algo.reply_spec(), f"client {k}")
                except PayloadError as exc:
                    log.warning("round %d: rejected the reply of client %d: %s", r, k, exc)
                    rejected.append(k)
                    if LEDGER_KEY in new_state:  # what went on the wire was spent, accepted or not
                        self.client_states[k] = {**self.client_state(k), LEDGER_KEY: new_state[LEDGER_KEY]}
                    continue
                replies.append(reply)
            self.client_states[k] = new_state
        server_metrics: dict[str, float] = {}
        if algo.communicates and replies:
            self.server_state, server_metrics = algo.server_step(self.server_state, replies)
        self.bytes_up += up
        self.bytes_down += down
        train_seconds = time.perf_counter() - start
        self.elapsed += train_seconds

        row = None
        if r % fed.eval_every == 0 or r == fed.rounds:
            eval_start = time.perf_counter()
            evaluation = self.evaluate()
            row = metrics_row(
                r, evaluation, train_losses, sampled=len(sampled), dropped=len(dropped), rejected=len(rejected),
                up=up, down=down, up_total=self.bytes_up, down_total=self.bytes_down, server_metrics=server_metrics,
                privacy=self._privacy_metrics(), execution=self.execution, round_seconds=train_seconds,
                eval_seconds=time.perf_counter() - eval_start, elapsed_seconds=self.elapsed,
            )
            self.history.append(row)
            if self.on_round is not None:
                self.on_round({**row, "clients": self._client_records(sampled, dropped, rejected, up_by_client,
                                                                        {k: len(wire_down) for k in active})})
        self.round = r
        if self.checkpoint_dir is not None and (
            r == fed.rounds or (fed.checkpoint_every and r % fed.checkpoint_every == 0)
        ):
            save_checkpoint(self.checkpoint_dir, self.state_dict())
        return row

    def _client_steps(self, active: list[int], r: int, broadcast: Payload, wire_down: bytes):
        """``(k, new_state, reply, metrics)`` of every active client, per client or batched."""
        algo = self.algorithm

        def receive() -> Payload:
            return self._through_wire(wire_down, algo.broadcast_spec(), "broadcast") if algo.communicates else broadcast

        def generator(k: int) -> torch.Generator:
            return torch.Generator().manual_seed(derive_seed(self.seed, r, k))

        if self.execution != "batched":
            for k in active:
                # Each client parses its own copy of the broadcast, as it would off a network.
                yield k, *algo.client_step(self.client_state(k), self.clients[k], receive(), generator(k))
            return
        from protofl.engine.batched import chunks

        for chunk in chunks(active, self.federation.batch_clients):
            # One parsed copy of the (identical) broadcast serves the whole chunk.
            results = algo.client_step_batched([self.client_state(k) for k in chunk], [self.clients[k] for k in chunk],
                                               receive(), [generator(k) for k in chunk])
            for k, result in zip(chunk, results):
                yield k, *result

    def _client_records(self, sampled, dropped, rejected, bytes_up, bytes_down) -> list[dict[str, Any]]:
        from protofl.client_records import client_epsilons, client_records

        epsilon = client_epsilons(self.algorithm, {d.client_id: self.client_state(d.client_id) for d in self.clients})
        return client_records({d.client_id: d.y_train for d in self.clients}, self.client_metrics, sampled=sampled,
                              dropped=dropped, rejected=rejected, bytes_up=bytes_up, bytes_down=bytes_down,
                              epsilon=epsilon)

    def _privacy_metrics(self) -> dict[str, float]:
        return privacy_metrics(self.algorithm.privacy_report(self.client_states, all_accountants=False))

    def _dropouts(self, sampled: list[int], r: int) -> set[int]:
        drop = simulated_dropouts(sampled, self.federation.client_dropout, self.seed, r)
        if drop:
            log.info("round %d: clients %s dropped out", r, sorted(drop))
        return drop

    @staticmethod
    def _through_wire(payload: Payload | bytes, spec, who: str) -> Payload:
        """Serialise (if needed), parse back and validate, as a real transport would."""
        data = payload.to_bytes() if isinstance(payload, Payload) else payload
        received = Payload.from_bytes(data)
        try:
            validate(received, spec)
        except PayloadError as exc:
            raise PayloadError(f"{who}: {exc}") from None
        return received

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Global accuracy (or None) and per-client personalised metrics (mean and std over clients)."""
        algo = self.algorithm
        out: dict[str, Any] = {"global_acc": None}
        global_metrics = algo.evaluate_global(self.server_state, self.test_x, self.test_y)
        if global_metrics:
            out.update(global_metrics)
            for name, index in self.test_groups.items():
                group = algo.evaluate_global(self.server_state, self.test_x[index], self.test_y[index])
                out[f"global_acc@{name}"] = group.get("global_acc")
        received = Payload.from_bytes(algo.broadcast(self.server_state).to_bytes())
        per_client = [algo.evaluate_client(self.client_state(data.client_id), received, data)
                      for data in self.clients if len(data.y_test)]
        # The last evaluation's personal metrics by client id (for the per-client records).
        self.client_metrics = {d.client_id: m for d, m in zip([d for d in self.clients if len(d.y_test)], per_client)}
        out.update(summarize_client_metrics(per_client))
        out["clients_evaluated"] = len(per_client)
        return out


def _progress(iterable, enabled: bool, initial: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="rounds", initial=initial, total=total, unit="round", dynamic_ncols=True)
