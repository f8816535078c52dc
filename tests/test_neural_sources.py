"""Tests of the learned-compression data sources: clusters, disjoint Fashion-MNIST slices, user .npy data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcodec.data import fashion_mnist
from fedcodec.data.idx import write_idx
from fedcodec.errors import ConfigError
from fedcodec.neural import sources
from fedcodec.neural.sources import (SOURCES, cluster_assignments, clusters_source, disjoint_class_slices,
                                     fashion_mnist_source, load_source, npy_source)


# --------------------------------------------------------------------------- load_source


def test_sources_listed() -> None:
    assert SOURCES == ("synthetic", "clusters", "fashion-mnist", "photos", "npy")


def test_synthetic_samples_per_client_and_note() -> None:
    src = load_source("synthetic", samples_per_client=12)
    assert len(src.train) == 10 and all(x.shape == (12, 16) for x in src.train)
    assert src.test[0].shape == (1000, 16)
    assert "negative control" in src.note


@pytest.mark.parametrize("name,kwargs,needle", [
    ("synthetic", {"alpha": 0.5}, "alpha does not apply"),
    ("photos", {"samples_per_client": 10}, "samples_per_client does not apply"),
    ("npy", {"samples_per_client": 10}, "samples_per_client does not apply"),
    ("npy", {}, "needs --data-dir"),
    ("nonesuch", {}, "unknown source"),
    ("clusters", {"alpha": 0.0}, "alpha must be"),
    ("clusters", {"alpha": -1.0}, "alpha must be"),
    ("clusters", {"alpha": math.nan}, "alpha must be"),
    ("clusters", {"samples_per_client": 0}, "samples_per_client must be"),
    ("synthetic", {"samples_per_client": 0}, "samples_per_client must be"),
])
def test_load_source_refuses(name: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_source(name, **kwargs)


# --------------------------------------------------------------------------- clusters


def test_clusters_shapes() -> None:
    src = clusters_source(clients=3, newcomers=1, samples_per_client=7, n_test=11, dim=5)
    assert src.name == "clusters" and src.num_clients == 3
    assert [tuple(x.shape) for x in src.train] == [(7, 5)] * 3
    assert [tuple(x.shape) for x in src.test] == [(11, 5)] * 3
    assert [tuple(x.shape) for x in src.newcomers_train] == [(7, 5)]
    assert [tuple(x.shape) for x in src.newcomers_test] == [(11, 5)]
    assert all(x.dtype == torch.float32 for x in src.train + src.test)
    assert src.model.kind == "vector" and src.model.dim == 5
    assert len(src.lambdas) >= 5 and list(src.lambdas) == sorted(src.lambdas)
    assert src.rate_unit == "bits/sample"
    assert set(src.defaults) >= {"rounds", "local_epochs", "batch_size", "lr", "prior_lr_scale"}


def test_clusters_defaults_via_load_source() -> None:
    src = load_source("clusters")
    assert src.num_clients == 10 and len(src.newcomers_train) == 2
    assert src.train[0].shape == (30, 16) and src.test[0].shape == (500, 16)
    assert "Dirichlet(α=0.3)" in src.note
    assert load_source("clusters", samples_per_client=12).train[4].shape == (12, 16)
    assert "α=0.01" in load_source("clusters", alpha=0.01).note


def test_clusters_deterministic() -> None:
    a = clusters_source(clients=2, newcomers=1, samples_per_client=5, n_test=6, seed=3)
    b = clusters_source(clients=2, newcomers=1, samples_per_client=5, n_test=6, seed=3)
    c = clusters_source(clients=2, newcomers=1, samples_per_client=5, n_test=6, seed=4)
    for x, y, z in zip(a.train + a.test + a.newcomers_train, b.train + b.test + b.newcomers_train,
                       c.train + c.test + c.newcomers_train):
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
    # a client's data do not depend on how many clients there are
    more = clusters_source(clients=4, newcomers=0, samples_per_client=5, n_test=6, seed=3)
    assert torch.equal(more.train[1], a.train[1]) and torch.equal(more.test[0], a.test[0])
    # a newcomer is client index `clients`, drawn like any client
    assert torch.equal(more.train[2], a.newcomers_train[0])


def test_cluster_assignments_follow_alpha() -> None:
    def top_share(alpha: float, k: int) -> float:
        weights, train, test = cluster_assignments(0, k, alpha, 8, 200, 10)
        assert weights.shape == (8,) and math.isclose(weights.sum(), 1.0)
        assert train.shape == (200,) and test.shape == (10,) and train.max() < 8 and train.min() >= 0
        return np.bincount(train, minlength=8).max() / 200

    concentrated = [top_share(0.01, k) for k in range(20)]
    spread = [top_share(100.0, k) for k in range(20)]
    assert min(concentrated) >= 0.9  # each client mostly one cluster
    assert max(spread) <= 0.3  # each client uses all eight (1/8 = 0.125 each)


def test_clusters_alpha_shapes_the_data() -> None:
    """Small alpha: each client's data is a small part of the pooled spread; large alpha: all of it."""
    def within_over_pooled(alpha: float) -> float:
        src = clusters_source(alpha=alpha, samples_per_client=200, n_test=1)
        pooled = torch.cat(src.train).var(0).sum()
        return float(sum(x.var(0).sum() for x in src.train) / len(src.train) / pooled)

    assert within_over_pooled(0.01) < 0.5
    assert within_over_pooled(100.0) > 0.9


# --------------------------------------------------------------------------- disjoint Fashion-MNIST slices


def _labels(per_class: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


@pytest.mark.parametrize("per_client,shares", [(6, (3, 3)), (7, (4, 3))])
def test_disjoint_slices(per_client: int, shares: tuple[int, int]) -> None:
    labels = _labels(10, 4)
    groups = [(0, 1), (1, 2), (2, 3), (3, 0)]
    out = disjoint_class_slices(labels, groups, per_client, np.random.default_rng(0))
    assert [len(idx) for idx in out] == [per_client] * 4
    every = np.concatenate(out)
    assert len(np.unique(every)) == len(every) == 4 * per_client  # no index twice
    for idx, g in zip(out, groups):
        assert list(idx) == sorted(idx)
        assert [int((labels[idx] == c).sum()) for c in g] == list(shares)
    again = disjoint_class_slices(labels, groups, per_client, np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(out, again))


def test_disjoint_slices_pool_runs_out() -> None:
    labels = _labels(10, 4)
    groups = [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert sum(map(len, disjoint_class_slices(labels, groups, 10, np.random.default_rng(0)))) == 40  # all of it
    with pytest.raises(ConfigError, match=r"class 0 has 10 images and 2 clients hold it.*at most 10 samples"):
        disjoint_class_slices(labels, groups, 11, np.random.default_rng(0), "demo")
    # three holders of class 0: 3 + 3 + 3 of its 10 at 6 per client, 4 + 4 + 3 = 11 at 7
    groups3 = groups + [(0, 2)]
    with pytest.raises(ConfigError, match=r"^demo: class 0 has 10 images and 3 clients hold it.*at most 6 samples"):
        disjoint_class_slices(labels, groups3, 7, np.random.default_rng(0), "demo")


def _fake_fmnist(root: Path, n_train: int = 120, n_test: int = 60) -> Path:
    """Fashion-MNIST lookalike whose image i carries i in its first two pixels; labels cycle 0..9."""
    root.mkdir(parents=True)

    def images(n: int) -> np.ndarray:
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        return x

    arrays = [images(n_train), (np.arange(n_train) % 10).astype(np.uint8),
              images(n_test), (np.arange(n_test) % 10).astype(np.uint8)]
    for name, array in zip(fashion_mnist.FILES, arrays):
        write_idx(root / name, array)
    return root


def _ids(x: torch.Tensor) -> list[int]:
    px = torch.round(x[:, 0, 0, :2] * 255).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def test_fashion_mnist_disjoint_clients(tmp_path: Path) -> None:
    root = _fake_fmnist(tmp_path / "fm")
    src = fashion_mnist_source(str(root), samples_per_client=6, n_test=2, allow_subset=True)
    assert src.num_clients == 10 and len(src.newcomers_train) == 2
    assert [tuple(x.shape) for x in src.train] == [(6, 1, 28, 28)] * 10
    assert [tuple(x.shape) for x in src.test + src.newcomers_test] == [(2, 1, 28, 28)] * 12
    groups = [(k, (k + 1) % 10) for k in range(10)] + [(0, 5), (3, 8)]
    for split in ("train", "test"):
        sets = getattr(src, split) + getattr(src, f"newcomers_{split}")
        ids = [_ids(x) for x in sets]
        flat = [i for client in ids for i in client]
        assert len(set(flat)) == len(flat)  # no image held by two clients
        for client, g in zip(ids, groups):
            assert sorted({i % 10 for i in client}) == sorted(g)  # label skew kept (label = id mod 10)


def test_fashion_mnist_via_load_source(tmp_path: Path) -> None:
    root = _fake_fmnist(tmp_path / "fm", n_test=3000)  # the default 200 test images per client need 300 a class
    src = load_source("fashion-mnist", str(root), allow_subset=True, samples_per_client=4)
    assert src.train[0].shape == (4, 1, 28, 28) and src.test[0].shape == (200, 1, 28, 28)


def test_fashion_mnist_pool_runs_out(tmp_path: Path) -> None:
    root = _fake_fmnist(tmp_path / "fm")  # 12 training images per class; classes 0, 3, 5, 8 have 3 holders
    with pytest.raises(ConfigError, match=r"fashion-mnist train: class 0 has 12 images.*at most 8 samples"):
        fashion_mnist_source(str(root), samples_per_client=10, n_test=2, allow_subset=True)
    with pytest.raises(ConfigError, match=r"fashion-mnist test: class 0 has 6 images.*at most 4 samples"):
        fashion_mnist_source(str(root), samples_per_client=2, n_test=5, allow_subset=True)


# --------------------------------------------------------------------------- npy


def _client(root: Path, name: str, train: np.ndarray | None = None, test: np.ndarray | None = None,
            d: int = 4) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    np.save(folder / "train.npy", rng.standard_normal((6, d)).astype(np.float32) if train is None else train)
    np.save(folder / "test.npy", rng.standard_normal((3, d)).astype(np.float32) if test is None else test)
    return folder


def test_npy_valid_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    a_train = np.arange(10, dtype=np.float32).reshape(5, 2)
    _client(root, "b", d=2)
    _client(root, "a", train=a_train, test=np.ones((1, 2), dtype=">f4"))  # big-endian float32 is fine
    _client(root, "c", d=2)
    (root / "README.txt").write_text("not a client")
    (root / ".hidden").mkdir()  # hidden folders are not clients
    src = npy_source(str(root))
    assert src.name == "npy" and src.num_clients == 3
    assert [tuple(x.shape) for x in src.train] == [(5, 2), (6, 2), (6, 2)]  # sorted: a, b, c
    assert [tuple(x.shape) for x in src.test] == [(1, 2), (3, 2), (3, 2)]
    assert torch.equal(src.train[0], torch.arange(10, dtype=torch.float32).reshape(5, 2))
    assert torch.equal(src.test[0], torch.ones(1, 2))
    assert src.newcomers_train == [] and src.newcomers_test == []
    assert src.model.kind == "vector" and src.model.dim == 2 and src.model.latent == 2
    assert src.rate_unit == "bits/sample" and len(src.lambdas) == 5
    assert all(x < y for x, y in zip(src.lambdas, src.lambdas[1:])) and src.lambdas[0] > 0
    assert "3 clients (a, b, c)" in src.note
    assert load_source("npy", str(root)).train[1].shape == (6, 2)


def test_npy_lambdas_follow_the_data_scale(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    _client(tmp_path / "unit", "a", train=x, test=x[:2])
    _client(tmp_path / "tenfold", "a", train=10 * x, test=x[:2])
    unit, tenfold = npy_source(tmp_path / "unit"), npy_source(tmp_path / "tenfold")
    assert unit.model.latent == 8
    # σ² 100x larger → λ 100x smaller (to the 3 significant digits they are rounded to)
    assert all(math.isclose(u, 100 * t, rel_tol=2e-2) for u, t in zip(unit.lambdas, tenfold.lambdas))


def _truncate(path: Path, by: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-by])


def _broken(root: Path, case: str) -> tuple[Path, str]:
    """A layout under ``root`` with one defect, and the text the error must contain (besides a path)."""
    f32 = np.float32
    if case == "missing dir":
        return root / "nope", "does not exist"
    if case == "not a dir":
        root.write_text("x")
        return root, "is not a directory"
    if case == "no clients":
        root.mkdir()
        (root / "train.npy").write_bytes(b"")
        return root, "no client subfolders"
    if case == "missing test.npy":
        (_client(root, "a") / "test.npy").unlink()
        return root, "a/test.npy is missing"
    if case == "not npy":
        (_client(root, "a") / "train.npy").write_bytes(b"name,value\n1,2\n")
        return root, "a/train.npy is not a .npy file"
    if case == "bad version":
        (_client(root, "a") / "train.npy").write_bytes(b"\x93NUMPY\x09\x00" + b"\x00" * 64)
        return root, "a/train.npy: .npy format version (9, 0)"
    if case == "garbled header":
        (_client(root, "a") / "train.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4 }  \n")
        return root, "a/train.npy is not a readable .npy file"
    if case == "object dtype":
        _client(root, "a", train=np.array([[1.0, "x"]], dtype=object))
        return root, "a/train.npy holds Python objects"
    if case == "float64":
        _client(root, "a", test=np.zeros((3, 4)))
        return root, "a/test.npy holds float64, expected float32; convert with x.astype(np.float32)"
    if case == "int32":
        _client(root, "a", train=np.zeros((3, 4), dtype=np.int32))
        return root, "a/train.npy holds int32, expected float32; convert with x.astype(np.float32)"
    if case == "ndim 1":
        _client(root, "a", train=np.zeros(4, dtype=f32))
        return root, "a/train.npy has shape (4,) (1 dimensions), expected (n, d)"
    if case == "ndim 3":
        _client(root, "a", train=np.zeros((2, 2, 2), dtype=f32))
        return root, "a/train.npy has shape (2, 2, 2) (3 dimensions)"
    if case == "no rows":
        _client(root, "a", test=np.zeros((0, 4), dtype=f32))
        return root, "a/test.npy has shape (0, 4): it needs at least one sample"
    if case == "no columns":
        _client(root, "a", train=np.zeros((3, 0), dtype=f32), test=np.zeros((3, 0), dtype=f32))
        return root, "a/train.npy has shape (3, 0)"
    if case == "d too large":
        _client(root, "a", train=np.zeros((1, 4097), dtype=f32))
        return root, "a/train.npy has 4097 values per sample; at most 4096"
    if case == "d differs in a client":
        _client(root, "a", test=np.zeros((3, 5), dtype=f32))
        return root, "a/test.npy has 5 values per sample but"
    if case == "d differs between clients":
        _client(root, "a")
        _client(root, "b", d=3)
        return root, "b/train.npy has 3 values per sample but"
    if case == "nan":
        x = np.zeros((4, 4), dtype=f32)
        x[2, 1] = np.nan
        _client(root, "a", train=x)
        return root, "a/train.npy has 1 NaN or infinite values (first in row 2)"
    if case == "inf":
        x = np.zeros((3, 4), dtype=f32)
        x[1, 0], x[2, 3] = np.inf, -np.inf
        _client(root, "a", test=x)
        return root, "a/test.npy has 2 NaN or infinite values (first in row 1)"
    if case == "truncated":
        _truncate(_client(root, "a") / "train.npy", 5)
        return root, "a/train.npy: its header declares float32 of shape (6, 4) (96 bytes) but the file holds 91"
    raise AssertionError(case)


CASES = ["missing dir", "not a dir", "no clients", "missing test.npy", "not npy", "bad version", "garbled header",
         "object dtype", "float64", "int32", "ndim 1", "ndim 3", "no rows", "no columns", "d too large",
         "d differs in a client", "d differs between clients", "nan", "inf", "truncated"]


@pytest.mark.parametrize("case", CASES)
def test_npy_refuses(tmp_path: Path, case: str) -> None:
    root, needle = _broken(tmp_path / "data", case)
    with pytest.raises(ConfigError) as err:
        npy_source(str(root))
    assert needle in str(err.value), str(err.value)


def test_npy_checks_every_header_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    x = np.zeros((3, 4), dtype=np.float32)
    x[0, 0] = np.nan  # found only once loaded
    _client(root, "a", train=x)
    _truncate(_client(root, "z") / "test.npy", 4)  # found from its header
    loads = []
    real_load = np.load
    monkeypatch.setattr(sources.np, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ConfigError, match="z/test.npy: its header declares"):
        npy_source(root)
    assert loads == []


@pytest.mark.parametrize("bound,value,layout,needle", [
    ("MAX_NPY_VALUES", 20, "one", "a/train.npy declares 24 values; at most 20 per file"),
    ("MAX_NPY_TOTAL", 40, "two", "hold more than 40 values together"),
    ("MAX_NPY_CLIENTS", 1, "two", "more than 1 client subfolders"),
    ("MAX_NPY_ENTRIES", 2, "two+file", "has more than 2 entries"),
])
def test_npy_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str, value: int, layout: str,
                    needle: str) -> None:
    root = tmp_path / "data"
    _client(root, "a")  # train 6x4 = 24 values, test 3x4 = 12
    if layout != "one":
        _client(root, "b")
    if layout == "two+file":
        (root / "notes.txt").write_text("x")
    monkeypatch.setattr(sources, bound, value)
    with pytest.raises(ConfigError, match=needle):
        npy_source(root)
