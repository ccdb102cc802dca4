"""The in-process transport: every client's compact state (a dict of tensors) held in this process.

The byte boundary is kept as a network would impose it: the broadcast is serialised once and each
client parses its own copy; each reply is serialised, parsed back and validated against the algorithm's
reply spec. Clients step one by one (``per-client``) or in chunks of ``batch_clients`` as one batched
program (``batched``, where the method supports it).

Under ``privacy.noise = secret`` each client draws its noise secret from the operating system's CSPRNG
at its first step and keeps it with its state (checkpointed with the run, so a resumed run repeats the
same draws); by default (``auto``) an in-process run's draws come from the run seed (reproducible).

The clients' personal states live in the store ``federation.client_store`` names
(:mod:`protofl.engine.client_store`): all in memory, or the most recently used in memory and the others
on disk under ``store_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.config import ConfigError, FederationConfig
from protofl.engine.checkpoint import on_device
from protofl.engine.client import (
    StepResult,
    client_evaluation,
    client_profile,
    client_round,
    client_rounds_batched,
)
from protofl.engine.client_store import STORES
from protofl.engine.progress import ClientProgress
from protofl.engine.rounds import ClientEvaluation, Exchange, merge_privacy_reports
from protofl.payload import Payload, PayloadError, PayloadSpec, validate
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.statement import uses_secret_noise
from protofl.seeds import new_secret

log = logging.getLogger("protofl.engine")


class InProcessTransport:
    """Holds ``clients``' data and states and runs their steps here (see the module docstring)."""

    counts_lost = False
    kind = "in-process"
    #: One process holds everything: the clients' diagnostics are the experimenter's own measurement.
    kept_on_nodes = False

    def __init__(
        self,
        algorithm: Algorithm,
        clients: Sequence[ClientData],
        federation: FederationConfig,
        seed: int,
        store_dir: Path | None = None,
    ):
        self.algorithm = algorithm
        self.clients = clients
        self.federation = federation
        self.seed = seed
        #: Each client's state once it has trained (``store_dir``: the disk store's folder; ``None``: a
        #: temporary one).
        self.client_states = STORES[federation.client_store](
            store_dir, federation.client_cache, federation.client_state_precision
        )
        #: Each client's noise secret (``privacy.noise = secret`` only), drawn at its first step.
        self.client_secrets: dict[int, bytes] = {}
        self.secret_noise = uses_secret_noise(algorithm.privacy, self.kind)
        #: The clients done within the current round (a bar under the round bar when progress is on).
        self.progress = ClientProgress(federation.progress)
        #: The execution actually used: ``batched`` only where asked for and the method supports it.
        self.execution = federation.execution
        built = bool(getattr(algorithm.task, "compile", False))
        if federation.compile != built:
            # the method compiles (or not) as its Task says: the two must agree, or the run would say one thing
            # and do the other
            raise ConfigError(
                f"federation.compile = {str(federation.compile).lower()}, but the method was built with "
                f"Task(compile={built}): build its Task with compile={federation.compile} (protofl.run does)"
            )
        if self.execution == "batched":
            reason = algorithm.batched_unsupported()
            if reason is not None:
                log.warning("federation.execution = 'batched': %s; running it per client", reason)
                if federation.compile:
                    log.warning("federation.compile = true: per-client rounds are not compiled")
                self.execution = "per-client"
        if federation.compile and self.execution == "batched":
            # a method whose batched rounds cannot be compiled is refused now, before the run writes anything
            algorithm.compiled_round()

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def start(self) -> None:
        """Nothing to wait for: the clients are here."""

    def client_state(self, k: int) -> dict[str, Any]:
        state = self.client_states.get(k)
        if state is None:
            state = self.algorithm.init_client_state(self.seed)
        return state

    def client_secret(self, k: int) -> bytes | None:
        """Client ``k``'s noise secret (drawn now if it has none yet); ``None`` where the noise is seeded."""
        if not self.secret_noise:
            return None
        if k not in self.client_secrets:
            self.client_secrets[k] = new_secret()
        return self.client_secrets[k]

    # -- the round ---------------------------------------------------------------------------------
    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, owed: int | None) -> Exchange:
        from protofl.privacy import BudgetExceededError

        algo = self.algorithm
        # Budget check before the round: a client whose next release would exceed its privacy budget
        # stops the run here, before anything is released.
        try:
            for k in active:
                algo.check_release(self.client_state(k), k)
        except BudgetExceededError as exc:
            return Exchange(stop=exc)
        wire_down = broadcast.to_bytes() if algo.communicates else b""
        accepted: list[Payload] = []
        status: dict[int, str] = {}
        up: dict[int, int] = {}
        train_losses = []
        reply_metrics: dict[str, list[float]] = {}
        # asked once a round: what every reply must be, and which of a client's metrics the row averages
        reply_spec = algo.reply_spec_for(broadcast) if algo.communicates else None
        row_metrics = algo.row_metrics()
        self.progress.start(r, len(active))
        for k, new_state, reply, metrics in self._client_steps(active, r, broadcast, wire_down):
            self.progress.advance()
            train_losses.append(metrics.get("train_loss", float("nan")))
            for key in row_metrics:
                if key in metrics:
                    reply_metrics.setdefault(key, []).append(float(metrics[key]))
            status[k] = "ok"
            if reply_spec is not None:
                wire = reply.to_bytes()
                up[k] = len(wire)
                try:
                    reply = self._through_wire(wire, reply_spec, f"client {k}")
                except PayloadError as exc:
                    log.warning("round %d: rejected the reply of client %d: %s", r, k, exc)
                    status[k] = "rejected"
                    if LEDGER_KEY in new_state:  # what went on the wire was spent, accepted or not
                        self.client_states[k] = {**self.client_state(k), LEDGER_KEY: new_state[LEDGER_KEY]}
                    continue
                accepted.append(reply)
            self.client_states[k] = new_state
        self.progress.close()
        return Exchange(
            accepted=accepted,
            train_losses=train_losses,
            reply_metrics=reply_metrics,
            status=status,
            bytes_down={k: len(wire_down) for k in active},
            bytes_up=up,
        )

    def _client_steps(
        self, active: Sequence[int], r: int, broadcast: Payload, wire_down: bytes
    ) -> Iterator[tuple[Any, ...]]:
        """``(k, new_state, reply, metrics)`` of every active client, per client or batched."""
        algo = self.algorithm

        def receive() -> Payload:
            return self._through_wire(wire_down, algo.broadcast_spec(), "broadcast") if algo.communicates else broadcast

        if self.execution != "batched":
            for k in active:
                # Each client parses its own copy of the broadcast, as it would off a network.
                yield (
                    k,
                    *client_round(
                        algo,
                        self.client_state(k),
                        self.clients[k],
                        receive(),
                        round_index=r,
                        seed=self.seed,
                        secret=self.client_secret(k),
                    ),
                )
            return
        from protofl.training import chunks

        for chunk in chunks(list(active), self.federation.batch_clients):
            # One parsed copy of the (identical) broadcast serves the whole chunk.
            results: list[StepResult] = client_rounds_batched(
                algo,
                [self.client_state(k) for k in chunk],
                [self.clients[k] for k in chunk],
                receive(),
                round_index=r,
                seed=self.seed,
                secrets=[self.client_secret(k) for k in chunk],
            )
            for k, result in zip(chunk, results):
                yield k, *result

    @staticmethod
    def _through_wire(payload: Payload | bytes, spec: PayloadSpec, who: str) -> Payload:
        """Serialise (if needed), parse back and validate, as a real transport would."""
        data = payload.to_bytes() if isinstance(payload, Payload) else payload
        received = Payload.from_bytes(data)
        try:
            validate(received, spec)
        except PayloadError as exc:
            raise PayloadError(f"{who}: {exc}") from None
        return received

    def evaluate(self, r: int, broadcast: Payload, final: bool) -> ClientEvaluation:
        """Every client's personalised metrics and spend, now."""
        algo = self.algorithm
        received = Payload.from_bytes(broadcast.to_bytes())
        metrics = {
            data.client_id: client_evaluation(algo, self.client_state(data.client_id), data, received)
            for data in self.clients
            if len(data.y_test)
        }
        all_reports = {
            k: algo.privacy_report({k: state}, all_accountants=False) for k, state in self.client_states.items()
        }
        reports = {k: report for k, report in all_reports.items() if report is not None}
        return ClientEvaluation(
            metrics=metrics,
            profiles={data.client_id: client_profile(data) for data in self.clients},
            epsilon={k: report["epsilon"] for k, report in reports.items()},
            privacy=merge_privacy_reports([reports[k] for k in self.client_states if k in reports]),
        )

    def privacy_report(self) -> dict[str, Any] | None:
        return self.algorithm.privacy_report(self.client_states)

    def summary_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"execution": self.execution}
        if self.execution == "batched":
            fields["batched_step"] = self.algorithm.batched_step()
        if self.federation.client_store != "memory":
            fields["client_store"] = self.federation.client_store
        if self.federation.client_state_precision != "exact":
            fields["client_state_precision"] = self.federation.client_state_precision
        return fields

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.client_states.checkpoint()
        if self.client_secrets:
            state["client_secrets"] = {
                k: torch.frombuffer(bytearray(secret), dtype=torch.uint8) for k, secret in self.client_secrets.items()
            }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.client_states.restore(on_device(state, self.algorithm.device))
        self.client_secrets = {int(k): bytes(v.tolist()) for k, v in state.get("client_secrets", {}).items()}
