"""The dataset type and the option checks every loader and partitioner shares."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from paramarket_jax.errors import ParamarketError


class Dataset(NamedTuple):
    """A classification or token-sequence dataset split three ways.

    Feature and image data (``vocab`` 0) are standardised with train statistics; token data
    (``vocab`` > 0, :mod:`paramarket_jax.data.sequences`) hold exact integer token ids in
    [0, vocab) as float32 and are not standardised.

    Attributes:
        name: registry name.
        x_train: (n_train, *input_shape) float32, standardised features or token ids.
        y_train: (n_train,) int32 in [0, num_classes), one label per row; or (n_train, T)
            int32 per-position targets of token data (same T as x), where -1 marks a
            position the loss and accuracy skip (y < 0).
        x_val: (n_val, *input_shape) float32, carved from the original train split.
        y_val: (n_val,) or (n_val, T) int32.
        x_test: (n_test, *input_shape) float32, the dataset's own test split where it has one.
        y_test: (n_test,) or (n_test, T) int32.
        num_classes: number of classes K (the output vocabulary of token data).
        vocab: number of input token ids of token data; 0 for features and images.
        groups: optional (g_train, g_val, g_test), each (n,) int32 in [0, num_groups): what
            produced each row (the arithmetic operation, the Markov chain); None if none.
        num_groups: number of groups G; 0 without groups.
        group_floor: (G,) float64, the lowest mean loss (nats) any model can reach on a row of
            each group where the generator knows it (``markov``: each chain's entropy
            rate), else None. Runs report it beside each agent's loss (``loss_floor``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    vocab: int = 0
    groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    num_groups: int = 0
    group_floor: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: (h, w, c) for images, (d,) for flat data, (T,) for tokens."""
        return tuple(self.x_train.shape[1:])

    def strata(self, split: str = "train") -> np.ndarray:
        """(n,) int stratum of every row of ``split`` ("train", "val" or "test"), in
        [0, num_strata): what partitioners split by and what each agent's validation and
        test rows are stratified by. The row's group where the dataset has groups, else its
        label (one label per row: the classes, as for every feature and image dataset), else
        0 (per-position targets without groups: one stratum)."""
        splits = ("train", "val", "test")
        if split not in splits:
            raise ParamarketError(f"split must be one of {', '.join(splits)}, got {split!r}")
        index = splits.index(split)
        if self.groups is not None:
            return np.asarray(self.groups[index])
        y = np.asarray((self.y_train, self.y_val, self.y_test)[index])
        return y if y.ndim == 1 else np.zeros(len(y), np.int32)

    @property
    def num_strata(self) -> int:
        """Number of strata (see :meth:`strata`): num_groups, else num_classes for one label
        per row, else 1."""
        if self.groups is not None:
            return self.num_groups
        return self.num_classes if np.ndim(self.y_train) == 1 else 1


# ---- option checking, shared with partition.py ----


def is_int(value) -> bool:
    """True for Python or NumPy integers, False for bools."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for finite Python or NumPy ints and floats, False for bools."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )


def require(ok: bool, where: str, option: str, allowed: str, value) -> None:
    """Raise ParamarketError `where: option 'x' must be <allowed>, got <value>` unless ok."""
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise ParamarketError(f"{where}: option {option!r} must be {allowed}, got {shown}")


def check_int(where: str, option: str, value, low: int = 1) -> int:
    """The integer option `value`, checked to be >= low."""
    require(is_int(value) and value >= low, where, option, f"an integer >= {low}", value)
    return int(value)


def host_rng(key: jax.Array) -> np.random.Generator:
    """A local NumPy generator seeded from a JAX key (typed or legacy uint32).

    Data preparation happens on the host in NumPy; drawing it with jax.random would compile
    every op for every new array size and is slower on CPU for large arrays. The generator is
    fully determined by the key and touches no global state.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key), dtype=np.uint32).ravel())


def with_option_check(kind: str, name: str, fn: Callable) -> Callable:
    """Wrap `fn(*args, *, option=default, ...)` so unknown keywords raise ParamarketError.

    Args:
        kind: "dataset" or "partitioner", for the message.
        name: registry name, for the message.
        fn: function whose keyword-only parameters are its options.

    Returns:
        `fn` with the same signature, raising ParamarketError naming the unknown options
        and the allowed ones instead of TypeError.
    """

    @functools.wraps(fn)
    def call(*args, **options):
        _unknown_options(kind, name, fn, options)
        return fn(*args, **options)

    return call


def _unknown_options(kind: str, name: str, fn: Callable, options) -> None:
    """Raise ParamarketError naming options that are not keyword-only parameters of fn."""
    parameters = inspect.signature(fn).parameters.values()
    allowed = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise ParamarketError(
            f"{kind} {name!r}: unknown option {', '.join(map(repr, extra))}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )


def _check_common(where: str, val_fraction, max_train) -> None:
    require(
        is_real(val_fraction) and 0 < val_fraction < 1,
        where,
        "val_fraction",
        "a number in (0, 1)",
        val_fraction,
    )
    if max_train is not None:
        check_int(where, "max_train", max_train)
