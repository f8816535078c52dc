"""The in-memory form of a dataset, the loader dispatcher and a synthetic dataset for tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcodec.errors import ConfigError

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "synthetic")


@dataclass
class FederatedSource:
    """A labelled train/test split, ready to be partitioned among clients.

    ``train_x``/``test_x`` are normalised ``float32`` tensors of shape ``(N, *input_shape)``,
    ``train_y``/``test_y`` are ``int64`` tensors of shape ``(N,)`` with values in
    ``0..num_classes-1``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


def load_dataset(
    name: str, root: str | Path | None = None, allow_subset: bool = False
) -> FederatedSource:
    """Load the dataset called ``name`` (one of :data:`DATASETS`).

    ``root`` is a directory holding the data files (for Fashion-MNIST it is searched first, then
    the standard locations). ``allow_subset`` accepts files with fewer samples than the official
    release, which test fixtures need. Unknown names raise :class:`ConfigError`; missing or
    corrupt files raise :class:`DatasetError` with instructions to obtain them.
    """
    # Imported here because both loaders import FederatedSource from this module.
    if name == "fashion-mnist":
        from fedcodec.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(root, allow_subset=allow_subset)
    if name == "cifar10":
        from fedcodec.data.cifar10 import load_cifar10

        return load_cifar10(root, allow_subset=allow_subset)
    if name == "synthetic":
        # A small learnable stand-in for Fashion-MNIST (no files needed): smoke tests, Flower demos.
        return make_synthetic_images(2000, 500, seed=0)
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def make_synthetic_images(
    n_train: int,
    n_test: int,
    shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> FederatedSource:
    """Build a small, easily learnable image dataset for fast tests.

    Each class has a fixed random mean pattern (standard normal pixels); a sample is its class's
    pattern plus unit Gaussian noise. Labels cycle through all classes and are shuffled, so every
    class appears (as long as there are at least ``num_classes`` samples). Everything is drawn
    from ``np.random.default_rng(seed)``, so equal arguments give equal tensors.
    """
    if n_train < 1 or n_test < 1:
        raise ConfigError(
            f"make_synthetic_images: n_train={n_train} and n_test={n_test} must be >= 1"
        )
    if num_classes < 2:
        raise ConfigError(f"make_synthetic_images: num_classes={num_classes} must be >= 2")
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"make_synthetic_images: invalid shape {shape}")
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, *shape), dtype=np.float32)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.permutation(np.arange(n) % num_classes)
        x = means[y] + rng.standard_normal((n, *shape), dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return FederatedSource(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        input_shape=tuple(shape),
    )
