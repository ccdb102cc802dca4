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

Two helpers: :func:`module_clipped_sum` for ``nn.Module`` models whose trainable parameters all sit in
``nn.Linear`` layers (forward hooks record each use), and :func:`fedhypevae_clipped_sum` for
FedHypeVAE's joint DP-SGD of (φ, ψ, c), whose decoder weights are row-scaled by a modulation that is
*shared* by the examples of a batch (see its docstring for how each parameter group's norm is formed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]

__all__ = ["clip_factors", "fedhypevae_batch_losses", "fedhypevae_clipped_sum", "fedhypevae_noise",
           "linear_sq_norms", "module_clipped_sum"]


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


def _reweighted_sum(losses: torch.Tensor, weights: torch.Tensor, leaves: Params) -> Params:
    """Σ_i clip_C(∇L_i) as the gradient of Σ_i w_i L_i (w_i held constant): one backward pass."""
    grads = torch.autograd.grad((weights.detach() * losses).sum(), list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(leaves.items(), grads)}


# --------------------------------------------------------------------------------------------------
# nn.Module models of linear layers


def module_clipped_sum(module: torch.nn.Module, example_losses: Callable[[], torch.Tensor],
                       clip_norm: float) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Σ_i clip_C(∇L_i) for ``module``'s trainable parameters, every one of which must belong to an
    ``nn.Linear``; ``example_losses()`` runs the forward pass and returns the per-example losses (B,),
    each depending on its own example only. A layer's input may be (B, in) or (B, *, in) (each example's
    rows are its uses), and a layer may be called several times (its uses are stacked per example).
    Returns ``(summed clipped gradients by parameter name, per-example norms, losses)``."""
    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)
               and any(p.requires_grad for p in m.parameters(recurse=False))]  # frozen layers need no norms
    covered = {id(p) for m in linears for p in m.parameters(recurse=False) if p.requires_grad}
    owners = [id(p) for m in linears for p in m.parameters(recurse=False) if p.requires_grad]
    if len(owners) != len(set(owners)):
        raise ValueError("ghost clipping: a parameter is shared by several nn.Linear layers; the norm of its summed "
                         "gradient is not the sum of per-layer norms: use materialised gradients")
    if set(names) - covered:
        missing = sorted(names[i] for i in set(names) - covered)
        raise ValueError(f"ghost clipping covers nn.Linear layers only; {missing} would need materialised "
                         "per-example gradients")
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
    sq = torch.zeros(b, dtype=losses.dtype)
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
    summed = _reweighted_sum(losses, weights, leaves)
    # A layer whose forward hook never fired has no norm; if its parameters still got a gradient (used
    # through F.linear, or inside another module's forward) that gradient would escape the clipping.
    for layer in unused:
        for p in layer.parameters(recurse=False):
            name = names.get(id(p))
            if name is not None and bool(summed[name].abs().sum() > 0):
                raise ValueError(f"ghost clipping: {name!r} got a gradient without a forward call of its nn.Linear "
                                 "(used functionally?); its per-example norm is unknown: use materialised gradients")
    return summed, norms, losses.detach()


# --------------------------------------------------------------------------------------------------
# FedHypeVAE


def fedhypevae_noise(config: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of a batch's per-example losses, from the global generator: the encoder's
    reparameterisation ε_z (B, L), the two generated samples' ε (B, 2, L), the Lipschitz probe ξ
    (B, d_c) (radius r applied here, as ``example_loss`` does)."""
    return (torch.randn(batch_size, config.latent_dim), torch.randn(batch_size, 2, config.latent_dim),
            torch.randn(batch_size, config.code_dim) * config.lip_radius)


def fedhypevae_clipped_sum(algo: Any, params: Params, x: torch.Tensor, y1h: torch.Tensor,
                           noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor], clip_norm: float
                           ) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Σ_i clip_C(∇L_i) over FedHypeVAE's DP-SGD parameters (``phi/…``, ``psi/…``, ``code``) with
    ghost norms; L_i is ``algo.example_loss`` of example i with the random numbers ``noise[·][i]``.
    Returns ``(summed clipped gradients, per-example norms, per-example losses)``.

    The batch runs in one pass: the encoder on (B, ·); the decoder on (B, T, ·) with T = 3 uses per
    example (the reconstruction and the two MMD samples; T = 1 without MMD). Per parameter group:

    - ψ (encoder), prior network: per-example linear layers, T = 1: ‖g‖²(‖a‖² + 1).
    - decoder base W_l, b_l: the modulated layer is u = (1 + s) ⊙ (W a) + b + β, so with g = ∂L_i/∂u,
      ∂L_i/∂W = Σ_t ((1 + s) ⊙ g_t) a_tᵀ (still rank one per use) and ∂L_i/∂b = Σ_t g_t: the T-use
      Gram formula with the output gradients scaled by 1 + s.
    - hypernetwork: its output m = h(c) (all s_l, β_l) is shared by the batch. It is replicated per
      example, so the first backward pass gives v_i = ∂L_i/∂m. The per-example gradient of a parameter θ
      behind m is Jᵀv_i, of squared norm v_iᵀ(J Jᵀ)v_i; for the two-layer hypernetwork m = W₁ tanh(W₀c +
      b₀) + b₁ that Gram form factorises layer by layer: W₁'s rows see the shared input tanh(·) (rank
      one), and W₀'s output gradient is p_i = (1 − tanh²) ⊙ W₁ᵀv_i, a (B, hyper_hidden) product, so
      no (B, |θ|) tensor and no |m| x |m| Gram matrix is formed.
    - The Lipschitz term runs the hypernetwork again on c + ξ_i, a per-example input: W₀, b₀, W₁, b₁ are
      then used twice per example (shared use and probe), handled by the T = 2 Gram formula, which keeps
      the cross terms (the norm of a sum is not the sum of norms).
    - the code c (d_c numbers) enters the hypernetwork twice and the prior's input; its per-example
      gradient W₀ᵀp_i + W₀ᵀp'_i + (prior₀ input gradient)[:d_c] is formed: (B, d_c) is small.

    The MMD term is already a per-example sum (each example's two generated samples are its own), so it
    is just two more decoder uses of that example; nothing couples examples."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss, rec = fedhypevae_batch_losses(algo, leaves, x, y1h, noise)
    taps = rec["taps"]
    grads = dict(zip(taps, torch.autograd.grad(loss.sum(), list(taps.values()), retain_graph=True)))
    with torch.no_grad():
        phi = {k[4:]: v.detach() for k, v in leaves.items() if k.startswith("phi/")}
        sq = _fedhypevae_sq_norms(algo, phi, leaves["code"].detach(), rec["acts"], grads, rec["scales"], rec["hid"],
                                  rec["lip"])
    weights, norms = clip_factors(sq, clip_norm)
    return _reweighted_sum(loss, weights, leaves), norms, loss.detach()


def fedhypevae_batch_losses(algo: Any, params: Params, x: torch.Tensor, y1h: torch.Tensor,
                            noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The per-example losses (B,) of ``algo.example_loss`` computed for the whole batch at once, and a
    record of the linear layers' inputs and outputs (``taps``) that ghost clipping reads. Without
    clipping, ``losses.sum()`` is the plain (non-private) step's objective."""
    c = algo.config
    lat = c.latent_dim
    phi = {k[4:]: v for k, v in params.items() if k.startswith("phi/")}
    psi = {k[4:]: v for k, v in params.items() if k.startswith("psi/")}
    code = params["code"]
    eps_z, eps_gen, xi = noise
    b = x.shape[0]
    taps: dict[str, torch.Tensor] = {}   # tensors whose per-example gradients the first pass computes
    acts: dict[str, torch.Tensor] = {}   # the inputs of the linear layers at those taps

    h = torch.cat([x, y1h], -1)
    for l in range(3):
        acts[f"psi/enc{l}"] = h
        h = taps[f"psi/enc{l}"] = F.linear(h, psi[f"enc{l}.w"], psi[f"enc{l}.b"])
        if l < 2:
            h = F.relu(h)
    mu_q, logvar_q = h[:, :lat], h[:, lat:].clamp(-8, 8)
    z = mu_q + eps_z * (0.5 * logvar_q).exp()

    hyper = "hyper0.w" in phi
    if hyper:
        hid = torch.tanh(F.linear(code, phi["hyper0.w"], phi["hyper0.b"]))
        m = taps["m"] = F.linear(hid, phi["hyper1.w"], phi["hyper1.b"]).expand(b, -1)
        pin = acts["phi/prior0"] = torch.cat([code.expand(b, -1), y1h], -1)
        u = taps["phi/prior0"] = F.linear(pin, phi["prior0.w"], phi["prior0.b"])
        acts["phi/prior1"] = ph = torch.tanh(u)
        out = taps["phi/prior1"] = F.linear(ph, phi["prior1.w"], phi["prior1.b"])
        mu_p, logvar_p = out[:, :lat], out[:, lat:].clamp(-8, 8)
    else:
        mu_p = logvar_p = torch.zeros(b, lat)
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)

    zs = z[:, None]
    if c.mmd_weight:
        zs = torch.cat([zs, mu_p[:, None] + eps_gen * (0.5 * logvar_p).exp()[:, None]], 1)
    h = torch.cat([zs, y1h[:, None].expand(-1, zs.shape[1], -1)], -1)
    scales: dict[str, torch.Tensor] = {}
    start, last = 0, len(algo.sizes) - 1
    for l, (o, _) in enumerate(algo.sizes):
        w, bias = phi[f"dec{l}.w"], phi[f"dec{l}.b"]
        acts[f"phi/dec{l}"] = h
        if hyper:
            s, beta = m[:, start:start + o], m[:, start + o:start + 2 * o]
            start += 2 * o
            scales[f"phi/dec{l}"] = (1 + s)[:, None].detach()
            h = taps[f"phi/dec{l}"] = F.linear(h, w) * (1 + s)[:, None] + (bias + beta)[:, None]
        else:
            h = taps[f"phi/dec{l}"] = F.linear(h, w, bias)
        h = torch.sigmoid(h) if l == last else F.relu(h)
    loss = ((x - h[:, 0]) ** 2).sum(-1) + c.beta_kl * kl
    if c.mmd_weight:
        k = algo.bandwidth
        loss = loss + c.mmd_weight * (torch.exp(-((h[:, 1] - h[:, 2]) ** 2).sum(-1) / (2 * k**2))
                                      - 2 * torch.exp(-((x - h[:, 1]) ** 2).sum(-1) / (2 * k**2)))
    lip = bool(c.lip_weight and c.code_dim)
    if lip:
        shifted = acts["probe0"] = code + xi
        u = taps["probe0"] = F.linear(shifted, phi["hyper0.w"], phi["hyper0.b"])
        acts["probe1"] = hs = torch.tanh(u)
        m2 = taps["probe1"] = F.linear(hs, phi["hyper1.w"], phi["hyper1.b"])
        loss = loss + c.lip_weight * ((m2 - m) ** 2).sum(-1) / (xi**2).sum(-1)
    return loss, {"taps": taps, "acts": acts, "scales": scales, "hid": hid.detach() if hyper else None, "lip": lip}


def _fedhypevae_sq_norms(algo, phi, code, acts, grads, scales, hid, lip):
    """Σ over FedHypeVAE's parameters of the per-example squared gradient norms (see
    :func:`fedhypevae_clipped_sum`)."""
    c = algo.config
    b = grads["psi/enc0"].shape[0]
    hyper = hid is not None
    sq = torch.zeros(b, dtype=grads["psi/enc0"].dtype)
    for name in ("psi/enc0", "psi/enc1", "psi/enc2", "phi/prior0", "phi/prior1"):
        if name in grads:
            sq = sq + sum(linear_sq_norms(acts[name], grads[name]))
    for l in range(len(algo.sizes)):
        name = f"phi/dec{l}"
        g = grads[name]
        w_sq, _ = linear_sq_norms(acts[name], g * scales[name] if hyper else g)
        sq = sq + w_sq + g.sum(1).square().sum(-1)
    if hyper:
        v = grads["m"]
        p = v @ phi["hyper1.w"] * (1 - hid**2)  # ∂L_i/∂(W₀c + b₀) through the shared use
        a1, g1, a0, g0 = hid[None, None], v[:, None], code[None, None], p[:, None]
        code_grad = p @ phi["hyper0.w"] + (grads["phi/prior0"] @ phi["prior0.w"])[:, :c.code_dim]
        if lip:
            a1 = torch.cat([a1.expand(b, 1, -1), acts["probe1"][:, None]], 1)
            g1 = torch.cat([g1, grads["probe1"][:, None]], 1)
            a0 = torch.cat([a0.expand(b, 1, -1), acts["probe0"][:, None]], 1)
            g0 = torch.cat([g0, grads["probe0"][:, None]], 1)
            code_grad = code_grad + grads["probe0"] @ phi["hyper0.w"]
        sq = sq + sum(linear_sq_norms(a1, g1)) + sum(linear_sq_norms(a0, g0)) + code_grad.square().sum(-1)
    return sq
