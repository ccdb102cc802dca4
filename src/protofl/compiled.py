"""The batched round's local step and feature pass compiled with ``torch.compile`` (``federation.compile``).

Off by default. When on, a method's batched round (:func:`protofl.training.train_batched` and
:func:`protofl.training.batched_features`) runs two compiled programs in place of their eager forms:

- **the local step**: every client's gradients and losses of one step. The stacked step
  (:mod:`protofl.stacked`) is compiled in its functional form, ``grad_and_value`` of the summed losses
  (``torch.autograd.grad`` itself cannot be traced); the ``vmap`` step as it is, ``vmap(grad_and_value)``.
  Either gives every client the gradient of its own loss, as the eager step does, up to the order of float
  additions (differences of about 1e-8 at the speed benchmark's shapes);
- **the feature pass** for the prototypes, without gradients.

Both are compiled once per method object with dynamic shapes (``dynamic=True``): the number of clients
and a step's width are symbols, so a chunk of another size or a short last step runs the same program.
torch still specialises a size of 1 (a step of width 1, or one client), so a run compiles at most four
forms of the step. The first call of each form compiles it (seconds, more with an empty inductor cache);
afterwards a call is a lookup. The optimiser update stays eager.

A compile failure raises :class:`protofl.errors.CompileError` (one line, naming the setting); there is no
fallback to the eager step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from protofl.errors import CompileError
from protofl.stacked import stacked_forward

Params = dict[str, torch.Tensor]

#: What the run's summary adds to ``batched_step`` when the step is compiled.
COMPILED = "compiled"


def _compile_failed(what: str, exc: BaseException) -> CompileError:
    lines = str(exc).strip().splitlines()
    first = next((line.strip() for line in lines if line.strip()), type(exc).__name__)
    return CompileError(f"federation.compile: torch.compile of the batched round's {what} failed: {first}")


class CompiledRound:
    """The compiled local step and feature pass of one method's batched rounds (built once, reused every
    round, so each shape class compiles once per run).

    ``loss_fn(params, x, y, weight, *shared)`` and ``features_fn(params, x)`` are the method's own
    functions for one client; ``stacked``: they are :func:`protofl.stacked.stackable` and run on the
    stacked tensors (the stacked step), otherwise under ``vmap``; ``n_shared``: how many arguments after
    ``weight`` are common to every client."""

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        features_fn: Callable[[Params, torch.Tensor], torch.Tensor],
        stacked: bool,
        n_shared: int,
    ):
        self.loss_fn = loss_fn
        self.features_fn = features_fn
        self.stacked = stacked
        self.n_shared = n_shared
        self._step: Callable[..., Any] | None = None
        self._features: Callable[..., Any] | None = None

    # -- the eager forms that get compiled ---------------------------------------------------------------
    def _step_form(self) -> Callable[..., tuple[Params, torch.Tensor]]:
        if not self.stacked:
            return vmap(grad_and_value(self.loss_fn), in_dims=(0, 0, 0, 0, *([None] * self.n_shared)))
        loss_fn = self.loss_fn

        def total(params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any):
            losses = stacked_forward(loss_fn, params, x, y, weight, *shared)
            return losses.sum(), losses

        summed = grad_and_value(total, has_aux=True)

        def step(params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any):
            grads, (_, losses) = summed(params, x, y, weight, *shared)
            return grads, losses

        return step

    def _features_form(self) -> Callable[[Params, torch.Tensor], torch.Tensor]:
        features_fn = self.features_fn
        if not self.stacked:
            return vmap(features_fn)

        def features(params: Params, x: torch.Tensor) -> torch.Tensor:
            return stacked_forward(features_fn, params, x)

        return features

    # -- the compiled calls ------------------------------------------------------------------------------
    def step(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any
    ) -> tuple[Params, torch.Tensor]:
        """Every client's gradients (a dict of ``(K, ...)`` tensors) and losses ``(K,)`` of one step, as
        ``train_batched``'s step returns them."""
        if self._step is None:
            self._step = torch.compile(self._step_form(), dynamic=True, fullgraph=True)
        try:
            grads, losses = self._step(params, x, y, weight, *shared)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise _compile_failed("local step", exc) from exc
        if self.stacked and losses.shape != (len(y),):
            raise RuntimeError(
                f"a loss marked stackable returned shape {tuple(losses.shape)} for {len(y)} stacked clients; "
                "it must reduce over trailing dimensions only and return one value per client"
            )
        return grads, losses

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Every client's features of its rows ``x (K, n, ...)`` under its own parameters."""
        if self._features is None:
            self._features = torch.compile(self._features_form(), dynamic=True, fullgraph=True)
        try:
            return self._features(params, x)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise _compile_failed("feature pass", exc) from exc
