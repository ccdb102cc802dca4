"""MLflow tracking (``[logging] mlflow``): the scalars TensorBoard gets and the resolved configuration as
parameters, read back with MLflow's own client from a local SQLite store; a missing package is one line."""

import json
import sys

import pytest

import protofl
from protofl.cli import main
from protofl.config import ConfigError
from protofl.engine import RunInterrupted
from protofl.records import read_metrics
from protofl.tracking import mlflow_name


@pytest.fixture
def tiny():
    """OptDigits, 3 clients, 2 rounds, one torch thread (the machine is shared)."""
    return {
        "seed": 0,
        "data": {"dataset": "optdigits", "max_train_samples": 300},
        "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
        "federation": {"rounds": 2, "progress": False, "threads": 1},
        "model": {"feature_dim": 16},
        "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32, "local_epochs": 1},
        "privacy": {"mechanism": "igpp", "epsilon": 8.0, "accountant": "rdp"},
    }


def tracked(config, uri, experiment="protofl-test"):
    return {**config, "logging": {"mlflow": True, "mlflow_uri": uri, "mlflow_experiment": experiment}}


def only_run(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_every_round_metric_and_the_resolved_config_reach_mlflow(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = protofl.run(tracked(tiny, uri), out=tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    run = only_run(client, "protofl-test")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # parameters: the resolved configuration, presets and filled-in values included
    params = run.data.params
    assert params["method.name"] == "fedproto" and params["data.dataset"] == "optdigits"
    assert params["privacy.planned_releases"] == "2"  # filled in when the config is resolved
    assert params["method.local_epochs"] == "1" and float(params["method.lr"]) == 0.1
    # metrics: every numeric value of every row, at its round
    history = read_metrics(tmp_path / "run/metrics.jsonl")
    assert len(history) == 2
    for key in ("personal_acc_mean", "personal_proto_acc_mean", "train_loss", "bytes_up", "privacy_epsilon_max"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        values = [row[key] for row in history if row[key] is not None]
        assert [m.value for m in logged] == pytest.approx(values), key
    numeric = {k for k, v in history[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {mlflow_name(k) for k in numeric - {"round"}} <= set(run.data.metrics)
    assert run.data.metrics["privacy_epsilon_max"] == pytest.approx(result.summary["epsilon"])
    record = json.loads((tmp_path / "run/mlflow_run.json").read_text())
    assert record["run_id"] == run.info.run_id


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tracked({**tiny, "federation": {**tiny["federation"], "rounds": 3}}, uri)
    with pytest.raises(RunInterrupted):
        protofl.run(config, out=tmp_path / "run", stop_after=1)
    client = MlflowClient(tracking_uri=uri)
    stopped = only_run(client, "protofl-test")
    assert stopped.info.status == "KILLED"
    protofl.run(None, out=tmp_path / "run", resume=True)
    run = only_run(client, "protofl-test")
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "personal_acc_mean")] == [1, 2, 3]


def test_mlflow_without_the_package_is_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import tomli_w

    monkeypatch.setitem(sys.modules, "mlflow", None)  # an environment without mlflow
    (tmp_path / "c.toml").write_text(tomli_w.dumps({**tiny, "logging": {"mlflow": True}}))
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logging.mlflow" in err[0] and "protofl[mlflow]" in err[0], err
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_a_store_that_cannot_be_written_is_one_line_before_any_work(tiny, tmp_path, capsys):
    import tomli_w

    (tmp_path / "not-a-folder").write_text("")
    uri = f"sqlite:///{tmp_path}/not-a-folder/mlflow.db"
    (tmp_path / "c.toml").write_text(tomli_w.dumps(tracked(tiny, uri)))
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logging.mlflow_uri: cannot log to sqlite:///" in err[0], err
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_an_mlflow_uri_without_mlflow_on_is_refused(tiny):
    with pytest.raises(ConfigError, match="mlflow_uri"):
        protofl.run({**tiny, "logging": {"mlflow_uri": "sqlite:///x.db"}})


def test_mlflow_names():
    assert mlflow_name("global_acc@mnist") == "global_acc/mnist"
    assert mlflow_name("personal_acc_mean") == "personal_acc_mean"
