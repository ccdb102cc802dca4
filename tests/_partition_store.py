"""The small federation the partition-store tests share (the Flower many-nodes tests and the node that
builds its own split): OptDigits, 600 training rows, 5 clients under Dirichlet 1.0."""

from __future__ import annotations

CONFIG = {
    "seed": 4,
    "data": {"dataset": "optdigits", "max_train_samples": 600},
    "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 5},
    "federation": {"rounds": 2, "progress": False},
    "model": {"feature_dim": 16},
    "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32, "local_epochs": 1},
}
