"""Why a VPP selection that selects does not raise the nearest-prototype accuracy: the distance, measured.

With the ``linear`` model (a linear head on frozen public-encoder embeddings, the ``fixed-features``
bound) no client trains the feature map, so the released prototypes do not depend on local training:
this script makes the releases of one round directly with the library's mechanisms
(:func:`protofl.privacy.mechanisms.igpp_release` / ``vpp_release``) on the clients of a VPDR benchmark
setting, aggregates them as FedProto's server does under ``bound_uploads`` (each noisy prototype projected
onto the R-ball, then the per-class mean weighted by the noisy counts clamped at 0), and classifies each
client's test embeddings by the nearest global prototype under two distances:

- ``euclidean``: the rule the hosts use (``personal_proto_acc``);
- ``noise-weighted``: each coordinate divided by its public noise scale (s_A on the selected group,
  s_B on the rest; :func:`protofl.privacy.mechanisms.vpp_group_noise`): a Mahalanobis distance under the
  mechanism's known noise. It needs the selection to be public (broadcast-variance: the selection is a
  function of the broadcast), not a private one (private-anova: each client's group is its secret).

Selections: ``random`` (what private-anova at the score cap is: a uniform k-subset, here drawn per
client), ``broadcast-variance`` (top-k by the between-class variance of the previous round's noisy IGPP
global prototypes, one selection for every client), ``clean top-k`` (the top-k by between-class energy
of the pooled clean data: not private, an upper bound on f) and ``clean top-k by energy / norm share``
(the k dimensions with the most between-class energy per unit of the clipped features' squared norm:
not private, what the explanation below says VPP needs). IGPP at the same σ is the reference. Also reports the
numbers behind the explanation: σ per coordinate on each group, the clean between-class distances, the
norm of the noise, f, and the share of the Euclidean score's variance that the noise's own norm carries.

    python benchmarks/vpp_distance.py                         # digits-domains, rho 0.3, eps 1 2 4 8
    python benchmarks/vpp_distance.py --setting fashion-mnist-dir1.0

Writes benchmarks/results/vpp_selection/distance_<setting>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import vpdr_privacy_utility as vpdr
from _common import RESULTS, command_line

from protofl.api import resolve_config
from protofl.privacy.accounting import PureDpEvent, calibrate_noise_multiplier
from protofl.privacy.mechanisms import broadcast_top_k, igpp_release, vpp_group_noise, vpp_release
from protofl.runner import prepare_data

SELECTION_FRACTION = 0.1  # the library's default share of ε for private-anova's selection


def clip(rows: torch.Tensor, bound: float) -> torch.Tensor:
    norm = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows * (bound / norm).clamp(max=1.0)


def aggregate(releases: list, bound: float, num_classes: int) -> torch.Tensor:
    """FedProto's server under ``bound_uploads`` and ``weighted`` aggregation: project, then weight by the
    noisy counts clamped at 0."""
    total = torch.zeros(num_classes, releases[0].prototypes.shape[1], dtype=torch.float64)
    weight = torch.zeros(num_classes, 1, dtype=torch.float64)
    for r in releases:
        w = r.counts.double().clamp_min(0)[:, None]
        total[r.classes] += w * clip(r.prototypes.double(), bound)
        weight[r.classes] += w
    return total / weight.clamp_min(1e-12)


def release(
    clients: list, num_classes: int, bound: float, sigma: float, rho: float, gens: list, picks: list | None = None
) -> list:
    """Every client's release of one round: IGPP (``picks`` None) or VPP with each client's public selection."""
    out = []
    for i, c in enumerate(clients):
        if picks is None:
            out.append(igpp_release(c.x_train, c.y_train, num_classes, bound, sigma, gens[i], "fixed-features"))
        else:
            out.append(
                vpp_release(
                    c.x_train,
                    c.y_train,
                    num_classes,
                    bound,
                    sigma,
                    rho,
                    0.1,
                    None,
                    gens[i],
                    "fixed-features",
                    selected=picks[i],
                )
            )
    return out


def accuracy(clients: list, protos: torch.Tensor, scale: torch.Tensor | None) -> float:
    """Mean over clients of the nearest-prototype accuracy on each client's test split; ``scale``: the
    per-coordinate divisor (None: Euclidean)."""
    accs = []
    for c in clients:
        x, p = c.x_test.double(), protos
        if scale is not None:
            x, p = x / scale, p / scale
        pred = torch.cdist(x, p).argmin(1)
        accs.append(float((pred == c.y_test).double().mean()))
    return statistics.fmean(accs)


def between_class_energy(clients: list, num_classes: int) -> torch.Tensor:
    x = torch.cat([c.x_train for c in clients]).double()
    y = torch.cat([c.y_train for c in clients])
    mu = x.mean(0)
    energy = torch.zeros(x.shape[1], dtype=torch.float64)
    for k in range(num_classes):
        m = y == k
        if m.any():
            energy += m.sum() * (x[m].mean(0) - mu) ** 2
    return energy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="digits-domains", choices=sorted(vpdr.SETTINGS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--rho", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=10, help="planned releases (sets σ)")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per cell")
    parser.add_argument(
        "--basis",
        type=int,
        default=0,
        help="release in the first N standardised coordinates of the public photo-crop PCA basis (a fixed "
        "public map; 0: the raw embeddings)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    config = resolve_config(vpdr.config(args.setting, "fedproto", "igpp", 1.0, 0, args.rounds, model="linear"))
    data = prepare_data(config)
    clients, num_classes = data.clients, data.num_classes
    if args.basis:
        from protofl.algorithms import ClientData
        from protofl.data.public_basis import public_basis

        basis = public_basis("photos", config.data.features, args.basis, config.data.image_size)
        clients = [
            ClientData(c.client_id, basis.project(c.x_train), c.y_train, basis.project(c.x_test), c.y_test)
            for c in clients
        ]
    bound = config.privacy.clip_bound
    d = clients[0].x_train.shape[1]
    k = math.ceil(args.rho * d)
    energy = between_class_energy(clients, num_classes)
    clean_top = np.sort(np.argsort(-energy.numpy())[:k])
    ka, kb, sa, sb = vpp_group_noise(d, k, 1.0)
    w_a = kb / (ka + kb)
    pooled = clip(torch.cat([c.x_train for c in clients]).double(), bound)
    norm_share = (pooled**2).sum(0) / (pooled**2).sum()  # share of the clipped features' squared norm
    # the k dimensions with the most between-class energy per unit of squared norm (clean: not private)
    ratio_top = np.sort(np.argsort(-(energy / energy.sum() / norm_share.clamp_min(1e-30)).numpy())[:k])
    clean = aggregate_clean(clients, num_classes, bound)
    gaps = torch.pdist(clean)
    lines = [
        f"`{command_line()}`: {args.setting}, linear model (fixed-features, add-remove), "
        f"{'public photo-crop PCA basis, standardised, ' if args.basis else 'raw embeddings, '}d = {d}, "
        f"ρ = {args.rho:g} (k = {k}), {len(clients)} clients, R = {bound:g}, σ for {args.rounds} planned releases "
        f"at δ = 1e-5 (PLD); {args.draws} noise draws per cell, mean ± std.",
        "",
        f"Per-coordinate noise multipliers relative to IGPP's σ: s_A = {sa:.3f} (selected), s_B = {sb:.3f} (the "
        f"rest); the total noise variance is {args.rho * sa**2 + (1 - args.rho) * sb**2:.3f}× IGPP's and its "
        f"fourth moment (what the spread of ‖noise‖² across classes scales with) "
        f"{math.sqrt(args.rho * sa**4 + (1 - args.rho) * sb**4):.3f}× IGPP's in standard deviation.",
        f"Clean global prototypes (count-weighted class means of clipped embeddings): norm "
        f"{clean.norm(dim=1).mean():.3f}, between-class distance min {gaps.min():.3f} / median "
        f"{gaps.median():.3f}; the clean top-k holds f = {float(energy[clean_top].sum() / energy.sum()):.3f} of "
        f"the between-class energy; their nearest-prototype accuracy (no noise) "
        f"{accuracy(clients, clean, None):.3f}; test embeddings' norm median "
        f"{torch.cat([c.x_test for c in clients]).norm(dim=1).median():.3f}.",
        "",
        "g: the selected dimensions' share of the clipped features' squared norm (what groupwise clipping to "
        "R·κ_A, κ_A² = ρ, scales); predicted VPP/IGPP signal-to-noise under the noise-weighted distance: "
        f"w_A·f/g + w_B·(1−f)/(1−g), w_A = {w_a:.3f} (= 0.565 + 1.447 f at ρ = 0.3 when g = ρ).",
        "",
        "| ε | σ | noise norm of one client's class mean (median) | selection | f | g | predicted | IGPP acc | "
        "VPP acc (euclidean) | VPP acc (noise-weighted) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for epsilon in args.epsilons:
        sigma = calibrate_noise_multiplier(epsilon, 1e-5, args.rounds, "pld")
        sigma_private = calibrate_noise_multiplier(
            epsilon,
            1e-5,
            args.rounds,
            "pld",
            [(PureDpEvent(SELECTION_FRACTION * epsilon / args.rounds), args.rounds)],
        )
        counts = torch.cat([torch.bincount(c.y_train, minlength=num_classes) for c in clients]).double()
        noise_norm = float((sigma * bound * math.sqrt(d) / counts.clamp_min(1)).median())
        results: dict[str, dict[str, list[float]]] = {}
        for draw in range(args.draws):
            gens = [torch.Generator().manual_seed(1000 * draw + i) for i in range(3 * len(clients) + 1)]

            n = len(clients)
            # last round's broadcast, then this round's IGPP release
            previous = aggregate(release(clients, num_classes, bound, sigma, args.rho, gens[:n]), bound, num_classes)
            broadcast = broadcast_top_k(previous.numpy(), k)
            igpp = aggregate(release(clients, num_classes, bound, sigma, args.rho, gens[n : 2 * n]), bound, num_classes)
            rng = np.random.default_rng(draw)
            choices = {
                "random (private-anova at the cap)": (
                    [np.sort(rng.choice(d, k, replace=False)) for _ in clients],
                    sigma_private,
                    None,
                ),
                "broadcast-variance": ([broadcast] * n, sigma, broadcast),
                "clean top-k (not private)": ([clean_top] * n, sigma, clean_top),
                "clean top-k by energy / norm share (not private)": ([ratio_top] * n, sigma, ratio_top),
            }
            for name, (picks, s, public) in choices.items():
                vpp = aggregate(
                    release(clients, num_classes, bound, s, args.rho, gens[2 * n : 3 * n], picks), bound, num_classes
                )
                cell = results.setdefault(
                    name, {"f": [], "g": [], "gain": [], "igpp": [], "euclid": [], "weighted": []}
                )
                f = statistics.fmean(float(energy[p].sum() / energy.sum()) for p in picks)
                g = statistics.fmean(float(norm_share[p].sum()) for p in picks)
                cell["f"].append(f)
                cell["g"].append(g)
                cell["gain"].append(w_a * f / g + (1 - w_a) * (1 - f) / (1 - g))
                cell["igpp"].append(accuracy(clients, igpp, None))
                cell["euclid"].append(accuracy(clients, vpp, None))
                if public is not None:
                    scale = torch.full((d,), sb, dtype=torch.float64)
                    scale[torch.from_numpy(public)] = sa
                    cell["weighted"].append(accuracy(clients, vpp, scale))
        for name, cell in results.items():

            def ms(values: list[float]) -> str:
                if not values:
                    return "— (selection private)"
                return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

            lines.append(
                f"| {epsilon:g} | {sigma:.2f} | {noise_norm:.2f} | {name} | {ms(cell['f'])} | {ms(cell['g'])} | "
                f"{ms(cell['gain'])} | {ms(cell['igpp'])} | "
                f"{ms(cell['euclid'])} | {ms(cell['weighted'])} |"
            )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"{time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} CPU-s; 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
    ]
    out = RESULTS / "vpp_selection" / f"distance_{args.setting}{f'_basis{args.basis}' if args.basis else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def aggregate_clean(clients: list, num_classes: int, bound: float) -> torch.Tensor:
    x = clip(torch.cat([c.x_train for c in clients]).double(), bound)  # the clients' features as given
    y = torch.cat([c.y_train for c in clients])
    return torch.stack([x[y == k].mean(0) for k in range(num_classes)])


if __name__ == "__main__":
    main()
