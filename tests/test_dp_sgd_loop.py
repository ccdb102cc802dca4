"""The one DP-SGD loop (:func:`protofl.privacy.dpsgd.dp_sgd_steps`): DP-FedAvg on either per-example
gradient path and private CReFF train through it, and a client's step equals an independent
one-example-at-a-time DP-SGD from the same generator state (same Poisson samples, same clipping, same
noise in the same order)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.algorithms.base import arrays_to_params
from protofl.config import PrivacyConfig
from protofl.privacy import dpsgd

PRIVACY = PrivacyConfig(
    mechanism="dp-sgd", clip_norm=0.5, epsilon=4.0, delta=1e-4, accountant="rdp", planned_releases=2
)


def digits(n=300, image=False):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:n] / 16, dtype=torch.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return ClientData(0, x, torch.tensor(y[:n]), x[:0], torch.zeros(0, dtype=torch.long))


def reference_dp_sgd(params, loss, x, y, rate, sigma, clip, steps, config, generator):
    """DP-SGD written out: each step a Poisson sample, each sampled example's gradient from its own
    autograd call, scaled to norm <= clip, summed, N(0, sigma² clip²) added per parameter in dict
    order, divided by the expected batch, then the method's SGD."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(
        list(params.values()), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    n = len(y)
    for _ in range(steps):
        index = torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for i in index.tolist():
            grads = torch.autograd.grad(loss(params, x[i : i + 1], y[i : i + 1]), list(params.values()))
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            scale = min(1.0, clip / max(float(norm), 1e-12))
            for (k, _), g in zip(params.items(), grads):
                total[k] += g * scale
        for k, v in params.items():
            noise = torch.randn(v.shape, generator=generator, dtype=v.dtype) * sigma * clip
            v.grad = (total[k] + noise) / (rate * n)
        optimizer.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize(
    "path, image", [("ghost", False), ("materialised", False), ("materialised", True)], ids=["ghost", "vmap", "cnn"]
)
def test_dpfedavg_step_equals_dp_sgd_written_out(path, image):
    data = digits(image=image)
    task = Task(tuple(data.x_train.shape[1:]), 10)
    options = {"steps_per_round": 4, "batch_size": 32, "lr": 0.5, "per_example_grads": path}
    algo = get_algorithm("dpfedavg").from_options(options, task, PRIVACY)
    assert algo.gradient_path == path
    received = algo.broadcast(algo.init_server_state(0))
    _, reply, metrics = algo.client_step({}, data, received, torch.Generator().manual_seed(3))

    rate = 32 / data.num_train
    expected = reference_dp_sgd(
        arrays_to_params(received, "cpu"),
        lambda p, x, y: F.cross_entropy(algo.forward(p, x)[1], y),
        data.x_train,
        data.y_train,
        rate,
        algo.sigma(rate),
        PRIVACY.clip_norm,
        4,
        algo.config,
        torch.Generator().manual_seed(3),
    )
    got = arrays_to_params(reply, "cpu")
    moved = 0.0
    for k, v in expected.items():
        np.testing.assert_allclose(got[k].numpy(), v.numpy(), rtol=1e-4, atol=1e-5)
        moved = max(moved, float((v - arrays_to_params(received, "cpu")[k]).abs().max()))
    assert moved > 1e-2  # the steps moved the model (the comparison is not of two untouched copies)
    assert 0 < metrics["clipped_fraction"] <= 1 and np.isfinite(metrics["train_loss"])


def test_dpfedavg_and_private_creff_draw_their_noise_through_the_one_loop(monkeypatch):
    """Every DP-SGD step of both methods adds its noise in :func:`dpsgd.dp_sgd_steps` (it calls
    :func:`dpsgd.add_noise` once per step): neither keeps a loop of its own."""
    import test_private_gradients as pg

    calls = []
    honest = dpsgd.add_noise

    def counted(*args, **kwargs):
        calls.append(1)
        return honest(*args, **kwargs)

    monkeypatch.setattr(dpsgd, "add_noise", counted)
    data = digits()
    for path in ("ghost", "materialised"):
        algo = get_algorithm("dpfedavg").from_options(
            {"steps_per_round": 3, "batch_size": 32, "per_example_grads": path}, Task((64,), 10), PRIVACY
        )
        calls.clear()
        algo.client_step({}, data, algo.broadcast(algo.init_server_state(0)), torch.Generator().manual_seed(0))
        assert len(calls) == 3, path
    creff = pg.private("creff")
    calls.clear()
    creff.client_step({}, pg.client(1), creff.broadcast(creff.init_server_state(0)), torch.Generator().manual_seed(0))
    assert len(calls) == creff.config.steps_per_round == 2


def test_an_empty_poisson_sample_still_gets_its_noise():
    """A step whose sample is empty adds noise to a zero sum (the mechanism does not skip it)."""
    params = {"w": torch.zeros(3, requires_grad=True)}
    optimizer = torch.optim.SGD([params["w"]], lr=1.0)

    def never(index):
        raise AssertionError("an empty sample has no gradients to clip")

    g = torch.Generator().manual_seed(1)
    metrics = dpsgd.dp_sgd_steps(params, never, 5, 1e-9, 2.0, 0.5, 1, optimizer, g)
    g2 = torch.Generator().manual_seed(1)
    torch.rand(5, generator=g2)  # the Poisson sample's draw
    expected = -torch.randn(3, generator=g2) * 2.0 * 0.5 / (1e-9 * 5)
    torch.testing.assert_close(params["w"].detach(), expected)
    assert np.isnan(metrics["train_loss"]) and metrics["clipped_fraction"] == 0.0
