"""Offline datasets and their partition among agents."""

from paramarket_jax.data.datasets import DATASETS, Dataset, load_dataset
from paramarket_jax.data.partition import PARTITIONERS, Partition, partition

__all__ = ["DATASETS", "PARTITIONERS", "Dataset", "Partition", "load_dataset", "partition"]
