"""FedGH, the method added as one file: clients keep their extractors and train under the global header;
the server trains that header on the uploaded prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import protofl
from protofl.algorithms import Task, get_algorithm
from protofl.config import ConfigError


def test_clients_train_and_evaluate_under_the_received_header_and_the_server_trains_it():
    torch.manual_seed(0)
    algo = get_algorithm("fedgh").from_options({"server_epochs": 30, "server_lr": 0.5, "batch_size": 16}, Task((6,), 3))
    server = algo.init_server_state(0)
    own = {k: v + 1.0 for k, v in algo.initial_params(0).items()}  # a client's own, distinct model
    received = algo.broadcast(server)
    params = algo.model_params({"params": own}, received)
    for k, v in params.items():  # its extractor, the global header
        expected = server["header"][k] if k.startswith("head.") else own[k]
        assert torch.equal(v, expected), k
    # Three clients whose class means are well apart: the trained header separates them.
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, algo.dim, generator=g) * 3
    replies = []
    for _ in range(3):
        protos = centres + 0.1 * torch.randn(3, algo.dim, generator=g)
        replies.append(
            protofl.payload.Payload(
                {"classes": np.arange(3), "prototypes": protos.numpy(), "counts": np.array([5, 5, 5])},
                {"method": "fedgh"},
            )
        )
    state, metrics = algo.server_step(server, replies)
    assert metrics["header_prototype_acc"] == 1.0 and metrics["header_loss"] < 0.3
    assert not torch.equal(state["header"]["head.weight"], server["header"]["head.weight"])
    assert int(state["round"]) == 1 and state["classes"].tolist() == [0, 1, 2]


def test_fedgh_learns_on_optdigits_and_reports_its_header():
    config = {
        "seed": 0,
        "data": {"dataset": "optdigits", "max_train_samples": 1500},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 4},
        "federation": {"rounds": 5, "progress": False, "execution": "batched"},
        "model": {"feature_dim": 32},
        "method": {"name": "fedgh", "lr": 0.1, "batch_size": 32, "local_epochs": 2},
    }
    result = protofl.run(config)
    final = result.summary["final"]
    assert final["personal_acc_mean"] > 0.7  # chance: 0.1
    last = result.history[-1]
    assert last["server_header_prototype_acc"] > 0.9 and last["execution"] == "batched"


def test_fedgh_shares_no_model_weights():
    with pytest.raises(ConfigError, match="model_sharing"):
        get_algorithm("fedgh").from_options({"model_sharing": "fedavg"}, Task((6,), 3))
