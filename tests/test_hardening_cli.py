"""Principle 5: every error a user can cause prints one clear line, never a traceback; Ctrl-C and
SIGTERM stop cleanly, keep the last checkpoint and print the ``--resume`` hint. In the Python API the
same errors are typed: subclasses of :class:`protofl.ProtoflError`."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _hardening import QUICK, one_error_line

import protofl
from protofl.cli import main
from protofl.engine.checkpoint import load_checkpoint
from protofl.errors import CheckpointError, ProtoflError, ReportError
from protofl.rundir import RunFolder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["run", *QUICK, "--out", str(out)]) == 0
    return out


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


CHECKPOINTS = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "text": lambda path: path.write_text("not a checkpoint\n"),
    "foreign": lambda path: torch.save({"weights": torch.zeros(3)}, path),  # KeyError 'fingerprint' before
    "not-a-dict": lambda path: torch.save([1, 2, 3], path),
    "malicious": lambda path: path.write_bytes(pickle.dumps(_Evil())),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_bad_checkpoint_on_resume_is_one_line_naming_it(kind, tmp_path, capsys, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = run / "checkpoint" / "state.pt"
    CHECKPOINTS[kind](state)
    damaged = state.read_bytes()
    assert main(["run", "--resume", str(run)]) == 2
    one_error_line(capsys.readouterr().err, str(state))
    assert state.read_bytes() == damaged  # nothing overwrote it
    with pytest.raises(CheckpointError) as info:  # the API: a typed error
        load_checkpoint(run / "checkpoint")
    assert isinstance(info.value, ProtoflError)


@pytest.mark.parametrize("action", ["fetch", "verify"])
def test_unknown_data_source_is_one_line(action, capsys, cache):
    assert main(["data", action, "foo"]) == 2  # a KeyError traceback before
    one_error_line(capsys.readouterr().err, "unknown source 'foo'", "known sources")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[]", "expected a JSON object, got list"),
        ("{}", "missing field 'method'"),
        ('{"method": ', "cannot be read as JSON"),
        ('"text"', "got str"),
    ],
)
def test_report_on_a_bad_summary_is_one_line_naming_it(content, needle, tmp_path, capsys, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").write_text(content)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    one_error_line(capsys.readouterr().err, str(run / "summary.json"), needle)
    assert not (tmp_path / "rep").exists()


def test_report_field_of_the_wrong_type_is_named(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["final"]["global_acc"] = "high"
    (run / "summary.json").write_text(json.dumps(summary))
    from protofl.report import compare_runs

    with pytest.raises(ReportError, match="final: field 'global_acc' must be int or float or null"):
        compare_runs([run], tmp_path / "rep")


def test_run_without_client_test_splits_prints_a_dash(tmp_path, capsys):
    # Every client holds one sample, so none has a test split: the CLI printed 100 * None and crashed.
    code = main(
        [
            "run",
            "--set",
            "data.dataset=synthetic-gaussian:train=20,test=50,dim=8,classes=2",
            "--set",
            "partition.num_clients=20",
            "--set",
            "partition.min_client_size=1",
            "--set",
            "federation.rounds=1",
            "--set",
            "federation.progress=false",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "personalised acc — ± —" in out.out


def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import errno

    import protofl.records

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(protofl.records, "atomic_write", full)
    assert main(["run", *QUICK, "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys.readouterr().err, "No space left on device", str(tmp_path / "r"))


def _start_long_run(out: Path) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    args = [
        sys.executable,
        "-m",
        "protofl.cli",
        "run",
        *QUICK,
        "--set",
        "federation.rounds=100000",
        "--set",
        "federation.eval_every=1000",
        "--out",
        str(out),
    ]
    # The child starts with Ctrl-C at its default whatever this process inherited (a test runner started in
    # the background may have SIGINT ignored, which a child would inherit and keep).
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize(
    "signum, code",
    [
        (signal.SIGTERM, 143),
        # SIGINT once failed twice in whole-suite runs (never alone), before the child started with Ctrl-C
        # at its default handler and before the round loop stopped on an interrupt lost in a finaliser.
        (signal.SIGINT, 130),
    ],
)
def test_signal_stops_cleanly_keeps_the_checkpoint_and_prints_the_resume_hint(signum, code, tmp_path):
    out = tmp_path / "long"
    proc = _start_long_run(out)
    state = out / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 300  # a guard against a hang, not a timed assertion
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (err, "SIGINT here:", signal.getsignal(signal.SIGINT))
    line = one_error_line(err, f"protofl run --resume {out}", signal.Signals(signum).name)
    assert line.startswith("interrupted")
    kept = load_checkpoint(out / "checkpoint")  # intact and complete
    assert kept["round"] >= 1
    assert not list((out / "checkpoint").glob(".*.tmp"))  # an interrupted write left nothing behind
    RunFolder(out, resume=True).check()  # the lock was released: the run can be resumed


def test_api_errors_are_typed():
    for name in (
        "ConfigError",
        "CheckpointError",
        "DataFormatError",
        "ReportError",
        "RunFailedError",
        "RunFolderError",
        "RunLockedError",
    ):
        assert issubclass(getattr(protofl, name), protofl.ProtoflError)
    from protofl.data.datasets import UnknownDatasetError
    from protofl.data.sources import DataFetchError, DataIntegrityError

    for cls in (UnknownDatasetError, DataFetchError, DataIntegrityError):
        assert issubclass(cls, ProtoflError)


def test_an_interrupt_lost_in_a_finaliser_still_stops_the_run_at_the_next_round(tmp_path, monkeypatch):
    """Python drops an exception raised while a finaliser runs: the handler also records the signal, and
    the round loop stops before the next round when one is recorded (a run of 50 rounds stops after 1)."""
    from protofl import runtime

    monkeypatch.setattr(runtime, "STOP_SIGNALS", [])

    def lost_interrupt(row):  # the handler ran, its KeyboardInterrupt was lost
        runtime.STOP_SIGNALS.append(signal.SIGTERM)

    overrides = [QUICK[i + 1] for i in range(0, len(QUICK), 2)] + ["federation.rounds=50"]
    with pytest.raises(KeyboardInterrupt):
        protofl.run({}, out=tmp_path / "r", overrides=overrides, on_round=lost_interrupt)
    assert load_checkpoint(tmp_path / "r" / "checkpoint")["round"] == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "interrupted"
