"""Clipping, noise and the two prototype releases of VPDR (IGPP and VPP), as tensor functions.

Neighbouring relations (``RELATIONS``):

- ``add-remove`` (the default; the relation of DP-SGD's Poisson accounting): two local datasets are
  neighbours when one holds one example more than the other. Then no exact count and no class set may
  leave a client: a release covers *every* class ``0..C-1`` (a class the client lacks has clean
  statistic 0) and carries noisy per-class counts next to the features.
- ``replace-one`` (the VPDR paper's analysis): one example is replaced by another *of the same class*.
  Class counts and the set of classes a client holds are the same on both and are published exactly
  (not protected); a release covers the classes the client holds.

Sensitivity of the feature part, by ``SENSITIVITY_RULES`` (:func:`feature_sensitivity`):

- ``trained-features`` (the default): valid whatever the feature map, also when the client trained it
  on the same data just before the release (every personalised host here): every class mean of clipped
  features lies in the R-ball (0, for an absent class, too) and so moves by at most ``2R``; all ``C``
  released classes may move at once, so the L2 sensitivity is ``2R·√C`` (``C``: every class under
  add/remove, the classes held under replace-one).
- ``fixed-features``: the feature map is not itself a function of the client's data (e.g. the
  ``linear`` model on frozen public embeddings; refused elsewhere when a configuration is resolved).
  Under replace-one the class mean of clipped features moves by at most ``2R / n_c`` and one class
  only changes (the VPDR paper). Under add/remove the release carries per-class *sums* of clipped
  features instead (one example moves one class sum by at most ``R``), and the prototype is the
  post-processing ``noisy sum / max(noisy count, 1)``.

Under add/remove the counts have L2 sensitivity 1 (one count moves by one).

**One release is one Gaussian mechanism of multiplier σ.** A release is calibrated to one σ (one
``GaussianEvent(σ)``; VPP's private selection adds its pure-DP event), and under add/remove its precision ``1/σ²`` is
split: the features get multiplier ``σ_f = σ/√(1−f)``, the counts ``σ_n = σ/√f``, with
``f = count_fraction``. Proof: divide the features by ``σ_f Δ_f`` and the counts by ``σ_n Δ_n``
(``Δ``: their sensitivities). The rescaled release is its clean statistic plus N(0, I) noise, and a
neighbour moves that clean statistic by at most
``√(‖δ_f‖²/(σ_f Δ_f)² + ‖δ_n‖²/(σ_n Δ_n)²) ≤ √((1−f)/σ² + f/σ²) = 1/σ``. A Gaussian mechanism of
sensitivity ``1/σ`` and unit noise is one of sensitivity 1 and noise σ, whatever the direction of the
move, so the pair costs exactly ``GaussianEvent(σ)``. VPP's groups split the features' precision the
same way (:func:`vpp_group_noise`, applied at ``σ_f``). Under replace-one nothing is split (``σ_f = σ``).

A class with a single example is released like any other (sensitivity ``2R`` under ``fixed-features``
and replace-one: no special case, its noise is simply large).

Randomness comes from a caller's ``torch.Generator`` so simulations are reproducible; a deployment
that needs cryptographic noise should draw from the operating system's generator instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from protofl.privacy.accounting import Event, GaussianEvent, PureDpEvent

SENSITIVITY_RULES = ("fixed-features", "trained-features")
RELATIONS = ("add-remove", "replace-one")

__all__ = [
    "CleanSpread",
    "RELATIONS",
    "SENSITIVITY",
    "SENSITIVITY_RULES",
    "PrototypeRelease",
    "ReleaseSettings",
    "SensitivityRule",
    "SELECTIONS",
    "SelectionRule",
    "anova_scores",
    "broadcast_top_k",
    "clip_groups",
    "clip_rows",
    "gaussian_noise",
    "igpp_release",
    "igpp_release_batch",
    "laplace_noise",
    "private_top_k",
    "selection_diagnostics",
    "selection_diagnostics_batch",
    "sensitivity_rule",
    "soft_clip",
    "split_multiplier",
    "vpp_group_noise",
    "vpp_release",
    "vpp_release_batch",
]


# --------------------------------------------------------------------------------------------------
# Clipping


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale every row to L2 norm at most ``bound`` (rows already inside are unchanged). The bound is
    tightened by ``(d + 4)`` roundoffs of ``x``'s precision, so the rounding of the computed norm and of the
    product never puts a clipped row outside it (without it about one clipped row in six lands a roundoff
    or two above the bound)."""
    roundoff = torch.finfo(x.dtype).eps / 2 if x.is_floating_point() else 2.0**-53
    norms = x.norm(dim=1, keepdim=True)
    return x * torch.clamp(bound * (1.0 - (x.shape[1] + 4) * roundoff) / norms.clamp_min(1e-12), max=1.0)


def clip_groups(x: torch.Tensor, groups: list[torch.Tensor], bounds: list[float]) -> torch.Tensor:
    """Clip each row's coordinates ``groups[i]`` to L2 norm at most ``bounds[i]`` independently."""
    out = x.clone()
    for index, bound in zip(groups, bounds):
        if len(index):
            out[:, index] = clip_rows(x[:, index], bound)
    return out


def soft_clip(z: torch.Tensor, bound: float, tau: float) -> torch.Tensor:
    """DCR's differentiable clip ``z · min(1, R / (‖z‖ + τR))``: a clipped norm ``‖z‖R / (‖z‖ + τR)``
    stays below ``R``, and the gradient keeps flowing through clipped features."""
    return z * torch.clamp(bound / (z.norm(dim=1, keepdim=True) + tau * bound), max=1.0)


# --------------------------------------------------------------------------------------------------
# Noise


def gaussian_noise(
    shape: tuple[int, ...], std: torch.Tensor | float, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """N(0, std²) noise (``std`` broadcast against ``shape``). ``generator``: one generator, or one per row of
    ``shape[0]`` (the clients of a batched release): row k is drawn from ``generator[k]`` alone, the same
    values as a call of ``shape[1:]`` on that generator (:func:`_draws`), so each client's noise is what a
    release of that client alone draws."""
    if isinstance(generator, torch.Generator):
        draws = torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)
        return draws * torch.as_tensor(std, dtype=torch.float64, device=draws.device)
    draws = _draws(torch.randn, tuple(shape[1:]), generator)  # on the CPU: scaled in NumPy, the same products
    return torch.from_numpy(draws.numpy() * np.asarray(std, dtype=np.float64))


def laplace_noise(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) noise by inversion of the CDF."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device).numpy()
    return torch.from_numpy(_laplace_of_uniform(u, scale))


def _laplace_of_uniform(u: np.ndarray, scale: float) -> np.ndarray:
    """Laplace(0, scale) values from uniform [0, 1) draws ``u`` (inversion of the CDF, elementwise):
    ``-scale · sign(u − ½) · log1p(−2 · min(|u − ½|, ½ − 10⁻¹⁶))``, in place on two arrays."""
    shape = np.shape(u)
    u = np.atleast_1d(u) - 0.5  # an array even for a 0-d input, for the in-place steps below
    magnitude = np.abs(u)
    np.minimum(magnitude, 0.5 - 1e-16, out=magnitude)
    magnitude *= -2
    np.log1p(magnitude, out=magnitude)
    out = np.sign(u)
    out *= -scale
    out *= magnitude
    return out.reshape(shape)


def _draws(
    draw: Callable[..., torch.Tensor], shape: tuple[int, ...], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """``draw`` (``torch.rand`` or ``torch.randn``) of ``shape`` from every generator in turn, client k's into
    row k of one float64 CPU tensor (K, *shape): the same values as a call of ``draw(shape)`` per generator.
    Each row is filled in place by the draw's own method (``uniform_``, ``normal_``: what ``torch.rand`` and
    ``torch.randn`` fill a fresh tensor with; a row of the stack is contiguous, laid out as ``shape``), a
    cheaper call than the function with its arguments."""
    fill = _FILLS[draw]
    out = torch.empty((len(generators), *shape), dtype=torch.float64, device="cpu")  # releases run on the CPU
    for row, generator in zip(out.unbind(), generators):
        fill(row, generator=generator)
    return out


#: The in-place fill of each draw of :func:`_draws`.
_FILLS: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {
    torch.rand: torch.Tensor.uniform_,
    torch.randn: torch.Tensor.normal_,
}


# --------------------------------------------------------------------------------------------------
# VPP's pieces


def anova_scores(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-dimension one-way ANOVA F score of the features ``z`` (N, d) across the classes in ``y``:
    between-class mean square over (within-class mean square + ζ), ζ = 1e-3 × median of the
    between-class term. Zero everywhere when fewer than two classes or no within-class degrees of
    freedom are present (nothing to rank)."""
    return torch.from_numpy(_anova(_Stack.of(z[None], y[None])))[0]


#: float32's unit roundoff u: a float32 sum of ``m`` squares is within about ``m·u`` (relative) of the exact one.
_F32_ROUNDOFF = 2.0**-24


def _float32_margin(d: int) -> float:
    """The factor on a clip bound that keeps a row clipped by a float32 norm of ``d`` coordinates inside the
    bound itself: the computed squared norm is within ``d`` roundoffs of the true one, so the true norm of
    the scaled row is within half of that (plus the scale's own rounding) of the bound."""
    return 1.0 - (d + 4) * _F32_ROUNDOFF


@dataclasses.dataclass(frozen=True, eq=False)
class _Stack:
    """The train features of ``K`` clients as one padded program (a single client is ``K = 1``): ``x``
    (K, n, d) float32 (the features' own precision), with the padding rows and every row that holds a
    non-finite value set to zero (see :meth:`of`); ``labels`` (K, n) the rows' classes, ``real`` (K, n) the
    clients' own labelled rows (not padding, no negative label: such rows are zero and in no class) and ``counts`` (K, C) the exact class counts; every client's per-class
    sums of its rows, each row scaled by a factor of its own (its clip), are one sparse product
    (:meth:`class_sums`); ``row_squares`` (K, n) is each row's squared norm. Squares are summed where they
    are needed (:meth:`group_squares`), never stored.

    The norms that decide a clip (row norms, group norms) are float32 sums, and a clip bound is tightened
    by :func:`_float32_margin` so that their rounding never lets a row out of it; the scaled rows are
    formed and added in float64 (:meth:`class_sums`), so that one row more or less moves a class sum by at
    most the bound (float32 additions would let the rounding of every later addition depend on it). The
    ANOVA (:meth:`spread`) runs in float64 on the same values (:attr:`x64`): its within-class sums of
    squares are a difference of two large sums."""

    x: np.ndarray
    labels: np.ndarray
    real: np.ndarray
    counts: np.ndarray
    row_squares: np.ndarray

    @classmethod
    def of(cls, z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None, num_classes: int = 0) -> _Stack:
        """From features ``z`` (K, n, d), labels ``y`` (K, n) and ``weight`` (K, n: nonzero on a client's
        rows, 0 on padding; ``None``: every row is real); ``num_classes``: at least this many classes.

        A row so large that its squared norm overflows float32 (a coordinate above about 1e19) is scaled, in
        float64, to norm 1e15 in its own direction (the clip then gives what it gives the row). A row that
        holds a non-finite value is set to zero: a feature map driven to overflow (one out-of-range
        example at a high learning rate can do it) would otherwise make the release NaN, and the server's
        rejection of that reply would tell it so, outside ε; a zero row is inside the R-ball, so the
        sensitivity is unchanged. The test reads the rows' squared norms, which the release computes anyway
        (no pass of its own)."""
        x = z.detach().numpy().astype(np.float32)  # a copy: zeroing rows below never touches ``z``
        labels = y.numpy()
        k, c = len(labels), max(num_classes, int(labels.max()) + 1 if labels.size else 0)
        real = labels >= 0  # every labelled row (labels are class indices)
        if weight is not None:
            real &= weight.detach().numpy() > 0
        x[~real] = 0.0  # padding (and unlabelled) rows count nowhere, the ANOVA's sums of squares included
        slots = np.arange(k)[:, None] * c + labels
        counts = np.bincount(slots[real], minlength=k * c).reshape(k, c)
        row_squares = np.einsum("knd,knd->kn", x, x).astype(np.float64)  # NaN or inf where a row is not finite
        bad = ~np.isfinite(row_squares)
        if bad.any():
            # A finite row whose float32 squares overflow keeps its direction at norm 1e15 (its float64 norm),
            # so that the clip gives what it gives the row itself; a row holding NaN or inf becomes zero.
            overflow = bad & np.isfinite(x).all(axis=-1)
            rows = x[overflow].astype(np.float64)
            x[overflow] = (rows * (1e15 / np.linalg.norm(rows, axis=-1, keepdims=True))).astype(np.float32)
            x[bad & ~overflow] = 0.0
            row_squares[bad] = np.einsum("nd,nd->n", x[bad], x[bad]).astype(np.float64)
        return cls(x, labels, real, counts, row_squares)

    def __len__(self) -> int:
        return self.x.shape[0]

    @functools.cached_property
    def x64(self) -> np.ndarray:
        """:attr:`x` in float64 (exactly), for the class sums and the ANOVA (computed once)."""
        return self.x.astype(np.float64)

    @functools.cached_property
    def by_class(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's rows of every class, in row order: ``(indptr, rows)`` of a (K·C) × (K·n) sparse
        indicator whose row ``k·C + c`` lists client k's real rows of class c (flat row indices, ascending);
        padding rows are in none."""
        k, c = self.counts.shape
        slots = (np.arange(k)[:, None] * c + self.labels).reshape(-1)
        rows = np.flatnonzero(self.real.reshape(-1))
        # a stable sort of the slots in their smallest integer type (numpy sorts 16-bit keys by radix)
        rows = rows[np.argsort(slots[rows].astype(np.min_scalar_type(max(k * c - 1, 0))), kind="stable")]
        indptr = np.zeros(k * c + 1, dtype=np.int64)
        np.cumsum(self.counts.reshape(-1), out=indptr[1:])
        return indptr, rows

    def class_sums(self, scales: np.ndarray | None = None) -> np.ndarray:
        """Every client's per-class sums (K, C, d) float64 of its rows, each row scaled by its factor in
        ``scales`` (K, n; ``None``: unscaled), i.e. of its rows clipped by those factors. One sparse product
        over every client: each class's scaled rows are formed in float64 and added one after the other in
        row order, so a client's sums are the same products and additions in the same order whether it is
        released alone or in a batch, whatever the padding."""
        k, n, d = self.x.shape
        c = self.counts.shape[1]
        indptr, rows = self.by_class
        data = np.ones(len(rows)) if scales is None else np.asarray(scales, dtype=np.float64).reshape(-1)[rows]
        # Added in float64 whatever the rows' precision: in float32 the rounding of every later addition
        # depends on the rows before it, so the sums of neighbouring data sets could differ by more than the
        # clip bound (by about n_c² float32 roundoffs of it); in float64 that excess is negligible.
        import scipy.sparse  # here: a training process that releases nothing need not import it

        table = scipy.sparse.csr_array((data, rows, indptr), shape=(k * c, k * n))
        return np.asarray(table @ self.x64.reshape(k * n, d), dtype=np.float64).reshape(k, c, d)

    def group_squares(self, groups: np.ndarray) -> np.ndarray:
        """Each row's squared norm over each of ``G`` groups of coordinates: ``groups`` (K, G, d) boolean
        gives (K, G, n) float64, every group's sum taken over its own coordinates (never a difference of
        sums), row by row in float32 (the same sum for a row whatever the batch)."""
        return np.einsum("knd,kgd->kgn", np.square(self.x), groups.astype(np.float32)).astype(np.float64)

    def spread(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(energy, within, n, c)``: per client and dimension the between-class energy
        ``Σ_c n_c (μ_cj − μ_j)²`` and the within-class sum of squares ``Σ_i x_ij² − Σ_c n_c μ_cj²`` of
        ``x`` (clamped at 0 against rounding), and per client its number of rows and of classes held.
        Two passes over the features (in float64): the class sums and the sums of squares."""
        counts = self.counts
        n = counts.sum(1)  # every real row is in exactly one class
        c = np.count_nonzero(counts, axis=1)
        x = self.x64
        sums = self.class_sums()
        means = sums / np.maximum(counts, 1)[:, :, None]
        grand = sums.sum(1) / np.maximum(n, 1)[:, None]
        energy = (counts[:, :, None] * (means - grand[:, None, :]) ** 2).sum(1)
        within = np.maximum(np.einsum("knd,knd->kd", x, x) - (sums * means).sum(1), 0.0)
        return energy, within, n, c


def _anova(stack: _Stack, spread: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """:func:`anova_scores` of every client of ``stack`` (K, d), in float64 numpy (a release runs it for
    the clients of a round: numpy's per-call cost is a fraction of torch's on these small arrays), from
    its :meth:`_Stack.spread` (computed here if not given). ζ takes the lower middle value, as
    ``torch.median``."""
    energy, within, n, c = spread if spread is not None else stack.spread()
    between = energy / np.maximum(c - 1, 1)[:, None]
    zeta = 1e-3 * np.sort(between, axis=1)[:, (between.shape[1] - 1) // 2]
    scores = between / np.maximum(within / np.maximum(n - c, 1)[:, None] + zeta[:, None], 1e-300)
    scores[(c < 2) | (n <= c)] = 0.0
    return scores


def private_top_k(scores: torch.Tensor, k: int, cap: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """``epsilon``-DP choice of ``k`` high-scoring dimensions, by peeling: ``k`` rounds of
    report-noisy-max on the scores clipped to ``[0, cap]`` (per-score sensitivity ``cap``), each with
    fresh Laplace noise of scale ``λ = 2k·cap/ε`` (ε/k-DP per round, Dwork & Roth, Claim 3.9). The
    VPDR spec adds noise once and takes the top k (one-shot) with the same λ; fresh noise per round is
    the variant whose guarantee is the textbook one. Returns the sorted chosen indices."""
    d = len(scores)
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if k == d:
        return torch.arange(d, device="cpu")
    return torch.from_numpy(_top_k(scores.detach().double().numpy(), k, cap, epsilon, generator))


def _top_k(scores: np.ndarray, k: int, cap: float, epsilon: float, generator: torch.Generator) -> np.ndarray:
    """:func:`private_top_k`'s peeling (``0 < k < d``): :func:`_peel` of one client."""
    return _peel(scores[None], k, cap, epsilon, [generator])[0]


def _top_k_batch(
    scores: np.ndarray, k: int, cap: float, epsilon: float, generators: Sequence[torch.Generator]
) -> list[np.ndarray]:
    """The peeling of ``K`` clients' scores (K, d) (``0 < k < d``), client i's noise from ``generators[i]``
    alone: :func:`_peel`'s sorted chosen indices, one array per client."""
    return list(_peel(scores, k, cap, epsilon, generators))


def _peel(scores: np.ndarray, k: int, cap: float, epsilon: float, generators: Sequence[torch.Generator]) -> np.ndarray:
    """Every client's peeling at once, as (K, k) sorted indices: all k rounds' noise in one draw per client
    (row j is round j's fresh noise, drawn in the same order as k draws of d); round j takes the highest
    noisy score of its row among the dimensions no earlier round took (ties to the lower index, as argmax),
    for every client in one argmax; the dimension it took is then struck (-inf) from every later round's
    row, so that a round reads its own row alone."""
    scale = 2 * k * cap / epsilon
    noisy = _laplace_of_uniform(_draws(torch.rand, (k, scores.shape[1]), generators).numpy(), scale)
    noisy += np.minimum(np.maximum(scores, 0), cap)[:, None, :]
    clients = np.arange(len(generators))
    picks = np.empty((len(generators), k), dtype=np.int64)
    for j in range(k):  # every client's round j at once
        picks[:, j] = noisy[:, j, :].argmax(axis=1)
        noisy[clients, j + 1 :, picks[:, j]] = -np.inf
    picks.sort(axis=1)
    return picks


def broadcast_top_k(prototypes: torch.Tensor | np.ndarray, k: int) -> np.ndarray | None:
    """The top ``k`` dimensions (sorted indices; ties to the lower index) by the between-class variance
    of ``prototypes`` (one row per class: the global prototypes a client received), or ``None`` when
    fewer than two rows are given (nothing to rank). Post-processing of what the server published: it
    reads no client data and costs nothing."""
    table = np.asarray(prototypes, dtype=np.float64)
    d = table.shape[1]
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    if table.shape[0] < 2:
        return None
    variance = table.var(axis=0)
    return np.sort(np.argsort(-variance, kind="stable")[:k]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """How VPP picks its discriminative group A: ``text`` says it (summary.json), ``private``: whether it
    reads the client's data (then it is a pure-DP selection that costs ``selection_fraction`` of ε;
    otherwise it is post-processing of the broadcast and the whole budget goes to the Gaussian part)."""

    text: str
    private: bool


#: The rule of each ``privacy.selection``.
SELECTIONS: dict[str, SelectionRule] = {
    "private-anova": SelectionRule(
        "top-k of the client's ANOVA F scores capped at score_cap, by pure-DP peeling (the VPDR paper); "
        "costs selection_fraction of epsilon",
        private=True,
    ),
    "broadcast-variance": SelectionRule(
        "top-k by the between-class variance of the global prototypes the client received (post-processing "
        "of the broadcast, no epsilon); k = d (IGPP) in a round with fewer than two global prototypes",
        private=False,
    ),
}


def selection_diagnostics(z: torch.Tensor, y: torch.Tensor, selected: torch.Tensor) -> dict[str, float]:
    """What a selection ``selected`` (k sorted indices) is worth on the client's CLEAN data (diagnostics
    from private data: they stay with the client unless it shares them): ``vpp_selected_energy``, the
    share of the between-class energy ``Σ_c n_c (μ_cj − μ_j)²`` of the class means in the selected
    dimensions, and ``vpp_overlap``, the share of the true top-k by the clean ANOVA F score that was
    selected. NaN when the client has no between-class energy (fewer than two classes, or features
    that do not differ between them)."""
    return selection_diagnostics_batch(z[None], y[None], None, [selected])[0]


def selection_diagnostics_batch(
    z: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    selected: list[torch.Tensor],
    clean: Sequence[CleanSpread | None] | None = None,
) -> list[dict[str, float]]:
    """:func:`selection_diagnostics` of ``K`` clients at once: features ``z`` (K, n, d), labels ``y``
    (K, n), ``weight`` (K, n; 0 on padding, ``None``: no padding) and each client's selection. ``clean``:
    each client's :class:`CleanSpread` of these features where its release computed it (a private
    selection, :attr:`PrototypeRelease.clean`): then the features are not read again."""
    if clean is None or any(spread is None for spread in clean):
        stack = _Stack.of(z, y, weight)
        clean = CleanSpread.of_stack(stack)
    out = []
    for spread, chosen in zip(clean, selected):
        assert spread is not None
        total = spread.energy.sum()
        if spread.classes < 2 or not total > 0:  # e.g. features collapsed to zero: nothing to rank
            out.append({"vpp_selected_energy": math.nan, "vpp_overlap": math.nan})
            continue
        picked = chosen.numpy()
        top = np.argsort(-spread.scores, kind="stable")[: len(picked)]
        out.append(
            {
                "vpp_selected_energy": float(spread.energy[picked].sum() / total),
                "vpp_overlap": len(np.intersect1d(top, picked)) / len(picked),
            }
        )
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class CleanSpread:
    """What a client's clean (unclipped, noiseless) features say about each dimension, for the selection's
    diagnostics (private data: it stays with the client): the between-class energy ``Σ_c n_c (μ_cj − μ_j)²``
    (d,), the ANOVA F scores (d,) and the number of classes held."""

    energy: np.ndarray
    scores: np.ndarray
    classes: int

    @staticmethod
    def of_stack(stack: _Stack, spread: tuple[np.ndarray, ...] | None = None) -> list[CleanSpread]:
        """Every client's of ``stack`` (from its :meth:`_Stack.spread`, computed here if not given)."""
        spread = spread if spread is not None else stack.spread()
        energy, _, _, c = spread
        scores = _anova(stack, spread)
        return [CleanSpread(e, s, int(n)) for e, s, n in zip(energy, scores, c.tolist())]


def vpp_group_noise(d: int, k: int, noise_multiplier: float) -> tuple[float, float, float, float]:
    """``(κ_A, κ_B, s_A, s_B)``: VPP's clipping fractions and the noise multipliers of the two groups
    (noise std of group g = ``s_g × Δ``). With ``w_A = κ_B / (κ_A + κ_B)``, ``w_B = 1 − w_A`` and
    ``s_g = σ κ_g / √w_g``, ``κ_A²/s_A² + κ_B²/s_B² = 1/σ²``: the release is exactly as private as the
    isotropic Gaussian mechanism with multiplier σ. With an empty group B (k = d) it is IGPP."""
    kappa_a, kappa_b = math.sqrt(k / d), math.sqrt((d - k) / d)
    if k == d:
        return 1.0, 0.0, noise_multiplier, 0.0
    w_a = kappa_b / (kappa_a + kappa_b)
    w_b = 1 - w_a
    return kappa_a, kappa_b, noise_multiplier * kappa_a / math.sqrt(w_a), noise_multiplier * kappa_b / math.sqrt(w_b)


# --------------------------------------------------------------------------------------------------
# Releases


@dataclasses.dataclass(frozen=True)
class SensitivityRule:
    """The L2 sensitivity of a release's feature part under one rule and one relation: ``text`` says it
    (summary.json's privacy statement), ``delta(R, counts, released)`` gives it per released class
    (``counts``: the exact counts of the released classes, ``released``: how many classes are released),
    and ``sums``: whether the feature part is the per-class sums (else the per-class means)."""

    text: str
    #: ``delta(R, counts, released)``: per released class, for one client's counts (C,) or many (K, C).
    delta: Callable[[float, np.ndarray, int], np.ndarray]
    sums: bool = False


def _per_class(value: Callable[[float, int], float]) -> Callable[[float, np.ndarray, int], np.ndarray]:
    return lambda bound, counts, released: np.full(np.shape(counts), value(bound, released))


#: The rule of each ``(privacy.sensitivity, privacy.relation)``.
SENSITIVITY: dict[tuple[str, str], SensitivityRule] = {
    ("trained-features", "add-remove"): SensitivityRule(
        "every class mean of clipped features (0 for a class the client lacks) lies in the R-ball: "
        "2R·sqrt(C) over the C classes of the task, valid whatever the feature map; counts: 1",
        _per_class(lambda bound, released: 2 * bound * math.sqrt(released)),
    ),
    ("trained-features", "replace-one"): SensitivityRule(
        "every class mean of clipped features lies in the R-ball: 2R·sqrt(C) over the C classes the "
        "client holds, valid whatever the feature map",
        _per_class(lambda bound, released: 2 * bound * math.sqrt(released)),
    ),
    ("fixed-features", "add-remove"): SensitivityRule(
        "per-class sums of clipped features under a feature map no client trains: one example moves one "
        "class sum by at most R; counts: 1; prototypes are noisy sum / max(noisy count, 1)",
        _per_class(lambda bound, released: bound),
        sums=True,
    ),
    ("fixed-features", "replace-one"): SensitivityRule(
        "per-class means of clipped features under a feature map no client trains: 2R/n_c for class c "
        "(one class changes)",
        lambda bound, counts, released: 2 * bound / counts,
    ),
}


def sensitivity_rule(sensitivity: str, relation: str) -> SensitivityRule:
    """The rule of ``sensitivity`` under ``relation`` (ValueError naming the valid ones)."""
    if sensitivity not in SENSITIVITY_RULES:
        raise ValueError(f"unknown sensitivity rule {sensitivity!r}; valid: {', '.join(SENSITIVITY_RULES)}")
    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; valid: {', '.join(RELATIONS)}")
    return SENSITIVITY[sensitivity, relation]


def split_multiplier(noise_multiplier: float, count_fraction: float) -> tuple[float, float]:
    """``(σ_f, σ_n) = (σ/√(1−f), σ/√f)``: the multipliers of the features and of the counts of an
    add/remove release at σ whose counts get the share ``f`` of its precision; ``1/σ_f² + 1/σ_n² = 1/σ²``
    (the module docstring's proof)."""
    if not 0 < count_fraction < 1:
        raise ValueError(f"count_fraction must be in (0, 1), got {count_fraction}")
    return noise_multiplier / math.sqrt(1 - count_fraction), noise_multiplier / math.sqrt(count_fraction)


@dataclasses.dataclass(frozen=True, eq=False)
class PrototypeRelease:
    """What a client may publish: the released classes (every class under add/remove, the held ones
    under replace-one), their noisy prototypes and counts (noisy float64 under add/remove, exact int64
    under replace-one), plus (kept local) the noise standard deviation of the feature statistic per
    class and coordinate, that of the counts (``count_std``, 0 under replace-one), the noisy feature
    statistic itself (``statistic``: per-class means, or sums under fixed-features and add/remove), the
    selected group A (VPP) and the accounting events the release cost."""

    classes: torch.Tensor
    prototypes: torch.Tensor
    counts: torch.Tensor
    noise_std: torch.Tensor
    events: tuple[tuple[Event, int], ...]
    selected: torch.Tensor | None = None
    count_std: float = 0.0
    statistic: torch.Tensor | None = None
    #: (kept local) the clean features' spread the private selection ranked (``None`` for a public
    #: selection or none), for the selection's diagnostics (:func:`selection_diagnostics_batch`).
    clean: CleanSpread | None = None


def _release(
    sums: np.ndarray,
    stack: _Stack,
    settings: ReleaseSettings,
    multipliers: np.ndarray,
    events: tuple[tuple[Event, int], ...],
    generators: Sequence[torch.Generator],
    selected: torch.Tensor | None = None,
    clean: Sequence[CleanSpread] | None = None,
) -> list[PrototypeRelease]:
    """The releases of the ``K`` clients of ``stack`` from the per-class sums ``sums`` (K, C, d) of their
    clipped features (padding rows left out): per-class statistic plus noise of std ``Δ_c × multipliers[k]`` (per
    coordinate, at σ_f), and, under add/remove (σ_n), every class ``0..C-1`` with noisy counts; under
    replace-one, the held classes and exact counts. Client k's noise comes from ``generators[k]`` alone,
    its features' first, then its counts': the same draws as a release of that client alone.
    ``selected``: each client's group A (K, k), or ``None``; ``clean``: each client's :class:`CleanSpread`
    where a private selection computed it."""
    rule, num_classes, bound = settings.rule, settings.num_classes, settings.bound
    sigma_n = settings.multipliers[1]
    counts = stack.counts
    chosen = [None] * len(stack) if selected is None else selected.unbind()
    spreads: Sequence[CleanSpread | None] = [None] * len(stack) if clean is None else clean
    if sigma_n is None:  # the held classes of each client: their number differs between clients
        out = []
        for k, generator in enumerate(generators):
            classes = np.flatnonzero(counts[k])
            held = counts[k, classes]
            std = torch.from_numpy(rule.delta(bound, held, len(classes))[:, None] * multipliers[k][None, :])
            statistic = sums[k, classes] / held[:, None]
            noisy = torch.from_numpy(statistic) + gaussian_noise(tuple(statistic.shape), std, generator)
            out.append(
                PrototypeRelease(
                    torch.from_numpy(classes),
                    noisy.float(),
                    torch.from_numpy(held),
                    std,
                    events,
                    chosen[k],
                    0.0,
                    noisy,
                    spreads[k],
                )
            )
        return out
    statistic = sums if rule.sums else sums / np.maximum(counts, 1)[:, :, None]
    std = torch.from_numpy(rule.delta(bound, counts, num_classes)[:, :, None] * multipliers[:, None, :])
    # each client's features' draws, then its counts', from its own generator (releases run on the CPU); the
    # arithmetic after the draws in NumPy (its per-call cost is a fraction of torch's on these small arrays)
    noise = gaussian_noise(tuple(statistic.shape), std, generators).numpy()
    count_noise = gaussian_noise(tuple(counts.shape), sigma_n, generators).numpy()
    noisy = statistic + noise
    noisy_counts = counts + count_noise
    prototypes = (noisy / np.maximum(noisy_counts, 1.0)[:, :, None] if rule.sums else noisy).astype(np.float32)
    every = torch.arange(num_classes, device="cpu")
    return [
        PrototypeRelease(every, prototype, count, s, events, a, sigma_n, statistic, spread)
        for prototype, count, s, a, statistic, spread in zip(
            map(torch.from_numpy, prototypes),
            map(torch.from_numpy, noisy_counts),
            std.unbind(),
            chosen,
            map(torch.from_numpy, noisy),
            spreads,
        )
    ]


@dataclasses.dataclass(frozen=True)
class ReleaseSettings:
    """What fixes a prototype release besides the data and the noise: the number of classes of the task,
    the clip bound R, the noise multiplier σ of the release, the sensitivity rule and the neighbouring
    relation (:data:`SENSITIVITY`), and under add/remove the counts' share ``count_fraction`` of the
    precision (:func:`split_multiplier`). Invalid settings raise ValueError naming the valid ones."""

    num_classes: int
    bound: float
    noise_multiplier: float
    sensitivity: str = "trained-features"
    relation: str = "add-remove"
    count_fraction: float = 0.1

    def __post_init__(self) -> None:
        sensitivity_rule(self.sensitivity, self.relation)
        _multipliers(self.noise_multiplier, self.relation, self.count_fraction)

    @property
    def rule(self) -> SensitivityRule:
        return sensitivity_rule(self.sensitivity, self.relation)

    @property
    def multipliers(self) -> tuple[float, float | None]:
        """``(σ_f, σ_n)``: split under add/remove, ``(σ, None)`` under replace-one."""
        return _multipliers(self.noise_multiplier, self.relation, self.count_fraction)


def _multipliers(noise_multiplier: float, relation: str, count_fraction: float) -> tuple[float, float | None]:
    """``(σ_f, σ_n)`` of a release at σ: split under add/remove, ``(σ, None)`` under replace-one."""
    if relation == "replace-one":
        return noise_multiplier, None
    return split_multiplier(noise_multiplier, count_fraction)


def _clip_scale(bound: float | np.ndarray, row_squares: np.ndarray, d: int) -> np.ndarray:
    """The factor that scales a row of squared norm ``row_squares`` (a float32 sum over ``d`` coordinates) to
    norm at most ``bound`` (1 for a row already inside; the bound tightened by :func:`_float32_margin`)."""
    return np.minimum(bound * _float32_margin(d) / np.maximum(np.sqrt(row_squares), 1e-12), 1.0)


def igpp_release(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    bound: float,
    noise_multiplier: float,
    generator: torch.Generator,
    sensitivity: str = "trained-features",
    relation: str = "add-remove",
    count_fraction: float = 0.1,
) -> PrototypeRelease:
    """IGPP: clip every feature to norm ``bound``, take the per-class statistic (:data:`SENSITIVITY`) and
    add N(0, (σ_f Δ)² I), plus (add/remove) N(0, σ_n²) on every class count; costs one Gaussian release
    at σ (the module docstring). :func:`igpp_release_batch` of this one client."""
    settings = ReleaseSettings(num_classes, bound, noise_multiplier, sensitivity, relation, count_fraction)
    return igpp_release_batch(z[None], y[None], None, settings, [generator])[0]


def igpp_release_batch(
    z: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    settings: ReleaseSettings,
    generators: Sequence[torch.Generator],
) -> list[PrototypeRelease]:
    """:func:`igpp_release` of ``K`` clients as one program: features ``z`` (K, n, d), labels ``y``
    (K, n), ``weight`` (K, n: 0 on padding rows; ``None``: none) and each client's generator, from
    which that client's noise alone is drawn (so each release equals the client's own)."""
    stack = _stack_of(z, y, weight, settings.num_classes, generators)
    multipliers = np.full((len(stack), stack.x.shape[2]), settings.multipliers[0])
    events = ((GaussianEvent(settings.noise_multiplier), 1),)
    sums = stack.class_sums(_clip_scale(settings.bound, stack.row_squares, stack.x.shape[2]))
    return _release(sums, stack, settings, multipliers, events, generators)


def _stack_of(
    z: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    num_classes: int,
    generators: Sequence[torch.Generator],
) -> _Stack:
    if z.dim() != 3 or y.shape != z.shape[:2] or len(generators) != z.shape[0]:
        raise ValueError(
            f"a batched release takes features (K, n, d), labels (K, n) and K generators; got {tuple(z.shape)}, "
            f"{tuple(y.shape)} and {len(generators)}"
        )
    return _Stack.of(z, y, weight, num_classes)


def vpp_release(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    bound: float,
    noise_multiplier: float,
    rho: float,
    score_cap: float,
    selection_epsilon: float | None,
    generator: torch.Generator,
    sensitivity: str = "trained-features",
    relation: str = "add-remove",
    count_fraction: float = 0.1,
    selected: torch.Tensor | np.ndarray | None = None,
) -> PrototypeRelease:
    """VPP: a top-⌈ρd⌉ group A of discriminative dimensions, groupwise clipping to ``R κ_A`` and
    ``R κ_B``, the per-class statistic, and group noise ``s_A Δ`` on A, ``s_B Δ`` on B
    (:func:`vpp_group_noise` at σ_f), plus (add/remove) noisy counts at σ_n.

    Group A is the private selection of the client's ANOVA scores (``selection_epsilon``-DP; the release
    then costs one pure-DP selection and one Gaussian release at σ) or, given ``selected`` (sorted
    indices chosen without the client's data, e.g. :func:`broadcast_top_k`; its length is k), that one
    (the release then costs the Gaussian release at σ only; with every dimension selected it is IGPP).
    :func:`vpp_release_batch` of this one client."""
    settings = ReleaseSettings(num_classes, bound, noise_multiplier, sensitivity, relation, count_fraction)
    releases = vpp_release_batch(
        z[None], y[None], None, settings, [generator], rho, score_cap, selection_epsilon, selected
    )
    return releases[0]


def vpp_release_batch(
    z: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    settings: ReleaseSettings,
    generators: Sequence[torch.Generator],
    rho: float,
    score_cap: float,
    selection_epsilon: float | None,
    selected: torch.Tensor | np.ndarray | None = None,
) -> list[PrototypeRelease]:
    """:func:`vpp_release` of ``K`` clients as one program (arguments as :func:`igpp_release_batch`): one
    ANOVA over every client for a private selection, every client's peeling at once (each with its own
    generator), one groupwise clipping; a public ``selected`` serves every client."""
    stack = _stack_of(z, y, weight, settings.num_classes, generators)
    x = stack.x
    d = x.shape[2]
    clean = None
    events: tuple[tuple[Event, int], ...] = ((GaussianEvent(settings.noise_multiplier), 1),)
    if selected is None:
        k = math.ceil(rho * d)
        if not 0 < k <= d:
            raise ValueError(f"k must be in [1, {d}], got {k}")
        if selection_epsilon is None or not selection_epsilon > 0:
            raise ValueError(f"a private selection needs selection_epsilon > 0, got {selection_epsilon}")
        if k == d:
            chosen = np.broadcast_to(np.arange(d), (len(stack), d))
        else:
            clean = CleanSpread.of_stack(stack)
            scores = np.stack([spread.scores for spread in clean])
            chosen = np.stack(_top_k_batch(scores, k, score_cap, selection_epsilon, generators))
        events = ((PureDpEvent(selection_epsilon), 1), *events)
    else:
        public = np.unique(np.asarray(selected, dtype=np.int64))
        k = len(public)
        if not (0 < k == len(selected) and 0 <= public[0] and public[-1] < d):
            raise ValueError(f"selected must be distinct dimensions in [0, {d}), got {len(selected)} of them")
        chosen = np.broadcast_to(public, (len(stack), k))
    in_a = np.zeros((len(stack), d), dtype=bool)
    in_a[np.arange(len(stack))[:, None], chosen] = True
    kappa_a, kappa_b, s_a, s_b = vpp_group_noise(d, k, settings.multipliers[0])
    # Groupwise clipping: each row's group-A coordinates to norm R κ_A, its group-B ones to R κ_B; every
    # coordinate's class sum taken from its group's clipped rows. Each group's norm is summed over its own
    # coordinates: the row's norm minus group A's would lose group B to rounding where group A is large, and
    # release it unclipped.
    norms = stack.group_squares(np.stack([in_a, ~in_a], 1))
    scales = _clip_scale(np.array([kappa_a, kappa_b])[None, :, None] * settings.bound, norms, d)  # (K, 2, n)
    sums = np.where(in_a[:, None, :], stack.class_sums(scales[:, 0]), stack.class_sums(scales[:, 1]))
    return _release(
        sums, stack, settings, np.where(in_a, s_a, s_b), events, generators, torch.from_numpy(np.array(chosen)), clean
    )
