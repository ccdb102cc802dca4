"""Splitting a training pool among federated clients.

:func:`make_partition` turns the labels of a training pool and a validated
:class:`~protofl.config.PartitionConfig` into a :class:`Partition`: for every client, the indices of
its own training samples and of its own test samples (both index the *training pool*, i.e. the
``labels`` array given to :func:`make_partition`). The global test set is untouched.

Steps, all drawn from one ``np.random.default_rng(seed)`` so a seed fixes the result:

1. **Long tail** (``imbalance_factor > 1``): the pool is subsampled per class to an exponential
   profile, see :func:`long_tail_subsample`. What is kept is recorded in ``Partition.pool_index``.
2. **Scheme** (``iid``, ``dirichlet``, ``pathological`` or ``domain``) assigns every kept sample to
   exactly one client; see the ``_assign_*`` functions for the exact methods.
3. **Stratified local split**: each client's samples of each class are split between its train and
   test split, see :func:`stratified_counts`.

Every kept sample ends up in exactly one client's train or test split; the clients' splits are
disjoint and their union is ``pool_index``. ``min_client_size`` bounds train + test of each client.

The cost is a few vectorised passes over the pool plus small loops over classes and clients
(60,000 labels and 1,000 clients take well under a second).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from protofl.config import PartitionConfig, to_mapping

__all__ = [
    "Partition",
    "make_partition",
    "long_tail_counts",
    "long_tail_subsample",
    "stratified_counts",
    "DIRICHLET_MAX_DRAWS",
]

#: How many times the Dirichlet proportions are redrawn before giving up on ``min_client_size``.
DIRICHLET_MAX_DRAWS = 1000

_SPLITS = ("train", "test", "all")


# --------------------------------------------------------------------------------------------------
# The result


def _index_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer indices, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.int64, copy=True)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """Per-client train and test indices into the training pool.

    ``train[k]`` and ``test[k]`` are sorted ``int64`` arrays of indices into the training pool (the
    ``labels`` that :func:`make_partition` was given) for client ``k``. ``pool_index`` (sorted) is
    the part of the pool kept after long-tail subsampling (the whole pool when there is none; the
    ``pathological`` scheme also leaves out classes that get no shard, which happens only when
    ``num_clients * classes_per_client`` is below the number of classes); the clients' splits are
    disjoint and together cover it exactly. ``client_domains`` gives each
    client's domain id for the ``domain`` scheme (else ``None``). ``meta`` holds JSON-friendly
    provenance (the partition config and seed).

    All arrays are read-only. Two partitions compare equal when all their arrays and fields match.
    """

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    num_classes: int
    pool_index: np.ndarray
    client_domains: np.ndarray | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.train) != len(self.test):
            raise ValueError(f"train has {len(self.train)} clients but test has {len(self.test)}")
        set_ = object.__setattr__
        set_(self, "train", tuple(_index_array(a, f"train[{k}]") for k, a in enumerate(self.train)))
        set_(self, "test", tuple(_index_array(a, f"test[{k}]") for k, a in enumerate(self.test)))
        set_(self, "pool_index", _index_array(self.pool_index, "pool_index"))
        if self.client_domains is not None:
            domains = _index_array(self.client_domains, "client_domains")
            if len(domains) != len(self.train):
                raise ValueError(f"client_domains has {len(domains)} entries for {len(self.train)} clients")
            set_(self, "client_domains", domains)
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes: must be >= 1, got {self.num_classes}")
        set_(self, "num_classes", int(self.num_classes))
        set_(self, "meta", dict(self.meta))

    # -- queries -----------------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.train)

    def sizes(self, split: str = "all") -> np.ndarray:
        """Samples per client in ``split`` (``"train"``, ``"test"`` or ``"all"``), shape ``(K,)``."""
        _check_split(split)
        train = np.array([len(a) for a in self.train], dtype=np.int64)
        test = np.array([len(a) for a in self.test], dtype=np.int64)
        return {"train": train, "test": test, "all": train + test}[split]

    def client_indices(self, client: int, split: str = "train") -> np.ndarray:
        """Client ``client``'s indices in ``split`` (``"all"``: train and test, sorted)."""
        _check_split(split)
        if split == "all":
            return np.sort(np.concatenate([self.train[client], self.test[client]]))
        return self.train[client] if split == "train" else self.test[client]

    def class_counts(self, labels: np.ndarray, split: str = "train") -> np.ndarray:
        """``(num_clients, num_classes)`` int64 counts of each class in each client's ``split``.

        ``labels`` are the training pool's labels (the array given to :func:`make_partition`);
        ``split`` is ``"train"``, ``"test"`` or ``"all"`` (train + test).
        """
        _check_split(split)
        labels = np.asarray(labels)
        if split == "all":
            return self.class_counts(labels, "train") + self.class_counts(labels, "test")
        arrays = self.train if split == "train" else self.test
        sizes = np.array([len(a) for a in arrays], dtype=np.int64)
        if sizes.sum() == 0:
            return np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
        flat = np.concatenate(arrays)
        client = np.repeat(np.arange(self.num_clients, dtype=np.int64), sizes)
        y = labels[flat].astype(np.int64)
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels: must lie in [0, {self.num_classes}) for this partition")
        counts = np.bincount(client * self.num_classes + y, minlength=self.num_clients * self.num_classes)
        return counts.reshape(self.num_clients, self.num_classes)

    # -- comparison --------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        if (self.num_classes, self.num_clients) != (other.num_classes, other.num_clients):
            return False
        if (self.client_domains is None) != (other.client_domains is None):
            return False
        if (
            self.client_domains is not None
            and other.client_domains is not None
            and not np.array_equal(self.client_domains, other.client_domains)
        ):
            return False
        return (
            np.array_equal(self.pool_index, other.pool_index)
            and all(np.array_equal(a, b) for a, b in zip(self.train, other.train))
            and all(np.array_equal(a, b) for a, b in zip(self.test, other.test))
        )

    __hash__ = None  # type: ignore[assignment]

    # -- I/O ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (lists of ints) that :meth:`from_dict` turns back into this partition."""
        return {
            "num_classes": self.num_classes,
            "num_clients": self.num_clients,
            "pool_index": self.pool_index.tolist(),
            "train": [a.tolist() for a in self.train],
            "test": [a.tolist() for a in self.test],
            "client_domains": None if self.client_domains is None else self.client_domains.tolist(),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        missing = [k for k in ("num_classes", "pool_index", "train", "test") if k not in data]
        if missing:
            raise ValueError(f"partition dict: missing key {missing[0]!r}")
        if len(data["train"]) != len(data["test"]):
            raise ValueError("partition dict: train and test list different numbers of clients")
        if "num_clients" in data and int(data["num_clients"]) != len(data["train"]):
            raise ValueError(
                f"partition dict: num_clients is {data['num_clients']} but train lists {len(data['train'])} clients"
            )
        domains = data.get("client_domains")
        return cls(
            train=tuple(np.asarray(a, dtype=np.int64) for a in data["train"]),
            test=tuple(np.asarray(a, dtype=np.int64) for a in data["test"]),
            num_classes=int(data["num_classes"]),
            pool_index=np.asarray(data["pool_index"], dtype=np.int64),
            client_domains=None if domains is None else np.asarray(domains, dtype=np.int64),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the partition to ``path``: JSON if it ends in ``.json``, else a compressed ``.npz``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict()))
            return path
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # np.savez would append it anyway
        train_sizes = np.array([len(a) for a in self.train], dtype=np.int64)
        test_sizes = np.array([len(a) for a in self.test], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            "num_classes": np.array(self.num_classes, dtype=np.int64),
            "pool_index": self.pool_index,
            "train_sizes": train_sizes,
            "train_flat": np.concatenate(self.train) if self.train else empty,
            "test_sizes": test_sizes,
            "test_flat": np.concatenate(self.test) if self.test else empty,
            "meta_json": np.array(json.dumps(_jsonable(self.meta))),
        }
        if self.client_domains is not None:
            arrays["client_domains"] = self.client_domains
        with path.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a partition written by :meth:`save` (``.json`` or ``.npz``)."""
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        with np.load(path, allow_pickle=False) as data:
            train = np.split(data["train_flat"], np.cumsum(data["train_sizes"])[:-1])
            test = np.split(data["test_flat"], np.cumsum(data["test_sizes"])[:-1])
            if len(data["train_sizes"]) == 0:
                train, test = [], []
            return cls(
                train=tuple(train),
                test=tuple(test),
                num_classes=int(data["num_classes"]),
                pool_index=data["pool_index"],
                client_domains=data["client_domains"] if "client_domains" in data.files else None,
                meta=json.loads(str(data["meta_json"])),
            )


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(_SPLITS)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --------------------------------------------------------------------------------------------------
# Entry point


def make_partition(
    labels: np.ndarray,
    config: PartitionConfig,
    *,
    seed: int,
    domains: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Partition:
    """Split the training pool with labels ``labels`` among ``config.num_clients`` clients.

    Args:
        labels: integer class labels of the training pool, shape ``(N,)``, in ``[0, num_classes)``.
        config: the validated partition configuration.
        seed: seeds ``np.random.default_rng``; the same seed gives the same partition.
        domains: per-sample domain ids, shape ``(N,)`` (required by the ``domain`` scheme, ignored
            by the others).
        num_classes: number of classes (default ``labels.max() + 1``).

    Returns:
        The :class:`Partition`; its indices point into ``labels``.

    Raises:
        ValueError: on bad inputs or an impossible partition; the message names the config key to
            change (``num_clients``, ``min_client_size``, ``alpha``, ...) and what it allows.
    """
    if not isinstance(config, PartitionConfig):
        raise TypeError(f"config: expected a PartitionConfig, got {type(config).__name__}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size == 0:
        raise ValueError("labels: the training pool is empty")
    if labels.min() < 0:
        raise ValueError(f"labels: must be >= 0, got {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    num_classes = int(num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"num_classes: must be > the largest label {labels.max()}, got {num_classes}")
    if domains is not None:
        domains = np.asarray(domains)
        if domains.shape != labels.shape:
            raise ValueError(f"domains: expected shape {labels.shape} (one id per sample), got {domains.shape}")
    if config.scheme == "pathological" and config.classes_per_client > num_classes:
        raise ValueError(
            f"classes_per_client: must be in [1, num_classes={num_classes}] for scheme 'pathological', "
            f"got {config.classes_per_client}"
        )

    rng = np.random.default_rng(seed)

    # 1. long tail
    if config.imbalance_factor > 1:
        pool = long_tail_subsample(labels, config.imbalance_factor, rng, num_classes=num_classes)
    else:
        pool = np.arange(len(labels), dtype=np.int64)
    pool_labels = labels[pool]

    K = config.num_clients
    if K * config.min_client_size > len(pool):
        raise ValueError(
            f"num_clients/min_client_size: {K} clients x {config.min_client_size} samples = "
            f"{K * config.min_client_size} exceeds the {len(pool)} samples of the pool"
            + (" after long-tail subsampling" if config.imbalance_factor > 1 else "")
            + "; lower min_client_size or num_clients"
        )

    # 2. scheme: a client id for each pool position
    client_domains = None
    if config.scheme == "iid":
        owner = _assign_iid(len(pool), K, rng)
    elif config.scheme == "dirichlet":
        owner = _assign_dirichlet(pool_labels, num_classes, config, rng)
    elif config.scheme == "pathological":
        owner = _assign_pathological(pool_labels, num_classes, config, rng)
    elif config.scheme == "domain":
        if domains is None:
            raise ValueError(
                "domains: scheme 'domain' needs per-sample domain ids (the dataset has none); "
                "pick a dataset with domains or another scheme"
            )
        owner, client_domains = _assign_domain(domains[pool], K, rng)
    else:  # pragma: no cover - PartitionConfig already validates the scheme
        raise ValueError(f"scheme: unknown scheme {config.scheme!r}")

    if (owner < 0).any():  # classes no client takes (pathological with num_clients * s < C)
        taken = owner >= 0
        pool, pool_labels, owner = pool[taken], pool_labels[taken], owner[taken]
    sizes = np.bincount(owner, minlength=K)
    if sizes.min() < config.min_client_size:
        k = int(np.argmin(sizes))
        raise ValueError(
            f"min_client_size: {config.scheme} partition gives client {k} only {sizes[k]} samples "
            f"(< min_client_size={config.min_client_size}); lower min_client_size or num_clients"
        )

    # 3. stratified train/test split inside each client
    train, test = _split_clients(pool, pool_labels, owner, K, num_classes, config.test_fraction, rng)
    meta = {"config": to_mapping(config), "seed": int(seed), "pool_size": int(len(labels))}
    return Partition(
        train=train,
        test=test,
        num_classes=num_classes,
        pool_index=pool,
        client_domains=client_domains,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------------
# Long tail


def long_tail_counts(class_sizes: np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Per-class sample counts of the exponential long-tail profile (as in CIFAR-LT).

    Class ``c`` of ``C`` keeps ``n_c = floor(n_max * imbalance_factor ** (-c / (C - 1)))`` samples
    (at least 1), class 0 being the largest. ``n_max`` is the largest value for which every class can
    supply its ``n_c`` (``n_max = min_c class_sizes[c] * imbalance_factor ** (c / (C - 1))``, capped
    at ``class_sizes[0]``); on a balanced pool that is simply the class size. Classes absent from
    the pool stay at 0 and do not constrain ``n_max``.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    C = len(sizes)
    if C < 2 or imbalance_factor <= 1:
        return sizes.copy()
    ratio = float(imbalance_factor) ** (-np.arange(C) / (C - 1))
    present = sizes > 0
    n_max = np.min(sizes[present] / ratio[present])
    counts = np.floor(n_max * ratio + 1e-9).astype(np.int64)
    counts = np.minimum(np.maximum(counts, 1), sizes)
    counts[~present] = 0
    return counts


def long_tail_subsample(
    labels: np.ndarray, imbalance_factor: float, rng: np.random.Generator, *, num_classes: int | None = None
) -> np.ndarray:
    """Sorted indices of a random per-class subsample following :func:`long_tail_counts`."""
    labels = np.asarray(labels, dtype=np.int64)
    C = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    sizes = np.bincount(labels, minlength=C)
    keep = long_tail_counts(sizes, imbalance_factor)
    # Random order inside each class: shuffle, then stable sort by label; keep the first keep[c].
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(len(labels)) - np.repeat(starts, sizes)
    kept = order[rank < np.repeat(keep, sizes)]
    return np.sort(kept).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Schemes. Each returns ``owner``: the client id of every pool position.


def _assign_iid(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    return owner


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """One draw of the ``(num_clients, C)`` count matrix of the Dirichlet scheme.

    For each class ``c`` in turn: ``p ~ Dir(alpha * 1_K)``; clients that already hold at least
    ``N / K`` samples get ``p_k = 0`` (the usual balancing step of the reference implementations;
    skipped for this class if it would zero every entry); ``p`` is renormalised and the class's
    ``n_c`` samples are cut at ``floor(cumsum(p) * n_c)``.
    """
    C = len(class_sizes)
    total = class_sizes.sum()
    counts = np.zeros((num_clients, C), dtype=np.int64)
    held = np.zeros(num_clients, dtype=np.int64)
    concentration = np.full(num_clients, float(alpha))
    for c in range(C):
        n_c = int(class_sizes[c])
        if n_c == 0:
            continue
        p = rng.dirichlet(concentration)
        masked = p * (held < total / num_clients)
        s = masked.sum()
        if s > 0 and np.isfinite(s):
            p = masked / s
        else:
            p = p / p.sum()
        cuts = np.floor(np.cumsum(p)[:-1] * n_c).astype(np.int64)
        cuts = np.clip(cuts, 0, n_c)
        edges = np.concatenate([[0], cuts, [n_c]])
        counts[:, c] = np.diff(edges)
        held += counts[:, c]
    return counts


def _counts_to_owner(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give client ``k`` a random ``counts[k, c]`` samples of each class ``c`` (columns sum to the
    class sizes)."""
    K, C = counts.shape
    sizes = np.bincount(labels, minlength=C)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, random inside
    # Within class c's block, the first counts[0, c] go to client 0, the next counts[1, c] to 1, ...
    owner_sorted = np.repeat(np.tile(np.arange(K, dtype=np.int64), C), counts.T.reshape(-1))
    assert len(owner_sorted) == sizes.sum() == len(labels)
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = owner_sorted
    return owner


def _assign_dirichlet(
    labels: np.ndarray, num_classes: int, config: PartitionConfig, rng: np.random.Generator
) -> np.ndarray:
    """Label skew by Dirichlet proportions (Hsu et al. 2019; as in PFLlib / NIID-Bench).

    Each class is split among the clients by fresh ``Dir(alpha)`` proportions (see
    :func:`_dirichlet_counts`). The whole draw is repeated, from the same generator, until every
    client holds at least ``min_client_size`` samples, at most :data:`DIRICHLET_MAX_DRAWS` times.
    """
    K = config.num_clients
    class_sizes = np.bincount(labels, minlength=num_classes)
    for _ in range(DIRICHLET_MAX_DRAWS):
        counts = _dirichlet_counts(class_sizes, K, config.alpha, rng)
        if counts.sum(axis=1).min() >= config.min_client_size:
            return _counts_to_owner(labels, counts, rng)
    raise ValueError(
        f"dirichlet partition: could not give each of {K} clients at least {config.min_client_size} "
        f"samples from {len(labels)} samples after {DIRICHLET_MAX_DRAWS} draws (alpha={config.alpha}); "
        "lower min_client_size or num_clients, or raise alpha"
    )


def _shards_per_class(class_sizes: np.ndarray, num_shards: int, num_clients: int) -> np.ndarray:
    """Split ``num_shards`` among classes in proportion to their sizes (largest remainders), no class
    getting more than ``num_clients`` shards (the excess goes to the others, again in proportion)."""
    C = len(class_sizes)
    shards = np.zeros(C, dtype=np.int64)
    free = class_sizes > 0
    remaining = num_shards
    while remaining > 0:
        weights = np.where(free, class_sizes, 0).astype(np.float64)
        quota = weights / weights.sum() * remaining
        add = np.floor(quota).astype(np.int64)
        left = remaining - add.sum()
        if left:
            # Largest remainders first; ties to the larger class, then the lower class id.
            frac = np.where(free, quota - add, -1.0)
            order = np.lexsort((np.arange(C), -weights, -frac))
            add[order[:left]] += 1
        shards += add
        over = np.maximum(shards - num_clients, 0)
        shards -= over
        free &= shards < num_clients
        remaining = int(over.sum())
    return shards


def _assign_pathological(
    labels: np.ndarray, num_classes: int, config: PartitionConfig, rng: np.random.Generator
) -> np.ndarray:
    """Pathological label skew by shards (McMahan et al. 2017), with distinct classes per client.

    Exact method, for ``K`` clients and ``s = classes_per_client``:

    1. The pool is cut into ``K * s`` shards, each inside one class: class ``c`` gets a number of
       shards proportional to its size (largest remainders), capped at ``K`` (a client takes at most
       one shard of a class); the excess is redistributed the same way.
    2. Shards are dealt to clients so that each client gets ``s`` shards of ``s`` *distinct* classes:
       clients are visited in random order and each takes one shard from each of the ``s`` classes
       with the most shards left (ties broken at random). This greedy choice always succeeds when every
       class has at most ``K`` shards, so every client holds exactly ``s`` classes.
    3. Each class's samples are shuffled and cut into as many near-equal shards (sizes differing by
       at most one) as clients hold it.

    Raises ``ValueError`` when fewer than ``s`` classes are present in the pool, or a class has fewer
    samples than the shards it must be cut into.
    """
    K, s = config.num_clients, config.classes_per_client
    class_sizes = np.bincount(labels, minlength=num_classes)
    present = int((class_sizes > 0).sum())
    if s > present:
        raise ValueError(
            f"classes_per_client: must be <= {present}, the number of classes present in the pool, "
            f"for scheme 'pathological'; got {s}"
        )
    shards = _shards_per_class(class_sizes, K * s, K)
    thin = np.flatnonzero(shards > class_sizes)
    if thin.size:
        c = int(thin[0])
        raise ValueError(
            f"num_clients/classes_per_client: pathological partition needs {shards[c]} shards of class "
            f"{c} but it has only {class_sizes[c]} samples; lower num_clients or classes_per_client"
        )
    # Greedy dealing: holds[k] = the s classes client k takes.
    left = shards.astype(np.float64)
    holds = np.empty((K, s), dtype=np.int64)
    for k in rng.permutation(K):
        key = left + rng.random(num_classes) * 0.5  # random tie-break among equal counts
        chosen = np.argpartition(-key, s - 1)[:s]
        holds[k] = chosen
        left[chosen] -= 1
    assert left.min() >= 0
    counts = np.zeros((K, num_classes), dtype=np.int64)
    client_of_class: list[list[int]] = [[] for _ in range(num_classes)]
    for k in range(K):
        for c in holds[k]:
            client_of_class[c].append(k)
    for c in range(num_classes):
        holders = client_of_class[c]
        if not holders:
            continue
        m, n_c = len(holders), int(class_sizes[c])
        part = np.full(m, n_c // m, dtype=np.int64)
        part[rng.permutation(m)[: n_c % m]] += 1
        counts[holders, c] = part
    # Classes with no shard at all (possible when K * s < C) are dropped from every client.
    dropped = (shards == 0) & (class_sizes > 0)
    if dropped.any():
        keep = ~dropped[labels]
        owner = np.full(len(labels), -1, dtype=np.int64)
        owner[keep] = _counts_to_owner(labels[keep], counts, rng)
        return owner
    return _counts_to_owner(labels, counts, rng)


def _assign_domain(domains: np.ndarray, num_clients: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Feature skew by domain: client ``k`` belongs to domain ``k % D`` (domains ranked by id among
    those present in the pool) and the domain's samples are split IID (shuffled, near-equal parts)
    among the domain's clients. Returns the owner array and each client's domain id."""
    ids, dom = np.unique(domains, return_inverse=True)
    D = len(ids)
    if num_clients < D:
        raise ValueError(
            f"num_clients: scheme 'domain' needs at least one client per domain, i.e. >= {D}, got {num_clients}"
        )
    client_rank = np.arange(num_clients) % D
    owner = np.empty(len(domains), dtype=np.int64)
    for d in range(D):
        members = np.flatnonzero(dom == d)
        clients = np.flatnonzero(client_rank == d)
        owner[members] = clients[_assign_iid(len(members), len(clients), rng)]
    client_ids = ids[client_rank]
    if not np.issubdtype(client_ids.dtype, np.integer):
        client_ids = client_rank  # non-integer domain labels: record their rank instead
    return owner, client_ids.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Stratified train/test split inside each client


def stratified_counts(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """How many of each client's samples of each class go to its test split.

    For ``n`` samples of a class, the test split gets ``min(round_half_up(test_fraction * n), n - 1)``,
    so every class a client holds stays in its train split and appears in its test split once
    ``test_fraction * n >= 0.5``; the test label distribution thus follows the train one. If this
    leaves a client's test split empty while it holds some class with >= 2 samples, one sample of its
    largest such class (lowest id on ties) goes to test so no client has an empty test split needlessly.
    """
    counts = np.asarray(counts, dtype=np.int64)
    test = np.floor(test_fraction * counts + 0.5).astype(np.int64)
    test = np.clip(np.minimum(test, counts - 1), 0, None)
    empty = (test.sum(axis=1) == 0) & (counts.max(axis=1, initial=0) >= 2)
    if empty.any():
        rows = np.flatnonzero(empty)
        test[rows, np.argmax(counts[rows], axis=1)] = 1
    return test


def _split_clients(
    pool: np.ndarray,
    labels: np.ndarray,
    owner: np.ndarray,
    num_clients: int,
    num_classes: int,
    test_fraction: float,
    rng: np.random.Generator,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Per-client sorted train and test index arrays (into the original pool)."""
    K, C = num_clients, num_classes
    group = owner * C + labels
    counts = np.bincount(group, minlength=K * C)
    test_counts = stratified_counts(counts.reshape(K, C), test_fraction).reshape(-1)
    order = rng.permutation(len(group))
    order = order[np.argsort(group[order], kind="stable")]  # grouped by (client, class), random inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(group)) - np.repeat(starts, counts)
    is_test = np.empty(len(group), dtype=bool)
    is_test[order] = rank < np.repeat(test_counts, counts)

    def per_client(mask: np.ndarray) -> tuple[np.ndarray, ...]:
        idx, own = pool[mask], owner[mask]
        srt = np.lexsort((idx, own))
        sizes = np.bincount(own, minlength=K)
        return tuple(np.split(idx[srt], np.cumsum(sizes)[:-1]))

    return per_client(~is_test), per_client(is_test)
