"""How far gradient matching moves FedHPro's hyper-prototypes from their random initialisation, read from the
FedHPro ablation's run folders (benchmarks/fedhpro_ablation.py).

The row "HPs never matched" (hp_steps = 0) keeps every HP at its N(0, 1) initialisation, drawn from the run
seed only, so its checkpoint holds H₀ of every run of the same seed (times ``hp_init_scale``). For each run
with a checkpoint this prints the round of that checkpoint, ‖H − H₀‖ / ‖H₀‖, the mean and smallest cosine of
each HP to its initialisation, the smallest cosine of each class's HPCL anchor ``m_c`` (the mean of its
normalised HPs) to the initial one, and how orthogonal the anchors are (mean and largest |cos| between classes).

    python benchmarks/fedhpro_hp_movement.py --out benchmarks/results/fedhpro_ablation_50
    python benchmarks/fedhpro_hp_movement.py --out benchmarks/results/fedhpro_ablation_50 --merge   # keep the
                                  # stored rows (hp_movement.json) of runs whose folders are not here any more

With ``--merge`` a run measured now replaces the stored row of the same variant and seed; every other stored
row is kept as it was (with the round it was measured at).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS
from fedhpro_ablation import VARIANTS

NEVER_MATCHED = list(VARIANTS).index("HPs never matched (hp_steps = 0: random anchors)")


def hyper_prototypes(folder: Path) -> tuple[int, torch.Tensor]:
    """(round, H) of the run's last checkpoint."""
    state = torch.load(folder / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    return int(state["round"]), state["server_state"]["hyper_prototypes"]


def movement(hp: torch.Tensor, start: torch.Tensor) -> dict[str, float]:
    d = hp.shape[-1]
    each = F.cosine_similarity(hp.reshape(-1, d), start.reshape(-1, d), dim=1)
    anchors, anchors0 = F.normalize(hp, dim=2).mean(1), F.normalize(start, dim=2).mean(1)
    unit = F.normalize(anchors, dim=1)
    between = (unit @ unit.t())[~torch.eye(len(unit), dtype=torch.bool)]
    return {
        "relative_change": float((hp - start).norm() / start.norm()),
        "hp_cos_mean": float(each.mean()),
        "hp_cos_min": float(each.min()),
        "anchor_cos_min": float(F.cosine_similarity(anchors, anchors0, dim=1).min()),
        "anchor_between_abs_cos_mean": float(between.abs().mean()),
        "anchor_between_abs_cos_max": float(between.abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhpro_ablation")
    parser.add_argument("--merge", action="store_true", help="keep the stored rows of runs not measured now")
    args = parser.parse_args()
    runs = args.out / "runs"
    if not runs.is_dir():
        raise SystemExit(f"--out: {runs} holds no runs of the FedHPro ablation")
    stored_file = args.out / "hp_movement.json"
    # read before measuring, so that a stored file this call cannot merge stops it at once
    stored = read_results(stored_file) if args.merge and stored_file.exists() else []
    names = list(VARIANTS)
    results = []
    for folder in sorted(runs.glob("v??-seed*")):
        variant, seed = int(folder.name[1:3]), int(folder.name.split("seed")[1])
        reference = runs / f"v{NEVER_MATCHED:02d}-seed{seed}"
        if (
            variant == NEVER_MATCHED
            or not (folder / "checkpoint" / "state.pt").exists()
            or not (reference / "checkpoint" / "state.pt").exists()
        ):
            continue
        round_, hp = hyper_prototypes(folder)
        scale = VARIANTS[names[variant]].get("hp_init_scale", 1.0)
        m = movement(hp, hyper_prototypes(reference)[1] * scale)
        results.append({"variant": names[variant], "seed": seed, "round": round_, **m})
    results = merge_results(stored, results)
    lines = [
        "| variant | seed | round | ‖H − H₀‖ / ‖H₀‖ | cos(HP, its init), mean / min | cos(anchor, its init), min "
        "| anchors' |cos| between classes, mean / max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['round']} | {r['relative_change']:.3f} "
            f"| {r['hp_cos_mean']:.3f} / {r['hp_cos_min']:.3f} | {r['anchor_cos_min']:.3f} "
            f"| {r['anchor_between_abs_cos_mean']:.3f} / {r['anchor_between_abs_cos_max']:.3f} |"
        )
    (args.out / "hp_movement.md").write_text("\n".join(lines) + "\n")
    (args.out / "hp_movement.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


MEASURES = (
    "round",
    "relative_change",
    "hp_cos_mean",
    "hp_cos_min",
    "anchor_cos_min",
    "anchor_between_abs_cos_mean",
    "anchor_between_abs_cos_max",
)


def read_results(path: Path) -> list[dict]:
    """The rows of an hp_movement.json written by this script; anything else stops with one line naming the file."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable hp_movement file ({err})") from None
    if not isinstance(stored, list):
        raise SystemExit(f"{path}: not an hp_movement file (expected a list of rows)")
    for row in stored:
        if not isinstance(row, dict) or row.get("variant") not in VARIANTS:
            raise SystemExit(f"{path}: a row names no known variant: {row!r}")
        if type(row.get("seed")) is not int:
            raise SystemExit(f"{path}: a row of {row['variant']!r} has seed {row.get('seed')!r}, not a whole number")
        missing = [key for key in MEASURES if not isinstance(row.get(key), (int, float))]
        if missing:
            raise SystemExit(f"{path}: the row of {row['variant']!r} seed {row['seed']} lacks {', '.join(missing)}")
    return stored


def merge_results(stored: list[dict], new: list[dict]) -> list[dict]:
    """The stored rows and the new ones by (variant, seed), a new row replacing a stored one, ordered as the
    runs' folders are (variant index, then seed)."""
    names = list(VARIANTS)
    merged = {(row["variant"], row["seed"]): row for source in (stored, new) for row in source}
    return [merged[key] for key in sorted(merged, key=lambda key: (names.index(key[0]), key[1]))]


if __name__ == "__main__":
    main()
