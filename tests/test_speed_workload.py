"""The ``synthetic-gaussian`` benchmark workload (the speed benchmark's): what it generates, that it
is deterministic, that a run configuration can name it, and clear errors on bad options."""

from __future__ import annotations

import numpy as np
import pytest

from protofl.config import ConfigError
from protofl.data import load_dataset
from protofl.data.datasets import synthetic_gaussian


def test_classes_are_gaussians_around_their_means_and_the_draw_is_deterministic():
    a = load_dataset("synthetic-gaussian:train=20000,test=500,dim=8,classes=4,seed=3")
    b = synthetic_gaussian(train=20000, test=500, dim=8, classes=4, seed=3)
    assert a.train.x.shape == (20000, 8) and a.test.x.shape == (500, 8)
    assert a.train.x.dtype == np.float32 and a.train.y.dtype == np.int64 and a.num_classes == 4
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, synthetic_gaussian(train=20000, test=500, dim=8, classes=4, seed=4).train.x)
    # Labels about uniform; within a class, unit-variance noise around one mean shared by train and test.
    assert np.bincount(a.train.y, minlength=4).min() > 4500
    means = np.stack([a.train.x[a.train.y == c].mean(0) for c in range(4)])
    residual = a.train.x - means[a.train.y]
    assert residual.std(0) == pytest.approx(np.ones(8), abs=0.03)
    test_means = np.stack([a.test.x[a.test.y == c].mean(0) for c in range(4)])
    assert np.abs(test_means - means).max() < 0.6  # ~125 test samples a class: standard error 0.09
    # The nearest class mean labels the held-out set well above chance (0.25): the classes are real.
    nearest = ((a.test.x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == a.test.y).mean() > 0.8


def test_defaults_and_bad_options():
    d = load_dataset("synthetic-gaussian")
    assert d.train.x.shape == (2000, 32) and d.test.x.shape == (200, 32) and d.num_classes == 10
    with pytest.raises(ValueError, match="keys train, test, dim, classes, seed"):
        load_dataset("synthetic-gaussian:samples=10")
    with pytest.raises(ValueError, match="dim must be an integer"):
        load_dataset("synthetic-gaussian:dim=3.5")
    with pytest.raises(ValueError, match="classes must be an integer >= 2"):
        load_dataset("synthetic-gaussian:classes=1")


def test_a_run_configuration_names_it_and_every_client_gets_its_share():
    from protofl.api import prepare_data, resolve_config

    config = resolve_config(
        {
            "data": {"dataset": "synthetic-gaussian:train=2200,test=100,dim=16"},
            "partition": {"scheme": "iid", "num_clients": 10, "test_fraction": 1 / 11, "min_client_size": 2},
            "federation": {"rounds": 1, "progress": False},
            "method": {"name": "fedproto"},
        }
    )
    data = prepare_data(config)
    assert data.input_shape == (16,) and data.num_classes == 10 and len(data.clients) == 10
    assert sum(c.num_train + len(c.y_test) for c in data.clients) == 2200
    assert all(190 <= c.num_train <= 205 for c in data.clients)
    with pytest.raises(ConfigError, match="data.dataset: .*must be an integer"):
        resolve_config({"data": {"dataset": "synthetic-gaussian:train=lots"}, "method": {"name": "fedproto"}})
    with pytest.raises(ConfigError, match="data.dataset: .*classes must be an integer >= 2"):
        resolve_config({"data": {"dataset": "synthetic-gaussian:classes=1"}, "method": {"name": "fedproto"}})
