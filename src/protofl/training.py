"""Local training below the algorithms: the minibatch schedule, the per-client loop, the batched loop.

Every loop here draws its minibatches with :func:`minibatches` (one ``randperm`` of the examples per
epoch from the caller's generator, consecutive slices of ``batch_size``), so the per-client loop, the
batched loop and the server-side loops of the methods draw their random numbers the same way.

**The per-client loop** (:func:`train_local`) trains one parameter dict on one client's data.

**The batched loop** (:func:`train_batched`): on a small CPU, a federated round of small models is
bound by per-step overhead (Python, autograd, the optimiser), not by arithmetic. Here the parameters
of ``K`` clients are stacked along a leading axis and every local step of all ``K`` clients is one call
of ``vmap(grad(loss))`` over that axis (``torch.func``) -- or, where the model and the loss are marked
stackable, the stacked step of :mod:`protofl.stacked` (their own code on the stacked tensors, one
backward) -- followed by one stacked optimiser update. The
result is the per-client loop's within float tolerance, because everything that makes a client's
training its own is kept:

- **the same minibatches**: each client's shuffles are drawn up front with its own generator, epoch by
  epoch, exactly as :func:`train_local` draws them (so the generator is left in the same state for
  anything drawn after training, e.g. a privacy mechanism's noise);
- **unequal sizes**: batches are padded to the batch size with a per-sample weight (0 for padding);
  the loss of a client is the weighted mean over its real samples, so a short last batch or a client
  with fewer examples than a batch is averaged over what it has (a step whose batches are all short
  runs at the width of its longest);
- **unequal batch counts**: client ``k`` runs its own ``S_k`` steps as steps ``0 .. S_k - 1`` of the
  program; at later steps it is inactive: a step computes and updates only the clients that take it, and
  the others' parameters and optimiser state are left untouched (not a zero gradient: momentum and
  weight decay would otherwise still move them);
- **the same optimiser math** as ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (state reset each round).

Both loops train the same objective, ``loss(params, x, y, weight, *shared)`` with ``weight`` 1 on real
samples and 0 on padding (the per-client loop passes unit weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from protofl.stacked import stackable, stacked_forward, stacked_grad_and_value

Params = dict[str, torch.Tensor]


# -- the minibatch schedule ------------------------------------------------------------------------
def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """The order in which one epoch visits ``range(n)``: a single ``randperm(n, generator)``, drawn even for
    ``n = 0``, so a generator advances the same way whatever the data."""
    return torch.randperm(n, generator=generator, device=generator.device)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled minibatches of ``range(n)``: :func:`epoch_order` cut into consecutive slices
    of ``batch_size`` (the last one shorter)."""
    order = epoch_order(n, generator)
    return list(order.split(batch_size)) if n else []


# -- losses on padded batches ------------------------------------------------------------------------
@stackable
def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the entries whose ``weight`` is 1 (0 when there are none), along the last
    dimension (so stacked clients' ``(K, B)`` values give ``(K,)`` means)."""
    return (values * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


@stackable
def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits[valid], y[valid])`` for one client's padded batch. Written as
    ``logsumexp - gather``: under ``vmap`` ``F.cross_entropy`` falls back to a decomposition of
    ``nll_loss`` about three times slower."""
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, weight)


# -- optimisers ----------------------------------------------------------------------------------------
def make_optimizer(config: Any, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser named by ``config.optimizer`` (``sgd``, ``adam``, ``adamw``)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class StackedOptimizer:
    """``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (default betas and eps) on stacked parameters, updated
    in place with the ``torch._foreach_*`` operations those optimisers use, for every client or for some
    of them (``rows``: the others' parameters and optimiser state are left untouched). State starts empty
    each round, as in :func:`train_local`."""

    def __init__(self, config: Any, params: Params):
        self.config = config
        self.kind = config.optimizer
        self.names = list(params)
        self.state: list[list[torch.Tensor]] = []
        if self.kind == "sgd":
            if config.momentum:
                self.state = [[torch.zeros_like(v) for v in params.values()]]
        else:
            self.state = [
                [torch.zeros_like(v) for v in params.values()],
                [torch.zeros_like(v) for v in params.values()],
            ]

    def step(self, params: Params, grads: Params, step: int, rows: torch.Tensor | None = None) -> None:
        """Step ``step`` (from 1) of every client (``grads``: theirs), or of the clients ``rows`` alone
        (``grads``: theirs, in that order): their parameters and state are taken out, updated and put back,
        the same values as an update of all (the update is elementwise)."""
        p = [params[n] for n in self.names]
        g = [grads[n] for n in self.names]
        if rows is None:
            self._update(p, g, self.state, step)
            return
        part = [[t[rows] for t in group] for group in (p, *self.state)]
        self._update(part[0], g, part[1:], step)
        for group, taken in zip((p, *self.state), part):
            for t, updated in zip(group, taken):
                t.index_copy_(0, rows, updated)

    def _update(
        self,
        p: list[torch.Tensor],
        g: list[torch.Tensor] | tuple[torch.Tensor, ...],
        state: list[list[torch.Tensor]],
        step: int,
    ) -> None:
        c = self.config
        lr, wd = c.lr, c.weight_decay
        if self.kind == "sgd":
            if wd:
                g = torch._foreach_add(g, p, alpha=wd)
            if state:
                (buf,) = state
                # buf <- momentum * buf + g, written into g's own tensors (fresh from this step; an expanded
                # gradient is made a tensor of its own) in one pass rather than two over buf; they then are the
                # buffer
                g = [t.contiguous() for t in g]
                torch._foreach_add_(g, buf, alpha=c.momentum)
                buf[:] = g
            torch._foreach_add_(p, g, alpha=-lr)
            return
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        exp_avg, exp_avg_sq = state
        if self.kind == "adamw":
            if wd:
                torch._foreach_mul_(p, 1 - lr * wd)
        elif wd:
            g = torch._foreach_add(g, p, alpha=wd)
        torch._foreach_lerp_(exp_avg, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, 1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, exp_avg, denom, -step_size)


# -- the per-client loop -----------------------------------------------------------------------------
def train_local(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    config: Any,
    generator: torch.Generator,
    on_epoch: Callable[[Params], None] | None = None,
    shared: tuple = (),
) -> tuple[Params, dict[str, float]]:
    """``config.local_epochs`` epochs of :func:`minibatches` of ``loss_fn(params, x, y, weight, *shared)``
    (unit weights) with :func:`make_optimizer`; returns detached parameters and ``{"train_loss"}`` (the
    mean of the step losses). ``params`` are not modified (copies are trained).

    ``on_epoch(params)`` (optional) is called with the current detached parameters before each epoch
    (e.g. to recompute a per-epoch statistic of the local data)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = make_optimizer(config, list(leaves.values()))
    total, batches = 0.0, 0
    for _ in range(config.local_epochs):
        if on_epoch is not None:
            on_epoch({k: v.detach() for k, v in leaves.items()})
        for index in minibatches(len(y), config.batch_size, generator):
            loss = loss_fn(leaves, x[index], y[index], torch.ones(len(index), dtype=x.dtype, device=x.device), *shared)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return {k: v.detach() for k, v in leaves.items()}, {"train_loss": total / max(batches, 1)}


# -- the batched loop ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ClientBatch:
    """The train splits of ``K`` clients, concatenated, with their offsets and sizes."""

    x: torch.Tensor  # (sum n_k, ...)
    y: torch.Tensor  # (sum n_k,)
    sizes: torch.Tensor  # (K,) int64
    offsets: torch.Tensor  # (K,) int64

    @classmethod
    def of(cls, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> ClientBatch:
        sizes = torch.tensor([len(y) for y in ys], dtype=torch.int64, device="cpu")
        offsets = torch.zeros_like(sizes)
        if len(sizes) > 1:
            offsets[1:] = torch.cumsum(sizes, 0)[:-1]
        return cls(torch.cat(list(xs)), torch.cat(list(ys)), sizes, offsets)

    def __len__(self) -> int:
        return len(self.sizes)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index (K, n_max), weight (K, n_max))``: every client's rows, padded by repeating its first
        row (weight 0); a client with no rows points at row 0 of the whole batch."""
        n_max = int(self.sizes.max()) if len(self.sizes) else 0
        pos = torch.arange(n_max, device="cpu")
        weight = (pos[None, :] < self.sizes[:, None]).float()
        within = torch.where(weight > 0, pos[None, :], torch.zeros((), dtype=torch.int64, device="cpu"))
        index = (self.offsets[:, None] + within).clamp(max=max(len(self.y) - 1, 0))
        return index.to(self.x.device), weight.to(self.x.device)


@dataclasses.dataclass
class Schedule:
    """Which rows every client uses at every step of the batched program."""

    index: torch.Tensor  # (S, K, B) rows into ClientBatch.x / .y
    weight: torch.Tensor  # (S, K, B) 1 for a real sample, 0 for padding
    active: torch.Tensor  # (S, K) whether client k takes step s
    steps: torch.Tensor  # (K,) number of steps of each client


def batch_schedule(batch: ClientBatch, batch_size: int, epochs: int, generators: Sequence[torch.Generator]) -> Schedule:
    """Each client's :func:`minibatches`, drawn with its own generator epoch by epoch exactly as
    :func:`train_local` draws them, padded into one table.

    Client ``c`` with ``n`` rows takes ``spe = ceil(n / batch_size)`` steps per epoch, its epochs one after
    the other (steps ``0 .. epochs * spe - 1``). Its rows, epoch by epoch, are the epoch's order padded to
    ``spe * batch_size`` (padding: the client's first row, weight 0), cut into the steps' batches. Only
    the draws are per client; the table is laid out for all clients at once."""
    sizes = batch.sizes.tolist()
    k = len(sizes)
    width = max(1, min(batch_size, max(sizes, default=1)))
    per_epoch = torch.div(batch.sizes + batch_size - 1, batch_size, rounding_mode="floor")  # (K,) steps
    steps_max = epochs * int(per_epoch.max()) if k else 0
    span = steps_max * batch_size  # a client's padded rows over all its epochs, at most
    # Every epoch's order of every client, in (client, epoch) order: the only per-client work.
    orders = [epoch_order(n, g) for n, g in zip(sizes, generators) for _ in range(epochs)]
    cpu = torch.device("cpu")  # built here, moved once at the end
    drawn = torch.cat(orders).to(cpu) if orders else torch.zeros(0, dtype=torch.int64, device=cpu)
    # Where each drawn row goes in its client's padded sequence: client c, epoch e, position i goes to
    # c * span + e * spe_c * batch_size + i.
    client = torch.arange(k, device=cpu).repeat_interleave(batch.sizes * epochs)
    epoch_of = torch.arange(len(orders), device=cpu) % max(epochs, 1)  # the epoch of each order
    n_of = batch.sizes.repeat_interleave(epochs)
    first = torch.cumsum(n_of, 0) - n_of  # where each order starts in ``drawn``
    within = torch.arange(len(drawn), device=cpu) - first.repeat_interleave(n_of)
    slot = (
        client * span + (epoch_of * per_epoch.repeat_interleave(epochs) * batch_size).repeat_interleave(n_of) + within
    )
    rows = batch.offsets.repeat_interleave(span)  # padding within an epoch: the client's first row
    real = torch.zeros(k * span, device=cpu)
    rows[slot] = drawn + batch.offsets[client]
    real[slot] = 1.0
    # (K, steps, batch_size) -> (steps, K, width): the columns past ``width`` are padding of every client
    index = rows.view(k, steps_max, batch_size)[:, :, :width].transpose(0, 1).contiguous()
    weight = real.view(k, steps_max, batch_size)[:, :, :width].transpose(0, 1).contiguous()
    total_steps = per_epoch * epochs
    active = torch.arange(steps_max, device=cpu)[:, None] < total_steps[None, :]
    index = torch.where(active[:, :, None], index, 0)  # row 0 at the steps a client does not take
    device = batch.x.device
    return Schedule(index.to(device), weight.to(device), active.to(device), total_steps.to(device))


def stack_params(params_list: Sequence[Params]) -> Params:
    """``K`` parameter dicts -> one dict of ``(K, ...)`` tensors (a fresh copy)."""
    return {name: torch.stack([p[name] for p in params_list]) for name in params_list[0]}


def broadcast_params(params: Params, k: int) -> Params:
    """One parameter dict repeated for ``K`` clients (a fresh copy)."""
    return {name: v.detach().unsqueeze(0).expand(k, *v.shape).clone() for name, v in params.items()}


def unstack_params(stacked: Params) -> list[Params]:
    """``(K, ...)`` tensors -> ``K`` dicts of independent tensors (clones, so that one client's state
    does not keep the whole chunk's storage alive; each tensor's ``K`` clones in one call)."""
    k = len(next(iter(stacked.values())))
    parts = {name: torch._foreach_clone(list(v.unbind(0))) for name, v in stacked.items()}
    return [{name: parts[name][c] for name in stacked} for c in range(k)]


def train_batched(
    params: Params,
    batch: ClientBatch,
    loss_fn: Callable[..., torch.Tensor],
    config: Any,
    generators: Sequence[torch.Generator],
    shared: tuple = (),
    stacked: bool = False,
    step_fn: Callable[..., tuple[Params, torch.Tensor]] | None = None,
) -> tuple[Params, list[dict[str, float]]]:
    """Train ``K`` clients at once: ``params`` holds ``(K, ...)`` tensors (a fresh stack, e.g. from
    :func:`stack_params`: they are updated in place), ``loss_fn(params_k, x, y, weight, *shared)`` is
    one client's loss on its padded batch (``weight`` marks real samples), and ``shared`` are arguments
    common to every client (e.g. the global prototypes). Returns the trained stacked parameters and each
    client's ``{"train_loss"}`` (the mean of its step losses, as :func:`train_local` reports it).

    ``stacked``: each step is :func:`protofl.stacked.stacked_grad_and_value` (the model's and the loss's
    own code on the stacked tensors, one backward), for a loss marked :func:`protofl.stacked.stackable`;
    otherwise ``vmap(grad_and_value(loss_fn))``. ``step_fn``: a step to run in place of either (called as
    they are, e.g. :meth:`protofl.compiled.CompiledRound.step`)."""
    schedule = batch_schedule(batch, config.batch_size, config.local_epochs, generators)
    leaves = {name: v.detach() for name, v in params.items()}  # trained in place: pass a fresh stack
    optimizer = StackedOptimizer(config, leaves)
    if step_fn is None:
        step_fn = (
            stacked_grad_and_value(loss_fn)
            if stacked
            else vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0, 0, *([None] * len(shared))))
        )
    k = len(batch)
    total = torch.zeros(k, dtype=torch.float64, device=batch.x.device)
    # A client's real rows in a step are a prefix of its batch: a step whose batches are all short (e.g. the
    # last one of an epoch) runs at the width of its longest (real rows counted, whatever their weights).
    # Every step's width and whether all clients take it, read in one go (not two reads a step).
    widths = (schedule.weight != 0).sum(2).amax(1).tolist() if k else []
    everyone = schedule.active.all(1).tolist()
    for s, (width, all_active) in enumerate(zip(widths, everyone)):
        index, weight, active = schedule.index[s], schedule.weight[s], schedule.active[s]
        if width < weight.shape[1]:
            index, weight = index[:, :width], weight[:, :width]
        if all_active:
            grads, losses = step_fn(leaves, take(batch.x, index), take(batch.y, index), weight, *shared)
            optimizer.step(leaves, grads, s + 1)
            total += losses.detach().double()
            continue
        # Only the clients that take this step (those with more batches than the others) are computed: a
        # client's gradient depends on its own parameters and batch alone, so theirs are the same as in a
        # step of all, and the others are left untouched.
        rows = active.nonzero().flatten()
        part = {name: v[rows] for name, v in leaves.items()}
        grads, losses = step_fn(part, take(batch.x, index[rows]), take(batch.y, index[rows]), weight[rows], *shared)
        optimizer.step(leaves, grads, s + 1, rows)
        total.index_add_(0, rows, losses.detach().double())
    steps = schedule.steps.clamp_min(1).double()
    metrics = [{"train_loss": float(v)} for v in (total / steps).tolist()]
    return leaves, metrics


@torch.no_grad()
def batched_features(
    features: Callable[[Params, torch.Tensor], torch.Tensor],
    params: Params,
    batch: ClientBatch,
    stacked: bool = False,
    forward: Callable[[Params, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of every client's train split under its own stacked parameters (one ``vmap`` of
    ``features(params, x)``, or with ``stacked`` ``features`` itself on the stacked tensors, see
    :func:`protofl.stacked.stacked_forward`): ``(K, n_max, d)``, the ``(K, n_max)`` weight of the real
    rows and their ``(K, n_max)`` row index into the batch. ``forward``: the pass to run in place of either,
    on the stacked parameters and rows (e.g. :meth:`protofl.compiled.CompiledRound.features`)."""
    index, weight = batch.padded_index()
    x = take(batch.x, index)
    if forward is not None:
        z = forward(params, x)
    else:
        z = stacked_forward(features, params, x) if stacked else vmap(features)(params, x)
    return z, weight, index


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a non-negative int64 or int32 ``index`` of any shape on ``table``'s device (no
    negative indices, no masks): the rows of ``table`` it names, the same values, gathered as whole rows
    (``index_select``), several times faster on the CPU than advanced indexing, which gathers element by
    element."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive groups of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]
