"""The one-run privacy audit (``protofl audit``): it passes correct mechanisms, and it FAILS broken ones.

Every audit here runs the real pipeline (in-process engine, round driver, privacy layer, ledgers) on
OptDigits. A correct mechanism must give ε_lower ≤ ε (and, with enough canaries at a large ε, a positive
bound, which shows the canaries are really inserted and scored); a deliberately broken one (noise scaled
down, seeded noise replayed by the server) must give ε_lower > ε at a small claimed ε.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protofl.config import ConfigError
from protofl.privacy.audit import AuditSettings, audit_run


def prototype_config(mechanism: str = "igpp", epsilon: float = 1.0, **privacy) -> dict:
    return {
        "seed": 1,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "iid", "num_clients": 4},
        "federation": {"rounds": 3, "progress": False, "threads": 1},
        "model": {"feature_dim": 32},
        "privacy": {"mechanism": mechanism, "epsilon": epsilon, "accountant": "rdp", **privacy},
        "method": {"name": "fedproto", "local_epochs": 1, "lr": 0.05, "batch_size": 32},
    }


def dpsgd_config(epsilon: float = 1.0) -> dict:
    return {
        "seed": 1,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "iid", "num_clients": 3},
        "federation": {"rounds": 2, "progress": False, "threads": 1},
        "privacy": {"mechanism": "dp-sgd", "epsilon": epsilon, "accountant": "rdp"},
        "method": {"name": "dpfedavg", "steps_per_round": 10, "batch_size": 128},
    }


def scaled_gaussian_noise(monkeypatch, factor: float) -> None:
    """A broken prototype release: the noise is ``factor`` times what was calibrated and reported."""
    from protofl.privacy import mechanisms

    honest = mechanisms.gaussian_noise
    monkeypatch.setattr(mechanisms, "gaussian_noise", lambda shape, std, gen: honest(shape, std, gen) * factor)


def scaled_dpsgd_noise(monkeypatch, factor: float) -> None:
    """A broken DP-SGD step: noise ``factor`` times the calibrated σ (the ledger still records σ)."""
    from protofl.algorithms import dpfedavg
    from protofl.privacy import dpsgd

    honest = dpsgd.add_noise

    def weak(summed, clip_norm, sigma, expected, generator):
        return honest(summed, clip_norm, sigma * factor, expected, generator)

    monkeypatch.setattr(dpsgd, "add_noise", weak)
    monkeypatch.setattr(dpfedavg, "add_noise", weak)


# -- correct mechanisms: ε_lower ≤ ε ---------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_correct_prototype_release_passes_with_a_positive_bound(mechanism, tmp_path):
    result = audit_run(prototype_config(mechanism, epsilon=8.0), AuditSettings(canaries=400), out=tmp_path / "a")
    assert result.design == "release"
    assert 0 < result.epsilon_lower <= result.epsilon
    record = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert record["verdict"] == "consistent"
    assert record["epsilon_lower"] == result.epsilon_lower
    assert len(record["scores"]) == 400
    assert (tmp_path / "a" / "audit_scores.png").stat().st_size > 0
    assert "## Privacy audit" in (tmp_path / "a" / "report.md").read_text()


def test_correct_prototype_release_at_a_small_epsilon_stays_below_it():
    result = audit_run(prototype_config("igpp", epsilon=1.0), AuditSettings(canaries=300))
    assert result.epsilon_lower <= result.epsilon


def test_correct_dpsgd_passes():
    result = audit_run(dpsgd_config(epsilon=8.0), AuditSettings(canaries=300))
    assert result.design == "gradient"
    assert 0 < result.epsilon_lower <= result.epsilon


# -- broken mechanisms: ε_lower > ε -------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_scaled_down_release_noise_fails(mechanism, monkeypatch):
    scaled_gaussian_noise(monkeypatch, 0.05)
    result = audit_run(prototype_config(mechanism, epsilon=1.0), AuditSettings(canaries=300))
    assert result.epsilon_lower > result.epsilon
    assert result.violated


def test_scaled_down_dpsgd_noise_fails(monkeypatch):
    scaled_dpsgd_noise(monkeypatch, 0.02)
    result = audit_run(dpsgd_config(epsilon=1.0), AuditSettings(canaries=300))
    assert result.epsilon_lower > result.epsilon


def test_seeded_noise_replayed_by_the_server_fails():
    config = prototype_config("igpp", epsilon=1.0)
    honest = audit_run(config, AuditSettings(canaries=200))
    replayed = audit_run(config, AuditSettings(canaries=200, replay_seed=True))
    assert honest.epsilon_lower <= honest.epsilon
    # The server rebuilds every client's draws from the run seed: each canary is exactly visible.
    assert replayed.correct == replayed.guesses > 0
    assert replayed.epsilon_lower > replayed.epsilon


def test_seeded_dpsgd_noise_replayed_by_the_server_fails():
    result = audit_run(dpsgd_config(epsilon=1.0), AuditSettings(canaries=200, replay_seed=True))
    assert result.epsilon_lower > result.epsilon


# -- the run folder: resume, report, command line ---------------------------------------------------


def test_a_killed_audit_resumes_to_the_same_result(tmp_path):
    from protofl.engine import RunInterrupted

    config, settings = prototype_config("igpp", epsilon=8.0), AuditSettings(canaries=200)
    whole = audit_run(config, settings, out=tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        audit_run(config, settings, out=tmp_path / "killed", stop_after=1)
    assert not (tmp_path / "killed" / "audit.json").exists()
    resumed = audit_run(config, settings, out=tmp_path / "killed", resume=True)
    first = json.loads((tmp_path / "whole" / "audit.json").read_text())
    second = json.loads((tmp_path / "killed" / "audit.json").read_text())
    # Round 1's scores came back from the checkpoint: the resumed audit is the uninterrupted one.
    assert second["scores"] == first["scores"]
    assert resumed.epsilon_lower == whole.epsilon_lower > 0


def test_resume_refuses_other_audit_settings(tmp_path):
    from protofl.engine import RunInterrupted

    config = prototype_config("igpp", epsilon=8.0)
    with pytest.raises(RunInterrupted):
        audit_run(config, AuditSettings(canaries=200), out=tmp_path / "a", stop_after=1)
    with pytest.raises(ConfigError, match="other settings"):
        audit_run(config, AuditSettings(canaries=300), out=tmp_path / "a", resume=True)


def test_command_line_audit_reports_and_exits_4_on_a_leak(tmp_path, capsys):
    from protofl.cli import main

    toml = tmp_path / "igpp.toml"
    toml.write_text(
        "seed = 1\n[data]\ndataset = 'optdigits'\n[partition]\nscheme = 'iid'\nnum_clients = 4\n"
        "[federation]\nrounds = 3\nprogress = false\nthreads = 1\n[model]\nfeature_dim = 32\n"
        "[privacy]\nmechanism = 'igpp'\nepsilon = 1.0\naccountant = 'rdp'\n"
        "[method]\nname = 'fedproto'\nlocal_epochs = 1\n"
    )
    assert main(["audit", str(toml), "--canaries", "100", "--out", str(tmp_path / "ok")]) == 0
    assert "consistent with the reported epsilon" in capsys.readouterr().out
    code = main(["audit", str(toml), "--canaries", "100", "--out", str(tmp_path / "leak"), "--replay-seed"])
    assert code == 4
    assert "LEAKS MORE" in capsys.readouterr().out
    record = json.loads((tmp_path / "leak" / "audit.json").read_text())
    assert record["verdict"] == "violated" and record["replay_seed"] is True
    assert "the run leaks more than its reported" in (tmp_path / "leak" / "report.md").read_text()


# -- bad input: one line, before any work -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "canaries", "message"),
    [
        ({"privacy": {"mechanism": "none"}, "method": {"name": "fedproto"}}, 100, "releases nothing"),
        ({}, 4, "cannot show any"),
        ({}, 10**6, "has room for"),
    ],
)
def test_audits_that_cannot_work_are_refused_in_one_line(change, canaries, message, tmp_path, capsys):
    from protofl.cli import main

    config = prototype_config("igpp")
    for key, value in change.items():
        config[key] = value
    toml = tmp_path / "c.toml"
    from protofl.config import RunConfig

    toml.write_text(RunConfig.from_dict(config).to_toml())
    assert main(["audit", str(toml), "--canaries", str(canaries), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_a_design_for_another_mechanism_is_refused():
    with pytest.raises(ConfigError, match="audit.design: 'gradient' audits dp-sgd"):
        audit_run(prototype_config("igpp"), AuditSettings(canaries=100, design="gradient"))


def test_bad_audit_settings_name_the_key():
    with pytest.raises(ConfigError, match="audit.canaries"):
        AuditSettings(canaries=0)
    with pytest.raises(ConfigError, match="audit.confidence"):
        AuditSettings(canaries=100, confidence=1.0)
    with pytest.raises(ConfigError, match="audit.design"):
        AuditSettings(canaries=100, design="everything")


def test_secret_noise_is_not_replayed_by_the_server():
    config = prototype_config("igpp", epsilon=1.0, noise="secret")
    result = audit_run(config, AuditSettings(canaries=200, replay_seed=True))
    assert result.epsilon_lower <= result.epsilon


# -- example canaries: the sensitivity rule on a trained feature map, and the counts ---------------


def example_config(epsilon: float = 1.0, **privacy) -> dict:
    """10 OptDigits clients and 10 rounds: one example canary per (client, round), 100 in all. A high
    learning rate and no prototype term, so one example moves the trained feature map a lot."""
    config = prototype_config("igpp", epsilon, **privacy)
    config["partition"]["num_clients"] = 10
    config["federation"]["rounds"] = 10
    config["method"].update({"lr": 0.1, "proto_weight": 0.0})
    return config


def test_fixed_features_on_a_trained_map_is_caught_by_example_canaries(monkeypatch, tmp_path):
    from protofl.privacy import statement

    # The run is refused before any work (rightly); let it start to show what the audit finds.
    monkeypatch.setattr(statement, "check_sensitivity", lambda *args, **kwargs: None)
    config = example_config(sensitivity="fixed-features")
    result = audit_run(config, AuditSettings(canaries=100, design="example"), out=tmp_path / "a")
    record = json.loads((tmp_path / "a" / "audit.json").read_text())
    # fixed-features claims one example moves a class sum by R; the trained map moves many rows.
    assert record["largest_separation"] > 2 * record["claimed_separation"]
    assert record["separations_over_claim"] > 10
    assert result.sensitivity_exceeded and result.violated
    assert record["verdict"] == "violated" and record["sensitivity_exceeded"] is True
    assert "sensitivity the run does not have" in (tmp_path / "a" / "report.md").read_text()


def test_counts_in_the_clear_under_add_remove_fail_the_example_audit(monkeypatch, tmp_path):
    from protofl.privacy import mechanisms

    honest = mechanisms._multipliers
    # A broken add/remove release: the counts carry (almost) no noise, the reported ε stays the same.
    monkeypatch.setattr(mechanisms, "_multipliers", lambda sigma, relation, f: (honest(sigma, relation, f)[0], 1e-6))
    result = audit_run(example_config(), AuditSettings(canaries=100, design="example"), out=tmp_path / "a")
    record = json.loads((tmp_path / "a" / "audit.json").read_text())
    scores, included = record["scores"], record["included_mask"]
    # An added example of a class changes its exact count by one: the scores split the coins perfectly.
    assert min(s for s, i in zip(scores, included) if i) > max(s for s, i in zip(scores, included) if not i)
    assert result.epsilon_lower > result.epsilon


def test_correct_defaults_pass_the_example_audit():
    from protofl.privacy import audit

    settings = AuditSettings(canaries=100, design="example")

    conclude = audit._conclude
    seen = {}

    def spy(config, settings, design, summary, run_dir):
        seen.update(design.findings())
        return conclude(config, settings, design, summary, run_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "_conclude", spy)
        result = audit_run(example_config(), settings)
    assert result.epsilon_lower <= result.epsilon
    assert not result.sensitivity_exceeded and not result.violated
    # The two worlds really differ (the canaries are in), and never by more than trained-features allows.
    assert 0 < seen["largest_separation"] <= seen["claimed_separation"]


@pytest.mark.parametrize(
    ("privacy", "settings", "message"),
    [
        ({"relation": "replace-one"}, {}, "privacy.relation"),
        ({}, {"replay_seed": True}, "audit.replay_seed"),
    ],
)
def test_example_audits_that_cannot_work_are_refused(privacy, settings, message):
    with pytest.raises(ConfigError, match=message):
        audit_run(example_config(**privacy), AuditSettings(canaries=100, design="example", **settings))


# -- FedHypeVAE: gradient canaries in the shared hypernetwork parameters ---------------------------


FEDHYPEVAE_AUDIT = Path(__file__).resolve().parents[1] / "configs" / "optdigits-audit-fedhypevae.toml"


def test_correct_fedhypevae_passes_the_gradient_audit():
    result = audit_run(FEDHYPEVAE_AUDIT, AuditSettings(canaries=2000), overrides=["privacy.epsilon=8"])
    assert result.design == "gradient"
    assert 0 < result.epsilon_lower <= result.epsilon


def test_scaled_down_fedhypevae_noise_fails(monkeypatch):
    from protofl.algorithms import fedhypevae
    from protofl.privacy import dpsgd

    honest = dpsgd.add_noise

    def weak(summed, clip_norm, sigma, expected, generator):
        return honest(summed, clip_norm, sigma * 0.02, expected, generator)

    monkeypatch.setattr(dpsgd, "add_noise", weak)
    monkeypatch.setattr(fedhypevae, "add_noise", weak)
    result = audit_run(FEDHYPEVAE_AUDIT, AuditSettings(canaries=2000), overrides=["privacy.epsilon=1"])
    assert result.epsilon_lower > result.epsilon


def test_a_killed_example_audit_resumes_to_the_same_result(tmp_path):
    from protofl.engine import RunInterrupted

    config, settings = example_config(), AuditSettings(canaries=40, design="example")
    config["federation"]["rounds"] = 4
    audit_run(config, settings, out=tmp_path / "whole")
    with pytest.raises(RunInterrupted):
        audit_run(config, settings, out=tmp_path / "killed", stop_after=2)
    audit_run(config, settings, out=tmp_path / "killed", resume=True)
    first = json.loads((tmp_path / "whole" / "audit.json").read_text())
    second = json.loads((tmp_path / "killed" / "audit.json").read_text())
    # Rounds 1-2's scores and separations came back from the checkpoint.
    assert second["scores"] == first["scores"]
    for key in ("largest_separation", "median_separation", "claimed_separation"):
        assert second[key] == first[key] > 0
