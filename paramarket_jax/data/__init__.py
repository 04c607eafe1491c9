"""Offline datasets and their partition among agents."""

from paramarket_jax.data.datasets import DATASETS, Dataset, check_dataset_options, load_dataset
from paramarket_jax.data.partition import (
    PARTITIONERS,
    Partition,
    add_label_noise,
    check_partition_options,
    partition,
    wrong_labels,
)
from paramarket_jax.data.sequences import markov_entropy_rates

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "Partition",
    "add_label_noise",
    "check_dataset_options",
    "check_partition_options",
    "load_dataset",
    "markov_entropy_rates",
    "partition",
    "wrong_labels",
]
