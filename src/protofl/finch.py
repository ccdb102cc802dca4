"""FINCH (Sarfraz et al., CVPR 2019): parameter-free clustering by first neighbours.

Each point is linked to its first (nearest) neighbour; the connected components of the symmetric
graph in which ``i ~ j`` when ``j`` is ``i``'s first neighbour, ``i`` is ``j``'s, or both share the same
first neighbour, form the first partition. The cluster means are then clustered the same way, level
after level, which gives a hierarchy of ever coarser partitions. Written from the paper's description.

Two rules follow the authors' implementation (the paper leaves them implicit):

- above the first level, a first-neighbour link longer than the longest link of the first partition
  is dropped, so well separated groups are not chained together just because every cluster has
  *some* first neighbour;
- a level is kept only if it merges something and leaves more than one cluster (a single-cluster
  level appears only when the first partition already is one, e.g. for one or two points).

Not reproduced: that implementation also stops after a level that merges a single pair (we recurse
until nothing merges) and, when pruning, keeps a link between two clusters that share a first
neighbour if they are close enough to each other (we only keep or drop each direct link).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("cosine", "euclidean")


def first_neighbours(x: torch.Tensor, metric: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each row's nearest other row and the distance to it (``metric``: cosine or Euclidean)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    x = x.double()
    if metric == "cosine":
        u = F.normalize(x, dim=1)
        distance = 1 - u @ u.t()
    else:
        distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    nearest, index = distance.min(1)
    return index, nearest


def first_neighbour_partition(
    x: torch.Tensor, metric: str = "cosine", max_link: float = float("inf")
) -> tuple[torch.Tensor, float]:
    """Cluster labels (int64, ``0..k−1``) of the rows of ``x``, the connected components of the graph
    linking each row to its first neighbour unless farther than ``max_link`` (rows sharing a first
    neighbour are connected through it), and the longest link kept (0 for fewer than two rows)."""
    n = len(x)
    if n <= 1:
        return torch.zeros(n, dtype=torch.int64, device=x.device), 0.0
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    neighbour, distance = first_neighbours(x, metric)
    kept = distance <= max_link
    for i, j in zip(torch.nonzero(kept).flatten().tolist(), neighbour[kept].tolist()):
        parent[root(i)] = root(j)
    roots = torch.tensor([root(i) for i in range(n)], device=x.device)
    longest = float(distance[kept].max()) if kept.any() else 0.0
    return torch.unique(roots, return_inverse=True)[1], longest


def cluster_means(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``x`` per cluster label ``0..k−1``."""
    k = int(labels.max()) + 1
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums / torch.bincount(labels, minlength=k).to(x.dtype)[:, None]


def finch(x: torch.Tensor, metric: str = "cosine") -> list[torch.Tensor]:
    """The FINCH hierarchy over the rows of ``x``: one int64 label vector per level, finest (the first
    partition) first; every later level has fewer clusters, and more than one (see the module docstring)."""
    labels, longest_first_link = first_neighbour_partition(x, metric)
    levels = [labels]
    while len(labels) and int(labels.max()) + 1 > 1:
        k = int(labels.max()) + 1
        merged, _ = first_neighbour_partition(cluster_means(x.double(), labels), metric, longest_first_link)
        k_merged = int(merged.max()) + 1
        if k_merged in (1, k):
            break
        labels = merged[labels]
        levels.append(labels)
    return levels
