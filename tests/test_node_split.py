"""A Flower node without the server's partition store: it builds its own split from its own data loader, the
same rows a store of the run's data fingerprint holds, and never reads a store written for other data."""

import logging
import shutil

import numpy as np
import pytest
import torch
from _partition_store import CONFIG

from protofl.api import resolve_config
from protofl.data.shared import PartitionStore, PartitionStoreError, data_key, node_split
from protofl.runner import prepare_data

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def no_build():
    raise AssertionError("the node built its split although the store was there")


def counted(config, calls):
    def build():
        calls.append(1)
        return prepare_data(config)

    return build


def assert_same_rows(a, b, k):
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), (k, name)
    assert a.input_shape == b.input_shape and a.num_classes == b.num_classes


def test_a_node_without_the_store_builds_the_split_the_store_holds(tmp_path, caplog):
    config = resolve_config(CONFIG)
    key = data_key(config)
    data = prepare_data(config)
    server = PartitionStore(tmp_path / "server-cache" / "partitions")  # the machine the server wrote it on
    server.publish(key, data.clients, data.input_shape, data.num_classes)
    node = PartitionStore(tmp_path / "node-cache" / "partitions")  # another machine: nothing there

    from_store = node_split(server, key, no_build)
    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="protofl.flower"):
        own = node_split(node, key, counted(config, calls))
    assert calls == [1]
    assert from_store.num_clients == own.num_clients == 5
    for k in range(5):
        assert_same_rows(from_store.client(k), own.client(k), k)
        # and both are the rows the data pipeline gives client k
        assert np.array_equal(own.client(k).y_train, data.clients[k].y_train.numpy())
    said = [r for r in caplog.records if r.levelno == logging.INFO and key in r.getMessage()]
    assert said and "own data loader" in said[0].getMessage()
    # the node kept its split in its own cache, for the later processes of its machine (no rebuild there)
    assert node.unusable(key) is None
    again = node_split(node, key, no_build)
    assert_same_rows(again.client(3), from_store.client(3), 3)
    with pytest.raises(PartitionStoreError, match="client 5 is not in"):
        own.client(5)


def test_a_store_written_for_another_fingerprint_is_not_used(tmp_path, caplog):
    config = resolve_config(CONFIG)
    other = resolve_config({**CONFIG, "seed": 5})  # other data: another split of the pool
    key, other_key = data_key(config), data_key(other)
    assert key != other_key
    store = PartitionStore(tmp_path / "partitions")
    foreign = prepare_data(other)
    written = store.publish(other_key, foreign.clients, foreign.input_shape, foreign.num_classes)
    shutil.move(written, store.path(key))  # under this run's key, but written for the other fingerprint
    reason = store.unusable(key)
    assert reason is not None and other_key in reason

    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="protofl.flower"):
        split = node_split(store, key, counted(config, calls))
    assert calls == [1]
    data = prepare_data(config)
    for k in range(5):
        rows = split.client(k)
        assert np.array_equal(rows.x_train, data.clients[k].x_train.numpy()), k
        assert rows.x_train.dtype == np.float32 and rows.y_train.dtype == np.int64
    assert not all(
        len(split.client(k).y_train) == len(foreign.clients[k].y_train)
        and np.array_equal(split.client(k).y_train, foreign.clients[k].y_train.numpy())
        for k in range(5)
    )
    assert any("is not used" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    # the other store is left as it was (nothing deleted), and its readers still refuse it in one line
    assert (store.path(key) / "meta.json").exists()
    with pytest.raises(PartitionStoreError, match="data fingerprint") as info:
        store.client(key, 0)
    assert "\n" not in str(info.value)


def test_a_node_in_another_cache_folder_reads_nothing_the_server_wrote(tmp_path, monkeypatch):
    """The ServerApp wrote the store into its cache; a node whose cache is elsewhere (another machine)
    builds its own split and gets the tensors the server's store would have given it."""
    import protofl.runner
    from protofl.flower import node

    config = resolve_config({**CONFIG, "seed": 7})
    key = data_key(config)
    data = prepare_data(config)
    server = PartitionStore(tmp_path / "server" / "partitions")
    server.publish(key, data.clients, data.input_shape, data.num_classes)
    written = {p.name: p.stat().st_mtime_ns for p in server.path(key).iterdir()}

    monkeypatch.setenv("PROTOFL_CACHE", str(tmp_path / "node"))
    builds: list[int] = []
    real = protofl.runner.prepare_data
    monkeypatch.setattr(protofl.runner, "prepare_data", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    node.node_task.cache_clear()
    node._run_setup.cache_clear()
    try:
        tasks = [node.node_task(config.to_toml(), k, 5) for k in range(5)]
    finally:
        node.node_task.cache_clear()
        node._run_setup.cache_clear()
    assert builds == [1]  # one build for the process, from the node's own loader
    for k, task in enumerate(tasks):
        rows = server.client(key, k)
        for name in ARRAYS:
            assert torch.equal(getattr(task.data, name), torch.from_numpy(getattr(rows, name))), (k, name)
    assert PartitionStore.default().root == tmp_path / "node" / "partitions"
    assert PartitionStore.default().unusable(key) is None
    assert {p.name: p.stat().st_mtime_ns for p in server.path(key).iterdir()} == written
