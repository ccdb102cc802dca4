"""Principle 3: loaders bound their allocations by the file and validate values.

Declared sizes are checked against the file before anything is allocated or decompressed; gzip is
decompressed incrementally; labels must be whole, non-negative and below the class count, pixels
finite; the restricted unpickler refuses allocations its file cannot justify. Each bad file is a
:class:`DataFormatError` naming the file (on the command line: one line, exit code 2).
"""

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _hardening import one_error_line

from protofl.cli import main
from protofl.data.formats import (
    DataFormatError,
    UnsafePickleError,
    load_cifar_folder,
    load_idx_folder,
    read_idx,
    safe_unpickle,
    write_idx,
)


def _idx_header(code: int, dims: tuple[int, ...]) -> bytes:
    return b"\x00\x00" + bytes([code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter and return its peak resident memory (MB)."""
    src = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + str(Path(__file__).resolve().parent)
    script = code + "\nfrom _fuzz import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_gzip_idx_is_not_decompressed_past_its_declared_size(tmp_path):
    """A small valid header followed by 384 MB of zeros (a 0.4 MB file): refused after reading what the
    header declares, without decompressing the rest (it was decompressed whole first)."""
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as f:
        f.write(_idx_header(0x08, (10, 28, 28)) + bytes(10 * 28 * 28))
        block = bytes(1 << 20)
        for _ in range(384):
            f.write(block)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(DataFormatError, match="trailing data") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    peak = _peak_rss_mb(f"""
from protofl.data.formats import read_idx, DataFormatError
try:
    read_idx({str(path)!r})
except DataFormatError:
    pass
""")
    assert peak < 150, peak


@pytest.mark.parametrize("dims", [(2**31, 2**31), (60000, 28, 28), (4294967295,)])
def test_idx_header_declaring_more_than_the_file_can_hold_is_refused_before_allocating(tmp_path, dims):
    plain, packed = tmp_path / "plain", tmp_path / "packed.gz"
    plain.write_bytes(_idx_header(0x08, dims) + bytes(100))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(plain)
    with pytest.raises(DataFormatError, match="more than a gzip file of"):
        read_idx(packed)


def _idx_folder(folder: Path, train_labels: np.ndarray, images: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(train_labels)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((n, 4, 4), np.uint8) if images is None else images)
    write_idx(folder / "train-labels-idx1-ubyte", train_labels)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    return folder


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0, 1.5, 2], np.float32), "whole numbers"),  # truncated to 1 before
        (np.array([0, np.nan, 2], np.float64), "whole numbers"),
        (np.array([0, -3, 2], np.int16), "negative label"),
        (np.array([0, 2_000_000, 2], np.int32), "out of range"),  # two million classes
    ],
)
def test_idx_labels_are_validated(tmp_path, labels, message):
    folder = _idx_folder(tmp_path / "d", labels)
    with pytest.raises(DataFormatError, match=message) as info:
        load_idx_folder(folder)
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_idx_integral_float_labels_are_accepted(tmp_path):
    folder = _idx_folder(tmp_path / "d", np.array([0, 3, 2], np.float32))
    np.testing.assert_array_equal(load_idx_folder(folder).train.y, [0, 3, 2])


def test_idx_pixels_must_be_finite(tmp_path):
    images = np.zeros((3, 4, 4), np.float32)
    images[1, 2, 2] = np.inf
    folder = _idx_folder(tmp_path / "d", np.array([0, 1, 2], np.uint8), images)
    with pytest.raises(DataFormatError, match="finite") as info:
        load_idx_folder(folder)
    assert "train-images-idx3-ubyte" in str(info.value)


class _Alloc:
    """Pickles as a call to an allowed builtin with a huge size."""

    def __init__(self, function, size):
        self.function, self.size = function, size

    def __reduce__(self):
        return (self.function, (self.size,))


def _cifar_folder(folder: Path, labels, data=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = len(labels) if isinstance(labels, list) else 2
    batch = {
        b"data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8) if data is None else data,
        b"labels": labels,
    }
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": rng.integers(0, 256, size=(1, 3072)).astype(np.uint8), b"labels": [1]}, protocol=2)
    )
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return folder


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0.5, 1.7], "whole numbers"),  # were truncated to 0 and 1
        ([0, 10], "out of range for the 10 classes"),
        ([-1, 2], "negative label"),
        ([b"a", b"b"], "labels must be integers"),
    ],
)
def test_cifar_labels_are_validated(tmp_path, labels, message):
    folder = _cifar_folder(tmp_path / "c", labels)
    with pytest.raises(DataFormatError, match=message) as info:
        load_cifar_folder(folder)
    assert "data_batch_1" in str(info.value)


@pytest.mark.parametrize("function, size", [(bytearray, 10**12), (bytes, 10**12), (bytearray, 10**8)])
def test_unpickler_refuses_allocations_the_file_cannot_justify(tmp_path, function, size):
    folder = _cifar_folder(tmp_path / "c", [0, 1], data=_Alloc(function, size))
    with pytest.raises(UnsafePickleError, match="more than the") as info:
        load_cifar_folder(folder)
    assert "data_batch_1" in str(info.value)


def test_unpickler_refuses_a_huge_array_shape(tmp_path):
    # numpy's _reconstruct(ndarray, shape, dtype) allocates the shape it is given.
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]

    class Shape:
        def __reduce__(self):
            return (reconstruct, (np.ndarray, (10**7, 3072), b"b"))

    path = tmp_path / "p"
    path.write_bytes(pickle.dumps({b"data": Shape()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="more than the"):
        safe_unpickle(path)


def test_unpickler_refuses_a_memo_index_past_the_file(tmp_path):
    path = tmp_path / "memo"
    path.write_bytes(b"\x80\x02]r" + struct.pack("<I", 2**31) + b".")  # LONG_BINPUT 2^31: a 16 GB memo
    with pytest.raises(UnsafePickleError, match="memo index"):
        safe_unpickle(path)


def test_counted_bytes_longer_than_the_file_are_refused(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"abc.")  # BYTEARRAY8 of 1 TB
    with pytest.raises(DataFormatError, match=str(path)):
        safe_unpickle(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refused_pickle_names_the_file_on_the_command_line(tmp_path, capsys):
    folder = _cifar_folder(tmp_path / "c", [0, 1], data=_Evil())
    code = main(
        [
            "run",
            "--set",
            f"data.dataset=cifar:{folder}",
            "--set",
            "federation.progress=false",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    one_error_line(capsys.readouterr().err, str(folder / "data_batch_1"), "refusing to load posix.system")
    assert not (tmp_path / "r").exists()  # the run folder it created held nothing: removed
