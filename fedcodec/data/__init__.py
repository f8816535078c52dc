"""Datasets and their partitioning among federated clients."""

from fedcodec.data.base import FederatedSource, make_synthetic_images
from fedcodec.data.loading import DATASETS, load_dataset
from fedcodec.data.partition import partition

__all__ = ["DATASETS", "FederatedSource", "load_dataset", "make_synthetic_images", "partition"]
