"""Readers for standard on-disk dataset formats.

* IDX (the MNIST / Fashion-MNIST format), plain or gzip-compressed: :func:`read_idx`,
  :func:`load_idx_folder`;
* CIFAR-10 / CIFAR-100 "python version" pickle batches: :func:`load_cifar_folder`. The pickles are read
  with a restricted unpickler that only rebuilds numpy arrays and plain containers, so a file cannot
  run code.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import pickletools
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from protofl.data.dataset import ArrayDataset, DatasetSplits
from protofl.errors import DataFormatError, UnsafePickleError

__all__ = [
    "DataFormatError",
    "load_cifar_folder",
    "load_idx_folder",
    "read_idx",
    "safe_unpickle",
    "write_idx",
]


# --------------------------------------------------------------------------------------------------
# IDX

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: Deflate expands at most about 1032:1: a gzip file's content is at most this many times its size (plus
#: the gzip header's slack), so a header declaring more is refused before anything is decompressed.
GZIP_MAX_RATIO = 1032
#: An IDX payload is read in pieces of this size (gzip is decompressed incrementally).
_CHUNK = 1 << 20
#: Labels are class indices: integers in [0, MAX_CLASSES).
MAX_CLASSES = 100_000


def _read_exact(stream: io.BufferedIOBase, size: int) -> bytes:
    data = stream.read(size)
    return data if data is not None else b""


def _readinto_full(stream: io.BufferedIOBase, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream`` piece by piece; returns how many bytes were read."""
    done = 0
    while done < len(buffer):
        n = stream.readinto(buffer[done : done + _CHUNK])
        if not n:
            break
        done += n
    return done


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or .gz, detected from its content) into an array in native byte order.

    Checks the magic number, the type code, the dimensions, that the size the header declares fits
    what the file can hold (before anything is allocated or decompressed; gzip content is read
    incrementally) and that the payload holds exactly that many values; raises
    :class:`DataFormatError` otherwise.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read_idx_stream(stream, path, size, compressed)
            return _read_idx_stream(raw, path, size, compressed)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise DataFormatError(f"{path}: cannot decompress ({exc}); the file is probably truncated") from None


def _read_idx_stream(stream: io.BufferedIOBase, path: Path, size: int, compressed: bool) -> np.ndarray:
    head = _read_exact(stream, 4)
    if len(head) < 4:
        raise DataFormatError(f"{path}: {len(head)} bytes is too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", head)
    if zero != 0:
        raise DataFormatError(f"{path}: bad IDX magic number {head.hex()} (must start with 0000)")
    if code not in IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX file declares zero dimensions")
    header = 4 + 4 * ndim
    raw_dims = _read_exact(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataFormatError(f"{path}: truncated IDX header ({4 + len(raw_dims)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = IDX_DTYPES[code]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if compressed:
        bound = GZIP_MAX_RATIO * size + _CHUNK
        if header + expected > bound:
            raise DataFormatError(
                f"{path}: IDX header declares {dims} x {dtype.itemsize} bytes = {expected} bytes, "
                f"more than a gzip file of {size} bytes can hold"
            )
    elif expected != size - header:
        actual = size - header
        what = "truncated" if actual < expected else "has trailing data"
        raise DataFormatError(
            f"{path}: IDX payload {what}: header says {dims} x {dtype.itemsize} bytes = {expected} "
            f"bytes, file holds {actual}"
        )
    buffer = bytearray(expected)
    got = _readinto_full(stream, memoryview(buffer))
    if got < expected:
        raise DataFormatError(
            f"{path}: IDX payload truncated: header says {dims} x {dtype.itemsize} bytes = "
            f"{expected} bytes, file holds {got}"
        )
    if _read_exact(stream, 1):
        raise DataFormatError(f"{path}: IDX payload has trailing data after the {expected} bytes its header declares")
    arr = np.frombuffer(buffer, dtype=dtype, count=count).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip if ``compress``, or if the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise DataFormatError(f"dtype {array.dtype} cannot be stored in IDX")
    payload = struct.pack(">HBB", 0, codes[native], array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(native.newbyteorder(">")).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


_IDX_PATTERNS = {
    ("train", "images"): ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    ("train", "labels"): ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    ("test", "images"): [
        "t10k-images-idx3-ubyte",
        "t10k-images.idx3-ubyte",
        "test-images-idx3-ubyte",
        "test-images.idx3-ubyte",
    ],
    ("test", "labels"): [
        "t10k-labels-idx1-ubyte",
        "t10k-labels.idx1-ubyte",
        "test-labels-idx1-ubyte",
        "test-labels.idx1-ubyte",
    ],
}


def find_idx_files(folder: str | Path) -> dict[tuple[str, str], Path]:
    """The four standard IDX files in ``folder`` (plain or .gz), keyed by (split, kind)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found = {}
    for key, names in _IDX_PATTERNS.items():
        for name in names:
            hits = [folder / n for n in (name, name + ".gz") if (folder / n).is_file()]
            if hits:
                found[key] = hits[0]
                break
        else:
            raise FileNotFoundError(
                f"{folder}: no {key[0]} {key[1]} file (looked for {', '.join(names)}, plain or .gz)"
            )
    return found


def check_labels(labels: Any, path: Path, num_classes: int | None = None) -> np.ndarray:
    """``labels`` as int64 class indices, refused (:class:`DataFormatError` naming ``path``) unless every
    value is an integer (an integral float is one), non-negative and below ``num_classes`` (at most
    :data:`MAX_CLASSES`)."""
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataFormatError(f"{path}: labels are not a flat list of numbers ({exc})") from None
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataFormatError(f"{path}: labels must be integers, got values of type {y.dtype}")
    y = y.reshape(-1)
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise DataFormatError(f"{path}: labels must be whole numbers, got {y[bad][0]!r}")
    if len(y) and y.min() < 0:
        raise DataFormatError(f"{path}: negative label {y.min()}")
    limit = min(num_classes or MAX_CLASSES, MAX_CLASSES)
    if len(y) and y.max() >= limit:
        what = f"the {num_classes} classes" if num_classes else f"at most {MAX_CLASSES} classes"
        raise DataFormatError(f"{path}: label {y.max()} is out of range for {what} (labels are 0 .. {limit - 1})")
    return y.astype(np.int64)


def _idx_images(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataFormatError(f"{path}: images must have 3 or 4 dimensions, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataFormatError(
            f"{path}: pixel values must be finite; the file holds NaN or infinite values (or values beyond float32)"
        )
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def load_idx_folder(
    folder: str | Path,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    class_names: tuple[str, ...] = (),
) -> DatasetSplits:
    """A dataset from a folder holding train/t10k images and labels in IDX format.

    Images become ``(N, 1, H, W)`` float32 in [0, 1] (uint8 / 255); labels int64.
    """
    folder = Path(folder)
    files = find_idx_files(folder)
    parts = {}
    for split in ("train", "test"):
        x = _idx_images(read_idx(files[split, "images"]), files[split, "images"])
        y = read_idx(files[split, "labels"])
        if y.ndim != 1:
            raise DataFormatError(f"{files[split, 'labels']}: labels must be 1-D, got shape {y.shape}")
        if len(y) != len(x):
            raise DataFormatError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        parts[split] = (x, check_labels(y, files[split, "labels"], num_classes))
    k = num_classes or max(
        len(class_names), int(max(parts["train"][1].max(initial=-1), parts["test"][1].max(initial=-1))) + 1
    )
    return DatasetSplits(
        name=name or f"idx:{folder}",
        train=ArrayDataset(*parts["train"], num_classes=k),
        test=ArrayDataset(*parts["test"], num_classes=k),
        class_names=tuple(class_names),
    )


# --------------------------------------------------------------------------------------------------
# Restricted unpickling


#: The restricted unpickler lets a file allocate at most this many times its own size in all, plus a
#: fixed allowance (a pickle's own bytes bound what it can honestly rebuild).
PICKLE_ALLOCATION_FACTOR = 4
PICKLE_ALLOCATION_SLACK = 1 << 20


def _sized(args: tuple) -> int:
    """Bytes a builtin call may allocate: integer sizes (``bytearray(n)``) and copies of its arguments."""
    total = 0
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            total += max(a, 0)
        elif isinstance(a, (str, bytes, bytearray)):
            total += len(a)
        elif isinstance(a, (list, tuple, dict, set, frozenset)):
            total += 8 * len(a)
    return total


def _array_bytes(shape: Any, dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (invalid ones count as nothing: numpy refuses them)."""
    try:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        return math.prod(max(int(d), 0) for d in dims) * np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        return 0


class _ArrayType:
    """Stands for ``numpy.ndarray`` in a pickle; :func:`_reconstruct` receives the real type."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_ARRAY_TYPE = _ArrayType()


def _allowed_globals() -> dict[tuple[str, str], tuple[Any, Any]]:
    """(module, name) -> (the callable, the bytes a call with given arguments may allocate)."""
    import _codecs
    import builtins

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, whatever its module
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 arrays; refuses object dtypes itself
    allowed: dict[tuple[str, str], tuple[Any, Any]] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[mod, "_reconstruct"] = reconstruct, lambda args: _array_bytes(*args[1:3]) if len(args) >= 3 else 0
        allowed[mod, "scalar"] = scalar, _sized
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[mod, "_frombuffer"] = frombuffer, _sized
    # The array type is only ever an argument of _reconstruct (calling it would allocate any shape).
    allowed["numpy", "ndarray"] = _ARRAY_TYPE, None
    allowed["numpy", "dtype"] = np.dtype, lambda args: 0
    allowed["_codecs", "encode"] = _codecs.encode, _sized  # how protocol-2 pickles from Python 3 store bytes
    for name in (
        "list",
        "dict",
        "tuple",
        "set",
        "frozenset",
        "bytearray",
        "bytes",
        "str",
        "int",
        "float",
        "complex",
        "bool",
        "slice",
    ):
        allowed["builtins", name] = getattr(builtins, name), _sized
        allowed["__builtin__", name] = allowed["builtins", name]
    return allowed


class _Budget:
    """The bytes a pickle may still ask for (kept apart from the unpickler: what the closures below
    reference must not reach the unpickler, or each load would leave an uncollectable cycle)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self.limit = PICKLE_ALLOCATION_FACTOR * size + PICKLE_ALLOCATION_SLACK
        self.spent = 0

    def spend(self, nbytes: int, what: str) -> None:
        self.spent += nbytes
        if self.spent > self.limit:
            raise UnsafePickleError(
                f"{self.path}: refusing {what}: the pickle asks for {self.spent} bytes, more "
                f"than the {self.limit} a file of {self.size} bytes can justify"
            )


class _SafeUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], tuple[Any, Any]] | None = None

    def __init__(self, file: BinaryIO, path: Path, size: int, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.path = path
        self.budget = _Budget(path, size)

    def find_class(self, module: str, name: str) -> Any:
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _allowed_globals()
        allowed = _SafeUnpickler._allowed
        try:
            function, cost = allowed[module, name]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path}: refusing to load {module}.{name}: only numpy arrays and plain containers are allowed"
            ) from None
        if cost is None:
            return function
        return _bounded(function, cost, self.budget, f"{module}.{name}")


def _bounded(function: Any, cost: Any, budget: _Budget, what: str) -> Any:
    """``function`` charging ``budget`` for what each call may allocate, before it runs."""

    def call(*args: Any) -> Any:
        args = tuple(np.ndarray if a is _ARRAY_TYPE else a for a in args)
        budget.spend(cost(args), what)
        return function(*args)

    return call


#: Opcodes that store into the unpickler's memo (which grows to twice the largest index it is given).
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan(data: bytes, path: Path) -> None:
    """Walk the pickle's opcodes without running any: every declared length must fit in the bytes that
    remain (:mod:`pickletools` checks it) and every memo index must be below the file's size. (CPython's
    unpickler allocates a counted string, or the memo, before it finds the data short.)"""
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in _MEMO_OPCODES and isinstance(arg, int) and not 0 <= arg <= len(data):
            raise UnsafePickleError(f"{path}: refusing a memo index of {arg} in a file of {len(data)} bytes")


def safe_unpickle(path: str | Path) -> Any:
    """Unpickle ``path`` (Python 2 or 3 pickles; Python 2 strings stay bytes) allowing only numpy
    arrays and builtin containers, and only allocations the file's size can justify; anything else
    raises :class:`UnsafePickleError` (an :class:`pickle.UnpicklingError`), a damaged file
    :class:`DataFormatError`, each naming the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        _prescan(data, path)
        return _SafeUnpickler(io.BytesIO(data), path, len(data), encoding="bytes").load()
    except UnsafePickleError:
        raise
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
        RecursionError,
        UnicodeError,
    ) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise DataFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {detail})") from None


# --------------------------------------------------------------------------------------------------
# CIFAR


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _names(values: Any, path: Path) -> tuple[str, ...]:
    """Class names from a CIFAR meta file: a list of (byte) strings."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (bytes, str)) for v in values):
        raise DataFormatError(f"{path}: class names must be a list of strings")
    if len(values) > MAX_CLASSES:
        raise DataFormatError(f"{path}: {len(values)} class names, more than {MAX_CLASSES}")
    try:
        return tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in values)
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: a class name is not UTF-8 ({exc})") from None


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(safe_unpickle(path), path)
    if "data" not in d or label_key not in d:
        raise DataFormatError(f"{path}: a CIFAR batch needs 'data' and {label_key!r}, has {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = check_labels(d[label_key], path, num_classes)
    if len(labels) != len(data):
        raise DataFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    return x, labels


def load_cifar_folder(folder: str | Path, *, label: str = "fine", name: str | None = None) -> DatasetSplits:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``,
    ``meta``) python batches → images ``(N, 3, 32, 32)`` float32 in [0, 1].

    ``folder`` may also be the parent of ``cifar-10-batches-py`` / ``cifar-100-python``. For CIFAR-100,
    ``label`` picks the ``fine`` (100) or ``coarse`` (20) labels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if not any((folder / n).is_file() for n in ("batches.meta", "meta")) and (folder / sub).is_dir():
            folder = folder / sub
            break
    if (folder / "batches.meta").is_file():
        batches = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
        if not batches or not (folder / "test_batch").is_file():
            raise FileNotFoundError(f"{folder}: CIFAR-10 needs data_batch_1..5 and test_batch")
        meta = _str_keys(safe_unpickle(folder / "batches.meta"), folder / "batches.meta")
        class_names = _names(meta.get("label_names", ()), folder / "batches.meta")
        default_name, k = "cifar10", len(class_names) or 10
        train = [_cifar_batch(p, "labels", k) for p in batches]
        x_tr = np.concatenate([t[0] for t in train])
        y_tr = np.concatenate([t[1] for t in train])
        x_te, y_te = _cifar_batch(folder / "test_batch", "labels", k)
    elif (folder / "meta").is_file() and (folder / "train").is_file() and (folder / "test").is_file():
        if label not in ("fine", "coarse"):
            raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
        meta = _str_keys(safe_unpickle(folder / "meta"), folder / "meta")
        class_names = _names(meta.get(f"{label}_label_names", ()), folder / "meta")
        default_name = "cifar100" if label == "fine" else "cifar100-coarse"
        k = len(class_names) or (100 if label == "fine" else 20)
        x_tr, y_tr = _cifar_batch(folder / "train", f"{label}_labels", k)
        x_te, y_te = _cifar_batch(folder / "test", f"{label}_labels", k)
    else:
        raise FileNotFoundError(
            f"{folder}: not a CIFAR folder (expected batches.meta + data_batch_* + test_batch, or meta + train + test)"
        )
    return DatasetSplits(
        name=name or default_name,
        train=ArrayDataset(x_tr, y_tr, num_classes=k),
        test=ArrayDataset(x_te, y_te, num_classes=k),
        class_names=class_names,
    )
