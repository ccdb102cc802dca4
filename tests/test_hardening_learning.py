"""Principle 4: a run that cannot learn does not report success.

A round in which every reply is rejected, or a run in which no round produced a finite training loss,
ends with :class:`RunFailedError` (exit code 4 on the command line, one line), and summary.json says
``status = "failed"`` with the reason, instead of a printed accuracy.
"""

import json

import pytest
from _hardening import QUICK

import protofl
from protofl.cli import main
from protofl.errors import RunFailedError
from protofl.health import learning_failure


def _row(r, sampled=4, dropped=0, rejected=0, loss=0.5):
    return {
        "round": r,
        "clients_sampled": sampled,
        "clients_dropped": dropped,
        "clients_rejected": rejected,
        "train_loss": loss,
    }


@pytest.mark.parametrize(
    "history, reason",
    [
        ([_row(1), _row(2, rejected=4)], "round 2: all 4 replies were rejected"),
        ([_row(1, dropped=1, rejected=3)], "round 1: all 3 replies were rejected"),
        ([_row(1, loss=float("nan")), _row(2, loss=float("inf"))], "no round produced a finite training loss"),
        ([_row(1, loss=None)], "no round produced a finite training loss"),
    ],
)
def test_histories_that_cannot_learn(history, reason):
    assert reason in learning_failure(history)


@pytest.mark.parametrize(
    "history",
    [
        [],
        [_row(1), _row(2, rejected=3)],  # one reply got through
        [_row(1, sampled=2, dropped=2, rejected=0)],  # everyone dropped out: nothing was rejected
        [_row(1, loss=float("nan")), _row(2)],
    ],
)
def test_histories_that_learned(history):
    assert learning_failure(history) is None


def test_a_run_whose_replies_are_all_rejected_fails_with_exit_code_4(tmp_path, capsys):
    # A huge (finite) weight decay sends every parameter to infinity: every reply is rejected. This
    # exited 0 with an accuracy printed.
    out = tmp_path / "r"
    code = main(["run", *QUICK, "--set", "method.weight_decay=1e14", "--out", str(out)])
    err = capsys.readouterr()
    assert code == 4
    lines = [line for line in err.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not learn" in lines[0] and "all 2 replies were rejected" in lines[0]
    assert "Traceback" not in err.err and "global acc" not in err.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "rejected" in summary["failure"]


def test_the_api_raises_the_typed_error(small_config):
    small_config["method"]["weight_decay"] = 1e14
    small_config["federation"]["rounds"] = 1
    with pytest.raises(RunFailedError, match="could not learn") as info:
        protofl.run(small_config)
    assert isinstance(info.value, protofl.ProtoflError)
