"""The FedHypeVAE benchmark: FedHypeVAE against its baselines at (epsilon, delta) = (1.0, 1e-4).

EfficientNet-Lite0 embeddings (cached) of the full Fashion-MNIST training set (60,000 images, 10 clients,
Dirichlet alpha = 0.3) and of ``digits-domains`` (one client per domain). The generators work in a public
space (``public_basis``: the first 64 principal components, standardised, of the encoder's embeddings of
public images no client holds: MNIST digits for Fashion-MNIST, the bundled photo crops for
digits-domains, whose clients hold MNIST). Methods, every private one at the same per-client budget:

- ``fedhypevae``: the method as it is now (public space, low-rank hypernetwork head on the hidden
  layers, inverse-noise weighting, server momentum), here with 10 % of each client's epsilon on a
  first-round class-statistics release that starts the decoder's class path at the class means, and a
  rank-4 covariance factor (``GENERATOR``); its downstream classifier is trained on synthetic
  embeddings from each sampler (neutral meta-code, mixture of released codes, the released codes'
  generators);
- ``fedhypevae-1280``: the earlier form (the 1280-d range space, full-rank head on every layer, uniform
  averaging, no momentum), for comparison;
- ``dp-cvae``: the predecessor, one shared CVAE decoder trained by DP-FedAvg (``code_dim = 0``), in the
  same public space;
- ``dpgauss``: the DP class-conditional Gaussian (noisy per-class counts, sums and second moments in the
  same public space, ``privacy.mechanism = "class-statistics"``), synthetic data from its Gaussians;
- ``dpfedavg``: a classifier on real embeddings trained by DP-FedAvg;
- ``local``: each client's classifier on its own real embeddings (no communication, no noise);
- ``centralised``: one classifier on all real embeddings, non-private (the upper bound);
- ``ceiling``: the downstream MLP trained non-privately on the real training embeddings projected into
  the same public space (the most any synthetic-data method in that space can reach).

Metrics on the global test set (real embeddings): accuracy (and, for the generators, balanced accuracy,
macro-F1 and MMD² between real and synthetic embeddings), final round, mean ± std over seeds.

    python benchmarks/fedhypevae_benchmark.py                                  # the documented table
    python benchmarks/fedhypevae_benchmark.py --rounds 3 --seeds 1 --settings digits-domains   # smoke
    python benchmarks/fedhypevae_benchmark.py --sweep 1 8 64 10000   # privacy-utility, first setting, 3 seeds

Writes benchmarks/results/fedhypevae/{table.md, summaries.json, projection_<setting>.png}; ``--sweep``
writes sweep.json (every run, merged over calls), timings.jsonl, sweep.md and sweep.png into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS, command_line, mean_std, run_grid

SETTINGS = {
    "fashion-mnist-dir0.3": {
        "data": {"dataset": "fashion-mnist", "features": "efficientnet-lite0"},
        "partition": {"scheme": "dirichlet", "alpha": 0.3, "num_clients": 10, "min_client_size": 300},
        # public images no Fashion-MNIST client holds; R for dpgauss: about the median norm there
        "space": {"public_basis": "mnist", "public_dims": 64},
        "clip_bound": 20.0,
    },
    "digits-domains": {
        "data": {"dataset": "digits-domains", "features": "efficientnet-lite0"},
        "partition": {"scheme": "domain", "num_clients": 4},
        "space": {"public_basis": "photos", "public_dims": 64},  # its clients hold MNIST: photos only
        "clip_bound": 8.0,
    },
}
GENERATOR = {
    "latent_dim": 16,
    "hidden_dim": 128,
    "code_dim": 16,
    # 256 rather than 128: at the same (1, 1e-4) the larger expected batch gains 0.3-0.4 points on each of
    # 3 seeds (Fashion-MNIST, 20 rounds; docs/benchmarks.md); every Fashion-MNIST client holds >= 300
    "batch_size": 256,
    "steps_per_round": 20,
    "meta_rounds": 2,
    "meta_steps": 10,
    "lr": 3e-3,
    "private_lr": 3e-3,
    "hyper_lr": 5e-4,
    "synthetic_per_class": 400,
    "classifier_epochs": 20,
    # 10 % of each client's epsilon on a first-round release of noisy class counts and sums (the DP
    # class-Gaussian's mechanism, one ledger with the DP-SGD steps) that starts the decoder's per-class
    # output path at the class means; with the class path started there, a rank-4 covariance factor at
    # full scale pays (docs/benchmarks.md, "A class-statistics release at epsilon = 1")
    "stats_fraction": 0.1,
    "output_rank": 4,
    "output_factor_scale": 1.0,
}
#: The budget of every private method: (1, 1e-4) per client, RDP (what the published table used).
PRIVACY = {"mechanism": "dp-sgd", "epsilon": 1.0, "delta": 1e-4, "accountant": "rdp"}
PRIVATE = (
    "fedhypevae",
    "fedhypevae-1280",
    "dp-cvae",
    "fedhypevae-class-path",
    "dp-cvae-class-path",
    "dpgauss",
    "dpfedavg",
)
#: The methods that work in the setting's public space.
IN_SPACE = ("fedhypevae", "dp-cvae", "fedhypevae-class-path", "dp-cvae-class-path", "dpgauss")
EARLIER = {
    "public_basis": "none",
    "hyper_rank": 0,
    "aggregation": "uniform",
    "server_momentum": 0.0,
    "label_at_output": False,
    "lr": 1e-2,
    "private_lr": 1e-2,
    "output_lr": None,
    "beta_kl": 0.1,
    "output_variance": False,
    "stats_fraction": 0.0,  # the range space has no public basis to release statistics in
    "output_rank": 0,
}
#: The generators' settings without the class-statistics release and the covariance factor: the
#: class-path defaults that the 3-seed epsilon sweep measured first (``*-class-path`` rows).
CLASS_PATH = {k: v for k, v in GENERATOR.items() if k not in ("stats_fraction", "output_rank", "output_factor_scale")}
METHODS = {
    "fedhypevae": {"name": "fedhypevae", **GENERATOR},
    "fedhypevae-class-path": {"name": "fedhypevae", **CLASS_PATH},
    "dp-cvae-class-path": {
        "name": "fedhypevae",
        **CLASS_PATH,
        "code_dim": 0,
        "meta_rounds": 0,
        "samplers": ["neutral"],
    },
    "fedhypevae-1280": {"name": "fedhypevae", **GENERATOR, **EARLIER},
    "dp-cvae": {"name": "fedhypevae", **GENERATOR, "code_dim": 0, "meta_rounds": 0, "samplers": ["neutral"]},
    "dpgauss": {"name": "dpgauss"},
    "dpfedavg": {"name": "dpfedavg", "steps_per_round": 10, "batch_size": 128, "lr": 0.5, "momentum": 0.5},
    "local": {"name": "local", "local_epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
    "centralised": {"name": "fedavg", "local_epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
    "ceiling": {},  # not a federated run: see ceiling()
}
GENERATORS = ("fedhypevae", "fedhypevae-1280", "dp-cvae", "fedhypevae-class-path", "dp-cvae-class-path")


def config(setting: str, method: str, seed: int, rounds: int) -> dict:
    base = SETTINGS[setting]
    partition = dict(base["partition"])
    if method == "centralised":
        partition = {"scheme": "iid", "num_clients": 1}
    privacy = dict(PRIVACY) if method in PRIVATE else {}
    releases_statistics = method == "dpgauss" or METHODS[method].get("stats_fraction", 0.0) > 0
    if releases_statistics:  # R of a class-statistics release (dpgauss; the generators' ``stats_fraction``)
        privacy["clip_bound"] = base["clip_bound"]
    if method == "dpgauss":  # one release of class statistics: rounds change nothing but the work
        privacy.update(mechanism="class-statistics")
        rounds = 1
    return {
        "seed": seed,
        "data": base["data"],
        "partition": partition,
        "federation": {"rounds": rounds, "progress": False, "checkpoint_every": rounds, "eval_every": rounds},
        "model": {"feature_dim": 128, "hidden_dim": 256},
        "method": {**METHODS[method], **(base["space"] if method in IN_SPACE else {})},
        "privacy": privacy,
    }


def ceiling(setting: str, seed: int) -> dict:
    """The downstream MLP (FedHypeVAE's classifier settings) trained without privacy on all real training
    embeddings projected into the setting's public space; accuracy on the real test set."""
    import torch

    from protofl.algorithms.fedhypevae import FedHypeVAEConfig, classify, train_mlp
    from protofl.api import prepare_data, resolve_config
    from protofl.data.public_basis import basis_for_embeddings

    base = SETTINGS[setting]
    data = prepare_data(resolve_config(config(setting, "centralised", seed, 1)))
    defaults = FedHypeVAEConfig()
    space = base["space"]
    basis = basis_for_embeddings(
        space["public_basis"], defaults.encoder, space["public_dims"], defaults.image_size, data.input_shape[0]
    )
    x = torch.cat([c.x_train for c in data.clients])
    y = torch.cat([c.y_train for c in data.clients])
    clf = train_mlp(
        basis.project(x), y, data.num_classes, defaults.classifier_hidden, GENERATOR["classifier_epochs"], seed
    )
    with torch.no_grad():
        acc = float((classify(clf, basis.project(data.test_x)).argmax(1) == data.test_y).float().mean())
    return {"final": {"global_acc": acc}, "epsilon": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "fedhypevae")
    parser.add_argument(
        "--sweep",
        nargs="+",
        type=float,
        metavar="EPSILON",
        help="instead of the table: the private methods at each epsilon, first setting, --seeds seeds",
    )
    args = parser.parse_args()

    from protofl.data import embed, load_dataset
    from protofl.data.public import public_embedding_range

    for s in args.settings:  # embed once, before the workers start
        embed(load_dataset(SETTINGS[s]["data"]["dataset"]), encoder="efficientnet-lite0", image_size=32)
    public_embedding_range("efficientnet-lite0", 32)

    if args.sweep:
        return sweep(args)
    keys = [(s, m, seed) for s in args.settings for m in args.methods for seed in range(args.seeds) if m != "ceiling"]
    jobs = [(config(s, m, seed, args.rounds), args.out / "runs" / f"{s}-{m}-seed{seed}") for s, m, seed in keys]
    summaries = run_grid(jobs, args.workers, args.threads)
    if "ceiling" in args.methods:
        extra = [(s, "ceiling", seed) for s in args.settings for seed in range(args.seeds)]
        keys, summaries = keys + extra, summaries + [ceiling(s, seed) for s, _, seed in extra]
    results: dict[tuple[str, str], list[dict]] = {}
    for (setting, method, _), summary in zip(keys, summaries):
        results.setdefault((setting, method), []).append(summary)

    lines = [
        "| setting | method | sampler | acc (%) | balanced acc (%) | macro-F1 (%) | MMD² real vs synthetic | spent ε (RDP) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (setting, method), runs in results.items():
        finals = [r["final"] for r in runs]
        eps = mean_std([r["epsilon"] for r in runs], pct=False) if runs[0]["epsilon"] is not None else "— (not private)"
        if method in GENERATORS:
            for sampler in ("neutral", "mixture", "clients"):
                if f"global_acc_{sampler}" not in finals[0]:
                    continue
                lines.append(
                    f"| {setting} | {method} | {sampler} | {mean_std([f[f'global_acc_{sampler}'] for f in finals])} "
                    f"| {mean_std([f[f'global_balanced_acc_{sampler}'] for f in finals])} "
                    f"| {mean_std([f[f'global_macro_f1_{sampler}'] for f in finals])} "
                    f"| {mean_std([f[f'global_mmd_{sampler}'] for f in finals], pct=False)} | {eps} |"
                )
        else:
            acc = [
                f.get("global_acc") if f.get("global_acc") is not None else f.get("personal_acc_mean") for f in finals
            ]
            note = " (own test splits)" if finals[0].get("global_acc") is None else ""
            lines.append(f"| {setting} | {method} | — | {mean_std(acc)}{note} | — | — | — | {eps} |")
    args.out.mkdir(parents=True, exist_ok=True)
    text = (
        f"Downstream accuracy on real held-out embeddings, final round; {args.rounds} rounds, {args.seeds} seeds "
        f"(mean ± std over seeds), (epsilon, delta) = (1.0, 1e-4) per client. Command: `{command_line()}`\n\n"
    )
    (args.out / "summaries.json").write_text(json.dumps({f"{s}/{m}": v for (s, m), v in results.items()}, indent=1))
    lines += ["", "DP-trained numbers per step and noise multiplier per client (seed 0):", ""]
    for (setting, method), runs in results.items():
        p = runs[0].get("privacy") or {}
        if "dp_trained_numbers" in p:
            sigmas = ", ".join(f"{v:.2f}" for v in p["noise_multiplier_per_client"].values())
            lines.append(f"- {setting} / {method}: {p['dp_trained_numbers']:,} numbers; sigma {sigmas}")
        if "public_space" in p:
            lines.append(f"- {setting} / {method}: public space {p['public_space']}")
    (args.out / "table.md").write_text(text + "\n".join(lines) + "\n")
    for s in args.settings:
        if "fedhypevae" in args.methods:
            projection(args.out / "runs" / f"{s}-fedhypevae-seed0", args.out / f"projection_{s}.png")
    print((args.out / "table.md").read_text())


def sweep(args) -> None:
    """Privacy-utility of the private methods on the first setting, ``--seeds`` seeds: where does each
    start to learn? epsilon 10^4 stands for infinity (the generators need a finite budget; the noise is then
    too small to matter). Runs one job at a time, in the order given (epsilons, then methods, then seeds),
    so that the most informative cells can come first; after each job it records the job's CPU seconds,
    wall seconds and load in ``timings.jsonl`` and rewrites ``sweep.json``, ``sweep.md`` and ``sweep.png``
    from every completed run stored under ``--out`` (earlier calls' cells included)."""
    import resource
    import time

    setting = args.settings[0]
    jobs: list[tuple[str, float | None, int]] = []
    if "ceiling" in args.methods:  # not private: once per seed
        jobs += [("ceiling", None, seed) for seed in range(args.seeds)]
    jobs += [(m, eps, seed) for eps in args.sweep for m in args.methods if m in PRIVATE for seed in range(args.seeds)]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stored = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    for method, eps, seed in jobs:
        key = cell_key(method, eps, seed)
        if method == "ceiling":
            if key in stored:
                continue
            done, cpu, wall = False, time.process_time(), time.perf_counter()
            summary = ceiling(setting, seed)
            cpu = time.process_time() - cpu
        else:
            cfg = config(setting, method, seed, args.rounds)
            cfg["privacy"] = {**cfg["privacy"], "epsilon": eps}
            folder = out / "sweep" / f"{setting}-{method}-eps{eps:g}-seed{seed}"
            done = (folder / "summary.json").exists() and json.loads((folder / "summary.json").read_text())[
                "status"
            ] == "completed"
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.perf_counter()
            (summary,) = run_grid([(cfg, folder)], 1, args.threads)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
            if done and key in stored:
                continue
        timing = {
            "cell": key,
            # a run found completed in its folder was not run here: its cost is unknown
            "cpu_s": None if done else round(cpu, 1),
            "wall_s": None if done else round(time.perf_counter() - wall, 1),
            "load": Path("/proc/loadavg").read_text().split()[:3],
        }
        with open(out / "timings.jsonl", "a") as f:
            f.write(json.dumps(timing) + "\n")
        stored = merge_runs(stored, {key: {"summary": summary, **timing}})
        (out / "sweep.json").write_text(json.dumps(stored, indent=1))
        write_sweep(stored, out, setting, args.rounds, command_line())


def cell_key(method: str, eps: float | None, seed: int) -> str:
    """The key of one run in ``sweep.json``: ``method/epsilon/seed`` (epsilon ``-`` for the ceiling)."""
    return f"{method}/{'-' if eps is None else f'{eps:g}'}/{seed}"


def merge_runs(stored: dict, new: dict) -> dict:
    """``stored`` with the runs of ``new`` added; a run of the same method, epsilon and seed is replaced
    (a rerun supersedes the earlier one). Both map ``cell_key`` to ``{"summary": ..., "cpu_s": ...}``;
    neither is changed."""
    return {**stored, **new}


def sweep_cells(stored: dict) -> dict[tuple[str, float | None], list[dict]]:
    """The stored runs grouped by (method, epsilon), each group's runs ordered by seed; methods in the
    order of ``METHODS``, epsilons ascending (the ceiling's None first)."""
    cells: dict[tuple[str, float | None], list[tuple[int, dict]]] = {}
    for key, run in stored.items():
        method, eps, seed = key.split("/")
        cells.setdefault((method, None if eps == "-" else float(eps)), []).append((int(seed), run))
    order = list(METHODS)
    return {
        k: [run for _, run in sorted(v)]
        for k, v in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0.0))
    }


def cell_accuracies(runs: list[dict]) -> dict[str, list[float]]:
    """Final global accuracy per sampler (``—`` for a method without samplers) over a cell's runs."""
    finals = [r["summary"]["final"] for r in runs]
    samplers = [s for s in ("neutral", "mixture", "clients") if f"global_acc_{s}" in finals[0]]
    if not samplers:
        return {"—": [f["global_acc"] for f in finals]}
    return {s: [f[f"global_acc_{s}"] for f in finals] for s in samplers}


def total(seconds: list[float | None]) -> str:
    """The sum of the runs' seconds; ``+`` marks runs whose cost is unknown (found done, not run here)."""
    known = [s for s in seconds if s is not None]
    return (f"{sum(known):.0f}" if known else "—") + ("+" if len(known) < len(seconds) else "")


def eps_label(eps: float | None) -> str:
    return "— (not private)" if eps is None else "∞ (10⁴)" if eps >= 1e4 else f"{eps:g}"


def write_sweep(stored: dict, out: Path, setting: str, rounds: int, command: str) -> None:
    """``sweep.md`` (a method × epsilon table of mean ± std, then every cell with its MMD², spent epsilon,
    CPU and wall seconds and load) and ``sweep.png`` (accuracy against epsilon, error bars one std)."""
    import statistics

    cells = sweep_cells(stored)
    epsilons = sorted({eps for _, eps in cells if eps is not None})
    rows: dict[str, dict[float | None, str]] = {}
    curves: dict[str, list[tuple[float, float, float]]] = {}
    ceiling_line = None
    detail = [
        "| method | ε | sampler | seeds | acc (%) | MMD² real vs synthetic | spent ε (RDP) | CPU s (all seeds) "
        "| wall s | load (1 min, per run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, eps), runs in cells.items():
        summaries = [r["summary"] for r in runs]
        spent = [s["epsilon"] for s in summaries]
        cpu = total([r["cpu_s"] for r in runs])
        wall = total([r["wall_s"] for r in runs])
        loads = ", ".join(r["load"][0] for r in runs)
        for sampler, accs in cell_accuracies(runs).items():
            name = method if sampler == "—" else f"{method} ({sampler})"
            rows.setdefault(name, {})[eps] = mean_std(accs) + ("" if len(accs) == 3 else f" ({len(accs)} seeds)")
            mmds = [s["final"].get(f"global_mmd_{sampler}") for s in summaries]
            detail.append(
                f"| {method} | {eps_label(eps)} | {sampler} | {len(runs)} | {mean_std(accs)} "
                f"| {mean_std(mmds, pct=False)} | {mean_std(spent, pct=False)} | {cpu} | {wall} | {loads} |"
            )
            mean = statistics.fmean(accs)
            std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            if eps is None:
                ceiling_line = (mean, std)
            else:
                curves.setdefault(name, []).append((eps, mean, std))
    pivot = [
        "| method (sampler) | " + " | ".join(f"ε = {eps_label(e)}" for e in epsilons) + " | no privacy |",
        "|---|" + "---|" * (len(epsilons) + 1),
    ]
    for name, by_eps in rows.items():
        pivot.append(
            f"| {name} | " + " | ".join(by_eps.get(e, "—") for e in epsilons) + f" | {by_eps.get(None, '—')} |"
        )
    text = (
        f"{setting}, seeds 0-2 (mean ± std over seeds, accuracy in %), {rounds} rounds, delta 1e-4 per client "
        "(RDP); downstream accuracy on the real test set, final round. epsilon 10⁴ stands for ∞ (the "
        f"generators need a finite budget). Command: `{command}` (runs stored under `{out.name}/sweep/` are "
        "reused, not rerun).\n\n"
    )
    (out / "sweep.md").write_text(text + "\n".join(pivot) + "\n\n" + "\n".join(detail) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name, points in curves.items():
        eps, mean, std = zip(*sorted(points))
        ax.errorbar(eps, mean, yerr=std, marker="o", ms=3, capsize=3, label=name)
    if ceiling_line is not None:
        ax.axhline(ceiling_line[0], color="grey", ls="--", lw=1, label="ceiling (no privacy)")
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [eps_label(e).replace(" (10⁴)", "") for e in epsilons])
    ax.set_xlabel("epsilon per client (delta = 1e-4); ∞ = 10⁴")
    ax.set_ylabel("global test accuracy (mean ± std over seeds)")
    ax.set_title(f"{setting}: privacy-utility", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def projection(run_dir: Path, path: Path, per_class: int = 150) -> None:
    """PCA (fit on the real test embeddings) of real vs synthetic embeddings per class, per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.decomposition import PCA

    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config
    from protofl.config import RunConfig
    from protofl.engine.checkpoint import load_checkpoint

    cfg = resolve_config(RunConfig.from_toml(run_dir / "config.toml"))
    data = prepare_data(cfg)
    algo = get_algorithm(cfg.method_name).from_options(
        cfg.method_options, Task(data.input_shape, data.num_classes, cfg.model), cfg.privacy
    )
    state = load_checkpoint(run_dir / "checkpoint")["server_state"]
    real = algo.normalise(data.test_x)
    keep = torch.cat([torch.nonzero(data.test_y == c).flatten()[:per_class] for c in range(data.num_classes)])
    pca = PCA(2).fit(real[keep].numpy())
    samplers = list(algo.config.samplers)
    fig, axes = plt.subplots(
        1, 1 + len(samplers), figsize=(4 * (1 + len(samplers)), 4), sharex=True, sharey=True, constrained_layout=True
    )
    r2 = pca.transform(real[keep].numpy())
    axes[0].scatter(r2[:, 0], r2[:, 1], c=data.test_y[keep].numpy(), cmap="tab10", s=4)
    axes[0].set_title("real (test)")
    for ax, sampler in zip(axes[1:], samplers):
        x, y = algo.synthesise(state, sampler, seed=7, per_class=per_class)
        s2 = pca.transform(x.numpy())
        ax.scatter(s2[:, 0], s2[:, 1], c=y.numpy(), cmap="tab10", s=4)
        ax.set_title(f"synthetic: {sampler}")
    fig.suptitle(f"{run_dir.name}: PCA of real vs synthetic embeddings (colour = class)", fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
