"""Principle 1: every number in a configuration is finite and bounded by what the machine can do.

Each bad value is refused at configuration time, before any work: exit code 2, one line naming the key
(and the allowed range), no traceback, no run folder created.
"""

import dataclasses

import pytest
from _hardening import one_error_line

import protofl
from protofl.api import resolve_config
from protofl.cli import main
from protofl.config import RunConfig, from_mapping
from protofl.errors import ConfigError, ProtoflError


@pytest.mark.parametrize(
    "override, key",
    [
        ("partition.imbalance_factor=inf", "partition.imbalance_factor"),  # trained, then crashed writing the report
        ("partition.alpha=nan", "partition.alpha"),
        ("privacy.epsilon=1e300", "privacy.epsilon"),  # dp-accounting's bracket search failed
        ("privacy.epsilon=500", "privacy.epsilon"),  # the PLD calibration takes minutes
        ("privacy.delta=1e-300", "privacy.delta"),
        ("privacy.planned_releases=1000000000000", "privacy.planned_releases"),
        ("method.weight_decay=inf", "method.weight_decay"),  # was accepted: every reply rejected, exit 0
        ("method.lr=nan", "method.lr"),
        ("method.lr=1e300", "method.lr"),
        ("federation.rounds=100000000000000000000000", "federation.rounds"),  # past int64, was accepted
        ("federation.rounds=9223372036854775807", "federation.rounds"),
        ("seed=4294967296", "seed"),  # numpy's wording, not the key
        ("model.feature_dim=1000000000", "model.feature_dim"),
        ("data.image_size=100000", "data.image_size"),
        ("partition.num_clients=10000000000", "partition.num_clients"),
        ("data.dataset=synthetic-gaussian:train=1000000000000", "data.dataset"),  # 10^12 rows
        ("data.dataset=synthetic-gaussian:train=10000000,dim=60000", "data.dataset"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(tmp_path, capsys, override, key):
    out = tmp_path / "run"
    code = main(["run", "--set", "data.dataset=optdigits", "--set", override, "--out", str(out)])
    assert code == 2
    one_error_line(capsys.readouterr().err, key)
    assert not out.exists()  # refused before anything was written


def test_the_message_gives_the_allowed_range():
    with pytest.raises(ConfigError, match=r"federation\.rounds: must be an integer in \[1, 1000000\]"):
        resolve_config(RunConfig(), ["federation.rounds=10000000000"])
    with pytest.raises(ConfigError, match=r"method\.lr: must be a finite number in \[-1e\+15, 1e\+15\], got inf"):
        resolve_config(RunConfig(), ["method.lr=inf"])


def test_max_train_samples_below_the_class_count_names_the_key(tmp_path, capsys):
    # scikit-learn's own wording ("The train_size = 5 should be greater or equal to the number of classes") before
    code = main(
        ["run", "--set", "data.dataset=optdigits", "--set", "data.max_train_samples=5", "--out", str(tmp_path / "r")]
    )
    assert code == 2
    one_error_line(capsys.readouterr().err, "data.max_train_samples", "10 classes")


def test_directly_built_sections_are_bounded_too():
    from protofl.config import PartitionConfig, PrivacyConfig

    with pytest.raises(ConfigError, match="imbalance_factor"):
        PartitionConfig(imbalance_factor=float("inf"))
    with pytest.raises(ConfigError, match="planned_releases"):
        PrivacyConfig(planned_releases=10**12)
    with pytest.raises(ConfigError, match="seed"):
        RunConfig(seed=2**40)


def test_every_method_config_is_bounded_through_from_mapping():
    # Each method's Config is built through from_mapping: an infinite float or a huge integer in any
    # numeric field is refused, naming the field.
    from protofl.algorithms import ALGORITHMS

    checked = 0
    for _name, cls in sorted(ALGORITHMS.items()):
        for f in dataclasses.fields(cls.Config):
            default = f.default
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            bad = float("inf") if isinstance(default, float) else 2**70
            with pytest.raises(ConfigError, match=f"method.{f.name}"):
                from_mapping(cls.Config, {f.name: bad}, "method.")
            checked += 1
    assert checked > 20


def test_config_path_that_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "conf.toml"
    folder.mkdir()
    assert main(["run", str(folder), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys.readouterr().err, str(folder), "folder")


def test_config_file_that_is_not_text(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys.readouterr().err, str(path))


@pytest.mark.parametrize("bad", [None, 42, ["seed"]])
def test_run_with_no_config_is_a_typed_error(tmp_path, bad):
    with pytest.raises(ConfigError, match="config: expected a RunConfig") as info:
        protofl.run(bad)
    assert isinstance(info.value, ProtoflError)


def test_defaults_and_a_large_but_sane_config_still_pass():
    config = resolve_config(
        RunConfig(),
        [
            "federation.rounds=1000000",
            "seed=4294967295",
            "privacy.epsilon=100",
            "privacy.mechanism=igpp",
            "method.name=fedproto",
            "privacy.planned_releases=10000",
        ],
    )
    assert config.federation.rounds == 10**6 and config.seed == 2**32 - 1
