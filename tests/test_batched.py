"""Batched execution (``federation.execution = "batched"``) against the per-client reference path."""

import logging

import numpy as np
import pytest
import torch

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.config import (
    ConfigError,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
)
from protofl.engine import Simulation
from protofl.payload import Payload
from protofl.stacked import STACKED_STEP, VMAP_STEP
from protofl.training import (
    ClientBatch,
    batch_schedule,
    stack_params,
    train_local,
    unstack_params,
)

TASK = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
#: Unequal sizes: full batches, a short last batch, a client with fewer examples than one batch
#: (batch_size 16 below), and a client with twice the batches of the others.
SIZES = (40, 23, 7, 16, 70)


def make_clients(sizes=SIZES, task=TASK, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(task.num_classes, *task.input_shape, generator=g) * 2
    out = []
    for k, n in enumerate(sizes):
        y = torch.randint(0, task.num_classes, (n + 6,), generator=g)
        x = means[y] + torch.randn(n + 6, *task.input_shape, generator=g)
        out.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    return out


def run(name, options, execution, rounds=3, privacy=None, task=TASK, clients=None, batch_clients=2):
    algo = get_algorithm(name).from_options({"batch_size": 16, **options}, task, privacy)
    clients = clients or make_clients(task=task)
    fed = FederationConfig(
        rounds=rounds, checkpoint_every=0, progress=False, execution=execution, batch_clients=batch_clients
    )
    test_x = torch.randn(30, *task.input_shape, generator=torch.Generator().manual_seed(9))
    test_y = torch.randint(0, task.num_classes, (30,), generator=torch.Generator().manual_seed(9))
    sim = Simulation(algo, clients, test_x, test_y, fed, seed=5)
    sim.run()
    return sim


def assert_close_states(a, b, atol=2e-5):
    """Recursively compare two states (dicts of tensors, lists, numbers)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close_states(a[k], b[k], atol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
        else:
            assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_states(x, y, atol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=atol)
    else:
        assert a == b


def assert_same_runs(ref: Simulation, got: Simulation):
    assert ref.execution == "per-client" and got.execution == "batched"
    assert_close_states(ref.server_state, got.server_state)
    assert ref.client_states.keys() == got.client_states.keys()
    for k in ref.client_states:
        assert_close_states(ref.client_states[k], got.client_states[k])
    assert ref.bytes_up == got.bytes_up and ref.bytes_down == got.bytes_down
    assert len(ref.history) == len(got.history)
    for row_ref, row_got in zip(ref.history, got.history):
        assert row_got["execution"] == "batched"
        for key, value in row_ref.items():
            if key.endswith("seconds") or key == "execution":
                continue
            if isinstance(value, float):
                assert row_got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert row_got[key] == value, key


SERVED = [
    ("local", {}),
    ("fedavg", {}),
    ("fedprox", {"mu": 0.5}),
    ("fedproto", {}),
    ("fedproto", {"aggregation": "unweighted", "proto_weight": 2.0, "local_epochs": 2}),
    ("fedproto", {"model_sharing": "fedavg"}),
    ("fedtgp", {"server_epochs": 2}),
    ("fedgh", {"server_epochs": 2}),
    ("fpl", {"lr": 0.01}),
    ("fpl", {"lr": 0.01, "model_sharing": "none", "finch_level": "first", "optimizer": "adam"}),
    ("creff", {"features_per_class": 4, "match_steps": 3, "retrain_epochs": 2, "grad_samples": 5}),
    (
        "fedhpro",
        {
            "features_per_class": 4,
            "match_steps": 3,
            "retrain_epochs": 2,
            "grad_samples": 5,
            "hp_steps": 3,
            "distill_augmentation": "none",
            "client_margin": False,
            "local_epochs": 2,
        },
    ),
    (
        "fedhpro",
        {
            "features_per_class": 4,
            "match_steps": 3,
            "retrain_epochs": 2,
            "grad_samples": 5,
            "hp_steps": 3,
            "distill_augmentation": "none",
            "hpcl_weight": 0.0,
            "global_signal": "averaged",
        },
    ),
]


@pytest.mark.parametrize("name,options", SERVED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SERVED)])
def test_batched_run_equals_the_per_client_run(name, options):
    assert_same_runs(run(name, options, "per-client"), run(name, options, "batched"))


OPTIMIZERS = [
    {"optimizer": "sgd", "momentum": 0.0},
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
    {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001},
    {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05, "local_epochs": 3},
]


@pytest.mark.parametrize("options", OPTIMIZERS, ids=[o["optimizer"] + str(i) for i, o in enumerate(OPTIMIZERS)])
def test_batched_optimisers_match_torch_optim(options):
    # fedproto keeps per-client models, so optimiser state differences would accumulate over rounds.
    assert_same_runs(run("fedproto", options, "per-client"), run("fedproto", options, "batched"))


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_batched_fedproto_with_a_privacy_mechanism(mechanism):
    privacy = PrivacyConfig(mechanism=mechanism, epsilon=4.0, planned_releases=3)
    ref = run("fedproto", {}, "per-client", privacy=privacy)
    got = run("fedproto", {}, "batched", privacy=privacy)
    assert_same_runs(ref, got)
    assert got.history[-1]["privacy_epsilon_max"] == pytest.approx(ref.history[-1]["privacy_epsilon_max"])


def test_batched_images_through_vmap_over_convolutions():
    task = Task(input_shape=(1, 8, 8), num_classes=3, model=ModelConfig(feature_dim=5))
    clients = make_clients((12, 5, 20), task=task)
    ref = run("fedavg", {"lr": 0.05}, "per-client", rounds=2, task=task, clients=clients)
    got = run("fedavg", {"lr": 0.05}, "batched", rounds=2, task=task, clients=clients)
    assert_same_runs(ref, got)


def test_client_step_batched_replies_match_client_step_array_for_array():
    algo = get_algorithm("fedproto").from_options({"batch_size": 16}, TASK)
    clients = make_clients()
    # A trained state for half the clients, the shared initial one for the others; a non-empty broadcast.
    states = [algo.init_client_state(0) for _ in clients]
    states[1] = {"params": {k: v + 0.01 for k, v in states[1]["params"].items()}}
    received = Payload(
        {"classes": np.array([0, 2]), "prototypes": np.ones((2, 6), dtype=np.float32)}, {"method": "fedproto"}
    )
    gens = lambda: [torch.Generator().manual_seed(100 + k) for k in range(len(clients))]
    ref = [algo.client_step(s, d, received, g) for s, d, g in zip(states, clients, gens())]
    got = algo.client_step_batched(states, clients, received, gens())
    assert len(got) == len(ref)
    for (s_ref, r_ref, m_ref), (s_got, r_got, m_got) in zip(ref, got):
        assert_close_states(s_ref, s_got)
        assert r_ref.metadata == r_got.metadata and list(r_ref.arrays) == list(r_got.arrays)
        for key in r_ref.arrays:
            a, b = r_ref[key], r_got[key]
            assert a.shape == b.shape and a.dtype == b.dtype, key
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
        assert len(r_ref.to_bytes()) == len(r_got.to_bytes())
        assert m_got["train_loss"] == pytest.approx(m_ref["train_loss"], rel=1e-5)
    # The initial parameters are shared and must not have been trained in place.
    assert_close_states(algo.init_client_state(0), states[0])


def test_schedule_draws_the_same_batches_and_leaves_the_generators_as_train_local_does():
    clients = make_clients()
    batch = ClientBatch.of([d.x_train for d in clients], [d.y_train for d in clients])
    gens = [torch.Generator().manual_seed(k) for k in range(len(clients))]
    schedule = batch_schedule(batch, batch_size=16, epochs=2, generators=gens)
    assert schedule.steps.tolist() == [2 * -(-n // 16) for n in SIZES]
    for c, data in enumerate(clients):
        seen = []

        def record(params, x, y, weight, seen=seen):
            seen.append(y.clone())
            return (params["w"] * 0).sum() + x.sum() * 0

        g = torch.Generator().manual_seed(c)
        train_local(
            {"w": torch.zeros(1)},
            data.x_train,
            data.y_train,
            record,
            get_algorithm("local").Config(batch_size=16, local_epochs=2),
            g,
        )
        steps = int(schedule.steps[c])
        assert schedule.active[:steps, c].all() and not schedule.active[steps:, c].any()
        for s, y in enumerate(seen):
            real = schedule.weight[s, c] > 0
            assert torch.equal(batch.y[schedule.index[s, c][real]], y)
        # Both generators continue with the same stream (e.g. for a privacy mechanism's noise).
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=gens[c]))


def test_stack_and_unstack_round_trip_into_independent_tensors():
    params = [{"w": torch.full((2, 3), float(k)), "b": torch.tensor([k, -k], dtype=torch.float32)} for k in range(3)]
    stacked = stack_params(params)
    assert stacked["w"].shape == (3, 2, 3)
    back = unstack_params(stacked)
    for p, q in zip(params, back):
        assert torch.equal(p["w"], q["w"]) and torch.equal(p["b"], q["b"])
    back[0]["w"].add_(1)
    assert torch.equal(stacked["w"][0], params[0]["w"])  # clones, not views of the stack


@pytest.mark.parametrize(
    "name,options,privacy,reason",
    [
        ("dpfedavg", {}, PrivacyConfig(mechanism="dp-sgd", planned_releases=1), "client_step"),
        ("fedproto", {}, PrivacyConfig(dcr=True), "dcr"),
        ("fedhpro", {"distill_augmentation": "none"}, None, "client margin"),
    ],
)
def test_methods_that_cannot_be_batched_say_so_and_run_per_client(name, options, privacy, reason, caplog):
    algo = get_algorithm(name).from_options(options, TASK, privacy)
    assert reason in algo.batched_unsupported()
    clients = make_clients((20, 12))
    fed = FederationConfig(rounds=1, checkpoint_every=0, progress=False, execution="batched")
    with caplog.at_level(logging.WARNING, logger="protofl.engine"):
        sim = Simulation(algo, clients, clients[0].x_test, clients[0].y_test, fed, seed=0)
    assert sim.execution == "per-client"
    assert "running it per client" in caplog.text and reason in caplog.text


def test_served_methods_declare_themselves_batchable():
    for name, options in SERVED:
        assert get_algorithm(name).from_options(options, TASK).batched_unsupported() is None, name


def test_execution_is_validated():
    assert FederationConfig(execution="batched").execution == "batched"
    with pytest.raises(ConfigError, match="execution"):
        FederationConfig(execution="vectorised")
    with pytest.raises(ConfigError, match="batch_clients"):
        FederationConfig(batch_clients=0)
    assert (
        RunConfig.from_dict({"federation": {"execution": "batched", "batch_clients": 64}}).federation.batch_clients
        == 64
    )


def test_fingerprint_keeps_per_client_runs_and_separates_batched_ones():
    from protofl.api import fingerprint

    base = RunConfig()
    assert fingerprint(base) == fingerprint(base.replace("federation.batch_clients=7"))
    assert fingerprint(base) != fingerprint(base.replace("federation.execution=batched"))


def test_a_resumed_batched_run_repeats_the_uninterrupted_one(tmp_path):
    from protofl.engine import RunInterrupted

    def simulation(checkpoint_dir=None):
        algo = get_algorithm("fedproto").from_options({"batch_size": 16}, TASK)
        fed = FederationConfig(rounds=3, checkpoint_every=1, progress=False, execution="batched", batch_clients=3)
        clients = make_clients()
        return Simulation(
            algo,
            clients,
            clients[0].x_test,
            clients[0].y_test,
            fed,
            seed=2,
            checkpoint_dir=checkpoint_dir,
            fingerprint="f",
        )

    whole = simulation()
    whole.run()
    first = simulation(tmp_path / "ckpt")
    with pytest.raises(RunInterrupted):
        first.run(stop_after=1)
    resumed = simulation(tmp_path / "ckpt")
    assert resumed.resume() and resumed.round == 1
    resumed.run()
    assert_close_states(whole.server_state, resumed.server_state, atol=0)
    for k in whole.client_states:
        assert_close_states(whole.client_states[k], resumed.client_states[k], atol=0)


def test_protofl_run_records_the_execution_and_matches_per_client(small_config):
    import protofl

    small_config["federation"]["progress"] = False
    ref = protofl.run(small_config)
    small_config["federation"]["execution"] = "batched"
    got = protofl.run(small_config)
    assert ref.summary["execution"] == "per-client" and got.summary["execution"] == "batched"
    # which local step the batched rounds ran (protofl.stacked); the per-client run has none
    assert "batched_step" not in ref.summary and got.summary["batched_step"] in (STACKED_STEP, VMAP_STEP)
    assert all(row["execution"] == "batched" for row in got.history)
    for key in ("global_acc", "personal_acc_mean"):
        assert got.summary["final"][key] == pytest.approx(ref.summary["final"][key], abs=1e-6)
    assert got.history[-1]["train_loss"] == pytest.approx(ref.history[-1]["train_loss"], rel=1e-4)
