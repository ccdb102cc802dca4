"""VPP's selection of discriminative dimensions, measured: does it select, and what is it worth?

On the VPDR benchmark's digits-domains setting (its hosts' losses, local training and trained ``adapter``
model; benchmarks/vpdr_privacy_utility.py), for each host (fedproto, fpl), epsilon and seed, runs IGPP
and VPP with each ``privacy.selection`` (``private-anova``, the paper's, at the default score cap s_max = 0.1 and at
a cap above the real scores, s_max = 100; ``broadcast-variance``) under the library's privacy defaults
(trained-features, add-remove, PLD; ``--model linear``: fixed-features), one run at a time, 1 torch thread. Reports, per cell, the VPP
diagnostics averaged over clients and over rounds 2..T (round 1 has no broadcast: broadcast-variance
releases IGPP-shaped then): ``vpp_selected_energy`` f (share of the clean between-class energy in the
selected dimensions) and ``vpp_overlap`` (share of the clean ANOVA top-k selected; chance = rho),
and the final personalised accuracy (client head) and nearest-global-prototype accuracy.

    python benchmarks/vpp_selection.py                      # the documented table
    python benchmarks/vpp_selection.py --rounds 2 --seeds 1 --hosts fedproto   # smoke
    python benchmarks/vpp_selection.py --model linear       # the linear head on the frozen embeddings

Writes benchmarks/results/vpp_selection/<model>/{table.md, rows.json}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import vpdr_privacy_utility as vpdr
from _common import RESULTS, command_line

import protofl

VARIANTS = {
    "igpp": {"mechanism": "igpp"},
    "vpp private-anova (s_max 0.1)": {"mechanism": "vpp", "selection": "private-anova"},
    "vpp private-anova (s_max 100)": {"mechanism": "vpp", "selection": "private-anova", "score_cap": 100.0},
    "vpp broadcast-variance": {"mechanism": "vpp", "selection": "broadcast-variance"},
}


def config(
    setting: str, host: str, variant: dict, epsilon: float, seed: int, rounds: int, model: str = "adapter"
) -> dict:
    """The VPDR benchmark's cell (its settings, hosts and local training; the ``adapter`` model under the
    library's privacy defaults, or the ``linear`` head on the frozen embeddings under ``fixed-features``),
    with this variant's mechanism and selection, evaluated every round."""
    cell = vpdr.config(setting, host, variant["mechanism"], epsilon, seed, rounds, model=model)
    cell["privacy"].update(variant)
    cell["federation"].update(eval_every=1, checkpoint_every=0)
    return cell


def mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--hosts", nargs="+", default=["fedproto", "fpl"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model", default="adapter", choices=sorted(vpdr.MODELS))
    parser.add_argument("--setting", default="digits-domains", choices=sorted(vpdr.SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()
    for host in args.hosts:
        for epsilon in args.epsilons:
            for name in args.variants:
                variant = VARIANTS[name]
                for seed in range(args.seeds):
                    result = protofl.run(config(args.setting, host, variant, epsilon, seed, args.rounds, args.model))
                    later = [r for r in result.history if r["round"] >= 2]
                    final = result.history[-1]
                    rows.append(
                        {
                            "host": host,
                            "epsilon": epsilon,
                            "variant": name,
                            "seed": seed,
                            "noise_multiplier": result.summary["privacy"]["noise_multiplier"],
                            "f": mean([r.get("vpp_selected_energy", math.nan) for r in later]),
                            "overlap": mean([r.get("vpp_overlap", math.nan) for r in later]),
                            "acc": final["personal_acc_mean"],
                            "proto_acc": final.get("personal_proto_acc_mean"),
                        }
                    )
                    print(
                        f"{host} eps {epsilon:g} {name} seed {seed}: {rows[-1]} ({time.perf_counter() - start:.0f} s)"
                    )
    out = RESULTS / "vpp_selection" / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"`{command_line()}` ({args.setting}, {args.model} model, {args.seeds} seeds, {args.rounds} rounds; f and overlap: mean over rounds 2..T "
        "and clients; accuracies: final round, mean over seeds)",
        "",
        "| host | ε | variant | σ | f | overlap | personal acc | proto acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for host in args.hosts:
        for epsilon in args.epsilons:
            for name in args.variants:
                cell = [r for r in rows if (r["host"], r["epsilon"], r["variant"]) == (host, epsilon, name)]

                def avg(key: str, cell: list = cell) -> str:
                    value = mean([r[key] for r in cell])
                    return "—" if math.isnan(value) else f"{value:.3f}"

                lines.append(
                    f"| {host} | {epsilon:g} | {name} | {cell[0]['noise_multiplier']:.2f} | {avg('f')} | "
                    f"{avg('overlap')} | {avg('acc')} | {avg('proto_acc')} |"
                )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
