"""The privacy layer: one [privacy] section for every mechanism, accountants from a registry, lazy and
memoised calibration (in the process and across processes), and every method's spend going through it."""

from __future__ import annotations

import json

import pytest
import torch

from protofl.algorithms import Task, get_algorithm
from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy import (
    ACCOUNTANTS,
    LEDGER_KEY,
    DPSGDLayer,
    IGPPLayer,
    RdpAccountant,
    VPPLayer,
    accounting,
    calibrate_noise_multiplier,
    create_accountant,
    create_privacy_layer,
    register_accountant,
    remember_calibrations,
)


@pytest.fixture
def count_calibrations(monkeypatch):
    """Count the root searches (not the memoised answers), starting from an empty memo."""
    calls = []
    real = accounting._calibrate
    monkeypatch.setattr(accounting, "_CALIBRATIONS", {})

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(accounting, "_calibrate", counted)
    yield calls
    remember_calibrations(None)


def test_a_registered_accountant_is_created_by_name_and_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(accounting, "ACCOUNTANTS", dict(ACCOUNTANTS))

    @register_accountant
    class Doubled(RdpAccountant):
        name = "doubled-rdp"

        def epsilon(self, delta):
            return 2 * super().epsilon(delta)

    acc = create_accountant("doubled-rdp").compose(accounting.GaussianEvent(2.0), 3)
    assert acc.epsilon(1e-5) == pytest.approx(
        2 * create_accountant("rdp").compose(accounting.GaussianEvent(2.0), 3).epsilon(1e-5)
    )
    with pytest.raises(ValueError, match="registered twice"):
        register_accountant(type("Other", (RdpAccountant,), {"name": "doubled-rdp"}))
    with pytest.raises(ValueError, match="unknown accountant 'nope'; valid: doubled-rdp, pld, rdp"):
        create_accountant("nope")


def test_calibration_is_memoised_in_the_process_and_remembered_across_processes(tmp_path, count_calibrations):
    first = calibrate_noise_multiplier(2.0, 1e-5, 5, "rdp")
    again = calibrate_noise_multiplier(2.0, 1e-5, 5, "rdp")
    assert first == again and len(count_calibrations) == 1
    other = calibrate_noise_multiplier(2.0, 1e-5, 6, "rdp")  # another plan: another search
    assert other > first and len(count_calibrations) == 2  # more releases, more noise
    # a fresh process (empty memo) with a calibration file: one search, then none
    store = tmp_path / "calibration.json"
    remember_calibrations(store)
    accounting._CALIBRATIONS.clear()
    assert calibrate_noise_multiplier(2.0, 1e-5, 5, "rdp") == first and len(count_calibrations) == 3
    assert list(json.loads(store.read_text()).values()) == [first]
    accounting._CALIBRATIONS.clear()
    assert calibrate_noise_multiplier(2.0, 1e-5, 5, "rdp") == first and len(count_calibrations) == 3
    store.write_text("{torn")  # a torn file is recalibrated, not trusted
    accounting._CALIBRATIONS.clear()
    assert calibrate_noise_multiplier(2.0, 1e-5, 5, "rdp") == first and len(count_calibrations) == 4


def test_building_a_private_method_calibrates_nothing_until_its_first_release(count_calibrations):
    privacy = PrivacyConfig(mechanism="igpp", epsilon=3.0, accountant="rdp", planned_releases=4)
    algo = get_algorithm("fedproto").from_options({}, Task((8,), 3), privacy)
    assert isinstance(algo.privacy_layer, IGPPLayer) and count_calibrations == []
    z, y = torch.randn(12, algo.dim), torch.arange(12) % 3
    release, ledger = algo.privacy_layer.release(z, y, torch.Generator().manual_seed(0), {}, "client 0")
    assert len(count_calibrations) == 1
    assert algo.privacy_layer.noise_multiplier == calibrate_noise_multiplier(3.0, 1e-5, 4, "rdp")
    assert ledger == [(accounting.GaussianEvent(algo.privacy_layer.noise_multiplier).to_dict(), 1)]
    assert release.prototypes.shape == (3, algo.dim)


def test_vpp_layer_spends_its_selection_and_its_gaussian_in_one_ledger():
    layer = create_privacy_layer(PrivacyConfig(mechanism="vpp", epsilon=2.0, accountant="rdp", planned_releases=5), 3)
    assert isinstance(layer, VPPLayer) and layer.selection_epsilon == pytest.approx(0.1 * 2.0 / 5)
    state: dict = {}
    for _ in range(5):
        state = {LEDGER_KEY: layer.spend(state, layer.release_events(), "client 0")}
    ledger = layer.ledger(state)
    assert ledger.epsilon() <= 2.0 * (1 + 1e-9)
    with pytest.raises(accounting.BudgetExceededError, match="client 0"):
        layer.check_next(state, "client 0")


def test_dp_sgd_layer_noise_equals_an_independent_calibration_per_sampling_rate():
    layer = create_privacy_layer(
        PrivacyConfig(mechanism="dp-sgd", epsilon=4.0, delta=1e-4, accountant="rdp", planned_releases=3, clip_norm=0.7),
        10,
    )
    assert isinstance(layer, DPSGDLayer) and layer.clip_norm == 0.7
    for rate in (0.1, 0.25):
        assert layer.noise_multiplier(rate, 30) == calibrate_noise_multiplier(4.0, 1e-4, 30, "rdp", sampling_rate=rate)
    report = layer.report([{}])
    assert report["mechanism"] == "dp-sgd" and report["noise_multipliers"] == sorted(layer.used.values())


def test_one_section_refuses_what_no_method_or_mechanism_can_honour():
    with pytest.raises(ConfigError, match="mechanism: 'dpsgd' is not one of"):
        PrivacyConfig(mechanism="dpsgd")
    with pytest.raises(ConfigError, match="privacy.dcr"):
        from protofl.api import resolve_config

        resolve_config({"privacy": {"mechanism": "dp-sgd", "dcr": True}, "method": {"name": "dpfedavg"}})
    with pytest.raises(ConfigError, match="clip_norm"):
        PrivacyConfig(mechanism="dp-sgd", clip_norm=float("inf"))
    with pytest.raises(ConfigError, match="planned_releases: must be resolved"):
        create_privacy_layer(PrivacyConfig(mechanism="igpp"), 3)


def test_planned_releases_is_resolved_once_from_the_rounds():
    from protofl.api import resolve_config

    config = resolve_config(
        {"federation": {"rounds": 7}, "privacy": {"mechanism": "dp-sgd"}, "method": {"name": "dpfedavg"}}
    )
    assert config.privacy.planned_releases == 7
    explicit = resolve_config(
        {
            "federation": {"rounds": 7},
            "privacy": {"mechanism": "igpp", "planned_releases": 9},
            "method": {"name": "fedproto"},
        }
    )
    assert explicit.privacy.planned_releases == 9
    assert resolve_config({"federation": {"rounds": 7}}).privacy.planned_releases == 0  # nothing to plan
