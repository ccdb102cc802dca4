"""protofl on Flower: a SuperLink and three SuperNodes as processes on loopback, against the in-process engine.

The runs start in one module fixture and go on side by side (Flower starts a process for every message,
and most of a round is waiting, so the runs overlap well on two cores); each test checks one of them.
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
    "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32},
}
VPP = {**BASE, "privacy": {"mechanism": "vpp", "epsilon": 8.0}}


def _run_deployment(config, out, workdir, results, name):
    try:
        results[name] = run_on_flower(config, out, mode="deployment", workdir=workdir, round_timeout=300,
                                      node_wait=120, timeout=600)
    except BaseException as exc:  # reported by the test that needs it
        results[name] = exc


def _run_with_a_killed_node(config, out, workdir, results):
    """Deployment where SuperNode 2 is SIGKILLed after round 1 and restarted straight away."""
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
    jobs = [
        threading.Thread(target=_run_deployment, args=(BASE, root / "plain", root / "w-plain", results, "plain")),
        threading.Thread(target=_run_deployment, args=(VPP, root / "vpp", root / "w-vpp", results, "vpp")),
        threading.Thread(target=_run_with_a_killed_node, args=(BASE, root / "killed", root / "w-killed", results)),
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


def _assert_close(flower_rows, local_rows):
    assert [r["round"] for r in flower_rows] == [r["round"] for r in local_rows] == [1, 2, 3]
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


@pytest.mark.parametrize("name,config", [("plain", BASE), ("vpp", VPP)])
def test_flower_deployment_matches_the_in_process_engine(flower_runs, name, config):
    root, results = flower_runs
    summary = _result(results, name)
    local = protofl.run(config)
    flower_rows = read_metrics(root / name / "metrics.jsonl")
    _assert_close(flower_rows, local.history)
    assert summary["engine"] == "flower-deployment"
    assert summary["incidents"] == []
    assert summary["bytes_up"] == local.summary["bytes_up"] and summary["bytes_down"] == local.summary["bytes_down"]
    assert summary["final"]["personal_acc_mean"] == pytest.approx(local.summary["final"]["personal_acc_mean"],
                                                                  abs=TOLERANCE)
    assert summary["final"]["personal_acc_mean"] > 0.3  # it learns: chance is 0.1
    if name == "vpp":
        # each client's accountant lived on its node; the server merged their reports
        assert summary["epsilon"] == pytest.approx(local.summary["epsilon"], rel=1e-9)
        assert 0 < summary["epsilon"] <= 8.0
        assert summary["privacy"]["max_releases_by_a_client"] == 3
        assert flower_rows[-1]["privacy_epsilon_max"] > flower_rows[0]["privacy_epsilon_max"] > 0
    else:
        assert summary["epsilon"] is None
    for file in ["config.toml", "summary.json", "metrics.jsonl", "report.md", "checkpoint/state.pt"]:
        assert (root / name / file).exists(), file


def test_protofl_report_compares_flower_and_in_process_runs(flower_runs, tmp_path):
    from protofl.report import compare_runs

    root, results = flower_runs
    _result(results, "plain")
    protofl.run(BASE, out=tmp_path / "in-process")
    table = compare_runs([root / "plain", tmp_path / "in-process"], tmp_path / "report").read_text()
    assert "plain" in table and "in-process" in table


def test_a_killed_supernode_is_recorded_and_the_run_completes(flower_runs):
    root, results = flower_runs
    summary = _result(results, "killed")
    rows = read_metrics(root / "killed" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    lost = [i for i in summary["incidents"] if i["kind"] == "lost"]
    assert lost and all(i["partition"] == 2 for i in lost), summary["incidents"]
    assert {i["round"] for i in lost} <= {2, 3}
    assert sum(r["clients_lost"] for r in rows) >= 1
    # the restarted node rejoined: it was evaluated in the last round and trained from its saved state
    assert rows[-1]["clients_evaluated"] == 3
    from protofl.flower.node import ClientStore

    store = ClientStore.load(results["killed_state"])
    assert 1 in store.committed and max(store.committed) == 3
    assert np.isfinite(rows[-1]["personal_acc_mean"])


def test_a_malformed_reply_is_rejected_with_its_reason(tmp_path):
    """The server's checks, on Flower records: NaN, wrong shape, unknown class, wrong method."""
    from protofl.algorithms import Task
    from protofl.algorithms.fedproto import FedProto
    from protofl.config import ModelConfig
    from protofl.flower import records
    from protofl.payload import Payload, PayloadError, validate

    algo = FedProto(FedProto.Config(), Task((8,), 3, ModelConfig(feature_dim=4, hidden_dim=6)))
    good = Payload({"classes": np.array([0, 2]), "prototypes": np.ones((2, 4), np.float32),
                    "counts": np.array([3, 5])}, {"method": "fedproto"})
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
