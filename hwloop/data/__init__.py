"""Datasets: IDX files of the MNIST family, a synthetic task, a light batch iterator."""

from hwloop.data.datasets import (
    DATASETS,
    candidate_dirs,
    find_dataset_files,
    iterate_batches,
    load_dataset,
    synthetic_dataset,
)
from hwloop.data.idx import read_idx, read_idx_header, write_idx

__all__ = [
    "DATASETS",
    "candidate_dirs",
    "find_dataset_files",
    "iterate_batches",
    "load_dataset",
    "read_idx",
    "read_idx_header",
    "synthetic_dataset",
    "write_idx",
]
