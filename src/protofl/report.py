"""Readable reports: a run's own ``report.md`` and learning curves, and comparisons across runs."""

from __future__ import annotations

from collections.abc import Sequence
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


def plot_learning_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Global accuracy and personalised accuracy (mean ± std over clients) against rounds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, history in runs:
        rounds = [row["round"] for row in history]
        glob = [row.get("global_acc") for row in history]
        if any(v is not None for v in glob):
            axes[0].plot(rounds, [float("nan") if v is None else 100 * v for v in glob], marker=".", label=label)
        mean = [float("nan") if row.get("personal_acc_mean") is None else 100 * row["personal_acc_mean"] for row in history]
        std = [100 * (row.get("personal_acc_std") or 0.0) for row in history]
        line, = axes[1].plot(rounds, mean, marker=".", label=label)
        axes[1].fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=line.get_color(), alpha=0.15)
        proto = [row.get("personal_proto_acc_mean") for row in history]
        if any(v is not None for v in proto):
            axes[1].plot(rounds, [float("nan") if v is None else 100 * v for v in proto], ls="--",
                         color=line.get_color(), label=f"{label} (nearest prototype)")
    axes[0].set(title="Global test accuracy", xlabel="round", ylabel="accuracy (%)")
    axes[1].set(title="Personalised accuracy (mean ± std over clients)", xlabel="round", ylabel="accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not axes[0].lines:
        axes[0].text(0.5, 0.5, "no global model", ha="center", va="center", transform=axes[0].transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_report(run_dir: Path) -> str:
    """Markdown report of one run (written to ``run_dir/report.md`` by the runner)."""
    run_dir = Path(run_dir)
    s = load_summary(run_dir)
    history = load_history(run_dir)
    lines = [
        f"# {s['method']} on {s['dataset']} ({s['features']})",
        "",
        f"- Partition: {s['partition']['scheme']} ({_partition_text(s['partition'])}), {s['clients']} clients, "
        f"{s['rounds']} rounds, seed {s['seed']}.",
        f"- Wall time {s['wall_seconds']:.1f} s ({s['seconds_per_round']:.2f} s per round of training); "
        f"{_mb(s['bytes_up'])} MB up, {_mb(s['bytes_down'])} MB down in all; peak memory {s.get('peak_memory_mb', 0):.0f} MB.",
        f"- Privacy: {_privacy_text(s)}.",
        "",
        "| | round | global acc (%) | personalised acc (%) | std |",
        "|---|---|---|---|---|",
    ]
    for name in ("final", "best"):
        r = s[name]
        lines.append(f"| {name} | {r.get('round')} | {_fmt(r.get('global_acc'))} | {_fmt(r.get('personal_acc_mean'))} "
                     f"| {_fmt(r.get('personal_acc_std'))} |")
    extra = [k for k in s["final"] if k.startswith("personal_") and k.endswith("_mean") and k != "personal_acc_mean"]
    for key in extra:
        lines.append(f"\n{key}: final {_fmt(s['final'][key])} %, best-round {_fmt(s['best'].get(key))} %.")
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if (run_dir / "partition_heatmap.png").exists():
        lines += ["![partition](partition_heatmap.png)", "", "Per-client class counts: [partition.md](partition.md).", ""]
    lines += ["## Rounds", "", "| round | global acc | personalised acc | train loss | bytes up | bytes down | seconds |",
              "|---|---|---|---|---|---|---|"]
    for row in history:
        lines.append(f"| {row['round']} | {_fmt(row.get('global_acc'))} | {_fmt(row.get('personal_acc_mean'))} | "
                     f"{_fmt(row.get('train_loss'), pct=False)} | {row['bytes_up']} | {row['bytes_down']} | "
                     f"{row['round_seconds']:.2f} |")
    lines += ["", f"Reproduce: `protofl run {run_dir}/config.toml --out DIR`", ""]
    return "\n".join(lines)


def _privacy_text(s: dict[str, Any]) -> str:
    p = s.get("privacy")
    if s["epsilon"] is None or not p:
        return "not private (clients release their prototypes or models as they are)"
    selection = (f", private top-k selection at epsilon {p['selection_epsilon_per_release']:.3g} per release"
                 if p.get("selection_epsilon_per_release") else "")
    return (f"{p['mechanism']} on every released prototype, Gaussian noise multiplier {p['noise_multiplier']:.3f}{selection}; "
            f"spent epsilon {s['epsilon']:.3f} of {p['epsilon_budget']:g} at delta {s['delta']:.1g} "
            f"(most-spent client, {p['accountant']} accountant; PLD {_num(p['epsilon_pld_max'])}, RDP {_num(p['epsilon_rdp_max'])}) "
            f"over {p['max_releases_by_a_client']} releases"
            + (f"; sensitivity rule {p['sensitivity']}" if p.get("sensitivity") else ""))


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


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``comparison.md`` (one row per run) and ``learning_curves.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    check_report_folder(out_dir, run_dirs)
    rows, curves = [], []
    for run_dir in run_dirs:
        s = load_summary(run_dir)
        label = f"{s['method']} ({Path(run_dir).name})"
        curves.append((label, load_history(run_dir)))
        rows.append(
            f"| {Path(run_dir).name} | {s['method']} | {s['dataset']} | {s['partition']['scheme']} | {s['clients']} | "
            f"{s['rounds']} | {s['seed']} | {_fmt(s['final']['global_acc'])} | {_fmt(s['best']['global_acc'])} | "
            f"{_fmt(s['final']['personal_acc_mean'])} ± {_fmt(s['final']['personal_acc_std'])} | "
            f"{_fmt(s['best']['personal_acc_mean'])} | {s['seconds_per_round']:.2f} | "
            f"{_mb(s['bytes_up'] / s['rounds'])} | {_mb(s['bytes_down'] / s['rounds'])} | "
            f"{'—' if s['epsilon'] is None else format(s['epsilon'], '.3g')} |"
        )
    table = [
        "# Run comparison",
        "",
        "Accuracies in %; personalised accuracy is the mean ± std over clients of each client's accuracy on its "
        "own test split. Bytes are MB per round.",
        "",
        "| run | method | dataset | partition | clients | rounds | seed | global final | global best | "
        "personal final | personal best | s/round | MB up | MB down | epsilon |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(curves, out_dir / "learning_curves.png")
    path = out_dir / "comparison.md"
    write_atomic(path, "\n".join(table))
    return path
