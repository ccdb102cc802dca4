"""The dataset registry: a name → a :class:`~protofl.data.dataset.DatasetSplits`.

Built in: ``mnist``, ``fashion-mnist`` (official splits, ``(N, 1, 28, 28)``), ``optdigits`` (scikit-learn's
8x8 digits with a fixed stratified 30 % test split), ``digits-domains`` (four digit domains, see
:mod:`protofl.data.digits_domains`). Files a user already holds: ``idx:/path/to/folder`` (MNIST-format
IDX files) and ``cifar:/path/to/folder`` (CIFAR-10/100 python batches). ``synthetic-gaussian`` is not
data but a benchmark workload (Gaussian classes, generated from a seed, see :func:`synthetic_gaussian`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protofl.data import formats, sources
from protofl.data.dataset import ArrayDataset, DatasetSplits
from protofl.errors import ProtoflError

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "PATH_LOADERS",
    "UnknownDatasetError",
    "dataset_names",
    "load_dataset",
    "resize_images",
    "synthetic_gaussian",
]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Seed and fraction of the fixed OptDigits train/test split (shared with the digits-domains benchmark).
OPTDIGITS_TEST_FRACTION = 0.3
OPTDIGITS_SPLIT_SEED = 0


class UnknownDatasetError(ProtoflError, KeyError, ValueError):
    """No dataset of that name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


def resize_images(x: np.ndarray, size: int, *, batch_size: int = 4096) -> np.ndarray:
    """Resize ``(N, C, H, W)`` images to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {x.shape}")
    if x.shape[2] == size and x.shape[3] == size:
        return x
    shrink = size < x.shape[2] or size < x.shape[3]
    out = np.empty((x.shape[0], x.shape[1], size, size), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            t = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
            out[i : i + batch_size] = r.clamp_(0.0, 1.0).numpy()
    return out


def _resized(splits: DatasetSplits, image_size: int | None) -> DatasetSplits:
    if image_size is None or splits.train.x.shape[-1] == image_size and splits.train.x.shape[-2] == image_size:
        return splits
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")

    def one(d: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(resize_images(d.x, image_size), d.y, d.num_classes, d.domain, d.domain_names)

    return DatasetSplits(splits.name, one(splits.train), one(splits.test), splits.class_names)


# --------------------------------------------------------------------------------------------------
# Loaders. Each takes (image_size, progress, **options) and returns DatasetSplits.


def _load_mnist(image_size: int | None = None, progress: bool = True) -> DatasetSplits:
    folder = sources.fetch("mnist")
    splits = formats.load_idx_folder(folder, name="mnist", num_classes=10, class_names=DIGIT_CLASSES)
    return _resized(splits, image_size)


def _load_fashion_mnist(image_size: int | None = None, progress: bool = True) -> DatasetSplits:
    folder = sources.fetch("fashion-mnist")
    splits = formats.load_idx_folder(folder, name="fashion-mnist", num_classes=10, class_names=FASHION_MNIST_CLASSES)
    return _resized(splits, image_size)


def optdigits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OptDigits as (x_train, y_train, x_test, y_test): images ``(N, 1, 8, 8)`` float32 in [0, 1].

    The test split is a fixed stratified 30 % (seed 0), so it is balanced and the same on every call.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=OPTDIGITS_TEST_FRACTION, stratify=y, random_state=OPTDIGITS_SPLIT_SEED
    )
    return x_tr, y_tr, x_te, y_te


def _load_optdigits(image_size: int | None = None, progress: bool = True) -> DatasetSplits:
    x_tr, y_tr, x_te, y_te = optdigits_arrays()
    splits = DatasetSplits("optdigits", ArrayDataset(x_tr, y_tr, 10), ArrayDataset(x_te, y_te, 10), DIGIT_CLASSES)
    return _resized(splits, image_size)


def _load_digits_domains(image_size: int | None = None, progress: bool = True, **options: Any) -> DatasetSplits:
    from protofl.data.digits_domains import build_digits_domains

    return _resized(build_digits_domains(progress=progress, **options), image_size)


#: Dataset name -> loader ``(image_size=None, progress=True, **options) -> DatasetSplits``.
DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "optdigits": _load_optdigits,
    "digits-domains": _load_digits_domains,
}

#: Class names of the built-in datasets.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": DIGIT_CLASSES,
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "optdigits": DIGIT_CLASSES,
    "digits-domains": DIGIT_CLASSES,
}


def _load_idx_path(path: str, image_size: int | None = None, progress: bool = True, **options: Any) -> DatasetSplits:
    splits = formats.load_idx_folder(Path(path).expanduser(), name=f"idx:{path}", **options)
    return _resized(splits, image_size)


def _load_cifar_path(path: str, image_size: int | None = None, progress: bool = True, **options: Any) -> DatasetSplits:
    splits = formats.load_cifar_folder(Path(path).expanduser(), name=f"cifar:{path}", **options)
    return _resized(splits, image_size)


SYNTHETIC_GAUSSIAN = "synthetic-gaussian"
#: Options of ``synthetic-gaussian`` and their defaults (the speed benchmark's workload).
SYNTHETIC_GAUSSIAN_OPTIONS: dict[str, int] = {"train": 2000, "test": 200, "dim": 32, "classes": 10, "seed": 0}


def synthetic_gaussian(
    train: int = 2000, test: int = 200, dim: int = 32, classes: int = 10, seed: int = 0
) -> DatasetSplits:
    """A benchmark workload, not data: ``classes`` Gaussian class means in ``dim`` dimensions (standard
    normal entries), each sample its class mean plus unit Gaussian noise, labels uniform; ``train``
    samples in the pool and ``test`` held out, float32 ``(N, dim)``. Deterministic for a ``seed`` (numpy's
    default generator), so every process of a run (e.g. Flower's nodes) builds the same set."""
    for key, value in (("train", train), ("test", test), ("dim", dim), ("classes", classes), ("seed", seed)):
        _check_synthetic(key, value)
    _check_synthetic_size(train, test, dim)
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))

    def draw(n: int) -> ArrayDataset:
        y = rng.integers(0, classes, size=n)
        x = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
        return ArrayDataset(x, y.astype(np.int64), classes)

    name = (
        SYNTHETIC_GAUSSIAN
        + ":"
        + ",".join(
            f"{k}={v}" for k, v in zip(("train", "test", "dim", "classes", "seed"), (train, test, dim, classes, seed))
        )
    )
    return DatasetSplits(name, draw(train), draw(test), tuple(f"class {c}" for c in range(classes)))


#: The smallest and largest value of each ``synthetic-gaussian`` option.
_SYNTHETIC_MIN = {"train": 1, "test": 0, "dim": 1, "classes": 2, "seed": 0}
_SYNTHETIC_MAX = {"train": 10**8, "test": 10**8, "dim": 65_536, "classes": 100_000, "seed": 2**32 - 1}
#: At most this many float32 values in the generated set ((train + test) x dim: 4 GB).
SYNTHETIC_MAX_VALUES = 10**9


def _check_synthetic(key: str, value: Any) -> None:
    low, high = _SYNTHETIC_MIN[key], _SYNTHETIC_MAX[key]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{SYNTHETIC_GAUSSIAN}: {key} must be an integer >= {low}, got {value!r}")
    if value > high:
        raise ValueError(f"{SYNTHETIC_GAUSSIAN}: {key} must be an integer <= {high}, got {value!r}")


def _check_synthetic_size(train: int, test: int, dim: int) -> None:
    if (train + test) * dim > SYNTHETIC_MAX_VALUES:
        raise ValueError(
            f"{SYNTHETIC_GAUSSIAN}: (train + test) x dim = {(train + test) * dim} values is more than "
            f"the {SYNTHETIC_MAX_VALUES} a generated set may hold"
        )


def parse_synthetic_options(spec: str) -> dict[str, int]:
    """``train=22000,test=200,dim=32`` -> options (unknown keys and non-integers are errors)."""
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in SYNTHETIC_GAUSSIAN_OPTIONS:
            raise ValueError(
                f"{SYNTHETIC_GAUSSIAN}:{spec}: expected key=value pairs with keys "
                f"{', '.join(SYNTHETIC_GAUSSIAN_OPTIONS)}, got {item!r}"
            )
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"{SYNTHETIC_GAUSSIAN}:{spec}: {key} must be an integer, got {value.strip()!r}") from None
        _check_synthetic(key, options[key])
    full = {**SYNTHETIC_GAUSSIAN_OPTIONS, **options}
    _check_synthetic_size(full["train"], full["test"], full["dim"])
    return options


def _load_synthetic_gaussian(
    spec: str = "", image_size: int | None = None, progress: bool = True, **options: Any
) -> DatasetSplits:
    return synthetic_gaussian(**{**parse_synthetic_options(spec), **options})


#: ``prefix:`` -> loader ``(path, image_size=None, progress=True, **options)`` for files a user holds.
PATH_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "idx": _load_idx_path,
    "cifar": _load_cifar_path,
}


def dataset_names() -> list[str]:
    """Registered names plus the path forms (``idx:/path``, ``cifar:/path``)."""
    return (
        sorted(DATASETS)
        + [f"{p}:/path/to/folder" for p in sorted(PATH_LOADERS)]
        + [f"{SYNTHETIC_GAUSSIAN}:train=N,test=N,dim=N,classes=N,seed=N"]
    )


def load_dataset(name: str, *, image_size: int | None = None, progress: bool = True, **options: Any) -> DatasetSplits:
    """Load dataset ``name`` (fetching and verifying it on first use).

    ``image_size`` resizes images to a square side (bilinear); None keeps the native size. Extra
    ``options`` go to the loader (e.g. ``train_per_domain`` for ``digits-domains``).
    Unknown names raise :class:`UnknownDatasetError` (a ``KeyError`` and a ``ValueError``).
    """
    prefix, sep, rest = name.partition(":")
    if prefix == SYNTHETIC_GAUSSIAN:  # generated, no file: options in the name (a config holds only the name)
        return _load_synthetic_gaussian(rest, image_size=image_size, progress=progress, **options)
    if sep and prefix in PATH_LOADERS:
        if not rest:
            raise ValueError(f"{name!r}: give a folder after '{prefix}:', e.g. {prefix}:/data/my-set")
        return PATH_LOADERS[prefix](rest, image_size=image_size, progress=progress, **options)
    try:
        loader = DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}") from None
    return loader(image_size=image_size, progress=progress, **options)
