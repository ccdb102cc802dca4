"""protofl on Flower: a SuperLink and three SuperNodes as processes on loopback, against the in-process engine.

The runs start in one module fixture and go on side by side (Flower starts a process for every message,
and much of a round is waiting, so the runs overlap on two cores); four of them share one federation (one
SuperLink and its three SuperNodes serve their runs at once); each test checks one of them. The
server's logic is also checked without Flower's processes, over an in-process stand-in for its Grid
(faults, malformed replies, a server restart), which takes seconds.
"""

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import protofl  # noqa: E402
from protofl.api import resolve_config  # noqa: E402
from protofl.flower import Federation, run_on_flower  # noqa: E402
from protofl.flower.launcher import prepare_run, submit, wait_done, write_app  # noqa: E402
from protofl.records import TIMING_KEYS, read_metrics  # noqa: E402

#: Flower and in-process runs take the same steps with the same seeds, so they agree to float rounding;
#: the stated tolerance leaves room for a different thread count in another process.
TOLERANCE = 1e-6

BASE = {
    "seed": 3,
    "data": {"dataset": "optdigits", "max_train_samples": 900},
    "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
    "federation": {"rounds": 3, "progress": False},
    "model": {"feature_dim": 32},
    "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32, "local_epochs": 1},
}
VPP = {**BASE, "privacy": {"mechanism": "vpp", "epsilon": 8.0}}
#: What a private Flower run needs to be compared with the in-process engine: the nodes draw from the run
#: seed (by default on Flower they draw from a secret of their own) and send their training loss and
#: personalised metrics (by default they keep them).
COMPARABLE = {"noise": "seeded", "share_diagnostics": True}
VPP_COMPARABLE = {**BASE, "privacy": {**VPP["privacy"], **COMPARABLE}}
#: The fixture's deployments and simulation compare two rounds with the in-process engine: round 1, round 2
#: (its training messages carry round 1's evaluation) and round 2's evaluation, a message of its own, so
#: every kind of exchange. The run with a killed node takes three.
TWO_ROUNDS = {"rounds": 2, "progress": False}
DEPLOYED = {**BASE, "federation": TWO_ROUNDS}
DEPLOYED_VPP = {**VPP_COMPARABLE, "federation": TWO_ROUNDS}


def _deploy_on(federation, config, out, results, name, recording=False):
    """A run submitted to a running ``federation``; ``recording``: its server keeps a copy of every reply
    (:data:`RECORDING_SERVER_APP`). ``results[name]``: its summary and where the nodes keep its state."""
    import tomllib

    import tomli_w

    from protofl.records import read_summary

    try:
        config = resolve_config(config)
        settings = prepare_run(config, out, round_timeout=300, node_wait=120)
        app = write_app(federation.workdir / f"app-{name}", config, settings, "flower-deployment")
        if recording:
            (app / "recording_server.py").write_text(RECORDING_SERVER_APP)
            project = tomllib.loads((app / "pyproject.toml").read_text())
            project["tool"]["flwr"]["app"]["components"]["serverapp"] = "recording_server:app"
            (app / "pyproject.toml").write_text(tomli_w.dumps(project))
        submit(federation, app)
        wait_done(out, federation, timeout=600)
        results[name] = (read_summary(out), federation.state_dir / settings.run_key)
    except BaseException as exc:  # reported by the test that needs it
        results[name] = exc


def _run_simulation(config, out, workdir, results):
    try:
        results["simulation"] = run_on_flower(
            config, out, mode="simulation", workdir=workdir, round_timeout=300, node_wait=120, timeout=600
        )
    except BaseException as exc:
        results["simulation"] = exc


def _run_with_a_killed_node(config, out, workdir, results):
    """Deployment where SuperNode 2 is SIGKILLed once round 1's row is written (round 2's training, which
    carried round 1's evaluation, is done) and restarted straight away: round 3's message to it is lost."""
    try:
        config = resolve_config(config)
        settings = prepare_run(config, out, min_replies=2, round_timeout=40, node_wait=120)
        with Federation(3, workdir) as federation:
            submit(federation, write_app(workdir / "app", config, settings, "flower-deployment"))
            metrics = Path(out) / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 1):
                if (Path(out) / "flower-done.json").exists():
                    raise RuntimeError("the run ended before a node could be killed")
                threading.Event().wait(0.1)
            federation.kill_node(2)
            results["killed_after_rows"] = len(metrics.read_text().splitlines())
            federation.start_node(2)
            wait_done(out, federation, timeout=600)
        results["killed"] = json.loads((Path(out) / "summary.json").read_text())
        results["killed_state"] = federation.state_dir / settings.run_key / "partition-2.pt"
    except BaseException as exc:
        results["killed"] = exc


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tmp_path_factory.mktemp("flower")
    results = {}
    (root / "w-shared").mkdir()
    with Federation(3, root / "w-shared") as shared:
        jobs = [
            threading.Thread(target=_deploy_on, args=(shared, DEPLOYED, root / "plain", results, "plain")),
            threading.Thread(target=_deploy_on, args=(shared, DEPLOYED_VPP, root / "vpp", results, "vpp")),
            # the server's replay of the nodes' noise: secret (Flower's default) and seeded
            threading.Thread(target=_deploy_on, args=(shared, _igpp(), root / "secret", results, "secret", True)),
            threading.Thread(
                target=_deploy_on, args=(shared, _igpp(noise="seeded"), root / "seeded", results, "seeded", True)
            ),
            threading.Thread(target=_run_with_a_killed_node, args=(BASE, root / "killed", root / "w-killed", results)),
            threading.Thread(target=_run_simulation, args=(DEPLOYED, root / "simulation", root / "w-sim", results)),
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
    return root, results


def _result(results, name):
    value = results[name]
    if isinstance(value, BaseException):
        raise value
    return value


def _assert_close(flower_rows, local_rows, rounds=(1, 2, 3)):
    assert [r["round"] for r in flower_rows] == [r["round"] for r in local_rows] == list(rounds)
    for f, l in zip(flower_rows, local_rows):
        for key, value in l.items():
            if key in TIMING_KEYS:
                continue
            assert key in f, key
            if isinstance(value, float) and not math.isnan(value):
                assert f[key] == pytest.approx(value, abs=TOLERANCE), (f["round"], key)
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                assert f[key] is None or math.isnan(f[key]), key
            else:
                assert f[key] == value, (f["round"], key)
        assert f["clients_lost"] == 0


@pytest.mark.slow  # SuperLink and SuperNode processes (minutes)
@pytest.mark.parametrize("name,config", [("plain", DEPLOYED), ("vpp", DEPLOYED_VPP)])
def test_flower_deployment_matches_the_in_process_engine(flower_runs, name, config):
    root, results = flower_runs
    summary, _ = _result(results, name)
    local = protofl.run(config)
    flower_rows = read_metrics(root / name / "metrics.jsonl")
    _assert_close(flower_rows, local.history, rounds=(1, 2))
    assert summary["engine"] == "flower-deployment"
    assert summary["incidents"] == []
    assert summary["bytes_up"] == local.summary["bytes_up"] and summary["bytes_down"] == local.summary["bytes_down"]
    assert summary["final"]["personal_acc_mean"] == pytest.approx(
        local.summary["final"]["personal_acc_mean"], abs=TOLERANCE
    )
    # it learns (chance is 0.1; 31 % after two rounds in process); with VPP under the valid trained-features
    # bound the noisy prototypes cost accuracy on 300 samples per client (about 25 %), so the floor is twice
    # chance there
    assert summary["final"]["personal_acc_mean"] > (0.2 if name == "vpp" else 0.25)
    if name == "vpp":
        # each client's accountant lived on its node; the server merged their reports
        assert summary["epsilon"] == pytest.approx(local.summary["epsilon"], rel=1e-9)
        assert 0 < summary["epsilon"] <= 8.0
        assert summary["privacy"]["max_releases_by_a_client"] == 2
        assert flower_rows[-1]["privacy_epsilon_max"] > flower_rows[0]["privacy_epsilon_max"] > 0
    else:
        assert summary["epsilon"] is None
    for file in ["config.toml", "summary.json", "metrics.jsonl", "report.md", "checkpoint/state.pt"]:
        assert (root / name / file).exists(), file


@pytest.mark.slow  # SuperLink and SuperNode processes (minutes)
def test_flower_simulation_runtime_matches_the_in_process_engine(flower_runs):
    root, results = flower_runs
    summary = _result(results, "simulation")
    _assert_close(read_metrics(root / "simulation" / "metrics.jsonl"), protofl.run(DEPLOYED).history, rounds=(1, 2))
    assert summary["engine"] == "flower-simulation"


@pytest.mark.slow  # SuperLink and SuperNode processes (minutes)
def test_protofl_report_compares_flower_and_in_process_runs(flower_runs, tmp_path):
    from protofl.report import compare_runs

    root, results = flower_runs
    _result(results, "plain")
    protofl.run(DEPLOYED, out=tmp_path / "in-process")
    table = compare_runs([root / "plain", tmp_path / "in-process"], tmp_path / "report").read_text()
    assert "plain" in table and "in-process" in table


@pytest.mark.slow  # SuperLink and SuperNode processes (minutes)
def test_a_killed_supernode_is_recorded_and_the_run_completes(flower_runs):
    root, results = flower_runs
    summary = _result(results, "killed")
    rows = read_metrics(root / "killed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    lost = [i for i in summary["incidents"] if i["kind"] == "lost"]
    assert lost and all(i["partition"] == 2 for i in lost), summary["incidents"]
    assert "lost client 2" in (root / "killed" / "server.log").read_text()
    assert {i["round"] for i in lost} <= {2, 3}
    assert sum(r["clients_lost"] for r in rows) >= 1
    # the restarted node rejoined with its saved state: it was evaluated after the last round, and what it
    # holds is the round it trained before it was killed (its process had none of it)
    assert rows[-1]["clients_evaluated"] == 3
    from protofl.flower.node import ClientStore

    store = ClientStore.load(results["killed_state"])
    assert 2 in store.committed, sorted(store.committed)
    assert np.isfinite(rows[-1]["personal_acc_mean"])


def test_a_malformed_reply_is_rejected_with_its_reason(tmp_path):
    """The server's checks, on Flower records: NaN, wrong shape, unknown class, wrong method."""
    from protofl.algorithms import Task
    from protofl.algorithms.fedproto import FedProto
    from protofl.config import ModelConfig
    from protofl.flower import records
    from protofl.payload import Payload, PayloadError, validate

    algo = FedProto(FedProto.Config(), Task((8,), 3, ModelConfig(feature_dim=4, hidden_dim=6)))
    good = Payload(
        {"classes": np.array([0, 2]), "prototypes": np.ones((2, 4), np.float32), "counts": np.array([3, 5])},
        {"method": "fedproto"},
    )
    spec = algo.reply_spec()
    validate(records.payload_of(records.to_record_dict(good, round=1)), spec)
    bad = {
        "NaN": Payload({**good.arrays, "prototypes": np.full((2, 4), np.nan, np.float32)}, good.metadata),
        "shape": Payload({**good.arrays, "prototypes": np.ones((2, 3), np.float32)}, good.metadata),
        "class ids": Payload({**good.arrays, "classes": np.array([0, 3])}, good.metadata),
        "method": Payload(good.arrays, {"method": "fedavg"}),
    }
    for reason, payload in bad.items():
        with pytest.raises(PayloadError, match=reason):
            validate(records.payload_of(records.to_record_dict(payload, round=1)), spec)


# -- the server's logic over an in-process grid: fast checks of faults, restarts and rejection -------------


class LoopbackGrid:
    """A stand-in for Flower's Grid that hands each message to protofl's ClientApp handlers in this process
    (real Flower messages, records and contexts; no SuperLink). ``silent`` nodes never answer;
    ``tamper(node_id, reply)`` may replace a reply; ``crash_at`` raises when a round's training starts."""

    def __init__(self, run_config, num_nodes, tamper=None, crash_at=None):
        from flwr.app import Context, RecordDict

        from protofl.flower import client_app

        self.handlers = {"train": client_app.train, "evaluate": client_app.evaluate, "query": client_app.query}
        self.contexts = {
            100 + k: Context(1, 100 + k, {"partition-id": k, "num-partitions": num_nodes}, RecordDict(), run_config)
            for k in range(num_nodes)
        }
        self.tamper, self.crash_at = tamper, crash_at
        self.silent: set[int] = set()
        self.replies = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            meta = msg.metadata
            if meta.message_type == "train" and self.crash_at is not None and meta.group_id == str(self.crash_at):
                raise ServerCrash(f"server crashed at round {self.crash_at}")
            meta.__dict__["_message_id"] = msg.object_id
            if meta.dst_node_id not in self.silent:
                reply = self.handlers[meta.message_type](msg, self.contexts[meta.dst_node_id])
                if self.tamper is not None:
                    reply = self.tamper(meta.dst_node_id, reply)
                self.replies[meta.message_id] = reply
            ids.append(meta.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


class ServerCrash(RuntimeError):
    pass


class ErrorReplyingGrid(LoopbackGrid):
    """As Flower's runtime does, an exception in a ClientApp handler comes back as an error reply."""

    def push_messages(self, messages):
        from flwr.app import Error, Message

        handlers = self.handlers

        def guarded(handler):
            def call(msg, context):
                try:
                    return handler(msg, context)
                except Exception as exc:  # noqa: BLE001 - what Flower's runtime does with it
                    return Message(error=Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

            return call

        self.handlers = {k: guarded(h) for k, h in handlers.items()}
        try:
            return super().push_messages(messages)
        finally:
            self.handlers = handlers


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower's messages take the run and node id of the process's task (set by Flower's runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _loopback_run(config, out, grid_args=(), state_dir="", resume=False, run_key="k1", grid_class=None, **settings):
    from protofl.flower.server_app import run_server
    from protofl.flower.settings import CONFIG_KEY, FlowerSettings

    config = resolve_config(config)
    flower = FlowerSettings(
        out=str(out),
        run_key=run_key,
        client_state_dir=str(state_dir),
        resume=resume,
        **{"round_timeout": 2.0, "node_wait": 2.0, **settings},
    )
    grid = (grid_class or LoopbackGrid)(
        {CONFIG_KEY: config.to_toml(), **flower.to_run_config()}, config.partition.num_clients, *grid_args
    )
    return grid, run_server(grid, config, flower, "flower-loopback")


SMALL = {
    **BASE,
    "data": {"dataset": "optdigits", "max_train_samples": 600},
    "federation": {"rounds": 4, "progress": False, "client_fraction": 0.67, "checkpoint_every": 2},
}


def test_server_logic_matches_the_in_process_engine_under_partial_participation(tmp_path):
    _, summary = _loopback_run(SMALL, tmp_path / "f")
    local = protofl.run(SMALL)
    _assert_close(read_metrics(tmp_path / "f" / "metrics.jsonl"), local.history, rounds=[1, 2, 3, 4])
    assert summary["bytes_up"] == local.summary["bytes_up"]


@pytest.mark.parametrize("fault", ["nan", "shape", "class", "method"])
def test_a_node_with_a_malformed_payload_is_rejected_and_the_round_goes_on(tmp_path, caplog, fault):
    from protofl.flower import records
    from protofl.payload import Payload

    def tamper(node_id, reply):
        fields = records.fields_of(reply.content)
        if node_id != 101 or "metadata" not in fields:
            return reply
        payload = records.payload_of(reply.content)
        arrays, meta = dict(payload.arrays), dict(payload.metadata)
        if fault == "nan":
            arrays["prototypes"] = np.full_like(arrays["prototypes"], np.nan)
        elif fault == "shape":
            arrays["prototypes"] = arrays["prototypes"][:, :2].copy()
        elif fault == "class":
            arrays["classes"] = arrays["classes"] + 10
        else:
            meta["method"] = "fedavg"
        extra = {k: v for k, v in fields.items() if k != "metadata"}
        content = records.to_record_dict(Payload(arrays, meta), **extra)
        for name, record in reply.content.metric_records.items():  # the evaluation it carries
            content[name] = record
        reply.content = content
        return reply

    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    with caplog.at_level("WARNING", logger="protofl.flower"):
        _, summary = _loopback_run(config, tmp_path / "f", (tamper,))
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert [r["clients_rejected"] for r in rows] == [1, 1]
    assert "rejected the reply of client 1" in caplog.text
    reasons = {"nan": "NaN", "shape": "shape", "class": "class ids", "method": "method"}
    rejected = [i for i in summary["incidents"] if i["kind"] == "rejected"]
    assert [i["partition"] for i in rejected] == [1, 1]
    assert all(reasons[fault] in i["reason"] for i in rejected), rejected
    assert rows[-1]["clients_evaluated"] == 3 and np.isfinite(rows[-1]["personal_acc_mean"])


def test_a_silent_node_is_lost_and_the_round_goes_on_with_min_replies(tmp_path, caplog):
    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }

    class Silencing(LoopbackGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
                self.silent.add(102)
            return super().push_messages(messages)

    with caplog.at_level("WARNING", logger="protofl.flower"):
        _, summary = _loopback_run(config, tmp_path / "f", grid_class=Silencing, min_replies=2, round_timeout=0.5)
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert [r["clients_lost"] for r in rows] == [0, 1]
    assert "lost client 2 (node 102)" in caplog.text
    assert "lost client 2 (node 102)" in (tmp_path / "f" / "server.log").read_text()
    assert rows[1]["clients_evaluated"] == 2
    assert {(i["round"], i["partition"], i["node_id"]) for i in summary["incidents"]} == {(2, 2, 102)}


def test_a_restarted_server_continues_from_its_checkpoint(tmp_path):
    """The server dies at the start of round 4 (its last checkpoint is round 2's; the nodes have trained
    round 3 already); a new server resumes, repeats round 3 and ends as the uninterrupted run."""
    state = tmp_path / "node-state"
    _, whole = _loopback_run(SMALL, tmp_path / "whole", state_dir=state, run_key="whole")
    with pytest.raises(ServerCrash):
        _loopback_run(SMALL, tmp_path / "cut", (None, 4), state_dir=state, run_key="cut")
    # round 3 ran, but its row waits for its evaluation, which rides on round 4's messages
    assert [r["round"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]
    # a new server (and fresh Flower contexts: the nodes' state comes back from their disks)
    _, resumed = _loopback_run(SMALL, tmp_path / "cut", state_dir=state, run_key="cut", resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "whole" / "metrics.jsonl")
    )
    assert resumed["final"] == whole["final"]


def test_without_flower_installed_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    import sys

    from protofl.cli import main
    from protofl.flower import FlowerMissingError, require_flwr

    monkeypatch.setitem(sys.modules, "flwr", None)  # as if flwr were not installed
    with pytest.raises(FlowerMissingError, match=r"pip install 'protofl\[flower\]'"):
        require_flwr()
    assert main(["flower", "run", "--set", "data.dataset=optdigits", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()  # nothing written


def test_protofl_flower_app_writes_an_app_that_flower_accepts(tmp_path):
    import tomllib

    from flwr.cli.config_utils import load_and_validate

    from protofl.cli import main
    from protofl.flower.settings import CONFIG_KEY, FlowerSettings, run_config_of

    out, app = tmp_path / "run", tmp_path / "app"
    assert (
        main(
            [
                "flower",
                "app",
                "--set",
                "data.dataset=optdigits",
                "--set",
                "method.name=fedproto",
                "--set",
                "privacy.mechanism=vpp",
                "--out",
                str(out),
                "--app-dir",
                str(app),
                "--min-replies",
                "2",
                "--round-timeout",
                "30",
            ]
        )
        == 0
    )
    flower_config, _warnings = load_and_validate(app / "pyproject.toml")  # raises on what Flower refuses
    assert flower_config["tool"]["flwr"]["app"]["components"]["clientapp"] == "protofl.flower.client_app:app"
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = FlowerSettings.from_run_config(run_config)
    assert settings.min_replies == 2 and settings.round_timeout == 30.0 and settings.out == str(out.resolve())
    assert run_config_of(run_config).privacy.mechanism == "vpp"
    assert json.loads((out / "flower.json").read_text())["run_key"] == settings.run_key
    # resuming keeps the run key (the nodes' state is filed under it); a used folder is not started again
    assert main(["flower", "app", "--resume", "--out", str(out), "--app-dir", str(tmp_path / "app2")]) == 0
    again = tomllib.loads((tmp_path / "app2" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert again["run-key"] == settings.run_key and again["resume"] is True
    assert CONFIG_KEY in again


# -- a node's state and privacy ledger ----------------------------------------------------------------------


def _vpp_node(partition=0):
    from protofl.flower.node import node_task

    config = resolve_config(
        {
            **VPP,
            "data": {"dataset": "optdigits", "max_train_samples": 600},
            "federation": {"rounds": 10, "progress": False},
        }
    )
    task = node_task(config.to_toml(), partition, config.partition.num_clients)
    broadcast = task.algorithm.broadcast(task.algorithm.init_server_state(config.seed))
    return task, broadcast


def test_a_resumed_server_never_rolls_back_a_nodes_privacy_ledger():
    """Rounds 1-4 committed, round 5 trained and then dropped (the server restarted from round 4's checkpoint):
    the repeated round 5 is a new release and its ledger counts all six; a round older than the states a node
    keeps is refused, not started from a fresh model with an empty ledger."""
    from protofl.flower.node import ClientStore, StateLostError
    from protofl.privacy.vpdr import LEDGER_KEY

    task, broadcast = _vpp_node()
    store = ClientStore()
    for r in range(1, 5):
        store.train(task, r, broadcast)
        store.decide(task, {r: True})
    store.train(task, 5, broadcast)
    store = ClientStore.from_bytes(store.to_bytes())  # the ledger high-water is kept on disk
    store.decide(task, {3: True, 4: True})  # the server has no record of round 5: dropped
    assert store.pending is None
    store.train(task, 5, broadcast)
    assert [count for _event, count in store.pending[LEDGER_KEY]] == [6, 6]  # six releases of two events each
    store.decide(task, {5: True})
    with pytest.raises(StateLostError, match="none from before round 2"):
        store.train(task, 2, broadcast)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="cannot resume: .* holds no checkpoint"):
        _loopback_run(SMALL, tmp_path / "f", resume=True)


def test_a_node_that_lost_its_state_refuses_to_start_over(tmp_path):
    """A SuperNode restarted without its state-dir (Flower's context.state is gone too) must not train again
    from a fresh model with an empty privacy ledger."""
    from flwr.app import RecordDict

    from protofl.flower.node import StateLostError

    class Forgetting(LoopbackGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
                self.contexts[102].state = RecordDict()  # restarted, with no state-dir
            return super().push_messages(messages)

    config = {
        **VPP,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    with pytest.raises(StateLostError, match="restart the SuperNode with its state-dir"):
        _loopback_run(config, tmp_path / "f", grid_class=Forgetting)


def test_a_node_over_its_budget_stops_the_run_as_in_process(tmp_path, monkeypatch):
    """Client 1's budget allows one release: the in-process engine stops before round 2; so does the server,
    with round 1's row and a checkpoint written, and `protofl flower run` exits with the budget's code."""
    from protofl.algorithms import get_algorithm
    from protofl.flower.launcher import wait_done
    from protofl.flower.server_app import _write_done
    from protofl.privacy import BudgetExceededError
    from protofl.privacy.vpdr import LEDGER_KEY

    algorithm = get_algorithm("fedproto")
    original = algorithm.check_release

    def check_release(self, state, client_id):
        if client_id == 1 and state.get(LEDGER_KEY):
            raise BudgetExceededError("client 1 would exceed epsilon")
        return original(self, state, client_id)

    monkeypatch.setattr(algorithm, "check_release", check_release)
    config = {
        **VPP,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 3, "progress": False},
    }
    with pytest.raises(BudgetExceededError, match="client 1 would exceed"):
        protofl.run(config)
    with pytest.raises(BudgetExceededError, match="client 1 would exceed"):
        _loopback_run(config, tmp_path / "f", grid_class=ErrorReplyingGrid)
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1]
    # clients 0 and 2 released round 2 before the server learnt that client 1 refused: the summary's spend
    # is the nodes' actual spend (two releases), not the spend before the round (one)
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["status"] == "stopped: budget"
    assert summary["privacy"]["max_releases_by_a_client"] == 2
    assert summary["epsilon"] > rows[0]["privacy_epsilon_max"]
    from protofl.engine.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "f" / "checkpoint")["round"] == 1
    _write_done(tmp_path / "f", "BudgetExceededError: client 1 would exceed epsilon", "BudgetExceededError")
    with pytest.raises(BudgetExceededError, match="client 1 would exceed"):  # what the CLI maps to exit code 3
        wait_done(tmp_path / "f", timeout=1)


@pytest.mark.parametrize("fault", ["rejected", "missing"])
def test_fewer_accepted_replies_than_min_replies_stop_the_run(tmp_path, fault):
    """Round 2: two of three replies rejected (min_replies=2); or, from round 3, one node gone (min_replies=3)."""
    from protofl.flower import records
    from protofl.flower.transport import NotEnoughReplies

    def tamper(node_id, reply):
        fields = reply.content.config_records.get(records.FIELDS) if not reply.has_error() else None
        if fields is not None and "metadata" in fields and fields["round"] == 2 and node_id in (101, 102):
            fields["round"] = 99  # a reply for another round: rejected
        return reply

    class Shrinking(LoopbackGrid):
        def get_node_ids(self):
            two = any(k.startswith("2") for k in getattr(self, "seen", ()))
            return [n for n in self.contexts if not (two and n == 102)]

        def push_messages(self, messages):
            messages = list(messages)
            self.seen = getattr(self, "seen", set()) | {
                m.metadata.group_id for m in messages if m.metadata.message_type == "train"
            }
            return super().push_messages(messages)

    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 3, "progress": False},
    }
    if fault == "rejected":
        run = lambda: _loopback_run(config, tmp_path / "f", (tamper,), min_replies=2)  # noqa: E731
    else:
        run = lambda: _loopback_run(config, tmp_path / "f", grid_class=Shrinking, min_replies=3)  # noqa: E731
    stop = 2 if fault == "rejected" else 3
    with pytest.raises(NotEnoughReplies, match=f"round {stop}: . accepted replies"):
        run()
    assert [r["round"] for r in read_metrics(tmp_path / "f" / "metrics.jsonl")] == list(range(1, stop))


@pytest.mark.parametrize("field,value", [("partition-id", "one"), ("train-loss", "low"), ("privacy", "{not json")])
def test_a_malformed_reply_field_is_rejected_not_a_crash(tmp_path, caplog, field, value):
    from protofl.flower import records

    def tamper(node_id, reply):
        fields = reply.content.config_records.get(records.FIELDS) if not reply.has_error() else None
        if node_id == 101 and fields is not None and field in fields and "round" in fields:  # not the query
            fields[field] = value
        return reply

    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    with caplog.at_level("WARNING", logger="protofl.flower"):
        _, summary = _loopback_run(config, tmp_path / "f", (tamper,))
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    rejected = [i for i in summary["incidents"] if i["kind"] == "rejected"]
    assert rejected and all(i["partition"] == 1 and "malformed reply field" in i["reason"] for i in rejected)
    if field == "privacy":  # only its evaluations are refused
        assert [r["clients_evaluated"] for r in rows] == [2, 2]
        assert all(i["reason"].startswith("evaluation:") for i in rejected)
    else:
        assert [r["clients_rejected"] for r in rows] == [1, 1]
    assert "malformed reply field" in caplog.text


def test_the_final_epsilon_counts_every_partition_not_only_those_at_the_last_evaluation(tmp_path):
    """Node 102 reports a large spend after round 1 (rewritten here) and stays silent at the final
    evaluation: its last report still counts in the final ε (the max over all partitions)."""
    from protofl.flower import records

    def tamper(node_id, reply):
        fields = reply.content.config_records.get(records.FIELDS) if not reply.has_error() else None
        if node_id == 102 and fields is not None and fields.get("evaluated-round") == 1:
            report = json.loads(fields["privacy"])
            report.update({k: 1234.0 for k in report if k.startswith("epsilon_") and k.endswith("_max")})
            fields["privacy"] = json.dumps(report)
        return reply

    class SilentAtTheEnd(LoopbackGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == "evaluate" and m.metadata.group_id == "2" for m in messages):
                self.silent.add(102)
            return super().push_messages(messages)

    config = {
        **VPP,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    _, summary = _loopback_run(config, tmp_path / "f", (tamper,), grid_class=SilentAtTheEnd, round_timeout=0.5)
    silent = [(i["round"], i["partition"]) for i in summary["incidents"] if i["reason"].startswith("evaluation:")]
    assert silent == [(2, 2)]
    assert summary["epsilon"] == 1234.0


def test_the_nodes_per_client_records_match_the_in_process_ones(tmp_path):
    """The grid transport builds each row's per-client records from the nodes' evaluation replies: the same
    clients, statuses, data, bytes and personalised metrics as the in-process transport's."""
    import torch

    from protofl.engine import RoundDriver, Simulation
    from protofl.flower.settings import CONFIG_KEY, FlowerSettings
    from protofl.flower.transport import GridTransport
    from protofl.runner import build_algorithm, prepare_data

    config = resolve_config(
        {
            **VPP_COMPARABLE,
            "data": {"dataset": "optdigits", "max_train_samples": 600},
            "federation": {"rounds": 2, "progress": False, "client_fraction": 0.67},
        }
    )
    rows = {}
    for name in ("flower", "local"):
        torch.manual_seed(config.seed)
        data = prepare_data(config)
        algo = build_algorithm(config, data)
        rows[name] = []
        if name == "local":
            driver = Simulation(
                algo, data.clients, data.test_x, data.test_y, config.federation, config.seed, on_round=rows[name].append
            )
        else:
            flower = FlowerSettings(out=str(tmp_path / "f"), run_key="k", round_timeout=2.0, node_wait=2.0)
            grid = LoopbackGrid({CONFIG_KEY: config.to_toml(), **flower.to_run_config()}, 3)
            driver = RoundDriver(
                algo,
                GridTransport(grid, algo, 3, flower, "loopback"),
                config.federation,
                config.seed,
                test_x=data.test_x,
                test_y=data.test_y,
                on_round=rows[name].append,
            )
        driver.run()
    assert [r["round"] for r in rows["flower"]] == [r["round"] for r in rows["local"]] == [1, 2]
    for f, l in zip(rows["flower"], rows["local"]):
        assert [c["status"] for c in f["clients"]] == [c["status"] for c in l["clients"]]
        assert "not-sampled" in [c["status"] for c in f["clients"]]
        for fc, lc in zip(f["clients"], l["clients"]):
            for key in ("client", "samples", "classes", "bytes_up", "bytes_down"):
                assert fc[key] == lc[key], (f["round"], key)
            assert fc["personal_acc"] == pytest.approx(lc["personal_acc"], abs=TOLERANCE)
            if lc["epsilon"] is None:
                assert fc["epsilon"] is None
            else:
                assert fc["epsilon"] == pytest.approx(lc["epsilon"], rel=1e-6)


def test_a_method_added_as_one_file_runs_private_on_flower_as_in_process(tmp_path):
    """FedGH lives in one file (algorithms/fedgh.py) and touches neither the engine, the Flower package nor
    the privacy layer: under igpp its Flower run (the grid transport, nodes' client steps, their ledgers)
    equals the in-process run, and both spend at most the budget."""
    config = {
        **SMALL,
        "method": {"name": "fedgh", "lr": 0.1, "batch_size": 32, "server_epochs": 5},
        "privacy": {"mechanism": "igpp", "epsilon": 8.0, "accountant": "rdp", **COMPARABLE},
    }
    _, summary = _loopback_run(config, tmp_path / "f")
    local = protofl.run(config)
    _assert_close(read_metrics(tmp_path / "f" / "metrics.jsonl"), local.history, rounds=[1, 2, 3, 4])
    assert summary["epsilon"] == pytest.approx(local.summary["epsilon"], rel=1e-9) and summary["epsilon"] <= 8.0


# -- secret noise and no side channels ----------------------------------------------------------------------

#: An igpp release (class means plus Gaussian noise, exact counts) whose noise a server may try to replay.
IGPP = {
    **BASE,
    "seed": 5,
    "data": {"dataset": "optdigits", "max_train_samples": 600},
    "federation": {"rounds": 1, "progress": False},
    "model": {"feature_dim": 16},
    "privacy": {"mechanism": "igpp", "epsilon": 8.0, "relation": "replace-one", "sensitivity": "trained-features"},
}
#: Reply fields that carry the clients' diagnostics (training loss, personalised metrics, data profile).
DIAGNOSTIC_FIELDS = {"train-loss", "metric-keys", "evaluated", "train-samples", "train-classes"}


def _igpp(**privacy):
    return {**IGPP, "privacy": {**IGPP["privacy"], **privacy}}


def _recorded_loopback_run(config, out, state_dir=""):
    """A loopback run whose every reply the test keeps: ``(grid, summary, replies)``, replies as
    ``[(partition, content)]`` in the order the server received them."""
    replies = []

    def record(node_id, reply):
        if not reply.has_error():
            replies.append((node_id - 100, reply.content))
        return reply

    grid, summary = _loopback_run(config, out, (record,), state_dir=state_dir)
    return grid, summary, replies


def _clean_of_node(grid, partition, round_index):
    """A node's clean prototypes of a round, from the state it keeps (the server never sees it)."""
    from _replay import clean_prototypes

    from protofl.flower import client_app
    from protofl.flower.node import ClientStore, node_task
    from protofl.flower.settings import CONFIG_KEY

    context = grid.contexts[100 + partition]
    store = ClientStore.from_bytes(context.state.config_records[client_app.STORE]["store"])
    config = resolve_config(__import__("tomllib").loads(context.run_config[CONFIG_KEY]))
    task = node_task(context.run_config[CONFIG_KEY], partition, config.partition.num_clients)
    return clean_prototypes(task.algorithm, store.committed[round_index], task.data, config.privacy.clip_bound), store


def _training_replies(replies):
    """``{partition: payload}`` of the training replies among ``[(partition, content)]``."""
    from protofl.flower import records

    return {k: records.payload_of(c) for k, c in replies if "metadata" in records.fields_of(c)}


def _replay_errors(config, replies, clean_of):
    """The server's replay of every training reply of round 1 (``{partition: reply}``) from what it knows
    (the run config, seed included, the round, the partition id and the reply): its error in noise
    scales, per partition."""
    from _replay import replay_error, replayed_prototypes

    from protofl.runner import build_algorithm, prepare_data

    config = resolve_config(config)
    algo = build_algorithm(config, prepare_data(config))  # the server's own copy of the method
    errors = {}
    for partition, reply in replies.items():
        recovered, std = replayed_prototypes(algo, config.seed, 1, partition, reply)
        errors[partition] = replay_error(recovered, clean_of(partition), std)
    assert sorted(errors) == [0, 1, 2]
    return errors


def test_on_flower_a_replay_from_the_seed_removes_seeded_noise_but_not_the_nodes_secret_noise(tmp_path):
    """By default a private Flower run's nodes draw from their own secret: the server, which knows the run
    seed, replays seeded noise exactly but not theirs."""
    errors = {}
    for noise in ("secret", "seeded"):
        config = _igpp() if noise == "secret" else _igpp(noise="seeded")  # secret: Flower's default
        grid, summary, replies = _recorded_loopback_run(config, tmp_path / noise)
        assert summary["privacy"]["noise_source"] == noise
        errors[noise] = _replay_errors(
            config, _training_replies(replies), lambda k, grid=grid: _clean_of_node(grid, k, 1)[0]
        )
        stores = [_clean_of_node(grid, k, 1)[1] for k in range(3)]
        if noise == "secret":
            assert all(s.secret is not None for s in stores) and len({s.secret for s in stores}) == 3
        else:
            assert all(s.secret is None for s in stores)
    assert max(errors["seeded"].values()) < 1e-4, errors
    assert min(errors["secret"].values()) >= 1.0, errors
    assert any("the server" in line and "replay" in line for line in _statement(tmp_path / "seeded")["not_covered"])


def _statement(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["privacy"]


def test_a_private_flower_runs_replies_carry_no_diagnostics_unless_shared(tmp_path):
    """Under a mechanism the nodes keep their training loss, personalised metrics and data profile; the
    server's rows, clients.csv and report say they are kept on the nodes. privacy.share_diagnostics sends
    them (and the privacy statement says ε does not cover them)."""
    from protofl.client_records import ClientTable

    config = {**_igpp(), "federation": {"rounds": 2, "progress": False}}
    _, summary, replies = _recorded_loopback_run(config, tmp_path / "kept", state_dir=tmp_path / "nodes")
    sent = {name for _, content in replies for name in content.config_records["protofl"]}
    assert sent and not sent & DIAGNOSTIC_FIELDS, sent & DIAGNOSTIC_FIELDS
    assert not any(content.metric_records for _, content in replies)
    assert "privacy" in sent  # the spend report the server merges: what the protocol needs
    rows = read_metrics(tmp_path / "kept" / "metrics.jsonl")
    assert [r["train_loss"] for r in rows] == [None, None]
    assert all("personal_acc_mean" not in r for r in rows)
    assert all(r["privacy_epsilon_max"] > 0 for r in rows)
    assert summary["diagnostics"] == "kept on the nodes" and summary["status"] == "completed"
    assert summary["final"]["personal_acc_mean"] is None
    clients = ClientTable(tmp_path / "kept" / "clients.csv").last_round()
    assert [c["status"] for c in clients] == ["ok"] * 3
    assert all(c["samples"] is None and c["classes"] is None and c["epsilon"] > 0 for c in clients)
    report = (tmp_path / "kept" / "report.md").read_text()
    assert "| final | 2 | — | kept on the nodes | kept on the nodes |" in report
    assert "nan" not in report.lower()
    assert summary["privacy"]["diagnostics"].startswith("kept on the nodes")
    assert not any("training loss" in line for line in summary["privacy"]["not_covered"])
    # each node keeps them: its training loss per round, its metrics and profile per evaluation
    for k in range(3):
        kept = tmp_path / "nodes" / "k1" / f"partition-{k}-diagnostics.jsonl"
        assert kept.stat().st_mode & 0o777 == 0o600
        entries = [json.loads(line) for line in kept.read_text().splitlines()]
        assert [e["round"] for e in entries if "round" in e] == [1, 2]
        assert all(np.isfinite(e["train_loss"]) for e in entries if "round" in e)
        evaluations = [e for e in entries if "evaluated_round" in e]
        assert [e["evaluated_round"] for e in evaluations] == [1, 2]
        assert all(e["samples"] > 0 and 0 <= e["personal_acc"] <= 1 for e in evaluations)

    _, shared, replies = _recorded_loopback_run(
        {**config, "privacy": {**config["privacy"], "share_diagnostics": True}}, tmp_path / "shared"
    )
    sent = {name for _, content in replies for name in content.config_records["protofl"]}
    assert DIAGNOSTIC_FIELDS <= sent
    rows = read_metrics(tmp_path / "shared" / "metrics.jsonl")
    assert all(np.isfinite(r["train_loss"]) and r["personal_acc_mean"] > 0 for r in rows)
    assert "diagnostics" not in shared
    assert any("training loss" in line for line in shared["privacy"]["not_covered"])


def test_an_in_process_resume_of_a_flower_run_folder_is_refused_in_one_line(tmp_path, capsys):
    from protofl.cli import main
    from protofl.errors import CheckpointError

    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    _loopback_run(config, tmp_path / "f")
    (tmp_path / "f" / "flower-done.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="written by a run on the flower engine.*protofl flower run --resume"):
        protofl.run(None, out=tmp_path / "f", resume=True)
    before = (tmp_path / "f" / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(tmp_path / "f")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flower engine" in err[0] and "Traceback" not in err[0]
    assert (tmp_path / "f" / "metrics.jsonl").read_text() == before  # nothing lost


#: A ServerApp that is protofl's, but keeps a copy of every reply the server receives: the field names of
#: each, and the arrays of each training reply (what the server knows, for the replay).
RECORDING_SERVER_APP = """
import json
from pathlib import Path

import numpy as np
from flwr.serverapp import ServerApp

from protofl.flower import records, server_app
from protofl.flower.settings import FlowerSettings, run_config_of

app = ServerApp()


class RecordingGrid:
    def __init__(self, grid, folder):
        self.grid, self.folder, self.count = grid, folder, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        messages = list(self.grid.pull_messages(message_ids))
        for msg in messages:
            if msg.has_error():
                continue
            fields = records.fields_of(msg.content)
            self.count += 1
            names = {"fields": sorted(fields), "metrics": sorted(msg.content.metric_records)}
            (self.folder / f"reply-{self.count}.json").write_text(json.dumps(names))
            if "metadata" in fields:
                arrays = records.payload_of(msg.content).arrays
                np.savez(self.folder / f"train-{fields['round']}-{fields['partition-id']}.npz", **arrays)
        return messages


@app.main()
def main(grid, context):
    settings = FlowerSettings.from_run_config(context.run_config)
    out = Path(settings.out)
    (out / "replies").mkdir(parents=True, exist_ok=True)
    try:
        server_app.run_server(
            RecordingGrid(grid, out / "replies"), run_config_of(context.run_config), settings, "flower-deployment"
        )
    except BaseException as exc:
        server_app._write_done(out, error=f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
        raise
    server_app._write_done(out, error=None)
"""


@pytest.mark.slow  # SuperLink and SuperNode processes (minutes)
def test_on_a_flower_deployment_the_server_cannot_replay_the_nodes_secret_noise(flower_runs):
    """Real SuperNodes: with Flower's default (secret) noise the server's replay from the run seed misses the
    clean prototypes by the noise scale; with explicitly seeded noise it recovers them. The nodes keep their
    secret with their state (mode 0600), and their replies carry no diagnostics."""
    from protofl.flower.node import ClientStore, node_task

    root, results = flower_runs
    configs = {"secret": _igpp(), "seeded": _igpp(noise="seeded")}
    errors = {}
    for noise, config in configs.items():
        _, state_dir = _result(results, noise)
        resolved = resolve_config(config)
        replies = {k: np.load(root / noise / "replies" / f"train-1-{k}.npz") for k in range(3)}
        stores = {k: ClientStore.load(state_dir / f"partition-{k}.pt") for k in range(3)}

        def clean_of(k, stores=stores, resolved=resolved):
            from _replay import clean_prototypes

            task = node_task(resolved.to_toml(), k, 3)
            return clean_prototypes(task.algorithm, stores[k].committed[1], task.data, resolved.privacy.clip_bound)

        errors[noise] = _replay_errors(config, replies, clean_of)
        for k in range(3):
            assert (state_dir / f"partition-{k}.pt").stat().st_mode & 0o777 == 0o600
            assert (stores[k].secret is not None) == (noise == "secret")
        sent = [json.loads(p.read_text()) for p in (root / noise / "replies").glob("reply-*.json")]
        assert sent and not any(set(r["fields"]) & DIAGNOSTIC_FIELDS or r["metrics"] for r in sent)
        for k in range(3):  # kept on the nodes instead
            assert "train_loss" in (state_dir / f"partition-{k}-diagnostics.jsonl").read_text()
        assert _statement(root / noise)["noise_source"] == noise
    assert max(errors["seeded"].values()) < 1e-4, errors
    assert min(errors["secret"].values()) >= 1.0, errors
