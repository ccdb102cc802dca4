"""Tests for protofl.data.partition and protofl.data.partition_report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from protofl.config import ConfigError, PartitionConfig
from protofl.data.partition import (
    DIRICHLET_MAX_DRAWS,
    Partition,
    long_tail_counts,
    make_partition,
    stratified_counts,
)
from protofl.data.partition_report import (
    label_skew,
    partition_summary,
    partition_table,
    plot_partition_heatmap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().target.astype(np.int64)


def synthetic(n_per_class: int = 600, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(num_classes), n_per_class)
    np.random.default_rng(seed).shuffle(y)
    return y


def assert_exact_cover(p: Partition, labels: np.ndarray) -> None:
    """Every kept index in exactly one client's train or test split; arrays sorted int64."""
    parts = list(p.train) + list(p.test)
    for a in parts:
        assert a.dtype == np.int64
        assert np.all(np.diff(a) > 0), "indices must be sorted and unique"
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat)), "an index appears twice"
    assert np.array_equal(np.sort(flat), p.pool_index)
    assert np.all(np.diff(p.pool_index) > 0)
    assert p.pool_index.min() >= 0 and p.pool_index.max() < len(labels)
    assert p.class_counts(labels, "all").sum() == len(p.pool_index)


SCHEMES = [
    PartitionConfig(scheme="iid", num_clients=7),
    PartitionConfig(scheme="dirichlet", num_clients=20, alpha=0.3),
    PartitionConfig(scheme="pathological", num_clients=15, classes_per_client=2),
    PartitionConfig(scheme="dirichlet", num_clients=10, alpha=1.0, imbalance_factor=10),
]


@pytest.mark.parametrize("config", SCHEMES, ids=lambda c: f"{c.scheme}-lt{c.imbalance_factor:g}")
def test_exact_cover_and_min_size(config, digits):
    p = make_partition(digits, config, seed=3)
    assert p.num_clients == config.num_clients
    assert p.num_classes == 10
    assert_exact_cover(p, digits)
    assert p.sizes().min() >= config.min_client_size
    if config.imbalance_factor == 1:
        assert np.array_equal(p.pool_index, np.arange(len(digits)))
    assert p.meta["seed"] == 3 and p.meta["config"]["scheme"] == config.scheme


def test_iid_sizes_differ_by_at_most_one(digits):
    for k in (1, 7, 10, 13, 100):
        p = make_partition(digits, PartitionConfig(scheme="iid", num_clients=k, min_client_size=1), seed=0)
        sizes = p.sizes("all")
        assert sizes.sum() == len(digits)
        assert sizes.max() - sizes.min() <= 1
    # roughly IID: every client of 10 holds every class
    p = make_partition(digits, PartitionConfig(scheme="iid", num_clients=10), seed=0)
    assert (p.class_counts(digits, "all") > 0).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 5.0])
def test_dirichlet_min_size_and_skew(alpha, digits):
    config = PartitionConfig(scheme="dirichlet", num_clients=20, alpha=alpha, min_client_size=15)
    for seed in range(3):
        p = make_partition(digits, config, seed=seed)
        assert_exact_cover(p, digits)
        assert p.sizes("all").min() >= 15


def test_dirichlet_smaller_alpha_more_skewed(digits):
    skew = {}
    for alpha in (0.1, 100.0):
        config = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=alpha)
        skew[alpha] = np.mean(
            [partition_summary(make_partition(digits, config, seed=s), digits)["label_skew_tv"] for s in range(3)]
        )
    assert skew[0.1] > 0.4 > 0.1 > skew[100.0]


@pytest.mark.parametrize("config", SCHEMES + [PartitionConfig(scheme="domain", num_clients=6)], ids=lambda c: c.scheme)
def test_deterministic_per_seed(config, digits):
    domains = np.arange(len(digits)) % 3
    a = make_partition(digits, config, seed=11, domains=domains)
    b = make_partition(digits, config, seed=11, domains=domains)
    c = make_partition(digits, config, seed=12, domains=domains)
    assert a == b
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
    assert a != c
    assert any(not np.array_equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.parametrize("s", [1, 2, 3, 10])
def test_pathological_exact_classes(s, digits):
    config = PartitionConfig(scheme="pathological", num_clients=12, classes_per_client=s)
    p = make_partition(digits, config, seed=0)
    assert_exact_cover(p, digits)
    held = (p.class_counts(digits, "all") > 0).sum(1)
    assert np.all(held == s)
    # stratified split keeps all s classes in each client's train split
    assert np.all((p.class_counts(digits, "train") > 0).sum(1) == s)
    # shards are near-equal, so client sizes are close
    sizes = p.sizes("all")
    assert sizes.max() <= 2 * sizes.min()


def test_pathological_many_clients_and_diversity():
    y = synthetic(600)
    config = PartitionConfig(scheme="pathological", num_clients=1000, classes_per_client=2, min_client_size=5)
    p = make_partition(y, config, seed=0)
    counts = p.class_counts(y, "all")
    assert np.all((counts > 0).sum(1) == 2)
    assert_exact_cover(p, y)
    # class pairs are not all the same few: many distinct pairs occur
    pairs = {tuple(np.flatnonzero(row)) for row in counts}
    assert len(pairs) >= 30


def test_pathological_fewer_shards_than_classes(digits):
    # 2 clients x 2 classes = 4 shards for 10 classes: 6 classes go unused and leave the pool
    config = PartitionConfig(scheme="pathological", num_clients=2, classes_per_client=2)
    p = make_partition(digits, config, seed=0)
    assert_exact_cover(p, digits)
    assert np.all((p.class_counts(digits, "all") > 0).sum(1) == 2)
    assert len(np.unique(digits[p.pool_index])) == 4


def test_pathological_errors(digits):
    with pytest.raises(ValueError, match="classes_per_client.*11"):
        make_partition(digits, PartitionConfig(scheme="pathological", classes_per_client=11), seed=0)
    y = np.array([0] * 50 + [1] * 50)
    with pytest.raises(ValueError, match="classes_per_client"):
        make_partition(
            y,
            PartitionConfig(scheme="pathological", num_clients=2, classes_per_client=3, min_client_size=1),
            seed=0,
            num_classes=3,
        )


def test_long_tail_profile(digits):
    for factor in (2.0, 10.0, 50.0):
        config = PartitionConfig(scheme="iid", num_clients=5, imbalance_factor=factor)
        p = make_partition(digits, config, seed=0)
        assert_exact_cover(p, digits)
        kept = np.bincount(digits[p.pool_index], minlength=10)
        assert np.all(np.diff(kept) <= 0), "class 0 largest, non-increasing"
        n_max, n_min = kept[0], kept[-1]
        # largest / smallest == factor within the rounding of the smallest count
        assert abs(n_min - n_max / factor) < 1
        # each class follows n_max * factor^(-c/(C-1)) (floored)
        expected = n_max * factor ** (-np.arange(10) / 9)
        assert np.all(np.abs(kept - expected) < 1)
        # n_max is as large as the scarcest class allows
        assert n_max >= np.bincount(digits).min()


def test_long_tail_counts_balanced_and_rng():
    counts = long_tail_counts(np.full(10, 5000), 100)
    assert counts[0] == 5000 and counts[-1] == 50
    assert np.array_equal(long_tail_counts(np.full(4, 10), 1.0), np.full(4, 10))
    y = synthetic(500)
    config = PartitionConfig(scheme="iid", num_clients=4, imbalance_factor=20)
    a = make_partition(y, config, seed=0).pool_index
    b = make_partition(y, config, seed=1).pool_index
    assert len(a) == len(b) and not np.array_equal(a, b)  # same profile, different samples


def test_domain_scheme(digits):
    domains = np.random.default_rng(0).integers(0, 4, size=len(digits))
    config = PartitionConfig(scheme="domain", num_clients=10)
    p = make_partition(digits, config, seed=0, domains=domains)
    assert_exact_cover(p, digits)
    assert np.array_equal(p.client_domains, np.arange(10) % 4)
    for k in range(10):
        doms = np.unique(domains[p.client_indices(k, "all")])
        assert doms.tolist() == [k % 4]
    # within a domain the split is IID: sizes differ by at most one
    sizes = p.sizes("all")
    for d in range(4):
        s = sizes[np.arange(10) % 4 == d]
        assert s.max() - s.min() <= 1
        assert s.sum() == np.sum(domains == d)


def test_domain_errors(digits):
    with pytest.raises(ValueError, match="domains"):
        make_partition(digits, PartitionConfig(scheme="domain", num_clients=4), seed=0)
    domains = np.arange(len(digits)) % 5
    with pytest.raises(ValueError, match=r"num_clients.*>= 5"):
        make_partition(digits, PartitionConfig(scheme="domain", num_clients=3), seed=0, domains=domains)
    with pytest.raises(ValueError, match="domains"):
        make_partition(digits, PartitionConfig(scheme="domain", num_clients=5), seed=0, domains=domains[:10])


def test_stratified_split(digits):
    config = PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.3, test_fraction=0.25)
    p = make_partition(digits, config, seed=5)
    train = p.class_counts(digits, "train")
    test = p.class_counts(digits, "test")
    total = train + test
    # every class a client holds is in its train split; test classes are a subset of train classes
    assert np.array_equal(train > 0, total > 0)
    assert np.all((test > 0) <= (train > 0))
    # classes with enough samples appear in both splits, in proportion
    big = total >= 4
    assert np.all(test[big] > 0)
    assert np.all(np.abs(test - 0.25 * total) <= 0.5 + 1e-9)
    assert np.array_equal(test, stratified_counts(total, 0.25))
    assert abs(test.sum() / total.sum() - 0.25) < 0.01


def test_stratified_counts_rule():
    counts = np.array([[1, 0, 0], [2, 1, 0], [3, 5, 10], [1, 1, 1]])
    test = stratified_counts(counts, 0.2)
    # singletons stay in train; a client whose rule gives no test sample moves one from its largest class
    assert test.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 2], [0, 0, 0]]
    assert np.all(counts - test >= (counts > 0))


def test_impossible_partitions_raise(digits):
    n = len(digits)
    with pytest.raises(ValueError, match=r"min_client_size.*lower min_client_size or num_clients"):
        make_partition(digits, PartitionConfig(scheme="iid", num_clients=200, min_client_size=10), seed=0)
    with pytest.raises(ValueError, match=str(n)):
        make_partition(digits, PartitionConfig(scheme="dirichlet", num_clients=500, min_client_size=10), seed=0)
    # feasible in total but not with Dirichlet(0.01) proportions
    config = PartitionConfig(scheme="dirichlet", num_clients=60, alpha=0.01, min_client_size=25)
    with pytest.raises(ValueError) as info:
        make_partition(digits, config, seed=0)
    message = str(info.value)
    assert "dirichlet partition: could not give each of 60 clients at least 25 samples" in message
    assert f"after {DIRICHLET_MAX_DRAWS} draws" in message
    assert "alpha" in message and "min_client_size" in message and "num_clients" in message
    # pathological: more shards of a class than it has samples
    y = np.array([0] * 3 + [1] * 200)
    with pytest.raises(ValueError, match="num_clients"):
        make_partition(
            y, PartitionConfig(scheme="pathological", num_clients=10, classes_per_client=2, min_client_size=1), seed=0
        )


def test_config_rejects_bad_values():
    for alpha in (0, -1.0):
        with pytest.raises(ConfigError, match="alpha"):
            PartitionConfig(scheme="dirichlet", alpha=alpha)
    with pytest.raises(ConfigError, match="num_clients"):
        PartitionConfig(num_clients=0)
    with pytest.raises(ConfigError, match="test_fraction"):
        PartitionConfig(test_fraction=1.0)


def test_bad_inputs(digits):
    config = PartitionConfig()
    with pytest.raises(ValueError, match="labels"):
        make_partition(digits.astype(float) + 0.5, config, seed=0)
    with pytest.raises(ValueError, match="labels"):
        make_partition(digits.reshape(-1, 1), config, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_partition(digits, config, seed=0, num_classes=5)
    with pytest.raises(ValueError, match="labels"):
        make_partition(digits - 1, config, seed=0)


def test_class_counts_and_num_classes_override(digits):
    p = make_partition(digits, PartitionConfig(scheme="iid", num_clients=4), seed=0, num_classes=12)
    counts = p.class_counts(digits)
    assert counts.shape == (4, 12) and counts.dtype == np.int64
    assert counts[:, 10:].sum() == 0
    assert np.array_equal(counts.sum(1), p.sizes("train"))
    assert np.array_equal(p.class_counts(digits, "all").sum(0)[:10], np.bincount(digits))
    with pytest.raises(ValueError, match="split"):
        p.class_counts(digits, "val")
    # arrays are read-only
    with pytest.raises(ValueError):
        p.train[0][0] = 1


def test_save_load_roundtrip(tmp_path, digits):
    domains = np.arange(len(digits)) % 3
    for config, doms in [
        (PartitionConfig(scheme="dirichlet", num_clients=8, imbalance_factor=5), None),
        (PartitionConfig(scheme="domain", num_clients=6), domains),
    ]:
        p = make_partition(digits, config, seed=2, domains=doms)
        d = json.loads(json.dumps(p.to_dict()))  # JSON-friendly
        assert isinstance(d["train"][0][0], int)
        q = Partition.from_dict(d)
        assert q == p and q.meta == p.meta
        for suffix in (".npz", ".json"):
            path = p.save(tmp_path / f"part_{config.scheme}{suffix}")
            r = Partition.load(path)
            assert r == p and r.meta == p.meta
            assert (r.client_domains is None) == (doms is None)
            assert_exact_cover(r, digits)
    other = make_partition(digits, PartitionConfig(scheme="dirichlet", num_clients=8, imbalance_factor=5), seed=3)
    assert Partition.load(tmp_path / "part_dirichlet.npz") != other


def test_report_table_and_summary(digits):
    p = make_partition(digits, PartitionConfig(scheme="pathological", num_clients=5, classes_per_client=2), seed=0)
    names = [f"digit {i}" for i in range(10)]
    table = partition_table(p, digits, class_names=names)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| client | n_train | n_test | digit 0 |")
    assert len(lines) == 2 + 5 + 1
    train = p.class_counts(digits, "train")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["0", str(train[0].sum()), str(len(p.test[0]))]
    assert [int(c) for c in cells[3:]] == train[0].tolist()
    assert lines[-1].startswith(f"| total | {train.sum()} | {p.sizes('test').sum()} |")
    short = partition_table(p, digits, max_clients=2).strip().splitlines()
    assert len(short) == 2 + 2 + 1 + 1 and "3 more" in short[-2]
    with pytest.raises(ValueError, match="class_names"):
        partition_table(p, digits, class_names=["a"])

    s = partition_summary(p, digits)
    json.dumps(s)
    assert s["classes_per_client"] == [2] * 5
    assert s["min_size"] == min(s["sizes"]) and s["max_size"] == max(s["sizes"])
    assert sum(s["sizes"]) == len(digits) == s["pool_size"]
    assert s["mean_classes_per_client"] == 2.0
    assert 0.6 < s["label_skew_tv"] <= 1.0
    iid = partition_summary(make_partition(digits, PartitionConfig(num_clients=5), seed=0), digits)
    assert iid["label_skew_tv"] < 0.1 < s["label_skew_tv"]


def test_label_skew_values():
    assert np.allclose(label_skew(np.array([[5, 5], [5, 5]])), 0)
    assert np.allclose(label_skew(np.array([[10, 0], [0, 10]])), 0.5)
    tv = label_skew(np.array([[0, 0], [3, 1]]))
    assert np.isnan(tv[0]) and tv[1] == 0


def test_heatmap_png(tmp_path, digits):
    p = make_partition(digits, PartitionConfig(scheme="dirichlet", num_clients=8, alpha=0.5), seed=0)
    path = plot_partition_heatmap(p, digits, tmp_path / "sub" / "heat.png", class_names=[str(i) for i in range(10)])
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    many = make_partition(digits, PartitionConfig(scheme="iid", num_clients=150, min_client_size=5), seed=0)
    path2 = plot_partition_heatmap(many, digits, tmp_path / "many.png", max_clients=40, split="train")
    assert path2.read_bytes()[:8] == PNG_MAGIC
    # the PNG decodes to an image of the expected kind
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_large_dirichlet_partition_covers_the_pool():
    # Speed is measured in benchmarks/, not asserted here.
    y = synthetic(6000)
    config = PartitionConfig(scheme="dirichlet", num_clients=1000, alpha=0.5)
    p = make_partition(y, config, seed=1)
    assert p.sizes().min() >= 10
    assert_exact_cover(p, y)
