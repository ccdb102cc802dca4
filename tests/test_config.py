import pytest

from protofl.algorithms import ALGORITHMS
from protofl.api import resolve_config
from protofl.config import ConfigError, PartitionConfig, RunConfig


def test_defaults_round_trip_through_toml(tmp_path):
    config = resolve_config(RunConfig())
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert RunConfig.from_toml(path) == config


def test_overrides_parse_toml_literals():
    config = RunConfig().replace(
        "partition.alpha=0.1",
        "partition.scheme=dirichlet",
        "federation.progress=false",
        "method.name=fedprox",
        "method.mu=0.5",
    )
    assert config.partition.alpha == 0.1 and config.partition.scheme == "dirichlet"
    assert config.federation.progress is False
    assert config.method["mu"] == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("partition.alpha=0", "alpha: must be > 0"),
        ("partition.alpha=-1", "alpha"),
        ("partition.scheme=random", "scheme: 'random' is not one of dirichlet, domain, iid, pathological"),
        ("partition.num_clients=0", "num_clients: must be >= 1"),
        ("federation.client_fraction=1.5", "client_fraction: must be in (0, 1]"),
        ("federation.rounds=two", "rounds: expected an integer"),
        ("partition.colour=3", "partition.colour: unknown key"),
        ("method.lr=-1", "lr: must be > 0"),
        ("method.mu=0.1", "method.mu: unknown key"),
        ("method.name=fedfoo", "unknown method 'fedfoo'; valid methods are " + ", ".join(sorted(ALGORITHMS))),
        ("data.dataset=cifar-11", "unknown dataset 'cifar-11'; valid datasets are"),
        ("data.features=resnet", "data.features: 'resnet' is not one of"),
        ("novalue", "expected key=value"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(RunConfig(), [override])
    assert message in str(info.value)


def test_partition_config_is_frozen_and_validated():
    config = PartitionConfig()
    with pytest.raises(AttributeError):
        config.alpha = 2  # type: ignore[misc]
    with pytest.raises(ConfigError, match="test_fraction"):
        PartitionConfig(test_fraction=1.0)


def test_malformed_toml_is_reported_with_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "missing.toml")
