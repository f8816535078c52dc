"""Data sources for federated learned compression: heterogeneous clients that share structure.

Every source gives each client its own train and test tensors, a few *newcomers* (clients that take
no part in training; they only fit an entropy model afterwards), and the model and λ sweep that suit
it. Everything is drawn from explicit seeded generators.

- ``synthetic``: the paper's distributed source model. Client ``k`` draws a latent ``z`` from its own
  law (a two-component Gaussian mixture with client-specific means and scales) and every client pushes
  it through one fixed random nonlinear map ``R^2 → R^16``, plus small Gaussian noise.
- ``clusters``: overlapping structure with a heterogeneity knob. ``M`` latent Gaussian clusters, drawn
  once from the seed, pushed through one fixed random nonlinear map to ``R^dim`` plus small noise;
  client ``k`` mixes the clusters with weights ``π_k ~ Dirichlet(α·1_M)`` (``α`` large: clients alike;
  small: each client mostly one or two clusters that other clients share). Few samples per client.
- ``fashion-mnist``: label skew, client ``k`` holds classes ``k`` and ``k+1 (mod 10)`` (pixels in [0, 1]).
- ``photos``: one client per training photograph (random 32x32 crops from its upper three quarters;
  its test set is the lower quarter), held-out photographs for evaluation only.
- ``npy``: the user's own vectors, ``DIR/<client>/train.npy`` and ``DIR/<client>/test.npy`` (float32,
  shape ``(n, d)``), one client per subfolder in sorted order; every header is checked (dtype, shape,
  size bounds, that the file holds what it declares) before any array is loaded.

``synthetic`` is kept as a negative control: each of its clients' data is a nearly flat
low-dimensional patch that a client can learn alone, so sharing has little to add there. No image of
``fashion-mnist`` is held by two clients (each class's images are permuted once and handed out in
disjoint consecutive slices); this changed which images the default draws (earlier, two clients
holding the same class sampled it independently and could share images).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .models import NTC_LIMITS, NTCConfig

SOURCES = ("synthetic", "clusters", "fashion-mnist", "photos", "npy")

#: ``npy`` source bounds: values in one file, values in all files together, clients (subfolders),
#: and directory entries looked at in ``DIR`` (anything beyond is refused, not skipped)
MAX_NPY_VALUES = 1 << 26
MAX_NPY_TOTAL = 1 << 28
MAX_NPY_CLIENTS = 10_000
MAX_NPY_ENTRIES = 100_000
NPY_FILES = ("train.npy", "test.npy")
#: the ``npy`` λ sweep aims at these signal-to-distortion ratios (0, 5, 10, 15, 20 dB; see :func:`npy_source`)
NPY_SNRS = (1.0, 3.0, 10.0, 30.0, 100.0)


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
    note: str = ""  # what the source models, in a sentence or two

    @property
    def num_clients(self) -> int:
        return len(self.train)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _tanh_map(rng: np.random.Generator, z_dim: int, dim: int, hidden: int = 32):
    """One fixed random nonlinear map ``R^z_dim → R^dim`` (a tanh MLP), drawn from ``rng``."""
    w1 = rng.standard_normal((z_dim, hidden)) * 1.5
    b1 = rng.standard_normal(hidden) * 0.5
    w2 = rng.standard_normal((hidden, dim)) / np.sqrt(hidden)

    def shared_map(z: np.ndarray) -> np.ndarray:  # the common representation every client shares
        return np.tanh(z @ w1 + b1) @ w2

    return shared_map


def synthetic_source(clients: int = 10, newcomers: int = 2, n_train: int = 100, n_test: int = 1000,
                     dim: int = 16, z_dim: int = 2, noise: float = 0.05, spread: float = 1.0,
                     seed: int = 0) -> NeuralSource:
    n_train = _positive_int("samples_per_client", n_train)
    rng = np.random.default_rng(seed)
    shared_map = _tanh_map(rng, z_dim, dim)

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
                                  "prior_lr_scale": 1.0},
                        note="kept as a negative control: each client's data is a nearly flat "
                             "low-dimensional patch of the shared map, which a client can learn alone, "
                             "so there is little to share")


def cluster_assignments(seed: int, k: int, alpha: float, clusters: int, n_train: int,
                        n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Client ``k``'s cluster mixture of the ``clusters`` source: its weights ``π_k ~ Dirichlet(α·1)``
    and the cluster of each of its train and test samples, drawn from ``default_rng([seed, k])``."""
    r = np.random.default_rng([seed, k])
    weights = r.dirichlet(np.full(clusters, float(alpha)))
    return weights, r.choice(clusters, n_train, p=weights), r.choice(clusters, n_test, p=weights)


def clusters_source(clients: int = 10, newcomers: int = 2, samples_per_client: int = 30, n_test: int = 500,
                    alpha: float = 0.3, dim: int = 16, z_dim: int = 2, clusters: int = 8, noise: float = 0.05,
                    seed: int = 0) -> NeuralSource:
    """``clusters`` shared latent Gaussian clusters (means ``N(0, 1.2²)``, per-axis scales in
    [0.15, 0.5]) in ``R^z_dim``, one fixed tanh map to ``R^dim`` plus ``noise``; client ``k`` (newcomers
    are ``clients..clients+newcomers-1``) draws clusters from its Dirichlet(α) weights
    (:func:`cluster_assignments`). A client's data do not depend on the number of clients."""
    clients = _positive_int("clients", clients)
    newcomers = _positive_int("newcomers", newcomers, 0)
    samples_per_client = _positive_int("samples_per_client", samples_per_client)
    n_test = _positive_int("n_test", n_test)
    clusters = _positive_int("clusters", clusters)
    z_dim = _positive_int("z_dim", z_dim)
    dim = _positive_int("dim", dim)
    if dim > NTC_LIMITS["dim"]:
        raise ConfigError(f"dim must be at most {NTC_LIMITS['dim']}, got {dim}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a number > 0, got {alpha!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.2, (clusters, z_dim))
    scales = rng.uniform(0.15, 0.5, (clusters, z_dim))
    shared_map = _tanh_map(rng, z_dim, dim)

    def draw(r: np.random.Generator, comp: np.ndarray) -> torch.Tensor:
        z = means[comp] + scales[comp] * r.standard_normal((len(comp), z_dim))
        x = shared_map(z) + noise * r.standard_normal((len(comp), dim))
        return torch.from_numpy(x.astype(np.float32))

    train, test = [], []
    for k in range(clients + newcomers):
        _, c_train, c_test = cluster_assignments(seed, k, alpha, clusters, samples_per_client, n_test)
        r = np.random.default_rng([seed, k, 1])
        train.append(draw(r, c_train))
        test.append(draw(r, c_test))
    return NeuralSource("clusters", train[:clients], test[:clients], train[clients:], test[clients:],
                        NTCConfig("vector", dim, latent=4, hidden=64), (10.0, 30.0, 100.0, 300.0, 1000.0),
                        rate_unit="bits/sample",
                        # 300 rounds: at 100 every mode was still improving (its best validation round the
                        # last); λ=100, n=30, seed 0: local J 9.63 → 8.18, federated 9.24 → 7.45 (RESULTS §7)
                        defaults={"rounds": 300, "local_epochs": 2, "batch_size": 16, "lr": 3e-3,
                                  "prior_lr_scale": 1.0},
                        note=f"{clusters} latent clusters shared by all clients through one nonlinear map; "
                             f"each client mixes them with Dirichlet(α={alpha:g}) weights and holds "
                             f"{samples_per_client} training samples, too few to learn the map alone, "
                             "while its clusters recur at other clients")


def disjoint_class_slices(labels: np.ndarray, groups: Sequence[Sequence[int]], per_client: int,
                          rng: np.random.Generator, what: str = "data") -> list[np.ndarray]:
    """Indices (sorted) of ``per_client`` samples for each group of classes, split as evenly as the
    classes allow (the first classes of a group take the remainder), with no index in two groups:
    each class's indices are permuted once and handed out in consecutive slices, group by group.
    Raises :class:`ConfigError` saying how many samples per client fit when a class runs out."""
    labels = np.asarray(labels)
    per_client = _positive_int("samples_per_client", per_client)
    if any(len(g) == 0 or len(set(g)) != len(g) for g in groups):
        raise ConfigError(f"each group must list distinct classes, got {list(map(tuple, groups))}")

    def shares(n: int, g: Sequence[int]) -> list[int]:
        return [n // len(g) + (i < n % len(g)) for i in range(len(g))]

    def needs(n: int) -> dict[int, int]:
        need: dict[int, int] = {}
        for g in groups:
            for c, m in zip(g, shares(n, g)):
                need[c] = need.get(c, 0) + m
        return need

    pools = {c: np.flatnonzero(labels == c) for c in sorted(needs(per_client))}
    short = [c for c, m in needs(per_client).items() if m > len(pools[c])]
    if short:
        lo, hi = 0, per_client  # the largest n whose needs every pool meets (needs grow with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if all(m <= len(pools[c]) for c, m in needs(mid).items()):
                lo = mid
            else:
                hi = mid - 1
        c = short[0]
        holders = sum(c in g for g in groups)
        raise ConfigError(f"{what}: class {c} has {len(pools[c])} images and {holders} clients hold it, "
                          f"{needs(per_client)[c]} needed for {per_client} samples per client; at most {lo} "
                          "samples per client fit without two clients sharing an image")
    order = {c: rng.permutation(pool) for c, pool in pools.items()}
    cursor = dict.fromkeys(order, 0)
    out = []
    for g in groups:
        parts = []
        for c, m in zip(g, shares(per_client, g)):
            parts.append(order[c][cursor[c]:cursor[c] + m])
            cursor[c] += m
        out.append(np.sort(np.concatenate(parts)))
    return out


def fashion_mnist_source(data_dir: str | None = None, samples_per_client: int = 600, n_test: int = 200,
                         seed: int = 0, allow_subset: bool = False) -> NeuralSource:
    """Label skew (client ``k``: classes ``k``, ``k+1``; newcomers: (0, 5) and (3, 8)), no image held
    by two clients (:func:`disjoint_class_slices`, train and test separately)."""
    from ..data import load_dataset
    from ..data.fashion_mnist import MEAN, STD

    src = load_dataset("fashion-mnist", data_dir, allow_subset=allow_subset)
    rng = np.random.default_rng(seed)
    groups = [(k, (k + 1) % 10) for k in range(10)]
    new_groups = [(0, 5), (3, 8)]  # pairs no training client holds

    def take(x: torch.Tensor, y: torch.Tensor, n: int, what: str) -> list[torch.Tensor]:
        slices = disjoint_class_slices(y.numpy(), groups + new_groups, n, rng, what)
        return [torch.round((x[torch.from_numpy(idx)] * STD + MEAN) * 255).clamp(0, 255) / 255 for idx in slices]

    train_sets = take(src.train_x, src.train_y, samples_per_client, "fashion-mnist train")
    test_sets = take(src.test_x, src.test_y, n_test, "fashion-mnist test")
    return NeuralSource("fashion-mnist", train_sets[:10], test_sets[:10], train_sets[10:], test_sets[10:],
                        NTCConfig("image", 1, latent=16, hidden=32, downs=2), (10.0, 30.0, 100.0, 300.0, 1000.0),
                        rate_unit="bpp",
                        # about as many local steps with few samples as with 600 (20 rounds of 19 batches):
                        # 25 samples per client → 400 rounds of one batch
                        defaults={"rounds": min(400, max(20, math.ceil(20 * 600 / samples_per_client))),
                                  "local_epochs": 1, "batch_size": 32, "lr": 2e-3,
                                  # FedAdam's server lr: at 0.03 alone this conv codec diverged within 10
                                  # rounds on 3 of 4 seeds (25 samples per client), and 0.01 under-trains it
                                  # (+12% BD-rate against local-only); 0.03 ramped up over the first 50
                                  # rounds trains (seed 1, λ=300: J 3.05 against 3.69 at 0.01; RESULTS §7)
                                  "server_lr": 0.03, "server_warmup": 50},
                        note="label skew: each client holds two neighbouring classes, no image held twice")


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
                        defaults={"rounds": 30, "local_epochs": 1, "batch_size": 16, "lr": 2e-3},
                        note="one client per photograph, held-out photographs for evaluation only")


def _npy_header(path: Path) -> tuple[int, int]:
    """``(n, d)`` of a float32 ``.npy`` array of shape ``(n, d)``, from its header alone; every other
    header raises :class:`ConfigError` naming ``path`` and saying how to fix it."""
    from ..files import npy_header

    shape, dtype, data_bytes = npy_header(path)
    if dtype.hasobject:
        raise ConfigError(f"{path} holds Python objects (dtype {dtype}), which are never loaded; save a "
                          "float32 array: np.save(path, np.asarray(x, dtype=np.float32))")
    if dtype.kind != "f" or dtype.itemsize != 4:
        raise ConfigError(f"{path} holds {dtype}, expected float32; convert with x.astype(np.float32)")
    if len(shape) != 2:
        raise ConfigError(f"{path} has shape {shape} ({len(shape)} dimensions), expected (n, d): one row "
                          "per sample; flatten samples with x.reshape(len(x), -1)")
    n, d = shape
    if n < 1 or d < 1:
        raise ConfigError(f"{path} has shape {shape}: it needs at least one sample (row) of at least one value")
    if d > NTC_LIMITS["dim"]:
        raise ConfigError(f"{path} has {d} values per sample; at most {NTC_LIMITS['dim']} are supported "
                          "(reduce the dimension, e.g. by PCA or by splitting samples)")
    if n * d > MAX_NPY_VALUES:
        raise ConfigError(f"{path} declares {n * d:,} values; at most {MAX_NPY_VALUES:,} per file are "
                          "supported (use fewer samples)")
    if n * d * dtype.itemsize > data_bytes:
        raise ConfigError(f"{path}: its header declares float32 of shape {shape} ({n * d * dtype.itemsize:,} "
                          f"bytes) but the file holds {data_bytes:,} data bytes (truncated?); write it again "
                          "with np.save")
    return n, d


def _npy_clients(root: Path) -> list[Path]:
    if not root.exists():
        raise ConfigError(f"npy source: {root} does not exist; pass --data-dir DIR with one subfolder per "
                          "client, each holding train.npy and test.npy")
    if not root.is_dir():
        raise ConfigError(f"npy source: {root} is not a directory; pass --data-dir DIR with one subfolder per "
                          "client, each holding train.npy and test.npy")
    names = []
    try:
        with os.scandir(root) as it:
            for i, entry in enumerate(it):
                if i >= MAX_NPY_ENTRIES:
                    raise ConfigError(f"npy source: {root} has more than {MAX_NPY_ENTRIES:,} entries; keep "
                                      "only the client subfolders there")
                if not entry.name.startswith(".") and entry.is_dir():
                    names.append(entry.name)
                    if len(names) > MAX_NPY_CLIENTS:
                        raise ConfigError(f"npy source: {root} has more than {MAX_NPY_CLIENTS:,} client "
                                          "subfolders; merge some clients")
    except OSError as err:
        raise ConfigError(f"npy source: cannot list {root}: {err}") from None
    if not names:
        raise ConfigError(f"npy source: {root} has no client subfolders; expected {root}/<client>/train.npy "
                          f"and {root}/<client>/test.npy, one subfolder per client")
    return [root / name for name in sorted(names)]


def _mean_variance(arrays: list[np.ndarray], rows: int = 1 << 16) -> float:
    """The pooled per-column variance of ``arrays`` (each ``(n, d)``) averaged over columns, accumulated
    in float64 a block of ``rows`` rows at a time (no float64 copy of the data)."""
    n, s, ss = 0, 0.0, 0.0
    for x in arrays:
        for i in range(0, len(x), rows):
            block = x[i:i + rows].astype(np.float64)
            n, s, ss = n + len(block), s + block.sum(axis=0), ss + (block * block).sum(axis=0)
    mean = s / n
    return float(np.mean(np.maximum(ss / n - mean * mean, 0.0)))


def npy_source(data_dir: str | os.PathLike | None) -> NeuralSource:
    """The user's vectors: ``DIR/<client>/train.npy`` and ``test.npy`` (float32, ``(n, d)``, the same
    ``d`` everywhere, finite), clients in sorted order, no newcomers. Every header is checked before
    any array is loaded (bounds :data:`MAX_NPY_VALUES`, :data:`MAX_NPY_TOTAL`, :data:`MAX_NPY_CLIENTS`,
    :data:`MAX_NPY_ENTRIES`). Model: vectors of ``d``, latent ``min(d, 8)``, hidden 64. The λ sweep
    follows the data's units: with ``σ²`` the training data's mean per-element variance and ``m`` the
    latent size, ``λ = m·SNR / (2 ln 2 · σ²)`` for SNR in :data:`NPY_SNRS`, the slope of the rate-distortion
    curve of ``m``-dimensional Gaussian data at that SNR (a starting point; ``--lambdas`` overrides it)."""
    if data_dir is None:
        raise ConfigError("the npy source needs --data-dir DIR: one subfolder per client, each holding "
                          "train.npy and test.npy (float32 arrays of shape (n, d))")
    root = Path(data_dir)
    folders = _npy_clients(root)
    files, first, total = [], None, 0
    for folder in folders:
        for name in NPY_FILES:
            path = folder / name
            if not path.is_file():
                raise ConfigError(f"npy source: {path} is missing; each client folder needs "
                                  f"{' and '.join(NPY_FILES)} (float32 arrays of shape (n, d))")
            n, d = _npy_header(path)
            if first is None:
                first = (path, d)
            elif d != first[1]:
                raise ConfigError(f"{path} has {d} values per sample but {first[0]} has {first[1]}; every file "
                                  "must have the same d")
            total += n * d
            if total > MAX_NPY_TOTAL:
                raise ConfigError(f"npy source: the files under {root} hold more than {MAX_NPY_TOTAL:,} values "
                                  "together; use fewer samples or clients")
            files.append((path, (n, d)))
    arrays = []
    for path, shape in files:
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ConfigError(f"{path} is not a readable .npy array: {err}") from None
        if x.shape != shape:  # changed since its header was read
            raise ConfigError(f"{path} changed while it was read (shape {x.shape}, header {shape})")
        bad = ~np.isfinite(x)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise ConfigError(f"{path} has {int(bad.sum()):,} NaN or infinite values (first in row {row}); "
                              "drop or replace them, e.g. x = x[np.isfinite(x).all(axis=1)]")
        arrays.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    train, test = arrays[0::2], arrays[1::2]
    d = first[1]
    latent = min(d, 8)
    var = _mean_variance([x.numpy() for x in train])
    var = var if math.isfinite(var) and var > 0 else 1.0
    # λ = -dR/dD for Gaussian data of `latent` dimensions at SNR σ²/D: latent·SNR / (2 ln2 · σ²)
    lambdas = tuple(float(f"{latent * snr / (2 * math.log(2) * var):.3g}") for snr in NPY_SNRS)
    shown = ", ".join(f.name for f in folders[:5]) + (", ..." if len(folders) > 5 else "")
    return NeuralSource("npy", train, test, [], [], NTCConfig("vector", d, latent=latent, hidden=64),
                        lambdas, rate_unit="bits/sample",
                        defaults={"rounds": 100, "local_epochs": 2, "batch_size": 16, "lr": 3e-3,
                                  "prior_lr_scale": 1.0},
                        note=f"user data from {root}: {len(folders)} clients ({shown}), {d} values per sample")


def load_source(name: str, data_dir: str | None = None, seed: int = 0, allow_subset: bool = False,
                samples_per_client: int | None = None, alpha: float | None = None) -> NeuralSource:
    """The source ``name`` (one of :data:`SOURCES`). ``samples_per_client`` (training samples per
    client) applies to synthetic, clusters and fashion-mnist; ``alpha`` (Dirichlet concentration) to
    clusters only; ``data_dir`` to fashion-mnist, photos and npy (which requires it)."""
    if name not in SOURCES:
        raise ConfigError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if samples_per_client is not None and name not in ("synthetic", "clusters", "fashion-mnist"):
        raise ConfigError(f"samples_per_client does not apply to the {name} source (only to synthetic, "
                          "clusters and fashion-mnist)")
    if alpha is not None and name != "clusters":
        raise ConfigError(f"alpha does not apply to the {name} source (only to clusters)")
    spc = {} if samples_per_client is None else {"samples_per_client": samples_per_client}
    if name == "synthetic":
        return synthetic_source(seed=seed, **({} if samples_per_client is None else {"n_train": samples_per_client}))
    if name == "clusters":
        return clusters_source(seed=seed, **spc, **({} if alpha is None else {"alpha": alpha}))
    if name == "fashion-mnist":
        return fashion_mnist_source(data_dir, seed=seed, allow_subset=allow_subset, **spc)
    if name == "photos":
        return photo_source(data_dir, seed=seed)
    return npy_source(data_dir)
