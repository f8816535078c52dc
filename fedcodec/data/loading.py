"""Load a dataset by name: the dispatcher over the loaders (which build on :mod:`fedcodec.data.base`)."""

from __future__ import annotations

from pathlib import Path

from fedcodec.data.base import FederatedSource, make_synthetic_images
from fedcodec.errors import ConfigError

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "synthetic")


def load_dataset(
    name: str, root: str | Path | None = None, allow_subset: bool = False
) -> FederatedSource:
    """Load the dataset called ``name`` (one of :data:`DATASETS`).

    ``root`` is a directory holding the data files (for Fashion-MNIST it is searched first, then
    the standard locations). ``allow_subset`` accepts files with fewer samples than the official
    release, which test fixtures need. Unknown names raise :class:`ConfigError`; missing or
    corrupt files raise :class:`DatasetError` with instructions to obtain them.
    """
    # each loader is imported when its dataset is asked for
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
