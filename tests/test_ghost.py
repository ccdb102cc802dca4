"""Ghost clipping against ground truth: per-example norms and the clipped gradient sum equal the
materialised per-example computation (``torch.func``) and one-example-at-a-time autograd, for linear
layers (one use, several uses, a shared input), an nn.Module MLP, and FedHypeVAE's joint DP-SGD loss
with and without its code, MMD and Lipschitz terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from protofl.algorithms import Task, get_algorithm
from protofl.algorithms.fedhypevae import batch_noise, ghost_clipped_sum, init_encoder, init_phi
from protofl.config import ConfigError, PrivacyConfig
from protofl.privacy.dpsgd import (
    add_noise,
    clip_per_example,
    noisy_clipped_mean,
    per_example_gradients,
)
from protofl.privacy.ghost import linear_sq_norms, module_clipped_sum


def _formed(a, g):
    """Per-example gradients of W and b formed explicitly: Σ_t g_t a_tᵀ, Σ_t g_t."""
    return torch.einsum("bto,bti->boi", g, a), g.sum(1)


@pytest.mark.parametrize("t, d_in, d_out", [(1, 7, 5), (3, 7, 5), (6, 2, 3)])  # one use, Gram, formed (T² > in·out)
def test_linear_sq_norms_equal_the_norms_of_formed_per_example_gradients(t, d_in, d_out):
    g = torch.Generator().manual_seed(t)
    a, out = (
        torch.randn(9, t, d_in, generator=g, dtype=torch.float64),
        torch.randn(9, t, d_out, generator=g, dtype=torch.float64),
    )
    w, b = _formed(a, out)
    w_sq, b_sq = linear_sq_norms(a, out)
    torch.testing.assert_close(w_sq, w.square().sum((1, 2)))
    torch.testing.assert_close(b_sq, b.square().sum(1))
    # a shared input (the same activation for every example), given once and broadcast
    shared = a[:1]
    torch.testing.assert_close(
        linear_sq_norms(shared, out)[0], _formed(shared.expand(9, -1, -1), out)[0].square().sum((1, 2))
    )
    if t > 1:  # the cross terms matter: the sum of the uses' norms is not the norm of the sum
        separate = sum(linear_sq_norms(a[:, s], out[:, s])[0] for s in range(t))
        assert not torch.allclose(separate, w_sq)


class TwoUseMLP(torch.nn.Module):
    """Linear layers on (B, T, in) inputs, one of them called twice per example."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(6, 8)
        self.second = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):  # x: (B, 4, 6)
        h = torch.tanh(self.first(x))
        h = torch.relu(self.second(h)) + self.second(h.flip(1))  # `second` used twice
        return self.head(h.mean(1))


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


@pytest.mark.parametrize("make, shape", [(_mlp, (10,)), (TwoUseMLP, (4, 6))])
def test_module_ghost_clipping_equals_materialised_and_one_at_a_time(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(12, *shape, dtype=torch.float64) * 3, torch.randint(0, 4 if make is _mlp else 3, (12,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    materialised = per_example_gradients(one, params, x, y)
    _, norms = clip_per_example(materialised, 1.0)
    clip = float(norms.median())  # some examples clipped, some not
    clipped, _ = clip_per_example(materialised, clip)
    summed, ghost_norms, losses = module_clipped_sum(
        model, lambda: F.cross_entropy(model(x), y, reduction="none"), clip
    )
    torch.testing.assert_close(ghost_norms, norms)
    assert bool((norms > clip).any() and (norms < clip).any())
    for k in params:
        torch.testing.assert_close(summed[k], clipped[k].sum(0))
    # one example at a time with ordinary autograd
    for k, value in params.items():
        total = torch.zeros_like(value)
        for i in range(12):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            flat = torch.cat([p.grad.flatten() for p in model.parameters()])
            total += dict(model.named_parameters())[k].grad * min(1.0, clip / float(flat.norm()))
        torch.testing.assert_close(summed[k], total)
    assert losses.shape == (12,)


def test_module_ghost_clipping_refuses_parameters_outside_linear_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="1.weight"):
        module_clipped_sum(model, lambda: model(torch.randn(3, 4)).sum(1), 1.0)


def test_module_ghost_clipping_refuses_functional_use_and_shared_weights():
    """A weight used through F.linear never passes its layer's hook, and a weight shared by two layers
    needs the norm of the summed gradient: both would escape the clipping, so both are refused."""
    import torch.nn.functional as F

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.linear(x, self.a.weight, self.a.bias))

    model = Functional()
    with pytest.raises(ValueError, match="a.weight"):
        module_clipped_sum(model, lambda: model(torch.randn(3, 4)).sum(1), 1.0)
    shared = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    shared[2].weight = shared[0].weight
    with pytest.raises(ValueError, match="shared"):
        module_clipped_sum(shared, lambda: shared(torch.randn(3, 4)).sum(1), 1.0)


OPTIONS = {
    "public_basis": "none",
    "output_variance": False,  # the Gaussian decoder needs a public basis
    "range_reference": "unit",
    "latent_dim": 4,
    "hidden_dim": 16,
    "code_dim": 3,
    "hyper_hidden": 8,
    "steps_per_round": 2,
    "batch_size": 8,
    "meta_rounds": 1,
    "meta_steps": 2,
    "synthetic_per_class": 7,
    "classifier_epochs": 2,
    "classifier_hidden": 8,
}
PRIVACY = PrivacyConfig(mechanism="dp-sgd", epsilon=1.0, delta=1e-4, accountant="rdp", planned_releases=3)
VARIANTS = {
    "full": {},
    "full-rank-head": {"hyper_rank": 0},
    "no-mmd": {"mmd_weight": 0.0},
    "no-lipschitz": {"lip_weight": 0.0},
    "dp-cvae": {"code_dim": 0, "samplers": ["neutral"]},
    # a linear output (a public basis's coordinates) with the Gaussian decoder's learned log σ²
    "output-variance": {"public_basis": "photos", "public_dims": 12, "output_variance": True},
    # and a learned low-rank factor A of its covariance, diag(σ²) + A Aᵀ
    "output-factor": {"public_basis": "photos", "public_dims": 12, "output_variance": True, "output_rank": 2},
}


@pytest.fixture
def float64():
    """FedHypeVAE's Lipschitz term divides by ‖ξ‖² (ξ ~ 0.01): float64 keeps the comparison tight."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _setup(variant, n=10):
    algo = get_algorithm("fedhypevae").from_options({**OPTIONS, **VARIANTS[variant]}, Task((12,), 3), PRIVACY)
    c = algo.config
    g = torch.Generator().manual_seed(1)
    phi, psi = init_phi(c, 12, 3, g), init_encoder(c, 12, 3, g)
    if "hyper1.w" in phi:  # away from the zero start, so every hypernetwork path carries gradient
        phi["hyper1.w"] = torch.randn(phi["hyper1.w"].shape, generator=g) * 0.5
        phi["hyper1.b"] = torch.randn(phi["hyper1.b"].shape, generator=g) * 0.2
    if "hyper2.w" in phi:  # the low-rank head's second factor starts at zero too
        phi["hyper2.w"] = torch.randn(phi["hyper2.w"].shape, generator=g) * 0.5
        phi["hyper2.b"] = torch.randn(phi["hyper2.b"].shape, generator=g) * 0.2
    if "dec3.logvar" in phi:  # away from σ² = 1, so the variance scales the residuals
        phi["dec3.logvar"] = torch.randn(phi["dec3.logvar"].shape, generator=g) * 0.5
    params = {
        **{"phi/" + k: v.double() for k, v in phi.items()},
        **{"psi/" + k: v.double() for k, v in psi.items()},
        "code": torch.randn(c.code_dim, generator=g).double(),
    }
    x = torch.rand(n, 12, generator=g).double()
    y1h = F.one_hot(torch.arange(n) % 3, 3).double()
    return algo, params, x, y1h


def _example_loss(algo):
    def loss(p, xi, yi, *noise):
        return algo.example_loss(
            {k[4:]: v for k, v in p.items() if k.startswith("phi/")},
            {k[4:]: v for k, v in p.items() if k.startswith("psi/")},
            p["code"],
            xi,
            yi,
            noise=noise or None,
        )

    return loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fedhypevae_ghost_norms_and_clipped_sum_equal_materialised(variant, float64):
    algo, params, x, y1h = _setup(variant)
    torch.manual_seed(0)
    noise = batch_noise(algo.config, len(x))
    materialised = per_example_gradients(_example_loss(algo), params, x, y1h, *noise)
    _, norms = clip_per_example(materialised, 1.0)
    clip = float(norms.median())
    clipped, _ = clip_per_example(materialised, clip)
    summed, ghost_norms, _ = ghost_clipped_sum(algo, params, x, y1h, noise, clip)
    torch.testing.assert_close(ghost_norms, norms, rtol=1e-9, atol=1e-12)
    assert bool((norms > clip).any() and (norms < clip).any())
    for k in params:
        torch.testing.assert_close(summed[k], clipped[k].sum(0), rtol=1e-9, atol=1e-12, msg=k)
    # the noisy step is the materialised one's draw for draw
    ours = add_noise(summed, clip, 0.7, 5.0, torch.Generator().manual_seed(3))
    theirs, _ = noisy_clipped_mean(materialised, clip, 0.7, 5.0, torch.Generator().manual_seed(3))
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-9, atol=1e-12)


def test_fedhypevae_ghost_equals_one_example_at_a_time_with_the_losses_own_random_numbers(float64):
    """example_loss drawing its own noise (seeded per example) and autograd one example at a time: the
    same losses and clipped sum as the batched ghost path fed those draws."""
    algo, params, x, y1h = _setup("full", n=6)
    c = algo.config
    loss = _example_loss(algo)
    draws, losses, grads = [], [], []
    for i in range(len(x)):
        torch.manual_seed(100 + i)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        li = loss(leaves, x[i], y1h[i])
        losses.append(li.detach())
        grads.append(torch.autograd.grad(li, list(leaves.values())))
        torch.manual_seed(100 + i)  # the same draws, in example_loss's order
        draws.append((torch.randn(c.latent_dim), torch.randn(2, c.latent_dim), torch.randn(c.code_dim) * c.lip_radius))
    noise = tuple(torch.stack(d) for d in zip(*draws))
    norms = torch.stack([torch.cat([g.flatten() for g in gi]).norm() for gi in grads])
    clip = float(norms.median())
    summed, ghost_norms, ghost_losses = ghost_clipped_sum(algo, params, x, y1h, noise, clip)
    torch.testing.assert_close(ghost_losses, torch.stack(losses), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ghost_norms, norms, rtol=1e-9, atol=1e-12)
    for j, k in enumerate(params):
        expected = sum(gi[j] * min(1.0, clip / float(n)) for gi, n in zip(grads, norms))
        torch.testing.assert_close(summed[k], expected, rtol=1e-9, atol=1e-12, msg=k)


def test_fedhypevae_trains_with_either_per_example_gradient_path_and_rejects_others():
    from protofl.algorithms import ClientData

    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 3
    x = (torch.rand(40, 12, generator=g) * 0.3 + 0.2 * y[:, None]).clamp(0, 1)
    for mode in ("ghost", "materialised"):
        algo = get_algorithm("fedhypevae").from_options({**OPTIONS, "per_example_grads": mode}, Task((12,), 3), PRIVACY)
        server = algo.init_server_state(0)
        _, payload, metrics = algo.client_step(
            {}, ClientData(0, x, y, x[:9], y[:9]), algo.broadcast(server), torch.Generator().manual_seed(0)
        )
        assert all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in payload.arrays.values())
        assert metrics["train_loss"] == metrics["train_loss"]
        assert not torch.equal(torch.as_tensor(payload["phi/dec0.w"]), server["phi"]["dec0.w"])
    with pytest.raises(ConfigError, match="per_example_grads"):
        get_algorithm("fedhypevae").from_options({**OPTIONS, "per_example_grads": "hooks"}, Task((12,), 3), PRIVACY)
