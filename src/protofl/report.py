"""Readable reports: a run's own ``report.md`` and learning curves, and comparisons across runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protofl.errors import ReportError
from protofl.records import write_atomic
from protofl.report_input import load_history, load_summary


def _fmt(value: Any, pct: bool = True) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if pct else f"{value:.3g}"
    return str(value)


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:.3f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(history: list[dict[str, Any]], key: str, scale: float = 100.0) -> list[float]:
    return [float("nan") if row.get(key) is None else scale * row[key] for row in history]


def plot_learning_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Global accuracy (where some run has a global model), personalised accuracy (mean ± std over
    clients) and, where some run is private, the epsilon spent, against rounds: no empty panels."""
    plt = _plt()
    has_global = any(row.get("global_acc") is not None for _, history in runs for row in history)
    has_epsilon = any(row.get("privacy_epsilon_max") is not None for _, history in runs for row in history)
    panels = ["global"] * has_global + ["personal"] + ["epsilon"] * has_epsilon
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), constrained_layout=True, squeeze=False)
    ax = dict(zip(panels, axes[0]))
    for label, history in runs:
        rounds = [row["round"] for row in history]
        if has_global and any(row.get("global_acc") is not None for row in history):
            ax["global"].plot(rounds, _curve(history, "global_acc"), marker=".", label=label)
        mean = _curve(history, "personal_acc_mean")
        std = [100 * (row.get("personal_acc_std") or 0.0) for row in history]
        (line,) = ax["personal"].plot(rounds, mean, marker=".", label=label)
        ax["personal"].fill_between(
            rounds,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=line.get_color(),
            alpha=0.15,
        )
        if len(runs) <= 4 and any(row.get("personal_proto_acc_mean") is not None for row in history):
            ax["personal"].plot(
                rounds,
                _curve(history, "personal_proto_acc_mean"),
                ls="--",
                color=line.get_color(),
                label=f"{label} (nearest prototype)",
            )
        if has_epsilon and any(row.get("privacy_epsilon_max") is not None for row in history):
            ax["epsilon"].plot(
                rounds, _curve(history, "privacy_epsilon_max", 1.0), marker=".", color=line.get_color(), label=label
            )
    titles = {
        "global": ("Global test accuracy", "accuracy (%)"),
        "personal": ("Personalised accuracy (mean ± std over clients)", "accuracy (%)"),
        "epsilon": ("Privacy spent (most-spent client)", "epsilon"),
    }
    from matplotlib.ticker import MaxNLocator

    for name, axis in ax.items():
        axis.set(title=titles[name][0], xlabel="round", ylabel=titles[name][1])
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_clients(records: Sequence[dict[str, Any]], path: Path, metric: str = "personal_acc") -> Path:
    """The clients' ``metric`` in one round: its distribution (histogram) and against each client's
    number of training samples (marked by status)."""
    plt = _plt()
    fig, (hist, scatter) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    evaluated = [r for r in records if r.get(metric) is not None]
    values = [100 * r[metric] for r in evaluated]
    hist.hist(values, bins=min(20, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
    hist.set(title=f"{metric} over clients ({len(values)} clients)", xlabel="accuracy (%)", ylabel="clients")
    for status in sorted({r["status"] for r in evaluated}):
        group = [r for r in evaluated if r["status"] == status]
        scatter.scatter([r["samples"] for r in group], [100 * r[metric] for r in group], s=14, label=status)
    scatter.set(title="against the client's training samples", xlabel="training samples", ylabel="accuracy (%)")
    scatter.legend(fontsize=8, title="last round")
    from matplotlib.ticker import MaxNLocator

    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    scatter.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (hist, scatter):
        axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_report(run_dir: Path) -> str:
    """Markdown report of one run (written to ``run_dir/report.md`` by the runner)."""
    run_dir = Path(run_dir)
    s = load_summary(run_dir)
    history = load_history(run_dir)
    status = s.get("status", "completed")
    # a private Flower run's nodes keep their personalised metrics and training loss: say so, not "—"
    kept = s.get("diagnostics")

    def personal(value: Any, pct: bool = True) -> str:
        return kept if kept else _fmt(value, pct)

    lines = [
        f"# {s['method']} on {s['dataset']} ({s['features']})",
        "",
        *(
            [
                f"**Stopped early: {status}** after round {s.get('rounds_done')} of {s['rounds']}; the figures below "
                f"cover the rounds done (`protofl run --resume {run_dir}` continues an interrupted run).",
                "",
            ]
            if status != "completed"
            else []
        ),
        f"- Partition: {s['partition']['scheme']} ({_partition_text(s['partition'])}), {s['clients']} clients, "
        f"{s['rounds']} rounds, seed {s['seed']}.",
        f"- Wall time {s['wall_seconds']:.1f} s ({s['seconds_per_round']:.2f} s per round of training); "
        f"{_mb(s['bytes_up'])} MB up, {_mb(s['bytes_down'])} MB down in all; peak memory {s.get('peak_memory_mb', 0):.0f} MB.",
        f"- Privacy: {_privacy_text(s)}.",
        *_meaning_lines(s),
        f"- Ran with {_runtime_text(s)}.",
        "",
        "| | round | global acc (%) | personalised acc (%) | std |",
        "|---|---|---|---|---|",
    ]
    for name in ("final", "best"):
        r = s[name]
        lines.append(
            f"| {name} | {r.get('round')} | {_fmt(r.get('global_acc'))} | {personal(r.get('personal_acc_mean'))} "
            f"| {personal(r.get('personal_acc_std'))} |"
        )
    extra = [k for k in s["final"] if k.startswith("personal_") and k.endswith("_mean") and k != "personal_acc_mean"]
    for key in extra:
        lines.append(f"\n{key}: final {_fmt(s['final'][key])} %, best-round {_fmt(s['best'].get(key))} %.")
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if (run_dir / "partition_heatmap.png").exists():
        lines += [
            "![partition](partition_heatmap.png)",
            "",
            "Per-client class counts: [partition.md](partition.md).",
            "",
        ]
    lines += (
        _clients_section(run_dir, s)
        if not kept
        else [
            "## Clients",
            "",
            f"Each client's personalised metrics, training samples and classes held are {kept} (not sent to the "
            "server under the privacy mechanism; `privacy.share_diagnostics = true` sends them). Every client's "
            "status, bytes and epsilon in every evaluated round: [clients.csv](clients.csv).",
            "",
        ]
    )
    private = any(row.get("privacy_epsilon_max") is not None for row in history)
    lines += [
        "## Rounds",
        "",
        "| round | global acc | personalised acc | train loss | bytes up | bytes down | seconds |"
        + (" epsilon |" if private else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if private else ""),
    ]
    for row in history:
        lines.append(
            f"| {row['round']} | {_fmt(row.get('global_acc'))} | {personal(row.get('personal_acc_mean'))} | "
            f"{personal(row.get('train_loss'), pct=False)} | "
            f"{row['bytes_up']} | {row['bytes_down']} | "
            f"{row['round_seconds']:.2f} |"
            + (f" {_fmt(row.get('privacy_epsilon_max'), pct=False)} |" if private else "")
        )
    lines += ["", f"Reproduce: `protofl run {run_dir}/config.toml --out DIR`", ""]
    return "\n".join(lines)


def _runtime_text(s: dict[str, Any]) -> str:
    v = s.get("versions") or {}
    parts = [
        f"protofl {v.get('protofl', '?')}"
        + (
            f" (commit {s['commit'][:12]}{', uncommitted changes' if s['commit'].endswith('-dirty') else ''})"
            if s.get("commit")
            else ""
        ),
        f"torch {v.get('torch', '?')}",
    ]
    if v.get("flwr"):
        parts.append(f"flwr {v['flwr']}")
    if v.get("python"):
        parts.append(f"Python {v['python']}")
    if s.get("device"):
        parts.append(f"device {s['device']}")
    if s.get("threads"):
        parts.append(f"{s['threads']} torch threads")
    return ", ".join(parts)


def _clients_section(run_dir: Path, s: dict[str, Any]) -> list[str]:
    """The per-client distribution (plot written next to report.md) and the worst clients."""
    from protofl.client_records import ClientTable

    records = ClientTable(run_dir / "clients.csv").last_round()
    if not any(r.get("personal_acc") is not None for r in records):
        return []
    plot_clients(records, run_dir / "clients.png")
    figures = s.get("per_client") or {}
    by_id = {r["client"]: r for r in records}
    lines = [
        "## Clients",
        "",
        f"Round {records[0]['round']}: personalised accuracy of the worst client "
        f"{_fmt(figures.get('personal_acc_worst'))} %, 10th percentile {_fmt(figures.get('personal_acc_p10'))} %"
        + (
            f"; epsilon spent max {figures['epsilon_max']:.3f}, mean {figures['epsilon_mean']:.3f}"
            if figures.get("epsilon_max") is not None
            else ""
        )
        + ". Every client in every evaluated round: [clients.csv](clients.csv).",
        "",
        "![clients](clients.png)",
        "",
        "| worst clients | personalised acc (%) | train samples | classes | epsilon | status |",
        "|---|---|---|---|---|---|",
    ]
    for k in figures.get("worst_clients", []):
        r = by_id.get(k, {})
        eps = "—" if r.get("epsilon") is None else f"{r['epsilon']:.3f}"
        lines.append(
            f"| {k} | {_fmt(r.get('personal_acc'))} | {r.get('samples')} | {r.get('classes')} | {eps} | "
            f"{r.get('status')} |"
        )
    return [*lines, ""]


def _privacy_text(s: dict[str, Any]) -> str:
    p = s.get("privacy")
    if s["epsilon"] is None or not p:
        return "not private (clients release their prototypes or models as they are)"
    selection = (
        f", private top-k selection at epsilon {p['selection_epsilon_per_release']:.3g} per release"
        if p.get("selection_epsilon_per_release")
        else ""
    )
    return (
        f"{p['mechanism']} on every released prototype, Gaussian noise multiplier {p['noise_multiplier']:.3f}{selection}; "
        f"spent epsilon {s['epsilon']:.3f} of {p['epsilon_budget']:g} at delta {s['delta']:.1g} "
        f"(most-spent client, {p['accountant']} accountant; PLD {_num(p['epsilon_pld_max'])}, RDP {_num(p['epsilon_rdp_max'])}) "
        f"over {p['max_releases_by_a_client']} releases"
        + (f"; sensitivity rule {p['sensitivity']}" if p.get("sensitivity") else "")
    )


def _meaning_lines(s: dict[str, Any]) -> list[str]:
    """What the run's epsilon means (the privacy statement of summary.json), where it has one."""
    p = s.get("privacy") or {}
    if "relation" not in p:
        return []
    covered = p.get("not_covered") or []
    return [
        f"- What epsilon means here: the unit is {p['unit']}; neighbours differ by {p['relation_text']} "
        f"(`{p['relation']}`); sensitivity rule `{p['sensitivity']}`; noise source `{p['noise_source']}`.",
        "- Not covered by epsilon: " + ("; ".join(covered) if covered else "nothing beyond the above") + ".",
        *(
            [f"- Training loss, personalised test metrics and client data profiles: {p['diagnostics']}."]
            if p.get("diagnostics")
            else []
        ),
    ]


def _num(value: float | None) -> str:
    return "not computed" if value is None else f"{value:.3f}"


def _partition_text(p: dict[str, Any]) -> str:
    parts = []
    if p["scheme"] == "dirichlet":
        parts.append(f"alpha={p['alpha']}")
    if p["scheme"] == "pathological":
        parts.append(f"{p['classes_per_client']} classes per client")
    if p.get("imbalance_factor", 1) > 1:
        parts.append(f"long tail, imbalance {p['imbalance_factor']:g}")
    return ", ".join(parts) or "—"


def check_report_folder(out_dir: Path, run_dirs: Sequence[Path]) -> None:
    """Refuse (:class:`ReportError`) to write a comparison into a run folder or over a file."""
    from protofl.rundir import LOCK_NAME, is_run_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: not a folder")
    inside = any(out_dir.resolve() == Path(d).resolve() for d in run_dirs)
    if inside or is_run_folder(out_dir) or (out_dir / "summary.json").exists() or (out_dir / LOCK_NAME).exists():
        raise ReportError(f"--out {out_dir} is a run folder; a report is never written into one (choose another --out)")


# -- comparisons across runs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class RunRecord:
    """A run folder as a comparison sees it: its summary, its history and its effective settings
    (flat ``section.key`` -> value, the seed apart)."""

    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    settings: dict[str, Any]

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        from protofl.config import RunConfig, effective_settings

        run_dir = Path(run_dir)
        summary = load_summary(run_dir)
        if not (run_dir / "config.toml").exists():
            raise FileNotFoundError(f"{run_dir} has no config.toml: not a protofl run folder")
        settings = effective_settings(RunConfig.from_toml(run_dir / "config.toml"))
        settings.pop("seed", None)
        if not any(k.startswith("privacy.") for k in settings):  # privacy off: its settings change nothing
            settings["privacy.mechanism"] = "none"
        return cls(run_dir, summary, load_history(run_dir), settings)

    @property
    def status(self) -> str:
        return self.summary.get("status", "completed")


def find_run_folders(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Run folders among ``paths``: a folder with config.toml is one; another folder (a sweep's) stands
    for the run folders below it. Returns ``(with summary.json, without)``: the second are runs
    killed before writing any summary (resume them)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        if (path / "config.toml").exists() or (path / "summary.json").exists():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("config.toml"))
        if not below:
            raise FileNotFoundError(f"{path} is not a protofl run folder and holds none (no config.toml)")
        found += below
    return [p for p in found if (p / "summary.json").exists()], [p for p in found if not (p / "summary.json").exists()]


def varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The settings that take different values among the runs that have them (a setting only some runs
    have, e.g. the privacy budget of private runs, is shown as — for the others)."""
    keys = sorted({k for r in runs for k in r.settings})
    return [k for k in keys if len({repr(r.settings[k]) for r in runs if k in r.settings}) > 1]


def group_runs(runs: Sequence[RunRecord], keys: Sequence[str]) -> dict[tuple, list[RunRecord]]:
    """Runs grouped by their values of ``keys`` (in first-seen order); seeds of one setting share a group."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(r.settings.get(k) for k in keys), []).append(r)
    return groups


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and (population) standard deviation of the values that are not None, and their count."""
    import numpy as np

    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    return float(np.mean(present)), float(np.std(present)), len(present)


def _ms(values: Sequence[float | None], pct: bool = True) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "—"
    assert std is not None  # given with the mean
    scale = 100 if pct else 1
    std = std if std > 1e-9 * max(abs(mean), 1.0) else 0.0  # float noise of equal values
    text = f"{scale * mean:.2f}" if pct else f"{mean:.3g}"
    return text + (f" ± {scale * std:.2f}" if pct else f" ± {std:.2g}") if n > 1 else text


def _value(value: Any) -> str:
    return "—" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _label(keys: Sequence[str], values: Sequence[Any]) -> str:
    """``mechanism=vpp, epsilon=4`` (settings a group lacks are left out)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_value(v)}" for k, v in zip(keys, values) if v is not None) or "runs"


def _status_text(runs: Sequence[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def mean_history(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The mean over runs of the curves' metrics, at the rounds every run evaluated."""
    keys = ("global_acc", "personal_acc_mean", "personal_acc_std", "personal_proto_acc_mean", "privacy_epsilon_max")
    common = set.intersection(*({row["round"] for row in r.history} for r in runs)) if runs else set()
    out = []
    for rnd in sorted(common):
        rows = [next(row for row in r.history if row["round"] == rnd) for r in runs]
        out.append({"round": rnd, **{k: mean_std([row.get(k) for row in rows])[0] for k in keys}})
    return out


def plot_privacy_utility(groups: Mapping[tuple, list[RunRecord]], keys: Sequence[str], path: Path) -> Path | None:
    """Personalised accuracy (mean ± std over seeds) against the epsilon budget, one line per setting
    of the other varying keys (e.g. method × mechanism); runs without privacy are horizontal
    references. None (nothing drawn) unless ``privacy.epsilon`` varies among private runs."""
    if "privacy.epsilon" not in keys:
        return None
    plt = _plt()
    at = keys.index("privacy.epsilon")
    others = [i for i, k in enumerate(keys) if i != at]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    references: dict[str, tuple[float, float]] = {}
    for values, runs in groups.items():
        label = _label([keys[i] for i in others], [values[i] for i in others])
        mean, std, _ = mean_std([r.summary["final"].get("personal_acc_mean") for r in runs])
        if mean is None:
            continue
        assert std is not None  # given with the mean
        if values[at] is None:  # not private: the budget is not part of its effective settings
            references[label] = (mean, std)
        else:
            lines.setdefault(label, []).append((float(values[at]), mean, std))
    if not any(len(points) > 1 for points in lines.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for label, points in sorted(lines.items()):
        points.sort()
        ax.errorbar(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            yerr=[100 * p[2] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    for label, (mean, std) in sorted(references.items()):
        line = ax.axhline(
            100 * mean, ls="--", lw=1, color="grey" if len(references) == 1 else None, label=f"{label} (no privacy)"
        )
        ax.axhspan(100 * (mean - std), 100 * (mean + std), color=line.get_color(), alpha=0.1)
    ax.set_xscale("log")
    eps = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    shared = {(r.summary["method"], r.summary["dataset"]) for members in groups.values() for r in members}
    what = f": {next(iter(shared))[0]} on {next(iter(shared))[1]}" if len(shared) == 1 else ""
    ax.set(
        title=f"Privacy–utility{what} (mean ± std over seeds)",
        xlabel="epsilon budget per client",
        ylabel="personalised accuracy, final round (%)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``comparison.md``, ``learning_curves.png`` and (when epsilon varies)
    ``privacy_utility.png`` into ``out_dir``.

    ``run_dirs`` are run folders or folders holding them (a sweep's). Runs are grouped by the
    settings in which their resolved configurations differ (not by folder names): seeds of one
    setting form a group, reported as mean ± std. Runs that stopped early are included and marked;
    runs killed before writing a summary are listed apart."""
    out_dir = Path(out_dir)
    check_report_folder(out_dir, run_dirs)
    done, unfinished = find_run_folders(run_dirs)
    runs = [RunRecord.load(d) for d in done]
    if not runs:
        raise FileNotFoundError(
            f"no run in {', '.join(map(str, run_dirs))} has a summary.json yet "
            "(killed before its first summary: resume it)"
        )
    keys = varying_keys(runs)
    groups = group_runs(runs, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(
        [(_label(keys, values), mean_history(members)) for values, members in groups.items()],
        out_dir / "learning_curves.png",
    )
    privacy_plot = plot_privacy_utility(groups, keys, out_dir / "privacy_utility.png")

    group_rows = []
    for values, members in groups.items():
        summaries = [m.summary for m in members]
        group_rows.append(
            "| "
            + " | ".join(_value(v) for v in values)
            + (" | " if values else "")
            + f"{len(members)} | {', '.join(str(x['seed']) for x in summaries)} | {_status_text(members)} | "
            f"{_ms([x['final'].get('global_acc') for x in summaries])} | {_ms([x['final'].get('personal_acc_mean') for x in summaries])} | "
            f"{_ms([(x.get('per_client') or {}).get('personal_acc_worst') for x in summaries])} | "
            f"{_ms([x.get('epsilon') for x in summaries], pct=False)} | "
            f"{_ms([x['seconds_per_round'] for x in summaries], pct=False)} |"
        )
    rows = []
    for r in runs:
        s = r.summary
        rows.append(
            f"| {r.path.name} | {s['method']} | {s['dataset']} | {s['partition']['scheme']} | {s['clients']} | "
            f"{s.get('rounds_done', s['rounds'])}/{s['rounds']} | {s['seed']} | {_fmt(s['final']['global_acc'])} | "
            f"{_fmt(s['best']['global_acc'])} | "
            f"{_fmt(s['final']['personal_acc_mean'])} ± {_fmt(s['final']['personal_acc_std'])} | "
            f"{_fmt(s['best']['personal_acc_mean'])} | {s['seconds_per_round']:.2f} | "
            f"{_mb(s['bytes_up'] / max(s.get('rounds_done') or s['rounds'], 1))} | "
            f"{_mb(s['bytes_down'] / max(s.get('rounds_done') or s['rounds'], 1))} | "
            f"{'—' if s['epsilon'] is None else format(s['epsilon'], '.3g')} | "
            f"{r.status if r.status == 'completed' else f'**{r.status}**'} |"
        )
    header = [*keys, "runs", "seeds", "status"]
    table = [
        "# Run comparison",
        "",
        "Accuracies in %; personalised accuracy is the mean over clients of each client's accuracy on its own "
        "test split; the worst client is the lowest of them. Bytes are MB per round.",
        "",
        "## By setting",
        "",
        (
            "Runs grouped by the settings in which their resolved configurations differ: "
            + ", ".join(f"`{k}`" for k in keys)
            if keys
            else "All runs share one setting"
        )
        + "; mean ± std over the runs (seeds) of each group, final round; epsilon is the most-spent client's.",
        "",
        "| " + " | ".join(header) + " | global acc | personalised acc | worst client | epsilon spent | s/round |",
        "|" + "---|" * (len(header) + 5),
        *group_rows,
        "",
        *([f"![privacy-utility]({privacy_plot.name})", ""] if privacy_plot else []),
        "![learning curves](learning_curves.png)",
        "",
        "## Runs",
        "",
        "| run | method | dataset | partition | clients | rounds | seed | global final | global best | "
        "personal final | personal best | s/round | MB up | MB down | epsilon | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if unfinished:
        table += [
            "Killed before writing a summary (continue with `protofl run --resume DIR`): "
            + ", ".join(f"`{p}`" for p in unfinished),
            "",
        ]
    path = out_dir / "comparison.md"
    write_atomic(path, "\n".join(table))
    return path
