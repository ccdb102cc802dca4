"""The progress bar within a round: clients done out of the round's clients, drawn only when progress is on."""

import re

import pytest

import protofl
from protofl.engine.progress import ClientProgress


@pytest.fixture
def tiny():
    """OptDigits, 3 clients, 2 rounds, one torch thread (the machine is shared)."""
    return {
        "seed": 0,
        "data": {"dataset": "optdigits", "max_train_samples": 300},
        "partition": {"scheme": "iid", "num_clients": 3},
        "federation": {"rounds": 2, "threads": 1},
        "model": {"feature_dim": 16},
        "method": {"name": "fedavg", "local_epochs": 1},
    }


def bar_counts(err: str, round_index: int) -> list[tuple[int, int]]:
    """The ``done/total`` counts the bar of round ``round_index`` drew on stderr, in order."""
    return [(int(a), int(b)) for a, b in re.findall(rf"round {round_index} clients:[^\r\n]*?\b(\d+)/(\d+)\b", err)]


@pytest.mark.parametrize("execution", ["per-client", "batched"])
def test_the_client_bar_reaches_every_client_of_each_round(tiny, capsys, execution):
    config = {**tiny, "federation": {**tiny["federation"], "progress": True, "execution": execution}}
    protofl.run(config)
    err = capsys.readouterr().err
    for r in (1, 2):
        counts = bar_counts(err, r)
        assert counts, f"no client bar for round {r}"
        assert counts[0] == (0, 3) and counts[-1] == (3, 3), counts
        assert [done for done, _ in counts] == sorted(done for done, _ in counts)  # it only moves forward


def test_the_client_bar_follows_the_sampled_clients(tiny, capsys):
    config = {
        **tiny,
        "partition": {**tiny["partition"], "num_clients": 4},
        "federation": {**tiny["federation"], "rounds": 1, "progress": True, "client_fraction": 0.5},
    }
    protofl.run(config)
    assert bar_counts(capsys.readouterr().err, 1)[-1] == (2, 2)


def test_no_client_bar_when_progress_is_off(tiny, capsys, tmp_path):
    protofl.run({**tiny, "federation": {**tiny["federation"], "progress": False}}, out=tmp_path / "run")
    captured = capsys.readouterr()
    assert "clients:" not in captured.err and "clients:" not in captured.out
    assert not any("round 1 clients" in p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*.md"))


def test_client_progress_counts_without_drawing_when_disabled(capsys):
    progress = ClientProgress(enabled=False)
    progress.start(4, 5)
    for _ in range(3):
        progress.advance()
    progress.advance(2)
    assert (progress.round, progress.done, progress.total) == (4, 5, 5)
    progress.start(5, 2)  # a new round starts from zero
    assert (progress.done, progress.total) == (0, 2)
    progress.close()
    assert capsys.readouterr().err == ""
