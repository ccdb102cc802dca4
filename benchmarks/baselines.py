"""Baselines under label skew: local / fedavg / fedprox / fedproto on Fashion-MNIST, Dirichlet(0.1),
20 clients, 3 seeds. Writes benchmarks/results/baselines/{table.md, summaries.json, personal_acc.png};
the runs are a ``protofl sweep`` (method.name × seeds) in runs/, with its sweep.json and report/.

    python benchmarks/baselines.py                # the documented table (about 25 minutes on 2 cores)
    python benchmarks/baselines.py --rounds 2 --seeds 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import RESULTS, command_line, mean_std
from _sweep import sweep_grid

#: Each at its defaults besides the common local training: fedprox mu 0.01, fedproto proto_weight 1.0
#: with weighted aggregation (each run's config.toml records them).
METHODS = ("local", "fedavg", "fedprox", "fedproto")


def config(rounds: int, threads: int) -> dict:
    """The base of the sweep (every method, every seed)."""
    return {
        "data": {"dataset": "fashion-mnist"},
        "partition": {"scheme": "dirichlet", "alpha": 0.1, "num_clients": 20, "min_client_size": 20},
        "federation": {"rounds": rounds, "progress": False, "checkpoint_every": 5, "threads": threads},
        "model": {"feature_dim": 128},
        "method": {"name": METHODS[0], "local_epochs": 1, "batch_size": 50, "lr": 0.05, "momentum": 0.9},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "baselines")
    args = parser.parse_args()

    cells = sweep_grid(
        config(args.rounds, args.threads),
        [("method.name", METHODS)],
        range(args.seeds),
        args.workers,
        args.out / "runs",
    )
    by_method: dict[str, list[dict]] = {}
    folders: dict[str, list[Path]] = {}
    for settings, summary, folder in cells:
        by_method.setdefault(settings["method.name"], []).append(summary)
        folders.setdefault(settings["method.name"], []).append(folder)

    lines = [
        "| method | personalised acc, final (%) | personalised acc, best round (picked on test) (%) | nearest-prototype acc, final (%) "
        "| global acc, final (%) | s / round | MB up / round | MB down / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in by_method.items():
        lines.append(
            f"| {method} | {mean_std([r['final']['personal_acc_mean'] for r in runs])} "
            f"| {mean_std([r['best']['personal_acc_mean'] for r in runs])} "
            f"| {mean_std([r['final'].get('personal_proto_acc_mean') for r in runs])} "
            f"| {mean_std([r['final']['global_acc'] for r in runs])} "
            f"| {statistics.fmean(r['seconds_per_round'] for r in runs):.2f} "
            f"| {statistics.fmean(r['bytes_up'] / r['rounds'] for r in runs) / 1e6:.3f} "
            f"| {statistics.fmean(r['bytes_down'] / r['rounds'] for r in runs) / 1e6:.3f} |"
        )
    header = (
        f"Fashion-MNIST, Dirichlet alpha=0.1, 20 clients (min 20 samples each, 20% of each client's data as its "
        f"own test split), small CNN (d=128), {args.rounds} rounds, 1 local epoch, SGD lr 0.05 momentum 0.9, "
        f"batch 50; {args.seeds} seeds (mean ± std over seeds; each seed's value is the mean over clients). "
        f"Seconds per round are training time with {args.workers} runs in parallel at {args.threads} torch "
        f"thread(s) each.\n\nCommand: `{command_line()}`\n\n"
    )
    table = header + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    (args.out / "summaries.json").write_text(json.dumps(by_method, indent=1))
    plot(by_method, folders, args.out)
    print(table)


def plot(by_method: dict[str, list[dict]], folders: dict[str, list[Path]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from protofl.records import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for method in by_method:
        curves = [read_metrics(f / "metrics.jsonl") for f in folders[method]]
        if not curves:
            continue
        rounds = [row["round"] for row in curves[0]]
        mean = [100 * statistics.fmean(c[i]["personal_acc_mean"] for c in curves) for i in range(len(rounds))]
        ax.plot(rounds, mean, marker=".", label=method)
    ax.set(xlabel="round", ylabel="personalised accuracy (%)", title="Fashion-MNIST, Dir(0.1), 20 clients")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "personal_acc.png", dpi=110)


if __name__ == "__main__":
    main()
