"""Frozen-encoder embeddings and their on-disk cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from protofl.data import embeddings
from protofl.data.dataset import ArrayDataset, DatasetSplits
from protofl.data.datasets import optdigits_arrays
from protofl.data.embeddings import ENCODERS, EncoderSpec, embed, embedding_cache_path

pytestmark = pytest.mark.usefixtures("cache")


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    x_tr, y_tr, x_te, y_te = optdigits_arrays()
    dom = np.arange(6) % 2
    return DatasetSplits(
        "optdigits-mini",
        ArrayDataset(x_tr[:6], y_tr[:6], 10, dom, ("a", "b")),
        ArrayDataset(x_te[:4], y_te[:4], 10),
        tuple("0123456789"),
    )


def test_efficientnet_embeddings_shape_determinism_and_cache(digits, cache, monkeypatch):
    e1 = embed(digits, progress=False, batch_size=4)
    assert e1.train.x.shape == (6, 1280) and e1.test.x.shape == (4, 1280)
    assert e1.train.x.dtype == np.float32 and np.isfinite(e1.train.x).all() and np.isfinite(e1.test.x).all()
    assert np.abs(e1.train.x).sum(1).min() > 0
    assert not np.allclose(e1.train.x[0], e1.train.x[1])  # different images, different features
    # labels, domains and names pass through
    np.testing.assert_array_equal(e1.train.y, digits.train.y)
    np.testing.assert_array_equal(e1.train.domain, digits.train.domain)
    assert e1.train.domain_names == ("a", "b") and e1.name == digits.name and e1.class_names == digits.class_names
    path = embedding_cache_path(digits, "efficientnet-lite0", 32)
    assert path.is_file() and path.parent == cache / "embeddings"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]

    # deterministic: a fresh computation (no cache, another batch size) gives the same features
    e2 = embed(digits, progress=False, batch_size=3, cache=False)
    np.testing.assert_allclose(e2.train.x, e1.train.x, rtol=1e-4, atol=1e-5)

    # cache hit: the encoder is not even built
    def boom():
        raise AssertionError("encoder built despite a cached result")

    monkeypatch.setitem(ENCODERS, "efficientnet-lite0", dataclasses.replace(ENCODERS["efficientnet-lite0"], build=boom))
    e3 = embed(digits, progress=False)
    np.testing.assert_array_equal(e3.train.x, e1.train.x)
    np.testing.assert_array_equal(e3.test.x, e1.test.x)
    # a different input size is a different cache entry
    with pytest.raises(AssertionError, match="encoder built"):
        embed(digits, image_size=40, progress=False)


def _recording_encoder(seen: list) -> EncoderSpec:
    import torch

    def build():
        def features(x):
            seen.append(x.clone())
            return torch.stack([x.mean(dim=(1, 2, 3)), x[:, 0].amax(dim=(1, 2))], dim=1)

        return features

    return EncoderSpec("fake", 2, build, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_preprocessing_resize_grey_to_rgb_and_normalise(monkeypatch):
    seen: list = []
    monkeypatch.setitem(ENCODERS, "fake", _recording_encoder(seen))
    x = np.zeros((5, 1, 8, 8), dtype=np.float32)
    x[1] = 1.0
    data = DatasetSplits(
        "toy", ArrayDataset(x, np.zeros(5, dtype=np.int64), 2), ArrayDataset(x[:2], np.zeros(2, dtype=np.int64), 2)
    )
    out = embed(data, encoder="fake", image_size=16, batch_size=2, progress=False)
    assert [tuple(b.shape) for b in seen] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16)]
    first = seen[0].numpy()
    np.testing.assert_allclose(first[0], -2.0)  # (0 - 0.5) / 0.25
    np.testing.assert_allclose(first[1], 2.0)  # (1 - 0.5) / 0.25
    assert out.train.x.shape == (5, 2)
    np.testing.assert_allclose(out.train.x[:, 0], [-2, 2, -2, -2, -2])


def test_cache_key_depends_on_content(digits, monkeypatch):
    monkeypatch.setitem(ENCODERS, "fake", _recording_encoder([]))
    changed = DatasetSplits(digits.name, ArrayDataset(digits.train.x.copy(), digits.train.y, 10), digits.test)
    changed.train.x[0, 0, 0, 0] += 0.5
    assert embedding_cache_path(digits, "fake", 32) != embedding_cache_path(changed, "fake", 32)
    assert embedding_cache_path(digits, "fake", 32) == embedding_cache_path(
        DatasetSplits(digits.name, ArrayDataset(digits.train.x.copy(), digits.train.y, 10), digits.test), "fake", 32
    )
    a = embed(digits, encoder="fake", image_size=8, progress=False)
    b = embed(changed, encoder="fake", image_size=8, progress=False)
    assert a.train.x[0, 0] != b.train.x[0, 0]


def test_unknown_encoder(digits):
    with pytest.raises(KeyError, match="efficientnet-lite0"):
        embed(digits, encoder="resnet-9000")


def test_corrupt_cache_entry_is_recomputed(digits, monkeypatch):
    monkeypatch.setitem(ENCODERS, "fake", _recording_encoder([]))
    a = embed(digits, encoder="fake", image_size=8, progress=False)
    path = embedding_cache_path(digits, "fake", 8)
    path.write_bytes(path.read_bytes()[:50])
    b = embed(digits, encoder="fake", image_size=8, progress=False)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert embeddings._load(path, digits, 2) is not None  # rewritten whole
