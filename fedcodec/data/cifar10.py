"""CIFAR-10 from the official "python version" batches (``cifar-10-python.tar.gz``).

The batches are pickles, and unpickling can run arbitrary code. They are therefore not given to
:mod:`pickle` at all: :func:`fedcodec.data.safe_pickle.loads` interprets the opcodes itself and
builds only plain values and numpy arrays (checked against the bytes they come with), calls
nothing, and refuses every other global by name, so a malicious file raises :class:`DatasetError`
instead of executing anything. The work is bounded too: a file over :data:`MAX_BATCH_BYTES` is
refused before it is read, at most :data:`~fedcodec.data.safe_pickle.MAX_OPS` opcodes are run,
shared references are never expanded (the pickle "billion laughs": a tiny file referring to one
big list many times) and every field is type-checked (labels: a list of Python ints in 0..9)
before numpy sees it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcodec.data import safe_pickle
from fedcodec.data.base import FederatedSource
from fedcodec.errors import DatasetError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = 5
BATCH_SIZE = 10000

HOW_TO_GET = (
    "To get CIFAR-10, download cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extract it (tar xzf cifar-10-python.tar.gz) "
    "and pass the extracted directory (or its parent) with --data-dir, or set FEDCODEC_DATA."
)

_TRAIN_FILE = re.compile(r"data_batch_([1-9][0-9]*)")

#: the official batches are 31 MB each
MAX_BATCH_BYTES = 64 << 20


def _unpickle(path: Path) -> dict[Any, Any]:
    """Load one batch file with :func:`safe_pickle.loads`; any failure is a DatasetError."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BATCH_BYTES:
                raise DatasetError(f"{path}: {size:,} bytes, larger than a CIFAR batch can be "
                                   f"({MAX_BATCH_BYTES:,} at most). {HOW_TO_GET}")
            data = f.read(MAX_BATCH_BYTES + 1)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read CIFAR batch ({exc.strerror or exc}). {HOW_TO_GET}") from exc
    if len(data) > MAX_BATCH_BYTES:
        raise DatasetError(f"{path}: larger than a CIFAR batch can be ({MAX_BATCH_BYTES:,} bytes at most). "
                           f"{HOW_TO_GET}")
    try:
        obj = safe_pickle.loads(data)
    except safe_pickle.PickleRejected as exc:
        raise DatasetError(f"{path}: cannot load CIFAR batch ({exc}). {HOW_TO_GET}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}. {HOW_TO_GET}")
    return obj


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """``batch[key]``, accepting bytes keys (official files) and str keys."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DatasetError(f"{path}: CIFAR batch has no {key!r} entry. {HOW_TO_GET}")


def _read_batch(path: Path, expected: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one batch: ``(N, 3072)`` uint8 data and ``(N,)`` int64 labels in 0..9.

    ``expected`` is the required ``N``, or ``None`` to accept any size.
    """
    batch = _unpickle(path)
    data = _field(batch, "data", path)
    labels = _field(batch, "labels", path)
    if isinstance(labels, (list, tuple)):
        if not all(type(v) is int for v in labels):  # before numpy: no nested lists, huge ints, strings
            raise DatasetError(f"{path}: 'labels' holds something other than integers. {HOW_TO_GET}")
        if labels and (min(labels) < 0 or max(labels) >= NUM_CLASSES):
            raise DatasetError(f"{path}: label values outside 0..9. {HOW_TO_GET}")
        labels = np.asarray(labels, dtype=np.int64)
    elif not isinstance(labels, np.ndarray):
        raise DatasetError(f"{path}: 'labels' is a {type(labels).__name__}, not a list. {HOW_TO_GET}")
    if not isinstance(data, np.ndarray):
        raise DatasetError(f"{path}: 'data' is a {type(data).__name__}, not an array. {HOW_TO_GET}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}. "
            f"{HOW_TO_GET}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: expected {len(data)} integer labels, got {labels.dtype} {labels.shape}. "
            f"{HOW_TO_GET}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetError(f"{path}: label values outside 0..9. {HOW_TO_GET}")
    if expected is not None and len(data) != expected:
        raise DatasetError(
            f"{path}: {len(data)} samples, the official batches have {expected} "
            f"(pass allow_subset=True for smaller files). {HOW_TO_GET}"
        )
    return data, labels.astype(np.int64)


def _batch_dir(root: str | Path | None) -> Path:
    """The directory holding the batches: ``root`` or ``root/cifar-10-batches-py``.

    Without ``root``, ``$FEDCODEC_DATA`` is used the same way.
    """
    env = os.environ.get("FEDCODEC_DATA")
    base = root if root is not None else env
    if base is None:
        raise DatasetError(f"CIFAR-10 needs a data directory and none was given. {HOW_TO_GET}")
    candidates = [Path(base), Path(base) / BATCH_DIR]
    for directory in candidates:
        if (directory / "test_batch").is_file():
            return directory
    searched = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"CIFAR-10 not found: no test_batch in {searched}. {HOW_TO_GET}")


def _to_tensor(data: np.ndarray) -> torch.Tensor:
    """``(N, 3072)`` uint8 -> normalised ``(N, 3, 32, 32)`` float32."""
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def load_cifar10(root: str | Path | None, allow_subset: bool = False) -> FederatedSource:
    """Load CIFAR-10 from the extracted python batches.

    ``root`` is the ``cifar-10-batches-py`` directory or its parent (``None``: use
    ``$FEDCODEC_DATA``). Training data is every ``data_batch_<n>`` file in numeric order, plus
    ``test_batch``. Unless ``allow_subset`` is true, the official five training batches of 10000
    samples and a test batch of 10000 are required. Images become ``float32`` tensors of shape
    ``(N, 3, 32, 32)`` scaled to ``[0, 1]`` and normalised per channel with :data:`MEAN` and
    :data:`STD`. Missing or corrupt files raise :class:`DatasetError`.
    """
    directory = _batch_dir(root)
    numbered = [(m, p) for p in directory.iterdir() if (m := _TRAIN_FILE.fullmatch(p.name))]
    train_paths = [p for m, p in sorted(numbered, key=lambda mp: int(mp[0].group(1)))]
    if not train_paths:
        raise DatasetError(f"CIFAR-10: no data_batch_* files in {directory}. {HOW_TO_GET}")
    if not allow_subset and len(train_paths) != TRAIN_BATCHES:
        raise DatasetError(
            f"CIFAR-10: found {len(train_paths)} training batches in {directory}, the official "
            f"release has {TRAIN_BATCHES} (pass allow_subset=True for fewer). {HOW_TO_GET}"
        )
    expected = None if allow_subset else BATCH_SIZE
    train = [_read_batch(p, expected) for p in train_paths]
    test_data, test_labels = _read_batch(directory / "test_batch", expected)
    return FederatedSource(
        name="cifar10",
        train_x=_to_tensor(np.concatenate([d for d, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=_to_tensor(test_data),
        test_y=torch.from_numpy(test_labels),
        num_classes=NUM_CLASSES,
        input_shape=(3, 32, 32),
    )
