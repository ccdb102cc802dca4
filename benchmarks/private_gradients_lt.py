"""Private CReFF and FedHPro (``privacy.mechanism = "dp-gradients"``) against private FedProto, FPL and
FedTGP (their prototype release under ``igpp`` at the privacy defaults: add/remove relation with noisy
counts for every class, the ``trained-features`` bound, the server's projection of noisy uploads) on the
long-tail Fashion-MNIST setting of the label-skew benchmark (imbalance factor 100 on the training pool,
balanced global test set, Dirichlet alpha=0.5), at each ε of ``--epsilons`` (δ = 1e-5, RDP), plus every
method without privacy (ε = ∞).

CReFF and FedHPro train with ``--steps`` DP-SGD steps per round (batch 64, SGD lr 0.05 momentum 0.9,
clip 1) and upload noisy per-class gradients; without privacy they train 1 local epoch. FedProto, FPL
and FedTGP keep their models (``model_sharing = "none"``, which a prototype release requires) and train
1 local epoch; only their prototypes are noised. Metrics: the global model's balanced test accuracy
(CReFF, FedHPro; the prototype methods have no global model under a release) and every method's
personalised accuracy (mean over clients, each on its own test split), final round; and, as the one metric
every method has, the balanced test accuracy of the model each client predicts with (CReFF, FedHPro: the
global model; FedProto, FPL, FedTGP: the client's own model, read from the run's final checkpoint), mean
over clients, with its recall on the six larger classes and on the four tail classes; the global accuracy
averaged over the last 3 rounds; and the clients' mean training loss in the final round. ``--option METHOD.KEY=VALUE`` (repeatable) sets a method option for every
run of METHOD, e.g. ``--option fedhpro.hpcl_weight=0`` or ``--option creff.batch_size=256``; write such a
grid to its own ``--out``. The ledger (ε spent, σ of the DP-SGD steps, σ_u of the uploads, the prototype release's σ)
comes from each summary.json.

    python benchmarks/private_gradients_lt.py                  # the documented table
    python benchmarks/private_gradients_lt.py --table-only     # the table from the runs done so far

Jobs run in this order: every cell of seed 0 (the private cells before the references without privacy,
which run for the first ``--reference-seeds`` seeds only), then the further seeds of CReFF and FedHPro,
then those of FedProto, FPL and FedTGP; the table reports, per cell, how many seeds it holds. Writes benchmarks/results/private_gradients_lt/
{table.md, summaries.json} and the runs in runs/.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _common import RESULTS, command_line, mean_std, run_grid, write_table
from label_skew_lt import config as lt_config

GRADIENT_METHODS = ("creff", "fedhpro")
PROTOTYPE_METHODS = ("fedproto", "fpl", "fedtgp")
#: The server side of CReFF and FedHPro, as in the OptDigits measurement (CPU-sized: 20 synthetic
#: features per class, 20 matching steps, 20 re-training epochs), and what a private run requires.
GRADIENT_OPTIONS = {"features_per_class": 20, "match_steps": 20, "retrain_epochs": 20, "grad_samples": 0}
METHOD_OPTIONS = {
    "creff": {"retrain_init": "aggregated"},
    "fedhpro": {"client_margin": False},
    "fedproto": {"model_sharing": "none"},
    "fpl": {"model_sharing": "none", "lr": 0.01},  # the label-skew benchmark's lr for FPL
    "fedtgp": {"model_sharing": "none"},
}


def parse_method_options(items: list[str], methods: tuple[str, ...]) -> dict[str, dict]:
    """``--option METHOD.KEY=VALUE`` items as ``{method: {key: value}}``; a value is read as JSON (``0``,
    ``0.5``, ``true``, ``"x"``) and otherwise kept as a string. Raises ``ValueError`` with one line naming
    the item that is malformed or names a method not in ``methods``."""
    out: dict[str, dict] = {}
    for item in items:
        name, sep, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. fedhpro.hpcl_weight=0")
        if method not in methods:
            raise ValueError(f"--option {item!r}: method {method!r} is not one of {', '.join(methods)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def config(method: str, epsilon: float, seed: int, args: argparse.Namespace) -> dict:
    options = dict(METHOD_OPTIONS[method])
    if method in GRADIENT_METHODS:
        options.update(GRADIENT_OPTIONS, steps_per_round=args.steps)
    options.update(args.method_options.get(method, {}))
    out = lt_config("fashion-mnist", method, seed, args.rounds, options)
    out["partition"]["num_clients"] = args.clients
    out["model"]["feature_dim"] = args.feature_dim
    if math.isfinite(epsilon):
        mechanism = "dp-gradients" if method in GRADIENT_METHODS else "igpp"
        out["privacy"] = {"mechanism": mechanism, "epsilon": epsilon, "delta": 1e-5, "accountant": "rdp"}
    return out


#: Fashion-MNIST-LT's classes by training size (imbalance factor 100: class c keeps 100^(-c/9) of its
#: examples): 0-5 hold 464-6,000 examples in the pool, 6-9 hold 60-278.
MANY, FEW = range(6), range(6, 10)


def class_recall(folder: Path, test: tuple) -> list[float]:
    """Per class, the balanced test set's recall of the model each client predicts with at the final round
    (read from the run's last checkpoint), mean over clients: CReFF and FedHPro, the global model with the
    server's head; FedProto, FPL and FedTGP, each client's own model. Cached in the run folder."""
    cache = folder / "class_recall.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from protofl.algorithms import Task, get_algorithm
    from protofl.algorithms.base import predict_logits
    from protofl.api import resolve_config
    from protofl.config import RunConfig

    config = resolve_config(RunConfig.from_toml(folder / "config.toml"))
    state = torch.load(folder / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    if state["round"] != config.federation.rounds:
        raise SystemExit(f"{folder}: its checkpoint is of round {state['round']}, not the final round")
    x, y = test
    task = Task(tuple(x.shape[1:]), 10, config.model)
    algorithm = get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)
    if config.method_name in GRADIENT_METHODS:
        models = [state["server_state"]["params"]]
    else:
        models = [s["params"] for _, s in sorted(state["client_states"].items())]
    recalls = []
    for params in models:
        pred = predict_logits(algorithm, params, x).argmax(1)
        recalls.append([float((pred[y == c] == c).float().mean()) for c in range(10)])
    recall = [sum(r[c] for r in recalls) / len(recalls) for c in range(10)]
    cache.write_text(json.dumps(recall))
    return recall


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_train_loss(folder: Path) -> float | None:
    """The clients' mean training loss of the run's last round (metrics.jsonl; None where not recorded)."""
    rows = _metrics(folder)
    return rows[-1].get("train_loss") if rows else None


def last_rounds_global_acc(folder: Path, rounds: int = 3) -> float | None:
    """The global accuracy averaged over the run's last ``rounds`` evaluated rounds (None without a global
    model): the private global models swing from round to round, and one round's value carries that swing."""
    values = [r["global_acc"] for r in _metrics(folder) if r.get("global_acc") is not None][-rounds:]
    return sum(values) / len(values) if values else None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def row(method: str, epsilon: float, runs: list[dict], seeds: int) -> str:
    privacy = [r.get("privacy") or {} for r in runs]
    steps = [s for p in privacy for s in p.get("noise_multipliers", [])] if method in GRADIENT_METHODS else []
    release = [p.get("noise_multiplier") for p in privacy] if method in PROTOTYPE_METHODS else []
    final = [r["final"] for r in runs]
    return (
        f"| {method} | {epsilon:g} | {len(runs)}/{seeds} "
        f"| {mean_std([r.get('epsilon') for r in runs], pct=False) if math.isfinite(epsilon) else '—'} "
        f"| {f'{min(steps):.2f}–{max(steps):.2f}' if steps else '—'} "
        f"| {mean_std([p.get('upload_noise_multiplier') for p in privacy], pct=False) if steps else '—'} "
        f"| {mean_std(release, pct=False) if any(release) else '—'} "
        f"| {mean_std([_mean(r['class_recall']) for r in runs])} "
        f"| {mean_std([_mean(r['class_recall'][c] for c in MANY) for r in runs])} "
        f"| {mean_std([_mean(r['class_recall'][c] for c in FEW) for r in runs])} "
        f"| {mean_std([f.get('global_acc') for f in final])} "
        f"| {mean_std([r.get('last3_global_acc') for r in runs])} "
        f"| {mean_std([f.get('personal_acc_mean') for f in final])} "
        f"| {mean_std([r.get('final_train_loss') for r in runs], pct=False)} "
        f"| {sum(r['seconds_per_round'] for r in runs) / len(runs):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25, help="DP-SGD steps per round (CReFF, FedHPro)")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference-seeds", type=int, default=1, help="seeds of the runs without privacy")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0, math.inf])
    methods = (*GRADIENT_METHODS, *PROTOTYPE_METHODS)
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option for every run of METHOD (e.g. fedhpro.hpcl_weight=0, creff.batch_size=256); repeatable",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true", help="write the table from the finished runs only")
    parser.add_argument("--out", type=Path, default=RESULTS / "private_gradients_lt")
    args = parser.parse_args()
    try:
        args.method_options = parse_method_options(args.option, methods)
    except ValueError as error:
        parser.error(str(error))

    cells = [(m, e) for m in args.methods for e in args.epsilons]
    # Seed 0 of every cell first (the private cells, then the references without privacy, which run for the
    # first --reference-seeds seeds only); then the further seeds of CReFF and FedHPro; then those of the
    # prototype methods. A grid stopped early thus leaves whole seeds, CReFF's and FedHPro's first.
    order = [c for c in cells if math.isfinite(c[1])] + [c for c in cells if not math.isfinite(c[1])]
    groups = ([c for c in order if c[0] in GRADIENT_METHODS], [c for c in order if c[0] not in GRADIENT_METHODS])
    schedule = [(0, c) for c in order] + [(s, c) for group in groups for s in range(1, args.seeds) for c in group]
    jobs = [
        (config(m, e, s, args), args.out / "runs" / f"{m}-eps{e:g}-seed{s}")
        for s, (m, e) in schedule
        if math.isfinite(e) or s < args.reference_seeds
    ]
    if not args.table_only:
        run_grid(jobs, args.workers, args.threads)
    by_cell: dict[str, list[dict]] = {}
    test = None
    for _cfg, folder in jobs:
        if not (folder / "summary.json").exists():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        if test is None:
            import torch

            from protofl.data import load_dataset

            splits = load_dataset("fashion-mnist", progress=False)
            test = (torch.from_numpy(splits.test.x).float(), torch.from_numpy(splits.test.y).long())
        summary["class_recall"] = class_recall(folder, test)
        summary["final_train_loss"] = final_train_loss(folder)
        summary["last3_global_acc"] = last_rounds_global_acc(folder)
        by_cell.setdefault(folder.name.rsplit("-seed", 1)[0], []).append(summary)
    lines = [
        "| method | ε (budget) | seeds | ε spent | σ of the DP-SGD steps (per client) | σ_u of the gradient uploads "
        "| σ of the prototype release | balanced test acc of the clients' models (%) | recall, classes 0-5 (%) "
        "| recall, classes 6-9 (%) | global acc (%) | global acc, mean of the last 3 rounds (%) | personalised acc (%) "
        "| training loss, final round | s / round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        row(m, e, by_cell[f"{m}-eps{e:g}"], args.seeds if math.isfinite(e) else args.reference_seeds)
        for m, e in cells
        if by_cell.get(f"{m}-eps{e:g}")
    ]
    header = (
        f"Fashion-MNIST-LT (imbalance factor 100), Dirichlet alpha=0.5, {args.clients} clients, small CNN "
        f"(d={args.feature_dim}), {args.rounds} rounds, {args.steps} DP-SGD steps per round (CReFF, FedHPro); "
        f"method options beyond the defaults: {args.method_options or 'none'}; "
        f"final round, mean ± std over the seeds each cell holds. Command: `{command_line()}`\n\n"
    )
    write_table(args.out, header, lines, by_cell)


if __name__ == "__main__":
    main()
