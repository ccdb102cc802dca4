"""The ClientApp: Flower's adapter around :mod:`protofl.flower.node`.

Messages (``message_type``): ``query`` (which partition this node holds), ``train`` (one client step of
a round) and ``evaluate`` (commit the server's decision, then personalised metrics and the privacy
spent). A node's partition comes from its node config (``partition-id``, ``num-partitions``; the
simulation runtime sets both); its state lives in Flower's ``context.state`` and, where the node config
names a ``state-dir`` (or the run config a ``client-state-dir``), on disk, so a restarted node or a
restarted server continues it.

Under a privacy mechanism a reply carries only the protected release and what the protocol needs (the
partition, the round, the node's spend report, a budget refusal): the training loss, the personalised
test metrics and the node's data profile (training samples, classes held) go to the node's own log
(logger ``protofl.flower``), unless the run sets ``privacy.share_diagnostics = true``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from protofl.flower._require import require_flwr

require_flwr()

from flwr.app import ConfigRecord, Context, Message, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from protofl.flower import protocol, records  # noqa: E402
from protofl.flower.settings import CONFIG_KEY, FlowerSettings  # noqa: E402

log = logging.getLogger("protofl.flower")

STORE = "protofl-store"

app = ClientApp()


def _partition(context: Context) -> int:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this node has no partition: start it with --node-config 'partition-id=K num-partitions=N'")
    return int(node["partition-id"])


def _task(context: Context):
    from protofl.flower.node import node_task  # torch and the algorithms: not needed to answer a query

    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this node has no partition: start it with --node-config 'partition-id=K num-partitions=N'")
    settings = FlowerSettings.from_run_config(context.run_config)
    state_dir = str(node.get("state-dir", settings.client_state_dir))
    cache = str(Path(state_dir).expanduser() / settings.run_key) if state_dir else ""
    return node_task(str(context.run_config[CONFIG_KEY]), int(node["partition-id"]), int(node["num-partitions"]), cache)


def _store(context: Context, task):
    from protofl.flower.node import ClientStore, store_path

    settings = FlowerSettings.from_run_config(context.run_config)
    path = store_path(
        str(context.node_config.get("state-dir", settings.client_state_dir)), settings.run_key, task.partition
    )
    kept = context.state.config_records.get(STORE)
    if kept is not None and kept.get("run-key") == settings.run_key:
        store = ClientStore.from_bytes(kept["store"])  # type: ignore[arg-type]
    else:
        store = ClientStore.load(path) or ClientStore()
        if store.has_state():
            log.info("%s: rejoined run %s with its saved state", task.who, settings.run_key)
    return store, path, settings.run_key


def _diagnostics_path(context: Context, task):
    from protofl.flower.node import diagnostics_path

    settings = FlowerSettings.from_run_config(context.run_config)
    state_dir = str(context.node_config.get("state-dir", settings.client_state_dir))
    return diagnostics_path(state_dir, settings.run_key, task.partition)


def _keep(context: Context, store, path, run_key: str) -> None:
    data = store.to_bytes()
    context.state[STORE] = ConfigRecord({"store": data, "run-key": run_key})
    store.save(path)


def _decide(store, task, fields: dict) -> None:
    from protofl.flower.node import StateLostError

    rounds = protocol.DECISION_ROUNDS.read(fields, [])
    accepted = protocol.DECISION_ACCEPTED.read(fields, [])
    decisions = dict(zip(rounds, accepted))
    replied = sorted(decisions)
    if replied and not store.has_any_state():
        # the server saw this partition reply before (accepted or not: a rejected reply was on the wire and
        # spent), but this node holds nothing of the run: starting from a fresh model would also start an
        # empty privacy ledger and release again on a reset budget
        raise StateLostError(
            f"{task.who}: the server decided on this partition's replies of rounds {replied}, but this node holds "
            "no state of the run: state and privacy ledger lost: restart the SuperNode with its "
            'state-dir (--node-config "... state-dir=DIR") holding the state it kept'
        )
    store.decide(task, decisions)


@app.query()
def query(msg: Message, context: Context) -> Message:
    import tomllib

    from protofl.config import ConfigError, PartitionConfig

    partition = _partition(context)
    wanted = (
        tomllib.loads(str(context.run_config[CONFIG_KEY]))
        .get("partition", {})
        .get("num_clients", PartitionConfig().num_clients)
    )
    if int(context.node_config["num-partitions"]) != wanted or not 0 <= partition < wanted:
        raise ConfigError(
            f"node config partition-id={partition} num-partitions={context.node_config['num-partitions']} "
            f"does not fit the run's partition.num_clients={wanted}"
        )
    return Message(records.to_record_dict(None, **protocol.pack({protocol.PARTITION_ID: partition})), reply_to=msg)


def _evaluation(store, task, r: int, received, privacy_all: bool, content, diagnostics) -> None:
    """Privacy spent after round ``r``, added to a reply's ``content``, with the personalised metrics and
    the node's data profile where the run shares them (else they are kept at ``diagnostics``)."""
    from protofl.engine.client import client_profile
    from protofl.flower.node import keep_diagnostics

    metrics = store.evaluate(task, r, received)
    report = store.privacy_report(task, r, privacy_all)
    profile = client_profile(task.data)
    fields = content.config_records[records.FIELDS]
    fields.update(protocol.pack({protocol.EVALUATED_ROUND: r, protocol.PRIVACY: report}))
    if not task.shares_diagnostics:
        keep_diagnostics(diagnostics, task, {"evaluated_round": r, **profile, **metrics})
        return
    fields.update(
        protocol.pack(
            {
                protocol.EVALUATED: bool(len(task.data.y_test)),
                protocol.METRIC_KEYS: list(metrics),
                protocol.TRAIN_SAMPLES: profile["samples"],
                protocol.TRAIN_CLASSES: profile["classes"],
            }
        )
    )
    content["metrics"] = MetricRecord({k: float(v) for k, v in metrics.items()})


def _open(msg: Message, context: Context):
    """What every message handler starts with: the node's task and store, the message's fields and
    round, and the server's last decisions committed."""
    task = _task(context)
    store, path, run_key = _store(context, task)
    fields = records.fields_of(msg.content)
    _decide(store, task, fields)
    return task, store, path, run_key, fields, protocol.ROUND.read(fields)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Commit the last decision; evaluate the round before (if asked); train round ``round``."""
    task, store, path, run_key, fields, r = _open(msg, context)
    received = records.payload_of(msg.content)
    evaluate_round = protocol.EVALUATE_ROUND.read(fields, None)
    if evaluate_round is not None:
        # evaluation first: it sees the state after the round before, which training replaces
        evaluated = records.to_record_dict(None)
        _evaluation(
            store,
            task,
            evaluate_round,
            received,
            protocol.PRIVACY_ALL.read(fields, False),
            evaluated,
            _diagnostics_path(context, task),
        )
    from protofl.flower.node import keep_diagnostics
    from protofl.privacy import BudgetExceededError

    try:
        reply, metrics = store.train(task, r, received)
    except BudgetExceededError as exc:
        # nothing released: the server is told why, and stops the run (as the in-process engine does)
        _keep(context, store, path, run_key)
        content = records.to_record_dict(
            None,
            **protocol.pack(
                {protocol.PARTITION_ID: task.partition, protocol.ROUND: r, protocol.BUDGET_EXCEEDED: str(exc)}
            ),
        )
    else:
        _keep(context, store, path, run_key)
        sent: dict[protocol.Field, Any] = {protocol.PARTITION_ID: task.partition, protocol.ROUND: r}
        if task.shares_diagnostics:
            sent[protocol.TRAIN_LOSS] = float(metrics.get("train_loss", float("nan")))
            shared = {k: float(metrics[k]) for k in task.algorithm.row_metrics() if k in metrics}
            if shared:
                sent[protocol.ROW_METRICS] = json.dumps(shared)
        else:
            keep_diagnostics(_diagnostics_path(context, task), task, {"round": r, **metrics})
        content = records.to_record_dict(reply, **protocol.pack(sent))
    if evaluate_round is not None:
        content.config_records[records.FIELDS].update(dict(evaluated.config_records[records.FIELDS]))
        if "metrics" in evaluated.metric_records:
            content["metrics"] = evaluated.metric_records["metrics"]
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Commit the last decision; personalised metrics and privacy spent after round ``round``."""
    task, store, path, run_key, fields, r = _open(msg, context)
    _keep(context, store, path, run_key)
    content = records.to_record_dict(None, **protocol.pack({protocol.PARTITION_ID: task.partition, protocol.ROUND: r}))
    _evaluation(
        store,
        task,
        r,
        records.payload_of(msg.content),
        protocol.PRIVACY_ALL.read(fields, False),
        content,
        _diagnostics_path(context, task),
    )
    return Message(content, reply_to=msg)
