import pytest


@pytest.fixture
def small_config():
    """A quick real run: OptDigits (scikit-learn's digits, no fetch), 4 clients, 3 rounds."""
    return {
        "seed": 3,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "iid", "num_clients": 4},
        "federation": {"rounds": 3, "progress": False},
        "model": {"feature_dim": 32},
        "method": {"name": "fedavg", "lr": 0.1, "batch_size": 32, "local_epochs": 3},
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data cache for this test (PROTOFL_CACHE points to it)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PROTOFL_CACHE", str(root))
    return root
