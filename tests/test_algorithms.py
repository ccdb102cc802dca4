"""Aggregation rules and client steps, checked against direct computations."""

import numpy as np
import pytest
import torch

from protofl.algorithms import ALGORITHMS, ClientData, Task
from protofl.algorithms.base import arrays_to_params
from protofl.algorithms.fedproto import aggregate_prototypes
from protofl.config import ModelConfig
from protofl.payload import Payload, validate
from protofl.prototypes import PrototypeAccumulator

TASK = Task(input_shape=(12,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=8))


def client(k, n=30, classes=(0, 1, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed + k)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 12, generator=g) + y[:, None].float()
    return ClientData(k, x, y, x[:10], y[:10])


def test_fedavg_server_step_is_the_sample_weighted_mean():
    algo = ALGORITHMS["fedavg"].from_options({}, TASK)
    models = [algo.initial_params(seed) for seed in range(3)]
    counts = [5, 1, 14]
    replies = []
    for params, n in zip(models, counts):
        arrays = {f"param/{k}": v.numpy() for k, v in params.items()}
        arrays["num_samples"] = np.array(n)
        replies.append(Payload(arrays, {"method": "fedavg"}))
    for reply in replies:
        validate(reply, algo.reply_spec())
    state, _ = algo.server_step({}, replies)
    for name in models[0]:
        expected = sum(n * m[name] for m, n in zip(models, counts)) / sum(counts)
        torch.testing.assert_close(state["params"][name], expected)


def test_fedavg_client_step_returns_a_valid_trained_model():
    algo = ALGORITHMS["fedavg"].from_options({"lr": 0.1}, TASK)
    server = algo.init_server_state(0)
    received = Payload.from_bytes(algo.broadcast(server).to_bytes())
    _, reply, metrics = algo.client_step({}, client(0), received, torch.Generator().manual_seed(0))
    validate(reply, algo.reply_spec())
    assert int(reply["num_samples"]) == 30
    moved = [not torch.equal(arrays_to_params(reply)[k], server["params"][k]) for k in server["params"]]
    assert any(moved) and np.isfinite(metrics["train_loss"])


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_global():
    data = client(1)
    results = {}
    for name, opts in [("fedavg", {}), ("fedprox0", {"mu": 0.0}), ("fedprox", {"mu": 10.0})]:
        algo = ALGORITHMS[name.rstrip("0")].from_options({"lr": 0.1, "local_epochs": 3, **opts}, TASK)
        server = algo.init_server_state(0)
        received = Payload.from_bytes(algo.broadcast(server).to_bytes())
        _, reply, _ = algo.client_step({}, data, received, torch.Generator().manual_seed(0))
        params = arrays_to_params(reply)
        results[name] = sum(float(((params[k] - server["params"][k]) ** 2).sum()) for k in params)
    assert results["fedprox0"] == pytest.approx(results["fedavg"], rel=1e-6)
    assert results["fedprox"] < 0.5 * results["fedavg"]


def proto_reply(classes, protos, counts):
    return Payload(
        {
            "classes": np.array(classes, dtype=np.int64),
            "prototypes": np.array(protos, dtype=np.float32),
            "counts": np.array(counts, dtype=np.int64),
        },
        {"method": "fedproto"},
    )


def test_fedproto_aggregation_weighted_and_unweighted():
    replies = [
        proto_reply([0, 2], [[1.0, 0.0], [2.0, 2.0]], [3, 1]),
        proto_reply([2, 3], [[4.0, 0.0], [5.0, 5.0]], [3, 2]),
    ]
    classes, protos = aggregate_prototypes(replies, 4, 2, weighted=True)
    assert classes.tolist() == [0, 2, 3]
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [(2 + 12) / 4, 2 / 4], [5.0, 5.0]]))
    classes, protos = aggregate_prototypes(replies, 4, 2, weighted=False)
    torch.testing.assert_close(protos[1], torch.tensor([3.0, 1.0]))


def test_fedproto_client_uploads_per_class_mean_features_of_its_trained_model():
    algo = ALGORITHMS["fedproto"].from_options({"lr": 0.05}, TASK)
    data = client(2, classes=(1, 3))
    state = algo.init_client_state(0)
    received = Payload.from_bytes(algo.broadcast(algo.init_server_state(0)).to_bytes())
    new_state, reply, _ = algo.client_step(state, data, received, torch.Generator().manual_seed(0))
    validate(reply, algo.reply_spec())
    assert reply["classes"].tolist() == [1, 3]
    z, _ = algo.forward(new_state["params"], data.x_train)
    for c, proto, count in zip(reply["classes"], reply["prototypes"], reply["counts"]):
        mask = data.y_train == int(c)
        assert count == int(mask.sum())
        np.testing.assert_allclose(proto, z[mask].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_fedproto_alignment_term_pulls_features_to_global_prototypes():
    data = client(3)
    received_state = {"classes": torch.arange(4), "prototypes": torch.full((4, 6), 1.0)}
    distances = {}
    for weight in (0.0, 5.0):
        algo = ALGORITHMS["fedproto"].from_options(
            {"lr": 0.01, "local_epochs": 20, "batch_size": 10, "proto_weight": weight}, TASK
        )
        received = Payload.from_bytes(algo.broadcast(received_state).to_bytes())
        state, _, _ = algo.client_step(algo.init_client_state(0), data, received, torch.Generator().manual_seed(0))
        z, _ = algo.forward(state["params"], data.x_train)
        distances[weight] = float(((z - 1.0) ** 2).mean())
    assert distances[5.0] < 0.5 * distances[0.0]


def test_prototype_accumulator_merge_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 3, generator=g)
    y = torch.randint(0, 5, (50,), generator=g)
    whole = PrototypeAccumulator(5, 3)
    whole.update(z, y)
    a, b = PrototypeAccumulator(5, 3), PrototypeAccumulator(5, 3)
    a.update(z[:20], y[:20])
    b.update(z[20:], y[20:])
    a.merge(b)
    for x, w in zip(a.compute(), whole.compute()):
        torch.testing.assert_close(x, w)
    classes, protos, counts = whole.compute()
    for c, p in zip(classes, protos):
        torch.testing.assert_close(p, z[y == c].mean(0))
    whole.reset()
    assert len(whole.compute()[0]) == 0
