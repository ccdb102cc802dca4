"""The private-gradients benchmark's ``--option METHOD.KEY=VALUE``: parsed per method, typed, bad items refused."""

import argparse
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import private_gradients_lt

    return private_gradients_lt


def test_options_are_parsed_per_method_and_typed(bench):
    parsed = bench.parse_method_options(
        ["fedhpro.hpcl_weight=0", "fedhpro.hpal_weight=0.5", "creff.batch_size=256", "creff.retrain_init=zeros"],
        ("creff", "fedhpro"),
    )
    assert parsed == {
        "fedhpro": {"hpcl_weight": 0, "hpal_weight": 0.5},
        "creff": {"batch_size": 256, "retrain_init": "zeros"},
    }
    assert isinstance(parsed["creff"]["batch_size"], int)


@pytest.mark.parametrize(
    ("item", "message"),
    [("fedhpro.hpcl_weight", "METHOD.KEY=VALUE"), ("hpcl_weight=0", "METHOD.KEY=VALUE"), ("fedavg.lr=1", "'fedavg'")],
)
def test_a_malformed_option_is_refused_with_its_item(bench, item, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_method_options([item], ("creff", "fedhpro"))


def test_an_option_reaches_only_its_method_and_overrides_the_defaults(bench):
    args = argparse.Namespace(
        steps=25,
        clients=5,
        feature_dim=32,
        rounds=2,
        method_options={"fedhpro": {"hpcl_weight": 0, "steps_per_round": 7}},
    )
    fedhpro = bench.config("fedhpro", 1.0, 0, args)["method"]
    creff = bench.config("creff", 1.0, 0, args)["method"]
    assert fedhpro["hpcl_weight"] == 0 and fedhpro["steps_per_round"] == 7
    assert "hpcl_weight" not in creff and creff["steps_per_round"] == 25
    assert bench.config("fedhpro", math.inf, 0, args).get("privacy") is None


def test_the_final_training_loss_is_the_last_round(bench, tmp_path):
    rows = ['{"round": 1, "train_loss": 2.5}', '{"round": 2, "train_loss": 1.25}', ""]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows))
    assert bench.final_train_loss(tmp_path) == 1.25


def test_the_last_rounds_accuracy_averages_the_evaluated_rounds(bench, tmp_path):
    rows = [{"round": r, "global_acc": a} for r, a in [(1, 0.1), (2, 0.2), (3, None), (4, 0.5), (5, 0.3)]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert bench.last_rounds_global_acc(tmp_path) == pytest.approx((0.2 + 0.5 + 0.3) / 3)
    assert bench.last_rounds_global_acc(tmp_path, rounds=1) == pytest.approx(0.3)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "personal_acc_mean": 0.9}))
    assert bench.last_rounds_global_acc(tmp_path) is None
