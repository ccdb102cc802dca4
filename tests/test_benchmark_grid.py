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


def _ablation_run(folder: Path, accs: list[float]) -> None:
    folder.mkdir(parents=True)
    rows = [{"round": r + 1, "global_acc": a, "round_seconds": 1.0} for r, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_ablation_merges_a_later_seed_into_the_stored_rows(common, tmp_path, monkeypatch):
    """A call for seed 2 alone with --merge: the table and summaries hold seeds 0, 1 and 2, not seed 2 alone."""
    import fedhpro_ablation

    monkeypatch.setattr(fedhpro_ablation, "run_grid", lambda *args, **kwargs: [])  # the runs' folders are made here
    defaults, never_matched = list(fedhpro_ablation.VARIANTS)[0], list(fedhpro_ablation.VARIANTS)[12]
    common_args = ["fedhpro_ablation.py", "--rounds", "2", "--dataset", "mnist", "--out", str(tmp_path)]
    for seed, acc in [(0, 0.2), (1, 0.4)]:
        _ablation_run(tmp_path / "runs" / f"v00-seed{seed}", [0.1, acc])
    monkeypatch.setattr("sys.argv", [*common_args, "--variants", "0", "--seeds", "2"])
    fedhpro_ablation.main()
    _ablation_run(tmp_path / "runs" / "v00-seed2", [0.9, 0.6])
    _ablation_run(tmp_path / "runs" / "v12-seed2", [0.1, 0.5])
    monkeypatch.setattr("sys.argv", [*common_args, "--variants", "0", "12", "--first-seed", "2", "--seeds", "1"])
    fedhpro_ablation.main()  # without --merge: this call's runs only
    assert [r["seed"] for r in json.loads((tmp_path / "summaries.json").read_text())[defaults]] == [2]

    # the stored file now holds seed 2 only; put seeds 0 and 1 back, then merge seed 2 into them
    monkeypatch.setattr("sys.argv", [*common_args, "--variants", "0", "--seeds", "2"])
    fedhpro_ablation.main()
    monkeypatch.setattr(
        "sys.argv", [*common_args, "--variants", "0", "12", "--first-seed", "2", "--seeds", "1", "--merge"]
    )
    fedhpro_ablation.main()
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    assert list(summaries) == [defaults, never_matched]
    assert [(r["seed"], r["final"]["global_acc"], r["best"]["global_acc"]) for r in summaries[defaults]] == [
        (0, 0.2, 0.2),
        (1, 0.4, 0.4),
        (2, 0.6, 0.9),
    ]
    assert {r["dataset"] for r in summaries[defaults]} == {"mnist"}
    table = (tmp_path / "table.md").read_text()
    assert f"| {defaults} | `{{}}` | 0, 1, 2 | 40.00 ± 16.33 | 50.00 ± 29.44 |" in table
    assert "| 2 | 50.00 ± 0.00 | 50.00 ± 0.00 |" in table.split(never_matched)[1]
    assert "rows of earlier calls kept from summaries.json" in table


def test_the_ablation_merge_refuses_what_it_cannot_place(common, tmp_path, monkeypatch):
    import fedhpro_ablation

    defaults = list(fedhpro_ablation.VARIANTS)[0]
    setting = {"dataset": "mnist", "rounds": 50, "round": 50}
    stored = tmp_path / "summaries.json"
    entry = {"seed": 0, **setting, "final": {}, "best": {}}
    stored.write_text(json.dumps({defaults: [entry]}))
    assert fedhpro_ablation.read_summaries(stored, setting) == {defaults: [entry]}
    for content, message in [
        ({defaults: [{k: v for k, v in entry.items() if k != "seed"}]}, "has no seed"),
        ({defaults: [{**entry, "dataset": "fashion-mnist"}]}, "has dataset 'fashion-mnist', this call 'mnist'"),
        ({defaults: [{**entry, "round": 10}]}, "has round 10, this call 50"),
        ({"a variant no longer in the script": [entry]}, "unknown variant"),
        ([entry], "not a summaries file"),
        ({defaults: entry}, "are not a list"),
        ({defaults: [{**entry, "seed": [0]}]}, r"has seed \[0\], not a whole number"),
        ({defaults: [{**entry, "seed": "0"}]}, "has seed '0', not a whole number"),
    ]:
        stored.write_text(json.dumps(content))
        with pytest.raises(SystemExit, match=message) as err:
            fedhpro_ablation.read_summaries(stored, setting)
        assert str(stored) in str(err.value)
    stored.write_text("{")
    with pytest.raises(SystemExit, match="not a readable summaries file"):
        fedhpro_ablation.read_summaries(stored, setting)
    # a stored file that cannot be merged stops the call before any run
    monkeypatch.setattr(fedhpro_ablation, "run_grid", lambda *args, **kwargs: pytest.fail("ran"))
    monkeypatch.setattr(
        "sys.argv", ["fedhpro_ablation.py", "--dataset", "mnist", "--out", str(tmp_path), "--variants", "0", "--merge"]
    )
    with pytest.raises(SystemExit, match="not a readable summaries file"):
        fedhpro_ablation.main()


def test_the_ablation_merge_replaces_a_stored_seed_and_keeps_the_rest(common):
    import fedhpro_ablation

    stored = {"a": [{"seed": 0, "x": 1}, {"seed": 1, "x": 2}], "b": [{"seed": 0, "x": 3}]}
    new = {"c": [{"seed": 0, "x": 4}], "a": [{"seed": 1, "x": 5}, {"seed": 2, "x": 6}]}
    assert fedhpro_ablation.merge(stored, new) == {
        "a": [{"seed": 0, "x": 1}, {"seed": 1, "x": 5}, {"seed": 2, "x": 6}],
        "b": [{"seed": 0, "x": 3}],
        "c": [{"seed": 0, "x": 4}],
    }


def _hp_checkpoint(folder: Path, round_: int, hp) -> None:
    import torch

    (folder / "checkpoint").mkdir(parents=True)
    torch.save({"round": round_, "server_state": {"hyper_prototypes": hp}}, folder / "checkpoint" / "state.pt")


def test_hp_movement_merges_new_runs_into_the_stored_rows(common, tmp_path, monkeypatch):
    """With --merge the rows of runs whose folders are gone stay, a run measured now replaces its stored row;
    without it the file holds this call's runs only."""
    import fedhpro_ablation
    import fedhpro_hp_movement
    import torch

    names = list(fedhpro_ablation.VARIANTS)
    start = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    moved = start.clone()
    moved[0, 0] += 1.0
    _hp_checkpoint(tmp_path / "runs" / "v12-seed0", 5, start)  # never matched: H = H0
    _hp_checkpoint(tmp_path / "runs" / "v13-seed0", 50, moved)
    kept = {"variant": names[0], "seed": 1, "round": 50, **dict.fromkeys(fedhpro_hp_movement.MEASURES[1:], 0.5)}
    replaced = {**kept, "variant": names[13], "seed": 0, "round": 10}
    (tmp_path / "hp_movement.json").write_text(json.dumps([replaced, kept]))

    monkeypatch.setattr("sys.argv", ["fedhpro_hp_movement.py", "--out", str(tmp_path), "--merge"])
    fedhpro_hp_movement.main()
    rows = json.loads((tmp_path / "hp_movement.json").read_text())
    assert [(r["variant"], r["seed"], r["round"]) for r in rows] == [(names[0], 1, 50), (names[13], 0, 50)]
    assert rows[0] == kept
    assert rows[1]["relative_change"] == pytest.approx(float(1.0 * 8**0.5 / start.norm()))
    assert rows[1]["hp_cos_min"] < 1.0 and rows[1]["hp_cos_mean"] > rows[1]["hp_cos_min"]
    table = (tmp_path / "hp_movement.md").read_text()
    assert f"| {names[0]} | 1 | 50 | 0.500 |" in table and f"| {names[13]} | 0 | 50 |" in table

    monkeypatch.setattr("sys.argv", ["fedhpro_hp_movement.py", "--out", str(tmp_path)])
    fedhpro_hp_movement.main()  # without --merge
    assert [r["variant"] for r in json.loads((tmp_path / "hp_movement.json").read_text())] == [names[13]]

    (tmp_path / "hp_movement.json").write_text(json.dumps([{"variant": names[0], "seed": 1}]))
    monkeypatch.setattr("sys.argv", ["fedhpro_hp_movement.py", "--out", str(tmp_path), "--merge"])
    with pytest.raises(SystemExit, match="hp_movement.json: the row of .* seed 1 lacks round, relative_change"):
        fedhpro_hp_movement.main()
