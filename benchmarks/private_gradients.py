"""Private CReFF and FedHPro (``privacy.mechanism = "dp-gradients"``) against their non-private runs on a
small long-tail setting: OptDigits (scikit-learn's digits, no fetch) with a long tail (imbalance factor
10), Dirichlet alpha=0.5 over 5 clients, the small CNN (d=32), DP-SGD local training (steps_per_round
steps at batch 32, SGD lr 0.1) and the noisy per-class gradient uploads, at each ε of ``--epsilons``
(δ = 1e-5, RDP), plus the same methods without privacy (``inf``; 1 local epoch of plain SGD instead of the
DP-SGD steps). Global balanced test accuracy and the ledger (ε spent, σ of the steps, σ_u of the uploads).

    python benchmarks/private_gradients.py                           # the documented table (1 seed)
    python benchmarks/private_gradients.py --rounds 1 --epsilons 8   # a smoke run

Writes benchmarks/results/private_gradients/{table.md, summaries.json}.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from _common import RESULTS, command_line, mean_std, run_grid, write_table

METHODS = {
    "creff": {"retrain_init": "aggregated"},
    "fedhpro": {"client_margin": False, "distill_augmentation": "none"},
}


def config(method: str, epsilon: float, seed: int, rounds: int, steps: int) -> dict:
    options = {
        "name": method,
        "batch_size": 32,
        "lr": 0.1,
        "grad_samples": 0,
        "features_per_class": 20,
        "retrain_epochs": 20,
        "match_steps": 20,
        "steps_per_round": steps,
        **METHODS[method],
    }
    out = {
        "seed": seed,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "num_clients": 5, "imbalance_factor": 10},
        "federation": {"rounds": rounds, "progress": False},
        "model": {"feature_dim": 32},
        "method": options,
    }
    if math.isfinite(epsilon):
        out["privacy"] = {"mechanism": "dp-gradients", "epsilon": epsilon, "delta": 1e-5, "accountant": "rdp"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="DP-SGD steps per round")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0, math.inf])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "private_gradients")
    args = parser.parse_args()

    cells = [(m, e) for m in args.methods for e in args.epsilons]
    jobs = [
        (config(m, e, s, args.rounds, args.steps), args.out / "runs" / f"{m}-eps{e:g}-seed{s}")
        for m, e in cells
        for s in range(args.seeds)
    ]
    summaries = run_grid(jobs, args.workers, args.threads)
    by_cell: dict[str, list[dict]] = {}
    for (_cfg, folder), summary in zip(jobs, summaries):
        by_cell.setdefault(folder.name.rsplit("-seed", 1)[0], []).append(summary)
    lines = [
        "| method | ε (budget) | ε spent | σ of the DP-SGD steps | σ_u of the uploads | global acc, final (%) "
        "| global acc, best round (%) | s / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, epsilon), key in zip(cells, by_cell):
        runs = by_cell[key]
        privacy = [r.get("privacy") or {} for r in runs]
        sigmas = sorted({round(s, 3) for p in privacy for s in p.get("noise_multipliers", [])})
        lines.append(
            f"| {method} | {epsilon:g} | {mean_std([r.get('epsilon') for r in runs], pct=False)} "
            f"| {', '.join(f'{s:.3f}' for s in sigmas) or '—'} "
            f"| {mean_std([p.get('upload_noise_multiplier') for p in privacy], pct=False)} "
            f"| {mean_std([r['final']['global_acc'] for r in runs])} "
            f"| {mean_std([r['best']['global_acc'] for r in runs])} "
            f"| {sum(r['seconds_per_round'] for r in runs) / len(runs):.1f} |"
        )
    header = (
        f"Private CReFF and FedHPro, OptDigits-LT (imbalance factor 10), Dirichlet alpha=0.5, 5 clients, "
        f"{args.rounds} rounds, {args.steps} DP-SGD steps per round; {args.seeds} seed(s). "
        f"Command: `{command_line()}`\n\n"
    )
    write_table(args.out, header, lines, by_cell)


if __name__ == "__main__":
    main()
