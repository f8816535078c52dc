"""Tests of the dataset layer: IDX files, Fashion-MNIST search/load/download, CIFAR-10 batches."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcodec.data import FederatedSource, load_dataset, make_synthetic_images
from fedcodec.data import cifar10, fashion_mnist
from fedcodec.data.idx import read_idx, write_idx
from fedcodec.errors import ConfigError, DatasetError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- fixtures


def make_fmnist(directory: Path, gz: bool = True, seed: int = 0, n_train: int = 50,
                n_test: int = 20) -> Path:
    """Write a tiny Fashion-MNIST lookalike (random pixels, labels cycling 0..9)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    ]
    for name, array in zip(fashion_mnist.FILES, arrays):
        write_idx(directory / (name if gz else name.removesuffix(".gz")), array)
    return directory


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every standard location at empty directories under ``tmp_path``."""
    monkeypatch.delenv("FEDCODEC_DATA", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    # A browser may decompress a download but keep the .gz name, or the reverse.
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "plain.gz", array)
    (tmp_path / "plain.gz").write_bytes(gzip.decompress((tmp_path / "plain.gz").read_bytes()))
    write_idx(tmp_path / "real.gz", array)
    (tmp_path / "real.gz").rename(tmp_path / "compressed")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "compressed"), array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_huge_declared_size_is_rejected_without_allocating(tmp_path: Path,
                                                                suffix: str) -> None:
    path = tmp_path / f"huge{suffix}"
    header = struct.pack(">HBB3I", 0, 0x08, 3, 1_000_000, 1_000_000, 1)  # 10**12 elements
    data = header + bytes(1000)
    path.write_bytes(gzip.compress(data) if suffix else data)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="truncated"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.mark.parametrize(
    "header, match",
    [
        (b"\x01\x00\x08\x01", "bad magic"),
        (b"\x00\x00\x07\x01", "dtype code"),
        (b"\x00\x00\x08\x00", "dimensions"),
        (b"\x00\x00\x08\x05", "dimensions"),
        (b"\x00\x00", "header"),
    ],
)
def test_idx_bad_header(tmp_path: Path, header: bytes, match: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(header)
    with pytest.raises(DatasetError, match=match):
        read_idx(path)


def test_idx_trailing_bytes_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(DatasetError, match="more data"):
        read_idx(path)
    with pytest.raises(DatasetError, match="not found"):
        read_idx(tmp_path / "nope")


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=str(path)):
        read_idx(path)


def test_write_idx_rejects_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint64))
    with pytest.raises(ConfigError):
        write_idx(tmp_path / "a", np.zeros((1,) * 5, dtype=np.uint8))


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_fixture(isolated: Path, gz: bool) -> None:
    root = make_fmnist(isolated / "data", gz=gz)
    src = load_dataset("fashion-mnist", root, allow_subset=True)
    assert isinstance(src, FederatedSource)
    assert src.name == "fashion-mnist" and src.num_classes == 10
    assert src.input_shape == (1, 28, 28)
    assert src.train_x.shape == (50, 1, 28, 28) and src.test_x.shape == (20, 1, 28, 28)
    assert src.train_x.dtype == torch.float32 and src.train_y.dtype == torch.int64
    raw = read_idx(root / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    expected = (raw.astype(np.float32) / 255 - fashion_mnist.MEAN) / fashion_mnist.STD
    np.testing.assert_allclose(src.train_x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert src.train_y.tolist() == [i % 10 for i in range(50)]


def test_fixture_rejected_without_allow_subset(isolated: Path) -> None:
    root = make_fmnist(isolated / "data")
    with pytest.raises(DatasetError, match="60000"):
        load_dataset("fashion-mnist", root)


def test_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Distinguishable copies: the train set size tells which directory was used.
    root = make_fmnist(isolated / "root", n_train=11)
    env = make_fmnist(isolated / "env", n_train=12)
    make_fmnist(fashion_mnist.DEBIAN_DIR, n_train=13)
    make_fmnist(isolated / "cache" / "fedcodec" / "fashion-mnist", n_train=14)
    monkeypatch.setenv("FEDCODEC_DATA", str(env))

    def used(root_arg: Path | None) -> int:
        return len(fashion_mnist.load_fashion_mnist(root_arg, allow_subset=True).train_y)

    assert fashion_mnist.find_fashion_mnist(root) == root
    assert used(root) == 11
    assert used(None) == 12
    with pytest.raises(DatasetError, match="empty"):  # an explicit root is strict: no silent fallback
        used(isolated / "empty")
    for name in fashion_mnist.FILES:
        (env / name).unlink()
    assert used(None) == 13
    for name in fashion_mnist.FILES:
        (fashion_mnist.DEBIAN_DIR / name).unlink()
    assert used(None) == 14


def test_env_var_subdirectory(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fmnist(isolated / "env" / "fashion-mnist")
    monkeypatch.setenv("FEDCODEC_DATA", str(isolated / "env"))
    assert fashion_mnist.find_fashion_mnist() == isolated / "env" / "fashion-mnist"


def test_incomplete_directory_is_skipped(isolated: Path) -> None:
    root = make_fmnist(isolated / "root")
    (root / fashion_mnist.FILES[3]).unlink()
    with pytest.raises(DatasetError):
        fashion_mnist.find_fashion_mnist(root)


def test_missing_everywhere(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCODEC_DATA", str(isolated / "env"))
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "fedcodec data download fashion-mnist" in message
    assert "FEDCODEC_DATA" in message and "--data-dir" in message
    for place in fashion_mnist.search_dirs():
        assert str(place) in message
    assert str(isolated / "cache" / "fedcodec" / "fashion-mnist") in message
    with pytest.raises(DatasetError, match="root") as info:  # an explicit root names only itself
        load_dataset("fashion-mnist", isolated / "root")
    assert str(isolated / "env") not in str(info.value)


def test_cache_dir_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fashion_mnist.cache_dir() == tmp_path / ".cache" / "fedcodec" / "fashion-mnist"


def test_bad_label_value(isolated: Path) -> None:
    root = make_fmnist(isolated / "data")
    write_idx(root / fashion_mnist.FILES[3], np.full(20, 10, dtype=np.uint8))
    with pytest.raises(DatasetError, match="label value 10") as info:
        load_dataset("fashion-mnist", root, allow_subset=True)
    assert fashion_mnist.FILES[3] in str(info.value)


@pytest.mark.parametrize(
    "index, array, match",
    [
        (1, np.zeros(49, dtype=np.uint8), "49 labels for 50 images"),
        (0, np.zeros((50, 28, 27), dtype=np.uint8), "shape"),
        (0, np.zeros((50, 28, 28), dtype=np.int16), "uint8"),
    ],
)
def test_inconsistent_files(isolated: Path, index: int, array: np.ndarray, match: str) -> None:
    root = make_fmnist(isolated / "data")
    write_idx(root / fashion_mnist.FILES[index], array)
    with pytest.raises(DatasetError, match=match):
        load_dataset("fashion-mnist", root, allow_subset=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_names_file_and_fix(isolated: Path, damage: str) -> None:
    root = make_fmnist(isolated / "data")
    path = root / fashion_mnist.FILES[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x1f\x8bnot gzip")
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", root, allow_subset=True)
    message = str(info.value)
    assert str(path) in message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message


def test_download_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="offline") as info:
        fashion_mnist.download_fashion_mnist(tmp_path, progress=False)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


class FakeResponse(io.BytesIO):
    """Stands in for the object ``urlopen`` returns."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_with_fake_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    served = make_fmnist(tmp_path / "mirror")
    blobs = {fashion_mnist.MIRROR + n: (served / n).read_bytes() for n in fashion_mnist.FILES}
    checksums = {n: hashlib.md5(blobs[fashion_mnist.MIRROR + n]).hexdigest()
                 for n in fashion_mnist.FILES}
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> FakeResponse:
        calls.append(url)
        return FakeResponse(blobs[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(fashion_mnist, "MD5", checksums)
    dest = fashion_mnist.download_fashion_mnist(tmp_path / "dl")
    assert sorted(os.listdir(dest)) == sorted(fashion_mnist.FILES)
    assert len(load_dataset("fashion-mnist", dest, allow_subset=True).train_y) == 50
    assert "downloading" in capsys.readouterr().err
    fashion_mnist.download_fashion_mnist(dest, progress=False)  # all present: no requests
    assert len(calls) == 4

    (dest / fashion_mnist.FILES[0]).unlink()
    blobs[fashion_mnist.MIRROR + fashion_mnist.FILES[0]] = b"tampered"
    with pytest.raises(DatasetError, match="MD5"):
        fashion_mnist.download_fashion_mnist(dest, progress=False)
    assert sorted(os.listdir(dest)) == sorted(fashion_mnist.FILES[1:])


@pytest.mark.skipif(not DEBIAN.exists(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    src = fashion_mnist.load_fashion_mnist(DEBIAN)
    assert len(src.train_y) == 60000 and len(src.test_y) == 10000
    assert torch.bincount(src.train_y).tolist() == [6000] * 10
    assert torch.bincount(src.test_y).tolist() == [1000] * 10
    assert abs(src.train_x.mean().item()) < 0.01 and abs(src.train_x.std().item() - 1) < 0.01


# --------------------------------------------------------------------------- CIFAR-10


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2 + numpy 1.x wrote the official CIFAR batches.

    Both ``str`` and ``bytes`` become Python 2 byte strings, and numpy's reconstructor is
    referenced as ``numpy.core.multiarray._reconstruct``.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_cifar_batch(path: Path, n: int, seed: int, py2: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with path.open("wb") as f:
        if py2:
            Py2Pickler(f, protocol=2).dump(batch)
        else:
            pickle.dump(batch, f, protocol=4)
    return batch


def make_cifar(directory: Path, py2: bool = True) -> list[dict]:
    directory.mkdir(parents=True)
    batches = [write_cifar_batch(directory / f"data_batch_{i}", 6, i, py2) for i in (2, 1)]
    batches.append(write_cifar_batch(directory / "test_batch", 4, 9, py2))
    return [batches[1], batches[0], batches[2]]  # data_batch_1, data_batch_2, test_batch


@pytest.mark.parametrize("py2", [True, False])
def test_load_cifar10(tmp_path: Path, py2: bool) -> None:
    batches = make_cifar(tmp_path / cifar10.BATCH_DIR, py2)
    src = load_dataset("cifar10", tmp_path, allow_subset=True)
    assert src.name == "cifar10" and src.input_shape == (3, 32, 32) and src.num_classes == 10
    assert src.train_x.shape == (12, 3, 32, 32) and src.test_x.shape == (4, 3, 32, 32)
    assert src.train_y.dtype == torch.int64
    assert src.train_y.tolist() == batches[0][b"labels"] + batches[1][b"labels"]
    raw = batches[0][b"data"].reshape(6, 3, 32, 32).astype(np.float32) / 255
    mean = np.array(cifar10.MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(cifar10.STD, dtype=np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(src.train_x[:6].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    # The batch directory itself works as root too.
    assert len(cifar10.load_cifar10(tmp_path / cifar10.BATCH_DIR, allow_subset=True).test_y) == 4


def test_cifar10_subset_needs_flag(tmp_path: Path) -> None:
    make_cifar(tmp_path / "c")
    with pytest.raises(DatasetError, match="allow_subset"):
        cifar10.load_cifar10(tmp_path / "c")


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def test_cifar10_rejects_malicious_pickle(tmp_path: Path) -> None:
    make_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    with (tmp_path / "c" / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": Evil(marker), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load global (posix|os).system"):
        cifar10.load_cifar10(tmp_path / "c", allow_subset=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "3072"),
        ({b"labels": [0, 1]}, "'data'"),
        ([1, 2], "expected a dict"),
    ],
)
def test_cifar10_bad_batch(tmp_path: Path, content: object, match: str) -> None:
    make_cifar(tmp_path / "c")
    with (tmp_path / "c" / "test_batch").open("wb") as f:
        pickle.dump(content, f, protocol=4)
    with pytest.raises(DatasetError, match=match):
        cifar10.load_cifar10(tmp_path / "c", allow_subset=True)


def test_cifar10_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCODEC_DATA", raising=False)
    for root in (tmp_path, None):
        with pytest.raises(DatasetError, match="cifar-10-python.tar.gz") as info:
            load_dataset("cifar10", root)
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)
    (tmp_path / "test_batch").write_bytes(b"")
    with pytest.raises(DatasetError, match="data_batch"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- dispatch, synthetic


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="fashion-mnist, cifar10"):
        load_dataset("mnist")


def test_synthetic_images() -> None:
    a = make_synthetic_images(100, 30, shape=(1, 8, 8), num_classes=5, seed=3)
    b = make_synthetic_images(100, 30, shape=(1, 8, 8), num_classes=5, seed=3)
    c = make_synthetic_images(100, 30, shape=(1, 8, 8), num_classes=5, seed=4)
    assert a.train_x.shape == (100, 1, 8, 8) and a.test_x.shape == (30, 1, 8, 8)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.input_shape == (1, 8, 8) and a.num_classes == 5
    assert torch.bincount(a.train_y).tolist() == [20] * 5
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    # Learnable: nearest class mean (estimated on train) classifies the test set well.
    means = torch.stack([a.train_x[a.train_y == k].mean(0) for k in range(5)]).flatten(1)
    predicted = torch.cdist(a.test_x.flatten(1), means).argmin(1)
    assert (predicted == a.test_y).float().mean() > 0.9


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_train=0, n_test=5), dict(n_train=5, n_test=5, num_classes=1),
     dict(n_train=5, n_test=5, shape=(0, 2))],
)
def test_synthetic_images_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_synthetic_images(**kwargs)
