"""Data sources for federated learned compression: heterogeneous clients that share structure.

Every source gives each client its own train and test tensors, a few *newcomers* (clients that take
no part in training; they only fit an entropy model afterwards), and the model and λ sweep that suit
it. Everything is drawn from explicit seeded generators.

- ``synthetic``: the paper's distributed source model. Client ``k`` draws a latent ``z`` from its own
  law (a two-component Gaussian mixture with client-specific means and scales) and every client pushes
  it through one fixed random nonlinear map ``R^2 → R^16``, plus small Gaussian noise.
- ``fashion-mnist``: label skew, client ``k`` holds classes ``k`` and ``k+1 (mod 10)`` (pixels in [0, 1]).
- ``photos``: one client per training photograph (random 32x32 crops from its upper three quarters;
  its test set is the lower quarter), held-out photographs for evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from .models import NTCConfig

SOURCES = ("synthetic", "fashion-mnist", "photos")


@dataclass
class NeuralSource:
    name: str
    train: list[torch.Tensor]  # per client
    test: list[torch.Tensor]  # per client (a list of images for photos: sizes differ)
    newcomers_train: list[torch.Tensor]
    newcomers_test: list[torch.Tensor]
    model: NTCConfig
    lambdas: tuple[float, ...]
    holdout: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # photos: evaluation only
    rate_unit: str = "bits/sample"
    defaults: dict = field(default_factory=dict)  # training settings that suit the source

    @property
    def num_clients(self) -> int:
        return len(self.train)


def synthetic_source(clients: int = 10, newcomers: int = 2, n_train: int = 100, n_test: int = 1000,
                     dim: int = 16, z_dim: int = 2, noise: float = 0.05, spread: float = 1.0,
                     seed: int = 0) -> NeuralSource:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((z_dim, 32)) * 1.5
    b1 = rng.standard_normal(32) * 0.5
    w2 = rng.standard_normal((32, dim)) / np.sqrt(32)

    def shared_map(z: np.ndarray) -> np.ndarray:  # the common representation every client shares
        return np.tanh(z @ w1 + b1) @ w2

    def client(r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        means = r.normal(0.0, spread, (2, z_dim))
        scales = r.uniform(0.3, 0.8, (2, z_dim))
        weight = r.uniform(0.2, 0.8)

        def draw(n: int) -> torch.Tensor:
            comp = (r.random(n) < weight).astype(int)
            z = means[comp] + scales[comp] * r.standard_normal((n, z_dim))
            x = shared_map(z) + noise * r.standard_normal((n, dim))
            return torch.from_numpy(x.astype(np.float32))

        return draw(n_train), draw(n_test)

    pairs = [client(np.random.default_rng([seed, k])) for k in range(clients + newcomers)]
    return NeuralSource("synthetic", [p[0] for p in pairs[:clients]], [p[1] for p in pairs[:clients]],
                        [p[0] for p in pairs[clients:]], [p[1] for p in pairs[clients:]],
                        NTCConfig("vector", dim, latent=4, hidden=64), (30.0, 100.0, 300.0, 1000.0),
                        rate_unit="bits/sample",
                        defaults={"rounds": 150, "local_epochs": 4, "batch_size": 32, "lr": 3e-3,
                                  # at 10x the vector codecs collapse to zero rate at λ=30 (RESULTS §7)
                                  "prior_lr_scale": 1.0})


def fashion_mnist_source(data_dir: str | None = None, n_train: int = 600, n_test: int = 200, seed: int = 0,
                         allow_subset: bool = False) -> NeuralSource:
    from ..data import load_dataset
    from ..data.fashion_mnist import MEAN, STD

    src = load_dataset("fashion-mnist", data_dir, allow_subset=allow_subset)
    rng = np.random.default_rng(seed)

    def take(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], n: int) -> torch.Tensor:
        idx = np.concatenate([rng.permutation(np.flatnonzero(y.numpy() == c))[:n // len(classes)] for c in classes])
        return torch.round((x[torch.from_numpy(np.sort(idx))] * STD + MEAN) * 255).clamp(0, 255) / 255

    groups = [(k, (k + 1) % 10) for k in range(10)]
    new_groups = [(0, 5), (3, 8)]  # pairs no training client holds
    train_sets = [take(src.train_x, src.train_y, g, n_train) for g in groups + new_groups]
    test_sets = [take(src.test_x, src.test_y, g, n_test) for g in groups + new_groups]
    return NeuralSource("fashion-mnist", train_sets[:10], test_sets[:10], train_sets[10:], test_sets[10:],
                        NTCConfig("image", 1, latent=16, hidden=32, downs=2), (30.0, 100.0, 300.0, 1000.0),
                        rate_unit="bpp",
                        defaults={"rounds": 20, "local_epochs": 1, "batch_size": 32, "lr": 2e-3})


def photo_source(folder: str | None = None, crops: int = 384, size: int = 32, holdout: int = 3,
                 newcomers: int = 1, seed: int = 0) -> NeuralSource:
    from .photos import crop_to_multiple, photo_set, random_crops

    photos = photo_set(folder, holdout=holdout, seed=seed)
    if len(photos.train) < newcomers + 2:
        raise ConfigError(f"photos: {len(photos.train)} training photos; need at least {newcomers + 2} "
                          "(two clients and the newcomers)")
    rng = np.random.default_rng(seed)
    model = NTCConfig("image", 3, latent=48, hidden=48, downs=3)
    m = 2 ** model.downs
    train, test = [], []
    for _, img in photos.train:
        cut = (img.shape[0] * 3 // 4)
        train.append(torch.from_numpy(random_crops(img[:cut], crops, size, rng)))
        strip = crop_to_multiple(img[cut:], m)
        test.append(torch.from_numpy(np.ascontiguousarray(strip.transpose(2, 0, 1)))[None])
    held = [(name, torch.from_numpy(np.ascontiguousarray(crop_to_multiple(img, m).transpose(2, 0, 1)))[None])
            for name, img in photos.holdout]
    k = len(train) - newcomers
    return NeuralSource("photos", train[:k], test[:k], train[k:], test[k:], model,
                        (100.0, 400.0, 1600.0), holdout=held, rate_unit="bpp",
                        defaults={"rounds": 30, "local_epochs": 1, "batch_size": 16, "lr": 2e-3})


def load_source(name: str, data_dir: str | None = None, seed: int = 0, allow_subset: bool = False) -> NeuralSource:
    if name == "synthetic":
        return synthetic_source(seed=seed)
    if name == "fashion-mnist":
        return fashion_mnist_source(data_dir, seed=seed, allow_subset=allow_subset)
    if name == "photos":
        return photo_source(data_dir, seed=seed)
    raise ConfigError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
