"""The batched round's cheaper paths against their plain definitions: a step of the clients that take it
(the others' parameters and optimiser state untouched), the clean prototypes of every client from the
stacked class sums, the server's average of all uploads in one update, the payload checks' extremes and
the budget check that remembers the records it found within the budget."""

import numpy as np
import pytest
import torch

from protofl.algorithms import Task, get_algorithm
from protofl.algorithms.base import StackedFeatures
from protofl.algorithms.fedproto import aggregate_prototypes, reply_weights
from protofl.config import ModelConfig, PrivacyConfig
from protofl.payload import Payload, _extremes
from protofl.privacy import BudgetExceededError, accounting
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.layer import create_privacy_layer
from protofl.prototypes import PrototypeAccumulator
from protofl.training import ClientBatch, StackedOptimizer, stack_params, train_batched

TASK = Task(input_shape=(6,), num_classes=3, model=ModelConfig(feature_dim=5, hidden_dim=8))


def clients_data(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 6, generator=g) for n in sizes]
    ys = [torch.randint(0, 3, (n,), generator=g) for n in sizes]
    return xs, ys


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001},
        {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05, "local_epochs": 2},
    ],
)
def test_a_client_trains_the_same_with_clients_that_take_fewer_steps_and_alone(options, stacked):
    """Client sizes 45, 7 and 20 at batch 8: 6, 1 and 3 steps an epoch, so most steps are taken by some of
    the clients only. Each client's trained parameters and mean loss are those of its training alone (the
    same generator): the steps it shares with fewer clients compute it alone, and nothing of the others
    leaks into it (within float rounding: a batched product of K matrices need not round as one of one)."""
    algo = get_algorithm("fedproto").from_options({"batch_size": 8, **options}, TASK)
    sizes = (45, 7, 20)
    xs, ys = clients_data(sizes)
    start = [{k: v + 0.01 * c for k, v in algo.initial_params(0).items()} for c in range(len(sizes))]
    context = algo.context(Payload({"classes": np.zeros(0, np.int64), "prototypes": np.zeros((0, 5), np.float32)}))
    gens = lambda: [torch.Generator().manual_seed(50 + c) for c in range(len(sizes))]

    together, metrics = train_batched(
        stack_params(start), ClientBatch.of(xs, ys), algo.loss, algo.config, gens(), (context,), stacked
    )
    for c, g in enumerate(gens()):
        alone, alone_metrics = train_batched(
            stack_params([start[c]]), ClientBatch.of([xs[c]], [ys[c]]), algo.loss, algo.config, [g], (context,), stacked
        )
        for name, value in alone.items():
            torch.testing.assert_close(together[name][c], value[0], rtol=1e-5, atol=1e-6, msg=f"{c} {name}")
        assert metrics[c]["train_loss"] == pytest.approx(alone_metrics[0]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_an_optimiser_step_of_some_rows_is_theirs_in_a_step_of_all_and_leaves_the_others(kind):
    class Config:
        optimizer, lr, momentum, weight_decay = kind, 0.1, 0.9, 0.01

    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, 3, 2, generator=g), "b": torch.randn(5, 4, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(2)]
    rows = torch.tensor([1, 3])
    full = {k: v.clone() for k, v in params.items()}
    part = {k: v.clone() for k, v in params.items()}
    opt_full, opt_part = StackedOptimizer(Config, full), StackedOptimizer(Config, part)
    for step, grad in enumerate(grads, start=1):  # two steps: the optimiser state carries over
        opt_full.step(full, grad, step)
        opt_part.step(part, {k: v[rows] for k, v in grad.items()}, step, rows)
    for name in params:
        assert torch.equal(part[name][rows], full[name][rows])
        others = torch.tensor([0, 2, 4])
        assert torch.equal(part[name][others], params[name][others])
    for group_full, group_part in zip(opt_full.state, opt_part.state):
        for t_full, t_part in zip(group_full, group_part):
            assert torch.equal(t_part[rows], t_full[rows]) and not t_part[torch.tensor([0, 2, 4])].any()


def test_clean_prototypes_of_a_batch_are_each_clients_own_accumulator():
    algo = get_algorithm("fedproto").from_options({}, TASK)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 10, 5, generator=g) * 7
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 0, 0, 0], [2] * 10, [1, 0, 1, 0, 1, 0, 1, 1, 0, 0]])
    weight = torch.ones(3, 10)
    weight[2, 7:] = 0  # padding: not counted
    sums, counts = PrototypeAccumulator.stacked_sums(z, labels, weight, 3)
    got = algo.clean_prototypes_batch(StackedFeatures(z, labels, weight, sums, counts))
    for c, (classes, protos, held, ledger, metrics) in enumerate(got):
        acc = PrototypeAccumulator(3, 5)
        real = weight[c] > 0
        acc.update(z[c][real], labels[c][real])
        want = acc.compute()
        assert torch.equal(classes, want[0]) and torch.equal(protos, want[1]) and torch.equal(held, want[2])
        assert protos.dtype == want[1].dtype and ledger is None and metrics == {}
    assert got[1][0].tolist() == [2]  # a client with one class releases that class alone


@pytest.mark.parametrize("weighted,min_count", [(True, 1.0), (False, 1.0), (False, 2.5), (True, 2.5)])
def test_the_average_of_all_uploads_in_one_update_is_the_update_per_reply(weighted, min_count):
    g = torch.Generator().manual_seed(3)
    replies = []
    for k, classes in enumerate(([0, 2], [1], [], [0, 1, 2], [2])):
        counts = torch.randn(len(classes), generator=g).double() * 3 + (k % 3)  # noisy counts, some below 0
        replies.append(
            Payload(
                {
                    "classes": np.array(classes, dtype=np.int64),
                    "prototypes": torch.randn(len(classes), 4, generator=g).numpy(),
                    "counts": counts.numpy(),
                },
                {"method": "fedproto"},
            )
        )
    acc = PrototypeAccumulator(3, 4, dtype=torch.float64)
    for reply in replies:  # the written-out definition: one update per reply, in order
        acc.update_means(
            torch.from_numpy(reply["classes"]),
            torch.from_numpy(reply["prototypes"]).double(),
            reply_weights(reply, weighted, min_count),
        )
    want_classes, want, _ = acc.compute()
    classes, protos = aggregate_prototypes(replies, 3, 4, weighted, min_count)
    assert torch.equal(classes, want_classes) and torch.equal(protos, want.float())
    assert aggregate_prototypes([], 3, 4, weighted, min_count)[0].numel() == 0


@pytest.mark.parametrize(
    "values",
    [np.array([3, -1, 7], dtype=np.int64), np.array([2], dtype=np.uint8), np.array([True, False]), np.arange(2000)],
)
def test_payload_extremes_are_the_arrays_min_and_max(values):
    low, high = _extremes(values)
    assert (low, high) == (values.min(), values.max())


def test_the_budget_check_remembers_an_allowed_record_and_still_refuses_the_next_release_over_budget(monkeypatch):
    layer = create_privacy_layer(PrivacyConfig(mechanism="vpp", epsilon=2.0, accountant="rdp", planned_releases=2), 3)
    calls = []
    check = accounting.PrivacyLedger.check

    def counted(self, events, who="this party"):
        calls.append(who)
        return check(self, events, who)

    monkeypatch.setattr(accounting.PrivacyLedger, "check", counted)
    state: dict = {}
    for k in range(5):  # five clients with the same (empty) record: checked once
        layer.check_next(state, f"client {k}")
    assert calls == ["client 0"]
    state = {LEDGER_KEY: layer.spend(state, layer.release_events(), "client 0")}
    layer.check_next(state, "client 1")  # a new record: checked (the second planned release is allowed)
    assert calls[-1] == "client 1"
    state = {LEDGER_KEY: layer.spend(state, layer.release_events(), "client 0")}
    with pytest.raises(BudgetExceededError, match="client 3"):  # past the plan: refused, every time
        layer.check_next(state, "client 3")
    with pytest.raises(BudgetExceededError, match="client 4"):
        layer.check_next(state, "client 4")
