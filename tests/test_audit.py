"""The one-run privacy audit (``protofl audit``): it passes correct mechanisms, and it FAILS broken ones.

Every audit here runs the real pipeline (in-process engine, round driver, privacy layer, ledgers) on
OptDigits. A correct mechanism must give ε_lower ≤ ε (and, with enough canaries at a large ε, a positive
bound, which shows the canaries are really inserted and scored); a deliberately broken one (noise scaled
down, seeded noise replayed by the server) must give ε_lower > ε at a small claimed ε.
"""

from __future__ import annotations

import json

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
        "method": {"name": "dpfedavg", "steps_per_round": 5, "batch_size": 32},
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
