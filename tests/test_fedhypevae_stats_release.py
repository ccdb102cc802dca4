"""FedHypeVAE's class-statistics release (``stats_fraction``): one noisy release of per-class counts and
sums (and second moments) in the first round, composed with the DP-SGD steps in the client's one ledger,
and what the server does with it: the decoder's output path starts at the released class means
(``init``), synthesis draws its within-class noise from the released pooled covariance
(``covariance``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.algorithms.fedhypevae import FedHypeVAEConfig
from protofl.config import ConfigError, PrivacyConfig
from protofl.payload import Payload
from protofl.privacy import BudgetExceededError, GaussianEvent, SampledGaussianEvent

D, C = 8, 3
OPTIONS = {
    "public_dims": D,
    "latent_dim": 4,
    "hidden_dim": 16,
    "code_dim": 3,
    "hyper_hidden": 8,
    "steps_per_round": 3,
    "batch_size": 8,
    "meta_rounds": 1,
    "meta_steps": 2,
    "samplers": ["neutral"],
    "synthetic_per_class": 7,
    "classifier_epochs": 2,
    "classifier_hidden": 8,
    "stats_fraction": 0.2,
}
PRIVACY = PrivacyConfig(
    mechanism="dp-sgd", epsilon=1.0, delta=1e-4, accountant="rdp", planned_releases=4, clip_bound=30.0
)


def _algo(monkeypatch, privacy=PRIVACY, **options):
    algo = get_algorithm("fedhypevae").from_options({**OPTIONS, **options}, Task((D,), C), privacy)
    # the data below are already in the generator's space (no public basis to fit in a unit test)
    monkeypatch.setattr(algo, "normalise", lambda x: x)
    return algo


def _means():
    """Class means far from the origin (centre norm about 8.5, offsets of norm 6), as Fashion-MNIST's sit
    in the public MNIST space."""
    g = torch.Generator().manual_seed(5)
    offsets = torch.randn(C, D, generator=g)
    return torch.full((D,), 3.0) + 6 * offsets / offsets.norm(dim=1, keepdim=True)


#: The within-class covariance's square root: anisotropic (one long axis), the same for every class.
SHAPE = torch.diag(torch.tensor([3.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))


def _client(k, n=600, seed=0):
    g = torch.Generator().manual_seed(seed + 17 * k)
    y = (torch.arange(n) + k) % C
    x = _means()[y] + torch.randn(n, D, generator=g) @ SHAPE
    return ClientData(k, x, y, x[:9], y[:9])


def _round(algo, server, states, clients, seed=0):
    replies = []
    for k, data in enumerate(clients):
        received = algo.broadcast(server)
        states[k], reply, _ = algo.client_step(states[k], data, received, torch.Generator().manual_seed(seed + k))
        replies.append(reply)
    return algo.server_step(server, replies)[0], replies


def test_the_release_and_the_steps_compose_exactly_in_one_ledger_and_the_run_cannot_overspend(monkeypatch):
    import dp_accounting
    from dp_accounting import rdp

    algo = _algo(monkeypatch)
    data = _client(0, n=40)
    server, states = algo.init_server_state(0), [{}]
    for r in range(1, 5):
        server, replies = _round(algo, server, states, [data], seed=r)
        if r == 1:  # the release round trains nothing: φ comes back as sent, next to the statistics
            assert {"stats/counts", "stats/sums"} <= set(replies[0].arrays)
            assert "stats/moments" not in replies[0].arrays  # 'init' alone needs no second moments
    stats_sigma, (sigma, _) = algo.stats_sigma, algo.noise(8 / 40)
    ledger = algo.ledger(states[0])
    # 1 release round, 2 generator rounds of 3 steps, 1 meta-code round of 2 steps
    assert sorted(ledger.events, key=lambda e: e[1]) == [
        (GaussianEvent(stats_sigma), 1),
        (SampledGaussianEvent(0.2, sigma), 8),
    ]
    # the release alone spends its share; composed with the steps, the whole budget and no more
    alone = rdp.RdpAccountant()
    alone.compose(dp_accounting.GaussianDpEvent(stats_sigma))
    assert alone.get_epsilon(1e-4) == pytest.approx(0.2, rel=1e-3)
    expected = rdp.RdpAccountant()
    expected.compose(dp_accounting.GaussianDpEvent(stats_sigma))
    expected.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(sigma)), 8)
    assert ledger.epsilon() == pytest.approx(expected.get_epsilon(1e-4), rel=1e-9)
    assert 0.99 <= ledger.epsilon() <= 1.0
    # the steps pay for the release: more noise than the same 8 steps alone at the whole budget
    assert algo.planned_steps() == 8
    assert sigma > algo.dp.noise_multiplier(0.2, 8)
    with pytest.raises(BudgetExceededError, match="client 0"):
        _round(algo, server, states, [data], seed=9)  # a fifth participation would exceed the budget
    monkeypatch.setattr(algo, "basis", lambda: SimpleNamespace(describe=lambda: {"source": "test"}))
    report = algo.privacy_report({0: states[0]})
    assert report["epsilon"] == pytest.approx(ledger.epsilon())
    assert report["stats_release"]["epsilon_share"] == 0.2
    assert report["stats_release"]["noise_multiplier"] == stats_sigma
    assert report["noise_multiplier_per_client"] == {"0": pytest.approx(sigma)}


def _offsets_error(algo, phi, means):
    """Mean distance of the synthetic class means (the neutral sampler on ``phi``) to the real ones, over
    the real classes' mean distance to their centre."""
    xs, ys = algo.synthesise({"phi": phi, "meta_code": torch.zeros(3)}, "neutral", 0, per_class=400)
    synthetic = torch.stack([xs[ys == k].mean(0) for k in range(C)])
    return float((synthetic - means).norm(dim=1).mean() / (means - means.mean(0)).norm(dim=1).mean())


def test_init_starts_the_output_path_at_the_released_class_means(monkeypatch):
    """Nearly noiseless (ε = 10⁴): after the release round, before any DP-SGD step, the output bias is the
    global mean and the label's output weights the class offsets, so the generator already synthesises
    near the class means; the same generator without the release synthesises near the origin. Fails if
    the server skips the init, writes the hidden part of the output weights instead of the label's, or
    mixes the classes up."""
    privacy = dataclasses.replace(PRIVACY, epsilon=1e4)
    algo = _algo(monkeypatch, privacy)
    clients = [_client(0), _client(1)]
    start = algo.init_server_state(0)
    server, _ = _round(algo, start, [{}, {}], clients)
    x = torch.cat([c.x_train for c in clients])
    y = torch.cat([c.y_train for c in clients])
    real = torch.stack([x[y == k].mean(0) for k in range(C)])
    out = server["phi"]["dec3.b"], server["phi"]["dec3.w"][:, -C:].T
    assert torch.allclose(out[0], x.mean(0), atol=0.05)
    assert torch.allclose(out[1], real - x.mean(0), atol=0.05)
    assert torch.equal(server["phi"]["dec3.w"][:, :-C], start["phi"]["dec3.w"][:, :-C])  # the rest untouched
    assert _offsets_error(algo, server["phi"], _means()) < 0.3
    assert _offsets_error(algo, start["phi"], _means()) > 1.0


def test_covariance_draws_the_within_class_noise_from_the_released_pooled_covariance(monkeypatch):
    """Nearly noiseless, with the second moments released: the kept Cholesky factor reproduces the pooled
    within-class covariance (one long axis, variance 9, the rest 0.25), and synthesis's spread follows
    that long axis, which the learned diagonal (starting at variance 1 everywhere) does not have."""
    privacy = dataclasses.replace(PRIVACY, epsilon=1e4)
    algo = _algo(monkeypatch, privacy, stats_uses=["init", "covariance"])
    clients = [_client(0), _client(1)]
    server, replies = _round(algo, algo.init_server_state(0), [{}, {}], clients)
    assert "stats/moments" in replies[0].arrays
    factor = server["stats_factor"]
    pooled = factor @ factor.T
    assert torch.allclose(pooled, SHAPE @ SHAPE, atol=0.6), pooled.diagonal()
    xs, ys = algo.synthesise(server, "neutral", 0, per_class=2000)
    residual = torch.cat([xs[ys == k] - xs[ys == k].mean(0) for k in range(C)])
    variance = residual.var(0)
    assert variance[0] > 6 and float(variance[1:].max()) < 3, variance
    # the same state without the released factor draws from the learned diagonal: no long axis
    plain = {k: v for k, v in server.items() if k != "stats_factor"}
    xs, ys = algo.synthesise(plain, "neutral", 0, per_class=2000)
    residual = torch.cat([xs[ys == k] - xs[ys == k].mean(0) for k in range(C)])
    assert float(residual.var(0)[0]) < 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"stats_fraction": 1.0}, "stats_fraction: must be in \\[0, 1\\)"),
        ({"stats_uses": ["mean"]}, "stats_uses"),
        ({"stats_uses": []}, "stats_uses: name at least one use"),
        ({"public_basis": "none", "output_variance": False}, "stats_fraction: needs a public basis"),
        ({"label_at_output": False}, "stats_uses: 'init' sets the label's output weights"),
        (
            {"samplers": ["neutral", "mixture"], "stats_fraction": 0.5, "code_release_fraction": 0.5},
            "stats_fraction: with code_release_fraction",
        ),
        ({"stats_mean_share": 1.0}, "stats_mean_share"),
    ],
)
def test_bad_options_get_one_line_naming_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        FedHypeVAEConfig(**{**OPTIONS, **options})


def test_the_release_round_needs_add_remove_and_a_generator_round_after_it():
    config = FedHypeVAEConfig(**OPTIONS)
    fedhypevae = get_algorithm("fedhypevae")
    with pytest.raises(ConfigError, match="privacy.relation"):  # the release is accounted under add/remove
        fedhypevae.validate_privacy(config, dataclasses.replace(PRIVACY, relation="replace-one"))
    with pytest.raises(ConfigError, match="method.stats_fraction: the statistics release takes the first round"):
        fedhypevae.validate_privacy(config, dataclasses.replace(PRIVACY, planned_releases=2))
    fedhypevae.validate_privacy(config, dataclasses.replace(PRIVACY, planned_releases=3))  # 1 + 1 + 1 meta


def test_shrinking_damps_offsets_buried_in_the_release_noise_and_keeps_clear_ones(monkeypatch):
    """``stats_shrink``: at ε = 1 a client of 40 examples releases class means that are mostly noise, and
    the shrunk offsets come out far shorter than the raw ones; nearly noiseless (ε = 10⁴) they stay as
    they are. Fails if the factor ignores the noise level or is applied the wrong way round."""

    def label_offsets(privacy, shrink, client):
        algo = _algo(monkeypatch, privacy, stats_shrink=shrink)
        server, _ = _round(algo, algo.init_server_state(0), [{}], [client])
        return server["phi"]["dec3.w"][:, -C:].T

    noisy = _client(0, n=40)
    raw, shrunk = label_offsets(PRIVACY, False, noisy), label_offsets(PRIVACY, True, noisy)
    assert float(shrunk.norm()) < 0.5 * float(raw.norm())
    clear = dataclasses.replace(PRIVACY, epsilon=1e4)
    raw, shrunk = label_offsets(clear, False, _client(0)), label_offsets(clear, True, _client(0))
    assert torch.allclose(shrunk, raw, rtol=0.01, atol=0.01)


# -- the statistics round's replies at the engine's boundary ----------------------------------------------


def _misbehaving(monkeypatch, algo, fault):
    """``algo`` whose client 1 drops its statistics (``fault = "drop"``) or adds some (``"add"``)."""
    step = algo.client_step

    def client_step(state, data, received, generator):
        state, reply, metrics = step(state, data, received, generator)
        if data.client_id != 1:
            return state, reply, metrics
        arrays = dict(reply.arrays)
        if fault == "drop":
            arrays = {k: v for k, v in arrays.items() if not k.startswith("stats/")}
        else:
            arrays.update({"stats/counts": np.ones(C, np.float32), "stats/sums": np.ones((C, D), np.float32)})
        return state, Payload(arrays, reply.metadata), metrics

    monkeypatch.setattr(algo, "client_step", client_step)
    return algo


def _exchange(algo, server, clients, r):
    from protofl.config import FederationConfig
    from protofl.engine.inprocess import InProcessTransport

    transport = InProcessTransport(algo, clients, FederationConfig(progress=False), seed=0)
    return transport.exchange(r, list(range(len(clients))), algo.broadcast(server), None)


def _shrunk_means(algo, replies, k):
    """``stats_shrink``'s class means from ``replies`` written out with ``k`` summed releases."""
    n = sum(torch.from_numpy(np.array(rep["stats/counts"])).double() for rep in replies).clamp_min(1.0)
    means = sum(torch.from_numpy(np.array(rep["stats/sums"])).double() for rep in replies) / n[:, None]
    radius = algo.privacy.clip_bound
    means = means * (radius / means.norm(dim=1, keepdim=True).clamp_min(radius))
    centre = (n[:, None] * means).sum(0) / n.sum()
    offsets = means - centre
    noise_var = k * algo.stats_stds()[1] ** 2 / n**2
    factor = (1 - D * noise_var / offsets.square().sum(1)).clamp_min(0)
    return (centre + factor[:, None] * offsets).float()


def test_a_release_round_reply_without_statistics_is_rejected_and_the_others_are_summed(monkeypatch, caplog):
    """A client that leaves its statistics out of the release round is rejected like any malformed reply
    (before, it passed validation and crashed the server's sum with a KeyError); the server step then
    shrinks with K = 2, the releases it actually summed, not the 3 clients asked. Fails if the arrays are
    optional again, or K counts the clients instead of the replies."""
    privacy = dataclasses.replace(PRIVACY, epsilon=3.0)  # offsets partly buried in the noise: 0 < factor < 1
    algo = _misbehaving(monkeypatch, _algo(monkeypatch, privacy, stats_shrink=True), "drop")
    clients = [_client(k, n=200) for k in range(3)]
    server = algo.init_server_state(0)
    with caplog.at_level("WARNING", logger="protofl.engine"):
        exchange = _exchange(algo, server, clients, 1)
    assert exchange.status == {0: "ok", 1: "rejected", 2: "ok"}
    assert "rejected the reply of client 1: client 1: missing arrays: stats/counts, stats/sums" in caplog.text
    assert len(exchange.accepted) == 2
    after, _ = algo.server_step(server, exchange.accepted)
    expected = _shrunk_means(algo, exchange.accepted, 2)
    assert torch.allclose(after["stats_means"], expected, atol=1e-4)
    assert not torch.allclose(after["stats_means"], _shrunk_means(algo, exchange.accepted, 3), atol=0.2)


def test_a_later_round_reply_with_statistics_is_rejected(monkeypatch, caplog):
    """Statistics belong to the first round only: a generator-round reply that carries them is rejected
    (before, they were accepted unnoticed), and the round goes on with the others."""
    algo = _misbehaving(monkeypatch, _algo(monkeypatch), "add")
    clients = [_client(k, n=40) for k in range(3)]
    server = algo.init_server_state(0)
    first = _exchange(algo, server, clients, 1)
    assert first.status == {0: "ok", 1: "ok", 2: "ok"}  # client 1 sends what round 1 asks for
    server, _ = algo.server_step(server, first.accepted)
    with caplog.at_level("WARNING", logger="protofl.engine"):
        second = _exchange(algo, server, clients, 2)
    assert second.status == {0: "ok", 1: "rejected", 2: "ok"}
    assert "client 1: unexpected arrays: stats/counts, stats/sums" in caplog.text
    assert all(not any(k.startswith("stats/") for k in rep.arrays) for rep in second.accepted)
    after, _ = algo.server_step(server, second.accepted)
    assert after["round"] == 2


def test_the_server_step_refuses_unvalidated_replies_without_statistics_in_one_line(monkeypatch):
    algo = _algo(monkeypatch)
    server = algo.init_server_state(0)
    _, replies = _round(algo, server, [{}, {}], [_client(0, n=40), _client(1, n=40)])
    bare = Payload({k: v for k, v in replies[1].arrays.items() if not k.startswith("stats/")}, replies[1].metadata)
    with pytest.raises(ValueError, match=r"needs stats/counts, stats/sums in every reply; replies \[1\] lack them"):
        algo.server_step(server, [replies[0], bare])


# -- the release itself: clip, noise size, the client's own generator ------------------------------------


def _release(algo, data, seed):
    _, reply, _ = algo.client_step(
        {}, data, algo.broadcast(algo.init_server_state(0)), torch.Generator().manual_seed(seed)
    )
    return {
        k[len("stats/") :]: torch.from_numpy(np.array(v)).double()
        for k, v in reply.arrays.items()
        if k.startswith("stats/")
    }


def test_a_row_far_outside_the_clip_ball_moves_its_class_sum_by_exactly_the_bound(monkeypatch):
    """One example of class 0 at norm 100 R: with the same noise (same seed) its class sum moves by R
    along the row, its count by one, nothing else moves. Fails without the clip (a move of 100 R) or with
    a clip to another bound."""
    algo = _algo(monkeypatch)
    data = _client(0, n=40)
    radius = algo.privacy.clip_bound
    assert float(data.x_train.norm(dim=1).max()) < radius  # only the outlier is clipped
    direction = torch.linspace(-1.0, 1.0, D)
    direction = direction / direction.norm()
    x = torch.cat([data.x_train, 100 * radius * direction[None]])
    y = torch.cat([data.y_train, torch.tensor([0])])
    with_outlier = ClientData(0, x, y, data.x_test, data.y_test)
    base, moved = _release(algo, data, 3), _release(algo, with_outlier, 3)
    shift = moved["sums"] - base["sums"]
    assert float(shift[0].norm()) == pytest.approx(radius, rel=1e-4)
    assert torch.allclose(shift[0] / shift[0].norm(), direction.double(), atol=1e-4)
    assert torch.allclose(shift[1:], torch.zeros_like(shift[1:]), atol=1e-3)
    assert torch.allclose(
        moved["counts"] - base["counts"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-4
    )


@pytest.mark.parametrize("uses", [["init"], ["init", "covariance"]])
def test_the_release_noise_has_the_calibrated_size(monkeypatch, uses):
    """The released counts and sums minus the true ones, over a large table (50 classes, 64 dimensions,
    10 releases): their standard deviations match σ/√f_n and σ·R/√f_s with the precision shares written
    out here (count: privacy.count_fraction = 0.1; sums: the rest, or stats_mean_share = 0.3 of it with the
    moments). Fails if the shares are swapped, the sums get the count's std, or R is left out."""
    classes, dims = 50, 64
    options = {**OPTIONS, "public_dims": dims, "stats_uses": uses, "stats_mean_share": 0.3}
    algo = get_algorithm("fedhypevae").from_options(options, Task((dims,), classes), PRIVACY)
    monkeypatch.setattr(algo, "normalise", lambda x: x)
    g = torch.Generator().manual_seed(0)
    n = 500
    y = torch.arange(n) % classes
    x = torch.randn(n, dims, generator=g)  # norms about 8, inside the ball: nothing clipped
    data = ClientData(0, x, y, x[:9], y[:9])
    true_counts = torch.bincount(y, minlength=classes).double()
    true_sums = torch.nn.functional.one_hot(y, classes).double().T @ x.double()
    count_noise, sum_noise = [], []
    for seed in range(10):
        stats = _release(algo, data, seed)
        count_noise.append(stats["counts"] - true_counts)
        sum_noise.append(stats["sums"] - true_sums)
        assert ("moments" in stats) == ("covariance" in uses)
    sigma, radius, f_n = algo.stats_sigma, PRIVACY.clip_bound, PRIVACY.count_fraction
    f_s = (1 - f_n) * (0.3 if "covariance" in uses else 1.0)
    assert float(torch.cat(count_noise).std()) == pytest.approx(sigma / f_n**0.5, rel=0.1)
    assert float(torch.cat(sum_noise).std()) == pytest.approx(sigma * radius / f_s**0.5, rel=0.02)
    assert abs(float(torch.cat(sum_noise).mean())) < 0.02 * sigma * radius / f_s**0.5


def test_the_release_noise_comes_from_the_clients_own_generator(monkeypatch):
    """The same client seed gives the same release whatever the global RNG does; another seed another
    release. Fails if the noise is drawn from the global generator or the seed is ignored."""
    algo = _algo(monkeypatch)
    data = _client(0, n=40)
    torch.manual_seed(1)
    first = _release(algo, data, 7)
    torch.manual_seed(2)
    again = _release(algo, data, 7)
    other = _release(algo, data, 8)
    assert first.keys() == again.keys() == {"counts", "sums"}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.allclose(first["counts"], other["counts"]) and not torch.allclose(first["sums"], other["sums"])
