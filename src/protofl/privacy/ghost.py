"""Ghost clipping: DP-SGD's clipped gradient sum without per-example gradient tensors.

A linear layer used per example, u_t = W a_t + b for the uses t = 1..T of example i (T = 1 for a plain
MLP; several when a layer is applied to several inputs of one example), has the per-example gradients
∂L_i/∂W = Σ_t g_t a_tᵀ and ∂L_i/∂b = Σ_t g_t with g_t = ∂L_i/∂u_t. Their squared norms follow from
the activations and the output gradients alone (Goodfellow 2015 for T = 1; Li et al. 2022 for T > 1):

    ‖∂L_i/∂W‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t') = ⟨A Aᵀ, G Gᵀ⟩,     ‖∂L_i/∂b‖² = ‖Σ_t g_t‖²,

so a step is: a forward pass that keeps the activations; a first backward pass for the output gradients
only (no parameter gradients); the per-example norms ‖∇L_i‖ summed over every parameter; the clip
factors w_i = min(1, C/‖∇L_i‖); and one backward pass of Σ_i w_i L_i, whose parameter gradient *is*
Σ_i clip_C(∇L_i). The noise is then the materialised path's exactly
(:func:`~protofl.privacy.dpsgd.add_noise`), so the mechanism, and its accounting, do not change. Where
T² exceeds in·out, the layer's per-example gradient is formed instead (cheaper then; Bu et al.'s mixed
rule). *Where we differ* from book-keeping (Bu et al. 2023), which forms the clipped sum from the stored
activations and output gradients: the second backward pass recomputes them, but needs no layer-specific
code for parameters behind a generated weight or a shared intermediate.

:func:`module_clipped_sum` serves ``nn.Module`` models whose trainable parameters all sit in ``nn.Linear``
layers (forward hooks record each use); a functional model assembles the same pieces
(:func:`linear_sq_norms`, :func:`clip_factors`, :func:`reweighted_sum`) itself, as FedHypeVAE does for
its joint DP-SGD of (φ, ψ, c) (:mod:`protofl.algorithms.fedhypevae`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Params = dict[str, torch.Tensor]

__all__ = ["clip_factors", "linear_sq_norms", "module_clipped_sum", "reweighted_sum"]


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared norms of a linear layer's weight and bias gradients from its inputs ``a``
    (B, T, in) and output gradients ``g`` (B, T, out) (or (B, in), (B, out) for T = 1); ``a`` may be
    broadcast over examples (a shared input). Returns ``(‖Σ_t g_t a_tᵀ‖², ‖Σ_t g_t‖²)``, each (B,)."""
    if g.dim() == 2:
        a, g = a[:, None], g[:, None]
    a = a.expand(g.shape[0], *a.shape[1:])
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        w = a[:, 0].square().sum(-1) * g[:, 0].square().sum(-1)
    elif t * t <= d_in * d_out:  # the Gram matrices A Aᵀ and G Gᵀ are T x T
        w = (a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum((1, 2))
    else:  # cheaper to form the per-example gradient (B, out, in)
        w = (g.transpose(1, 2) @ a).square().sum((1, 2))
    return w, g.sum(1).square().sum(-1)


def clip_factors(sq_norms: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, norms)``: w_i = min(1, C / ‖∇L_i‖) from the squared per-example norms (as
    :func:`~protofl.privacy.dpsgd.clip_per_example` scales)."""
    norms = sq_norms.clamp_min(0).sqrt()
    return torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0), norms


def reweighted_sum(losses: torch.Tensor, weights: torch.Tensor, leaves: Mapping[str, torch.Tensor]) -> Params:
    """Σ_i clip_C(∇L_i) as the gradient of Σ_i w_i L_i (w_i held constant): one backward pass."""
    grads = torch.autograd.grad((weights.detach() * losses).sum(), list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(leaves.items(), grads)}


# --------------------------------------------------------------------------------------------------
# nn.Module models of linear layers


def module_clipped_sum(
    module: torch.nn.Module, example_losses: Callable[[], torch.Tensor], clip_norm: float
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Σ_i clip_C(∇L_i) for ``module``'s trainable parameters, every one of which must belong to an
    ``nn.Linear``; ``example_losses()`` runs the forward pass and returns the per-example losses (B,),
    each depending on its own example only. A layer's input may be (B, in) or (B, *, in) (each example's
    rows are its uses), and a layer may be called several times (its uses are stacked per example).
    Returns ``(summed clipped gradients by parameter name, per-example norms, losses)``."""
    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    linears = [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.Linear) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]  # frozen layers need no norms
    covered = {id(p) for m in linears for p in m.parameters(recurse=False) if p.requires_grad}
    owners = [id(p) for m in linears for p in m.parameters(recurse=False) if p.requires_grad]
    if len(owners) != len(set(owners)):
        raise ValueError(
            "ghost clipping: a parameter is shared by several nn.Linear layers; the norm of its summed "
            "gradient is not the sum of per-layer norms: use materialised gradients"
        )
    if set(names) - covered:
        missing = sorted(names[i] for i in set(names) - covered)
        raise ValueError(
            f"ghost clipping covers nn.Linear layers only; {missing} would need materialised per-example gradients"
        )
    uses: list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]] = []

    def record(layer, inputs, output):
        uses.append((layer, inputs[0].detach(), output))

    handles = [m.register_forward_hook(record) for m in linears]
    try:
        losses = example_losses()
    finally:
        for h in handles:
            h.remove()
    b = losses.shape[0]
    outputs = [u for _, _, u in uses]
    grads = torch.autograd.grad(losses.sum(), outputs, retain_graph=True, allow_unused=True)
    per_layer: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for (layer, a, u), g in zip(uses, grads):
        if g is None:
            g = torch.zeros_like(u)
        acts, outs = per_layer.setdefault(id(layer), ([], []))
        acts.append(a.reshape(b, -1, a.shape[-1]))
        outs.append(g.reshape(b, -1, g.shape[-1]))
    sq = torch.zeros(b, dtype=losses.dtype, device=losses.device)
    unused = []
    for layer in linears:
        if id(layer) not in per_layer:
            unused.append(layer)
            continue
        acts, outs = per_layer[id(layer)]
        w_sq, b_sq = linear_sq_norms(torch.cat(acts, 1), torch.cat(outs, 1))
        if layer.weight.requires_grad:
            sq = sq + w_sq
        if layer.bias is not None and layer.bias.requires_grad:
            sq = sq + b_sq
    weights, norms = clip_factors(sq, clip_norm)
    leaves = {n: p for n, p in module.named_parameters() if p.requires_grad}
    summed = reweighted_sum(losses, weights, leaves)
    # A layer whose forward hook never fired has no norm; if its parameters still got a gradient (used
    # through F.linear, or inside another module's forward) that gradient would escape the clipping.
    for layer in unused:
        for p in layer.parameters(recurse=False):
            name = names.get(id(p))
            if name is not None and bool(summed[name].abs().sum() > 0):
                raise ValueError(
                    f"ghost clipping: {name!r} got a gradient without a forward call of its nn.Linear "
                    "(used functionally?); its per-example norm is unknown: use materialised gradients"
                )
    return summed, norms, losses.detach()
