"""Tests of the client partitioning schemes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedcodec.data import partition
from fedcodec.data.partition import describe, dirichlet, iid, k_classes
from fedcodec.errors import ConfigError

NUM_CLASSES = 10
# 2010 samples with unequal class sizes (120, 138, ..., 282).
LABELS = np.random.default_rng(7).permutation(
    np.repeat(np.arange(NUM_CLASSES), np.arange(120, 300, 18)).astype(np.int64)
)

SCHEMES = [("iid", {}), ("dirichlet", {"beta": 0.3}), ("k-classes", {"k": 2})]


def mean_label_entropy(parts: list[np.ndarray]) -> float:
    """Average over clients of the entropy (bits) of the client's label distribution."""
    entropies = []
    for p in parts:
        freq = np.bincount(LABELS[p], minlength=NUM_CLASSES) / len(p)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log2(freq)).sum())
    return float(np.mean(entropies))


@pytest.mark.parametrize("scheme, kw", SCHEMES)
def test_every_index_exactly_once(scheme: str, kw: dict) -> None:
    parts = partition(LABELS, scheme, num_clients=17, seed=1, **kw)
    assert len(parts) == 17
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no duplicates
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme, kw", SCHEMES)
def test_deterministic(scheme: str, kw: dict) -> None:
    a = partition(LABELS, scheme, 10, seed=5, **kw)
    b = partition(LABELS.copy(), scheme, 10, seed=5, **kw)
    c = partition(LABELS, scheme, 10, seed=6, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_schemes_use_separate_streams() -> None:
    # dirichlet with a huge beta is nearly IID but must not reproduce iid's exact split.
    a = iid(LABELS, 4, seed=0)
    b = dirichlet(LABELS, 4, beta=1e6, seed=0)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("num_clients", [1, 3, 7, 2000])
def test_iid_balanced(num_clients: int) -> None:
    sizes = [len(p) for p in iid(LABELS, num_clients, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(LABELS)


def test_dirichlet_min_size_and_skew() -> None:
    skewed = dirichlet(LABELS, 20, beta=0.1, seed=0, min_size=30)
    assert min(len(p) for p in skewed) >= 30
    balanced = iid(LABELS, 20, seed=0)
    assert mean_label_entropy(balanced) > 3.0  # log2(10) = 3.32 is the maximum
    assert mean_label_entropy(skewed) < mean_label_entropy(balanced) - 1.0
    # Larger beta, less skew.
    mild = dirichlet(LABELS, 20, beta=100.0, seed=0, min_size=30)
    assert mean_label_entropy(mild) > mean_label_entropy(skewed) + 1.0


def test_dirichlet_impossible() -> None:
    with pytest.raises(ConfigError, match="raise beta"):
        dirichlet(LABELS, 50, beta=0.01, seed=0, min_size=39, max_tries=5)
    with pytest.raises(ConfigError, match="exceeds"):
        dirichlet(LABELS, 100, beta=1.0, seed=0, min_size=21)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_dirichlet_bad_beta(beta: float) -> None:
    with pytest.raises(ConfigError, match="beta"):
        dirichlet(LABELS, 5, beta=beta, seed=0)


@pytest.mark.parametrize("num_clients, k", [(10, 1), (10, 2), (7, 3), (30, 2), (4, 10)])
def test_k_classes(num_clients: int, k: int) -> None:
    parts = k_classes(LABELS, num_clients, k, seed=3)
    info = describe(parts, LABELS, NUM_CLASSES)
    assert info["classes_per_client"] == [k] * num_clients
    held = np.array(info["histograms"]) > 0
    assert held.any(axis=0).all()  # every class is held by someone
    holders = held.sum(axis=0)
    assert holders.max() - holders.min() <= 1
    # Within a class, holders get equal shares (up to one sample).
    hist = np.array(info["histograms"])
    for cls in range(NUM_CLASSES):
        shares = hist[held[:, cls], cls]
        assert shares.max() - shares.min() <= 1


@pytest.mark.parametrize(
    "num_clients, k, match",
    [(5, 11, "lower k"), (5, 0, "between 1"), (4, 2, "cannot cover"), (2000, 1, "samples but")],
)
def test_k_classes_errors(num_clients: int, k: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        k_classes(LABELS, num_clients, k, seed=0)


@pytest.mark.parametrize(
    "scheme, kw, match",
    [
        ("shards", {}, "unknown partition scheme"),
        ("dirichlet", {}, "required"),
        ("k-classes", {"k": 2, "beta": 0.5}, "got"),
        ("iid", {"min_size": 3}, "got"),
    ],
)
def test_partition_dispatch_errors(scheme: str, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition(LABELS, scheme, 5, seed=0, **kw)


@pytest.mark.parametrize(
    "labels, num_clients, seed",
    [
        (LABELS, 0, 0),
        (LABELS, len(LABELS) + 1, 0),
        (LABELS, 5, -1),
        (LABELS, 5, 1.5),
        (LABELS.astype(np.float32), 5, 0),
        (LABELS.reshape(-1, 2), 5, 0),
        (LABELS - 1, 5, 0),
    ],
)
def test_common_argument_errors(labels: np.ndarray, num_clients: int, seed: int) -> None:
    with pytest.raises(ConfigError):
        iid(labels, num_clients, seed)


def test_describe() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    info = describe(parts, labels, num_classes=4)
    assert info == {
        "num_clients": 2,
        "sizes": [2, 4],
        "min_size": 2,
        "max_size": 4,
        "histograms": [[1, 0, 1, 0], [1, 1, 2, 0]],
        "classes_per_client": [2, 3],
    }
    json.dumps(info)
