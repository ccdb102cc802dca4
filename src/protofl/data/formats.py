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
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from protofl.data.dataset import ArrayDataset, DatasetSplits

__all__ = [
    "DataFormatError",
    "load_cifar_folder",
    "load_idx_folder",
    "read_idx",
    "safe_unpickle",
    "write_idx",
]


class DataFormatError(ValueError):
    """A file is not in the expected format (wrong magic number, truncated, inconsistent)."""


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


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise DataFormatError(f"{path}: cannot decompress ({exc}); the file is probably truncated") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or .gz, detected from its content) into an array in native byte order.

    Checks the magic number, the type code, the dimensions and that the payload holds exactly the
    number of values the header announces; raises :class:`DataFormatError` otherwise.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataFormatError(f"{path}: bad IDX magic number {data[:4].hex()} (must start with 0000)")
    if code not in IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX file declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing data"
        raise DataFormatError(
            f"{path}: IDX payload {what}: header says {dims} x {dtype.itemsize} bytes = {expected} "
            f"bytes, file holds {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)
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
    ("test", "images"): ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte",
                         "test-images-idx3-ubyte", "test-images.idx3-ubyte"],
    ("test", "labels"): ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte",
                         "test-labels-idx1-ubyte", "test-labels.idx1-ubyte"],
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


def _idx_images(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise DataFormatError(f"{path}: images must have 3 or 4 dimensions, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    arr = arr.astype(np.float32)
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
            raise DataFormatError(
                f"{folder}: {split} has {len(x)} images but {len(y)} labels"
            )
        if len(y) and y.min() < 0:
            raise DataFormatError(f"{files[split, 'labels']}: negative label {y.min()}")
        parts[split] = (x, y.astype(np.int64))
    k = num_classes or max(len(class_names), int(max(parts["train"][1].max(initial=-1),
                                                      parts["test"][1].max(initial=-1))) + 1)
    return DatasetSplits(
        name=name or f"idx:{folder}",
        train=ArrayDataset(*parts["train"], num_classes=k),
        test=ArrayDataset(*parts["test"], num_classes=k),
        class_names=tuple(class_names),
    )


# --------------------------------------------------------------------------------------------------
# Restricted unpickling


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import builtins

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, whatever its module
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 arrays; refuses object dtypes itself
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[mod, "_reconstruct"] = reconstruct
        allowed[mod, "scalar"] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[mod, "_frombuffer"] = frombuffer
    allowed["numpy", "ndarray"] = np.ndarray
    allowed["numpy", "dtype"] = np.dtype
    allowed["_codecs", "encode"] = _codecs.encode  # how protocol-2 pickles from Python 3 store bytes
    for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int",
                 "float", "complex", "bool", "slice", "range"):
        allowed["builtins", name] = getattr(builtins, name)
        allowed["__builtin__", name] = getattr(builtins, name)
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module: str, name: str) -> Any:
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _allowed_globals()
        try:
            return _SafeUnpickler._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain containers are allowed"
            ) from None


def safe_unpickle(path: str | Path) -> Any:
    """Unpickle ``path`` (Python 2 or 3 pickles; Python 2 strings stay bytes) allowing only numpy
    arrays and builtin containers; anything else raises :class:`pickle.UnpicklingError`."""
    data = Path(path).read_bytes()
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        if isinstance(exc, pickle.UnpicklingError) and "refusing" in str(exc):
            raise
        raise DataFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------------
# CIFAR


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a dict, got {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _names(values: Any) -> tuple[str, ...]:
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(safe_unpickle(path), path)
    if "data" not in d or label_key not in d:
        raise DataFormatError(f"{path}: a CIFAR batch needs 'data' and {label_key!r}, has {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
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
        class_names = _names(meta.get("label_names", ()))
        train = [_cifar_batch(p, "labels") for p in batches]
        x_tr = np.concatenate([t[0] for t in train])
        y_tr = np.concatenate([t[1] for t in train])
        x_te, y_te = _cifar_batch(folder / "test_batch", "labels")
        default_name, k = "cifar10", len(class_names) or 10
    elif (folder / "meta").is_file() and (folder / "train").is_file() and (folder / "test").is_file():
        if label not in ("fine", "coarse"):
            raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
        meta = _str_keys(safe_unpickle(folder / "meta"), folder / "meta")
        class_names = _names(meta.get(f"{label}_label_names", ()))
        x_tr, y_tr = _cifar_batch(folder / "train", f"{label}_labels")
        x_te, y_te = _cifar_batch(folder / "test", f"{label}_labels")
        default_name = "cifar100" if label == "fine" else "cifar100-coarse"
        k = len(class_names) or (100 if label == "fine" else 20)
    else:
        raise FileNotFoundError(
            f"{folder}: not a CIFAR folder (expected batches.meta + data_batch_* + test_batch, "
            "or meta + train + test)"
        )
    return DatasetSplits(
        name=name or default_name,
        train=ArrayDataset(x_tr, y_tr, num_classes=k),
        test=ArrayDataset(x_te, y_te, num_classes=k),
        class_names=class_names,
    )
