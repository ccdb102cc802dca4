"""Flower at many nodes: the shared partition store, the derived round timeouts, a simulation of 200 nodes."""

import os
import threading

import numpy as np
import pytest
import torch
from _partition_store import CONFIG

from protofl.api import resolve_config
from protofl.config import ConfigError
from protofl.data.shared import PartitionStore, PartitionStoreError, data_key
from protofl.runner import prepare_data

# -- the shared partition store -------------------------------------------------------------------------


def test_a_store_gives_each_client_the_rows_the_data_pipeline_gives_it(tmp_path):
    config = resolve_config(CONFIG)
    data = prepare_data(config)
    store = PartitionStore(tmp_path / "partitions")
    key = data_key(config)
    store.publish(key, data.clients, data.input_shape, data.num_classes)
    for c in data.clients:
        rows = store.client(key, c.client_id)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert np.array_equal(getattr(rows, name), getattr(c, name).numpy()), (c.client_id, name)
            assert getattr(rows, name).dtype == getattr(c, name).numpy().dtype
        assert rows.input_shape == tuple(data.input_shape) and rows.num_classes == data.num_classes
    assert store.meta(key)["num_clients"] == 5
    # the arrays are read-only memory maps shared by the processes; a client's copy is its own
    rows = store.client(key, 0)
    rows.x_train[:] = -1
    assert not np.array_equal(store.client(key, 0).x_train, rows.x_train)
    # nothing left behind but the store (the temporary folder was renamed into place)
    assert sorted(p.name for p in store.root.iterdir()) == [key]


def test_the_key_names_the_data_not_the_method_or_the_schedule():
    config = resolve_config(CONFIG)
    same = resolve_config({**CONFIG, "federation": {"rounds": 7, "progress": False}, "method": {"name": "fedavg"}})
    assert data_key(same) == data_key(config)
    for changed in (
        {**CONFIG, "seed": 5},
        {**CONFIG, "partition": {**CONFIG["partition"], "alpha": 0.5}},
        {**CONFIG, "data": {**CONFIG["data"], "max_train_samples": 500}},
    ):
        assert data_key(resolve_config(changed)) != data_key(config), changed


def test_processes_of_one_machine_build_a_store_once(tmp_path):
    """Concurrent first readers: one builds (under the key's lock), the others wait and read it."""
    config = resolve_config(CONFIG)
    store = PartitionStore(tmp_path / "partitions")
    key = data_key(config)
    builds = []
    barrier = threading.Barrier(4)
    seen = {}

    def build():
        builds.append(1)
        return prepare_data(config)

    def node(k):
        barrier.wait()
        store.ensure(key, build)
        seen[k] = store.client(key, k).y_train

    threads = [threading.Thread(target=node, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    data = prepare_data(config)
    assert all(np.array_equal(seen[k], data.clients[k].y_train.numpy()) for k in range(4))


def test_a_damaged_store_is_named_in_one_line(tmp_path):
    config = resolve_config(CONFIG)
    data = prepare_data(config)
    store = PartitionStore(tmp_path / "partitions")
    key = "damaged"
    folder = store.publish(key, data.clients, data.input_shape, data.num_classes)
    (folder / "x_train.npy").write_bytes(b"not an array")
    with pytest.raises(PartitionStoreError) as info:
        store.client(key, 0)
    message = str(info.value)
    assert str(folder) in message and "delete the folder" in message and "\n" not in message
    with pytest.raises(PartitionStoreError, match="client 9 is not in the store's 5 clients"):
        store.publish("whole", data.clients, data.input_shape, data.num_classes)
        store.client("whole", 9)


def test_a_node_reads_its_partition_from_the_store_without_building_the_pool(tmp_path, monkeypatch):
    """Every node of a run on one machine after the first: its rows from the store, no dataset load."""
    import protofl.runner
    from protofl.flower import node

    monkeypatch.setenv("PROTOFL_CACHE", str(tmp_path / "cache"))
    config = resolve_config({**CONFIG, "seed": 6})
    text = config.to_toml()
    data = prepare_data(config)
    node.node_task.cache_clear()
    node._run_setup.cache_clear()
    first = node.node_task(text, 0, 5)
    assert PartitionStore.default().exists(data_key(config))

    def no_pool(*args, **kwargs):
        raise AssertionError("a node rebuilt the pool")

    monkeypatch.setattr(protofl.runner, "prepare_data", no_pool)
    node._run_setup.cache_clear()  # as a fresh process would
    for k in range(5):
        task = node.node_task(text, k, 5)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(task.data, name), getattr(data.clients[k], name)), (k, name)
    assert first.algorithm is not None
    with pytest.raises(ConfigError, match="num-partitions=4"):
        node.node_task(text, 0, 4)
    node.node_task.cache_clear()
    node._run_setup.cache_clear()


# -- round timeouts --------------------------------------------------------------------------------------


def test_derived_timeouts_follow_the_measured_exchanges():
    from protofl.flower.timeouts import MIN_DERIVED_TIMEOUT, RoundTimeouts

    fixed = RoundTimeouts(round_timeout=45.0, node_wait=120.0, timeout_factor=3.0)
    fixed.measured(100.0, 10)
    assert fixed.limit(10) == 45.0 and not fixed.wait(10).rolling

    derived = RoundTimeouts(round_timeout=0.0, node_wait=120.0, timeout_factor=3.0)
    assert derived.limit(10) is None
    first = derived.wait(10)
    assert first.rolling and first.limit == 120.0  # waits while replies keep coming
    derived.measured(20.0, 10)  # 2 s a message
    assert derived.limit(10) == 60.0  # 3 x the slowest exchange
    assert derived.limit(100) == 600.0  # 3 x 100 messages at 2 s: an exchange with more messages waits longer
    derived.measured(5.0, 1000)
    assert derived.limit(10) == 60.0  # the slowest so far still rules
    quick = RoundTimeouts(round_timeout=0.0, node_wait=120.0, timeout_factor=2.0)
    quick.measured(0.1, 3)
    assert quick.limit(3) == MIN_DERIVED_TIMEOUT


def test_a_rolling_wait_moves_its_deadline_with_each_reply():
    from protofl.flower.timeouts import RoundTimeouts

    timeouts = RoundTimeouts(round_timeout=0.0, node_wait=50.0, timeout_factor=3.0)
    wait = timeouts.wait(3)
    before = wait.deadline
    wait.replied()
    assert wait.deadline >= before and wait.deadline == wait.last_reply + 50.0
    wait.finish()
    assert timeouts.longest is not None and timeouts.per_message == timeouts.longest / 3
    # a wait without any reply measures nothing
    silent = RoundTimeouts(round_timeout=0.0, node_wait=50.0, timeout_factor=3.0)
    silent.wait(3).finish()
    assert silent.longest is None


@pytest.mark.parametrize(
    "settings,key",
    [
        ({"round_timeout": -1.0}, "round-timeout"),
        ({"round_timeout": float("inf")}, "round-timeout"),
        ({"timeout_factor": 0.5}, "timeout-factor"),
        ({"timeout_factor": float("nan")}, "timeout-factor"),
    ],
)
def test_bad_timeout_settings_are_refused_naming_the_key(settings, key):
    from protofl.flower.settings import FlowerSettings

    with pytest.raises(ConfigError, match=f"^{key}: "):
        FlowerSettings(out="o", run_key="k", **settings)


def test_a_run_config_timeout_that_is_no_number_is_refused_naming_the_key():
    from protofl.flower.settings import FlowerSettings

    with pytest.raises(ConfigError, match="^timeout-factor: must be a number"):
        FlowerSettings.from_run_config({"out": "o", "run-key": "k", "timeout-factor": "fast"})
    assert FlowerSettings.from_run_config({"out": "o", "run-key": "k"}).round_timeout == 0.0


def test_with_derived_timeouts_a_silent_node_is_lost_and_the_run_completes(tmp_path, monkeypatch, caplog):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in a task's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    _silent_node_run(tmp_path, monkeypatch, caplog)


def _silent_node_run(tmp_path, monkeypatch, caplog):
    """round_timeout = 0: round 1 gives the silent node node_wait after the last reply, later rounds a
    deadline from the measured rounds; the run completes with the others."""
    import logging

    from test_flower import BASE, LoopbackGrid, _loopback_run

    from protofl.flower import timeouts
    from protofl.records import read_metrics

    monkeypatch.setattr(timeouts, "MIN_DERIVED_TIMEOUT", 0.5)

    class Silencing(LoopbackGrid):
        """Node 102 tells which partition it holds, then never answers again."""

        def push_messages(self, messages):
            messages = list(messages)
            self.silent = {102} if any(m.metadata.message_type != "query" for m in messages) else set()
            return super().push_messages(messages)

    config = {
        **BASE,
        "data": {"dataset": "optdigits", "max_train_samples": 600},
        "federation": {"rounds": 2, "progress": False},
    }
    with caplog.at_level(logging.WARNING, logger="protofl.flower"):
        grid, summary = _loopback_run(
            config, tmp_path / "f", grid_class=Silencing, min_replies=2, round_timeout=0.0, node_wait=1.0
        )
    lost = [i for i in summary["incidents"] if i["kind"] == "lost"]
    assert lost and {i["partition"] for i in lost} == {2}
    assert any("node_wait, first exchange" in i["reason"] for i in lost if i["round"] == 1), lost
    assert any("node_wait" not in i["reason"] for i in lost if i["round"] == 2), lost
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and [r["clients_lost"] for r in rows] == [1, 1]


# -- a Flower simulation of 200 nodes ----------------------------------------------------------------------


@pytest.mark.slow  # Flower's simulation runtime with 200 nodes (minutes on two cores)
def test_a_flower_simulation_of_200_nodes_completes_its_rounds(tmp_path):
    """200 ClientApps on Flower's simulation runtime, the nodes reading their rows from the shared store,
    the rounds' deadlines derived: every round completes with every node, as the in-process engine."""
    pytest.importorskip("flwr")
    import protofl
    from protofl.flower import run_on_flower
    from protofl.records import read_metrics

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = {
        "seed": 0,
        "data": {"dataset": "synthetic-gaussian:train=8000,test=200,dim=16,classes=10,seed=0"},
        "partition": {"scheme": "iid", "num_clients": 200, "min_client_size": 2, "test_fraction": 0.1},
        "federation": {"rounds": 2, "progress": False, "checkpoint_every": 0},
        "model": {"feature_dim": 16, "hidden_dim": 32},
        "method": {"name": "fedproto", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
    }
    summary = run_on_flower(config, tmp_path / "f", mode="simulation", workdir=tmp_path / "w", timeout=1500)
    rows = read_metrics(tmp_path / "f" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_lost"] == 0 for r in rows) and summary["incidents"] == []
    assert rows[-1]["clients_evaluated"] == 200
    local = protofl.run(config).summary
    assert summary["final"]["personal_acc_mean"] == pytest.approx(local["final"]["personal_acc_mean"], abs=1e-6)
