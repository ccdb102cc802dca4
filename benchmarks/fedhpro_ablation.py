"""The prototype family, benchmark 3: FedHPro ablation on Fashion-MNIST-LT (imbalance factor 100, Dirichlet 0.5,
10 clients), the setting of benchmarks/label_skew_lt.py: without the client margin, without HPCL,
without HPAL, averaged prototypes instead of hyper-prototypes, each gradient distance of the HP step,
Adam instead of SGD for the HP step, CReFF's from-scratch head re-training, no distillation augmentation;
and what carries the gain: HPs never matched (random anchors), HPCL at the reference's strength (divided by
the batch size), each HP's gradient matched (the reference) instead of their mean, a small-norm
initialisation of the HPs. Every row also reports the consistency measured inside the span of the head's
rows (the only directions the HP step can move) and the share of the HPs' energy in that span.

    python benchmarks/fedhpro_ablation.py                        # the documented table (50 rounds)
    python benchmarks/fedhpro_ablation.py --rounds 1 --seeds 1   # a smoke run
    python benchmarks/fedhpro_ablation.py --variants 0 12 13     # some rows only (indices into VARIANTS)
    python benchmarks/fedhpro_ablation.py --stop-after 15         # every run to round 15 only (a later call
                                                                  # without it continues them to --rounds)
    python benchmarks/fedhpro_ablation.py --first-seed 2 --seeds 1 --merge   # seed 2 only, added to the
                                                                  # rows already in summaries.json

The table reports round ``--stop-after`` (default: ``--rounds``) of every run, read from its metrics.jsonl,
so runs continued further still fill a table at an earlier round. With ``--merge`` the table is rebuilt from
the summaries file already in ``--out`` (each entry by variant and seed) together with this call's runs, a run
of the same variant and seed replacing the stored one; without it the table holds this call's runs only.

Writes benchmarks/results/fedhpro_ablation/{table.md, summaries.json} (with --stop-after R:
table_roundR.md, summaries_roundR.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import RESULTS, command_line, mean_std, run_grid
from label_skew_lt import config

VARIANTS = {
    "fedhpro (defaults: cos, SGD, margin, HPCL, HPAL, random-shift, warm-start head)": {},
    "without client margin": {"client_margin": False},
    "without HPCL": {"hpcl_weight": 0.0},
    "without HPAL": {"hpal_weight": 0.0},
    "without HPCL and HPAL (= CReFF + feature gradients)": {"hpcl_weight": 0.0, "hpal_weight": 0.0},
    "averaged prototypes instead of HPs": {"global_signal": "averaged"},
    "hp_distance = layerwise-cos": {"hp_distance": "layerwise-cos"},
    "hp_distance = mse": {"hp_distance": "mse"},
    "hp_distance = coordinate (reference code)": {"hp_distance": "coordinate"},
    "hp_optimizer = adam (lr 0.1)": {"hp_optimizer": "adam"},
    "head re-trained from scratch (reference)": {"retrain_init": "scratch"},
    "no distillation augmentation": {"distill_augmentation": "none"},
    "HPs never matched (hp_steps = 0: random anchors)": {"hp_steps": 0},
    "HPCL at the reference's strength (divided by the batch size)": {"hpcl_normalisation": "batch-size"},
    "HPs never matched, HPCL at the reference's strength": {"hp_steps": 0, "hpcl_normalisation": "batch-size"},
    "each HP's gradient matched (reference) instead of their mean": {"hp_matching": "each"},
    "small-norm HP initialisation (hp_init_scale = 0.01)": {"hp_init_scale": 0.01},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds, from --first-seed on")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--merge", action="store_true", help="keep the rows of earlier calls stored in --out's summaries file"
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhpro_ablation")
    parser.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default: every row)")
    parser.add_argument(
        "--stop-after", type=int, help="stop every run after this round (a multiple of 5, the checkpoint interval)"
    )
    args = parser.parse_args()
    if args.stop_after is not None and not (5 <= args.stop_after <= args.rounds and args.stop_after % 5 == 0):
        parser.error(f"--stop-after: must be a multiple of 5 in [5, --rounds={args.rounds}], got {args.stop_after}")
    if args.seeds < 1 or args.first_seed < 0:
        parser.error(f"--seeds must be at least 1 and --first-seed at least 0, got {args.seeds} and {args.first_seed}")
    at_round = args.rounds if args.stop_after is None else args.stop_after

    names = list(VARIANTS)
    chosen = args.variants if args.variants is not None else range(len(names))
    jobs = [
        (config(args.dataset, "fedhpro", s, args.rounds, VARIANTS[names[i]]), args.out / "runs" / f"v{i:02d}-seed{s}")
        for i in chosen
        for s in range(args.first_seed, args.first_seed + args.seeds)
    ]
    suffix = "" if at_round == args.rounds else f"_round{at_round}"
    stored_file = args.out / f"summaries{suffix}.json"
    # read before any run, so that a stored file this call cannot merge stops it at once
    setting = {"dataset": args.dataset, "rounds": args.rounds, "round": at_round}
    stored = read_summaries(stored_file, setting) if args.merge and stored_file.exists() else {}
    run_grid(jobs, args.workers, args.threads, args.stop_after)
    by_variant: dict[str, list[dict]] = {}
    for cfg, folder in jobs:
        by_variant.setdefault(names[int(folder.name[1:3])], []).append(
            {"seed": cfg["seed"], "dataset": args.dataset, "rounds": args.rounds, **at(folder, at_round)}
        )
    by_variant = merge(stored, by_variant)
    lines = [
        "| variant | options | seeds | global acc, final (%) | global acc, best round (%) | signal consistency, final "
        "| consistency in the head span, final | HP energy in the head span, final | s / round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_variant.items():
        lines.append(
            f"| {name} | `{json.dumps(VARIANTS[name])}` | {', '.join(str(r['seed']) for r in runs)} "
            f"| {mean_std([r['final']['global_acc'] for r in runs])} "
            f"| {mean_std([r['best']['global_acc'] for r in runs])} "
            f"| {mean_std([r['final'].get('global_signal_cos') for r in runs], pct=False)} "
            f"| {mean_std([r['final'].get('global_signal_cos_head_span') for r in runs], pct=False)} "
            f"| {mean_std([r['final'].get('global_hp_head_span_energy') for r in runs], pct=False)} "
            f"| {statistics.fmean(r['seconds_per_round'] for r in runs):.2f} |"
        )
    header = (
        f"FedHPro ablation, {args.dataset}-LT (imbalance factor 100), Dirichlet alpha=0.5, 10 clients, small CNN "
        f"(d=128), round {at_round} of {args.rounds}, 1 local epoch, SGD lr 0.05 momentum 0.9, batch 64; "
        "the seeds column lists each row's seeds (mean ± std over them). Command: "
        f"`{command_line()}`{' (rows of earlier calls kept from ' + stored_file.name + ')' if stored else ''}\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"table{suffix}.md").write_text(header + "\n".join(lines) + "\n")
    (args.out / f"summaries{suffix}.json").write_text(json.dumps(by_variant, indent=1))
    print((args.out / f"table{suffix}.md").read_text())


def read_summaries(path: Path, setting: dict) -> dict[str, list[dict]]:
    """The entries of a summaries file written by this script, checked for what ``merge`` needs: known
    variants, a seed on every entry, and every entry of this ``setting`` (dataset, rounds configured, round
    reported). Anything else stops with one line naming the file."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable summaries file ({err})") from None
    if not isinstance(stored, dict):
        raise SystemExit(f"{path}: not a summaries file (expected a mapping from variant to runs)")
    for name, runs in stored.items():
        if name not in VARIANTS:
            raise SystemExit(f"{path}: unknown variant {name!r}")
        if not isinstance(runs, list):
            raise SystemExit(f"{path}: the runs of {name!r} are not a list")
        for run in runs:
            if not isinstance(run, dict) or "seed" not in run:
                raise SystemExit(f"{path}: an entry of {name!r} has no seed, so --merge cannot place it")
            if type(run["seed"]) is not int:
                raise SystemExit(f"{path}: an entry of {name!r} has seed {run['seed']!r}, not a whole number")
            for key, value in setting.items():
                if run.get(key) != value:
                    raise SystemExit(
                        f"{path}: {name!r} seed {run['seed']} has {key} {run.get(key)!r}, this call {value!r}"
                    )
    return stored


def merge(stored: dict[str, list[dict]], new: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each variant's runs from ``stored`` and ``new`` by seed, a new run replacing a stored one of the same
    seed, in seed order; the variants in ``stored``'s order, then the new ones."""
    merged: dict[str, dict[int, dict]] = {}
    for source in (stored, new):
        for name, runs in source.items():
            merged.setdefault(name, {}).update({run["seed"]: run for run in runs})
    return {name: [runs[seed] for seed in sorted(runs)] for name, runs in merged.items()}


def at(folder: Path, round_: int) -> dict:
    """A run's figures at round ``round_`` from its metrics.jsonl: ``final`` (that round's row), ``best``
    (the row of the best global accuracy up to it) and ``seconds_per_round`` (training, mean up to it)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["round"] <= round_]
    if not rows or rows[-1]["round"] != round_:
        raise SystemExit(f"{folder / 'metrics.jsonl'}: the run has no evaluated round {round_}")
    return {
        "round": round_,
        "final": rows[-1],
        "best": max(rows, key=lambda r: r["global_acc"]),
        "seconds_per_round": statistics.fmean(r["round_seconds"] for r in rows),
    }


if __name__ == "__main__":
    main()
