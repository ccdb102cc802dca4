"""End-to-end runs on real data (OptDigits): records, determinism, resume, personalised metrics."""

import json

import pytest

import protofl
from protofl.engine import RunInterrupted
from protofl.records import TIMING_KEYS, read_metrics


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def test_fedavg_run_writes_a_complete_run_folder(small_config, tmp_path):
    result = protofl.run(small_config, out=tmp_path / "run")
    folder = tmp_path / "run"
    for name in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "learning_curves.png",
        "partition.md",
        "partition_heatmap.png",
        "checkpoint/state.pt",
    ]:
        assert (folder / name).exists(), name
    summary = json.loads((folder / "summary.json").read_text())
    for key in [
        "method",
        "dataset",
        "partition",
        "clients",
        "rounds",
        "seed",
        "final",
        "best",
        "epsilon",
        "delta",
        "wall_seconds",
        "bytes_up",
        "bytes_down",
    ]:
        assert key in summary, key
    assert summary["epsilon"] is None and summary["delta"] is None
    assert summary["final"]["global_acc"] > 0.6  # 3 rounds of FedAvg on digits; chance is 0.1
    assert len(read_metrics(folder / "metrics.jsonl")) == 3
    # bytes: every round each of 4 clients downloads the global model and uploads its own plus a count
    from protofl.config import ModelConfig
    from protofl.models import build_model

    num_params = sum(p.numel() for p in build_model(ModelConfig(feature_dim=32), (1, 8, 8), 10).parameters())
    assert 3 * 4 * num_params * 4 < summary["bytes_down"] < 3 * 4 * (num_params * 4 + 1000)
    assert summary["bytes_up"] - summary["bytes_down"] == 3 * 4 * (8 + len(',["num_samples","int64",[]]'))
    # the resolved config reproduces the run
    rerun = protofl.run(folder / "config.toml")
    assert strip_timing(rerun.summary) == strip_timing(result.summary)


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_and_another_seed_does_not(small_config, tmp_path):
    a = protofl.run(small_config, out=tmp_path / "a")
    b = protofl.run(small_config, out=tmp_path / "b")
    assert strip_timing(a.summary) == strip_timing(b.summary)
    assert strip_timing(read_metrics(tmp_path / "a/metrics.jsonl")) == strip_timing(
        read_metrics(tmp_path / "b/metrics.jsonl")
    )
    c = protofl.run({**small_config, "seed": 4})
    assert strip_timing(c.history) != strip_timing(a.history)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedproto"])
def test_killed_and_resumed_run_matches_an_uninterrupted_run(small_config, tmp_path, method):
    config = {
        **small_config,
        "method": {**small_config["method"], "name": method},
        "federation": {"rounds": 4, "progress": False, "client_fraction": 0.5},
    }
    whole = protofl.run(config, out=tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        protofl.run(config, out=tmp_path / "killed", stop_after=2)
    assert len(read_metrics(tmp_path / "killed/metrics.jsonl")) == 2
    resumed = protofl.run(None, out=tmp_path / "killed", resume=True)
    assert strip_timing(resumed.history) == strip_timing(whole.history)
    assert strip_timing(resumed.summary) == strip_timing(whole.summary)


def test_resume_refuses_a_checkpoint_of_another_configuration(small_config, tmp_path):
    with pytest.raises(RunInterrupted):
        protofl.run({**small_config, "federation": {"rounds": 3, "progress": False}}, out=tmp_path / "r", stop_after=1)
    config_file = tmp_path / "r/config.toml"
    config_file.write_text(config_file.read_text().replace("seed = 3", "seed = 5"))
    with pytest.raises(ValueError, match="different configuration"):
        protofl.run(None, out=tmp_path / "r", resume=True)


@pytest.mark.slow
def test_fedproto_and_local_report_personalised_accuracy_under_label_skew(small_config):
    accs = {}
    for method in ["local", "fedproto"]:
        config = {
            **small_config,
            "partition": {"scheme": "dirichlet", "alpha": 0.3, "num_clients": 5},
            "method": {"name": method, "lr": 0.05, "batch_size": 16},
        }
        result = protofl.run(config)
        final = result.summary["final"]
        assert final["global_acc"] is None
        assert 0.3 < final["personal_acc_mean"] <= 1.0
        assert final["personal_acc_std"] >= 0
        accs[method] = final
    assert "personal_proto_acc_mean" in accs["fedproto"]
    assert 0.2 < accs["fedproto"]["personal_proto_acc_mean"] <= 1.0
    assert result.summary["bytes_up"] > 0
    assert protofl.run({**small_config, "method": {"name": "local"}}).summary["bytes_up"] == 0


def test_client_dropout_loses_updates_but_the_run_goes_on(small_config):
    config = {**small_config, "federation": {"rounds": 3, "progress": False, "client_dropout": 0.5}}
    result = protofl.run(config)
    dropped = sum(row["clients_dropped"] for row in result.history)
    assert dropped > 0
    assert result.summary["final"]["global_acc"] is not None


def test_impossible_partition_fails_before_training(small_config):
    config = {**small_config, "partition": {"scheme": "dirichlet", "num_clients": 500, "min_client_size": 10}}
    with pytest.raises(ValueError, match="num_clients|min_client_size"):
        protofl.run(config)


@pytest.mark.slow
def test_a_process_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    """The real thing: `protofl run` killed by SIGKILL mid-run, then `protofl run --resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [
        "--set",
        "data.dataset=optdigits",
        "--set",
        "federation.rounds=15",
        "--set",
        "federation.progress=false",
        "--set",
        "partition.num_clients=4",
        "--set",
        "method.name=fedproto",
        "--set",
        "method.local_epochs=2",
        "--set",
        "seed=7",
    ]
    cmd = [sys.executable, "-m", "protofl.cli", "run", *args]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "killed/metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(
        [sys.executable, "-m", "protofl.cli", "run", "--resume", str(tmp_path / "killed")],
        check=True,
        capture_output=True,
    )
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    killed = read_metrics(tmp_path / "killed/metrics.jsonl")
    whole = read_metrics(tmp_path / "whole/metrics.jsonl")
    assert [r["round"] for r in killed] == list(range(1, 16))
    assert strip_timing(killed) == strip_timing(whole)


def test_a_run_folder_is_not_overwritten(small_config, tmp_path):
    protofl.run(small_config, out=tmp_path / "r")
    with pytest.raises(protofl.ConfigError, match="already holds a run"):
        protofl.run(small_config, out=tmp_path / "r")


def test_resume_with_sparse_evaluation_and_checkpoints(small_config, tmp_path):
    """rounds=5, eval_every=2, checkpoint_every=2: evaluated rounds 2, 4, 5; a stop after round 3 resumes
    from the round-2 checkpoint and still ends with the uninterrupted metrics."""
    config = {**small_config, "federation": {"rounds": 5, "eval_every": 2, "checkpoint_every": 2, "progress": False}}
    whole = protofl.run(config, out=tmp_path / "whole")
    assert [row["round"] for row in whole.history] == [2, 4, 5]
    with pytest.raises(RunInterrupted):
        protofl.run(config, out=tmp_path / "cut", stop_after=3)
    resumed = protofl.run(None, out=tmp_path / "cut", resume=True)
    assert strip_timing(resumed.history) == strip_timing(whole.history)
    assert [row["round"] for row in read_metrics(tmp_path / "cut/metrics.jsonl")] == [2, 4, 5]


def test_resume_refuses_a_checkpoint_whose_method_defaults_have_changed(small_config, tmp_path):
    """The config file is unchanged (same fingerprint), but an option it leaves to its default resolved
    differently when the checkpoint was written: resuming would mix two settings in one run."""
    from protofl.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
    from protofl.errors import CheckpointError

    with pytest.raises(RunInterrupted):
        protofl.run({**small_config, "federation": {"rounds": 3, "progress": False}}, out=tmp_path / "r", stop_after=1)
    checkpoint = tmp_path / "r" / "checkpoint"
    state = load_checkpoint(checkpoint)
    recorded = state["method_options"]
    # The resolved options, the defaults the config file leaves out included.
    assert recorded["lr"] == repr(0.1)
    assert recorded["momentum"] == repr(0.9)  # LocalTrainingConfig's default, not in the file
    option = "momentum"
    state["method_options"] = {**recorded, option: "'an older default'"}
    save_checkpoint(checkpoint, state)
    with pytest.raises(CheckpointError, match=f"{option}: 'an older default' -> "):
        protofl.run(None, out=tmp_path / "r", resume=True)
    # An option added since the checkpoint, at its default, is no change; one not at its default is.
    state["method_options"] = {k: v for k, v in recorded.items() if k != "weight_decay"}
    save_checkpoint(checkpoint, state)
    from protofl.engine.rounds import _check_method_options, _option_defaults, method_options

    config = protofl.algorithms.fedavg.FedAvg.Config(lr=0.1, batch_size=32, local_epochs=3)
    _check_method_options(state["method_options"], method_options(config), _option_defaults(config))
    with pytest.raises(CheckpointError, match=r"weight_decay: \(absent\) -> 0.5"):
        changed = protofl.algorithms.fedavg.FedAvg.Config(lr=0.1, batch_size=32, local_epochs=3, weight_decay=0.5)
        _check_method_options(state["method_options"], method_options(changed), _option_defaults(changed))
    # A checkpoint from before the options were recorded resumes as before.
    del state["method_options"]
    save_checkpoint(checkpoint, state)
    assert (checkpoint / CHECKPOINT_NAME).exists()
    resumed = protofl.run(None, out=tmp_path / "r", resume=True)
    assert len(resumed.history) == 3
