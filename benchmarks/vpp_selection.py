"""VPP's selection of discriminative dimensions, measured: does it select, and what is it worth?

On the VPDR benchmark's settings (its hosts' losses, local training and models;
benchmarks/vpdr_privacy_utility.py), for each setting, host, epsilon, rho and seed, runs IGPP and VPP
with each ``privacy.selection`` (``private-anova``, the paper's, at the default score cap s_max = 0.1 and
at a cap above the real scores, s_max = 100; ``broadcast-variance``), each also with DCR (``+dcr``),
under the library's privacy defaults (trained-features, add-remove, PLD; ``--model linear``: the linear
head on the frozen public-encoder embeddings, where the ``fixed-features`` bound is valid), one run at a
time, 1 torch thread. IGPP does not depend on rho: it runs once per (setting, host, epsilon, seed). At
``--epsilons inf`` nothing is released: the igpp row is the plain host (the ceiling), VPP is not run.
Reports, per cell, the VPP diagnostics averaged over clients and over rounds 2..T (round 1 has no
broadcast: broadcast-variance releases IGPP-shaped then): ``vpp_selected_energy`` f (share of the clean
between-class energy in the selected dimensions) and ``vpp_overlap`` (share of the clean ANOVA top-k
selected; chance = rho), the noise multiplier σ, and the final personalised accuracy (client head) and
nearest-global-prototype accuracy, mean ± std over seeds.

The seed loop is outermost (every cell gets seed 0 before any gets seed 1), and the runs resume: a cell
already in rows.json is not run again; rows.json is written after every run.

    python benchmarks/vpp_selection.py                      # the adapter table (2 seeds)
    python benchmarks/vpp_selection.py --rounds 2 --seeds 1 --hosts fedproto   # smoke
    python benchmarks/vpp_selection.py --model linear --hosts fpl fedtgp --epsilons 0.5 1 2 \\
        --rhos 0.1 0.2 0.3 --seeds 3 --settings digits-domains fashion-mnist-dir1.0 \\
        --variants igpp igpp+dcr "vpp private-anova (s_max 0.1)" "vpp private-anova (s_max 0.1)+dcr" \\
        "vpp broadcast-variance" "vpp broadcast-variance+dcr" --out linear_grid   # the valid-bound grid

Writes benchmarks/results/vpp_selection/<out, default: the model>/{table.md, rows.json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import vpdr_privacy_utility as vpdr
from _common import RESULTS, command_line

import protofl

BASE_VARIANTS = {
    "igpp": {"mechanism": "igpp"},
    "vpp private-anova (s_max 0.1)": {"mechanism": "vpp", "selection": "private-anova"},
    "vpp private-anova (s_max 100)": {"mechanism": "vpp", "selection": "private-anova", "score_cap": 100.0},
    "vpp broadcast-variance": {"mechanism": "vpp", "selection": "broadcast-variance"},
}
#: Every variant, alone and with DCR (``+dcr``: the training-side part of VPDR).
VARIANTS = {
    **BASE_VARIANTS,
    **{f"{name}+dcr": {**variant, "dcr": True} for name, variant in BASE_VARIANTS.items()},
}
#: Hosts beyond the VPDR benchmark's: a label, the VPDR host it runs and the method options it changes.
#: FedTGP's default server learning rate (0.1) kills every hidden ReLU of its generator on the 1,280-d
#: embeddings of the ``linear`` model, so every class gets the same global prototype
#: (benchmarks/fedtgp_prototypes.py); at 0.01 the generator trains.
HOST_VARIANTS = {"fedtgp-slr0.01": ("fedtgp", {"server_lr": 0.01})}
HOSTS = {**{name: (name, {}) for name in vpdr.HOSTS}, **HOST_VARIANTS}


def config(
    setting: str,
    host: str,
    variant: dict,
    epsilon: float,
    seed: int,
    rounds: int,
    model: str = "adapter",
    rho: float | None = None,
) -> dict:
    """The VPDR benchmark's cell (its settings, hosts and local training; the ``adapter`` model under the
    library's privacy defaults, or the ``linear`` head on the frozen embeddings under ``fixed-features``),
    with this variant's mechanism, selection and DCR, VPP's ``rho`` (None: the default), evaluated every
    round; ``host``: a VPDR host or a label of :data:`HOST_VARIANTS`."""
    base, options = HOSTS[host]
    cell = vpdr.config(setting, base, variant["mechanism"], epsilon, seed, rounds, model=model)
    cell["method"].update(options)
    if math.isinf(epsilon):  # no release: the plain host (with DCR if asked), the ceiling of every variant
        cell["privacy"]["dcr"] = variant.get("dcr", False)
    else:
        cell["privacy"].update(variant)
        if rho is not None:
            cell["privacy"]["rho"] = rho
    cell["federation"].update(eval_every=1, checkpoint_every=0, threads=1)
    return cell


def mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def cell_key(row: dict) -> tuple:
    return (row["setting"], row["host"], row["epsilon"], row["variant"], row["rho"], row["seed"])


def cells(args: argparse.Namespace) -> list[dict]:
    """Every run of the grid, seed outermost; a variant without VPP runs once (rho None)."""
    out = []
    for seed in range(args.seeds):
        for setting in args.settings:
            for host in args.hosts:
                for epsilon in args.epsilons:
                    for name in args.variants:
                        if math.isinf(epsilon) and VARIANTS[name]["mechanism"] == "vpp":
                            continue  # without noise VPP is the plain host: the igpp row at ε = ∞ is it
                        rhos = args.rhos if VARIANTS[name]["mechanism"] == "vpp" else [None]
                        for rho in rhos:
                            out.append(
                                {
                                    "setting": setting,
                                    "host": host,
                                    "epsilon": epsilon,
                                    "variant": name,
                                    "rho": rho,
                                    "seed": seed,
                                }
                            )
    return out


def run_cell(cell: dict, rounds: int, model: str) -> dict:
    variant = VARIANTS[cell["variant"]]
    wall, cpu = time.perf_counter(), time.process_time()
    result = protofl.run(
        config(cell["setting"], cell["host"], variant, cell["epsilon"], cell["seed"], rounds, model, cell["rho"])
    )
    later = [r for r in result.history if r["round"] >= 2]
    final = result.history[-1]
    return {
        **cell,
        "noise_multiplier": (result.summary.get("privacy") or {}).get("noise_multiplier", 0.0),  # ε = ∞: none
        "f": mean([r.get("vpp_selected_energy", math.nan) for r in later]),
        "overlap": mean([r.get("vpp_overlap", math.nan) for r in later]),
        "acc": final["personal_acc_mean"],
        "proto_acc": final.get("personal_proto_acc_mean"),
        "generator_live_units": final.get("server_generator_live_units"),  # FedTGP only
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def table(rows: list[dict], args: argparse.Namespace, header: str) -> list[str]:
    lines = [
        header,
        "",
        "| setting | host | ε | variant | ρ | seeds | σ | f | overlap | personal acc | proto acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in args.settings:
        for host in args.hosts:
            for epsilon in args.epsilons:
                for name in args.variants:
                    rhos = args.rhos if VARIANTS[name]["mechanism"] == "vpp" else [None]
                    for rho in rhos:
                        cell = [
                            r
                            for r in rows
                            if (r["setting"], r["host"], r["epsilon"], r["variant"], r["rho"])
                            == (setting, host, epsilon, name, rho)
                        ]
                        if not cell:
                            continue  # not run: never reported
                        lines.append(
                            f"| {setting} | {host} | {epsilon:g} | {name} | {'—' if rho is None else f'{rho:g}'} | "
                            f"{len(cell)} | {cell[0]['noise_multiplier']:.2f} | {mean_std([r['f'] for r in cell])} | "
                            f"{mean_std([r['overlap'] for r in cell])} | {mean_std([r['acc'] for r in cell])} | "
                            f"{mean_std([r['proto_acc'] for r in cell])} |"
                        )
    return lines


def _base_key(row: dict, base: str) -> tuple:
    """The key of ``row``'s paired run of variant ``base`` (same setting, host, ε, seed; ρ when it has one)."""
    rho = row["rho"] if VARIANTS[base]["mechanism"] == "vpp" else None
    return (row["setting"], row["host"], row["epsilon"], base, rho, row["seed"])


def pivot(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Per VPP cell without DCR: f, overlap, VPP's and IGPP's nearest-prototype accuracy (same seeds) and
    their paired difference, mean ± std over seeds."""
    by_key = {cell_key(r): r for r in rows}
    lines = [
        "| setting | host | ε | selection | ρ | seeds | σ | f | overlap | VPP proto acc | IGPP proto acc | Δ (VPP − IGPP) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in args.settings:
        for host in args.hosts:
            for epsilon in args.epsilons:
                for name in args.variants:
                    if VARIANTS[name]["mechanism"] != "vpp" or VARIANTS[name].get("dcr"):
                        continue
                    for rho in args.rhos:
                        cell = [
                            r
                            for r in rows
                            if (r["setting"], r["host"], r["epsilon"], r["variant"], r["rho"])
                            == (setting, host, epsilon, name, rho)
                            and _base_key(r, "igpp") in by_key
                        ]
                        if not cell:
                            continue
                        base = [by_key[_base_key(r, "igpp")] for r in cell]
                        lines.append(
                            f"| {setting} | {host} | {epsilon:g} | {name.removeprefix('vpp ')} | {rho:g} | {len(cell)} | "
                            f"{cell[0]['noise_multiplier']:.2f} | {mean_std([r['f'] for r in cell], 2)} | "
                            f"{mean_std([r['overlap'] for r in cell], 2)} | {mean_std([r['proto_acc'] for r in cell])} | "
                            f"{mean_std([r['proto_acc'] for r in base])} | "
                            f"{mean_std([a['proto_acc'] - b['proto_acc'] for a, b in zip(cell, base)])} |"
                        )
    return lines


def claims(rows: list[dict]) -> list[str]:
    """The paper's two claims, per setting, host and selection, over the runs whose paired arm also ran:
    VPP against IGPP (same setting, host, ε, seed; every ρ), with and without DCR, and a variant with DCR
    against the same without. Won / lost / equal: pairs whose first arm's nearest-prototype accuracy is
    higher / lower / the same (to 1e-9)."""
    by_key = {cell_key(r): r for r in rows}
    comparisons = []
    for name, variant in BASE_VARIANTS.items():
        if variant["mechanism"] == "vpp":
            comparisons.append((f"{name} vs igpp", name, "igpp"))
            comparisons.append((f"{name}+dcr vs igpp+dcr", f"{name}+dcr", "igpp+dcr"))
    comparisons += [(f"{name}+dcr vs {name}", f"{name}+dcr", name) for name in BASE_VARIANTS]
    lines = [
        "| setting | host | comparison | pairs | won / lost / equal | Δ proto acc | Δ personal acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, host in sorted({(r["setting"], r["host"]) for r in rows}):
        for label, arm, base in comparisons:
            pairs = [
                (r, by_key[_base_key(r, base)])
                for r in rows
                if (r["setting"], r["host"], r["variant"]) == (setting, host, arm) and _base_key(r, base) in by_key
            ]
            if not pairs:
                continue
            d_proto = [a["proto_acc"] - b["proto_acc"] for a, b in pairs]
            d_acc = [a["acc"] - b["acc"] for a, b in pairs]
            won, lost = sum(d > 1e-9 for d in d_proto), sum(d < -1e-9 for d in d_proto)
            lines.append(
                f"| {setting} | {host} | {label} | {len(pairs)} | {won} / {lost} / {len(pairs) - won - lost} | "
                f"{mean_std(d_proto)} | {mean_std(d_acc)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.3], help="VPP's selected fraction")
    parser.add_argument("--hosts", nargs="+", default=["fedproto", "fpl"], choices=sorted(HOSTS))
    parser.add_argument("--variants", nargs="+", default=list(BASE_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model", default="adapter", choices=sorted(vpdr.MODELS))
    parser.add_argument("--settings", nargs="+", default=["digits-domains"], choices=sorted(vpdr.SETTINGS))
    parser.add_argument("--out", default=None, help="folder under results/vpp_selection (default: the model)")
    parser.add_argument("--table-only", action="store_true", help="write table.md from rows.json, run nothing")
    args = parser.parse_args()
    for rho in args.rhos:
        if not 0 < rho <= 1:
            parser.error(f"--rhos: each must be in (0, 1], got {rho:g}")
    torch.set_num_threads(1)
    out = RESULTS / "vpp_selection" / (args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    if any("setting" not in r or "rho" not in r for r in rows):  # the earlier format: kept aside, not resumed
        kept = rows_path.with_name("rows.earlier.json")
        if kept.exists():
            raise SystemExit(f"{rows_path} holds rows of an earlier format and {kept} exists: move one away")
        rows_path.rename(kept)
        print(f"{rows_path} held rows of an earlier format (no setting or rho): kept as {kept.name}", flush=True)
        rows = []
    done = {cell_key(r) for r in rows}
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    for cell in [] if args.table_only else cells(args):
        if cell_key(cell) in done:
            continue
        row = run_cell(cell, args.rounds, args.model)
        rows.append(row)
        rows_path.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{row} (load {os.getloadavg()[0]:.1f}, {time.perf_counter() - start:.0f} s)", flush=True)
    cpu = sum(r["cpu_s"] for r in rows)
    header = (
        f"`{command_line()}` ({args.model} model, {args.rounds} rounds; f and overlap: mean over rounds 2..T and "
        f"clients; accuracies: final round; mean ± std over the seeds each cell ran; {len(rows)} runs, "
        f"{cpu:.0f} CPU-s in the runs; 1-minute load average {load_start:.1f} at this invocation's start, "
        f"{os.getloadavg()[0]:.1f} at its end)"
    )
    lines = table(rows, args, header)
    lines += ["", "VPP against IGPP per cell (no DCR), nearest-prototype accuracy paired by seed:", ""]
    lines += pivot(rows, args)
    lines += [
        "",
        "The claims, paired by (setting, host, ε, ρ, seed); won: pairs where the first arm's proto acc is higher:",
        "",
    ]
    lines += claims(rows)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
