"""The stacked step: a batched round's local step as plain autograd on stacked parameters, without ``vmap``.

The batched loop (:func:`protofl.training.train_batched`) trains ``K`` clients of one architecture at
once on parameters stacked along a leading client axis. Its general step is ``vmap(grad(loss))``: it
serves any model and loss written for one client. Where the model and the loss are written so that the
same code also computes every client's result when handed the stacked tensors -- reductions over
trailing dimensions only, linear layers through ``F.linear`` -- the step can skip ``vmap`` altogether:

- the forward runs the model's own code on stacked parameters ``(K, out, in)`` and inputs ``(K, B, in)``,
  with ``F.linear`` on a stacked weight computed as one ``torch.baddbmm`` (the bias inside the product,
  :class:`StackedLinear`);
- the loss returns one value per client, ``(K,)``;
- ONE ordinary backward of their sum gives every client its own gradient: a client's loss depends on its
  own slice of the parameters only, so the derivative of the sum with respect to that slice is the
  derivative of the client's loss.

Which code qualifies is declared, not guessed: a function (a model's ``forward``/``features``, an
algorithm's ``loss`` and the methods it calls) is marked with :func:`stackable`, and
:func:`model_unstackable` / :meth:`protofl.algorithms.ModelAlgorithm.stacked_unsupported` say why a given
model or method does not qualify; such rounds run the ``vmap`` step, and the run's summary records which
step ran (``batched_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Params = dict[str, torch.Tensor]
Fn = TypeVar("Fn", bound=Callable[..., Any])

_MARK = "__protofl_stackable__"

#: The modules a stackable model may be built from: its linear layers run through :class:`StackedLinear`,
#: the activations and containers are elementwise or structural.
STACKABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.ReLU, nn.Sequential)

#: The names of the two steps, as the run's summary records them.
STACKED_STEP = "stacked autograd"
VMAP_STEP = "vmap of grad"


def stackable(fn: Fn) -> Fn:
    """Mark ``fn`` as code written for one client that also computes every client's result when given
    stacked tensors (a leading client axis on the parameters and on the batch): it reduces over trailing
    dimensions only and reaches parameters through ``F.linear`` (or elementwise). A method overridden in
    a subclass loses the mark unless the override carries it too."""
    setattr(fn, _MARK, True)
    return fn


def is_stackable(fn: Any) -> bool:
    """Whether ``fn`` (a function or a bound method) carries the :func:`stackable` mark."""
    return bool(getattr(getattr(fn, "__func__", fn), _MARK, False))


def model_unstackable(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on stacked parameters (``None`` when it can): its ``forward`` and
    ``features`` must be marked :func:`stackable` and it must be built from :data:`STACKABLE_MODULES`."""
    kind = type(model)
    for name in ("forward", "features"):
        if not is_stackable(getattr(kind, name, None)):
            return f"model {kind.__name__}: its {name} is not marked stackable"
    for sub in model.modules():
        if sub is not model and not isinstance(sub, STACKABLE_MODULES):
            return f"model {kind.__name__} holds a {type(sub).__name__} layer (stackable: Linear, ReLU, Sequential)"
    return None


class StackedLinear(TorchFunctionMode):
    """Within it, ``F.linear(x, weight, bias)`` with a stacked ``weight`` ``(K, out, in)`` computes every
    client's layer, ``x[k] @ weight[k].T + bias[k]`` for ``x`` of shape ``(K, ..., in)``, as one
    ``torch.baddbmm``; any other call, including ``F.linear`` on an unstacked weight, runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if weight.dim() == 3:
                k, n_out = weight.shape[0], weight.shape[1]
                flat = x.reshape(k, -1, x.shape[-1])
                if bias is None:
                    out = torch.bmm(flat, weight.transpose(1, 2))
                else:
                    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
                return out.view(*x.shape[:-1], n_out)
        return func(*args, **kwargs)


def stacked_forward(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under :class:`StackedLinear`: a stackable model's (or loss's) code on stacked tensors."""
    with StackedLinear():
        return fn(*args)


def stacked_grad_and_value(
    loss_fn: Callable[..., torch.Tensor],
) -> Callable[..., tuple[Params, torch.Tensor]]:
    """The stacked counterpart of ``vmap(grad_and_value(loss_fn))``: called with stacked ``params``
    (``(K, ...)`` tensors), batches ``x (K, B, ...)``, ``y (K, B)``, ``weight (K, B)`` and shared
    arguments, it returns every client's gradient (a dict of ``(K, ...)`` tensors) and its loss
    ``(K,)``, from one backward of the summed losses. ``loss_fn`` must be :func:`stackable`."""

    def step(params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any):
        names = list(params)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        with StackedLinear():
            losses = loss_fn(dict(zip(names, leaves)), x, y, weight, *shared)
        if losses.shape != (len(y),):
            raise RuntimeError(
                f"a loss marked stackable returned shape {tuple(losses.shape)} for {len(y)} stacked clients; "
                "it must reduce over trailing dimensions only and return one value per client"
            )
        grads = torch.autograd.grad(losses.sum(), leaves)
        return dict(zip(names, grads)), losses.detach()

    return step
