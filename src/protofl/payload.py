"""What crosses the wire between server and clients.

A :class:`Payload` is named arrays plus JSON metadata. It serialises to bytes and back
(:meth:`Payload.to_bytes` / :meth:`Payload.from_bytes`); the in-process engine sends every payload
through bytes so that no party can read another's objects, and the byte counts it reports are real.
:class:`PayloadSpec` states what a payload must contain; :func:`validate` checks names, dtypes,
shapes, finiteness and class ids and raises :class:`PayloadError` with the reason.

Wire format: ``b"PFL1"``, a little-endian uint32 header length, a UTF-8 JSON header
(metadata and, per array, name, dtype and shape), then the arrays' raw bytes in header order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"PFL1"
_ALLOWED_DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8", "bool"}
#: The names of the sendable dtypes in native byte order, looked up instead of ``dtype.name`` (which
#: numpy computes in Python on every access: a round checks a few thousand of them).
_NATIVE_NAMES = {np.dtype(name): name for name in _ALLOWED_DTYPES}


#: Each sendable dtype as the wire holds it (little-endian) and as a parsed array holds it (native order).
_WIRE_DTYPES = {name: (np.dtype(name).newbyteorder("<"), np.dtype(name).newbyteorder("=")) for name in _ALLOWED_DTYPES}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, from :data:`_NATIVE_NAMES` where it is there."""
    return _NATIVE_NAMES.get(dtype) or dtype.name


class PayloadError(ValueError):
    """A payload is malformed: bad bytes, missing or unexpected arrays, wrong shapes, NaN, unknown classes."""


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    """Named arrays plus JSON-serialisable metadata (method name, round, sample counts, ...)."""

    arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {}
        for name, value in self.arrays.items():
            arr = np.asarray(value)
            if dtype_name(arr.dtype) not in _ALLOWED_DTYPES:
                raise PayloadError(f"array {name!r}: dtype {arr.dtype} is not sendable")
            arrays[str(name)] = arr
        object.__setattr__(self, "arrays", types.MappingProxyType(arrays))
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def to_bytes(self) -> bytes:
        header = {
            "metadata": dict(self.metadata),
            "arrays": [[name, dtype_name(arr.dtype), list(arr.shape)] for name, arr in self.arrays.items()],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [MAGIC, struct.pack("<I", len(head)), head]
        parts += [
            np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            for arr in self.arrays.values()
        ]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        """Parse bytes written by :meth:`to_bytes`; anything malformed raises :class:`PayloadError`."""
        try:
            return cls._parse(memoryview(data))
        except PayloadError:
            raise
        except Exception as exc:  # any other failure of parsing untrusted bytes is a malformed payload
            raise PayloadError(f"malformed payload: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _parse(cls, view: memoryview) -> Payload:
        if len(view) < 8 or bytes(view[:4]) != MAGIC:
            raise PayloadError("not a protofl payload (bad magic bytes)")
        (head_len,) = struct.unpack("<I", view[4:8])
        if 8 + head_len > len(view):
            raise PayloadError("truncated payload header")
        head = bytes(view[8 : 8 + head_len])
        metadata, entries = (_header if head_len <= _CACHED_HEADER_BYTES else _parse_header)(head)
        offset = 8 + head_len
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, native, shape, size in entries:
            if offset + size > len(view):
                raise PayloadError(f"truncated payload: array {name!r} needs {size} bytes")
            arr = np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(shape)
            arrays[name] = arr.astype(native)  # a private, writable copy
            offset += size
        if offset != len(view):
            raise PayloadError(f"payload has {len(view) - offset} trailing bytes")
        # every array's dtype was checked against the sendable ones above: no second check
        payload = cls.__new__(cls)
        object.__setattr__(payload, "arrays", types.MappingProxyType(arrays))
        object.__setattr__(payload, "metadata", types.MappingProxyType(json.loads(metadata)))
        return payload


#: Headers up to this many bytes are kept, parsed, in a small cache (a reply's is about a hundred bytes).
_CACHED_HEADER_BYTES = 4096


def _parse_header(head: bytes) -> tuple[str, tuple[tuple[str, np.dtype, np.dtype, tuple[int, ...], int], ...]]:
    """A payload header's metadata (as JSON text, parsed afresh for each payload: it is a mutable dict) and
    its arrays' ``(name, wire dtype, native dtype, shape, bytes)``, checked. The replies of a round share a
    few headers (the same arrays, shapes and method), so each distinct header is parsed and checked once;
    a malformed one raises :class:`PayloadError` (not cached)."""
    header = json.loads(head)
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("metadata"), dict)
        or not isinstance(header.get("arrays"), list)
    ):
        raise PayloadError("corrupt payload header")
    entries = []
    names: set[str] = set()
    for entry in header["arrays"]:
        name, dtype_name, shape = entry
        if not isinstance(name, str) or name in names:
            raise PayloadError(f"array name {name!r} is not a string or appears twice")
        if dtype_name not in _ALLOWED_DTYPES:
            raise PayloadError(f"array {name!r}: dtype {dtype_name} is not allowed")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise PayloadError(f"array {name!r}: bad shape {shape!r}")
        dtype, native = _WIRE_DTYPES[dtype_name]
        size = dtype.itemsize
        for s in shape:  # Python ints: no overflow
            size *= s
        names.add(name)
        entries.append((name, dtype, native, tuple(shape), size))
    return json.dumps(header["metadata"]), tuple(entries)


_header = functools.lru_cache(maxsize=256)(_parse_header)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Expected dtype and shape of one array; ``None`` in a shape matches any length on that axis."""

    shape: tuple[int | None, ...]
    dtype: str = "float32"
    #: Values must lie in [0, class_bound) (class ids).
    class_bound: int | None = None
    #: Values must be at least this (e.g. 1 for sample counts).
    minimum: float | None = None
    unique: bool = False


@dataclasses.dataclass(frozen=True)
class PayloadSpec:
    """What a payload from one party must contain."""

    method: str
    arrays: Mapping[str, ArraySpec]
    #: Leading axes of these arrays must all have the same length (e.g. classes, prototypes, counts).
    same_length: tuple[str, ...] = ()
    #: Arrays that may be absent (e.g. sent only in the last round); when present they are checked.
    optional: tuple[str, ...] = ()


def _has_duplicates(arr: np.ndarray) -> bool:
    """Whether ``np.unique(arr)`` is shorter than ``arr``; a short integer vector (a class list, the usual
    case) is checked as a set of Python ints, far cheaper than ``np.unique`` at that size."""
    if arr.ndim == 1 and arr.dtype.kind in "iub" and len(arr) <= 1024:
        return len(set(arr.tolist())) != len(arr)
    return len(np.unique(arr)) != len(arr)


def _extremes(arr: np.ndarray) -> tuple[Any, Any]:
    """``(arr.min(), arr.max())`` of a non-empty array; a short integer vector (a class list or counts, the
    usual case) is read as Python ints, far cheaper than two numpy reductions at that size."""
    if arr.ndim == 1 and arr.dtype.kind in "iub" and len(arr) <= 1024:
        values = arr.tolist()
        return min(values), max(values)
    return arr.min(), arr.max()


def validate(payload: Payload, spec: PayloadSpec) -> None:
    """Raise :class:`PayloadError` if ``payload`` does not satisfy ``spec``."""
    method = payload.metadata.get("method")
    if method != spec.method:
        raise PayloadError(f"payload is for method {method!r}, expected {spec.method!r}")
    if payload.arrays.keys() != spec.arrays.keys():  # (the usual case, every array named, needs no sets)
        missing = sorted(set(spec.arrays) - set(payload.arrays) - set(spec.optional))
        extra = sorted(set(payload.arrays) - set(spec.arrays))
        if missing:
            raise PayloadError(f"missing arrays: {', '.join(missing)}")
        if extra:
            raise PayloadError(f"unexpected arrays: {', '.join(extra)}")
    for name, want in spec.arrays.items():
        if name not in payload.arrays:
            continue
        arr = payload.arrays[name]
        if dtype_name(arr.dtype) != want.dtype:
            raise PayloadError(f"array {name!r}: dtype {arr.dtype} is not {want.dtype}")
        if len(arr.shape) != len(want.shape) or any(w is not None and w != s for w, s in zip(want.shape, arr.shape)):
            raise PayloadError(f"array {name!r}: shape {arr.shape} does not match {want.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise PayloadError(f"array {name!r}: contains NaN or infinite values")
        if (want.class_bound is not None or want.minimum is not None) and arr.size:
            low, high = _extremes(arr)
            if want.class_bound is not None and (low < 0 or high >= want.class_bound):
                raise PayloadError(
                    f"array {name!r}: class ids must lie in [0, {want.class_bound}), got [{low}, {high}]"
                )
            if want.minimum is not None and low < want.minimum:
                raise PayloadError(f"array {name!r}: values must be >= {want.minimum}, got {low}")
        if want.unique and _has_duplicates(arr):
            raise PayloadError(f"array {name!r}: duplicate entries")
    lengths = {name: len(payload.arrays[name]) for name in spec.same_length}
    if len(set(lengths.values())) > 1:
        raise PayloadError(f"arrays {', '.join(lengths)} must have the same length, got {lengths}")
