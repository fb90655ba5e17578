"""Data: built-in procedural and packaged datasets and the user's folder, as in-memory splits."""

from attnlab.data.base import Bundle, MemoryDataset
from attnlab.data.config import DataConfig
from attnlab.data.registry import DATASETS, TEXT_SETS, build_dataset, build_splits, describe_datasets

__all__ = [
    "DATASETS",
    "TEXT_SETS",
    "Bundle",
    "DataConfig",
    "MemoryDataset",
    "build_dataset",
    "build_splits",
    "describe_datasets",
]
