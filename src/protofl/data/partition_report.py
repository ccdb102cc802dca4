"""Describing a :class:`~protofl.data.partition.Partition`: a markdown table, summary statistics and
a heat map of samples per client and class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protofl.data.partition import Partition

__all__ = ["partition_table", "partition_summary", "plot_partition_heatmap", "label_skew"]


def _class_names(partition: Partition, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(partition.num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != partition.num_classes:
        raise ValueError(f"class_names: expected {partition.num_classes} names, got {len(names)}")
    return names


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def partition_table(
    partition: Partition,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    max_clients: int | None = None,
) -> str:
    """A markdown table: one row per client with ``n_train``, ``n_test`` and its train count of
    every class, then a ``total`` row. ``labels`` are the training pool's labels. With
    ``max_clients``, only the first that many clients are listed (the total covers all of them)."""
    names = _class_names(partition, class_names)
    train = partition.class_counts(labels, "train")
    n_test = partition.sizes("test")
    K = partition.num_clients
    shown = K if max_clients is None else max(0, min(K, int(max_clients)))
    header = ["client", "n_train", "n_test", *(_cell(n) for n in names)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:"] * len(header)) + "|",
    ]
    for k in range(shown):
        row = [str(k), str(int(train[k].sum())), str(int(n_test[k])), *(str(int(v)) for v in train[k])]
        lines.append("| " + " | ".join(row) + " |")
    if shown < K:
        lines.append("| " + " | ".join([f"... ({K - shown} more)"] + [""] * (len(header) - 1)) + " |")
    total = ["total", str(int(train.sum())), str(int(n_test.sum())), *(str(int(v)) for v in train.sum(0))]
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines) + "\n"


def label_skew(counts: np.ndarray) -> np.ndarray:
    """Total-variation distance of each client's label distribution from the pooled one.

    ``counts`` is ``(num_clients, num_classes)``; the pooled distribution is ``counts.sum(0)``
    normalised. ``TV = 0.5 * sum_c |p_k(c) - p(c)|`` lies in ``[0, 1]``: 0 for IID clients, near 1
    when a client holds only classes that are rare overall. Clients with no samples get ``nan``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return np.full(len(counts), np.nan)
    glob = counts.sum(0) / total
    sizes = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        local = counts / sizes
    return 0.5 * np.abs(local - glob).sum(1)


def partition_summary(partition: Partition, labels: np.ndarray) -> dict[str, Any]:
    """JSON-friendly statistics of a partition (train + test of each client unless noted).

    Keys: ``num_clients``, ``num_classes``, ``pool_size``, ``train_sizes``, ``test_sizes``, ``sizes``
    (per client), ``classes_per_client`` (classes with at least one sample, per client),
    ``mean_size``, ``min_size``, ``max_size``, ``std_size``, ``mean_classes_per_client``,
    ``class_totals`` (kept samples per class), ``label_skew_tv`` (mean over clients of the
    total-variation distance of the client's label distribution from the pooled one, see
    :func:`label_skew`; 0 means IID) and ``max_label_skew_tv``.
    """
    counts = partition.class_counts(labels, "all")
    sizes = counts.sum(1)
    classes = (counts > 0).sum(1)
    tv = label_skew(counts)
    finite = tv[np.isfinite(tv)]
    return {
        "num_clients": partition.num_clients,
        "num_classes": partition.num_classes,
        "pool_size": int(len(partition.pool_index)),
        "train_sizes": partition.sizes("train").tolist(),
        "test_sizes": partition.sizes("test").tolist(),
        "sizes": sizes.tolist(),
        "classes_per_client": classes.tolist(),
        "mean_size": float(sizes.mean()) if len(sizes) else 0.0,
        "min_size": int(sizes.min()) if len(sizes) else 0,
        "max_size": int(sizes.max()) if len(sizes) else 0,
        "std_size": float(sizes.std()) if len(sizes) else 0.0,
        "mean_classes_per_client": float(classes.mean()) if len(classes) else 0.0,
        "class_totals": counts.sum(0).tolist(),
        "label_skew_tv": float(finite.mean()) if finite.size else float("nan"),
        "max_label_skew_tv": float(finite.max()) if finite.size else float("nan"),
    }


def plot_partition_heatmap(
    partition: Partition,
    labels: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    max_clients: int = 100,
    *,
    split: str = "all",
    title: str | None = None,
) -> Path:
    """Write a PNG heat map of samples per client (rows) and class (columns) to ``path``.

    ``split`` picks the counts (``"all"``: train + test, ``"train"`` or ``"test"``). Only the first
    ``max_clients`` clients are drawn (the title says so when there are more); counts are written in
    the cells when the grid is small. Uses matplotlib's Agg canvas directly (no pyplot, no display,
    no change to the global backend). Returns the path written.
    """
    # Imported here: matplotlib is slow to import and only needed for plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if max_clients < 1:
        raise ValueError(f"max_clients: must be >= 1, got {max_clients}")
    names = _class_names(partition, class_names)
    counts = partition.class_counts(labels, split)
    K, C = counts.shape
    shown = min(K, int(max_clients))
    grid = counts[:shown]

    width = min(max(4.0, 0.45 * C + 2.5), 24.0)
    height = min(max(3.0, 0.28 * shown + 1.8), 30.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("samples")

    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if C <= 40:
        ax.set_xticks(range(C))
        ax.set_xticklabels(names, rotation=90 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    if shown <= 50:
        ax.set_yticks(range(shown))
        ax.set_yticklabels([str(k) for k in range(shown)], fontsize=7)

    if shown * C <= 400:
        vmax = grid.max() if grid.size else 0
        for k in range(shown):
            for c in range(C):
                value = int(grid[k, c])
                if value:
                    colour = "black" if value > 0.6 * vmax else "white"
                    ax.text(c, k, str(value), ha="center", va="center", fontsize=7, color=colour)

    split_text = {"all": "train + test", "train": "train", "test": "test"}[split]
    heading = title or f"samples per client and class ({split_text})"
    if shown < K:
        heading += f"\nfirst {shown} of {K} clients"
    ax.set_title(heading, fontsize=10)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
