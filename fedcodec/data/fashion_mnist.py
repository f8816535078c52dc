"""Fashion-MNIST: locating, downloading and loading the four IDX files.

Nothing here touches the network unless :func:`download_fashion_mnist` is called explicitly.
:func:`find_fashion_mnist` looks in, in order:

1. the directory passed by the caller (``--data-dir``), and its ``fashion-mnist`` subdirectory;
2. ``$FEDCODEC_DATA`` and ``$FEDCODEC_DATA/fashion-mnist``;
3. :data:`DEBIAN_DIR`, where ``apt-get install dataset-fashion-mnist`` puts the files;
4. the download cache, ``$XDG_CACHE_HOME/fedcodec/fashion-mnist`` (default
   ``~/.cache/fedcodec/fashion-mnist``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from fedcodec.data.base import FederatedSource
from fedcodec.data.idx import read_idx
from fedcodec.errors import DatasetError

#: The four files of the official release, in the order train images/labels, test images/labels.
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: MD5 of each official ``.gz`` file, checked by :func:`download_fashion_mnist`.
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10
TRAIN_SIZE = 60000
TEST_SIZE = 10000

_TIMEOUT_S = 60.0
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
_CHUNK = 1 << 16

HOW_TO_GET = (
    "To get Fashion-MNIST, do one of:\n"
    "  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
    "  - with internet access: fedcodec data download fashion-mnist   (downloads to the cache)\n"
    "  - put the four files (" + ", ".join(FILES) + ") in a directory and set "
    "FEDCODEC_DATA=<dir> or pass --data-dir <dir>"
)


def cache_dir() -> Path:
    """The download cache: ``$XDG_CACHE_HOME/fedcodec/fashion-mnist`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedcodec" / "fashion-mnist"


def search_dirs(root: str | Path | None = None) -> list[Path]:
    """The directories :func:`find_fashion_mnist` tries, in order.

    A directory the user names explicitly is the only place searched: a typo in ``--data-dir`` must
    not silently fall back to another copy of the data.
    """
    if root is not None:
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs: list[Path] = []
    env = os.environ.get("FEDCODEC_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += [DEBIAN_DIR, cache_dir()]
    return dirs


def _file_in(directory: Path, name: str) -> Path | None:
    """``directory/name``, or its un-gzipped variant, whichever exists first."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _locate(root: str | Path | None) -> list[Path]:
    """The paths of the four files (in :data:`FILES` order) in the first complete directory."""
    dirs = search_dirs(root)
    for directory in dirs:
        paths = [_file_in(directory, name) for name in FILES]
        if all(p is not None for p in paths):
            return [p for p in paths if p is not None]
    searched = "\n".join(f"  - {d}" for d in dirs)
    raise DatasetError(
        f"Fashion-MNIST not found. Searched these directories for {', '.join(FILES)}:\n"
        f"{searched}\n{HOW_TO_GET}"
    )


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """Return the first directory of :func:`search_dirs` that holds all four files.

    Each file may be gzip-compressed (standard name) or not (name without ``.gz``). Raises
    :class:`DatasetError` listing every directory searched and how to obtain the data.
    """
    return _locate(root)[0].parent


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, expected_md5: str, progress: bool) -> None:
    """Download ``url`` to ``target`` via a temporary file, verifying its MD5 before renaming."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        done = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    of = f" / {total / 1e6:.1f}" if total else ""
                    print(f"\r  {target.name}: {done / 1e6:.1f}{of} MB", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        if digest.hexdigest() != expected_md5:
            raise DatasetError(
                f"downloaded {url} but its MD5 is {digest.hexdigest()}, expected {expected_md5}; "
                f"the download was corrupted or the mirror changed. Try again, or:\n{HOW_TO_GET}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download_fashion_mnist(dest: str | Path | None = None, progress: bool = True) -> Path:
    """Download the four official ``.gz`` files into ``dest`` (default :func:`cache_dir`).

    Files already present with the right MD5 are kept. Each download goes to a temporary file
    in ``dest`` and is renamed into place only after its MD5 matches, so an interrupted download
    never leaves a partial file under the real name. Network failures raise
    :class:`DatasetError` explaining how else to get the data. Returns ``dest``.
    """
    dest = Path(dest) if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.is_file() and _md5(target) == MD5[name]:
            continue
        url = MIRROR + name
        if progress:
            print(f"downloading {url}", file=sys.stderr)
        try:
            _fetch(url, target, MD5[name], progress)
        except _NETWORK_ERRORS as exc:
            raise DatasetError(
                f"could not download {url} ({exc}); this machine seems to be offline or the "
                f"mirror is unreachable.\n{HOW_TO_GET}"
            ) from exc
    return dest


_REOBTAIN = (
    "The file is corrupt or not Fashion-MNIST; delete it and obtain it again (on Debian/Ubuntu: "
    "sudo apt-get install --reinstall dataset-fashion-mnist; otherwise: "
    "fedcodec data download fashion-mnist)."
)


def _corrupt(path: Path, problem: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}. {_REOBTAIN}")


def _read(path: Path, shape: tuple[int | None, ...], max_items: int) -> np.ndarray:
    """An IDX file of uint8 ``shape`` (``None``: the sample count, at most ``max_items``), checked
    against its header before the payload is read."""
    try:
        return read_idx(path, dtype=np.uint8, shape=shape, max_items=max_items)
    except DatasetError as exc:
        raise DatasetError(f"{exc}. {_REOBTAIN}") from exc


def _load_split(
    images_path: Path, labels_path: Path, expected: int, allow_subset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate one split; return normalised ``(N, 1, 28, 28)`` images and labels."""
    images = _read(images_path, (None, 28, 28), expected)
    labels = _read(labels_path, (None,), expected)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise _corrupt(images_path, f"expected uint8 images of shape (N, 28, 28), "
                                    f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _corrupt(labels_path, f"expected uint8 labels of shape (N,), "
                                    f"got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise _corrupt(labels_path, f"{len(labels)} labels for {len(images)} images in "
                                    f"{images_path.name}")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise _corrupt(labels_path, f"label value {int(labels.max())} outside 0..9")
    if not allow_subset and len(images) != expected:
        raise _corrupt(images_path, f"{len(images)} samples, the official release has "
                                    f"{expected} (pass allow_subset=True for smaller files)")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    root: str | Path | None = None, allow_subset: bool = False
) -> FederatedSource:
    """Find (see :func:`find_fashion_mnist`), read and validate Fashion-MNIST.

    Images become ``float32`` tensors of shape ``(N, 1, 28, 28)``, scaled to ``[0, 1]`` and then
    normalised with mean :data:`MEAN` and std :data:`STD`; labels become ``int64``. Unless
    ``allow_subset`` is true, the splits must have the official 60000/10000 samples. Corrupt
    files raise :class:`DatasetError` naming the file and how to obtain it again.
    """
    paths = _locate(root)
    train_x, train_y = _load_split(paths[0], paths[1], TRAIN_SIZE, allow_subset)
    test_x, test_y = _load_split(paths[2], paths[3], TEST_SIZE, allow_subset)
    return FederatedSource(
        name="fashion-mnist",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=NUM_CLASSES,
        input_shape=(1, 28, 28),
    )
