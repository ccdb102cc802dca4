"""The server's side of a Flower run: the in-process engine's round, with real nodes.

Each round follows :meth:`protofl.engine.Simulation.run_round`: the same client sampling, simulated
dropouts, per-client seeds (on the nodes), reply validation with the algorithm's own payload spec,
``server_step`` on the accepted replies in client order, evaluation and metric rows; so a Flower run
and an in-process run of the same configuration agree. The aggregation is protofl's own (Flower's
FedAvg strategy would refuse replies whose per-class keys differ between clients).

Faults: a node that does not answer within ``round_timeout`` is declared lost (logged with its node
id, counted in ``clients_lost``) and the round goes on once ``min_replies`` are in; a reply that fails
validation is rejected with its reason; a node that comes back (a new node id for its partition) is
found by the next round's discovery and continues from its saved state; the server restarted with
``resume`` continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protofl.algorithms.base import Algorithm
from protofl.config import RunConfig
from protofl.engine.checkpoint import load_checkpoint, save_checkpoint
from protofl.engine.simulation import (
    metrics_row,
    privacy_metrics,
    sample_clients,
    simulated_dropouts,
    summarize_client_metrics,
)
from protofl.flower import records
from protofl.flower.settings import FlowerSettings
from protofl.payload import Payload, PayloadError, validate

log = logging.getLogger("protofl.flower")

POLL_SECONDS = 0.25
#: While waiting for replies, look this often for nodes that restarted (and so replace a silent one).
REJOIN_LOOK_SECONDS = 2.0
#: Decisions remembered (and sent) per partition.
DECISIONS_KEPT = 4


class NotEnoughReplies(RuntimeError):
    """Fewer than ``min_replies`` nodes answered a round in time."""


@dataclasses.dataclass
class Reply:
    partition: int
    node_id: int
    content: Any = None
    error: str | None = None


def merge_privacy_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One spend report from per-client ones (each over a single client), as
    :func:`protofl.privacy.accounting.spend_report` would give over all of their ledgers at once."""
    if not reports:
        return None
    out = dict(reports[0])
    keys = dict.fromkeys(key for r in reports for key in r)  # a node's report may hold more accountants
    for key in keys:
        if key.startswith("epsilon_") and key.endswith(("_max", "_mean")):
            values = [r.get(key) for r in reports]
            if any(v is None for v in values):
                out[key] = None
            elif key.endswith("_max"):
                out[key] = max(values)
            else:
                out[key] = sum(values) / len(values)
    out["max_releases_by_a_client"] = max(r["max_releases_by_a_client"] for r in reports)
    out["epsilon"] = out[f"epsilon_{out['accountant']}_max"]
    return out


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
        if key.startswith("epsilon_") and key.endswith(("_max", "_mean")) and not (
                value is None or isinstance(value, (int, float))):
            raise TypeError(f"privacy report's {key} is not a number")


class FlowerServer:
    """Drives a run over a Flower ``Grid`` (see the module docstring)."""

    def __init__(self, grid: Any, algorithm: Algorithm, config: RunConfig, settings: FlowerSettings,
                 test_x: torch.Tensor, test_y: torch.Tensor, test_groups: Mapping[str, torch.Tensor],
                 fingerprint: str, engine: str):
        self.grid = grid
        self.algorithm = algorithm
        self.config = config
        self.settings = settings
        self.test_x, self.test_y, self.test_groups = test_x, test_y, test_groups
        self.fingerprint = fingerprint
        self.engine = engine
        self.num_clients = config.partition.num_clients
        self.round = 0
        self.server_state = algorithm.init_server_state(config.seed)
        self.history: list[dict[str, Any]] = []
        self.bytes_up = self.bytes_down = 0
        self.elapsed = 0.0
        self.wall_before = 0.0
        self._wall_start = time.perf_counter()
        #: Per partition, the server's decisions on its last training replies: {round: accepted}. Every
        #: message to a node carries them, so a node that missed a message still learns its decision.
        self.decisions: dict[int, dict[int, bool]] = {}
        #: Every node lost or reply rejected: {"round", "partition", "node_id", "reason"}.
        self.incidents: list[dict[str, Any]] = []
        self.privacy: dict[str, Any] | None = None
        #: Each partition's latest privacy report (its node's own spend), merged over all partitions for the
        #: rows and summary.json: a node silent at an evaluation still counts with what it reported last.
        self.reports: dict[int, dict[str, Any]] = {}
        self.nodes: dict[int, int] = {}  # partition -> node id
        #: The row of the last evaluated round, waiting for the nodes' evaluations (see :meth:`run_round`).
        self.owed: dict[str, Any] | None = None
        self._asked: set[int] = set()  # node ids already asked for their partition

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.settings.out) / "checkpoint"

    @property
    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self._wall_start

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "fingerprint": self.fingerprint, "server_state": self.server_state,
                "history": self.history, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "elapsed": self.elapsed, "wall_seconds": self.wall_seconds,
                "decisions": {k: [[r, a] for r, a in v.items()] for k, v in self.decisions.items()},
                "incidents": json.dumps(self.incidents), "privacy": json.dumps(self.privacy),
                "reports": json.dumps({str(k): v for k, v in self.reports.items()})}

    def resume(self) -> bool:
        state = load_checkpoint(self.checkpoint_dir)
        if state is None:
            return False
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the checkpoint was written by a run with a different configuration; refusing to resume")
        self.round, self.server_state, self.history = state["round"], state["server_state"], state["history"]
        self.bytes_up, self.bytes_down, self.elapsed = state["bytes_up"], state["bytes_down"], state["elapsed"]
        self.wall_before = state["wall_seconds"]
        self.decisions = {int(k): {int(r): bool(a) for r, a in v} for k, v in state["decisions"].items()}
        self.incidents = json.loads(state["incidents"])
        self.privacy = json.loads(state["privacy"])
        self.reports = {int(k): v for k, v in json.loads(state.get("reports", "{}")).items()}
        log.info("resumed from round %d", self.round)
        return True

    # -- messaging ---------------------------------------------------------------------------------
    def _message(self, partition: int, kind: str, r: int, payload: Payload | None, **fields: Any):
        from flwr.app import Message

        decisions = self.decisions.get(partition)
        if decisions:
            fields.update({"decision-rounds": list(decisions), "decision-accepted": list(decisions.values())})
        content = records.to_record_dict(payload, round=r, **fields)
        return Message(content, dst_node_id=self.nodes[partition], message_type=kind, group_id=str(r))

    def _exchange(self, messages: Mapping[int, Any], wait_for: int,
                  counted: set[int] | None = None) -> tuple[dict[int, Reply], dict[int, tuple[int, str]]]:
        """Send one message per partition; wait for every reply, or, past ``round_timeout``, for at least
        ``wait_for`` replies from the ``counted`` partitions (default: all); returns the replies and, for
        each partition that stayed silent, the node it was sent to and why."""
        if not messages:
            return {}, {}
        partitions = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in partitions]))
        pending = {mid: k for mid, k in zip(ids, partitions) if mid}
        replaced: dict[int, tuple[int, str]] = {}
        replies: dict[int, Reply] = {}
        for mid, k in zip(ids, partitions):
            if not mid:
                replies[k] = Reply(k, self.nodes[k], error="the SuperLink refused the message")
        sent_to = {k: self.nodes[k] for k in partitions}
        deadline = time.monotonic() + self.settings.round_timeout
        next_look = time.monotonic() + REJOIN_LOOK_SECONDS
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
                k = pending.pop(msg.metadata.reply_to_message_id, None)
                if k is None:
                    continue
                error = f"{msg.error.reason} (code {msg.error.code})" if msg.has_error() else None
                replies[k] = Reply(k, msg.metadata.src_node_id, None if error else msg.content, error)
            if pending and time.monotonic() > deadline:
                got = sum(1 for k, reply in replies.items()
                          if (counted is None or k in counted) and reply.error is None)
                if got >= wait_for:
                    break
                raise NotEnoughReplies(f"{got} of {len(counted if counted is not None else partitions)} nodes "
                                       f"replied within {self.settings.round_timeout:g} s; at least {wait_for} needed")
            if pending:
                time.sleep(POLL_SECONDS)
        late = f"no reply within {self.settings.round_timeout:g} s"
        return replies, {**{k: (sent_to[k], late) for k in pending.values()}, **replaced}

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

                ids = list(self.grid.push_messages([
                    Message(records.to_record_dict(None), dst_node_id=n, message_type="query", group_id="0")
                    for n in new]))
                self._asked.update(new)
                asked = {mid: n for mid, n in zip(ids, new) if mid}
                stop = time.monotonic() + min(self.settings.round_timeout, 60.0)
                while asked and time.monotonic() < stop:
                    for msg in self.grid.pull_messages(list(asked)):
                        node = asked.pop(msg.metadata.reply_to_message_id, None)
                        if node is None:
                            continue
                        if msg.has_error():
                            log.warning("node %d cannot take part: %s", node, msg.error.reason)
                            continue
                        try:
                            k = int(records.fields_of(msg.content)["partition-id"])
                        except (ValueError, TypeError, KeyError) as exc:
                            log.warning("node %d cannot take part: malformed partition-id (%s: %s)", node,
                                        type(exc).__name__, exc)
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
        self.incidents.append({"round": r, "partition": k, "node_id": self.nodes.get(k), "kind": "rejected",
                               "reason": reason})

    # -- running -----------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        self.discover(wait=self.settings.node_wait)
        for r in range(self.round + 1, self.config.federation.rounds + 1):
            self.run_round(r)
        return self.history

    def run_round(self, r: int) -> dict[str, Any] | None:
        """One round. Its evaluation rides on the next round's training messages (the broadcast a node
        trains round r+1 from is the one it evaluates round r with), one message per node per round
        instead of two; nodes not training then get an evaluation message of their own, and the last
        round's evaluation is a message of its own. A round's row and checkpoint are written once its
        evaluation is in."""
        fed, algo, seed = self.config.federation, self.algorithm, self.config.seed
        start = time.perf_counter()
        self.discover()
        sampled = sample_clients(self.num_clients, fed.client_fraction, seed, r)
        dropped = simulated_dropouts(sampled, fed.client_dropout, seed, r)
        if dropped:
            log.info("round %d: clients %s dropped out", r, sorted(dropped))
        active = [k for k in sampled if k not in dropped]
        lost = [k for k in active if k not in self.nodes]
        for k in lost:
            self._lose(r, k, "no node holds this partition")
        broadcast = algo.broadcast(self.server_state)
        down = records.wire_size(broadcast) * len(active) if algo.communicates else 0
        reachable = [k for k in active if k in self.nodes]
        owed, self.owed = self.owed, None
        evaluate = {"evaluate-round": owed["round"], "privacy-all": False} if owed else {}
        messages = {k: self._message(k, "train", r, broadcast, **evaluate) for k in reachable}
        if owed:
            messages.update({k: self._message(k, "evaluate", owed["round"], broadcast, **{"privacy-all": False})
                             for k in sorted(self.nodes) if k not in messages})
        # min_replies counts accepted replies of the clients sampled and not dropped (0: every reachable one);
        # a node missing from the federation does not lower it
        required = min(self.settings.min_replies, len(active)) if self.settings.min_replies else len(reachable)
        replies, silent = self._exchange(messages, required, counted=set(reachable))
        for k, (node, why) in sorted(silent.items()):
            self._lose(r, k, why, node)
        lost += [k for k in sorted(silent) if k in reachable]
        if owed:
            # the nodes' side of this evaluation was part of the exchange above (counted in this round's
            # round_seconds); its eval_seconds is the server's side
            self._finish(owed, replies, time.perf_counter())
        self._stop_if_over_budget(r, replies, reachable)

        accepted: list[Payload] = []
        rejected: list[int] = []
        train_losses, up = [], 0
        for k in reachable:
            reply = replies.get(k)
            if reply is None:
                continue
            if reply.error is None:
                try:
                    fields = records.fields_of(reply.content)
                    payload = records.payload_of(reply.content)
                    if int(fields.get("partition-id", -1)) != k or int(fields.get("round", -1)) != r:
                        raise PayloadError(f"reply is for partition {fields.get('partition-id')} round "
                                           f"{fields.get('round')}, expected partition {k} round {r}")
                    train_losses.append(float(fields.get("train-loss", math.nan)))
                    up += records.wire_size(payload)
                    validate(payload, algo.reply_spec())
                except PayloadError as exc:
                    reply.error = str(exc)
                except (ValueError, TypeError, KeyError) as exc:  # a malformed protocol field
                    reply.error = f"malformed reply field: {type(exc).__name__}: {exc}"
            if reply.error is not None:
                self._reject(r, k, reply.error)
                rejected.append(k)
                continue
            accepted.append(payload)
        if self.settings.min_replies and len(accepted) < required:
            save_checkpoint(self.checkpoint_dir, self.state_dict())  # round r is not taken
            raise NotEnoughReplies(
                f"round {r}: {len(accepted)} accepted replies ({len(rejected)} rejected, {len(lost)} lost) of "
                f"{len(active)} clients; min_replies={self.settings.min_replies} needs {required}")
        for k in reachable:
            kept = self.decisions.setdefault(k, {})
            kept[r] = k not in rejected and k not in lost and k in replies
            for old in sorted(kept)[:-DECISIONS_KEPT]:
                del kept[old]
        server_metrics: dict[str, float] = {}
        if algo.communicates and accepted:
            self.server_state, server_metrics = algo.server_step(self.server_state, accepted)
        self.bytes_up += up
        self.bytes_down += down
        train_seconds = time.perf_counter() - start
        self.elapsed += train_seconds
        self.round = r

        if r % fed.eval_every == 0 or r == fed.rounds:
            owed = {"round": r, "train_losses": train_losses, "sampled": len(sampled), "dropped": len(dropped),
                    "rejected": len(rejected), "lost": len(lost), "up": up, "down": down,
                    "up_total": self.bytes_up, "down_total": self.bytes_down, "server_metrics": server_metrics,
                    "round_seconds": train_seconds, "elapsed": self.elapsed}
            if r < fed.rounds:
                self.owed = owed  # evaluated with the next round's messages
                return None
            eval_start = time.perf_counter()
            self.discover()
            broadcast = algo.broadcast(self.server_state)
            replies, silent = self._exchange(
                {k: self._message(k, "evaluate", r, broadcast, **{"privacy-all": True}) for k in sorted(self.nodes)}, 0)
            for k, (node, why) in sorted(silent.items()):
                self._lose(r, k, f"evaluation: {why}", node)
            return self._finish(owed, replies, eval_start)
        if fed.checkpoint_every and r % fed.checkpoint_every == 0:
            save_checkpoint(self.checkpoint_dir, self.state_dict())
        return None

    def _stop_if_over_budget(self, r: int, replies: Mapping[int, Reply], reachable: Sequence[int]) -> None:
        """A node refused round ``r``'s release (its budget would be exceeded): stop the run as the in-process
        engine does, with a checkpoint of the rounds finished (round ``r`` is not taken)."""
        from protofl.privacy import BudgetExceededError

        over = {}
        for k in reachable:
            reply = replies.get(k)
            if reply is None or reply.error is not None:
                continue
            try:
                why = records.fields_of(reply.content).get("budget-exceeded")
            except (PayloadError, ValueError, TypeError, KeyError):
                continue
            if why is not None:
                over[k] = str(why)
        if not over:
            return
        save_checkpoint(self.checkpoint_dir, self.state_dict())
        log.error("round %d: clients %s would exceed their privacy budget; the run stops", r, sorted(over))
        raise BudgetExceededError("; ".join(over[k] for k in sorted(over)))

    def _finish(self, owed: dict[str, Any], replies: Mapping[int, Reply], eval_start: float) -> dict[str, Any]:
        """Round ``owed["round"]``'s metrics row from the nodes' evaluation replies; then its checkpoint."""
        r, fed = owed["round"], self.config.federation
        evaluation, privacy = self.evaluation(r, replies)
        row = metrics_row(
            r, evaluation, owed["train_losses"], sampled=owed["sampled"], dropped=owed["dropped"],
            rejected=owed["rejected"], up=owed["up"], down=owed["down"], up_total=owed["up_total"],
            down_total=owed["down_total"], server_metrics=owed["server_metrics"], privacy=privacy_metrics(privacy),
            round_seconds=owed["round_seconds"], eval_seconds=time.perf_counter() - eval_start,
            elapsed_seconds=owed["elapsed"],
        )
        row["clients_lost"] = owed["lost"]
        self.privacy = privacy
        self.history.append(row)
        self.on_round(row)
        if r == fed.rounds or (fed.checkpoint_every and r % fed.checkpoint_every == 0):
            save_checkpoint(self.checkpoint_dir, self.state_dict())
        return row

    def on_round(self, row: dict[str, Any]) -> None:
        """Called with each new metrics row (the app writes metrics.jsonl here)."""

    @torch.no_grad()
    def evaluation(self, r: int, replies: Mapping[int, Reply]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Global metrics on the server's test set (the server state after round ``r``); personalised
        metrics and privacy spent from the nodes' replies, in client order."""
        algo = self.algorithm
        out: dict[str, Any] = {"global_acc": None}
        global_metrics = algo.evaluate_global(self.server_state, self.test_x, self.test_y)
        if global_metrics:
            out.update(global_metrics)
            for name, index in self.test_groups.items():
                out[f"global_acc@{name}"] = algo.evaluate_global(
                    self.server_state, self.test_x[index], self.test_y[index]).get("global_acc")
        per_client = []
        for k in sorted(replies):
            reply = replies[k]
            if reply.error is not None:
                log.warning("round %d: client %d could not evaluate: %s", r, k, reply.error)
                continue
            try:
                fields = records.fields_of(reply.content)
                if int(fields.get("evaluated-round", -1)) != r:
                    continue
                metrics = reply.content.metric_records.get("metrics", {})
                client = ({key: float(metrics[key]) for key in fields.get("metric-keys", [])}
                          if fields.get("evaluated") else None)
                report = json.loads(fields.get("privacy", "null"))
                if report is not None:
                    _check_report(report)
            except (ValueError, TypeError, KeyError) as exc:  # a malformed protocol field: not used
                self._reject(r, k, f"evaluation: malformed reply field: {type(exc).__name__}: {exc}")
                continue
            if client is not None:
                per_client.append(client)
            if report is not None:
                self.reports[k] = report
        out.update(summarize_client_metrics(per_client))
        out["clients_evaluated"] = len(per_client)
        return out, merge_privacy_reports([self.reports[k] for k in sorted(self.reports)])
