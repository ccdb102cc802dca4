"""The round driver's per-client records and its transport contract (in process; the Flower grid
transport's records are checked against these in test_flower.py)."""

import json

import pytest
import torch

import protofl
from protofl.engine import Exchange, RoundDriver, Simulation
from protofl.engine.rounds import STATUSES
from protofl.records import read_metrics
from protofl.runner import build_algorithm, prepare_data, resolve_config

CONFIG = {
    "seed": 5,
    "data": {"dataset": "optdigits", "max_train_samples": 400},
    "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 5},
    "federation": {"rounds": 3, "progress": False, "client_fraction": 0.8, "client_dropout": 0.3},
    "model": {"feature_dim": 16},
    "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32},
    "privacy": {"mechanism": "vpp", "epsilon": 8.0},
}


def _records_run(config):
    config = resolve_config(config)
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    rows = []
    sim = Simulation(
        build_algorithm(config, data),
        data.clients,
        data.test_x,
        data.test_y,
        config.federation,
        config.seed,
        on_round=rows.append,
    )
    sim.run()
    return data, sim, rows


def test_every_evaluated_row_carries_one_record_per_client():
    data, sim, rows = _records_run(CONFIG)
    assert [r["round"] for r in rows] == [1, 2, 3]
    seen = set()
    for row, kept in zip(rows, sim.history):
        records = row["clients"]
        assert "clients" not in kept  # the history (and so metrics.jsonl) keeps its keys
        assert {k: v for k, v in row.items() if k != "clients"} == kept
        assert [c["client"] for c in records] == list(range(5))
        statuses = [c["status"] for c in records]
        assert set(statuses) <= set(STATUSES)
        seen.update(statuses)
        assert statuses.count("not-sampled") == 5 - row["clients_sampled"]
        assert statuses.count("dropped") == row["clients_dropped"]
        assert sum(c["bytes_up"] for c in records) == row["bytes_up"]
        assert sum(c["bytes_down"] for c in records) == row["bytes_down"]
        for c, client in zip(records, data.clients):
            assert c["samples"] == len(client.y_train)
            assert c["classes"] == len(torch.unique(client.y_train))
            if c["status"] in ("not-sampled", "dropped"):
                assert c["bytes_up"] == c["bytes_down"] == 0
            else:
                assert c["bytes_up"] > 0 and c["bytes_down"] > 0
        with_test = [c for c, client in zip(records, data.clients) if len(client.y_test)]
        mean = sum(c["personal_acc"] for c in with_test) / len(with_test)
        assert mean == pytest.approx(row["personal_acc_mean"])
        # ε per client: the max over those that released is the row's figure
        spent = [c["epsilon"] for c in records if c["epsilon"] is not None]
        assert max(spent) == pytest.approx(row["privacy_epsilon_max"])
    assert {"ok", "dropped"} <= seen  # the configuration exercises sampling and dropouts


def test_the_records_stay_out_of_metrics_jsonl(tmp_path):
    result = protofl.run({**CONFIG, "privacy": {"mechanism": "none"}}, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and all("clients" not in row for row in rows)
    assert all("clients" not in row for row in result.history)
    assert "clients" not in json.loads((tmp_path / "run" / "summary.json").read_text())["final"]


def test_an_exchange_refuses_an_unknown_status():
    with pytest.raises(ValueError, match="unknown statuses"):
        Exchange(status={0: "gone"})


class _StopAtRound2:
    """A transport wrapper whose round-2 exchange asks the driver to stop (as a node over budget does)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def exchange(self, r, active, broadcast, owed):
        if r == 2:
            return Exchange(stop=RuntimeError("stop here"))
        return self.inner.exchange(r, active, broadcast, owed)


def test_a_stop_from_the_transport_leaves_a_checkpoint_of_the_rounds_finished(tmp_path):
    from protofl.engine import InProcessTransport
    from protofl.engine.checkpoint import load_checkpoint

    config = resolve_config({**CONFIG, "privacy": {"mechanism": "none"}})
    data = prepare_data(config)
    algo = build_algorithm(config, data)
    transport = _StopAtRound2(InProcessTransport(algo, data.clients, config.federation, config.seed))
    driver = RoundDriver(
        algo,
        transport,
        config.federation,
        config.seed,
        test_x=data.test_x,
        test_y=data.test_y,
        checkpoint_dir=tmp_path,
        fingerprint="f",
    )
    with pytest.raises(RuntimeError, match="stop here"):
        driver.run()
    state = load_checkpoint(tmp_path)
    assert state["round"] == 1 and [r["round"] for r in state["history"]] == [1]
    assert set(state["client_states"]) == set(transport.inner.client_states)
