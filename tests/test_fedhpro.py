"""FedHPro: its losses and margin against hand computations, the hyper-prototype step, the payloads,
bad input, and a short real run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protofl
from protofl.algorithms import ALGORITHMS, ClientData, Task
from protofl.algorithms.fedhpro import (
    client_margin,
    head_span_projector,
    hp_summaries,
    hpal_loss,
    hpcl_loss,
    random_shift,
)
from protofl.config import ConfigError, ModelConfig
from protofl.gradient_matching import (
    DISTANCES,
    gradient_distance,
    input_gradients,
    match_synthetic,
)
from protofl.payload import Payload, PayloadError, validate

TASK = Task(input_shape=(1, 8, 8), num_classes=4, model=ModelConfig(feature_dim=6))


def client(k, n=40, classes=(0, 1, 2, 3)):
    g = torch.Generator().manual_seed(k)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 1, 8, 8, generator=g) + y[:, None, None, None].float()
    return ClientData(k, x, y, x[:10], y[:10])


def fedhpro(**options):
    return ALGORITHMS["fedhpro"].from_options(
        {
            "lr": 0.05,
            "hp_per_class": 3,
            "features_per_class": 5,
            "match_steps": 3,
            "retrain_epochs": 2,
            "hp_steps": 3,
            **options,
        },
        TASK,
    )


# -- losses and margin against hand computations ------------------------------------------------------
def test_hpcl_equals_a_hand_computation_with_and_without_margin():
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]])
    y = torch.tensor([1, 0])
    tau, kappa = 0.5, 2.0
    zn = [[0.6, 0.8], [1.0, 0.0]]
    total = {0.0: 0.0, kappa: 0.0}
    for i in range(2):
        dots = [sum(a * b for a, b in zip(zn[i], row)) / tau for row in m.tolist()]
        for k in total:
            total[k] += math.log(sum(math.exp(d) for d in dots) + k) - dots[int(y[i])]
    for k, expected in total.items():
        assert float(hpcl_loss(z, y, m, tau, k)) == pytest.approx(expected / 2, rel=1e-5)
    # a subset of classes: rows of m belong to classes 1 and 3, labels index into them
    got = float(hpcl_loss(z[:1], torch.tensor([3]), m[:2], tau, 0.0, classes=torch.tensor([1, 3])))
    dots = [0.6 / tau, 0.8 / tau]
    assert got == pytest.approx(math.log(sum(math.exp(d) for d in dots)) - dots[1], rel=1e-5)


def test_hpal_equals_smooth_l1_by_hand():
    z = torch.tensor([[3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0]])
    diffs = [0.6 - 0.0, 0.8 - 1.0]
    hand = sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / 2
    assert float(hpal_loss(z, target)) == pytest.approx(hand, rel=1e-6)
    hand_beta = sum(0.5 * d * d / 0.1 if abs(d) < 0.1 else abs(d) - 0.05 for d in diffs) / 2
    assert float(hpal_loss(z, target, beta=0.1)) == pytest.approx(hand_beta, rel=1e-6)


def test_client_margin_is_the_sum_of_off_diagonal_inner_products_over_c_minus_1_squared():
    p = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    pairs = [(0, 1), (0, 2), (1, 2)]
    hand = 2 * sum(float(p[a] @ p[b]) for a, b in pairs) / (10 - 1) ** 2
    assert client_margin(p, 10) == pytest.approx(hand)
    assert client_margin(p[:1], 10) == 0.0
    assert client_margin(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), 4) == 0.0  # negative: clamped


def test_hp_summaries_and_random_shift():
    h = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    m, mean = hp_summaries(h)
    torch.testing.assert_close(m, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(mean, torch.tensor([[1.0, 2.0]]))
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    for a, b in zip(x, shifted):  # every shifted image is a translate: its non-zero values are the original's
        values = b[b != 0]
        assert set(values.tolist()) <= set(a.flatten().tolist()) and len(values) >= 9


# -- the hyper-prototype step ------------------------------------------------------------------------
def test_hp_matching_recovers_prototypes_that_reproduce_a_known_gradient():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    truth = torch.randn(3, 2, 4, generator=g)
    targets = {c: input_gradients(w, b, truth[c], c, create_graph=False) for c in range(3)}
    start = {c: torch.randn(2, 4, generator=g) for c in range(3)}
    found, metrics = match_synthetic(
        start, targets, lambda c, h: input_gradients(w, b, h, c), "mse", 300, 0.05, optimizer="adam"
    )
    assert metrics["match_distance_end"] < 1e-3 * metrics["match_distance_start"]
    for c in range(3):
        torch.testing.assert_close(input_gradients(w, b, found[c], c)[0], targets[c][0], atol=2e-3, rtol=0.05)


@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_every_distance_lowers_the_hp_matching_loss(distance):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    targets = {c: [torch.randn(6, generator=g)] for c in range(4)}
    start = {c: torch.randn(3, 6, generator=g) for c in range(4)}
    _, metrics = match_synthetic(
        start, targets, lambda c, h: input_gradients(w, b, h, c), distance, 20, 0.1, optimizer="adam"
    )
    assert metrics["match_distance_end"] < metrics["match_distance_start"]


# -- client, payloads, server ------------------------------------------------------------------------
def test_client_reply_is_valid_and_its_feature_gradients_are_those_of_the_received_model():
    algo = fedhpro(distill_augmentation="none", grad_samples=0)
    server = algo.init_server_state(0)
    received = Payload.from_bytes(algo.broadcast(server).to_bytes())
    validate(received, algo.broadcast_spec())
    data = client(0, classes=(1, 3))
    _, reply, _ = algo.client_step({}, data, received, torch.Generator().manual_seed(0))
    validate(reply, algo.reply_spec())
    assert reply["grad_classes"].tolist() == [1, 3]
    params = server["params"]
    for c, grad in zip(reply["grad_classes"], reply["feature_grad"]):
        z = algo.forward(params, data.x_train[data.y_train == int(c)])[0].detach().requires_grad_(True)
        loss = F.cross_entropy(
            z @ params["head.weight"].t() + params["head.bias"], torch.full((len(z),), int(c)), reduction="sum"
        )
        (by_autograd,) = torch.autograd.grad(loss, [z])
        np.testing.assert_allclose(grad, by_autograd.mean(0).numpy(), rtol=1e-4, atol=1e-6)


def test_server_moves_only_the_hps_of_uploaded_classes_and_rejects_nan_gradients():
    algo = fedhpro(hp_optimizer="adam", hp_lr=0.05)
    server = algo.init_server_state(0)
    received = Payload.from_bytes(algo.broadcast(server).to_bytes())
    replies = []
    for k, classes in enumerate([(0, 1), (1,)]):
        _, reply, _ = algo.client_step({}, client(k, classes=classes), received, torch.Generator().manual_seed(k))
        replies.append(Payload.from_bytes(reply.to_bytes()))
    state, metrics = algo.server_step(server, replies)
    before, after = server["hyper_prototypes"], state["hyper_prototypes"]
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    torch.testing.assert_close(before[2:], after[2:])  # classes absent everywhere keep their HPs
    assert state["hp_matched"].tolist() == [True, True, False, False]
    assert metrics["hp_match_distance_end"] < metrics["hp_match_distance_start"]
    assert Payload.from_bytes(algo.broadcast(state).to_bytes())["hp_classes"].tolist() == [0, 1]

    bad = dict(replies[0].arrays)
    bad["feature_grad"] = bad["feature_grad"].copy()
    bad["feature_grad"][0, 0] = np.nan
    with pytest.raises(PayloadError, match="feature_grad"):
        validate(Payload(bad, {"method": "fedhpro"}), algo.reply_spec())
    bad["feature_grad"] = np.zeros((2, 5), np.float32)  # wrong shape
    with pytest.raises(PayloadError, match="feature_grad"):
        validate(Payload(bad, {"method": "fedhpro"}), algo.reply_spec())


def test_hp_losses_only_use_matched_classes_and_switches_change_training():
    data = client(4)
    algo = fedhpro(distill_augmentation="none", hp_optimizer="adam")
    server = algo.init_server_state(0)
    fresh = Payload.from_bytes(algo.broadcast(server).to_bytes())
    matched = dict(server, hp_matched=torch.ones(4, dtype=torch.bool))
    ready = Payload.from_bytes(algo.broadcast(matched).to_bytes())
    baseline = fedhpro(distill_augmentation="none", hpcl_weight=0.0, hpal_weight=0.0)

    def trained(a, received):
        return a.client_step({}, data, received, torch.Generator().manual_seed(0))[1]["param/fc.weight"]

    # round 1 (no matched HPs): CE only, the same as with HPCL and HPAL switched off
    np.testing.assert_array_equal(trained(algo, fresh), trained(baseline, fresh))
    assert not np.array_equal(trained(algo, ready), trained(baseline, ready))


# -- ablation options --------------------------------------------------------------------------------
def test_hp_init_scale_scales_the_initial_hyper_prototypes():
    plain = fedhpro().init_server_state(0)["hyper_prototypes"]
    small = fedhpro(hp_init_scale=0.01).init_server_state(0)["hyper_prototypes"]
    torch.testing.assert_close(small, plain * 0.01)
    assert float(plain.std()) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("matching", ["mean", "each"])
def test_hp_matching_mean_or_each_measures_the_distance_it_names(matching):
    algo = fedhpro(hp_matching=matching, hp_distance="cos", hp_steps=1)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    hp = torch.randn(4, 3, 6, generator=g)
    classes, targets = torch.tensor([0, 2]), torch.randn(2, 6, generator=g)
    new, metrics = algo.match_hyper_prototypes(hp, classes, targets, w, b)
    expected = 0.0
    for c, t in zip(classes.tolist(), targets):
        if matching == "mean":
            expected += float(gradient_distance("cos", input_gradients(w, b, hp[c], c, create_graph=False), [t]))
        else:
            expected += sum(
                float(gradient_distance("cos", input_gradients(w, b, h[None], c, create_graph=False), [t]))
                for h in hp[c]
            )
    assert metrics["match_distance_start"] == pytest.approx(expected, rel=1e-5)
    assert new.shape == hp.shape
    torch.testing.assert_close(new[[1, 3]], hp[[1, 3]])  # classes without a target keep their HPs
    assert not torch.equal(new[0], hp[0])


def test_hpcl_batch_size_normalisation_divides_the_hpcl_term_by_the_batch_size():
    data = client(5)
    losses = {}
    for norm in ("mean", "batch-size"):
        algo = fedhpro(hpcl_normalisation=norm, hpal_weight=0.0, batch_size=16)
        server = algo.init_server_state(0)
        received = algo.broadcast(dict(server, hp_matched=torch.ones(4, dtype=torch.bool)))
        params, context = server["params"], algo.context(received)
        ones = torch.ones(len(data.y_train))
        ce = float(F.cross_entropy(algo.forward(params, data.x_train)[1], data.y_train))
        losses[norm] = float(algo.loss(params, data.x_train, data.y_train, ones, context)) - ce
    assert losses["mean"] > 0.1
    assert losses["batch-size"] == pytest.approx(losses["mean"] / 16, rel=1e-4)


def test_sgd_matching_moves_hyper_prototypes_only_inside_the_head_span():
    """The matching loss sees H only through W·H: an SGD step moves H within the span of W's rows."""
    algo = fedhpro(hp_optimizer="sgd", hp_lr=0.5, hp_steps=5, retrain_epochs=0, distill_augmentation="none")
    server = algo.init_server_state(0)
    received = algo.broadcast(server)
    replies = [algo.client_step({}, client(k), received, torch.Generator().manual_seed(k))[1] for k in range(2)]
    state, _ = algo.server_step(server, replies)
    project = head_span_projector(state["params"]["head.weight"])
    torch.testing.assert_close(project @ project, project, atol=1e-5, rtol=0)  # a projector
    torch.testing.assert_close(
        state["params"]["head.weight"] @ project, state["params"]["head.weight"], atol=1e-5, rtol=0
    )
    moved = state["hyper_prototypes"] - server["hyper_prototypes"]
    assert float(moved.norm()) > 1e-4
    assert float((moved - moved @ project).norm()) < 1e-4 * float(moved.norm())
    x, y = client(9).x_train, client(9).y_train
    metrics = algo.evaluate_global(state, x, y)
    hp = state["hyper_prototypes"]
    assert metrics["global_hp_head_span_energy"] == pytest.approx(float((hp @ project).pow(2).sum() / hp.pow(2).sum()))
    assert 0.0 < metrics["global_hp_head_span_energy"] < 1.0 and -1.0 <= metrics["global_signal_cos_head_span"] <= 1.0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="hp_distance"):
        fedhpro(hp_distance="euclid")
    with pytest.raises(ConfigError, match="distill_augmentation"):
        ALGORITHMS["fedhpro"].from_options({}, Task(input_shape=(12,), num_classes=3))
    with pytest.raises(ConfigError, match="global_signal"):
        fedhpro(global_signal="mean")
    with pytest.raises(ConfigError, match="hp_matching"):
        fedhpro(hp_matching="median")
    with pytest.raises(ConfigError, match="hpcl_normalisation"):
        fedhpro(hpcl_normalisation="sum")
    with pytest.raises(ConfigError, match="hp_init_scale"):
        fedhpro(hp_init_scale=0.0)


# 8x8 digits: a 2-pixel random shift is a quarter of the image, so distillation runs unaugmented here.
@pytest.mark.parametrize("options,floor", [({}, 0.25), ({"global_signal": "averaged"}, 0.15)])
def test_fedhpro_end_to_end_on_optdigits_beats_chance(small_config, tmp_path, options, floor):
    small_config["method"] = {
        "name": "fedhpro",
        "lr": 0.1,
        "batch_size": 32,
        "local_epochs": 3,
        "features_per_class": 20,
        "retrain_epochs": 20,
        "distill_augmentation": "none",
        **options,
    }
    result = protofl.run(small_config, out=tmp_path / "run")
    final = result.summary["final"]
    assert final["global_acc"] > floor  # chance: 0.1 (3 rounds: the measured values are 0.29 and 0.19)
    assert -1.0 <= final["global_signal_cos"] <= 1.0
