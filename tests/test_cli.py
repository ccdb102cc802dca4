"""The command line: help, error messages, run and report."""

import subprocess
import sys

import pytest

from protofl.algorithms import ALGORITHMS
from protofl.cli import main


def cli(*args):
    return subprocess.run([sys.executable, "-m", "protofl.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sub", [[], ["run"], ["report"], ["data"], ["methods"]])
def test_help_for_every_subcommand(sub):
    out = cli(*sub, "--help")
    assert out.returncode == 0 and "usage: protofl" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", "method.name=fedfoo"],
            "unknown method 'fedfoo'; valid methods are " + ", ".join(sorted(ALGORITHMS)),
        ),
        (["--set", "data.dataset=svhn"], "unknown dataset 'svhn'; valid datasets are"),
        (["--set", "partition.alpha=0"], "partition.alpha: must be > 0, got 0"),
        (["--set", "federation.client_fraction=2"], "client_fraction: must be in (0, 1]"),
        (["--set", "method.momentum=1.5"], "momentum: must be in [0, 1)"),
        (["--set", "partition.num_clients=10000", "--set", "data.dataset=optdigits"], "num_clients"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, args, message):
    code = main(["run", *args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_then_report(tmp_path, capsys):
    common = [
        "--set",
        "data.dataset=optdigits",
        "--set",
        "federation.rounds=2",
        "--set",
        "federation.progress=false",
        "--set",
        "partition.num_clients=3",
    ]
    assert main(["run", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["run", *common, "--set", "method.name=fedproto", "--out", str(tmp_path / "b")]) == 0
    assert "global acc" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep/comparison.md").read_text()
    assert "| a | fedavg | optdigits |" in table and "| b | fedproto | optdigits |" in table
    assert (tmp_path / "rep/learning_curves.png").stat().st_size > 1000


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    assert "not a protofl run folder" in capsys.readouterr().err
