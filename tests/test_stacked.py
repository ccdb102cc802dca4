"""The stacked step (``protofl.stacked``) against ``vmap(grad)``, and the rule that chooses between them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad_and_value, vmap

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.algorithms.fedproto import FedProto
from protofl.config import FederationConfig, ModelConfig
from protofl.engine import Simulation
from protofl.models import EmbeddingAdapterNet
from protofl.stacked import (
    STACKED_STEP,
    VMAP_STEP,
    StackedLinear,
    is_stackable,
    model_unstackable,
    stackable,
    stacked_forward,
    stacked_grad_and_value,
)
from protofl.training import ClientBatch, batched_features, stack_params

TASK = Task(input_shape=(8,), num_classes=4, model=ModelConfig(feature_dim=6, hidden_dim=10))


def stacked_clients(algo, k=5, rows=12, seed=0):
    """``k`` clients' differing parameters, a padded batch each (client c has ``rows - 2c`` real rows)
    and FedProto's context with prototypes for some classes."""
    g = torch.Generator().manual_seed(seed)
    params = stack_params(
        [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in algo.initial_params(c).items()} for c in range(k)]
    )
    x = torch.randn(k, rows, *TASK.input_shape, generator=g)
    y = torch.randint(0, TASK.num_classes, (k, rows), generator=g)
    weight = (torch.arange(rows)[None, :] < torch.tensor([rows - 2 * c for c in range(k)])[:, None]).float()
    table = torch.randn(TASK.num_classes, algo.model.feature_dim, generator=g)
    mask = torch.tensor([True, False, True, True])
    return params, x, y, weight, (table, mask)


@pytest.mark.parametrize("options", [{}, {"proto_weight": 0.0}, {"proto_weight": 3.0}])
def test_stacked_gradients_equal_vmap_of_grad_client_by_client(options):
    algo = get_algorithm("fedproto").from_options(options, TASK)
    params, x, y, weight, context = stacked_clients(algo)
    grads_v, losses_v = vmap(grad_and_value(algo.loss), in_dims=(0, 0, 0, 0, None))(params, x, y, weight, context)
    grads_s, losses_s = stacked_grad_and_value(algo.loss)(params, x, y, weight, context)
    assert grads_s.keys() == grads_v.keys() == params.keys()
    torch.testing.assert_close(losses_s, losses_v, atol=1e-6, rtol=1e-5)
    for name in params:
        assert grads_s[name].shape == params[name].shape
        torch.testing.assert_close(grads_s[name], grads_v[name], atol=1e-6, rtol=1e-5)
    # Each client's gradient is its own: the one-client autograd gradient of client 2 alone.
    one = {n: v[2].clone().requires_grad_(True) for n, v in params.items()}
    loss = algo.loss(one, x[2], y[2], weight[2], context)
    for name, g in zip(one, torch.autograd.grad(loss, list(one.values()))):
        torch.testing.assert_close(grads_s[name][2], g, atol=1e-6, rtol=1e-5)


def test_stacked_features_equal_vmapped_features():
    algo = get_algorithm("fedproto").from_options({}, TASK)
    params, *_ = stacked_clients(algo)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, *TASK.input_shape, generator=g) for n in (7, 3, 9, 1, 5)]
    batch = ClientBatch.of(xs, [torch.zeros(len(x), dtype=torch.int64) for x in xs])
    z_v, w_v, i_v = batched_features(algo.forward_features, params, batch)
    z_s, w_s, i_s = batched_features(algo.forward_features, params, batch, stacked=True)
    torch.testing.assert_close(z_s, z_v, atol=1e-6, rtol=1e-5)
    assert torch.equal(w_s, w_v) and torch.equal(i_s, i_v)


@pytest.mark.parametrize("bias", [True, False])
def test_stacked_linear_is_each_clients_linear(bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 4, generator=g)
    b = torch.randn(3, 5, generator=g) if bias else None
    x = torch.randn(3, 2, 6, 4, generator=g)  # more than one batch dimension
    with StackedLinear():
        out = F.linear(x, w, b)
        plain = F.linear(x[0], w[0], None if b is None else b[0])  # an unstacked weight runs as it is
    assert out.shape == (3, 2, 6, 5)
    for k in range(3):
        torch.testing.assert_close(out[k], F.linear(x[k], w[k], None if b is None else b[k]))
    torch.testing.assert_close(plain, F.linear(x[0], w[0], None if b is None else b[0]))


def test_the_rule_picks_the_stacked_step_for_marked_code_only():
    fedproto = get_algorithm("fedproto").from_options({}, TASK)
    assert fedproto.stacked_unsupported() is None and fedproto.batched_step() == STACKED_STEP
    # Methods whose loss (or a part of it) is not marked keep vmap(grad), and say which part.
    for name, part in (("fedprox", "loss"), ("fpl", "prototype_loss")):
        algo = get_algorithm(name).from_options({}, TASK)
        assert algo.batched_step() == VMAP_STEP
        assert part in algo.stacked_unsupported()

    class Unmarked(FedProto):  # an override without the mark loses it
        def prototype_loss(self, z, y, weight, context):
            return super().prototype_loss(z, y, weight, context)

    unmarked = Unmarked.from_options({}, TASK)
    assert unmarked.batched_step() == VMAP_STEP and "prototype_loss" in unmarked.stacked_unsupported()
    # Models: convolutions and a flattening linear model are not stackable.
    for model, shape in (("cnn", (1, 8, 8)), ("linear", (1, 8, 8))):
        task = Task(input_shape=shape, num_classes=3, model=ModelConfig(name=model, feature_dim=5))
        algo = get_algorithm("fedproto").from_options({}, task)
        assert algo.batched_step() == VMAP_STEP and "features is not marked" in algo.stacked_unsupported()


def test_a_stackable_model_with_a_foreign_layer_is_not_stackable():
    net = EmbeddingAdapterNet(8, 4, feature_dim=6, hidden_dim=10)
    assert model_unstackable(net) is None
    net.mlp[1] = nn.Tanh()
    assert "Tanh" in model_unstackable(net)
    assert is_stackable(EmbeddingAdapterNet.features) and not is_stackable(nn.Linear.forward)


def test_a_stackable_loss_that_reduces_over_clients_is_refused():
    algo = get_algorithm("fedavg").from_options({}, TASK)
    params, x, y, weight, _ = stacked_clients(algo)

    @stackable
    def whole_sum(p, xb, yb, wb):
        return algo.forward(p, xb)[1].logsumexp(-1).sum()  # reduces over the clients too

    with pytest.raises(RuntimeError, match="one value per client"):
        stacked_grad_and_value(whole_sum)(params, x, y, weight)


def test_stacked_forward_runs_the_models_own_code():
    algo = get_algorithm("fedavg").from_options({}, TASK)
    params, x, *_ = stacked_clients(algo)
    z, logits = stacked_forward(algo.forward, params, x)
    for k in range(len(x)):
        z_k, logits_k = algo.forward({n: v[k] for n, v in params.items()}, x[k])
        torch.testing.assert_close(z[k], z_k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits[k], logits_k, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,step", [("fedproto", STACKED_STEP), ("fpl", VMAP_STEP)])
def test_the_run_records_which_batched_step_ran(name, step):
    algo = get_algorithm(name).from_options({"batch_size": 8}, TASK)
    g = torch.Generator().manual_seed(0)
    clients = []
    for k, n in enumerate((10, 6)):
        y = torch.randint(0, TASK.num_classes, (n + 2,), generator=g)
        x = torch.randn(n + 2, 8, generator=g)
        clients.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    fed = FederationConfig(rounds=1, checkpoint_every=0, progress=False, execution="batched")
    sim = Simulation(algo, clients, torch.randn(4, 8), torch.zeros(4, dtype=torch.int64), fed, seed=1)
    sim.run()
    assert sim.execution == "batched"
    assert sim.transport.summary_fields()["batched_step"] == step
    assert np.isfinite(sim.history[-1]["train_loss"])


@pytest.mark.parametrize("name,stacked", [("fedproto", True), ("fpl", False)])
def test_a_batched_client_step_trains_and_takes_features_in_the_chosen_form(name, stacked, monkeypatch):
    import protofl.algorithms.base as base

    seen = {}
    for fn in ("train_batched", "batched_features"):
        original = getattr(base, fn)

        def spy(*args, _fn=fn, _original=original):
            seen[_fn] = args[-1]
            return _original(*args)

        monkeypatch.setattr(base, fn, spy)
    algo = get_algorithm(name).from_options({"batch_size": 8}, TASK)
    g = torch.Generator().manual_seed(0)
    datas = []
    for k, n in enumerate((10, 6, 3)):
        y = torch.randint(0, TASK.num_classes, (n + 2,), generator=g)
        x = torch.randn(n + 2, 8, generator=g)
        datas.append(ClientData(k, x[:n], y[:n], x[n:], y[n:]))
    states = [algo.init_client_state(0) for _ in datas]
    received = algo.broadcast(algo.init_server_state(0))
    algo.client_step_batched(states, datas, received, [torch.Generator().manual_seed(k) for k in range(3)])
    assert seen == {"train_batched": stacked, "batched_features": stacked}
