"""On-disk formats: IDX (plain/gz) and CIFAR python batches, on tiny files the tests write themselves."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from protofl.data.formats import (
    DataFormatError,
    load_cifar_folder,
    load_idx_folder,
    read_idx,
    safe_unpickle,
    write_idx,
)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """IDX written by hand from the format description (independent of write_idx)."""
    header = b"\x00\x00" + bytes([code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_hand_written_uint8_and_gz(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(imgs, 0x08))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(imgs, 0x08)))
    for name in ("a", "a.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, imgs)


@pytest.mark.parametrize("dtype,code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_big_endian_types(tmp_path, dtype, code):
    arr = np.array([[1, -2, 300], [70000 if dtype != np.int16 else 7000, 5, -6]], dtype=dtype)
    (tmp_path / "x").write_bytes(_idx_bytes(arr, code))
    out = read_idx(tmp_path / "x")
    assert out.dtype == np.dtype(dtype)  # native byte order
    np.testing.assert_array_equal(out, arr)


def test_write_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    write_idx(tmp_path / "r.gz", arr)
    assert (tmp_path / "r.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "r.gz"), arr)
    assert write_idx(tmp_path / "r", arr).read_bytes() == _idx_bytes(arr, 0x08)


def test_read_idx_rejects_truncated_and_bad_headers(tmp_path):
    arr = np.zeros((10, 28, 28), dtype=np.uint8)
    raw = _idx_bytes(arr, 0x08)
    (tmp_path / "trunc").write_bytes(raw[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "extra").write_bytes(raw + b"\x00")
    with pytest.raises(DataFormatError, match="trailing"):
        read_idx(tmp_path / "extra")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(raw)[:-50])
    with pytest.raises(DataFormatError, match="truncated"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "magic").write_bytes(b"\x01\x00" + raw[2:])
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "code").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(DataFormatError, match="type code"):
        read_idx(tmp_path / "code")
    (tmp_path / "short").write_bytes(raw[:9])
    with pytest.raises(DataFormatError, match="header"):
        read_idx(tmp_path / "short")


def _write_idx_folder(folder, n_train=6, n_test=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 5, 5)).astype(np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        data[prefix] = (x, y)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_folder(tmp_path, gz):
    data = _write_idx_folder(tmp_path / "d", gz=gz)
    splits = load_idx_folder(tmp_path / "d", name="toy")
    assert splits.name == "toy"
    assert splits.train.x.shape == (6, 1, 5, 5) and splits.test.x.shape == (4, 1, 5, 5)
    assert splits.train.x.dtype == np.float32
    np.testing.assert_allclose(splits.train.x[:, 0] * 255, data["train"][0], atol=1e-4)
    np.testing.assert_array_equal(splits.test.y, data["t10k"][1])
    assert splits.train.y.dtype == np.int64
    assert splits.num_classes == max(data["train"][1].max(), data["t10k"][1].max()) + 1


def test_load_idx_folder_errors(tmp_path):
    _write_idx_folder(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="test labels"):
        load_idx_folder(tmp_path / "d")
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))  # 4 images, 3 labels
    with pytest.raises(DataFormatError, match="4 images but 3 labels"):
        load_idx_folder(tmp_path / "d")


# --------------------------------------------------------------------------------------------------
# CIFAR


def _dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 3072)).astype(np.uint8)


def test_load_cifar10_folder(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for i in (1, 2):
        data = _cifar_images(rng, 3)
        labels = [int(v) for v in rng.integers(0, 10, size=3)]
        # CIFAR's own files are Python 2 pickles: bytes keys
        _dump(folder / f"data_batch_{i}", {b"batch_label": b"training batch", b"data": data, b"labels": labels})
        batches.append((data, labels))
    test = _cifar_images(rng, 2)
    _dump(folder / "test_batch", {b"data": test, b"labels": [3, 9]}, protocol=4)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})

    splits = load_cifar_folder(tmp_path)  # the parent folder works too
    assert splits.name == "cifar10" and splits.num_classes == 10
    assert splits.class_names[0] == "airplane" and splits.class_names[-1] == "truck"
    assert splits.train.x.shape == (6, 3, 32, 32) and splits.test.x.shape == (2, 3, 32, 32)
    assert splits.train.x.dtype == np.float32 and 0 <= splits.train.x.min() and splits.train.x.max() <= 1
    # Layout: 1024 red values row-major, then green, then blue.
    d0 = batches[0][0][0]
    assert splits.train.x[0, 0, 0, 1] == pytest.approx(d0[1] / 255)
    assert splits.train.x[0, 1, 2, 3] == pytest.approx(d0[1024 + 2 * 32 + 3] / 255)
    assert splits.train.x[4, 2, 31, 31] == pytest.approx(batches[1][0][1][3071] / 255)
    np.testing.assert_array_equal(splits.train.y, batches[0][1] + batches[1][1])
    np.testing.assert_array_equal(splits.test.y, [3, 9])


def test_load_cifar100_folder(tmp_path):
    rng = np.random.default_rng(2)
    fine_names = [f"class{i}".encode() for i in range(100)]
    coarse_names = [f"super{i}".encode() for i in range(20)]
    _dump(tmp_path / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    _dump(
        tmp_path / "train",
        {b"data": _cifar_images(rng, 4), b"fine_labels": [99, 0, 5, 7], b"coarse_labels": [19, 0, 1, 2]},
    )
    _dump(tmp_path / "test", {"data": _cifar_images(rng, 2), "fine_labels": [1, 2], "coarse_labels": [3, 4]})
    fine = load_cifar_folder(tmp_path)
    assert fine.num_classes == 100 and fine.class_names[99] == "class99"
    np.testing.assert_array_equal(fine.train.y, [99, 0, 5, 7])
    coarse = load_cifar_folder(tmp_path, label="coarse")
    assert coarse.num_classes == 20
    np.testing.assert_array_equal(coarse.test.y, [3, 4])


def test_cifar_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CIFAR folder"):
        load_cifar_folder(tmp_path)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_unpickling_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    _dump(tmp_path / "test_batch", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_unpickle(tmp_path / "test_batch")
    assert not marker.exists()
    # The same in a CIFAR folder: loading fails without running anything.
    _dump(tmp_path / "batches.meta", {b"label_names": [b"a"]})
    _dump(tmp_path / "data_batch_1", {b"data": _cifar_images(np.random.default_rng(0), 1), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError):
        load_cifar_folder(tmp_path)
    assert not marker.exists()


def test_safe_unpickle_reads_numpy_and_containers(tmp_path):
    obj = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": (1, 2.5, "s", b"x"), "c": [np.float64(3)]}
    for protocol in (2, 4, 5):
        _dump(tmp_path / "p", obj, protocol=protocol)
        out = safe_unpickle(tmp_path / "p")
        np.testing.assert_array_equal(out["a"], obj["a"])
        assert out["b"] == (1, 2.5, "s", b"x") and out["c"][0] == 3.0
    (tmp_path / "bad").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataFormatError):
        safe_unpickle(tmp_path / "bad")
