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

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch.func import grad, grad_and_value, vmap

from protofl.privacy.accounting import SampledGaussianEvent

__all__ = [
    "ClippedSum",
    "add_noise",
    "clip_per_example",
    "dp_sgd_steps",
    "inserted_gradients",
    "materialised_clipped_sum",
    "noisy_clipped_mean",
    "per_example_gradients",
    "poisson_sample",
    "step_event",
]


Params = dict[str, torch.Tensor]

#: What :func:`inserted_gradients` adds to every clipped sum before its noise (``None``: nothing). The one
#: place where the privacy audit (:mod:`protofl.privacy.audit`) puts its gradient canaries into the real
#: DP-SGD steps; a run never sets it.
_INSERTION: contextvars.ContextVar[Callable[[Params, float], Params] | None] = contextvars.ContextVar(
    "protofl_dpsgd_insertion", default=None
)


@contextlib.contextmanager
def inserted_gradients(insert: Callable[[Params, float], Params]) -> Iterator[None]:
    """While inside, every DP-SGD step's clipped sum passes through ``insert(summed, expected_batch_size)``
    before its noise is added (the audit's canary gradients: extra clipped per-example gradients)."""
    token = _INSERTION.set(insert)
    try:
        yield
    finally:
        _INSERTION.reset(token)


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
    return add_noise(
        {k: g.sum(0) for k, g in clipped.items()}, clip_norm, noise_multiplier, expected_batch_size, generator
    ), norms


def add_noise(
    summed: Params, clip_norm: float, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator
) -> Params:
    """(Σ_i clip_C(g_i) + N(0, σ²C² I)) / (expected batch size) from the clipped sum, the noise drawn per
    parameter in dict order (what :func:`noisy_clipped_mean` and ghost clipping share)."""
    insert = _INSERTION.get()
    if insert is not None:
        summed = insert(summed, expected_batch_size)
    std = noise_multiplier * clip_norm
    return {
        k: (g + torch.randn(g.shape, generator=generator, dtype=g.dtype, device=generator.device).to(g.device) * std)
        / expected_batch_size
        for k, g in summed.items()
    }


#: What one DP-SGD step needs from a model: for the indices of a (non-empty) Poisson sample, the sum of the
#: examples' gradients each clipped to the clip norm (by parameter name), their norms before clipping and
#: the sample's mean loss (a diagnostic). :func:`materialised_clipped_sum` is the general one; ghost
#: clipping (:func:`~protofl.privacy.ghost.module_clipped_sum`) serves models of linear layers.
ClippedSum = Callable[[torch.Tensor], tuple[Params, torch.Tensor, float]]


def materialised_clipped_sum(
    example_loss: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    clip_norm: float,
) -> tuple[Params, torch.Tensor, float]:
    """Σ_i clip_C(∇ example_loss(params, x_i, y_i)) from per-example gradients (``torch.func``; the losses
    come from the same pass), the per-example norms before clipping and the mean loss."""
    grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    clipped, norms = clip_per_example(grads, clip_norm)
    return {k: g.sum(0) for k, g in clipped.items()}, norms, float(losses.detach().mean())


def dp_sgd_steps(
    params: Params,
    clipped_sum: ClippedSum,
    num_examples: int,
    rate: float,
    noise_multiplier: float,
    clip_norm: float,
    steps: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, float]:
    """``steps`` DP-SGD steps on ``params`` (in place, through ``optimizer``, which holds them): each a
    Poisson sample of ``range(num_examples)`` at ``rate``, the clipped gradient sum ``clipped_sum(index)``
    (zero for an empty sample), N(0, σ²C²) added and the whole divided by the expected batch
    ``rate · num_examples`` (:func:`add_noise`); each step costs one :func:`step_event`, which the caller
    has spent. The one DP-SGD loop of the methods that train a model with it. Returns the mean sample
    loss and the clipped fraction (diagnostics of private data, not covered by ε)."""
    losses, norms = [], []
    for _ in range(steps):
        index = poisson_sample(num_examples, rate, generator)
        if len(index):
            summed, step_norms, loss = clipped_sum(index)
            losses.append(loss)
        else:
            summed, step_norms = {k: torch.zeros_like(v) for k, v in params.items()}, torch.zeros(0, device="cpu")
        noisy = add_noise(summed, clip_norm, noise_multiplier, rate * num_examples, generator)
        norms.append(step_norms.detach().cpu())
        for k, v in params.items():
            v.grad = noisy[k].to(v.dtype)
        optimizer.step()
    all_norms = torch.cat(norms) if norms else torch.zeros(0, device="cpu")
    return {
        "train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "clipped_fraction": float((all_norms > clip_norm).float().mean()) if len(all_norms) else 0.0,
    }


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample of ``range(n)``: each index independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < rate).flatten()


def step_event(rate: float, noise_multiplier: float) -> SampledGaussianEvent:
    """The accounting event of one DP-SGD step."""
    return SampledGaussianEvent(rate, noise_multiplier)
