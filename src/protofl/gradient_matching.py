"""Gradient matching (Zhao et al., ICLR 2021, Dataset Condensation): learn synthetic tensors whose
loss gradients match target gradients. The building block of CReFF's federated features and of
FedHPro's hyper-prototype step.

- :data:`DISTANCES` / :func:`gradient_distance`: distances between two lists of gradient tensors,
  chosen by name (``layerwise-cos``, ``cos``, ``mse``, ``coordinate``).
- :func:`head_gradients`: ``[dW, db]`` of the mean cross-entropy of a linear head on features ``z``
  (clients on real features, the server on synthetic ones; differentiable w.r.t. ``z``).
- :func:`input_gradients`: the mean over samples of ``d CE(head(z_i), y_i) / d z_i`` (the gradient
  w.r.t. the inputs themselves, as FedHPro's hyper-prototype step needs).
- :func:`match_synthetic`: generic SGD on per-class synthetic tensors so that ``grad_fn(c, S_c)``
  matches per-class targets; :func:`match_features` is its head-gradient special case (CReFF).

Everything here is deterministic: no global RNG is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F

Grads = Sequence[torch.Tensor]

#: Added to the product of norms in the cosine-type distances (as in Dataset Condensation).
EPS = 1e-6


def _pairs(grads_a: Grads, grads_b: Grads):
    if len(grads_a) != len(grads_b):
        raise ValueError(f"gradient lists differ in length: {len(grads_a)} vs {len(grads_b)}")
    for a, b in zip(grads_a, grads_b):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        yield a, b


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor as rows: a weight ``(out, ...)`` gives one row per output unit; a vector (bias,
    feature gradient) or a scalar is one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def layerwise_cos_distance(grads_a: Grads, grads_b: Grads) -> torch.Tensor:
    """Dataset Condensation's distance: per tensor, Σ over output rows of ``1 − cos(a_row, b_row)``
    (a 1-D tensor such as a bias is one row); summed over the tensors."""
    total = None
    for a, b in _pairs(grads_a, grads_b):
        ra, rb = _rows(a), _rows(b)
        cos = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1) + EPS)
        term = (1 - cos).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device="cpu")  # no tensors: a CPU scalar adds anywhere


def cos_distance(grads_a: Grads, grads_b: Grads) -> torch.Tensor:
    """``1 − cos`` of the whole gradient, all tensors flattened and concatenated."""
    pairs = list(_pairs(grads_a, grads_b))
    a = torch.cat([p[0].reshape(-1) for p in pairs])
    b = torch.cat([p[1].reshape(-1) for p in pairs])
    return 1 - (a * b).sum() / (a.norm() * b.norm() + EPS)


def mse_distance(grads_a: Grads, grads_b: Grads) -> torch.Tensor:
    """Sum of squared differences over all coordinates of all tensors."""
    total = None
    for a, b in _pairs(grads_a, grads_b):
        term = ((a - b) ** 2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device="cpu")  # no tensors: a CPU scalar adds anywhere


def coordinate_distance(grads_a: Grads, grads_b: Grads) -> torch.Tensor:
    """Per-coordinate sign agreement: Σ_j ``1 − a_j b_j / (|a_j| |b_j| + 1e-6)`` over all coordinates
    (FedHPro's reference code uses it for the hyper-prototype step)."""
    total = None
    for a, b in _pairs(grads_a, grads_b):
        term = (1 - a * b / (a.abs() * b.abs() + EPS)).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), device="cpu")  # no tensors: a CPU scalar adds anywhere


#: Optimisers of the synthetic tensors (momentum applies to ``sgd`` only).
OPTIMIZERS = ("sgd", "adam")

DISTANCES: dict[str, Callable[[Grads, Grads], torch.Tensor]] = {
    "layerwise-cos": layerwise_cos_distance,
    "cos": cos_distance,
    "mse": mse_distance,
    "coordinate": coordinate_distance,
}


def gradient_distance(name: str, grads_a: Grads, grads_b: Grads) -> torch.Tensor:
    """The distance ``name`` (a key of :data:`DISTANCES`) between two gradient lists."""
    try:
        fn = DISTANCES[name]
    except KeyError:
        raise ValueError(f"unknown gradient distance {name!r}; valid: {', '.join(sorted(DISTANCES))}") from None
    return fn(grads_a, grads_b)


def _labels(labels_or_class: torch.Tensor | int, n: int, device) -> torch.Tensor:
    if isinstance(labels_or_class, torch.Tensor) and labels_or_class.dim() > 0:
        return labels_or_class.to(device=device, dtype=torch.long)
    return torch.full((n,), int(labels_or_class), dtype=torch.long, device=device)


def head_gradients(
    weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, labels_or_class: torch.Tensor | int
) -> list[torch.Tensor]:
    """``[dW, db]`` of ``mean_i CE(W z_i + b, y_i)`` for a linear head ``(W: C×d, b: C)``.

    Closed form (``G = (softmax(logits) − onehot(y)) / n``, ``dW = Gᵀ z``, ``db = Σ_i G_i``), equal to
    autograd's; it stays differentiable w.r.t. ``z`` (and ``W``, ``b``), so a distance on it can be
    back-propagated into synthetic features without ``create_graph``. ``labels_or_class`` is a label
    vector or one class id for all rows."""
    y = _labels(labels_or_class, len(z), z.device)
    logits = z @ weight.t() + bias
    g = (torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(z)
    return [g.t() @ z, g.sum(0)]


def input_gradients(
    weight: torch.Tensor,
    bias: torch.Tensor,
    z: torch.Tensor,
    labels_or_class: torch.Tensor | int,
    create_graph: bool = True,
) -> list[torch.Tensor]:
    """``[mean_i ∂CE(W z_i + b, y_i)/∂z_i]`` (a d-vector): the per-sample CE gradient w.r.t. each
    input row, averaged over rows. Differentiable w.r.t. ``z`` when ``create_graph``."""
    with torch.enable_grad():  # also under no_grad (e.g. evaluating a matching loss)
        if not z.requires_grad:
            z = z.detach().requires_grad_(True)
        y = _labels(labels_or_class, len(z), z.device)
        loss = F.cross_entropy(z @ weight.t() + bias, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [z], create_graph=create_graph)
    return [grad.mean(0)]


def match_synthetic(
    synthetic: Mapping[int, torch.Tensor],
    target_grads: Mapping[int, Grads],
    grad_fn: Callable[[int, torch.Tensor], list[torch.Tensor]],
    distance: str = "layerwise-cos",
    steps: int = 100,
    lr: float = 0.1,
    momentum: float = 0.0,
    optimizer: str = "sgd",
) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """SGD (or Adam, ``optimizer="adam"``) on per-class synthetic tensors ``S_c`` minimising
    ``Σ_c D(grad_fn(c, S_c), target_c)``.

    Only classes with a target are updated; all others are returned unchanged. Returns detached new
    tensors (the inputs are not modified) and ``{"match_distance_start", "match_distance_end"}`` (the
    summed distance before the first and after the last step)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown gradient distance {distance!r}; valid: {', '.join(sorted(DISTANCES))}")
    classes = sorted(c for c in target_grads if c in synthetic)
    leaves = {c: synthetic[c].detach().clone().requires_grad_(True) for c in classes}
    targets = {c: [t.detach() for t in target_grads[c]] for c in classes}
    out = {c: t.detach() for c, t in synthetic.items()}
    if not classes:
        return out, {"match_distance_start": 0.0, "match_distance_end": 0.0}
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    opt = (
        torch.optim.Adam(list(leaves.values()), lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(list(leaves.values()), lr=lr, momentum=momentum)
    )

    def total_distance() -> torch.Tensor:
        # ``classes`` is not empty here, so the sum is a tensor, never the start value 0
        return cast(torch.Tensor, sum(gradient_distance(distance, grad_fn(c, leaves[c]), targets[c]) for c in classes))

    start = None
    for _ in range(steps):
        loss = total_distance()
        if start is None:
            start = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(total_distance())
    if start is None:
        start = end
    out.update({c: leaves[c].detach() for c in classes})
    return out, {"match_distance_start": start, "match_distance_end": end}


def match_features(
    features: Mapping[int, torch.Tensor],
    target_grads: Mapping[int, Grads],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    distance: str = "layerwise-cos",
    steps: int = 100,
    lr: float = 0.1,
    momentum: float = 0.0,
) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """CReFF's federated-feature step: SGD on ``F_c`` (M×d per class) so that the head gradient
    ``∇_{W,b} mean CE(W F_c + b, c)`` matches ``target_grads[c] = [dW, db]``. Returns new detached
    features (classes without a target unchanged) and the distance before and after matching."""
    w, b = head_weight.detach(), head_bias.detach()
    return match_synthetic(
        features, target_grads, lambda c, f: head_gradients(w, b, f, c), distance, steps, lr, momentum
    )
