"""Two rounds of every method's client step on small random data with fixed generators: the replies,
client states and metrics that the per-client path produced before its objectives were rewritten as
one per-example-weighted loss (tests/data/objective_reference.npz; regenerate only on purpose with
``python tests/objective_reference.py``)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.config import ModelConfig, PrivacyConfig

REFERENCE = pathlib.Path(__file__).parent / "data" / "objective_reference.npz"
TASK = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
CASES = {
    "local": ("local", {}, None),
    "fedavg": ("fedavg", {"momentum": 0.5}, None),
    "fedprox": ("fedprox", {"mu": 0.5}, None),
    "fedproto": ("fedproto", {"local_epochs": 2}, None),
    "fedproto-shared": ("fedproto", {"model_sharing": "fedavg", "optimizer": "adam", "lr": 0.01}, None),
    # recorded under the rule that was the default then (VPDR: fixed features, replace-one)
    "fedproto-igpp": (
        "fedproto",
        {},
        PrivacyConfig(
            mechanism="igpp",
            epsilon=4.0,
            planned_releases=3,
            sensitivity="fixed-features",
            relation="replace-one",
            bound_uploads=False,
        ),
    ),
    "fpl": ("fpl", {"lr": 0.01}, None),
    "fedtgp": ("fedtgp", {"server_epochs": 2}, None),
    "creff": ("creff", {"match_steps": 3, "retrain_epochs": 2, "features_per_class": 4, "grad_samples": 5}, None),
    "fedhpro": (
        "fedhpro",
        {
            "match_steps": 3,
            "retrain_epochs": 2,
            "features_per_class": 4,
            "grad_samples": 5,
            "hp_steps": 3,
            "distill_augmentation": "none",
            "local_epochs": 2,
        },
        None,
    ),
}


def clients(sizes=(23, 7, 40)):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(TASK.num_classes, *TASK.input_shape, generator=g) * 2
    out = []
    for k, n in enumerate(sizes):
        y = torch.randint(0, TASK.num_classes, (n + 4,), generator=g)
        x = means[y] + torch.randn(n + 4, *TASK.input_shape, generator=g)
        out.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    return out


def flatten(prefix, value, out):
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(f"{prefix}/{i}", v, out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.detach().numpy().copy()
    else:
        out[prefix] = np.asarray(value)


def outcome(case: str) -> dict[str, np.ndarray]:
    """Everything two rounds of ``case``'s per-client steps produce, flattened to named arrays."""
    name, options, privacy = CASES[case]
    algo = get_algorithm(name).from_options({"batch_size": 8, **options}, TASK, privacy)
    data = clients()
    server = algo.init_server_state(0)
    states = [algo.init_client_state(0) for _ in data]
    out: dict[str, np.ndarray] = {}
    for r in range(2):
        received = algo.broadcast(server)
        replies = []
        for k, d in enumerate(data):
            g = torch.Generator().manual_seed(1000 * r + k)
            states[k], reply, metrics = algo.client_step(states[k], d, received, g)
            replies.append(reply)
            flatten(f"{case}/{r}/{k}/reply", dict(reply.arrays), out)
            flatten(f"{case}/{r}/{k}/state", states[k], out)
            flatten(f"{case}/{r}/{k}/metrics", metrics, out)
            out[f"{case}/{r}/{k}/next_draw"] = torch.rand(2, generator=g).numpy()
        if algo.communicates:
            server, _ = algo.server_step(server, replies)
    return out


if __name__ == "__main__":
    arrays = {}
    for case in CASES:
        arrays.update(outcome(case))
    np.savez_compressed(REFERENCE, **arrays)
    print(f"{len(arrays)} arrays -> {REFERENCE}")
