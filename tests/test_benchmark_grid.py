"""The benchmarks' grid runner (benchmarks/_common.py): runs stopped early are continued, not taken as done."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    return _common


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _rounds(folder: Path) -> list[int]:
    return [r["round"] for r in _rows(folder)]


def test_a_stopped_run_is_continued_to_the_same_result(common, small_config, tmp_path):
    config = {**small_config, "federation": {**small_config["federation"], "checkpoint_every": 1}}
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"

    (first,) = common.run_grid([(config, stopped)], workers=1, threads=1, stop_after=2)
    assert first["status"] == "interrupted" and first["rounds_done"] == 2
    assert _rounds(stopped) == [1, 2]
    # asked again for round 2 only: nothing is run, the stored summary comes back
    (again,) = common.run_grid([(config, stopped)], workers=1, threads=1, stop_after=2)
    assert again == first

    (continued,) = common.run_grid([(config, stopped)], workers=1, threads=1)
    assert continued["status"] == "completed" and continued["rounds_done"] == 3
    assert _rounds(stopped) == [1, 2, 3]

    (reference,) = common.run_grid([(config, straight)], workers=1, threads=1)
    assert continued["final"] == reference["final"]
    for name in ("global_acc", "train_loss"):
        assert [r[name] for r in _rows(stopped)] == [r[name] for r in _rows(straight)]


def test_the_ablation_reads_a_round_from_metrics(common, tmp_path):
    import fedhpro_ablation

    rows = [{"round": r, "global_acc": a, "round_seconds": float(r)} for r, a in [(1, 0.2), (2, 0.5), (3, 0.4)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at2 = fedhpro_ablation.at(tmp_path, 2)
    assert at2["final"]["global_acc"] == 0.5 and at2["best"]["round"] == 2 and at2["seconds_per_round"] == 1.5
    assert fedhpro_ablation.at(tmp_path, 3)["best"]["round"] == 2
    with pytest.raises(SystemExit, match="no evaluated round 4"):
        fedhpro_ablation.at(tmp_path, 4)
