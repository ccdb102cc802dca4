"""In-memory datasets: arrays of samples and integer labels, split into train and test."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """Where fetched datasets and embeddings are cached.

    ``PROTOFL_CACHE`` if set, else ``$XDG_CACHE_HOME/protofl``, else ``~/.cache/protofl``.
    """
    root = os.environ.get("PROTOFL_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "protofl"


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Samples ``x`` (images ``(N, C, H, W)`` float32 in [0, 1], or embeddings ``(N, D)``) and labels.

    ``domain`` (optional) gives each sample's domain index into ``domain_names``.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    domain: np.ndarray | None = None
    domain_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")
        if self.y.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.y.shape}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{self.y.min()}, {self.y.max()}]")
        if self.domain is not None and len(self.domain) != len(self.y):
            raise ValueError("domain must have one entry per sample")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(
            self.x[index],
            self.y[index],
            self.num_classes,
            None if self.domain is None else self.domain[index],
            self.domain_names,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A named dataset: a training pool (to be partitioned) and a held-out test set."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return self.train.num_classes
