"""DP-SGD pieces against ground truth: per-example gradients one example at a time (through generated
weights), the clipping bound, the noise scale and the Poisson sampling rate."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.func import functional_call

from protofl.privacy.dpsgd import (
    clip_per_example,
    noisy_clipped_mean,
    per_example_gradients,
    poisson_sample,
)


class HyperLinear(torch.nn.Module):
    """A linear layer whose weight rows are scaled by a hypernetwork of a code: W' = diag(1 + s(c)) W."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(6, 3)
        self.hyper = torch.nn.Linear(4, 3)

    def forward(self, x, code):
        scale = 1 + self.hyper(code)
        return torch.nn.functional.linear(x, self.base.weight * scale[:, None], self.base.bias)


def test_per_example_gradients_equal_one_at_a_time_through_generated_weights():
    torch.manual_seed(0)
    model = HyperLinear()
    params = {k: v.detach() for k, v in model.named_parameters()}
    code = torch.randn(4)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None], code))
        return torch.nn.functional.cross_entropy(out, yi[None])

    batched = per_example_gradients(loss, params, x, y)
    for i in range(9):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss(leaves, x[i], y[i]).backward()
        for k in params:
            torch.testing.assert_close(batched[k][i], leaves[k].grad, rtol=1e-5, atol=1e-6)


def test_every_clipped_per_example_gradient_has_norm_at_most_c():
    grads = {"a": torch.randn(50, 3, 4) * torch.logspace(-2, 2, 50)[:, None, None], "b": torch.randn(50, 7)}
    clipped, norms = clip_per_example(grads, 1.5)
    after = torch.cat([g.reshape(50, -1) for g in clipped.values()], 1).norm(dim=1)
    assert bool((after <= 1.5 * (1 + 1e-6)).all())
    small = norms <= 1.5
    assert torch.allclose(after[small], norms[small])


#: Noise draws per check: the variance's χ² interval at level NOISE_ALPHA is then about ±1.6 % wide, so
#: noise 3 % too small (variance 5.9 % too small, about 19 standard errors) cannot pass.
NOISE_SAMPLES = 200_000
NOISE_ALPHA = 1e-6


def noise_matches(noise_multiplier: float, claimed: float, seed: int) -> bool:
    """Whether DP-SGD's noise, drawn at ``noise_multiplier`` around a zero gradient sum, is consistent with
    N(0, (claimed · C)²): its mean within the normal interval and Σx²/(σC)² within the two-sided χ²(n)
    interval, both at level NOISE_ALPHA."""
    zero = {"w": torch.zeros(4, NOISE_SAMPLES)}
    g = torch.Generator().manual_seed(seed)
    noisy, _ = noisy_clipped_mean(
        zero, clip_norm=2.0, noise_multiplier=noise_multiplier, expected_batch_size=8.0, generator=g
    )
    x = (noisy["w"] * 8.0).double().numpy()
    std = claimed * 2.0
    z = stats.norm.isf(NOISE_ALPHA / 2)
    mean_ok = abs(float(x.mean())) < z * std / math.sqrt(NOISE_SAMPLES)
    chi2 = float((x**2).sum()) / std**2
    low, high = stats.chi2.ppf([NOISE_ALPHA / 2, 1 - NOISE_ALPHA / 2], NOISE_SAMPLES)
    return mean_ok and low < chi2 < high


@pytest.mark.parametrize("seed", range(5))
def test_noise_std_matches_sigma_times_c(seed):
    assert noise_matches(1.3, 1.3, seed)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_noise_check_rejects_noise_three_percent_off(seed, factor):
    # The same check on a mutant that draws 3 % less (or more) noise than it claims must fail.
    assert not noise_matches(1.3 * factor, 1.3, seed)


def test_poisson_sample_rate():
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_sample(1000, 0.05, g)) for _ in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # the batch size varies, as Poisson sampling must
