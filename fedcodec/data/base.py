"""The in-memory form of a dataset and a synthetic dataset for tests (the loaders build on this
module; :mod:`fedcodec.data.loading` dispatches to them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedcodec.errors import ConfigError


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
