"""Data: sources fetched through package managers, datasets, embeddings, partitions."""

from protofl.data.dataset import ArrayDataset, DatasetSplits, cache_dir
from protofl.data.datasets import DATASETS, load_dataset
from protofl.data.embeddings import ENCODERS, embed
from protofl.data.partition import Partition, make_partition
from protofl.data.sources import DataIntegrityError, fetch, list_sources, verify

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DataIntegrityError",
    "DatasetSplits",
    "ENCODERS",
    "Partition",
    "cache_dir",
    "embed",
    "fetch",
    "list_sources",
    "load_dataset",
    "make_partition",
    "verify",
]
