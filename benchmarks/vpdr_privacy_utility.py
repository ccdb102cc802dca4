"""The VPDR benchmark, parts 1 and 3: VPDR's privacy-utility trade-off and its cost in time.

Personalized fine-tuning on frozen EfficientNet-Lite0 embeddings (cached once): a per-client residual
adapter and MLP to d=128 features and a linear head, AdamW (lr 1e-3, weight decay 5e-4), batch 256,
2 local epochs, 20 rounds, all clients every round, no model sharing (only prototypes travel).
Hosts with the losses the VPDR reference sets: fedproto (lambda 0.1 MSE), fpl (0.5 CPCL + 0.5 MSE),
fedtgp (lambda 1, 100 server epochs). Grid: epsilon in {1, 2, 4, 8, inf} x mechanism {igpp, vpp,
vpp+dcr} x host, per-client budget over the 20 releases at delta 1e-5 (PLD accountant), 3 seeds.
At epsilon = inf no noise is added: igpp and vpp are then the plain host, vpp+dcr is DCR alone.
Metric: personalized accuracy (mean over clients of each client's own test split), final round.

Settings: ``digits-domains`` (4 clients, one per domain) on a class-stratified 6,000-image subset of
its 10,258-image training pool (about 1,700 images per domain, 720 for OptDigits), and Fashion-MNIST
with Dirichlet alpha = 1.0 over 20 clients on a class-stratified 10,000-image subset (about 500 images
per client). The subsets keep the whole grid (252 runs) near 40 minutes on 2 cores.

    python benchmarks/vpdr_privacy_utility.py                       # the documented tables (valid defaults)
    python benchmarks/vpdr_privacy_utility.py --relation replace-one  # counts public (the paper's relation)
    python benchmarks/vpdr_privacy_utility.py --rounds 2 --seeds 1 --settings digits-domains  # smoke

Every cell uses the library's privacy defaults: the ``trained-features`` sensitivity (valid for the trained
adapter) and the ``add-remove`` relation (noisy counts for every class); the paper's ``fixed-features``
analysis is refused on a trained feature map, so the earlier table (benchmarks/results/vpdr/) is kept only
as a record.

Writes benchmarks/results/vpdr_valid/{table.md, time.md, summaries.json, privacy_utility_<setting>.png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

from _common import RESULTS, command_line, mean_std, run_grid

SETTINGS = {
    "digits-domains": {
        "data": {"dataset": "digits-domains", "features": "efficientnet-lite0", "max_train_samples": 6000},
        "partition": {"scheme": "domain", "num_clients": 4},
    },
    "fashion-mnist-dir1.0": {
        "data": {"dataset": "fashion-mnist", "features": "efficientnet-lite0", "max_train_samples": 10000},
        "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": 20, "min_client_size": 20},
    },
}
HOSTS = {
    "fedproto": {"proto_weight": 0.1},
    "fpl": {"model_sharing": "none", "cpcl_weight": 0.5, "proto_weight": 0.5},
    "fedtgp": {"proto_weight": 1.0, "server_epochs": 100},
}
MECHANISMS = {
    "igpp": {"mechanism": "igpp"},
    "igpp+dcr": {"mechanism": "igpp", "dcr": True},
    "vpp": {"mechanism": "vpp"},
    "vpp+dcr": {"mechanism": "vpp", "dcr": True},
}
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
LOCAL = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 256, "local_epochs": 2}


#: The client models: ``adapter`` (a residual adapter + MLP trained on the client's data: only the
#: ``trained-features`` bound is valid) and ``linear`` (a linear head on the frozen public embeddings: no
#: client trains the feature map, so the paper's ``fixed-features`` bound is valid).
MODELS = {
    "adapter": ({"name": "adapter", "feature_dim": 128, "hidden_dim": 256}, "trained-features"),
    "linear": ({"name": "linear"}, "fixed-features"),
}


def privacy_section(mechanism: str, epsilon: float, relation: str = "add-remove", model: str = "adapter") -> dict:
    """The ``[privacy]`` section of one cell: under ``relation``, with the sensitivity rule that is valid for
    ``model``."""
    if math.isinf(epsilon):  # no noise; DCR alone stays a training change
        return {"mechanism": "none", "dcr": MECHANISMS[mechanism].get("dcr", False)}
    return {
        **MECHANISMS[mechanism],
        "epsilon": epsilon,
        "delta": 1e-5,
        "accountant": "pld",
        "relation": relation,
        "sensitivity": MODELS[model][1],
    }


def config(
    setting: str,
    host: str,
    mechanism: str,
    epsilon: float,
    seed: int,
    rounds: int,
    relation: str = "add-remove",
    model: str = "adapter",
) -> dict:
    return {
        "seed": seed,
        **SETTINGS[setting],
        "federation": {"rounds": rounds, "progress": False, "checkpoint_every": rounds, "eval_every": 5},
        "model": MODELS[model][0],
        "privacy": privacy_section(mechanism, epsilon, relation, model),
        "method": {"name": host, **LOCAL, **HOSTS[host]},
    }


def run_name(setting: str, host: str, mechanism: str, epsilon: float, seed: int) -> str:
    p = privacy_section(mechanism, epsilon)
    label = (
        "dcr-only" if p["mechanism"] == "none" and p["dcr"] else ("plain" if p["mechanism"] == "none" else mechanism)
    )
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return f"{setting}-{host}-{label}-eps{eps}-seed{seed}"


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_embeddings(settings: list[str]) -> None:
    """Embed each dataset once, before the workers start (they would all compute it at the same time)."""
    from protofl.data import embed, load_dataset

    for s in settings:
        data = SETTINGS[s]["data"]
        embed(load_dataset(data["dataset"], progress=True), encoder=data["features"], image_size=32, progress=True)


def main() -> None:
    global EPSILONS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=list(HOSTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--relation", default="add-remove", choices=["add-remove", "replace-one"])
    parser.add_argument("--model", default="adapter", choices=list(MODELS))
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=list(MECHANISMS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS), help="must include 1 and inf")
    parser.add_argument("--out", type=Path, default=None, help="default: results/vpdr_valid[_linear]")
    args = parser.parse_args()
    EPSILONS = tuple(args.epsilons)
    load_start, cpu_start = os.getloadavg()[0], _cpu_seconds()
    if args.out is None:
        args.out = RESULTS / ("vpdr_valid" if args.model == "adapter" else f"vpdr_valid_{args.model}")

    prepare_embeddings(args.settings)
    jobs, keys, seen = [], [], {}
    for setting in args.settings:
        for host in args.hosts:
            for mechanism in args.mechanisms:
                for epsilon in EPSILONS:
                    for seed in range(args.seeds):
                        name = run_name(setting, host, mechanism, epsilon, seed)
                        keys.append((setting, host, mechanism, epsilon, name))
                        if name not in seen:  # at epsilon = inf, igpp and vpp are the same plain run
                            seen[name] = len(jobs)
                            jobs.append(
                                (
                                    config(
                                        setting, host, mechanism, epsilon, seed, args.rounds, args.relation, args.model
                                    ),
                                    args.out / "runs" / name,
                                )
                            )
    wall_start = time.perf_counter()
    summaries = run_grid(jobs, args.workers, args.threads)
    results: dict[tuple, list[dict]] = {}
    for setting, host, mechanism, epsilon, name in keys:
        results.setdefault((setting, host, mechanism, epsilon), []).append(summaries[seen[name]])

    wall = time.perf_counter() - wall_start
    setting_text = (
        f"model {args.model}, relation {args.relation}, sensitivity rule {MODELS[args.model][1]}; {args.rounds} rounds, 2 local epochs, AdamW lr 1e-3 wd 5e-4, batch 256, EfficientNet-Lite0 "
        f"embeddings at 32 px; delta = 1e-5, PLD accountant, budget per client "
        f"over all rounds; {args.seeds} seeds (mean ± std over seeds). Command: `{command_line()}`; "
        f"{wall:.0f} s wall, {_cpu_seconds() - cpu_start:.0f} CPU-s; 1-minute load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    eps_head = " | ".join("ε=∞" if math.isinf(e) else f"ε={e:g}" for e in EPSILONS)

    def table(metric: str) -> list[str]:
        lines = [
            f"| setting | host | mechanism | {eps_head} | spent ε (PLD / RDP) at ε=1 |",
            "|---|---|---|" + "---|" * len(EPSILONS) + "---|",
        ]
        for setting in args.settings:
            for host in args.hosts:
                for mechanism in args.mechanisms:
                    cells = [
                        mean_std([s["final"].get(metric) for s in results[(setting, host, mechanism, e)]])
                        for e in EPSILONS
                    ]
                    p = results[(setting, host, mechanism, 1.0)][0]["privacy"]
                    spent = f"{p['epsilon_pld_max']:.3f} / {p['epsilon_rdp_max']:.3f}" if p else "—"
                    lines.append(f"| {setting} | {host} | {mechanism} | " + " | ".join(cells) + f" | {spent} |")
        return lines

    lines = (
        table("personal_acc_mean")
        + [
            "",
            "Nearest-global-prototype accuracy (%) of the personal features, final round (what the noisy "
            "prototypes are worth):",
            "",
        ]
        + table("personal_proto_acc_mean")
    )
    time_lines = [
        f"| setting | host | {args.mechanisms[0]} at ε=∞ | " + " | ".join(f"{m} (ε=8)" for m in args.mechanisms) + " |",
        "|---|---|---|" + "---|" * len(args.mechanisms),
    ]
    for setting in args.settings:
        for host in args.hosts:
            plain = statistics.fmean(
                s["seconds_per_round"] for s in results[(setting, host, args.mechanisms[0], math.inf)]
            )
            cells = [
                f"{statistics.fmean(s['seconds_per_round'] for s in results[(setting, host, m, 8.0)]):.3f}"
                for m in args.mechanisms
            ]
            time_lines.append(f"| {setting} | {host} | {plain:.3f} | " + " | ".join(cells) + " |")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(
        f"Personalized test accuracy (%), final round; {setting_text}\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "time.md").write_text(
        f"Seconds per round (training, all clients, 1 torch thread per run, 2 runs in parallel on 2 cores); "
        f"{setting_text}\n\n" + "\n".join(time_lines) + "\n"
    )
    (args.out / "summaries.json").write_text(
        json.dumps({f"{s}/{h}/{m}/eps{e}": v for (s, h, m, e), v in results.items()}, indent=1)
    )
    for setting in args.settings:
        plot(results, setting, args.hosts, args.mechanisms, args.out / f"privacy_utility_{setting}.png")
    print((args.out / "table.md").read_text())
    print((args.out / "time.md").read_text())


def plot(results, setting: str, hosts: list[str], mechanisms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(hosts), figsize=(4.5 * len(hosts), 3.6), constrained_layout=True, squeeze=False)
    xs = list(range(len(EPSILONS)))
    for ax, host in zip(axes[0], hosts):
        for mechanism in mechanisms:
            runs = [results[(setting, host, mechanism, e)] for e in EPSILONS]
            means = [100 * statistics.fmean(s["final"]["personal_acc_mean"] for s in r) for r in runs]
            stds = [100 * statistics.pstdev([s["final"]["personal_acc_mean"] for s in r]) for r in runs]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=mechanism)
        ax.set_xticks(xs, ["∞" if math.isinf(e) else f"{e:g}" for e in EPSILONS])
        ax.set(xlabel="ε (per client, whole run, δ=1e-5)", ylabel="personalized acc (%)", title=f"{setting}: {host}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
