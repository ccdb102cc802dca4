"""The prototype family, benchmark 2: domain skew, FPL's setting, on ``digits-domains``.

Four clients, one per domain (mnist, optdigits, mnistm-recreated, synthdigits-recreated; the last two are
recreations, see protofl.data.digits_domains), all every round; global test accuracy of the global model
on each domain's test set and their unweighted average, final round, over 3 seeds, for the same methods
and local training as the label-skew benchmark (label_skew_lt.METHODS and LOCAL).

    python benchmarks/domain_skew.py                       # the documented table
    python benchmarks/domain_skew.py --rounds 2 --seeds 1  # a smoke run

Writes benchmarks/results/domain_skew/{table.md, summaries.json, domain_acc.png}; the runs are one
``protofl sweep`` per method (the seeds) in runs/METHOD/, each with its sweep.json and report/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import RESULTS, command_line, mean_std
from _sweep import sweep_grid
from label_skew_lt import LOCAL, METHODS

from protofl.data.digits_domains import DOMAIN_NAMES


def config(method: str, seed: int, rounds: int) -> dict:
    return {
        "seed": seed,
        "data": {"dataset": "digits-domains"},
        "partition": {"scheme": "domain", "num_clients": len(DOMAIN_NAMES)},
        "federation": {"rounds": rounds, "progress": False, "checkpoint_every": 5},
        "model": {"feature_dim": 128},
        "method": {"name": method, **LOCAL, **METHODS[method]},
    }


def domain_average(final: dict) -> float | None:
    values = [final.get(f"global_acc@{d}") for d in DOMAIN_NAMES]
    return None if any(v is None for v in values) else statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "domain_skew")
    args = parser.parse_args()

    from protofl.data import load_dataset

    load_dataset("digits-domains", progress=True)  # build and cache once, before the workers start
    by_method: dict[str, list[dict]] = {}
    for m in args.methods:
        # one sweep per method (its options in METHODS are its own): the seeds
        base = config(m, 0, args.rounds)
        base["federation"]["threads"] = args.threads
        cells = sweep_grid(base, [], range(args.seeds), args.workers, args.out / "runs" / m)
        by_method[m] = [summary for _, summary, _ in cells]

    header = "| method | " + " | ".join(DOMAIN_NAMES) + " | average over domains | pooled test set |"
    lines = [header, "|---|" + "---|" * (len(DOMAIN_NAMES) + 2)]
    for method, group in by_method.items():
        finals = [s["final"] for s in group]
        cells = [mean_std([f.get(f"global_acc@{d}") for f in finals]) for d in DOMAIN_NAMES]
        cells.append(mean_std([domain_average(f) for f in finals]))
        cells.append(mean_std([f.get("global_acc") for f in finals]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    setting = (
        f"digits-domains, one client per domain (4 clients, all every round), small CNN (d=128), "
        f"{args.rounds} rounds, 1 local epoch, SGD lr 0.05 (fpl: 0.01) momentum 0.9, batch 64; "
        f"{args.seeds} seeds (mean ± std over seeds). Command: `{command_line()}`"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(
        f"Global model's test accuracy (%) per domain, final round; {setting}\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "summaries.json").write_text(json.dumps(by_method, indent=1))
    plot(by_method, args.out / "domain_acc.png")
    print((args.out / "table.md").read_text())


def plot(by_method: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4), constrained_layout=True)
    width = 0.8 / max(len(by_method), 1)
    for i, (method, group) in enumerate(by_method.items()):
        means = [100 * statistics.fmean(s["final"].get(f"global_acc@{d}") or 0.0 for s in group) for d in DOMAIN_NAMES]
        ax.bar(np.arange(len(DOMAIN_NAMES)) + i * width, means, width, label=method)
    ax.set_xticks(np.arange(len(DOMAIN_NAMES)) + 0.4 - width / 2, DOMAIN_NAMES)
    ax.set(ylabel="global test acc (%)", title="digits-domains: global model per domain (final round)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=4)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
