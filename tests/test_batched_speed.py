"""The batched round's fast paths against their plain definitions: the vectorised batch schedule, the
payload checks' dtype names and duplicate test, the features without the head; and the round loop's frozen
heap."""

import gc

import numpy as np
import pytest
import torch

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.config import FederationConfig, ModelConfig
from protofl.engine import Simulation
from protofl.models import EmbeddingAdapterNet
from protofl.payload import _ALLOWED_DTYPES, Payload, _has_duplicates, dtype_name
from protofl.training import ClientBatch, batch_schedule, batched_features, minibatches, stack_params, unstack_params


def reference_schedule(sizes, batch_size, epochs, seeds):
    """The schedule written out client by client, epoch by epoch, from :func:`minibatches`."""
    width = max(1, min(batch_size, max(sizes, default=1)))
    per_epoch = [-(-n // batch_size) for n in sizes]
    total = epochs * max(per_epoch, default=0)
    offsets = [sum(sizes[:c]) for c in range(len(sizes))]
    index = torch.zeros(total, len(sizes), width, dtype=torch.int64)
    weight = torch.zeros(total, len(sizes), width)
    active = torch.zeros(total, len(sizes), dtype=torch.bool)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for c, (n, g) in enumerate(zip(sizes, gens)):
        step = 0
        for _ in range(epochs):
            for rows in minibatches(n, batch_size, g):
                index[step, c, :] = offsets[c]
                index[step, c, : len(rows)] = rows + offsets[c]
                weight[step, c, : len(rows)] = 1.0
                active[step, c] = True
                step += 1
    return index, weight, active, torch.tensor(per_epoch) * epochs, gens


@pytest.mark.parametrize(
    "sizes,batch_size,epochs",
    [
        ((200,) * 7, 50, 1),  # equal clients, whole batches
        ((40, 23, 7, 16, 70), 16, 2),  # short last batches, a client smaller than a batch, unequal step counts
        ((5, 0, 3), 16, 3),  # every client smaller than a batch, one with no rows at all
        ((0, 9), 4, 2),  # a client with no rows first
        ((1,), 1, 1),
    ],
)
def test_vectorised_schedule_equals_the_client_by_client_one(sizes, batch_size, epochs):
    x = torch.arange(sum(sizes), dtype=torch.float32)[:, None]
    xs = list(x.split(list(sizes)))
    ys = [torch.zeros(len(part), dtype=torch.int64) for part in xs]
    seeds = [11 * k + 3 for k in range(len(sizes))]
    index, weight, active, steps, ref_gens = reference_schedule(list(sizes), batch_size, epochs, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    got = batch_schedule(ClientBatch.of(xs, ys), batch_size, epochs, gens)
    assert torch.equal(got.index, index)
    assert torch.equal(got.weight, weight)
    assert torch.equal(got.active, active)
    assert torch.equal(got.steps, steps)
    # every real row is a row of its own client, and each epoch visits each of them once
    for c, n in enumerate(sizes):
        real = got.index[:, c][got.weight[:, c] > 0]
        start = sum(sizes[:c])
        assert sorted(real.tolist()) == sorted(list(range(start, start + n)) * epochs)
    # the generators are left where the client-by-client draws leave them
    for g, r in zip(gens, ref_gens):
        assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=r))


@pytest.mark.parametrize("name", sorted(_ALLOWED_DTYPES))
def test_dtype_names_are_numpys_in_either_byte_order(name):
    for order in "<>=":
        dtype = np.dtype(name).newbyteorder(order)
        assert dtype_name(dtype) == dtype.name == name
    # a big-endian array goes over the wire under its name and comes back equal
    arr = np.arange(6).astype(np.dtype(name).newbyteorder(">")).reshape(2, 3)
    back = Payload.from_bytes(Payload({"a": arr}).to_bytes())["a"]
    assert dtype_name(back.dtype) == name and np.array_equal(back, arr)


def test_duplicates_are_found_as_np_unique_finds_them():
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, high, size) for high in (3, 50, 10**6) for size in (0, 1, 5, 40)]
    cases += [np.array([True, False]), np.array([True, True]), np.arange(2000) % 1999, np.arange(2000)]
    cases += [np.array([[1, 2], [2, 1]]), np.array([1.0, 1.0]), np.arange(5, dtype=np.uint8)]
    for arr in cases:
        assert _has_duplicates(arr) == (len(np.unique(arr)) != len(arr)), arr


def _clients(n=3, task_dim=8):
    g = torch.Generator().manual_seed(0)
    return [
        ClientData(
            k,
            torch.randn(20, task_dim, generator=g),
            torch.arange(20) % 4,
            torch.zeros(0, task_dim),
            torch.zeros(0, dtype=torch.int64),
        )
        for k in range(n)
    ]


def _simulation(rounds=2):
    task = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
    algo = get_algorithm("fedproto").from_options({"batch_size": 8}, task)
    fed = FederationConfig(rounds=rounds, checkpoint_every=0, progress=False, execution="batched")
    return Simulation(algo, _clients(), torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64), fed, seed=0)


def test_the_round_loop_runs_with_the_earlier_objects_frozen_and_gives_them_back(monkeypatch):
    sim = _simulation()
    seen = []
    step = sim.algorithm.server_step
    monkeypatch.setattr(sim.algorithm, "server_step", lambda *a: (seen.append(gc.get_freeze_count()), step(*a))[1])
    assert gc.get_freeze_count() == 0
    sim.run()
    assert len(seen) == 2 and all(count > 0 for count in seen)  # frozen while the rounds ran
    assert gc.get_freeze_count() == 0  # and given back to the collector after them


def test_the_round_loop_leaves_an_earlier_freeze_as_it_was():
    sim = _simulation()
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        sim.run()
        # still frozen (objects freed during the run leave it, by reference counting): not given back
        assert gc.get_freeze_count() > before // 2
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    "input_shape,model", [((8,), "adapter"), ((1, 8, 8), "cnn"), ((8,), "linear")], ids=["adapter", "cnn", "linear"]
)
def test_features_without_the_head_are_forwards_features(input_shape, model):
    task = Task(input_shape=input_shape, num_classes=4, model=ModelConfig(name=model, feature_dim=6, hidden_dim=10))
    algo = get_algorithm("fedproto").from_options({}, task)
    params = {k: v + 0.1 for k, v in algo.initial_params(0).items()}
    x = torch.randn(5, *input_shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(algo.forward_features(params, x), algo.forward(params, x)[0])
    # batched: every client's features under its own parameters, as one vmap
    stacked = stack_params([params, {k: v * 0.5 for k, v in params.items()}])
    batch = ClientBatch.of([x, x[:3]], [torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)])
    z, weight, _ = batched_features(algo.forward_features, stacked, batch)
    for c, p in enumerate(unstack_params(stacked)):
        n = int(weight[c].sum())
        torch.testing.assert_close(z[c, :n], algo.forward(p, batch.x[int(batch.offsets[c]) :][:n])[0])


def test_a_model_whose_forward_is_its_own_keeps_its_features():
    class Scaled(EmbeddingAdapterNet):
        def forward(self, x):
            z = 2 * self.features(x)
            return z, self.head(z)

    task = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))
    algo = get_algorithm("fedproto").from_options({}, task)
    algo.model = Scaled(8, 4, 6, 10)
    params = dict(algo.model.named_parameters())
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(algo.forward_features(params, x), algo.forward(params, x)[0])
    assert not torch.equal(algo.forward_features(params, x), algo.model.features(x))
    # a FeatureNet put in place of the model after construction is the one whose features are computed
    algo.model = EmbeddingAdapterNet(8, 4, 6, 10)
    params = {k: v + 0.3 for k, v in algo.model.named_parameters()}
    assert torch.equal(algo.forward_features(params, x), algo.forward(params, x)[0])
