"""DP-SGD pieces: per-example gradients with ``torch.func``, per-example clipping, Gaussian noise,
Poisson sampling, and the accounting event of a step.

Per-example gradients come from ``vmap(grad(loss))`` over the examples of a batch, so they see through
parameters that are *generated* (e.g. decoder weights produced by a hypernetwork), which hook-based
per-sample gradients do not. A step on a Poisson sample (each example in with probability q) whose
per-example gradients are clipped to norm C and summed, plus N(0, σ²C²) noise, is the subsampled
Gaussian mechanism :class:`~protofl.privacy.accounting.SampledGaussianEvent` (q, σ) under
add-or-remove-one neighbours; the noisy sum is divided by the *expected* batch size qN, a public
number, so the division costs no privacy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vmap

from protofl.config import check, check_choice
from protofl.privacy.accounting import PrivacyLedger, SampledGaussianEvent

__all__ = ["DPSGDConfig", "add_noise", "clip_per_example", "noisy_clipped_mean", "per_example_gradients",
           "poisson_sample", "step_event"]


@dataclasses.dataclass(frozen=True)
class DPSGDConfig:
    """The DP-SGD settings a method's config shares (mix it into the method's ``Config``)."""

    #: Per-example clip norm C.
    clip_norm: float = 1.0
    #: Per-client budget over the whole run, and the accountant that calibrates and enforces it.
    epsilon: float = 1.0
    delta: float = 1e-4
    accountant: str = "rdp"
    #: Rounds the noise is calibrated for (0: federation.rounds, filled in by :meth:`resolved`).
    planned_rounds: int = 0

    def check_dp(self) -> None:
        """Validate the DP fields (call from the method config's ``__post_init__``)."""
        check(self.clip_norm > 0, "clip_norm", f"must be > 0, got {self.clip_norm}")
        check(0 < self.epsilon < math.inf, "epsilon", f"must be finite and > 0, got {self.epsilon}")
        check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}")
        check_choice(self.accountant, ("rdp", "pld"), "accountant")
        check(self.planned_rounds >= 0, "planned_rounds", f"must be >= 0, got {self.planned_rounds}")

    def resolved(self, run_config: Any):
        """This config with ``planned_rounds`` taken from the run when left at 0."""
        return self if self.planned_rounds else dataclasses.replace(self, planned_rounds=run_config.federation.rounds)

    def ledger(self, state: dict[str, Any]) -> PrivacyLedger:
        """The client's ledger from its state (empty for a client that has not released yet)."""
        ledger = PrivacyLedger(self.accountant, self.delta, self.epsilon)
        ledger.load_state_dict(state.get("privacy_ledger", ()))
        return ledger

Params = dict[str, torch.Tensor]


def per_example_gradients(
    loss_fn: Callable[..., torch.Tensor], params: Params, *batch: torch.Tensor, randomness: str = "different"
) -> Params:
    """Gradients of ``loss_fn(params, *example)`` for every example of ``batch`` (each tensor's first
    dimension indexes examples; ``loss_fn`` sees one example, without that dimension). Returns a dict of
    ``(B, *param.shape)`` tensors. ``randomness`` is passed to ``vmap`` (``"different"``: each example
    draws its own random numbers, e.g. a VAE's reparameterisation noise)."""
    def single(p: Params, *example: torch.Tensor) -> torch.Tensor:
        return loss_fn(p, *example)

    return vmap(grad(single), in_dims=(None, *([0] * len(batch))), randomness=randomness)(params, *batch)


def clip_per_example(grads: Params, clip_norm: float) -> tuple[Params, torch.Tensor]:
    """Scale each example's whole gradient (all parameters together) to L2 norm at most ``clip_norm``;
    returns the clipped gradients and the per-example norms before clipping."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    scale = torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)
    return {k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}, norms


def noisy_clipped_mean(
    grads: Params, clip_norm: float, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator
) -> tuple[Params, torch.Tensor]:
    """DP-SGD's gradient: (Σ_i clip_C(g_i) + N(0, σ²C² I)) / (expected batch size). Returns it and the
    per-example norms before clipping. An empty batch (a Poisson sample can be empty) still gets noise."""
    clipped, norms = clip_per_example(grads, clip_norm)
    return add_noise({k: g.sum(0) for k, g in clipped.items()}, clip_norm, noise_multiplier, expected_batch_size,
                     generator), norms


def add_noise(summed: Params, clip_norm: float, noise_multiplier: float, expected_batch_size: float,
              generator: torch.Generator) -> Params:
    """(Σ_i clip_C(g_i) + N(0, σ²C² I)) / (expected batch size) from the clipped sum, the noise drawn per
    parameter in dict order (what :func:`noisy_clipped_mean` and ghost clipping share)."""
    std = noise_multiplier * clip_norm
    return {k: (g + torch.randn(g.shape, generator=generator, dtype=g.dtype) * std) / expected_batch_size
            for k, g in summed.items()}


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample of ``range(n)``: each index independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()


def step_event(rate: float, noise_multiplier: float) -> SampledGaussianEvent:
    """The accounting event of one DP-SGD step."""
    return SampledGaussianEvent(rate, noise_multiplier)
