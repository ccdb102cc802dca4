"""The Flower grid transport: a round's exchange with real nodes, for :class:`~protofl.engine.rounds.RoundDriver`.

The driver does what every engine does (sampling, dropouts, ``server_step`` on the accepted replies in
client order, byte counts, rows, checkpoints); this transport does what is about talking to nodes: it
discovers which partition each node holds, sends each active client the broadcast with the server's
decisions on its last replies, validates replies with the algorithm's own payload spec, and gathers the
nodes' evaluations. The aggregation is protofl's own (Flower's FedAvg strategy would refuse replies
whose per-class keys differ between clients).

A round's evaluation rides on the next round's training messages (the broadcast a node trains round
r+1 from is the one it evaluates round r with): one message per node per round instead of two; nodes
not training then get an evaluation message of their own, and the last round's evaluation is a
message of its own.

Faults: a node that does not answer in time (``round_timeout``, or a deadline derived from the run's
measured exchanges: :mod:`protofl.flower.timeouts`) is declared lost (logged with its node id,
counted in ``clients_lost``) and the round goes on once ``min_replies`` are in; a reply that fails
validation is rejected with its reason; a node that comes back (a new node id for its partition) is
found by the next round's discovery and continues from its saved state; a node over its privacy budget
stops the run, as in process.

Under a privacy mechanism (without ``privacy.share_diagnostics``) the nodes keep their training loss,
personalised metrics and data profiles (:mod:`protofl.flower.client_app`): rows then carry ``None`` for
them and summary.json says ``"diagnostics": "kept on the nodes"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from protofl.algorithms.base import Algorithm
from protofl.engine.rounds import ClientEvaluation, Exchange, merge_privacy_reports
from protofl.flower import protocol, records
from protofl.flower.settings import FlowerSettings
from protofl.flower.timeouts import RoundTimeouts
from protofl.payload import Payload, PayloadError, validate

log = logging.getLogger("protofl.flower")

POLL_SECONDS = 0.25
#: While waiting for replies, look this often for nodes that restarted (and so replace a silent one).
REJOIN_LOOK_SECONDS = 2.0
#: Decisions remembered (and sent) per partition.
DECISIONS_KEPT = 4
#: What summary.json and report.md say of the training loss, personalised metrics and data profiles of a
#: private run's nodes (they stay on the nodes).
KEPT_ON_NODES = "kept on the nodes"


class NotEnoughReplies(RuntimeError):
    """Fewer than ``min_replies`` nodes answered a round in time."""


@dataclasses.dataclass
class Reply:
    partition: int
    node_id: int
    content: Any = None
    error: str | None = None


def _check_report(report: Any) -> None:
    """A node's privacy report has the fields :func:`merge_privacy_reports` reads (else ValueError or
    TypeError)."""
    if not isinstance(report, dict):
        raise TypeError(f"privacy report is a {type(report).__name__}, not an object")
    accountant = report.get("accountant")
    needed = ["max_releases_by_a_client", f"epsilon_{accountant}_max"]
    missing = [key for key in needed if key not in report]
    if not isinstance(accountant, str) or missing:
        raise ValueError(f"privacy report lacks {missing or ['accountant']}")
    if not isinstance(report["max_releases_by_a_client"], int):
        raise TypeError("privacy report's max_releases_by_a_client is not an int")
    for key, value in report.items():
        if (
            key.startswith("epsilon_")
            and key.endswith(("_max", "_mean"))
            and not (value is None or isinstance(value, (int, float)))
        ):
            raise TypeError(f"privacy report's {key} is not a number")


class GridTransport:
    """Talks to the nodes of a Flower ``Grid`` (see the module docstring)."""

    execution = "per-client"
    counts_lost = True
    kind = "flower"

    def __init__(self, grid: Any, algorithm: Algorithm, num_clients: int, settings: FlowerSettings, engine: str):
        self.grid = grid
        self.algorithm = algorithm
        self._num_clients = num_clients
        self.settings = settings
        self.engine = engine
        from protofl.privacy.statement import shares_diagnostics

        #: Whether the nodes keep their training loss, personalised metrics and data profiles.
        self.kept_on_nodes = not shares_diagnostics(algorithm.privacy, self.kind)
        #: Per partition, the server's decisions on its last training replies: {round: accepted}. Every
        #: message to a node carries them, so a node that missed a message still learns its decision.
        self.decisions: dict[int, dict[int, bool]] = {}
        #: Every node lost or reply rejected: {"round", "partition", "node_id", "kind", "reason"}.
        self.incidents: list[dict[str, Any]] = []
        #: The merged spend report of the last evaluation (summary.json's ``privacy``).
        self.privacy: dict[str, Any] | None = None
        #: Each partition's latest privacy report (its node's own spend), merged over all partitions for the
        #: rows and summary.json: a node silent at an evaluation still counts with what it reported last.
        self.reports: dict[int, dict[str, Any]] = {}
        self.nodes: dict[int, int] = {}  # partition -> node id
        #: The exchanges' deadlines (fixed, or derived from the exchanges measured so far).
        self.timeouts = RoundTimeouts(settings.round_timeout, settings.node_wait, settings.timeout_factor)
        self._asked: set[int] = set()  # node ids already asked for their partition

    @property
    def num_clients(self) -> int:
        return self._num_clients

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "decisions": {k: [[r, a] for r, a in v.items()] for k, v in self.decisions.items()},
            "incidents": json.dumps(self.incidents),
            "privacy": json.dumps(self.privacy),
            "reports": json.dumps({str(k): v for k, v in self.reports.items()}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decisions = {int(k): {int(r): bool(a) for r, a in v} for k, v in state["decisions"].items()}
        self.incidents = json.loads(state["incidents"])
        self.privacy = json.loads(state["privacy"])
        self.reports = {int(k): v for k, v in json.loads(state.get("reports", "{}")).items()}

    def privacy_report(self) -> dict[str, Any] | None:
        return self.privacy

    def summary_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"engine": self.engine, "incidents": self.incidents}
        if self.kept_on_nodes:
            fields["diagnostics"] = KEPT_ON_NODES
        return fields

    # -- messaging ---------------------------------------------------------------------------------
    def _message(
        self, partition: int, kind: str, r: int, payload: Payload | None, fields: Mapping[protocol.Field, Any]
    ):
        from flwr.app import Message

        values = {protocol.ROUND: r, **fields}
        decisions = self.decisions.get(partition)
        if decisions:
            values.update(
                {protocol.DECISION_ROUNDS: list(decisions), protocol.DECISION_ACCEPTED: list(decisions.values())}
            )
        content = records.to_record_dict(payload, **protocol.pack(values))
        return Message(content, dst_node_id=self.nodes[partition], message_type=kind, group_id=str(r))

    def _exchange(
        self, messages: Mapping[int, Any], wait_for: int, counted: set[int] | None = None
    ) -> tuple[dict[int, Reply], dict[int, tuple[int, str]], str | None]:
        """Send one message per partition; wait for every reply, or, past the deadline, for at least
        ``wait_for`` replies from the ``counted`` partitions (default: all); returns the replies, for each
        partition that stayed silent the node it was sent to and why, and, where fewer than ``wait_for``
        replied in time, why that is too few (the replies that did come are kept: they may carry the
        previous round's evaluation)."""
        if not messages:
            return {}, {}, None
        partitions = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in partitions]))
        pending = {mid: k for mid, k in zip(ids, partitions) if mid}
        replaced: dict[int, tuple[int, str]] = {}
        replies: dict[int, Reply] = {}
        for mid, k in zip(ids, partitions):
            if not mid:
                replies[k] = Reply(k, self.nodes[k], error="the SuperLink refused the message")
        sent_to = {k: self.nodes[k] for k in partitions}
        wait = self.timeouts.wait(len(pending))
        next_look = time.monotonic() + REJOIN_LOOK_SECONDS
        short = None
        while pending:
            if time.monotonic() >= next_look:
                # A node that restarted while we wait holds the partition now: its predecessor's message
                # will never be answered, so stop waiting for it.
                self.discover()
                for mid, k in list(pending.items()):
                    if self.nodes.get(k, sent_to[k]) != sent_to[k]:
                        del pending[mid]
                        replaced[k] = (sent_to[k], f"its node was replaced by node {self.nodes[k]} (restarted)")
                next_look = time.monotonic() + REJOIN_LOOK_SECONDS
            for msg in self.grid.pull_messages(list(pending)):
                partition = pending.pop(msg.metadata.reply_to_message_id, None)
                if partition is None:
                    continue
                error = f"{msg.error.reason} (code {msg.error.code})" if msg.has_error() else None
                replies[partition] = Reply(partition, msg.metadata.src_node_id, None if error else msg.content, error)
                wait.replied()
            if pending and wait.expired():
                got = sum(
                    1 for k, reply in replies.items() if (counted is None or k in counted) and reply.error is None
                )
                if got < wait_for:
                    short = (
                        f"{got} of {len(counted if counted is not None else partitions)} nodes replied "
                        f"({wait.describe()} for the others); at least {wait_for} needed"
                    )
                break
            if pending:
                time.sleep(POLL_SECONDS)
        wait.finish()
        late = wait.describe()
        return replies, {**{k: (sent_to[k], late) for k in pending.values()}, **replaced}, short

    def start(self) -> None:
        """Wait (up to ``node_wait``) for a node to hold every partition."""
        self.discover(wait=self.settings.node_wait)

    def discover(self, wait: float = 0.0) -> None:
        """Learn which partition each connected node holds (asking new nodes); with ``wait``, wait up to
        that many seconds for every partition to have a node."""
        deadline = time.monotonic() + wait
        while True:
            connected = set(self.grid.get_node_ids())
            for k, n in list(self.nodes.items()):
                if n not in connected:
                    log.warning("node %d (client %d) left the federation", n, k)
                    del self.nodes[k]
            new = [n for n in connected if n not in self._asked]
            if new:
                from flwr.app import Message

                ids = list(
                    self.grid.push_messages(
                        [
                            Message(
                                records.to_record_dict(None), dst_node_id=n, message_type=protocol.QUERY, group_id="0"
                            )
                            for n in new
                        ]
                    )
                )
                self._asked.update(new)
                asked = {mid: n for mid, n in zip(ids, new) if mid}
                answers = self.timeouts.discovery(len(asked))
                while asked and not answers.expired():
                    for msg in self.grid.pull_messages(list(asked)):
                        node = asked.pop(msg.metadata.reply_to_message_id, None)
                        if node is None:
                            continue
                        answers.replied()
                        if msg.has_error():
                            log.warning("node %d cannot take part: %s", node, msg.error.reason)
                            continue
                        try:
                            k = protocol.PARTITION_ID.read(records.fields_of(msg.content))
                        except (ValueError, TypeError, KeyError) as exc:
                            log.warning(
                                "node %d cannot take part: malformed partition-id (%s: %s)",
                                node,
                                type(exc).__name__,
                                exc,
                            )
                            continue
                        if self.nodes.get(k) not in (None, node):
                            log.info("partition %d is now served by node %d (was node %d)", k, node, self.nodes[k])
                        self.nodes[k] = node
                    if asked:
                        time.sleep(POLL_SECONDS)
            if len(self.nodes) >= self.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        missing = sorted(set(range(self.num_clients)) - set(self.nodes))
        if missing and wait:
            log.warning("no node holds partitions %s yet; going on without them", missing)

    def _lose(self, r: int, k: int, reason: str, node: int | None = None) -> None:
        node = self.nodes.get(k) if node is None else node
        log.warning("round %d: lost client %d (node %s): %s", r, k, node, reason)
        self.incidents.append({"round": r, "partition": k, "node_id": node, "kind": "lost", "reason": reason})

    def _reject(self, r: int, k: int, reason: str) -> None:
        log.warning("round %d: rejected the reply of client %d (node %s): %s", r, k, self.nodes.get(k), reason)
        self.incidents.append(
            {"round": r, "partition": k, "node_id": self.nodes.get(k), "kind": "rejected", "reason": reason}
        )

    # -- the round ---------------------------------------------------------------------------------
    def exchange(self, r: int, active: Sequence[int], broadcast: Payload, owed: int | None) -> Exchange:
        algo = self.algorithm
        self.discover()
        lost = [k for k in active if k not in self.nodes]
        for k in lost:
            self._lose(r, k, "no node holds this partition")
        size = records.wire_size(broadcast) if algo.communicates else 0
        reachable = [k for k in active if k in self.nodes]
        evaluate: dict[protocol.Field, Any] = (
            {protocol.EVALUATE_ROUND: owed, protocol.PRIVACY_ALL: False} if owed is not None else {}
        )
        messages = {k: self._message(k, protocol.TRAIN, r, broadcast, evaluate) for k in reachable}
        if owed is not None:
            messages.update(
                {
                    k: self._message(k, protocol.EVALUATE, owed, broadcast, {protocol.PRIVACY_ALL: False})
                    for k in sorted(self.nodes)
                    if k not in messages
                }
            )
        # min_replies counts accepted replies of the clients sampled and not dropped (0: every reachable one);
        # a node missing from the federation does not lower it
        required = min(self.settings.min_replies, len(active)) if self.settings.min_replies else len(reachable)
        replies, silent, short = self._exchange(messages, required, counted=set(reachable))
        for k, (node, why) in sorted(silent.items()):
            self._lose(r, k, why, node)
        lost += [k for k in sorted(silent) if k in reachable]
        evaluation = self._evaluation(owed, replies) if owed is not None else None
        if short is not None:  # the round is not taken; the previous round's row and checkpoint still are
            log.error("round %d: %s; the run stops", r, short)
            return Exchange(evaluation=evaluation, stop=NotEnoughReplies(f"round {r}: {short}"))
        status = {k: "lost" for k in lost}
        bytes_down = {k: size for k in active}

        over = self._over_budget(replies, reachable)
        if over:
            from protofl.privacy import BudgetExceededError

            log.error("round %d: clients %s would exceed their privacy budget; the run stops", r, sorted(over))
            self._spend_after_stop(r, broadcast)
            return Exchange(evaluation=evaluation, stop=BudgetExceededError("; ".join(over[k] for k in sorted(over))))

        reply_spec = algo.reply_spec_for(broadcast)  # what every reply of this round must be
        accepted: list[Payload] = []
        train_losses: list[float] = []
        reply_metrics: dict[str, list[float]] = {}
        up: dict[int, int] = {}
        for k in reachable:
            reply = replies.get(k)
            if reply is None:
                continue
            if reply.error is None:
                try:
                    fields = records.fields_of(reply.content)
                    payload = records.payload_of(reply.content)
                    partition, replied = protocol.PARTITION_ID.read(fields, -1), protocol.ROUND.read(fields, -1)
                    if partition != k or replied != r:
                        raise PayloadError(
                            f"reply is for partition {fields.get(protocol.PARTITION_ID.name)} round "
                            f"{fields.get(protocol.ROUND.name)}, expected partition {k} round {r}"
                        )
                    if not self.kept_on_nodes:
                        train_losses.append(protocol.TRAIN_LOSS.read(fields, math.nan))
                        for key, value in protocol.ROW_METRICS.read(fields, {}).items():
                            reply_metrics.setdefault(key, []).append(value)
                    up[k] = records.wire_size(payload)
                    validate(payload, reply_spec)
                except PayloadError as exc:
                    reply.error = str(exc)
                except (ValueError, TypeError, KeyError) as exc:  # a malformed protocol field
                    reply.error = f"malformed reply field: {type(exc).__name__}: {exc}"
            if reply.error is not None:
                self._reject(r, k, reply.error)
                status[k] = "rejected"
                continue
            status[k] = "ok"
            accepted.append(payload)
        rejected = sum(1 for s in status.values() if s == "rejected")
        if self.settings.min_replies and len(accepted) < required:
            return Exchange(
                evaluation=evaluation,
                stop=NotEnoughReplies(
                    f"round {r}: {len(accepted)} accepted replies ({rejected} rejected, {len(lost)} lost) of "
                    f"{len(active)} clients; min_replies={self.settings.min_replies} needs {required}"
                ),
            )
        for k in reachable:
            kept = self.decisions.setdefault(k, {})
            kept[r] = status.get(k) == "ok"
            for old in sorted(kept)[:-DECISIONS_KEPT]:
                del kept[old]
        for k in active:
            status.setdefault(k, "lost")
        return Exchange(
            accepted=accepted,
            train_losses=train_losses,
            reply_metrics=reply_metrics,
            status=status,
            bytes_down=bytes_down,
            bytes_up=up,
            evaluation=evaluation,
        )

    def _spend_after_stop(self, r: int, broadcast: Payload) -> None:
        """The nodes' actual spend once a budget stop ends the run in round ``r``: the nodes with budget left
        released round ``r`` before the server learnt that another refused (in process, every client is
        checked before anyone releases). Their spend reports (asked for with the evaluation of round
        ``r - 1``, the state the server keeps; their ledgers keep round ``r``'s release) replace the ones
        from before the round, so summary.json counts every release that went on the wire."""
        messages = {
            k: self._message(k, protocol.EVALUATE, r - 1, broadcast, {protocol.PRIVACY_ALL: True})
            for k in sorted(self.nodes)
        }
        replies, silent, _ = self._exchange(messages, 0)
        for k, (node, why) in sorted(silent.items()):
            self._lose(r, k, f"spend after the budget stop: {why}", node)
        self._evaluation(r - 1, replies)

    def _over_budget(self, replies: Mapping[int, Reply], reachable: Sequence[int]) -> dict[int, str]:
        """The clients whose node refused to train (its next release would exceed its budget), and why."""
        over = {}
        for k in reachable:
            reply = replies.get(k)
            if reply is None or reply.error is not None:
                continue
            try:
                why = protocol.BUDGET_EXCEEDED.read(records.fields_of(reply.content), None)
            except (PayloadError, ValueError, TypeError, KeyError):
                continue
            if why is not None:
                over[k] = why
        return over

    def evaluate(self, r: int, broadcast: Payload, final: bool) -> ClientEvaluation | None:
        """The last round's evaluation is a message of its own; the others ride on the next round's."""
        if not final:
            return None
        self.discover()
        messages = {
            k: self._message(k, protocol.EVALUATE, r, broadcast, {protocol.PRIVACY_ALL: True})
            for k in sorted(self.nodes)
        }
        replies, silent, _ = self._exchange(messages, 0)
        for k, (node, why) in sorted(silent.items()):
            self._lose(r, k, f"evaluation: {why}", node)
        return self._evaluation(r, replies)

    def _evaluation(self, r: int, replies: Mapping[int, Reply]) -> ClientEvaluation:
        """Personalised metrics, data profile and privacy spent after round ``r``, from the nodes' replies."""
        metrics: dict[int, dict[str, float]] = {}
        profiles: dict[int, dict[str, int]] = {}
        for k in sorted(replies):
            reply = replies[k]
            if reply.error is not None:
                log.warning("round %d: client %d could not evaluate: %s", r, k, reply.error)
                continue
            try:
                fields = records.fields_of(reply.content)
                if protocol.EVALUATED_ROUND.read(fields, -1) != r:
                    continue
                values = reply.content.metric_records.get("metrics", {})
                client = (
                    {key: float(values[key]) for key in protocol.METRIC_KEYS.read(fields, [])}
                    if protocol.EVALUATED.read(fields, False)
                    else None
                )
                report = protocol.PRIVACY.read(fields, None)
                if report is not None:
                    _check_report(report)
                profile = (
                    {
                        "samples": protocol.TRAIN_SAMPLES.read(fields, None),
                        "classes": protocol.TRAIN_CLASSES.read(fields, None),
                    }
                    if protocol.TRAIN_SAMPLES.within(fields)
                    else {}
                )
            except (ValueError, TypeError, KeyError) as exc:  # a malformed protocol field: not used
                self._reject(r, k, f"evaluation: malformed reply field: {type(exc).__name__}: {exc}")
                continue
            if client is not None:
                metrics[k] = client
            if profile:
                profiles[k] = profile
            if report is not None:
                self.reports[k] = report
        self.privacy = merge_privacy_reports([self.reports[k] for k in sorted(self.reports)])
        return ClientEvaluation(
            metrics=metrics,
            profiles=profiles,
            epsilon={k: report.get("epsilon") for k, report in self.reports.items()},
            privacy=self.privacy,
        )
