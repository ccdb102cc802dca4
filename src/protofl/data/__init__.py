from protofl.data.dataset import ArrayDataset, DatasetSplits, cache_dir
from protofl.data.datasets import DATASETS, load_dataset
from protofl.data.sources import fetch, verify, list_sources, DataIntegrityError
from protofl.data.embeddings import embed, ENCODERS
from protofl.data.partition import Partition, make_partition
