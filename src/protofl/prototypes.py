"""Per-class prototype accumulation with the ``update`` / ``compute`` / ``reset`` / ``merge`` shape of
a torchmetrics metric: the running state is per-class sums and counts, so partial accumulators (batches,
clients) combine by addition and the count-weighted mean of prototypes is exact."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class PrototypeAccumulator:
    """Accumulates per-class feature sums and counts.

    ``update(features, labels)`` adds samples; ``update_means(classes, means, counts)`` adds already
    averaged prototypes (a client's upload) with their counts, or with unit weight for an unweighted
    mean; ``compute()`` returns ``(classes, prototypes, counts)`` for the classes seen.
    """

    def __init__(self, num_classes: int, dim: int, dtype: torch.dtype = torch.float32, device: Any = "cpu"):
        self.num_classes = num_classes
        self.dim = dim
        self.sums = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        self.counts = torch.zeros(num_classes, dtype=dtype, device=device)

    @classmethod
    def per_client(
        cls, features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int
    ) -> list[PrototypeAccumulator]:
        """One accumulator per client from padded batches, as if each had ``update``-d its real rows:
        ``features`` (K, n, d), ``labels`` (K, n) and ``weight`` (K, n), 1 on real rows and 0 on
        padding; each holds its row of :meth:`stacked_sums`."""
        sums, counts = cls.stacked_sums(features, labels, weight, num_classes)
        return [cls.of(client_sums, client_counts) for client_sums, client_counts in zip(sums, counts)]

    @staticmethod
    def stacked_sums(
        features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every client's per-class sums (K, C, d) and counts (K, C) of its real rows (arguments as
        :meth:`per_client`), from one ``einsum``."""
        onehot = F.one_hot(labels, num_classes).to(features.dtype) * weight[..., None]  # (K, n, C)
        return torch.einsum("knc,knd->kcd", onehot, features), onehot.sum(1)

    @classmethod
    def of(cls, sums: torch.Tensor, counts: torch.Tensor) -> PrototypeAccumulator:
        """An accumulator holding ``sums`` (C, d) and ``counts`` (C,) as its state (the tensors themselves,
        not copies)."""
        acc = cls.__new__(cls)
        acc.num_classes, acc.dim = counts.shape[0], sums.shape[1]
        acc.sums, acc.counts = sums, counts
        return acc

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums.index_add_(0, labels, features.to(self.sums.dtype))
        self.counts += torch.bincount(labels, minlength=self.num_classes).to(self.counts.dtype)

    def update_means(self, classes: torch.Tensor, means: torch.Tensor, weights: torch.Tensor) -> None:
        weights = weights.to(self.sums.dtype)
        self.sums.index_add_(0, classes, means.to(self.sums.dtype) * weights[:, None])
        self.counts.index_add_(0, classes, weights)

    def merge(self, other: PrototypeAccumulator) -> None:
        self.sums += other.sums
        self.counts += other.counts

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        classes = torch.nonzero(self.counts > 0).flatten()
        counts = self.counts[classes]
        return classes, self.sums[classes] / counts[:, None], counts
