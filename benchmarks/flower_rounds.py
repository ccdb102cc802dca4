"""Seconds per round of one experiment on three engines: in-process, Flower's simulation runtime, and a
Flower deployment on loopback (a SuperLink and one SuperNode per client, each its own process).

FedProto on OptDigits, 3 clients, Dirichlet(1.0), by default 5 rounds. Seconds per round are the
mean over rounds of the round's training phase plus its evaluation (the metrics rows' ``round_seconds +
eval_seconds``); the start-up (processes, data loading) is reported apart, as the whole wall time. The
final accuracies are printed too: the engines run the same steps, so they agree. Writes
benchmarks/results/flower/{table.md, results.json}.

    OMP_NUM_THREADS=1 python benchmarks/flower_rounds.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from _common import RESULTS, command_line


def config(rounds: int, clients: int, privacy: bool) -> dict:
    cfg = {
        "seed": 0,
        "data": {"dataset": "optdigits"},
        "partition": {"scheme": "dirichlet", "alpha": 1.0, "num_clients": clients},
        "federation": {"rounds": rounds, "progress": False},
        "model": {"feature_dim": 32},
        "method": {"name": "fedproto", "lr": 0.1, "batch_size": 32},
    }
    if privacy:
        cfg["privacy"] = {"mechanism": "vpp", "epsilon": 8.0}
    return cfg


def per_round(run_dir: Path) -> list[float]:
    from protofl.records import read_metrics

    return [r["round_seconds"] + r["eval_seconds"] for r in read_metrics(run_dir / "metrics.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--privacy", action="store_true", help="fedproto with [privacy] mechanism = 'vpp'")
    parser.add_argument("--engines", default="in-process,flower-simulation,flower-deployment")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import protofl
    from protofl.flower import run_on_flower

    cfg = config(args.rounds, args.clients, args.privacy)
    runs = args.out / "runs"
    results = {}
    load_before = os.getloadavg()
    for engine in args.engines.split(","):
        folder = runs / engine
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        if engine == "in-process":
            summary = protofl.run(cfg, out=folder).summary
        else:
            summary = run_on_flower(cfg, folder, mode=engine.removeprefix("flower-"), round_timeout=600)
        wall = time.perf_counter() - start
        seconds = per_round(folder)
        results[engine] = {
            "seconds_per_round": statistics.mean(seconds),
            "per_round": seconds,
            "wall_seconds": wall,
            "personal_acc": summary["final"]["personal_acc_mean"],
            "epsilon": summary["epsilon"],
            "bytes_up": summary["bytes_up"],
        }
        print(
            f"{engine}: {statistics.mean(seconds):.2f} s/round, wall {wall:.1f} s, "
            f"personal acc {summary['final']['personal_acc_mean']:.4f}",
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = "FedProto" + (" + VPP (ε = 8)" if args.privacy else "")
    lines = [
        f"# Seconds per round: in-process vs Flower ({title}, OptDigits, {args.clients} clients, {args.rounds} rounds)",
        "",
        f"`{command_line()}` on {platform.machine()} with {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}, flwr {__import__('flwr').__version__}; the machine is shared "
        f"(1-minute load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after).",
        "",
        "| engine | s/round (mean) | s/round (min–max) | wall s (incl. start-up) | final personal acc | bytes up |",
        "|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        lines.append(
            f"| {engine} | {r['seconds_per_round']:.2f} | {min(r['per_round']):.2f}–{max(r['per_round']):.2f} "
            f"| {r['wall_seconds']:.1f} | {100 * r['personal_acc']:.2f}% | {r['bytes_up']} |"
        )
    lines += ["", "s/round: training phase plus evaluation of each round, from the run's metrics.jsonl.", ""]
    (args.out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
