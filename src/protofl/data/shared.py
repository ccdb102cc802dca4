"""A run's partitioned training data, built once per machine and shared read-only between processes.

Flower runs a client's work in many processes: a deployment starts a ClientApp process for every
message, and the simulation runtime serves thousands of nodes from a few Ray actors. Each of them needs
one partition, and building it means loading the dataset and partitioning the whole pool (about a
second for the speed benchmark's 220,000 samples). A :class:`PartitionStore` keeps the partitioned
clients of a run once, as memory-mapped arrays in protofl's cache, so a process reads only its
client's rows.

Layout: ``<cache>/partitions/<key>/`` (``key``: :func:`data_key`, a digest of the run's data and
partition settings and its seed) holds ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy``
(every client's rows, concatenated in client order), ``offsets.npy`` (where each client's rows start
and end) and ``meta.json``. A store is written into a temporary folder next to it and renamed into
place, so a reader sees a whole store or none; a lock file per key makes the processes of one machine
build it once (the others wait and read it). A store is read only under the fingerprint it was written
for (its ``meta.json`` names it).

A Flower node never depends on a store the server wrote (:func:`node_split`): a node on another machine,
or with another cache folder, finds none under its run's fingerprint and builds its own split from its own
data loader, the same rows a store of that fingerprint holds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protofl._io import current_umask

#: Bumped when the layout changes (a store of another format is not read).
FORMAT = 1
ARRAYS = ("x_train", "y_train", "x_test", "y_test")

log = logging.getLogger("protofl.flower")


def _dtype(name: str) -> type:
    """The dtype a store keeps the array ``name`` in (features float32, labels int64)."""
    return np.float32 if name.startswith("x") else np.int64


class PartitionStoreError(RuntimeError):
    """A shared partition store cannot be read (the message names the folder)."""


def data_key(config: Any) -> str:
    """The digest naming a run's partitioned data: the data and partition settings, the seed, the store's
    format, the code that builds the data, and, for a dataset read from a folder, the names, sizes and
    modification times of its files."""
    settings = config.to_dict()
    parts = {
        "format": FORMAT,
        "seed": config.seed,
        "data": settings["data"],
        "partition": settings["partition"],
        "source": _source_stamp(config.data.dataset),
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of the code that loads and partitions data (protofl.data and the runner): a store built by
    other code is not read."""
    import protofl.runner

    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in [*sorted(here.glob("*.py")), Path(protofl.runner.__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _source_stamp(dataset: str) -> list[Any]:
    from protofl.data.datasets import PATH_LOADERS

    prefix, sep, rest = dataset.partition(":")
    if not (sep and prefix in PATH_LOADERS and rest):
        return []
    root = Path(rest).expanduser()
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns]]
    stamp = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        stamp.append([str(path.relative_to(root)), st.st_size, st.st_mtime_ns])
    return stamp


@dataclasses.dataclass(frozen=True)
class SharedClient:
    """One client's rows, read from a store, with what the algorithm needs to know of the data."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int


@dataclasses.dataclass(frozen=True)
class PartitionStore:
    """The shared stores under ``root`` (default: ``partitions/`` in protofl's data cache)."""

    root: Path

    def __post_init__(self) -> None:
        if not str(self.root):
            raise ValueError("root: the folder of the shared partition stores is required")
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @classmethod
    def default(cls) -> PartitionStore:
        from protofl.data.dataset import cache_dir

        return cls(cache_dir() / "partitions")

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return (self.path(key) / "meta.json").exists()

    def ensure(self, key: str, build: Callable[[], Any]) -> Path:
        """The store ``key``, built with ``build()`` (a :class:`~protofl.runner.PreparedData`) by the first
        process of this machine that needs it; the others wait for it and read it."""
        if self.exists(key):
            return self.path(key)
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not self.exists(key):
                    data = build()
                    self.publish(key, data.clients, data.input_shape, data.num_classes)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self.path(key)

    def publish(self, key: str, clients: Sequence[Any], input_shape: Sequence[int], num_classes: int) -> Path:
        """Write the store ``key`` of ``clients`` (:class:`~protofl.algorithms.ClientData`), unless it is
        there already: into a temporary folder, renamed into place when whole."""
        final = self.path(key)
        if self.exists(key):
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-", suffix=".tmp"))
        try:
            offsets = np.zeros((len(clients) + 1, 2), dtype=np.int64)
            for k, c in enumerate(clients):
                offsets[k + 1] = offsets[k] + (len(c.y_train), len(c.y_test))
            for name in ARRAYS:
                split = 0 if name.endswith("train") else 1
                tensors = [getattr(c, name) for c in clients]
                first = tensors[0]
                shape = (int(offsets[-1, split]), *first.shape[1:])
                out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=_dtype(name), shape=shape)
                for k, t in enumerate(tensors):
                    out[offsets[k, split] : offsets[k + 1, split]] = t.detach().cpu().numpy()
                out.flush()
                del out
            np.save(tmp / "offsets.npy", offsets)
            meta = {
                "format": FORMAT,
                "key": key,
                "num_clients": len(clients),
                "input_shape": list(input_shape),
                "num_classes": int(num_classes),
            }
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            for file in tmp.iterdir():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: what a plain mkdir gives
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.exists(key):  # not another process's store: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def unusable(self, key: str) -> str | None:
        """Why the store ``key`` cannot give this run its rows (there is none; it cannot be read; it was
        written for another data fingerprint), or ``None`` when it can."""
        if not self.exists(key):
            return f"there is none at {self.path(key)}"
        try:
            _open(self.path(key))
        except PartitionStoreError as exc:
            return str(exc)
        return None

    def meta(self, key: str) -> dict[str, Any]:
        """The store's ``meta.json``: ``num_clients``, ``input_shape``, ``num_classes``."""
        return _open(self.path(key))[2]

    def client(self, key: str, k: int) -> SharedClient:
        """Client ``k``'s rows of the store ``key`` (copied out of the memory-mapped arrays)."""
        arrays, offsets, meta = _open(self.path(key))
        if not 0 <= k < meta["num_clients"]:
            raise PartitionStoreError(
                f"{self.path(key)}: client {k} is not in the store's {meta['num_clients']} clients"
            )
        rows = {}
        for name in ARRAYS:
            split = 0 if name.endswith("train") else 1
            rows[name] = np.array(arrays[name][offsets[k, split] : offsets[k + 1, split]])
        return SharedClient(**rows, input_shape=tuple(meta["input_shape"]), num_classes=int(meta["num_classes"]))


@dataclasses.dataclass(frozen=True, eq=False)
class NodeSplit:
    """A run's partitioned clients as one node process reads them: :meth:`client` gives client k's rows, from
    the machine's store or from the node's own split; ``origin`` says which."""

    input_shape: tuple[int, ...]
    num_classes: int
    num_clients: int
    origin: str
    rows: Callable[[int], SharedClient]

    def client(self, k: int) -> SharedClient:
        if not 0 <= k < self.num_clients:
            raise PartitionStoreError(f"{self.origin}: client {k} is not in its {self.num_clients} clients")
        return self.rows(k)

    @classmethod
    def of_store(cls, store: PartitionStore, key: str, origin: str) -> NodeSplit:
        meta = store.meta(key)
        rows = functools.partial(store.client, key)
        return cls(tuple(meta["input_shape"]), int(meta["num_classes"]), int(meta["num_clients"]), origin, rows)

    @classmethod
    def of_data(cls, data: Any, origin: str) -> NodeSplit:
        """From a :class:`~protofl.runner.PreparedData`, each client's arrays in the dtypes a store keeps."""
        shape, classes = tuple(data.input_shape), int(data.num_classes)

        def rows(k: int) -> SharedClient:
            c = data.clients[k]
            arrays: dict[str, np.ndarray] = {
                name: np.asarray(getattr(c, name).detach().cpu().numpy(), dtype=_dtype(name)) for name in ARRAYS
            }
            return SharedClient(**arrays, input_shape=shape, num_classes=classes)

        return cls(shape, classes, len(data.clients), origin, rows)


def node_split(store: PartitionStore, key: str, build: Callable[[], Any]) -> NodeSplit:
    """Where a node process reads its rows: the store ``key`` (the run's data fingerprint, :func:`data_key`)
    of this machine when it holds one written for that fingerprint; otherwise the node's own split, from its
    own data loader (``build()``, a :class:`~protofl.runner.PreparedData`: the rows a store of that
    fingerprint holds). A node never waits for a store the server is to write: with none under the key (a
    node on another machine, or with another cache folder), the node builds the split and keeps it in its own
    cache for the later processes of its machine (one builds, under the key's lock); with an unusable one
    there (unreadable, or written for another fingerprint), it keeps its split in memory. Either is said in
    the log (logger ``protofl.flower``) at INFO."""
    why = store.unusable(key)
    if why is None:
        return NodeSplit.of_store(store, key, f"the shared partition store {store.path(key)}")
    if not store.path(key).exists():
        built: list[bool] = []

        def build_here() -> Any:
            built.append(True)
            return build()

        store.ensure(key, build_here)
        done = (
            "built this node's split from its own data loader" if built else "another process of this machine built it"
        )
        log.info(
            "no shared partition store for this run's data fingerprint %s (%s): %s, kept in %s",
            key,
            why,
            done,
            store.path(key),
        )
        return NodeSplit.of_store(store, key, f"this machine's own partition store {store.path(key)}")
    split = NodeSplit.of_data(build(), f"this node's own split (data fingerprint {key})")
    log.info(
        "the partition store %s is not used (%s): built this node's split from its own data loader, kept in memory",
        store.path(key),
        why,
    )
    return split


@functools.lru_cache(maxsize=8)
def _open(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """A store's arrays, memory-mapped read-only (kept open per process)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')}, this protofl reads format {FORMAT}")
        if meta.get("key") != folder.name:
            raise ValueError(f"it was written for the data fingerprint {meta.get('key')!r}, not {folder.name!r}")
        offsets = np.load(folder / "offsets.npy")
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        if offsets.shape != (meta["num_clients"] + 1, 2) or any(
            len(arrays[name]) != offsets[-1, 0 if name.endswith("train") else 1] for name in ARRAYS
        ):
            raise ValueError("its arrays do not match its offsets")
    except (OSError, ValueError, KeyError) as exc:
        raise PartitionStoreError(
            f"the shared partition store {folder} cannot be read ({exc}); delete the folder to rebuild it"
        ) from None
    return arrays, offsets, meta
