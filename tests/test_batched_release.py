"""Batched prototype releases (one program over every client of a batched round) against the per-client
release: same generators, same tensors; same ledgers, same epsilon."""

import numpy as np
import pytest
import torch

from protofl.algorithms import get_algorithm
from protofl.config import PrivacyConfig
from protofl.privacy import BudgetExceededError
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.layer import create_privacy_layer
from protofl.privacy.mechanisms import selection_diagnostics, selection_diagnostics_batch

C, D = 5, 12
#: Unequal sizes; client 2 holds one class only, client 3 a single example (many empty classes).
SIZES = (30, 17, 9, 1, 24)


def make_features(seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 3
    zs, ys = [], []
    for k, n in enumerate(SIZES):
        if k == 2:
            y = torch.full((n,), 4, dtype=torch.int64)
        else:
            y = torch.randint(0, C - 1, (n,), generator=g)  # class 4 empty for every other client
        zs.append(means[y] + torch.randn(n, D, generator=g) * (1 + k))
        ys.append(y)
    return zs, ys


def padded(zs, ys, filler=1e6):
    """The clients' rows in one (K, n_max, d) stack; padding rows hold ``filler`` features and label 0, so a
    release that read them would differ."""
    n = max(len(y) for y in ys)
    z = torch.full((len(zs), n, D), filler)
    y = torch.zeros(len(zs), n, dtype=torch.int64)
    weight = torch.zeros(len(zs), n)
    for k, (zk, yk) in enumerate(zip(zs, ys)):
        z[k, : len(yk)], y[k, : len(yk)], weight[k, : len(yk)] = zk, yk, 1
    return z, y, weight


def generators(seed=7):
    return [torch.Generator().manual_seed(seed + k) for k in range(len(SIZES))]


CASES = [
    ("igpp", "add-remove", "trained-features", {}),
    ("igpp", "add-remove", "fixed-features", {}),
    ("igpp", "replace-one", "trained-features", {}),
    ("igpp", "replace-one", "fixed-features", {}),
    ("igpp", "add-remove", "trained-features", {"dcr": True}),
    ("vpp", "add-remove", "trained-features", {"selection": "private-anova"}),
    ("vpp", "replace-one", "fixed-features", {"selection": "private-anova"}),
    ("vpp", "add-remove", "trained-features", {"selection": "broadcast-variance"}),
    ("vpp", "replace-one", "trained-features", {"selection": "broadcast-variance"}),
]


def privacy_config(mechanism, relation, sensitivity, extra, epsilon=8.0, planned=4):
    return PrivacyConfig(
        mechanism=mechanism,
        epsilon=epsilon,
        planned_releases=planned,
        relation=relation,
        sensitivity=sensitivity,
        **extra,
    )


@pytest.mark.parametrize("mechanism,relation,sensitivity,extra", CASES)
@pytest.mark.parametrize("broadcast", [True, False])
def test_batched_release_equals_the_per_client_release(mechanism, relation, sensitivity, extra, broadcast):
    layer = create_privacy_layer(privacy_config(mechanism, relation, sensitivity, extra), C)
    zs, ys = make_features()
    z, y, weight = padded(zs, ys)
    received = torch.randn(3, D, generator=torch.Generator().manual_seed(3)) if broadcast else None
    # One client has released before (its ledger is not empty), the others have not.
    states = [{} for _ in SIZES]
    states[1] = {LEDGER_KEY: layer.release(zs[1], ys[1], generators()[1], {})[1]}
    whos = [f"client {k}" for k in range(len(SIZES))]

    ref_gens, got_gens = generators(), generators()
    ref = [layer.release(zk, yk, g, s, who, received) for zk, yk, g, s, who in zip(zs, ys, ref_gens, states, whos)]
    got = layer.release_batch(z, y, weight, got_gens, states, whos, received)

    assert len(got) == len(ref)
    for (r, ledger_ref), (b, ledger_got), g_ref, g_got in zip(ref, got, ref_gens, got_gens):
        assert torch.equal(r.classes, b.classes)
        assert r.counts.dtype == b.counts.dtype
        torch.testing.assert_close(b.counts, r.counts, rtol=0, atol=1e-9)
        assert torch.equal(r.noise_std, b.noise_std)
        torch.testing.assert_close(b.statistic, r.statistic, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b.prototypes, r.prototypes, rtol=1e-6, atol=1e-6)
        assert r.events == b.events and r.count_std == b.count_std
        assert (r.selected is None) == (b.selected is None)
        if r.selected is not None:
            assert torch.equal(r.selected, b.selected)
        assert ledger_ref == ledger_got
        # Each client's generator took exactly the same draws.
        assert torch.equal(g_ref.get_state(), g_got.get_state())
    # Same accounting: the report over the new ledgers is the same.
    report = lambda results: layer.report([{LEDGER_KEY: ledger} for _, ledger in results])
    assert report(got) == report(ref)
    if relation == "add-remove":
        # every class released, the empty one too (client 2 holds class 4 alone)
        assert all(len(b.classes) == C for b, _ in got)
    else:
        assert got[2][0].classes.tolist() == [4]


def test_the_noise_of_a_client_comes_from_its_own_generator():
    """Reseeding one client's generator changes that client's release alone."""
    layer = create_privacy_layer(privacy_config("vpp", "add-remove", "trained-features", {}), C)
    z, y, weight = padded(*make_features())
    states, whos = [{} for _ in SIZES], [str(k) for k in range(len(SIZES))]
    base = layer.release_batch(z, y, weight, generators(), states, whos)
    gens = generators()
    gens[3] = torch.Generator().manual_seed(999)
    other = layer.release_batch(z, y, weight, gens, states, whos)
    for k, ((a, _), (b, _)) in enumerate(zip(base, other)):
        assert torch.equal(a.prototypes, b.prototypes) == (k != 3)


def test_a_batch_over_budget_records_nothing_for_any_client():
    layer = create_privacy_layer(privacy_config("igpp", "add-remove", "trained-features", {}, planned=1), C)
    zs, ys = make_features()
    z, y, weight = padded(zs, ys)
    spent = layer.release(zs[4], ys[4], generators()[4], {})[1]
    states = [{} for _ in SIZES]
    states[4] = {LEDGER_KEY: spent}  # client 4 has spent its one planned release
    gens = generators()
    before = [g.get_state() for g in gens]
    with pytest.raises(BudgetExceededError, match="client 4"):
        layer.release_batch(z, y, weight, gens, states, [f"client {k}" for k in range(len(SIZES))])
    assert all(torch.equal(b, g.get_state()) for b, g in zip(before, gens))  # no noise drawn
    assert states[:4] == [{}] * 4 and states[4] == {LEDGER_KEY: spent}


def test_batched_selection_diagnostics_equal_the_per_client_ones():
    zs, ys = make_features()
    z, y, weight = padded(zs, ys)
    chosen = [torch.tensor([0, 3, 5]), torch.tensor([1, 2, 11]), torch.tensor([4, 6, 7]), torch.tensor([0, 1, 2])]
    chosen.append(torch.tensor([8, 9, 10]))
    got = selection_diagnostics_batch(z, y, weight, chosen)
    for zk, yk, sel, g in zip(zs, ys, chosen, got):
        ref = selection_diagnostics(zk, yk, sel)
        assert ref.keys() == g.keys()
        for key in ref:
            assert g[key] == pytest.approx(ref[key], rel=1e-9, nan_ok=True)
    assert np.isnan(got[2]["vpp_overlap"]) and np.isnan(got[3]["vpp_selected_energy"])  # one class held
    assert not np.isnan(got[0]["vpp_overlap"])


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_a_batched_fedproto_round_releases_once_for_all_its_clients(mechanism, monkeypatch):
    from protofl.algorithms import ClientData, Task
    from protofl.config import ModelConfig
    from protofl.payload import Payload

    task = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
    privacy = PrivacyConfig(mechanism=mechanism, epsilon=4.0, planned_releases=3)
    algo = get_algorithm("fedproto").from_options({"batch_size": 16}, task, privacy)
    g = torch.Generator().manual_seed(0)
    clients = []
    for k, n in enumerate((20, 9, 33)):
        y = torch.randint(0, 4, (n + 4,), generator=g)
        x = torch.randn(n + 4, 8, generator=g) + y[:, None]
        clients.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    received = Payload(
        {"classes": np.array([0, 2]), "prototypes": np.ones((2, 6), dtype=np.float32)}, {"method": "fedproto"}
    )
    layer = algo.privacy_layer
    calls = {"release": 0, "release_batch": 0}
    for name in calls:
        original = getattr(layer, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(layer, name, counted)
    states = [algo.init_client_state(0) for _ in clients]
    gens = lambda: [torch.Generator().manual_seed(50 + k) for k in range(len(clients))]
    got = algo.client_step_batched(states, clients, received, gens())
    assert calls == {"release": 0, "release_batch": 1}
    ref = [algo.client_step(s, d, received, gen) for s, d, gen in zip(states, clients, gens())]
    assert calls == {"release": 3, "release_batch": 1}
    for (s_ref, r_ref, m_ref), (s_got, r_got, m_got) in zip(ref, got):
        assert s_ref[LEDGER_KEY] == s_got[LEDGER_KEY]
        assert m_ref.keys() == m_got.keys()
        for key in r_ref.arrays:
            np.testing.assert_allclose(r_got[key], r_ref[key], rtol=1e-4, atol=2e-4)
    # An audit watching every release one by one turns the batched release off.
    algo.batch_releases = False
    algo.client_step_batched(states, clients, received, gens())
    assert calls == {"release": 6, "release_batch": 1}
