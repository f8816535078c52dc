"""Datasets and their partitioning among federated clients."""

from fedcodec.data.base import FederatedSource, load_dataset, make_synthetic_images
from fedcodec.data.partition import partition

__all__ = ["FederatedSource", "load_dataset", "make_synthetic_images", "partition"]
