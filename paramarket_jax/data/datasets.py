"""Datasets as standardised train/validation/test NumPy splits, built offline from a JAX key."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import random
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from paramarket_jax.data import files, sequences
from paramarket_jax.data.base import (
    Dataset,
    _check_common,
    _unknown_options,
    check_int,
    host_rng,
    is_int,
    is_real,
    require,
    with_option_check,
)
from paramarket_jax.errors import ParamarketError, unknown

# ---- shared steps ----


def _standardise_(x_train: np.ndarray, *others: np.ndarray, image: bool) -> None:
    """Standardise in place with train mean/std: per feature for flat data, per channel for images.

    Args:
        x_train: (n, *input_shape) float32, overwritten.
        *others: float32 arrays of the same trailing shape (val, test), overwritten.
        image: channel-last images (statistics over n, h, w) rather than flat features.
    """
    axes = tuple(range(x_train.ndim - 1)) if image else 0
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    mean, std = mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)
    for x in (x_train, *others):
        x -= mean
        x /= std


def assemble(
    name: str,
    key: jax.Array,
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    val_fraction: float,
    max_train: int | None,
    image: bool,
) -> Dataset:
    """Carve validation from the train pool, cap train, standardise and cast.

    Args:
        name: dataset name.
        key: drives the permutation that picks the validation examples.
        x_pool: (n, *input_shape) raw features of the original train split.
        y_pool: (n,) integer labels.
        x_test: (n_test, *input_shape) raw test features.
        y_test: (n_test,) test labels.
        num_classes: K.
        val_fraction: share of the pool moved to validation, in (0, 1).
        max_train: keep at most this many training examples (after carving), or None.
        image: channel-last images (per-channel statistics) or flat features.

    Returns:
        The Dataset.
    """
    where = f"dataset {name!r}"
    _check_common(where, val_fraction, max_train)
    max_train = None if max_train is None else int(max_train)
    n = len(y_pool)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1 or len(y_test) < 1:
        raise ParamarketError(
            f"{where}: {n} training and {len(y_test)} test examples are too few for "
            f"val_fraction={val_fraction}"
        )
    order = host_rng(key).permutation(n)
    val, train = order[:n_val], order[n_val:][:max_train]
    # Fancy indexing copies, so the float32 arrays below are ours to standardise in place.
    x_train = x_pool[train].astype(np.float32, copy=False)
    x_val = x_pool[val].astype(np.float32, copy=False)
    x_test = np.array(x_test, dtype=np.float32)
    _standardise_(x_train, x_val, x_test, image=image)
    labels = (y_pool[train], y_pool[val], y_test)
    y_train, y_val, y_test = (np.asarray(y, dtype=np.int32) for y in labels)
    return Dataset(name, x_train, y_train, x_val, y_val, x_test, y_test, num_classes)


def _directory(name: str, path, expected: str) -> Path:
    """The `path` option of a file-backed dataset, which is required."""
    if path is None or str(path) == "":
        raise ParamarketError(
            f"dataset {name!r} needs option 'path': a directory holding {expected}"
        )
    try:
        return Path(path).expanduser()
    except RuntimeError as error:  # ~user of an unknown user
        raise ParamarketError(
            f"dataset {name!r}: cannot expand the path {path!r}: {error}"
        ) from None


def _check_labels(name: str, directory: Path, num_classes: int, *labels: np.ndarray) -> None:
    """Raise ParamarketError unless every label lies in [0, num_classes)."""
    for y in labels:
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ParamarketError(
                f"{name}: labels in {directory} span [{y.min()}, {y.max()}]; "
                f"expected 0..{num_classes - 1}"
            )


def _keeping_global_rngs(fn: Callable, *args):
    """Call fn(*args), restoring the global NumPy and `random` states it reseeds."""
    # The legacy global state is exactly what mnist1d mutates, so it is what we save.
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        return fn(*args)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


# ---- loaders ----


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Scikit-learn's bundled digits as (1797, 8, 8) float64 images and (1797,) int labels.

    Read from the CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``)
    the way ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn
    (which imports SciPy: most of a second of every run); if that file is not where it
    is expected, through ``sklearn.datasets.load_digits`` itself.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = None
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        return bunch.images, bunch.target
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def load_digits(
    key: jax.Array,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Scikit-learn's bundled 8x8 digits (1797 images, 10 classes), input_shape (8, 8, 1).

    Args:
        key: drives the test split and the validation split.
        test_fraction: share of all examples held out for test, in (0, 1).
        val_fraction: share of the remaining examples moved to validation.
        max_train: cap on the number of training examples.
    """
    _check_digits(test_fraction=test_fraction, val_fraction=val_fraction, max_train=max_train)
    images, target = digits_arrays()
    x, y = images[..., None] / 16.0, target
    k_test, k_val = jax.random.split(key)
    order = host_rng(k_test).permutation(len(y))
    n_test = max(1, round(test_fraction * len(y)))
    test, pool = order[:n_test], order[n_test:]
    return assemble(
        "digits",
        k_val,
        x[pool],
        y[pool],
        x[test],
        y[test],
        10,
        val_fraction=val_fraction,
        max_train=max_train,
        image=True,
    )


def load_mnist1d(
    key: jax.Array,
    *,
    num_samples: int = 5000,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally; input_shape (40,), 10 classes.

    Args:
        key: seeds the generator (80/20 train/test) and drives the validation split.
        num_samples: examples generated before the train/test split, at least 10.
        val_fraction: share of the train split moved to validation.
        max_train: cap on the number of training examples.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    _check_mnist1d(num_samples=num_samples, val_fraction=val_fraction, max_train=max_train)
    num_samples = int(num_samples)
    k_seed, k_val = jax.random.split(key)
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = int(host_rng(k_seed).integers(2**31 - 1))
    data = _keeping_global_rngs(make_dataset, args)
    return assemble(
        "mnist1d",
        k_val,
        np.asarray(data["x"]),
        np.asarray(data["y"]),
        np.asarray(data["x_test"]),
        np.asarray(data["y_test"]),
        10,
        val_fraction=val_fraction,
        max_train=max_train,
        image=False,
    )


def _sample_mixture(
    key: jax.Array, means: np.ndarray, noise: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """n examples with balanced, shuffled labels: x = means[y] + noise * N(0, I).

    Args:
        key: randomness.
        means: (K, dim) float32 class means.
        noise: per-coordinate standard deviation.
        n: number of examples.

    Returns:
        x: (n, dim) float32, y: (n,) int32.
    """
    rng = host_rng(key)
    y = rng.permutation(np.arange(n, dtype=np.int32) % len(means))
    x = rng.standard_normal((n, means.shape[1]), dtype=np.float32)
    x *= np.float32(noise)
    x += means[y]
    return x, y


def load_gaussian(
    key: jax.Array,
    *,
    n_train: int = 4000,
    n_test: int = 1000,
    dim: int = 64,
    num_classes: int = 10,
    separation: float = 2.0,
    noise: float = 1.0,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Synthetic class-conditional Gaussian mixture, input_shape (dim,).

    Class means are random directions of norm `separation` (nearly orthogonal in high
    dimension, so pairwise distances are about sqrt(2) * separation whatever `dim`).

    Args:
        key: draws the means, the examples and the validation split.
        n_train: size of the train pool, before validation is carved from it.
        n_test: size of the test split.
        dim: input dimension.
        num_classes: K, at least 2.
        separation: norm of each class mean, >= 0.
        noise: standard deviation of the isotropic noise, > 0.
        val_fraction: share of the train pool moved to validation.
        max_train: cap on the number of training examples.
    """
    _check_gaussian(
        n_train=n_train,
        n_test=n_test,
        dim=dim,
        num_classes=num_classes,
        separation=separation,
        noise=noise,
        val_fraction=val_fraction,
        max_train=max_train,
    )
    n_train, n_test, dim, num_classes = int(n_train), int(n_test), int(dim), int(num_classes)
    k_means, k_train, k_test, k_val = jax.random.split(key, 4)
    directions = host_rng(k_means).standard_normal((num_classes, dim))
    means = separation * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    means = means.astype(np.float32)
    x_pool, y_pool = _sample_mixture(k_train, means, noise, n_train)
    x_test, y_test = _sample_mixture(k_test, means, noise, n_test)
    return assemble(
        "gaussian",
        k_val,
        x_pool,
        y_pool,
        x_test,
        y_test,
        num_classes,
        val_fraction=val_fraction,
        max_train=max_train,
        image=False,
    )


def _load_idx(name: str, key: jax.Array, path, val_fraction, max_train) -> Dataset:
    """An MNIST-format dataset from IDX files, HWC with one channel.

    Pixels stay uint8 until `assemble` indexes them: scaling to [0, 1] before standardising
    would not change the result, and converting 60k images to float32 up front doubles memory.
    """
    _check_files(name, path=path, val_fraction=val_fraction, max_train=max_train)
    directory = _directory(name, path, files.IDX_EXPECTED)
    x_pool, y_pool, x_test, y_test = files.read_idx_dataset(directory, name)
    _check_labels(name, directory, 10, y_pool, y_test)
    return assemble(
        name,
        key,
        x_pool[..., None],
        y_pool,
        x_test[..., None],
        y_test,
        10,
        val_fraction=val_fraction,
        max_train=max_train,
        image=True,
    )


def load_mnist(
    key: jax.Array,
    *,
    path: str | Path | None = None,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """MNIST from the four IDX files (raw or .gz) in directory `path`; input_shape (28, 28, 1).

    Args:
        key: drives the validation split.
        path: directory holding the IDX files (required).
        val_fraction: share of the train split moved to validation.
        max_train: cap on the number of training examples.
    """
    return _load_idx("mnist", key, path, val_fraction, max_train)


def load_fashion_mnist(
    key: jax.Array,
    *,
    path: str | Path | None = None,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Fashion-MNIST from IDX files named as MNIST's in directory `path`; input_shape (28, 28, 1).

    Args:
        key: drives the validation split.
        path: directory holding the IDX files (required).
        val_fraction: share of the train split moved to validation.
        max_train: cap on the number of training examples.
    """
    return _load_idx("fashion_mnist", key, path, val_fraction, max_train)


def load_cifar10(
    key: jax.Array,
    *,
    path: str | Path | None = None,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """CIFAR-10 python batches in `path` or `path/cifar-10-batches-py`; input_shape (32, 32, 3).

    Args:
        key: drives the validation split.
        path: directory holding data_batch_1..5 and test_batch (required).
        val_fraction: share of the train split moved to validation.
        max_train: cap on the number of training examples.
    """
    _check_files("cifar10", path=path, val_fraction=val_fraction, max_train=max_train)
    directory = _directory("cifar10", path, files.CIFAR_EXPECTED)
    x_pool, y_pool, x_test, y_test = files.read_cifar_batches(directory)
    _check_labels("cifar10", directory, 10, y_pool, y_test)
    return assemble(
        "cifar10",
        key,
        x_pool,
        y_pool,
        x_test,
        y_test,
        10,
        val_fraction=val_fraction,
        max_train=max_train,
        image=True,
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    name: with_option_check("dataset", name, loader)
    for name, loader in {
        "digits": load_digits,
        "mnist1d": load_mnist1d,
        "gaussian": load_gaussian,
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
    }.items()
}


# ---- option checks without loading (a scenario's data options are checked when it loads) ----

MAX_MNIST1D_SAMPLES = 1_000_000
MAX_GAUSSIAN_VALUES = 1 << 28  # generated floats: 1 GiB of float32


def _check_digits(*, test_fraction=0.2, val_fraction=0.15, max_train=None) -> None:
    where = "dataset 'digits'"
    require(
        is_real(test_fraction) and 0 < test_fraction < 1,
        where,
        "test_fraction",
        "a number in (0, 1)",
        test_fraction,
    )
    _check_common(where, val_fraction, max_train)


def _check_mnist1d(*, num_samples=5000, val_fraction=0.15, max_train=None) -> None:
    where = "dataset 'mnist1d'"
    require(
        is_int(num_samples) and 10 <= num_samples <= MAX_MNIST1D_SAMPLES,
        where,
        "num_samples",
        f"an integer in [10, {MAX_MNIST1D_SAMPLES}]",
        num_samples,
    )
    _check_common(where, val_fraction, max_train)


def _check_gaussian(
    *,
    n_train=4000,
    n_test=1000,
    dim=64,
    num_classes=10,
    separation=2.0,
    noise=1.0,
    val_fraction=0.15,
    max_train=None,
) -> None:
    where = "dataset 'gaussian'"
    n_train = check_int(where, "n_train", n_train, low=2)
    n_test = check_int(where, "n_test", n_test)
    dim = check_int(where, "dim", dim)
    num_classes = check_int(where, "num_classes", num_classes, low=2)
    require(is_real(separation) and separation >= 0, where, "separation", ">= 0", separation)
    require(is_real(noise) and noise > 0, where, "noise", "> 0", noise)
    _check_common(where, val_fraction, max_train)
    values = (n_train + n_test + num_classes) * dim
    if values > MAX_GAUSSIAN_VALUES:
        raise ParamarketError(
            f"{where}: options (n_train + n_test + num_classes) x dim must be at most "
            f"{MAX_GAUSSIAN_VALUES} values, got ({n_train} + {n_test} + {num_classes}) x {dim} "
            f"= {values}"
        )


def _check_files(name: str, *, path=None, val_fraction=0.15, max_train=None) -> None:
    where = f"dataset {name!r}"
    if path is not None and not isinstance(path, str | os.PathLike):
        raise ParamarketError(f"{where}: option 'path' must be a folder name, got {path!r}")
    _check_common(where, val_fraction, max_train)


OPTION_CHECKS: dict[str, Callable[..., None]] = {
    "digits": _check_digits,
    "mnist1d": _check_mnist1d,
    "gaussian": _check_gaussian,
    "mnist": functools.partial(_check_files, "mnist"),
    "fashion_mnist": functools.partial(_check_files, "fashion_mnist"),
    "cifar10": functools.partial(_check_files, "cifar10"),
}


def dataset_num_classes(name: str, **options) -> int:
    """The number of classes K of dataset ``name`` with ``options``, without loading it
    (every file-backed dataset and digits/mnist1d have 10; gaussian has its option; a
    sequence dataset's output vocabulary follows from its options)."""
    if name in sequences.NUM_CLASSES:
        return sequences.NUM_CLASSES[name](**options)
    return int(options.get("num_classes", 10)) if name == "gaussian" else 10


def dataset_num_strata(name: str, **options) -> int:
    """The number of strata (:meth:`Dataset.strata`) of dataset ``name`` with ``options``,
    without loading it: K for every feature and image dataset."""
    if name in sequences.NUM_STRATA:
        return sequences.NUM_STRATA[name](**options)
    return dataset_num_classes(name, **options)


def check_dataset_options(name: str, **options) -> None:
    """Check a dataset's name and option values without loading it (files are not read).

    Raises:
        ParamarketError: unknown name or option, or a bad option value.
    """
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    _unknown_options("dataset", name, DATASETS[name], options)
    OPTION_CHECKS[name](**options)


def load_dataset(name: str, key: jax.Array, **options) -> Dataset:
    """Load the registered dataset `name`.

    Args:
        name: a key of DATASETS.
        key: jax.random key; the same key gives identical arrays.
        **options: the loader's keyword options (see each `load_*`).

    Returns:
        The Dataset, NumPy arrays throughout.

    Raises:
        ParamarketError: unknown name or option, bad option value, missing or corrupt files.
    """
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    return DATASETS[name](key, **options)


# ---- token-sequence datasets ----

DATASETS.update(
    {name: with_option_check("dataset", name, loader) for name, loader in sequences.LOADERS.items()}
)
OPTION_CHECKS.update(sequences.OPTION_CHECKS)
