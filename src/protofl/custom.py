"""Bring your own data and model to ``protofl.run``.

- :class:`UserData`: a train pool and a test set as arrays ``(x, y)`` or torch ``Dataset``s of
  ``(x, y)`` pairs, with optional per-sample domain ids; ``protofl.run(config, dataset=UserData(...))``
  partitions the train pool by ``[partition]`` as it does a built-in dataset.
- A model factory ``factory(input_shape, num_classes, model_config) -> nn.Module``: the module follows
  the feature-model protocol (:func:`check_feature_model`): an integer ``feature_dim``, a submodule
  ``head`` mapping features to class logits, and ``forward(x) -> (features, logits)``. Subclassing
  :class:`protofl.models.FeatureNet` and writing ``features(x)`` gives all three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from protofl.algorithms.base import Task
from protofl.config import ConfigError, ModelConfig
from protofl.data.dataset import ArrayDataset, DatasetSplits

#: ``data.dataset`` of a run on data passed to ``protofl.run`` (``user:NAME``).
USER_PREFIX = "user:"

ModelFactory = Callable[[tuple[int, ...], int, ModelConfig], nn.Module]


def _arrays(part: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float32 and int64 arrays from a pair of arrays/tensors or a torch Dataset."""
    if isinstance(part, torch.utils.data.Dataset):
        if len(part) == 0:  # type: ignore[arg-type]
            raise ValueError(f"dataset {what}: the Dataset is empty")
        pairs = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs[:1]):
            raise ValueError(f"dataset {what}: a Dataset must yield (x, label) pairs")
        x = np.stack([np.asarray(p[0], dtype=np.float32) for p in pairs])
        y = np.asarray([int(p[1]) for p in pairs], dtype=np.int64)
        return x, y
    if not (isinstance(part, (tuple, list)) and len(part) == 2):
        raise ValueError(f"dataset {what}: expected (x, y) arrays or a torch Dataset of (x, label) pairs")
    x, y = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for v in part)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"dataset {what}: labels must be integers, got dtype {y.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class UserData:
    """A dataset of your own for ``protofl.run(..., dataset=UserData(...))``.

    ``train`` and ``test`` are ``(x, y)`` (numpy arrays or tensors; ``x`` of shape ``(N, C, H, W)``
    for images, ``(N, D)`` for feature vectors; ``y`` integer labels in ``[0, num_classes)``) or torch
    ``Dataset``s yielding ``(x, label)``. ``train_domains``/``test_domains`` (optional) give each
    sample's domain id (for ``partition.scheme = "domain"`` and per-domain test accuracy).
    ``name`` is recorded as ``data.dataset = "user:NAME"``."""

    train: Any
    test: Any
    num_classes: int | None = None
    train_domains: Any = None
    test_domains: Any = None
    domain_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ValueError(f"dataset name: {self.name!r} must be non-empty and without ':'")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"dataset num_classes: must be >= 2, got {self.num_classes}")
        if (self.train_domains is None) != (self.test_domains is None):
            raise ValueError("dataset domains: give both train_domains and test_domains, or neither")

    @property
    def dataset_name(self) -> str:
        return USER_PREFIX + self.name

    def splits(self) -> DatasetSplits:
        """The data as :class:`DatasetSplits`, checked (shapes, labels, domains)."""
        x_tr, y_tr = _arrays(self.train, "train")
        x_te, y_te = _arrays(self.test, "test")
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ValueError(f"dataset: train samples have shape {x_tr.shape[1:]} but test samples {x_te.shape[1:]}")
        num_classes = self.num_classes or int(max(y_tr.max(), y_te.max())) + 1
        if self.class_names and len(self.class_names) != num_classes:
            raise ValueError(f"dataset class_names: {len(self.class_names)} names for {num_classes} classes")
        train_domain, test_domain, names = self._domains(len(y_tr), len(y_te))
        try:
            train = ArrayDataset(x_tr, y_tr, num_classes, train_domain, names)
            test = ArrayDataset(x_te, y_te, num_classes, test_domain, names)
        except ValueError as exc:
            raise ValueError(f"dataset: {exc}") from None
        return DatasetSplits(self.dataset_name, train, test, tuple(self.class_names))

    def _domains(self, n_train: int, n_test: int):
        if self.train_domains is None:
            return None, None, ()
        train = np.asarray(self.train_domains, dtype=np.int64)
        test = np.asarray(self.test_domains, dtype=np.int64)
        if len(train) != n_train or len(test) != n_test:
            raise ValueError("dataset domains: one domain id per sample expected in train_domains and test_domains")
        count = int(max(train.max(), test.max())) + 1
        names = tuple(self.domain_names) or tuple(f"domain{d}" for d in range(count))
        if len(names) < count:
            raise ValueError(f"dataset domain_names: {len(names)} names for {count} domains")
        return train, test, names


def check_feature_model(model: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``model`` if it follows the feature-model protocol, else a ValueError saying what is missing."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory: returned {type(model).__name__}, not a torch.nn.Module")
    dim = getattr(model, "feature_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError("model factory: the module needs an integer attribute feature_dim (the width of its features)")
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise ValueError("model factory: the module needs a submodule named head (features -> class logits)")
    with torch.no_grad():
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        out = model(torch.zeros(2, *input_shape, device=device))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("model factory: forward(x) must return (features, logits)")
    features, logits = out
    if tuple(features.shape) != (2, dim) or tuple(logits.shape) != (2, num_classes):
        raise ValueError(
            f"model factory: forward(x) gave features {tuple(features.shape)} and logits "
            f"{tuple(logits.shape)} for 2 samples; expected (2, {dim}) and (2, {num_classes})"
        )
    return model


@dataclasses.dataclass(frozen=True)
class FactoryTask(Task):
    """A :class:`Task` whose model comes from a user's factory (checked against the protocol)."""

    factory: ModelFactory | None = None

    def __post_init__(self) -> None:
        if self.factory is None or not callable(self.factory):
            raise ValueError("model factory: expected a callable (input_shape, num_classes, model_config) -> nn.Module")

    def build_model(self):
        return check_feature_model(
            self.factory(self.input_shape, self.num_classes, self.model),
            self.input_shape,
            self.num_classes,
        )


def user_dataset_error(name: str) -> ConfigError:
    return ConfigError(
        f"data.dataset: {name!r} names data passed to protofl.run(dataset=...); "
        "pass the same data again (resuming such a run needs it too)"
    )
