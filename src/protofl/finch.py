"""FINCH (Sarfraz et al., CVPR 2019): parameter-free clustering by first neighbours.

Each point is linked to its first (nearest) neighbour; the connected components of the symmetric
graph in which ``i ~ j`` when ``j`` is ``i``'s first neighbour, ``i`` is ``j``'s, or both share the same
first neighbour, form the first partition. The cluster means are clustered the same way, level after
level, until one cluster is left or nothing merges. Written from the paper's description.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

METRICS = ("cosine", "euclidean")


def first_neighbour_partition(x: torch.Tensor, metric: str = "cosine") -> np.ndarray:
    """Cluster labels (``0..k−1``) of the rows of ``x`` from the first-neighbour graph."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    n = len(x)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    x = x.double()
    if metric == "cosine":
        u = torch.nn.functional.normalize(x, dim=1)
        distance = 1 - u @ u.t()
    else:
        distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    first = distance.argmin(1).numpy()
    rows = np.arange(n)
    # i ~ first[i] (made symmetric by connected_components' "weak" connection); i ~ j when they share a
    # first neighbour is implied: both are linked to it.
    graph = coo_matrix((np.ones(n), (rows, first)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return labels.astype(np.int64)


def finch(x: torch.Tensor, metric: str = "cosine") -> list[np.ndarray]:
    """The FINCH hierarchy: one label vector over the rows of ``x`` per level, finest first."""
    levels: list[np.ndarray] = []
    labels = first_neighbour_partition(x, metric)
    while True:
        levels.append(labels)
        k = int(labels.max()) + 1 if len(labels) else 0
        if k <= 1:
            break
        means = cluster_means(x.double(), labels)
        merged = first_neighbour_partition(means, metric)
        if int(merged.max()) + 1 == k:
            break
        labels = merged[labels]
    return levels


def cluster_means(x: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Mean of the rows of ``x`` per cluster label ``0..k−1``."""
    index = torch.from_numpy(labels)
    k = int(labels.max()) + 1
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, index, x)
    counts = torch.bincount(index, minlength=k).to(x.dtype)
    return sums / counts[:, None]
