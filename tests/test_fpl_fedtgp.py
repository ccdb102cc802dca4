"""FINCH, FPL and FedTGP against hand computations, their payloads, bad input, and short real runs."""

import io
import logging
import math

import numpy as np
import pytest
import torch

import protofl
from protofl.algorithms import ALGORITHMS, ClientData, Task
from protofl.algorithms.fedtgp import adaptive_margin, generate_prototypes, live_units, margin_loss
from protofl.algorithms.fpl import cluster_prototypes, cpcl_loss
from protofl.config import ModelConfig
from protofl.finch import finch, first_neighbour_partition
from protofl.payload import Payload, validate

TASK = Task(input_shape=(12,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=8))


def client(k, n=30, classes=(0, 1, 2, 3)):
    g = torch.Generator().manual_seed(k)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 12, generator=g) + y[:, None].float()
    return ClientData(k, x, y, x[:10], y[:10])


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


# -- FINCH -------------------------------------------------------------------------------------------
def test_finch_finds_planted_direction_clusters():
    g = torch.Generator().manual_seed(0)
    # three orthogonal directions, 8 noisy points each (noise in 64 dimensions, so that the points of a
    # group are about equally far apart and its first-neighbour subclusters merge at the next level)
    directions = torch.eye(64)[:3] * 4
    planted = torch.arange(3).repeat_interleave(8)
    x = directions[planted] * torch.rand(24, 1, generator=g).add(0.5) + 0.2 * torch.randn(24, 64, generator=g)
    levels = finch(x, "cosine")
    # the coarsest level is exactly the planted grouping; every finer level refines it
    assert same_partition(levels[-1].tolist(), planted.tolist())
    for level in levels:
        assert all(len(set(planted[level == k].tolist())) == 1 for k in range(int(level.max()) + 1))
    sizes = [int(level.max()) + 1 for level in levels]
    assert sizes == sorted(set(sizes), reverse=True) and sizes[-1] == 3
    # first partition: every point is in its first neighbour's cluster
    first, _ = first_neighbour_partition(x)
    assert first.dtype == torch.int64 and torch.equal(levels[0], first)
    u = torch.nn.functional.normalize(x, dim=1)
    sim = u @ u.t()
    sim.fill_diagonal_(-2)
    assert all(first[i] == first[int(sim[i].argmax())] for i in range(24))
    assert [level.tolist() for level in finch(x[:1])] == [[0]]


def nested_directions():
    """Unit vectors at 0/2, 10/12, 90/92, 100/102 and 200/215 degrees: five first-neighbour pairs (the
    loose last one sets the longest first-level link, 15 degrees), whose means then pair up at 10
    degrees: FINCH levels [the five pairs, {0..12}, {90..102}, {200, 215}]."""
    angles = torch.tensor([0.0, 2, 10, 12, 90, 92, 100, 102, 200, 215]).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], 1), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_finch_hierarchy_merges_close_clusters_only():
    x, pairs, groups = nested_directions()
    levels = finch(x * torch.arange(1.0, 11)[:, None], "cosine")  # norms do not matter to cosine
    assert len(levels) == 2
    assert same_partition(levels[0].tolist(), pairs)
    assert same_partition(levels[1].tolist(), groups)
    # without the longest-first-link rule the three group means would chain into one cluster
    means = torch.stack([x[torch.tensor(groups) == g].mean(0) for g in range(3)])
    assert int(first_neighbour_partition(means)[0].max()) == 0


# -- FPL ---------------------------------------------------------------------------------------------
def test_cpcl_equals_a_hand_computation():
    z = torch.tensor([[1.0, 0.0]])
    clusters = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    cluster_classes = torch.tensor([0, 0, 1])
    tau = 0.5
    cos = [1 / math.sqrt(2), 1.0, 0.0]
    e = [math.exp(c / tau) for c in cos]
    expected = -math.log((e[0] + e[1]) / sum(e))
    assert float(cpcl_loss(z, torch.tensor([0]), cluster_classes, clusters, tau)) == pytest.approx(expected, rel=1e-5)
    expected1 = -math.log(e[2] / sum(e))
    assert float(cpcl_loss(z, torch.tensor([1]), cluster_classes, clusters, tau)) == pytest.approx(expected1, rel=1e-5)


def reply(classes, protos, counts=None):
    counts = counts or [1] * len(classes)
    return Payload(
        {
            "classes": np.array(classes, np.int64),
            "prototypes": np.array(protos, np.float32),
            "counts": np.array(counts, np.int64),
        },
        {"method": "fpl"},
    )


def test_fpl_unbiased_prototype_is_the_mean_of_cluster_means():
    # class 0: four clients in two directions (two near x, two near y); class 2 uploaded once
    replies = [
        reply([0, 2], [[1.0, 0.0], [5.0, 5.0]]),
        reply([0], [[3.0, 0.1]]),
        reply([0], [[0.0, 2.0]]),
        reply([0], [[0.1, 3.0]]),
    ]
    cluster_cls, clusters, classes, unbiased = cluster_prototypes(replies, 2)
    assert classes.tolist() == [0, 2]
    assert sorted(cluster_cls.tolist()) == [0, 0, 2]
    c0 = clusters[cluster_cls == 0]
    expected = {(2.0, 0.05), (0.05, 2.5)}
    assert {tuple(round(v, 4) for v in row.tolist()) for row in c0} == expected
    torch.testing.assert_close(unbiased[0], torch.tensor([1.025, 1.275]))
    torch.testing.assert_close(unbiased[1], torch.tensor([5.0, 5.0]))


def by_angle(rows):
    return rows[torch.argsort(torch.atan2(rows[:, 1], rows[:, 0]))]


def test_fpl_finch_level_first_or_last():
    protos, pairs, groups = nested_directions()
    replies = [reply([1], [p.tolist()]) for p in protos]
    for level, labels in (("first", pairs), ("last", groups)):
        labels = torch.tensor(labels)
        expected = torch.stack([protos[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
        cluster_cls, clusters, classes, unbiased = cluster_prototypes(replies, 2, level)
        assert classes.tolist() == [1] and cluster_cls.tolist() == [1] * len(expected)
        torch.testing.assert_close(by_angle(clusters), by_angle(expected))
        torch.testing.assert_close(unbiased[0], expected.mean(0))
    assert ALGORITHMS["fpl"].Config().finch_level == "last" and ALGORITHMS["fpl"].Config().model_sharing == "fedavg"


@pytest.mark.parametrize("method", ["fpl", "fedtgp"])
def test_client_without_a_class_uploads_nothing_for_it_and_payloads_validate(method):
    algo = ALGORITHMS[method].from_options(
        {"lr": 0.01, "server_epochs": 5} if method == "fedtgp" else {"lr": 0.01}, TASK
    )
    server = algo.init_server_state(0)
    received = Payload.from_bytes(algo.broadcast(server).to_bytes())
    validate(received, algo.broadcast_spec())
    replies = []
    for k, classes in enumerate([(0, 1), (1, 3), (1,)]):
        _, r, _ = algo.client_step(
            algo.init_client_state(0), client(k, classes=classes), received, torch.Generator().manual_seed(k)
        )
        validate(r, algo.reply_spec())
        assert r["classes"].tolist() == list(classes)
        replies.append(r)
    state, _ = algo.server_step(server, replies)
    assert state["classes"].tolist() == [0, 1, 3]  # class 2 absent everywhere: no prototype
    broadcast = Payload.from_bytes(algo.broadcast(state).to_bytes())
    validate(broadcast, algo.broadcast_spec())
    # round 2: the prototype losses now apply and training still gives finite parameters
    _, r, m = algo.client_step(algo.init_client_state(0), client(5), broadcast, torch.Generator().manual_seed(5))
    assert np.isfinite(m["train_loss"]) and all(np.isfinite(v).all() for v in r.arrays.values() if v.dtype.kind == "f")


# -- FedTGP ------------------------------------------------------------------------------------------
def test_fedtgp_margin_equals_a_hand_computation():
    means = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    # nearest other class: 0 -> 1.0 (class 2), 1 -> sqrt(9+9)=4.243 (class 2), 2 -> 1.0
    assert adaptive_margin(means, 100.0) == pytest.approx(math.sqrt(18))
    assert adaptive_margin(means, 2.5) == 2.5
    assert adaptive_margin(means[:1], 100.0) == 0.0


def test_fedtgp_margin_loss_by_hand():
    p = torch.tensor([[0.0, 0.0]])
    generated = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    logits = [-(5.0 + 2.0), -1.0]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert float(margin_loss(p, torch.tensor([0]), generated, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_fedtgp_server_learns_prototypes_that_classify_the_uploads():
    algo = ALGORITHMS["fedtgp"].from_options({"server_epochs": 60, "server_lr": 0.05}, TASK)
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 6, generator=g) * 3
    replies = [
        reply([0, 1, 2], (centres[:3] + 0.3 * torch.randn(3, 6, generator=g)).tolist()),
        reply([1, 2], (centres[1:3] + 0.3 * torch.randn(2, 6, generator=g)).tolist()),
    ]
    server = algo.init_server_state(0)
    state, metrics = algo.server_step(server, replies)
    assert metrics["server_loss_last"] < metrics["server_loss_first"]
    a, b = (torch.from_numpy(r["prototypes"]).double() for r in replies)
    class_means = torch.stack([a[0], (a[1] + b[0]) / 2, (a[2] + b[1]) / 2])  # unweighted over clients
    assert metrics["margin"] == pytest.approx(adaptive_margin(class_means, 100.0)) and metrics["margin"] > 0
    assert state["classes"].tolist() == [0, 1, 2]  # class 3 never uploaded: not broadcast
    torch.testing.assert_close(state["prototypes"], generate_prototypes(state["generator"])[:3])
    uploads = torch.from_numpy(np.concatenate([r["prototypes"] for r in replies]))
    labels = torch.from_numpy(np.concatenate([r["classes"] for r in replies]))
    assert (torch.cdist(uploads, state["prototypes"]).argmin(1) == labels).all()
    validate(Payload.from_bytes(algo.broadcast(state).to_bytes()), algo.broadcast_spec())
    # the state is plain tensors (checkpointable), the generator's start depends on the seed only
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(loaded["generator"], state["generator"])
    torch.testing.assert_close(algo.init_server_state(0)["generator"], server["generator"])
    assert not torch.equal(algo.init_server_state(1)["generator"]["embedding"], server["generator"]["embedding"])


def test_fedtgp_live_units_tell_a_collapsed_generator_from_a_trained_one(caplog):
    """On wide features (d = 1,280, like the frozen EfficientNet-Lite0 embeddings) the default server lr
    0.1 kills every hidden unit of the generator in one round, so every class gets the same prototype;
    the metric says 0 there and is positive where the generator trains (lr 0.01)."""
    d, c = 1280, 10
    task = Task(input_shape=(d,), num_classes=c, model=ModelConfig(name="linear"))
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(c, d, generator=g).abs() * 0.1  # non-negative, norm about 3.6, like the embeddings
    replies = [reply(list(range(c)), (centres + 0.02 * torch.randn(c, d, generator=g)).tolist()) for _ in range(4)]
    uploads = torch.from_numpy(np.concatenate([r["prototypes"] for r in replies])).float()
    labels = torch.from_numpy(np.concatenate([r["classes"] for r in replies]))
    by_lr = {}
    warned = {}
    threads = torch.get_num_threads()
    # at one thread the collapse is total; at two, another summation order left 1 unit of 1,280 alive
    torch.set_num_threads(1)
    try:
        for lr in (0.1, 0.01):
            algo = ALGORITHMS["fedtgp"].from_options({"server_lr": lr}, task)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="protofl.fedtgp"):
                state, metrics = algo.server_step(algo.init_server_state(0), replies)
            warned[lr] = any("hidden units live" in r.getMessage() for r in caplog.records)
            assert metrics["generator_live_units"] == live_units(state["generator"])
            by_lr[lr] = (state, metrics, (torch.cdist(uploads, state["prototypes"]).argmin(1) == labels).float().mean())
    finally:
        torch.set_num_threads(threads)
    collapsed, _, collapsed_acc = by_lr[0.1]
    assert by_lr[0.1][1]["generator_live_units"] == 0.0
    assert float(torch.pdist(collapsed["prototypes"]).max()) < 1e-6  # one prototype for every class
    assert collapsed_acc <= 0.1 + 1e-6
    assert by_lr[0.01][1]["generator_live_units"] > 0.5
    assert by_lr[0.01][2] == 1.0  # the trained generator tells every upload's class
    assert warned == {0.1: True, 0.01: False}  # the collapse is said in the log, and only the collapse


# -- short real runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,key,floor",
    [
        # FPL at its reference lr 0.01 (see the fpl module docstring: at >= 0.02 CPCL collapses the features here)
        ("fpl", {"lr": 0.01, "local_epochs": 5}, "global_acc", 0.7),
        ("fedtgp", {}, "personal_acc_mean", 0.6),
        ("fedtgp", {"model_sharing": "fedavg"}, "global_acc", 0.7),
        ("fedproto", {"model_sharing": "fedavg"}, "global_acc", 0.7),
    ],
)
def test_prototype_methods_train_above_chance_on_optdigits(small_config, tmp_path, method, options, key, floor):
    small_config["method"] = {"name": method, "lr": 0.05, "batch_size": 32, "local_epochs": 3, **options}
    small_config["federation"]["rounds"] = 4
    final = protofl.run(small_config, out=tmp_path / "run").summary["final"]
    assert final[key] > floor  # chance: 0.1
