"""Secret noise (``privacy.noise = secret``): a client's random draws come from a secret of its own, so
whoever knows the run seed cannot replay and remove the noise of its releases.

The two-sided replay check runs here in-process (the Flower versions are in tests/test_flower.py): with
seeded noise a replay from the run seed recovers the clean prototypes; with secret noise its error is
at least the noise scale.
"""

import shutil

import numpy as np
import pytest
import torch
from _replay import clean_prototypes, replay_error, replayed_prototypes

import protofl
from protofl.api import resolve_config
from protofl.config import PrivacyConfig
from protofl.engine import Simulation
from protofl.errors import ConfigError
from protofl.privacy.statement import noise_source, privacy_statement, shares_diagnostics, uses_secret_noise
from protofl.runner import build_algorithm, prepare_data
from protofl.seeds import SECRET_BYTES, new_secret, secret_seed

IGPP = {
    "seed": 5,
    "data": {"dataset": "optdigits", "max_train_samples": 600},
    "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 3},
    "federation": {"rounds": 1, "progress": False},
    "model": {"feature_dim": 16},
    "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32, "local_epochs": 2},
    # the release whose draws the replay repeats: class means plus Gaussian noise, exact counts
    "privacy": {"mechanism": "igpp", "epsilon": 8.0, "relation": "replace-one", "sensitivity": "trained-features"},
}


def _with_privacy(config, **privacy):
    return {**config, "privacy": {**config["privacy"], **privacy}}


def test_a_secret_seed_depends_on_the_secret_and_every_part():
    secret = new_secret()
    assert len(secret) == SECRET_BYTES and secret != new_secret()
    seed = secret_seed(secret, 3, 1)
    assert seed == secret_seed(secret, 3, 1)  # a restarted client draws the same
    assert 0 <= seed < 2**63
    assert len({seed, secret_seed(secret, 3, 2), secret_seed(secret, 4, 1), secret_seed(new_secret(), 3, 1)}) == 4
    with pytest.raises(ValueError, match="32 bytes"):
        secret_seed(b"short", 1)


def test_auto_noise_is_seeded_in_process_and_secret_on_flower():
    private = PrivacyConfig(mechanism="igpp")
    assert noise_source(private, "in-process") == "seeded" and noise_source(private, "flower") == "secret"
    assert not uses_secret_noise(private, "in-process") and uses_secret_noise(private, "flower")
    assert noise_source(PrivacyConfig(mechanism="igpp", noise="seeded"), "flower") == "seeded"
    assert uses_secret_noise(PrivacyConfig(mechanism="igpp", noise="secret"), "in-process")
    # nothing protected, nothing to keep secret: the draws stay reproducible
    assert not uses_secret_noise(PrivacyConfig(mechanism="none", noise="secret"), "flower")
    seeded = privacy_statement(PrivacyConfig(mechanism="igpp", noise="seeded"), "flower")
    assert any("(on Flower: the server) can replay" in line for line in seeded["not_covered"])
    assert not any("replay" in line for line in privacy_statement(private, "flower")["not_covered"])
    # the clients' diagnostics: the experimenter's own measurement in-process, kept on Flower's nodes
    assert shares_diagnostics(private, "in-process") and not shares_diagnostics(private, "flower")
    assert shares_diagnostics(PrivacyConfig(mechanism="igpp", share_diagnostics=True), "flower")
    assert shares_diagnostics(PrivacyConfig(), "flower")  # no mechanism: nothing protected
    assert "not a release" in privacy_statement(private, "in-process")["diagnostics"]
    assert privacy_statement(private, "flower")["diagnostics"].startswith("kept on the nodes")
    with pytest.raises(ConfigError, match="noise"):
        PrivacyConfig(mechanism="igpp", noise="os")


def _in_process_round(config):
    """One round in-process; the replies the server aggregated (client order) and each client's clean
    prototypes (from its state, which the server never sees)."""
    config = resolve_config(config)
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    algo = build_algorithm(config, data)
    replies = []
    server_step = algo.server_step

    def recording(state, accepted):
        replies.extend(accepted)
        return server_step(state, accepted)

    algo.server_step = recording
    sim = Simulation(algo, data.clients, data.test_x, data.test_y, config.federation, config.seed)
    sim.run()
    assert len(replies) == len(data.clients)
    clean = [
        clean_prototypes(algo, sim.client_states[k], data.clients[k], config.privacy.clip_bound)
        for k in range(len(data.clients))
    ]
    return config, build_algorithm(config, data), replies, clean, sim


def test_in_process_a_replay_from_the_seed_removes_seeded_noise_but_not_secret_noise():
    errors = {}
    for noise in ("seeded", "secret"):
        config, server_algo, replies, clean, _ = _in_process_round(_with_privacy(IGPP, noise=noise))
        errors[noise] = []
        for k, reply in enumerate(replies):
            recovered, std = replayed_prototypes(server_algo, config.seed, 1, k, reply)
            assert recovered.shape == clean[k].shape
            errors[noise].append(replay_error(recovered, clean[k], std))
    # seeded: the replay recovers the clean prototypes to float32 rounding of the noisy ones
    assert max(errors["seeded"]) < 1e-4, errors
    # secret: what the replay subtracts is an independent draw (error about sqrt(2) noise scales)
    assert min(errors["secret"]) >= 1.0, errors


def test_in_process_secret_noise_is_kept_in_the_checkpoint_and_a_resume_repeats_the_draws(tmp_path):
    """Two resumes of one interrupted secret-noise run draw the same (the clients' secrets come back from the
    checkpoint); a second run with fresh secrets draws differently."""
    config = _with_privacy(
        {**IGPP, "federation": {"rounds": 2, "progress": False, "checkpoint_every": 1}}, noise="secret"
    )
    with pytest.raises(protofl.engine.RunInterrupted):
        protofl.run(config, out=tmp_path / "a", stop_after=1)
    state = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=True)
    assert state["transport"] == "in-process"
    assert sorted(state["client_secrets"]) == [0, 1, 2]
    assert all(s.dtype == torch.uint8 and s.numel() == SECRET_BYTES for s in state["client_secrets"].values())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = protofl.run(None, out=tmp_path / "a", resume=True)
    b = protofl.run(None, out=tmp_path / "b", resume=True)
    assert a.history[-1]["personal_acc_mean"] == b.history[-1]["personal_acc_mean"]
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    fresh = protofl.run(config)
    assert fresh.history[0]["personal_acc_mean"] != a.history[0]["personal_acc_mean"] or (
        fresh.history[0]["train_loss"] != a.history[0]["train_loss"]
    )
    assert a.summary["privacy"]["noise_source"] == "secret"


def test_seeded_in_process_runs_do_not_change_with_secret_noise_support():
    """The default in-process noise is seeded: two runs are identical and their checkpoints hold no secret."""
    first, second = protofl.run(IGPP), protofl.run(IGPP)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    assert first.summary["privacy"]["noise_source"] == "seeded"


# -- a Flower node's secret (node logic, no Flower processes) -----------------------------------------------


def _node(config, partition=0):
    from protofl.flower.node import node_task

    # a budget for several releases: a round repeated after a restart counts again
    config = resolve_config({**config, "federation": {"rounds": 4, "progress": False}})
    task = node_task(config.to_toml(), partition, config.partition.num_clients)
    return config, task, task.algorithm.broadcast(task.algorithm.init_server_state(config.seed))


def test_a_nodes_secret_is_kept_in_its_state_dir_readable_by_it_alone_and_a_restart_draws_the_same(tmp_path):
    from protofl.flower.node import ClientStore, store_path

    config, task, broadcast = _node(IGPP)  # auto: secret on Flower
    assert task.secret_noise and not task.shares_diagnostics
    path = store_path(str(tmp_path), "run", task.partition)
    store = ClientStore()
    reply, _ = store.train(task, 1, broadcast)
    store.save(path)
    assert len(store.secret) == SECRET_BYTES
    assert path.stat().st_mode & 0o777 == 0o600
    # the node restarts: its saved store brings the secret back; the server has no record of round 1 and
    # repeats it: the repeated release draws the same noise (not a second independent release)
    restarted = ClientStore.load(path)
    assert restarted.secret == store.secret
    restarted.decide(task, {})
    again, _ = restarted.train(task, 1, broadcast)
    np.testing.assert_array_equal(np.asarray(again["prototypes"]), np.asarray(reply["prototypes"]))
    # another node (another secret) releases the same clean prototypes with other noise
    other, _ = ClientStore().train(task, 1, broadcast)
    assert not np.allclose(np.asarray(other["prototypes"]), np.asarray(reply["prototypes"]))
    # the server's replay from the run seed does not remove it
    recovered, std = replayed_prototypes(task.algorithm, config.seed, 1, task.partition, reply)
    clean = clean_prototypes(task.algorithm, restarted.pending, task.data, config.privacy.clip_bound)
    assert replay_error(recovered, clean, std) >= 1.0


def test_a_node_with_explicitly_seeded_noise_draws_from_the_run_seed():
    from protofl.engine.client import client_round
    from protofl.flower.node import ClientStore

    config, task, broadcast = _node(_with_privacy(IGPP, noise="seeded"))
    assert not task.secret_noise
    store = ClientStore()
    reply, _ = store.train(task, 1, broadcast)
    assert store.secret is None
    state = task.algorithm.init_client_state(config.seed)
    _, expected, _ = client_round(task.algorithm, state, task.data, broadcast, round_index=1, seed=config.seed)
    np.testing.assert_array_equal(np.asarray(reply["prototypes"]), np.asarray(expected["prototypes"]))
    recovered, std = replayed_prototypes(task.algorithm, config.seed, 1, task.partition, reply)
    clean = clean_prototypes(task.algorithm, store.pending, task.data, config.privacy.clip_bound)
    assert replay_error(recovered, clean, std) < 1e-4


@pytest.mark.parametrize(
    "method,privacy",
    [
        ({"name": "fedproto", "lr": 0.1, "batch_size": 32}, {"mechanism": "igpp"}),
        ({"name": "fedproto", "lr": 0.1, "batch_size": 32}, {"mechanism": "vpp"}),  # private selection too
        ({"name": "dpfedavg", "steps_per_round": 3, "batch_size": 32, "lr": 0.5}, {"mechanism": "dp-sgd"}),
        (
            {"name": "creff", "steps_per_round": 3, "batch_size": 32, "grad_samples": 0, "match_steps": 2},
            {"mechanism": "dp-gradients"},
        ),
    ],
    ids=["igpp", "vpp", "dp-sgd", "dp-gradients"],
)
def test_every_draw_of_a_client_step_comes_from_its_secret(method, privacy):
    """The same secret gives the same step bit for bit, whatever the process's global generator holds (no
    draw escapes the client's generator); another secret gives another release; the run seed plays no part."""
    from protofl.engine.client import client_round

    config = resolve_config(
        {**IGPP, "method": method, "privacy": {"epsilon": 8.0, "noise": "secret", **privacy}, "seed": 11}
    )
    torch.manual_seed(config.seed)
    data = prepare_data(config)
    algo = build_algorithm(config, data)
    broadcast = algo.broadcast(algo.init_server_state(config.seed))
    client = data.clients[1]

    def step(secret, seed=config.seed, global_seed=0):
        torch.manual_seed(global_seed)  # whatever state the process is in
        state = algo.init_client_state(config.seed)
        _, reply, _ = client_round(algo, state, client, broadcast, round_index=2, seed=seed, secret=secret)
        return {k: np.asarray(v) for k, v in reply.arrays.items()}

    secret = new_secret()
    first = step(secret)
    for again in (step(secret, global_seed=123), step(secret, seed=config.seed + 1, global_seed=7)):
        assert first.keys() == again.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    other = step(new_secret())
    noised = [k for k in first if first[k].dtype.kind == "f"]
    assert noised and all(not np.array_equal(first[k], other[k]) for k in noised), noised
    seeded = step(None)
    assert all(not np.array_equal(first[k], seeded[k]) for k in noised)
