"""The batched round's stacked step and feature pass compiled with ``torch.compile`` (``federation.compile``).

Off by default. When on, a batched round that runs the stacked step (:mod:`protofl.stacked`; the run's
summary says ``batched_step = "stacked autograd, compiled"``) runs two compiled programs in place of their
eager forms in :func:`protofl.training.train_batched` and :func:`protofl.training.batched_features`:

- **the local step**: every client's gradients and losses of one step, compiled in its functional form,
  ``grad_and_value`` of the summed losses (``torch.autograd.grad`` itself cannot be traced). It gives every
  client the gradient of its own loss, as the eager step does, up to the order of float additions
  (differences of about 3e-8 at the speed benchmark's shapes);
- **the feature pass** for the prototypes, without gradients.

Both are compiled once per method object, with the client axis and a step's width marked dynamic
(``torch._dynamo.maybe_mark_dynamic``): the number of clients and a step's width are symbols, so a chunk of
another size or a short last step runs the same program. torch still specialises a size of 1 (a step of
width 1, or one client), and shared arguments of another structure make another form: a FedProto run of
the speed benchmark compiles two programs (the step and the feature pass; its shared argument, the dense
prototype table and its mask, has one structure in every round). The first call of each form compiles it
(seconds; more with an empty inductor cache); afterwards a call is a lookup. Each :class:`CompiledRound`
compiles code objects of its own, so its programs go when it goes and never count against another run's
recompile limit. The optimiser update stays eager (compiled, it saved about 0.01 ms of its 0.14 ms a step).

The ``vmap`` step (methods whose loss or model is not stackable) is not compiled: under ``vmap`` the
number of clients is a constant of the compiled program, so every chunk size and every short step would
compile again. Asking for it raises :class:`protofl.errors.CompileError` when the engine is built, before
the run writes anything; a compile failure raises it too (one line, naming the setting and the cause);
there is no fallback to the eager step. Flower nodes train per client: the setting compiles nothing there.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import grad_and_value

from protofl.errors import CompileError
from protofl.stacked import stacked_forward

Params = dict[str, torch.Tensor]

#: What the run's summary adds to ``batched_step`` when the step is compiled.
COMPILED = "compiled"


def _mark_dynamic(tensors: Iterable[torch.Tensor], dims: tuple[int, ...]) -> None:
    """The client axis (and a batch's width) of these tensors is a symbol for the compiler, not a constant."""
    for t in tensors:
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _own_code(method: Any) -> Any:
    """``method`` (bound) as a copy whose function has a code object of its own. torch.compile keeps its
    programs, and counts them against its recompile limit (8), per code object, and every new method object
    is a new program (its guards hold that object): without a copy, a process that runs a ninth run with
    this setting (a sweep, a notebook, a test session) would fail on the limit, and every earlier run's
    programs would keep its method alive."""
    func = method.__func__
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    return types.MethodType(copy, method.__self__)


#: What a failed compile raises: dynamo's own errors, and the recompile limit's (a plain ``Exception`` in
#: torch 2.13, raised under ``fullgraph=True`` when a program would compile a ninth form).
_COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.TorchDynamoException),
)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).strip().splitlines() if line.strip()), "")


def _compile_failed(what: str, exc: BaseException) -> CompileError:
    """One line for a failed compile, with its cause: a backend's failure (no C++ compiler, for one) is
    wrapped in ``BackendCompilerFailed``, whose own first line names only the backend."""
    cause = getattr(exc, "inner_exception", None)
    if isinstance(cause, BaseException):
        why = f"{type(cause).__name__}: {_first_line(cause)}".rstrip(": ")
    else:
        why = _first_line(exc) or type(exc).__name__
    if isinstance(exc, _COMPILE_ERRORS[1]) and not isinstance(exc, torch._dynamo.exc.TorchDynamoException):
        why = f"{why} (the program compiled again at every call: TORCH_LOGS=recompiles shows why)"
    return CompileError(
        f"federation.compile: torch.compile of the batched round's {what} failed: {why} "
        "(federation.compile = false runs the eager step)"
    )


class CompiledRound:
    """The compiled stacked step and feature pass of one method's batched rounds (built once and reused
    every round, so that each form compiles once per run).

    ``loss_fn(params, x, y, weight, *shared)`` and ``features_fn(params, x)`` are the method's own
    functions, marked :func:`protofl.stacked.stackable`: they run on the stacked tensors."""

    def __init__(
        self, loss_fn: Callable[..., torch.Tensor], features_fn: Callable[[Params, torch.Tensor], torch.Tensor]
    ):
        self.loss_fn = loss_fn
        self.features_fn = features_fn
        self._step: Callable[..., Any] | None = None
        self._features: Callable[..., Any] | None = None

    # -- the eager forms that get compiled ---------------------------------------------------------------
    def _summed(self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any):
        losses = stacked_forward(self.loss_fn, params, x, y, weight, *shared)
        return losses.sum(), losses

    def _step_form(self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any):
        grads, (_, losses) = grad_and_value(self._summed, has_aux=True)(params, x, y, weight, *shared)
        return grads, losses

    def _features_form(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return stacked_forward(self.features_fn, params, x)

    # -- the compiled calls ------------------------------------------------------------------------------
    def step(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *shared: Any
    ) -> tuple[Params, torch.Tensor]:
        """Every client's gradients (a dict of ``(K, ...)`` tensors) and losses ``(K,)`` of one step, as
        :func:`protofl.stacked.stacked_grad_and_value`'s step returns them."""
        if self._step is None:
            self._step = torch.compile(_own_code(self._step_form), fullgraph=True)
        _mark_dynamic(params.values(), (0,))
        _mark_dynamic((x, y, weight), (0, 1))
        try:
            grads, losses = self._step(params, x, y, weight, *shared)
        except _COMPILE_ERRORS as exc:
            raise _compile_failed("local step", exc) from exc
        if losses.shape != (len(y),):
            raise RuntimeError(
                f"a loss marked stackable returned shape {tuple(losses.shape)} for {len(y)} stacked clients; "
                "it must reduce over trailing dimensions only and return one value per client"
            )
        return grads, losses

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Every client's features of its rows ``x (K, n, ...)`` under its own parameters."""
        if self._features is None:
            self._features = torch.compile(_own_code(self._features_form), fullgraph=True)
        _mark_dynamic(params.values(), (0,))
        _mark_dynamic((x,), (0, 1))
        try:
            return self._features(params, x)
        except _COMPILE_ERRORS as exc:
            raise _compile_failed("feature pass", exc) from exc
