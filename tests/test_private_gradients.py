"""Private CReFF and FedHPro (``privacy.mechanism = "dp-gradients"``): per-example clipping against a
one-example-at-a-time ground truth, the noise of the uploaded sums and counts against its claimed scale,
the reply against an independent reconstruction, ε against a direct dp-accounting computation, the
budget stop, refused configurations, and short real runs."""

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protofl
from protofl.algorithms import ALGORITHMS, ClientData, Task
from protofl.config import ConfigError, ModelConfig, PrivacyConfig
from protofl.payload import Payload, validate
from protofl.privacy import BudgetExceededError, class_gradient_release, clipped_class_sums
from protofl.privacy.class_gradients import head_contributions
from protofl.privacy.statement import privacy_statement

TASK = Task(input_shape=(1, 8, 8), num_classes=4, model=ModelConfig(feature_dim=6))
PRIVACY = PrivacyConfig(mechanism="dp-gradients", epsilon=4.0, delta=1e-5, accountant="rdp", planned_releases=3)


def client(k, n=40, classes=(0, 1, 2)):
    g = torch.Generator().manual_seed(k)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 1, 8, 8, generator=g) + y[:, None, None, None].float()
    return ClientData(k, x, y, x[:10], y[:10])


def private(name, privacy=PRIVACY, **options):
    base = {"grad_samples": 0, "batch_size": 8, "steps_per_round": 2, "features_per_class": 3, "match_steps": 2}
    if name == "fedhpro":
        base.update(client_margin=False, distill_augmentation="none", hp_per_class=2, hp_steps=2)
    return ALGORITHMS[name].from_options({**base, **options}, TASK, privacy)


def one_at_a_time(weight, bias, z, y, clip, feature):
    """Per class, the sum of every example's clipped [dW, db(, dz)], each from its own autograd call."""
    sums = torch.zeros(TASK.num_classes, weight.numel() + bias.numel() + (z.shape[1] if feature else 0))
    sums = sums.double()
    for zi, yi in zip(z, y):
        w, b = weight.double().clone().requires_grad_(True), bias.double().clone().requires_grad_(True)
        zz = zi.double().clone().requires_grad_(True)
        loss = F.cross_entropy((w @ zz + b)[None], yi[None])
        grads = torch.autograd.grad(loss, [w, b, zz] if feature else [w, b])
        v = torch.cat([g.reshape(-1) for g in grads])
        sums[int(yi)] += v * min(1.0, clip / float(v.norm()))
    return sums


# -- the mechanism --------------------------------------------------------------------------------
@pytest.mark.parametrize("feature", [False, True])
def test_per_example_clipping_equals_one_example_at_a_time(feature):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    z = torch.randn(30, 6, generator=g) * torch.linspace(0.01, 5, 30)[:, None]  # norms below and above the clip
    y = torch.randint(3, (30,), generator=g)  # class 3 absent: its sum is 0
    clip = 0.7
    sums, counts, norms = clipped_class_sums(head_contributions(weight, bias, z, y, feature), y, 4, clip)
    expected = one_at_a_time(weight, bias, z, y, clip, feature)
    assert (norms < clip).any() and (norms > clip).any()  # both branches of the clip are exercised
    torch.testing.assert_close(sums, expected, rtol=1e-9, atol=1e-12)
    assert counts.tolist() == [float((y == c).sum()) for c in range(4)]
    assert float(sums[3].abs().sum()) == 0.0


def test_noise_of_sums_and_counts_has_the_claimed_scale():
    """Chi-square: Σ noise² / std² over N coordinates is χ²_N (mean N, sd √(2N)); 5 sd bounds."""
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    z, y = torch.randn(25, 6, generator=g), torch.randint(4, (25,), generator=g)
    rows = head_contributions(weight, bias, z, y, True)
    clip, sigma, f = 0.5, 1.7, 0.1
    clean, counts, _ = clipped_class_sums(rows, y, 4, clip)
    sum_std, count_std = sigma / math.sqrt(1 - f) * clip, sigma / math.sqrt(f)  # independent of split_multiplier
    draws = 1000
    sq_sums = sq_counts = 0.0
    for seed in range(draws):
        release = class_gradient_release(rows, y, 4, clip, sigma, f, torch.Generator().manual_seed(seed))
        assert release.sum_std == pytest.approx(sum_std) and release.count_std == pytest.approx(count_std)
        sq_sums += float(((release.sums - clean) ** 2).sum()) / sum_std**2
        sq_counts += float(((release.counts - counts) ** 2).sum()) / count_std**2
        torch.testing.assert_close(release.means, release.sums / release.counts.clamp_min(1.0)[:, None])
    for total, n in ((sq_sums, draws * clean.numel()), (sq_counts, draws * 4)):
        assert abs(total - n) < 5 * math.sqrt(2 * n), (total, n)


def test_reply_is_the_noisy_release_reconstructed_independently():
    """The client's reply, rebuilt from its generator's draws: the clean per-class sums (one example at
    a time), noise of std σ_f·C and σ_n, with σ_u the multiplier whose 3 releases spend upload_fraction·ε
    under a direct dp-accounting RDP computation."""
    algorithm = private("fedhpro", upload_clip=0.8)
    data = client(0)
    received = algorithm.broadcast(algorithm.init_server_state(0))
    state, reply, metrics = algorithm.client_step({}, data, received, torch.Generator().manual_seed(5))
    validate(reply, algorithm.reply_spec())
    assert "num_samples" not in reply.arrays  # the exact train size does not leave the client
    assert reply["grad_classes"].tolist() == [0, 1, 2, 3]  # every class, class 3 absent from the data

    sigma_u = algorithm.upload_sigma
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma_u), 3)
    assert accountant.get_epsilon(1e-5) == pytest.approx(0.5 * 4.0, abs=2e-3)
    assert accountant.get_epsilon(1e-5) <= 0.5 * 4.0 + 1e-9

    params = algorithm.received_params(received)
    with torch.no_grad():
        z = algorithm.forward(params, data.x_train)[0]
    clean = one_at_a_time(params["head.weight"], params["head.bias"], z, data.y_train, 0.8, True)
    g = torch.Generator().manual_seed(5)
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=torch.float64) * sigma_u / math.sqrt(0.9) * 0.8
    counts = torch.bincount(data.y_train, minlength=4).double()
    counts = counts + torch.randn(4, generator=g, dtype=torch.float64) * sigma_u / math.sqrt(0.1)
    means = noisy / counts.clamp_min(1.0)[:, None]
    np.testing.assert_allclose(reply["grad_counts"], counts.numpy(), rtol=1e-12)
    np.testing.assert_allclose(reply["grad_weight"].reshape(4, -1), means[:, :24].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reply["grad_bias"], means[:, 24:28].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reply["feature_grad"], means[:, 28:].numpy(), rtol=1e-4, atol=1e-6)
    # the model moved (DP-SGD steps) and the round was spent before anything was released
    assert any(not np.array_equal(reply[k], received[k]) for k in received.arrays)
    assert [e["kind"] for e, _ in state["privacy_ledger"]] == ["sampled-gaussian", "gaussian"]
    assert 0.0 <= metrics["upload_clipped_fraction"] <= 1.0


def test_private_fedhpro_trains_its_hp_losses_through_per_example_gradients():
    """Once HPs are matched, HPCL and HPAL enter every example's clipped DP-SGD gradient."""
    data = client(2)
    with_hp, without = private("fedhpro"), private("fedhpro", hpcl_weight=0.0, hpal_weight=0.0)
    server = with_hp.init_server_state(0)
    ready = with_hp.broadcast(dict(server, hp_matched=torch.ones(4, dtype=torch.bool)))
    fresh = with_hp.broadcast(server)

    def trained(algorithm, received):
        return algorithm.client_step({}, data, received, torch.Generator().manual_seed(3))[1]["param/head.weight"]

    np.testing.assert_array_equal(trained(with_hp, fresh), trained(without, fresh))  # nothing matched: CE only
    assert not np.array_equal(trained(with_hp, ready), trained(without, ready))


def test_a_round_that_would_overspend_is_refused_before_anything_is_released():
    algorithm = private("creff", dataclasses.replace(PRIVACY, planned_releases=1))
    data = client(1)
    received = algorithm.broadcast(algorithm.init_server_state(0))
    state, _, _ = algorithm.client_step({}, data, received, torch.Generator().manual_seed(0))
    with pytest.raises(BudgetExceededError, match="client 1"):
        algorithm.check_release(state, 1)
    with pytest.raises(BudgetExceededError, match="client 1: the next release"):
        algorithm.client_step(state, data, received, torch.Generator().manual_seed(1))


def test_server_uses_rows_whose_noisy_count_reaches_the_presence_threshold():
    algorithm = private("creff")
    threshold = algorithm.presence_threshold
    assert threshold == pytest.approx(max(1.0, 2 * algorithm.upload_sigma / math.sqrt(0.1)))
    server = algorithm.init_server_state(0)
    received = algorithm.broadcast(server)
    replies = [algorithm.client_step({}, client(k), received, torch.Generator().manual_seed(k))[1] for k in range(2)]
    # the counts as they might come out of the noise: classes 0 and 1 above the threshold, 2 and 3 below
    counts = np.array([threshold + 1, threshold + 1, threshold - 0.5, threshold - 0.5])
    replies = [Payload({**r.arrays, "grad_counts": counts}, dict(r.metadata)) for r in replies]
    state, metrics = algorithm.server_step(server, replies)
    assert state["feature_matched"].tolist() == [True, True, False, False]
    # uniform model average (no sample counts in the replies)
    expected = (replies[0]["param/head.bias"] + replies[1]["param/head.bias"]) / 2
    np.testing.assert_allclose(state["aggregated_head"]["bias"].numpy(), expected, rtol=1e-6)


def test_refused_configurations_name_the_key():
    with pytest.raises(ConfigError, match="method.grad_samples"):
        private("creff", grad_samples=10)
    with pytest.raises(ConfigError, match="method.client_margin"):
        private("fedhpro", client_margin=True)
    with pytest.raises(ConfigError, match="method.global_signal"):
        private("fedhpro", global_signal="averaged")
    with pytest.raises(ConfigError, match="upload_fraction"):
        private("creff", upload_fraction=1.0)
    with pytest.raises(ConfigError, match="privacy.mechanism.*creff, fedhpro"):
        ALGORITHMS["fedproto"].from_options({}, TASK, PRIVACY)
    with pytest.raises(ConfigError, match="relation"):
        PrivacyConfig(mechanism="dp-gradients", relation="replace-one")


def test_statement_names_both_sensitivities_and_what_is_not_covered():
    statement = privacy_statement(PRIVACY, "in-process")
    assert "upload_clip" in statement["sensitivity_text"] and "clip_norm" in statement["sensitivity_text"]
    assert any("sampling rate" in line for line in statement["not_covered"])


# -- short real runs --------------------------------------------------------------------------------
def run_config(name, clients, rounds, **privacy):
    method = {
        "name": name,
        "lr": 0.1,
        "batch_size": 32,
        "steps_per_round": 3,
        "grad_samples": 0,
        "features_per_class": 5,
        "retrain_epochs": 2,
        "match_steps": 3,
    }
    if name == "fedhpro":
        method.update(distill_augmentation="none", client_margin=False, hp_steps=3)
    return {
        "seed": 3,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "iid", "num_clients": clients},
        "federation": {"rounds": rounds, "progress": False},
        "model": {"feature_dim": 16},
        "method": method,
        "privacy": {"mechanism": "dp-gradients", "epsilon": 4.0, "delta": 1e-5, "accountant": "rdp", **privacy},
    }


def test_private_creff_run_spends_what_dp_accounting_computes(tmp_path):
    protofl.run(run_config("creff", 1, 2), out=tmp_path / "run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    p = summary["privacy"]
    assert summary["status"] == "completed" and p["mechanism"] == "dp-gradients"
    n = int(open(tmp_path / "run/clients.csv").read().splitlines()[-1].split(",")[3])
    (sigma,) = p["noise_multipliers"]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(32 / n, dp_accounting.GaussianDpEvent(sigma)), 2 * 3)
    accountant.compose(dp_accounting.GaussianDpEvent(p["upload_noise_multiplier"]), 2)
    expected = accountant.get_epsilon(1e-5)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(4.0, abs=5e-3) and expected <= 4.0 + 1e-9  # calibrated to the budget
    assert p["epsilon_pld_max"] < p["epsilon_rdp_max"]
    assert p["upload_count_noise_multiplier"] == pytest.approx(p["upload_noise_multiplier"] / math.sqrt(0.1))


def test_private_fedhpro_run_completes_with_its_ledger_and_stops_at_the_budget(tmp_path):
    with pytest.raises(protofl.BudgetExceededError, match="client 0: the next release would bring epsilon"):
        protofl.run(run_config("fedhpro", 2, 2, planned_releases=1), out=tmp_path / "run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "stopped: budget" and summary["rounds_done"] == 1
    p = summary["privacy"]
    assert p["max_releases_by_a_client"] == 3  # one round of 3 DP-SGD steps, then refused
    assert 3.9 < summary["epsilon"] <= 4.0 + 1e-9
    assert "upload_clip" in p["sensitivity_text"]
    final = summary["final"]
    assert 0.0 <= final["global_acc"] <= 1.0 and -1.0 <= final["global_signal_cos_head_span"] <= 1.0


# -- the audit's gradient canaries in the DP-SGD steps of a private CReFF run ---------------------------
def audit_config(epsilon):
    """The DP-SGD audit setting of tests/test_audit.py, with private CReFF."""
    return {
        "seed": 1,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "iid", "num_clients": 3},
        "federation": {"rounds": 2, "progress": False, "threads": 1},
        "model": {"feature_dim": 16},
        "privacy": {"mechanism": "dp-gradients", "epsilon": epsilon, "accountant": "rdp"},
        "method": {
            "name": "creff",
            "steps_per_round": 10,
            "batch_size": 128,
            "grad_samples": 0,
            "features_per_class": 3,
            "retrain_epochs": 2,
            "match_steps": 2,
        },
    }


def test_audit_of_private_creff_passes_and_catches_weakened_dpsgd_noise(monkeypatch):
    from protofl.privacy import dpsgd
    from protofl.privacy.audit import AuditSettings, audit_run

    result = audit_run(audit_config(8.0), AuditSettings(canaries=300))
    assert result.design == "gradient"
    assert 0 <= result.epsilon_lower <= result.epsilon
    honest = dpsgd.add_noise

    def weak(summed, clip_norm, sigma, expected, generator):  # the ledger still records σ
        return honest(summed, clip_norm, sigma * 0.02, expected, generator)

    monkeypatch.setattr(dpsgd, "add_noise", weak)
    broken = audit_run(audit_config(1.0), AuditSettings(canaries=300))
    assert broken.epsilon_lower > broken.epsilon and broken.violated
