"""The Gaussian decoder's low-rank covariance factor (``output_rank``): diag(σ²) + A Aᵀ.

Its reconstruction term must be the full Gaussian's (the Woodbury form against a dense covariance), the
synthetic data must carry the factor's correlated spread, and it needs the Gaussian decoder."""

from __future__ import annotations

import pytest
import torch

from protofl.algorithms import Task, get_algorithm
from protofl.algorithms.fedhypevae import gaussian_nll2, output_factor_key
from protofl.config import PrivacyConfig

D, C = 6, 3
OPTIONS = {"latent_dim": 4, "hidden_dim": 16, "code_dim": 0, "samplers": ["neutral"], "public_dims": D}
PRIVACY = PrivacyConfig(mechanism="dp-sgd", epsilon=1.0, delta=1e-4, accountant="rdp", planned_releases=2)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_the_reconstruction_term_is_the_dense_gaussians_negative_log_likelihood(rank):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(D, generator=g, dtype=torch.float64) * 0.5
    a = torch.randn(D, rank, generator=g, dtype=torch.float64)
    cov = torch.diag(logvar.exp()) + a @ a.T
    dense = -2 * torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov).log_prob(e)
    const = D * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    factor = a.expand(5, -1, -1) if rank else None
    got = gaussian_nll2(e, logvar.expand(5, -1), factor)
    # a bug in the Woodbury solve or the log-determinant (or dropping the factor) breaks the equality
    torch.testing.assert_close(got, dense - const)


def test_synthesis_draws_the_factors_correlated_spread():
    algo = get_algorithm("fedhypevae").from_options({**OPTIONS, "output_rank": 1}, Task((D,), C), PRIVACY)
    state = algo.init_server_state(0)
    phi = state["phi"]
    for k in phi:  # a decoder whose mean is 0 and whose variance is small: what is left is A u
        if k.startswith("dec3."):
            phi[k] = torch.zeros_like(phi[k])
    phi["dec3.logvar"] = torch.full((D,), -6.0)
    a = torch.tensor([[3.0], [-3.0], [0.0], [0.0], [1.0], [0.0]])
    phi[output_factor_key(algo.sizes)] = a / algo.config.output_factor_scale
    x, _ = algo.synthesise(state, "neutral", 0, per_class=2000)
    cov = torch.cov(x.T)
    # without the factor's draw the covariance would be about 0.0025 I, with no correlation
    torch.testing.assert_close(cov, a @ a.T + torch.eye(D) * float(torch.tensor(-6.0).exp()), atol=0.5, rtol=0.1)
    assert float(torch.corrcoef(x.T)[0, 1]) < -0.99


def test_the_factor_needs_the_gaussian_decoder():
    with pytest.raises(ValueError, match="output_rank"):
        get_algorithm("fedhypevae").from_options(
            {**OPTIONS, "output_rank": 2, "output_variance": False}, Task((D,), C), PRIVACY
        )
    with pytest.raises(ValueError, match="output_rank"):
        get_algorithm("fedhypevae").from_options({**OPTIONS, "output_rank": -1}, Task((D,), C), PRIVACY)


def test_a_log_variance_driven_far_out_neither_overflows_the_loss_nor_the_synthetic_data():
    from protofl.algorithms.fedhypevae import LOGVAR_BOUND, init_encoder, output_logvar_key

    algo = get_algorithm("fedhypevae").from_options(OPTIONS, Task((D,), C), PRIVACY)
    state = algo.init_server_state(0)
    psi = init_encoder(algo.config, D, C, torch.Generator().manual_seed(1))
    key = output_logvar_key(algo.sizes)
    x0, y0 = torch.randn(D), torch.nn.functional.one_hot(torch.tensor(1), C).float()
    for value in (-200.0, 200.0):  # exp(200) is inf in float32: unclamped, the loss or the draw overflows
        state["phi"][key] = torch.full((D,), value)
        assert torch.isfinite(algo.example_loss(state["phi"], psi, torch.zeros(0), x0, y0)).all()
        x, _ = algo.synthesise(state, "neutral", 0, per_class=50)
        assert torch.isfinite(x).all()
        assert float(x.std()) < 10 * float(torch.tensor(LOGVAR_BOUND / 2).exp())
