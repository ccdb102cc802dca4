"""The add/remove prototype release (the default): its noise against an independent calibration, its
cost as one Gaussian mechanism, the stated sensitivity on random neighbouring datasets, the servers'
use of the noisy counts, the refusal of fixed-features where clients train the map, and small runs of
every prototype host under both relations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld, rdp

import protofl
from protofl.algorithms import Task, get_algorithm
from protofl.algorithms.fedproto import aggregate_prototypes, present_rows
from protofl.api import resolve_config
from protofl.config import ConfigError, ModelConfig, PrivacyConfig
from protofl.models import LinearNet, build_model
from protofl.payload import Payload, validate
from protofl.privacy import (
    GaussianEvent,
    PureDpEvent,
    clip_rows,
    create_privacy_layer,
    igpp_release,
    mechanisms,
    statement,
    vpp_release,
)
from protofl.privacy.mechanisms import split_multiplier


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rdp_epsilon(sigmas, delta):
    acc = rdp.RdpAccountant()
    for sigma, count in sigmas:
        acc.compose(dp_event.GaussianDpEvent(sigma), count)
    return acc.get_epsilon(delta)


def _independent_sigma(epsilon, delta, releases):
    """σ of ``releases`` Gaussian releases at (ε, δ), by bisection on dp_accounting's RDP accountant."""
    low, high = 1e-2, 1e3
    for _ in range(100):
        mid = math.sqrt(low * high)
        low, high = (low, mid) if _rdp_epsilon([(mid, releases)], delta) <= epsilon else (mid, high)
    return high


# -- noise and accounting ----------------------------------------------------------------------------


def test_feature_and_count_noise_match_an_independent_calibration():
    """Features: σ/√(1−f)·2R√C on every class (a class the client lacks too); counts: σ/√f. A bug in
    the calibration, in the split (e.g. σ·√(1−f)) or in the sensitivity (√C over held classes) fails."""
    privacy = PrivacyConfig(mechanism="igpp", epsilon=4.0, accountant="rdp", planned_releases=3, count_fraction=0.2)
    layer = create_privacy_layer(privacy, 4)
    sigma = _independent_sigma(4.0, 1e-5, 3)
    assert layer.noise_multiplier == pytest.approx(sigma, rel=1e-3)
    g = _gen(7)
    y = torch.tensor([0] * 30 + [1] * 3 + [3] * 12)  # class 2 absent
    z = torch.randn(len(y), 6, generator=g) * 4
    bound = privacy.clip_bound
    clipped = clip_rows(z.double(), bound)
    clean = torch.zeros(4, 6, dtype=torch.float64)
    for c in (0, 1, 3):
        clean[c] = clipped[y == c].mean(0)
    counts = torch.tensor([30.0, 3.0, 0.0, 12.0], dtype=torch.float64)
    feature_noise, count_noise = [], []
    for s in range(3000):
        r = layer.noisy_prototypes(z, y, _gen(s))
        assert r.classes.tolist() == [0, 1, 2, 3] and r.counts.dtype == torch.float64
        feature_noise.append(r.statistic - clean)
        count_noise.append(r.counts - counts)
    features, count = torch.stack(feature_noise), torch.stack(count_noise)
    want_f = sigma / math.sqrt(1 - 0.2) * 2 * bound * math.sqrt(4)
    want_n = sigma / math.sqrt(0.2)
    for c in range(4):
        assert float(features[:, c].pow(2).mean().sqrt()) == pytest.approx(want_f, rel=0.03)
        assert float(count[:, c].std()) == pytest.approx(want_n, rel=0.05)
        assert abs(float(count[:, c].mean())) < 4 * want_n / math.sqrt(3000)
    assert layer.count_noise_std == pytest.approx(want_n, rel=1e-3)


@pytest.mark.parametrize("f", [0.01, 0.1, 0.5, 0.9])
def test_the_split_release_costs_exactly_one_gaussian_at_sigma(f):
    """Features at σ_f and counts at σ_n, each moved by its full sensitivity, compose (RDP and PLD, by
    dp_accounting) to exactly one Gaussian at σ: the ledger's one GaussianEvent(σ) is the true cost."""
    sigma = 1.3
    sigma_f, sigma_n = split_multiplier(sigma, f)
    assert 1 / sigma_f**2 + 1 / sigma_n**2 == pytest.approx(1 / sigma**2, rel=1e-12)
    assert _rdp_epsilon([(sigma_f, 5), (sigma_n, 5)], 1e-5) == pytest.approx(_rdp_epsilon([(sigma, 5)], 1e-5), rel=1e-9)
    split, whole = (
        pld.PLDAccountant(value_discretization_interval=1e-3),
        pld.PLDAccountant(value_discretization_interval=1e-3),
    )
    split.compose(dp_event.GaussianDpEvent(sigma_f), 5).compose(dp_event.GaussianDpEvent(sigma_n), 5)
    whole.compose(dp_event.GaussianDpEvent(sigma), 5)
    assert split.get_epsilon(1e-5) == pytest.approx(whole.get_epsilon(1e-5), rel=1e-2)
    r = igpp_release(torch.randn(5, 3), torch.arange(5) % 2, 2, 5.0, sigma, _gen(), count_fraction=f)
    assert r.events == ((GaussianEvent(sigma), 1),)
    r = vpp_release(torch.randn(9, 4), torch.arange(9) % 2, 2, 5.0, sigma, 0.5, 0.1, 0.3, _gen(), count_fraction=f)
    assert r.events == ((PureDpEvent(0.3), 1), (GaussianEvent(sigma), 1))


# -- the stated sensitivity on random neighbours -------------------------------------------------------


def _rescaled_move(a, b):
    """‖(clean(b) − clean(a)) / noise std‖ over features and counts: both releases drew the same noise
    (the shapes do not depend on the data), so their difference is the clean statistics'."""
    move = ((b.statistic - a.statistic) / a.noise_std).pow(2).sum() + ((b.counts - a.counts) / a.count_std).pow(2).sum()
    return float(move.sqrt())


def _neighbours(rng, num_classes, d):
    n = int(rng.integers(0, 12))
    y = torch.from_numpy(rng.integers(0, num_classes, n))
    z = torch.from_numpy(rng.normal(0, float(rng.choice([0.1, 3.0, 30.0])), (n, d)))
    extra_label = int(rng.integers(0, num_classes))  # often a class the smaller set lacks
    extra = torch.from_numpy(rng.normal(0, 30.0, (1, d)))
    return (z, y), (torch.cat([z, extra]), torch.cat([y, torch.tensor([extra_label])]))


@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
@pytest.mark.parametrize("sensitivity", ["trained-features", "fixed-features"])
def test_adding_or_removing_one_example_moves_the_rescaled_release_by_at_most_one_over_sigma(
    mechanism, sensitivity, monkeypatch
):
    """Random datasets (empty ones and empty classes included): the release of D and of D plus one
    example, rescaled by the noise, differ by at most 1/σ. Under trained-features every feature of the
    larger set is redrawn (the retrained map). A sensitivity of 2R√(held classes), R/n_c per sum, a
    count sensitivity left out of the split, or a class mean that leaves the R-ball fails here."""
    rng = np.random.default_rng(0)
    sigma, bound, num_classes, d = 0.8, 2.0, 4, 5
    # VPP's Gaussian part, conditioned on its selection (a separate pure-DP release): the same group A.
    monkeypatch.setattr(mechanisms, "_top_k_batch", lambda scores, k, cap, eps, gens: [np.arange(k)] * len(gens))
    worst = 0.0
    for trial in range(300):
        (z, y), (z2, y2) = _neighbours(rng, num_classes, d)
        if sensitivity == "trained-features":
            z2 = torch.from_numpy(rng.normal(0, float(rng.choice([0.1, 3.0, 30.0])), tuple(z2.shape)))
        releases = []
        for zz, yy in ((z, y), (z2, y2)):
            if mechanism == "igpp":
                releases.append(igpp_release(zz, yy, num_classes, bound, sigma, _gen(trial), sensitivity))
            else:
                releases.append(vpp_release(zz, yy, num_classes, bound, sigma, 0.4, 0.1, 1.0, _gen(trial), sensitivity))
        worst = max(worst, _rescaled_move(*releases))
    assert worst <= 1 / sigma * (1 + 1e-9)
    assert worst > 0.3 / sigma  # the property is not met vacuously


def test_fixed_features_add_remove_releases_sums_and_divides_by_the_noisy_count():
    z, y = torch.randn(7, 3, generator=_gen(1)), torch.tensor([0, 0, 0, 2, 2, 2, 2])
    r = igpp_release(z, y, 3, 100.0, 0.5, _gen(2), "fixed-features")
    clean_sums = torch.stack([z[y == c].double().sum(0) for c in range(3)])
    noise = r.statistic - clean_sums
    assert float(noise.std()) == pytest.approx(float(r.noise_std[0, 0]), rel=0.9)  # noise of std σ_f R is there
    assert float(r.noise_std[0, 0]) == pytest.approx(0.5 / math.sqrt(0.9) * 100.0)
    torch.testing.assert_close(r.prototypes, (r.statistic / r.counts.clamp_min(1.0)[:, None]).float())


# -- replies and the server ---------------------------------------------------------------------------


def _client_data(k, classes):
    from protofl.algorithms import ClientData

    g = _gen(k)
    y = torch.tensor(classes)[torch.randint(len(classes), (24,), generator=g)]
    x = torch.randn(len(y), 8, generator=g) + y[:, None].float()
    return ClientData(k, x, y, x[:6], y[:6])


@pytest.mark.parametrize("name", ["fedproto", "fpl", "fedtgp", "fedgh"])
def test_an_add_remove_reply_covers_every_class_whatever_the_client_holds(name):
    privacy = PrivacyConfig(mechanism="igpp", epsilon=4.0, accountant="rdp", planned_releases=2)
    options = {"batch_size": 8, **({"model_sharing": "none"} if name == "fpl" else {"server_epochs": 2})}
    options = {"batch_size": 8} if name == "fedproto" else options
    algo = get_algorithm(name).from_options(options, Task((8,), 4, ModelConfig(feature_dim=6, hidden_dim=8)), privacy)
    received = algo.broadcast(algo.init_server_state(0))
    replies = []
    for k, classes in enumerate([(0,), (1, 3), (0, 1, 2, 3)]):
        _, reply, _ = algo.client_step(algo.init_client_state(0), _client_data(k, classes), received, _gen(k))
        validate(reply, algo.reply_spec())
        assert reply["classes"].tolist() == [0, 1, 2, 3]
        assert reply["prototypes"].shape == (4, 6) and reply["counts"].dtype == np.float64
        assert not np.array_equal(reply["counts"], np.round(reply["counts"]))  # noisy, not exact
        replies.append(reply)
    state, _ = algo.server_step(algo.init_server_state(0), replies)
    assert state["prototypes"].shape[1] == 6 and torch.isfinite(state["prototypes"]).all()
    # a replace-one reply of a client holding one class is refused by the add/remove spec
    exact = Payload(
        {"classes": np.array([0]), "prototypes": np.zeros((1, 6), np.float32), "counts": np.array([5])},
        {"method": name},
    )
    with pytest.raises(Exception, match="shape|dtype"):
        validate(exact, algo.reply_spec())


def _reply(counts, protos):
    counts = np.asarray(counts, np.float64)
    return Payload(
        {
            "classes": np.arange(len(counts)),
            "prototypes": np.asarray(protos, np.float32),
            "counts": counts,
        },
        {"method": "fedproto"},
    )


def test_servers_weigh_by_noisy_counts_clamped_at_zero_and_threshold_the_unweighted_mean():
    a = _reply([10.0, -3.0], [[1.0], [100.0]])
    b = _reply([30.0, 2.5], [[5.0], [7.0]])
    classes, protos = aggregate_prototypes([a, b], 2, 1, weighted=True)
    # class 0: (10·1 + 30·5) / 40; class 1: the negative count weighs 0, not -3
    assert classes.tolist() == [0, 1]
    assert protos[:, 0].tolist() == pytest.approx([4.0, 7.0])
    classes, protos = aggregate_prototypes([a, b], 2, 1, weighted=False, min_count=3.0)
    assert classes.tolist() == [0] and protos[0, 0] == pytest.approx(3.0)  # 2.5 < 3: b's class 1 left out
    labels, rows = present_rows([a, b], min_count=3.0)
    assert labels.tolist() == [0, 0] and rows[:, 0].tolist() == [1.0, 5.0]


def test_presence_threshold_is_two_count_noise_stds_under_add_remove_and_one_otherwise():
    task = Task((8,), 4, ModelConfig(feature_dim=6, hidden_dim=8))
    add = get_algorithm("fedproto").from_options(
        {}, task, PrivacyConfig(mechanism="igpp", epsilon=4.0, accountant="rdp", planned_releases=2)
    )
    assert add.presence_threshold == pytest.approx(max(1.0, 2 * add.privacy_layer.count_noise_std))
    assert add.presence_threshold > 1.0
    one = get_algorithm("fedproto").from_options(
        {},
        task,
        PrivacyConfig(mechanism="igpp", epsilon=4.0, accountant="rdp", planned_releases=2, relation="replace-one"),
    )
    assert one.presence_threshold == 1.0 and one.privacy_layer.count_noise_std == 0.0


# -- valid by default: fixed-features only where no client trains the map --------------------------------


def _config(**model):
    return {
        "data": {"dataset": "optdigits"},
        "model": model,
        "privacy": {"mechanism": "igpp", "sensitivity": "fixed-features"},
        "method": {"name": "fedproto"},
    }


@pytest.mark.parametrize("model", [{}, {"name": "cnn"}, {"name": "adapter"}])
def test_fixed_features_is_refused_where_clients_train_the_feature_map(model):
    with pytest.raises(ConfigError, match=r"^privacy\.sensitivity: 'fixed-features' needs a feature map no client"):
        resolve_config(_config(**model))


def test_fixed_features_is_accepted_on_the_linear_model_and_refused_for_a_model_of_ones_own():
    config = resolve_config(_config(name="linear"))
    assert config.privacy.sensitivity == "fixed-features" and not config.model.trains_features
    with pytest.raises(ConfigError, match="a model of your own"):
        resolve_config(_config(name="linear"), user_model=True)
    # the defaults are valid on every model
    assert resolve_config({**_config(), "privacy": {"mechanism": "igpp"}}).privacy.sensitivity == "trained-features"


def test_the_check_is_one_function_a_test_can_replace(monkeypatch):
    monkeypatch.setattr(statement, "check_sensitivity", lambda config, user_model=False: None)
    assert resolve_config(_config()).privacy.sensitivity == "fixed-features"


def test_dp_sgd_under_replace_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^privacy\.relation: dp-sgd is accounted under add-remove"):
        resolve_config({"privacy": {"mechanism": "dp-sgd", "relation": "replace-one"}, "method": {"name": "dpfedavg"}})


def test_the_linear_model_passes_its_input_through_as_features():
    model = build_model(ModelConfig(name="linear"), (1, 8, 8), 10)
    assert isinstance(model, LinearNet) and model.feature_dim == 64
    x = torch.randn(3, 1, 8, 8)
    z, logits = model(x)
    assert torch.equal(z, x.flatten(1)) and logits.shape == (3, 10)
    assert [name for name, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="model.name 'adapter' needs embedding inputs"):
        build_model(ModelConfig(name="adapter"), (1, 8, 8), 10)


def test_a_model_name_outside_the_list_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model\.name: 'mlp' is not one of adapter, auto, cnn, linear"):
        resolve_config({"model": {"name": "mlp"}})


# -- the statement --------------------------------------------------------------------------------------


def test_statement_says_the_rule_and_what_each_relation_leaves_uncovered():
    add = statement.privacy_statement(PrivacyConfig(mechanism="vpp"), "in-process")
    assert add["relation"] == "add-remove" and add["sensitivity"] == "trained-features"
    assert "2R·sqrt(C)" in add["sensitivity_text"] and "counts: 1" in add["sensitivity_text"]
    assert not any("number of examples of each class" in line for line in add["not_covered"])
    one = statement.privacy_statement(
        PrivacyConfig(mechanism="igpp", relation="replace-one", sensitivity="fixed-features"), "in-process"
    )
    assert "2R/n_c" in one["sensitivity_text"]
    assert any("set of classes each client holds" in line for line in one["not_covered"])
    dp = statement.privacy_statement(PrivacyConfig(mechanism="dp-sgd"), "in-process")
    assert any("number of train examples n" in line for line in dp["not_covered"])


# -- small runs of every host under both relations ---------------------------------------------------------

SMALL = {
    "seed": 1,
    "data": {"dataset": "optdigits", "max_train_samples": 240},
    "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 3},
    "federation": {"rounds": 2, "progress": False},
    "model": {"feature_dim": 8},
}


@pytest.mark.parametrize("relation", ["add-remove", "replace-one"])
@pytest.mark.parametrize("mechanism,dcr", [("igpp", False), ("vpp", False), ("vpp", True)])
@pytest.mark.parametrize("method", ["fedproto", "fpl", "fedtgp", "fedgh"])
def test_every_prototype_host_runs_under_both_relations(method, mechanism, dcr, relation):
    options = {"name": method, "local_epochs": 1}
    if method in ("fedtgp", "fedgh"):
        options["server_epochs"] = 2
    config = {
        **SMALL,
        "method": options,
        "privacy": {"mechanism": mechanism, "dcr": dcr, "epsilon": 4.0, "accountant": "rdp", "relation": relation},
    }
    if method == "fpl":
        options["model_sharing"] = "none"  # FPL's FedAvg of the models is not protected: refused with privacy
    result = protofl.run(config)
    privacy = result.summary["privacy"]
    assert result.summary["status"] == "completed"
    assert privacy["relation"] == relation and privacy["sensitivity"] == "trained-features"
    assert 0 < privacy["epsilon"] <= 4.0 * (1 + 1e-9)
    assert (privacy["count_noise_multiplier"] is None) == (relation == "replace-one")
    assert all(math.isfinite(row["personal_acc_mean"]) for row in result.history)


# -- DP-SGD: the budget is checked before the round --------------------------------------------------------


@pytest.mark.parametrize("planned,stops", [(1, True), (2, False)])
def test_dpfedavg_announces_its_next_round_and_the_check_stops_it_before_it_starts(planned, stops):
    """After a round the client's state says what its next round costs; the engine's pre-round check
    raises (naming the client) exactly when that round would exceed the budget. Without the
    announcement the check could not know the client's sampling rate and would pass."""
    from protofl.privacy import BudgetExceededError
    from protofl.privacy.layer import NEXT_ROUND_KEY

    privacy = PrivacyConfig(mechanism="dp-sgd", epsilon=2.0, accountant="rdp", planned_releases=planned)
    algo = get_algorithm("dpfedavg").from_options(
        {"batch_size": 8, "steps_per_round": 3}, Task((8,), 3, ModelConfig(feature_dim=6, hidden_dim=8)), privacy
    )
    received = algo.broadcast(algo.init_server_state(0))
    algo.check_release({}, 4)  # nothing spent, nothing announced
    state, _, _ = algo.client_step({}, _client_data(4, (0, 1, 2)), received, _gen(0))
    assert NEXT_ROUND_KEY in state
    if stops:
        with pytest.raises(BudgetExceededError, match="^client 4: the next release would bring epsilon"):
            algo.check_release(state, 4)
    else:
        algo.check_release(state, 4)


@pytest.mark.parametrize("relation", ["add-remove", "replace-one"])
@pytest.mark.parametrize("mechanism", ["igpp", "vpp"])
def test_fixed_features_runs_on_the_linear_model_and_its_prototypes_classify(mechanism, relation):
    """The linear model on OptDigits' pixels: fixed-features is accepted, and the global prototypes of an
    ε = 8 run classify far above chance (0.1) by nearest prototype (measured 0.65-0.84)."""
    config = {
        **SMALL,
        "data": {"dataset": "optdigits", "max_train_samples": 900},
        "model": {"name": "linear"},
        "method": {"name": "fedproto", "local_epochs": 1},
        "privacy": {
            "mechanism": mechanism,
            "epsilon": 8.0,
            "accountant": "rdp",
            "relation": relation,
            "sensitivity": "fixed-features",
        },
    }
    result = protofl.run(config)
    assert result.summary["privacy"]["sensitivity"] == "fixed-features"
    assert result.summary["final"]["personal_proto_acc_mean"] > 0.3
