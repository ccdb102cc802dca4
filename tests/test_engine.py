"""The engine's boundary: malformed replies are rejected and the round goes on."""

import numpy as np
import pytest
import torch

from protofl.algorithms import ClientData, Task
from protofl.algorithms.fedavg import FedAvg
from protofl.algorithms.fedproto import FedProto
from protofl.config import FederationConfig, ModelConfig
from protofl.engine import Simulation, sample_clients
from protofl.payload import Payload

TASK = Task(input_shape=(8,), num_classes=3, model=ModelConfig(feature_dim=4, hidden_dim=6))


def clients(n=4):
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        y = torch.randint(0, 3, (24,), generator=g)
        x = torch.randn(24, 8, generator=g) + y[:, None]
        out.append(ClientData(k, x[:18], y[:18], x[18:], y[18:]))
    return out


class Corrupting(FedProto):
    """FedProto whose client 1 sends a broken reply of the kind given by ``fault``."""

    fault = "nan"

    def client_step(self, client_state, data, received, generator):
        state, reply, metrics = super().client_step(client_state, data, received, generator)
        if data.client_id != 1:
            return state, reply, metrics
        arrays = dict(reply.arrays)
        if self.fault == "nan":
            arrays["prototypes"] = np.full_like(arrays["prototypes"], np.nan)
        elif self.fault == "shape":
            arrays["prototypes"] = arrays["prototypes"][:, :2].copy()
        elif self.fault == "class":
            arrays["classes"] = arrays["classes"] + 7
        elif self.fault == "method":
            return state, Payload(arrays, {"method": "fedavg"}), metrics
        return state, Payload(arrays, reply.metadata), metrics


@pytest.mark.parametrize("fault", ["nan", "shape", "class", "method"])
def test_a_malformed_reply_is_rejected_and_the_round_goes_on(fault, caplog):
    algo = Corrupting(Corrupting.Config(), TASK)
    algo.fault = fault
    sim = Simulation(
        algo,
        clients(),
        torch.randn(9, 8),
        torch.randint(0, 3, (9,)),
        FederationConfig(rounds=2, progress=False),
        seed=0,
    )
    with caplog.at_level("WARNING", logger="protofl.engine"):
        history = sim.run()
    assert [row["clients_rejected"] for row in history] == [1, 1]
    assert "rejected the reply of client 1" in caplog.text
    assert 1 not in sim.client_states  # the rejected client's update is not kept
    assert np.isfinite(sim.server_state["prototypes"].numpy()).all()
    assert len(sim.server_state["classes"]) == 3


def test_fedavg_zero_sample_count_is_rejected():
    class ZeroCount(FedAvg):
        def client_step(self, client_state, data, received, generator):
            state, reply, metrics = super().client_step(client_state, data, received, generator)
            return state, Payload({**reply.arrays, "num_samples": np.int64(0)}, reply.metadata), metrics

    sim = Simulation(
        ZeroCount(ZeroCount.Config(), TASK),
        clients(2),
        torch.randn(9, 8),
        torch.randint(0, 3, (9,)),
        FederationConfig(rounds=1, progress=False),
        seed=0,
    )
    history = sim.run()
    assert history[0]["clients_rejected"] == 2
    # no reply survived, so the global model is still the initial one
    for name, value in sim.server_state["params"].items():
        assert torch.equal(value, sim.algorithm.initial_params(0)[name])


def test_client_sampling_is_seeded_and_sized():
    a = sample_clients(100, 0.1, seed=1, round_index=3)
    assert a == sample_clients(100, 0.1, seed=1, round_index=3)
    assert a != sample_clients(100, 0.1, seed=1, round_index=4)
    assert len(a) == 10 and len(set(a)) == 10
    assert sample_clients(5, 0.01, seed=0, round_index=1) != []
    assert sample_clients(5, 1.0, seed=0, round_index=1) == [0, 1, 2, 3, 4]


def test_a_rejected_private_reply_still_counts_against_the_budget():
    from protofl.config import PrivacyConfig

    privacy = PrivacyConfig(mechanism="igpp", epsilon=2.0, planned_releases=2)
    algo = Corrupting(Corrupting.Config(), TASK, privacy)
    algo.fault = "shape"
    sim = Simulation(
        algo,
        clients(),
        torch.randn(9, 8),
        torch.randint(0, 3, (9,)),
        FederationConfig(rounds=2, progress=False),
        seed=0,
    )
    sim.run()
    spent = algo.privacy_report(sim.client_states)
    assert spent["max_releases_by_a_client"] == 2
    # client 1's replies were rejected, yet both of its releases were recorded (they went on the wire)
    assert (
        algo.privacy_layer.ledger(sim.client_states[1]).events == algo.privacy_layer.ledger(sim.client_states[0]).events
    )
    initial = algo.initial_params(0)
    assert all(torch.equal(v, initial[k]) for k, v in sim.client_states[1]["params"].items())  # its update is not kept
