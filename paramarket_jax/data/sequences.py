"""Token-sequence datasets for sequence models, generated offline from a JAX key.

Modular arithmetic (Power et al. 2022, "Grokking"), Markov-chain languages with a known
entropy rate, algorithmic tasks with a length split (parity, reverse, sort, after Deletang
et al. 2023, "Neural networks and the Chomsky hierarchy") and a character-level English
corpus from CPython's own ``pydoc_data``. Nothing is downloaded.

Conventions shared by every dataset here (see :class:`~paramarket_jax.data.Dataset`):

- ``x`` is (n, T) float32 holding exact integer token ids in [0, ``vocab``); it is not
  standardised.
- ``y`` is (n,) int32 for one answer per row, or (n, T) int32 for one target per position
  (position t's target is what the model must emit after reading x[:, : t + 1]). A target
  of -1 (:data:`IGNORE`) marks a position that does not count: the loss and the accuracy
  must skip ``y < 0``. Counted targets lie in [0, ``num_classes``).
- Next-token data (``markov``, ``pydoc_text``: y[:, t] = x[:, t + 1]) need a causal model
  (position t attends to positions <= t only); ``reverse`` and ``sort`` never show an answer
  among the inputs, so they suit causal and bidirectional models alike.
- ``groups`` (where present) name what produced each row (the arithmetic operation, the
  Markov chain); partitioners split by them (:meth:`Dataset.strata`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from paramarket_jax.data.base import (
    Dataset,
    _check_common,
    _unknown_options,
    check_int,
    host_rng,
    is_int,
    is_real,
    require,
)
from paramarket_jax.errors import ParamarketError

IGNORE = -1  # target of a position that does not count (the loss skips y < 0)
MAX_VALUES = 1 << 26  # token ids generated per dataset: 256 MiB of float32 inputs


# ---- shared steps ----


def _token_dataset(
    name: str,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    vocab: int,
    groups: Sequence[np.ndarray] | None = None,
    num_groups: int = 0,
) -> Dataset:
    """A Dataset from (x, y) integer arrays of train, val and test, cast to float32/int32."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        (np.asarray(x, np.float32), np.asarray(y, np.int32)) for x, y in splits
    )
    if groups is not None:
        groups = tuple(np.asarray(g, np.int32) for g in groups)
    return Dataset(
        name,
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        int(num_classes),
        vocab=int(vocab),
        groups=groups,
        num_groups=int(num_groups) if groups is not None else 0,
    )


def _fraction(where: str, option: str, value) -> float:
    require(is_real(value) and 0 < value < 1, where, option, "a number in (0, 1)", value)
    return float(value)


def _three_way(
    where: str, n: int, test_fraction: float, val_fraction: float, unit: str, least: int = 1
) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) of n items: test_fraction of all for test, val_fraction of the
    rest for validation (each at least one), raising unless every split gets ``least``."""
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * (n - n_test)))
    n_train = n - n_test - n_val
    if min(n_train, n_val, n_test) < least:
        raise ParamarketError(
            f"{where}: {n} {unit} split as test_fraction={test_fraction}, "
            f"val_fraction={val_fraction} leave {n_train} train, {n_val} val and {n_test} test; "
            f"every split needs at least {least}"
        )
    return n_train, n_val, n_test


def _check_values(where: str, rows: int, length: int, what: str) -> None:
    if rows * length > MAX_VALUES:
        raise ParamarketError(
            f"{where}: {what} must give at most {MAX_VALUES} token ids, got {rows} rows x "
            f"{length} = {rows * length}"
        )


def _capped(rows: np.ndarray, max_train: int | None) -> np.ndarray:
    return rows if max_train is None else rows[: int(max_train)]


# ---- arithmetic: a op b = c (mod p) ----

OPERATIONS = ("+", "-", "*", "/", "x^2+xy+y^2")
DEFAULT_OPERATIONS = ("+", "-", "*", "/")
DEFAULT_MODULUS = 23
MAX_MODULUS = 257


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _operate(operation: str, a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    """c = a op b mod p for int64 arrays; "/" multiplies by b's inverse (b != 0)."""
    if operation == "+":
        return (a + b) % p
    if operation == "-":
        return (a - b) % p
    if operation == "*":
        return (a * b) % p
    if operation == "/":
        inverse = np.array([pow(int(v), -1, p) if v else 0 for v in range(p)], np.int64)
        return (a * inverse[b]) % p
    return (a * a + a * b + b * b) % p


def _table_size(operation: str, p: int) -> int:
    return p * (p - 1) if operation == "/" else p * p


def load_arithmetic(
    key: jax.Array,
    *,
    modulus: int = DEFAULT_MODULUS,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
    fraction: float = 0.5,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Modular arithmetic (Power et al. 2022): rows ``a op b =``, target the answer mod p.

    The whole table of every operation (all a, b in [0, p), b != 0 for "/") is split at
    random, each operation's rows on their own: ``fraction`` of them into the train pool
    (Power et al.'s training fraction), the rest to test; ``val_fraction`` of the pool to
    validation. No (a, op, b) row is in two splits.

    Tokens: 0..p-1 the numbers, p + k the k-th entry of ``operations``, p + len(operations)
    the "=" sign; x is (n, 4) = [a, p + k, b, "="], y (n,) in [0, p). vocab = p +
    len(operations) + 1, num_classes = p, groups = the operation's index k.

    Args:
        key: drives the split.
        modulus: p, a prime in [3, 257].
        operations: distinct names from "+", "-", "*", "/" (a times b's inverse mod p) and
            "x^2+xy+y^2".
        fraction: share of each operation's table in the train pool, in (0, 1).
        val_fraction: share of the pool moved to validation.
        max_train: cap on the number of training rows.
    """
    _check_arithmetic(
        modulus=modulus,
        operations=operations,
        fraction=fraction,
        val_fraction=val_fraction,
        max_train=max_train,
    )
    p, operations = int(modulus), tuple(operations)
    rng = host_rng(key)
    parts: list[list[np.ndarray]] = [[], [], []]  # (n, 5) rows [a, op, b, c, k] per split
    for k, operation in enumerate(operations):
        a, b = (v.ravel() for v in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
        if operation == "/":
            a, b = a[b != 0], b[b != 0]
        c = _operate(operation, a, b, p)
        rows = np.stack([a, np.full_like(a, p + k), b, c, np.full_like(a, k)], axis=1)
        rows = rows[rng.permutation(len(rows))]
        n_pool = round(fraction * len(rows))
        n_val = max(1, round(val_fraction * n_pool))
        for split, piece in enumerate((rows[n_val:n_pool], rows[:n_val], rows[n_pool:])):
            parts[split].append(piece)
    equals = p + len(operations)
    splits, groups = [], []
    for split, pieces in enumerate(parts):
        rows = np.concatenate(pieces)
        rows = rows[rng.permutation(len(rows))]
        if split == 0:
            rows = _capped(rows, max_train)
        x = np.concatenate([rows[:, :3], np.full((len(rows), 1), equals)], axis=1)
        splits.append((x, rows[:, 3]))
        groups.append(rows[:, 4])
    return _token_dataset("arithmetic", splits, p, equals + 1, groups, len(operations))


def _check_arithmetic(
    *,
    modulus=DEFAULT_MODULUS,
    operations=DEFAULT_OPERATIONS,
    fraction=0.5,
    val_fraction=0.15,
    max_train=None,
) -> None:
    where = "dataset 'arithmetic'"
    require(
        is_int(modulus) and 3 <= modulus <= MAX_MODULUS and _is_prime(int(modulus)),
        where,
        "modulus",
        f"a prime in [3, {MAX_MODULUS}]",
        modulus,
    )
    ok = (
        isinstance(operations, list | tuple)
        and len(operations) > 0
        and all(isinstance(op, str) and op in OPERATIONS for op in operations)
        and len(set(operations)) == len(operations)
    )
    require(
        ok,
        where,
        "operations",
        f"a list of distinct names from {', '.join(OPERATIONS)}",
        operations,
    )
    fraction = _fraction(where, "fraction", fraction)
    _check_common(where, val_fraction, max_train)
    for operation in operations:
        n = _table_size(operation, int(modulus))
        n_pool = round(fraction * n)
        n_val = max(1, round(val_fraction * n_pool))
        if n_pool - n_val < 1 or n - n_pool < 1:
            raise ParamarketError(
                f"{where}: the {n} rows of operation {operation!r} mod {modulus} split as "
                f"fraction={fraction}, val_fraction={val_fraction} leave {n_pool - n_val} train, "
                f"{n_val} val and {n - n_pool} test; every split needs at least 1"
            )


# ---- Markov-chain languages ----

DEFAULT_CHAINS = 4
DEFAULT_VOCAB = 16
MAX_CHAINS = 256
MAX_VOCAB = 1024
MAX_LENGTH = 4096


def markov_transitions(
    key: jax.Array, num_chains: int, vocab: int, mix: float, concentration: float
) -> np.ndarray:
    """(num_chains, vocab, vocab) float64 row-stochastic transition matrices.

    Chain g's matrix is ``(1 - mix) * shared + mix * private_g``, every row of ``shared``
    and of each ``private_g`` drawn from Dirichlet(concentration * 1). The draws do not
    depend on ``mix``, so mix = 0 gives num_chains identical chains and the shared part is
    the same for every mix.
    """
    rng = host_rng(key)
    alpha = np.full(vocab, float(concentration))
    shared = rng.dirichlet(alpha, size=vocab)
    private = rng.dirichlet(alpha, size=(num_chains, vocab))
    transitions = (1 - mix) * shared + mix * private
    return transitions / transitions.sum(axis=-1, keepdims=True)


def stationary(transitions: np.ndarray) -> np.ndarray:
    """(..., V) stationary distribution pi = pi P of each (..., V, V) transition matrix."""
    v = transitions.shape[-1]
    system = np.swapaxes(transitions, -1, -2) - np.eye(v)
    system[..., -1, :] = 1.0  # replace one balance equation by sum(pi) = 1
    rhs = np.zeros(transitions.shape[:-1])
    rhs[..., -1] = 1.0
    pi = np.linalg.solve(system, rhs[..., None])[..., 0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum(axis=-1, keepdims=True)


def entropy_rate(transitions: np.ndarray) -> np.ndarray:
    """Exact entropy rate in nats, ``-sum_i pi_i sum_j P_ij log P_ij`` (0 log 0 = 0), of each
    (..., V, V) transition matrix, with pi its stationary distribution; shape (...)."""
    logs = np.log(np.where(transitions > 0, transitions, 1.0))
    per_state = -(transitions * logs).sum(axis=-1)
    return (stationary(transitions) * per_state).sum(axis=-1)


def _markov_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chains key, sequences key) of a markov dataset's key."""
    k_chains, k_data = jax.random.split(key)
    return k_chains, k_data


def markov_chains(key: jax.Array, **options) -> np.ndarray:
    """(num_chains, vocab, vocab) float64 transition matrices of the chains (groups) of the
    ``markov`` dataset loaded with the same key and options (see :func:`markov_transitions`).

    Args:
        key: the dataset's key.
        **options: the dataset's options (those that do not shape the chains are ignored).
    """
    _unknown_options("dataset", "markov", load_markov, options)
    _check_markov(**options)
    return markov_transitions(
        _markov_keys(key)[0],
        int(options.get("num_chains", DEFAULT_CHAINS)),
        int(options.get("vocab", DEFAULT_VOCAB)),
        float(options.get("mix", 0.5)),
        float(options.get("concentration", 0.5)),
    )


def markov_entropy_rates(key: jax.Array, **options) -> np.ndarray:
    """(num_chains,) float64 exact entropy rate in nats of each chain (group) of the
    ``markov`` dataset loaded with the same key and options: the lowest achievable mean
    next-token cross-entropy on that group's rows, at every position (the walks start in
    the stationary distribution), by any model that knows the group.

    Args:
        key: the dataset's key.
        **options: the dataset's options (those that do not shape the chains are ignored).
    """
    return entropy_rate(markov_chains(key, **options))


def _walk(
    rng: np.random.Generator, transitions: np.ndarray, chain: np.ndarray, steps: int
) -> np.ndarray:
    """(n, steps) int64 token paths, row r walking chain ``chain[r]`` from its stationary
    distribution, by inverse-CDF draws."""
    v = transitions.shape[-1]
    cdf, start = np.cumsum(transitions, axis=-1), np.cumsum(stationary(transitions), axis=-1)
    u = rng.random((len(chain), steps))
    path = np.empty((len(chain), steps), np.int64)
    path[:, 0] = (u[:, :1] > start[chain]).sum(axis=1)
    np.minimum(path[:, 0], v - 1, out=path[:, 0])
    for t in range(1, steps):
        step = (u[:, t : t + 1] > cdf[chain, path[:, t - 1]]).sum(axis=1)
        path[:, t] = np.minimum(step, v - 1)
    return path


def load_markov(
    key: jax.Array,
    *,
    num_chains: int = DEFAULT_CHAINS,
    vocab: int = DEFAULT_VOCAB,
    length: int = 32,
    mix: float = 0.5,
    concentration: float = 0.5,
    num_samples: int = 4000,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Markov-chain languages: one chain per group, next-token prediction at every position.

    Chain g (see :func:`markov_transitions`) blends a transition matrix shared by all chains
    with its own: ``mix`` = 0 makes every group the same language, 1 makes them unrelated.
    Each row walks one chain for length + 1 steps from its stationary distribution; x
    (n, length) is the walk without its last token, y (n, length) without its first (y[:, t]
    = x[:, t + 1]). Every split holds the chains in equal numbers (within one row).
    vocab = num_classes = ``vocab``, groups = the chain. The chains' exact entropy rates
    (the lowest achievable loss) are :func:`markov_entropy_rates` of the same key and options.

    Args:
        key: draws the chains and the walks.
        num_chains: G, the number of languages (groups), in [1, 256].
        vocab: tokens V, in [2, 1024].
        length: context T, in [1, 4096].
        mix: weight of each chain's private matrix, in [0, 1].
        concentration: Dirichlet concentration of the matrices' rows, in [0.01, 100];
            small values give peaked, low-entropy rows, large ones near-uniform rows.
        num_samples: sequences in all three splits together.
        test_fraction: share of the sequences held out for test, in (0, 1).
        val_fraction: share of the remaining sequences moved to validation.
        max_train: cap on the number of training sequences.
    """
    options = {
        "num_chains": num_chains,
        "vocab": vocab,
        "mix": mix,
        "concentration": concentration,
    }
    sizes = _check_markov(
        **options,
        length=length,
        num_samples=num_samples,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        max_train=max_train,
    )
    num_chains, vocab, length = int(num_chains), int(vocab), int(length)
    k_chains, k_data = _markov_keys(key)
    transitions = markov_transitions(k_chains, num_chains, vocab, float(mix), float(concentration))
    rng = host_rng(k_data)
    splits, groups = [], []
    for split, n in enumerate(sizes):
        if split == 0 and max_train is not None:
            n = min(n, int(max_train))
        chain = rng.permutation(np.arange(n) % num_chains)
        path = _walk(rng, transitions, chain, length + 1)
        splits.append((path[:, :-1], path[:, 1:]))
        groups.append(chain)
    data = _token_dataset("markov", splits, vocab, vocab, groups, num_chains)
    # every position's next token has the chain's entropy rate as its lowest expected loss
    # (the walk starts stationary, so the history's last token has the stationary law)
    return data._replace(group_floor=entropy_rate(transitions).astype(np.float64))


def _check_markov(
    *,
    num_chains=DEFAULT_CHAINS,
    vocab=DEFAULT_VOCAB,
    length=32,
    mix=0.5,
    concentration=0.5,
    num_samples=4000,
    test_fraction=0.2,
    val_fraction=0.15,
    max_train=None,
) -> tuple[int, int, int]:
    """Check the markov options; return the (train, val, test) sequence counts."""
    where = "dataset 'markov'"
    require(
        is_int(num_chains) and 1 <= num_chains <= MAX_CHAINS,
        where,
        "num_chains",
        f"an integer in [1, {MAX_CHAINS}]",
        num_chains,
    )
    require(
        is_int(vocab) and 2 <= vocab <= MAX_VOCAB,
        where,
        "vocab",
        f"an integer in [2, {MAX_VOCAB}]",
        vocab,
    )
    require(
        is_int(length) and 1 <= length <= MAX_LENGTH,
        where,
        "length",
        f"an integer in [1, {MAX_LENGTH}]",
        length,
    )
    require(is_real(mix) and 0 <= mix <= 1, where, "mix", "a number in [0, 1]", mix)
    require(
        is_real(concentration) and 0.01 <= concentration <= 100,
        where,
        "concentration",
        "a number in [0.01, 100]",
        concentration,
    )
    num_samples = check_int(where, "num_samples", num_samples, low=3)
    test_fraction = _fraction(where, "test_fraction", test_fraction)
    _check_common(where, val_fraction, max_train)
    _check_values(where, num_samples, int(length) + 1, "options num_samples x (length + 1)")
    unit = f"sequences of {num_chains} chains"
    return _three_way(where, num_samples, test_fraction, val_fraction, unit, int(num_chains))


# ---- algorithmic tasks with a length split ----


def _lengths(
    rng: np.random.Generator, n: int, low: int, high: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) lengths uniform in [low, high] and an (n, high) mask of the positions < length."""
    lengths = rng.integers(low, high + 1, size=n)
    return lengths, np.arange(high) < lengths[:, None]


def _length_split(
    key: jax.Array,
    make: Callable[[np.random.Generator, int, int, int], tuple[np.ndarray, np.ndarray]],
    train_length: int,
    test_length: int,
    num_samples: int,
    num_test: int,
    val_fraction: float,
    max_train: int | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train and validation rows of lengths in [1, train_length], test rows of lengths in
    [train_length + 1, test_length]; make(rng, n, low, high) draws n (x, y) rows."""
    k_pool, k_test = jax.random.split(key)
    rng = host_rng(k_pool)
    x, y = make(rng, num_samples, 1, train_length)
    n_val = max(1, round(val_fraction * num_samples))
    val, train = slice(0, n_val), slice(n_val, None if max_train is None else n_val + max_train)
    test = make(host_rng(k_test), num_test, train_length + 1, test_length)
    return [(x[train], y[train]), (x[val], y[val]), test]


PARITY_PAD = 2  # parity's padding token (the bits are 0 and 1)


def load_parity(
    key: jax.Array,
    *,
    train_length: int = 12,
    test_length: int = 24,
    num_samples: int = 3000,
    num_test: int = 1000,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    """Parity of a bit string, with a length split (train short, test long).

    x (n, test_length) = the bits (tokens 0 and 1) then the padding token 2; y (n,) = the
    number of ones mod 2. Train and validation strings have lengths uniform in
    [1, train_length], test strings in [train_length + 1, test_length]: the test split
    measures length generalisation. vocab 3, num_classes 2, no groups (strata: the label).
    Short strings recur (there are only 2^L of length L), so validation may repeat training
    strings; test strings are longer than every training string.

    Args:
        key: draws the strings.
        train_length: longest train/validation string, >= 1.
        test_length: longest test string and the context T, in (train_length, 4096].
        num_samples: strings in train and validation together, at least 2.
        num_test: test strings.
        val_fraction: share of num_samples moved to validation.
        max_train: cap on the number of training strings.
    """
    _check_parity(
        train_length=train_length,
        test_length=test_length,
        num_samples=num_samples,
        num_test=num_test,
        val_fraction=val_fraction,
        max_train=max_train,
    )

    width = int(test_length)

    def make(rng, n, low, high):
        _, inside = _lengths(rng, n, low, high)
        bits = rng.integers(0, 2, size=(n, high)) * inside
        x = np.full((n, width), PARITY_PAD, np.int64)
        x[:, :high] = np.where(inside, bits, PARITY_PAD)
        return x, bits.sum(axis=1) % 2

    splits = _length_split(
        key,
        make,
        int(train_length),
        int(test_length),
        int(num_samples),
        int(num_test),
        val_fraction,
        max_train,
    )
    return _token_dataset("parity", splits, 2, PARITY_PAD + 1)


def _transduce(task: str, symbols: int, test_length: int) -> Callable:
    """make(rng, n, low, high) for "reverse" or "sort" over ``symbols`` symbols."""
    pad, sep, width = symbols, symbols + 1, 2 * test_length + 1

    def make(rng, n, low, high):
        lengths, inside = _lengths(rng, n, low, high)
        strings = rng.integers(0, symbols, size=(n, high))
        if task == "reverse":
            # output k (0-based) is s[L - 1 - k]: index the string backwards from its end
            back = np.clip(lengths[:, None] - 1 - np.arange(high), 0, high - 1)
            answer = np.take_along_axis(strings, back, axis=1)
        else:
            answer = np.sort(np.where(inside, strings, symbols), axis=1)  # pads sort last
        x = np.full((n, width), pad, np.int64)
        x[:, :high] = np.where(inside, strings, pad)
        rows = np.arange(n)
        x[rows, lengths] = sep
        # answer k at position L + 1 + k, right after the separator (the last at 2L < width);
        # the slots past each string's end write to a spare column, dropped at the end
        y = np.full((n, width + 1), IGNORE, np.int64)
        columns = np.where(inside, lengths[:, None] + 1 + np.arange(high), width)
        y[rows[:, None], columns] = answer
        return x, y[:, :width]

    return make


def _load_transduction(
    task: str,
    key: jax.Array,
    symbols,
    train_length,
    test_length,
    num_samples,
    num_test,
    val_fraction,
    max_train,
) -> Dataset:
    _check_transduction(
        task,
        symbols=symbols,
        train_length=train_length,
        test_length=test_length,
        num_samples=num_samples,
        num_test=num_test,
        val_fraction=val_fraction,
        max_train=max_train,
    )
    symbols, test_length = int(symbols), int(test_length)
    make = _transduce(task, symbols, test_length)
    splits = _length_split(
        key,
        make,
        int(train_length),
        test_length,
        int(num_samples),
        int(num_test),
        val_fraction,
        max_train,
    )
    return _token_dataset(task, splits, symbols, symbols + 2)


_TRANSDUCTION_DOC = """{title}, with a length split (train short, test long).

    A row of string s (length L) is x = [s_1 .. s_L, SEP, PAD ...] of width
    T = 2 * test_length + 1, with symbols 0..S-1, PAD = S and SEP = S + 1; the model emits
    the answer {answer} at the L positions right after SEP: y[L + 1 + k] = answer_k for
    k < L and y = -1 (ignored: the loss and accuracy skip y < 0) everywhere else. The
    answer is never among the inputs, so the task is the same for causal and bidirectional
    models. Train and validation strings have lengths uniform in [1, train_length], test
    strings in [train_length + 1, test_length]. vocab S + 2, num_classes S, no groups.

    Args:
        key: draws the strings.
        symbols: alphabet size S, in [2, 256].
        train_length: longest train/validation string, >= 1.
        test_length: longest test string, in (train_length, 2047].
        num_samples: strings in train and validation together, at least 2.
        num_test: test strings.
        val_fraction: share of num_samples moved to validation.
        max_train: cap on the number of training strings.
    """


def load_reverse(
    key: jax.Array,
    *,
    symbols: int = 8,
    train_length: int = 8,
    test_length: int = 16,
    num_samples: int = 3000,
    num_test: int = 1000,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    return _load_transduction(
        "reverse",
        key,
        symbols,
        train_length,
        test_length,
        num_samples,
        num_test,
        val_fraction,
        max_train,
    )


def load_sort(
    key: jax.Array,
    *,
    symbols: int = 8,
    train_length: int = 8,
    test_length: int = 16,
    num_samples: int = 3000,
    num_test: int = 1000,
    val_fraction: float = 0.15,
    max_train: int | None = None,
) -> Dataset:
    return _load_transduction(
        "sort",
        key,
        symbols,
        train_length,
        test_length,
        num_samples,
        num_test,
        val_fraction,
        max_train,
    )


load_reverse.__doc__ = _TRANSDUCTION_DOC.format(
    title="Reverse a string", answer="s_L .. s_1 (the string reversed)"
)
load_sort.__doc__ = _TRANSDUCTION_DOC.format(
    title="Sort a string", answer="sorted(s) (ascending, repeats kept)"
)


def _check_lengths(where, train_length, test_length, most, num_samples, num_test, width):
    train_length = check_int(where, "train_length", train_length)
    require(
        is_int(test_length) and train_length < test_length <= most,
        where,
        "test_length",
        f"an integer in [{train_length + 1}, {most}] (above train_length)",
        test_length,
    )
    num_samples = check_int(where, "num_samples", num_samples, low=2)
    num_test = check_int(where, "num_test", num_test)
    _check_values(
        where, num_samples + num_test, width(int(test_length)), "options num_samples + num_test"
    )


def _check_parity(
    *,
    train_length=12,
    test_length=24,
    num_samples=3000,
    num_test=1000,
    val_fraction=0.15,
    max_train=None,
) -> None:
    where = "dataset 'parity'"
    _check_lengths(where, train_length, test_length, MAX_LENGTH, num_samples, num_test, lambda t: t)
    _check_common(where, val_fraction, max_train)
    _check_pool(where, int(num_samples), val_fraction)


def _check_pool(where: str, n: int, val_fraction: float) -> None:
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ParamarketError(
            f"{where}: num_samples={n} with val_fraction={val_fraction} leaves no training rows"
        )


def _check_transduction(
    task: str,
    *,
    symbols=8,
    train_length=8,
    test_length=16,
    num_samples=3000,
    num_test=1000,
    val_fraction=0.15,
    max_train=None,
) -> None:
    where = f"dataset {task!r}"
    require(
        is_int(symbols) and 2 <= symbols <= 256,
        where,
        "symbols",
        "an integer in [2, 256]",
        symbols,
    )
    most = (MAX_LENGTH - 1) // 2
    _check_lengths(
        where, train_length, test_length, most, num_samples, num_test, lambda t: 2 * t + 1
    )
    _check_common(where, val_fraction, max_train)
    _check_pool(where, int(num_samples), val_fraction)


# ---- pydoc_text: CPython's pydoc topics as a character-level corpus ----

PYDOC_SHA256 = "37d06970fc926e60c16dff401e441b84752446a36b6b64516c229fdec77e992c"  # 3.11.7
# sha256 of the joined text -> the CPython whose pydoc_data gave it (each release differs)
PYDOC_KNOWN = {
    PYDOC_SHA256: "3.11.7",
    "99a450153460f7ba94c2a054055c37377ac86ee3cb865e22fb016f086ae8bbe8": "3.10.13",
    "cec54c2700dcedd6196a9a5ea13103824975d5029b93f7e09c805e9ae1838772": "3.11.2",
    "64a4b3fd3c33d73d0d6368b5fba69d5086fa75e6f73f091235eab317fe823719": "3.12.1",
    "a68b7f5ba5e4f20a336cdc120f82b2921abdbdf57087aa6603ec52f342ce5a1c": "3.13.0",
}


def pydoc_text() -> str:
    """The values of ``pydoc_data.topics.topics`` (CPython's help() texts, about half a
    million characters of English with code) joined in sorted key order."""
    from pydoc_data import topics

    return "".join(topics.topics[name] for name in sorted(topics.topics))


def pydoc_sha256(text: str | None = None) -> str:
    """sha256 hex digest of the UTF-8 text (default: this Python's :func:`pydoc_text`)."""
    return hashlib.sha256((pydoc_text() if text is None else text).encode("utf-8")).hexdigest()


def _pinned_text(pin: bool) -> str:
    """This Python's pydoc text, refused unless it is one of PYDOC_KNOWN when ``pin``."""
    text = pydoc_text()
    digest = pydoc_sha256(text)
    if pin and digest not in PYDOC_KNOWN:
        known = ", ".join(f"{h[:12]} (Python {v})" for h, v in PYDOC_KNOWN.items())
        raise ParamarketError(
            f"dataset 'pydoc_text': this Python installation's pydoc_data text (sha256 "
            f"{digest[:12]}) differs from the pinned texts {known}; set option pin = false "
            f"to use it unpinned"
        )
    return text


def load_pydoc_text(
    key: jax.Array,
    *,
    length: int = 64,
    stride: int | None = None,
    blocks: int = 20,
    test_fraction: float = 0.1,
    val_fraction: float = 0.15,
    max_train: int | None = None,
    pin: bool = True,
) -> Dataset:
    """Character-level English from CPython's pydoc topics (:func:`pydoc_text`), zero install.

    The text is cut into ``blocks`` contiguous blocks of equal length (the remainder, under
    one block, is dropped), dealt at random to test (test_fraction of them), validation
    (val_fraction of the rest) and train; every window lies inside one block, so no test or
    validation character is in a training window. Each block gives the windows starting at
    a random offset in [0, stride) and every ``stride`` characters after it. x (n, length)
    is a window, y (n, length) the next characters (y[:, t] = x[:, t + 1]). Tokens are the
    text's distinct characters in sorted order: vocab = num_classes = that number (103 for
    the pinned Python 3.11.7 text). No groups (strata: none).

    With ``pin`` the text must be one of the recorded ones (:data:`PYDOC_KNOWN`, one per
    CPython release seen; they differ), so a run's corpus is known by its Python version.

    Args:
        key: deals the blocks and draws the offsets.
        length: context T, in [1, 4096].
        stride: characters between window starts, >= 1; default ``length`` (windows do not
            overlap).
        blocks: contiguous blocks, at least 3.
        test_fraction: share of the blocks held out for test, in (0, 1).
        val_fraction: share of the remaining blocks moved to validation.
        max_train: cap on the number of training windows.
        pin: refuse a text whose sha256 is not in PYDOC_KNOWN.
    """
    text, block_length, sizes = _check_pydoc_text(
        length=length,
        stride=stride,
        blocks=blocks,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        max_train=max_train,
        pin=pin,
    )
    length, blocks = int(length), int(blocks)
    stride = length if stride is None else int(stride)
    alphabet = np.array([ord(c) for c in sorted(set(text))], np.uint32)
    ids = np.searchsorted(alphabet, np.frombuffer(text.encode("utf-32-le"), np.uint32))
    rng = host_rng(key)
    order = rng.permutation(blocks)
    n_train, n_val, _ = sizes
    dealt = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    splits = []
    for split, chosen in enumerate(dealt):
        windows = []
        for b in np.sort(chosen):
            offset = int(rng.integers(stride))
            windows.append(np.arange(offset, block_length - length, stride) + b * block_length)
        starts = np.concatenate(windows)
        starts = starts[rng.permutation(len(starts))]
        if split == 0:
            starts = _capped(starts, max_train)
        span = ids[starts[:, None] + np.arange(length + 1)]
        splits.append((span[:, :-1], span[:, 1:]))
    return _token_dataset("pydoc_text", splits, len(alphabet), len(alphabet))


def _check_pydoc_text(
    *,
    length=64,
    stride=None,
    blocks=20,
    test_fraction=0.1,
    val_fraction=0.15,
    max_train=None,
    pin=True,
) -> tuple[str, int, tuple[int, int, int]]:
    """Check the pydoc_text options (and the pin); return the text, the block length and
    the (train, val, test) block counts."""
    where = "dataset 'pydoc_text'"
    require(
        is_int(length) and 1 <= length <= MAX_LENGTH,
        where,
        "length",
        f"an integer in [1, {MAX_LENGTH}]",
        length,
    )
    if stride is not None:
        check_int(where, "stride", stride)
    blocks = check_int(where, "blocks", blocks, low=3)
    test_fraction = _fraction(where, "test_fraction", test_fraction)
    _check_common(where, val_fraction, max_train)
    require(isinstance(pin, bool), where, "pin", "true or false", pin)
    text = _pinned_text(pin)
    length = int(length)
    stride = length if stride is None else int(stride)
    block_length = len(text) // blocks
    if block_length < length + stride:
        raise ParamarketError(
            f"{where}: options length + stride must be at most the block length "
            f"{len(text)} // blocks = {block_length} (one window in every block), got "
            f"{length} + {stride}"
        )
    windows = len(text) // stride + blocks
    _check_values(where, windows, length + 1, "options length and stride")
    return text, block_length, _three_way(where, blocks, test_fraction, val_fraction, "blocks")


def _pydoc_classes(*, pin=True, **_) -> int:
    return len(set(_pinned_text(pin)))


# ---- registries (merged into datasets.DATASETS, OPTION_CHECKS and dataset_num_classes) ----

LOADERS: dict[str, Callable[..., Dataset]] = {
    "arithmetic": load_arithmetic,
    "markov": load_markov,
    "parity": load_parity,
    "reverse": load_reverse,
    "sort": load_sort,
    "pydoc_text": load_pydoc_text,
}

OPTION_CHECKS: dict[str, Callable[..., object]] = {
    "arithmetic": _check_arithmetic,
    "markov": _check_markov,
    "parity": _check_parity,
    "reverse": lambda **options: _check_transduction("reverse", **options),
    "sort": lambda **options: _check_transduction("sort", **options),
    "pydoc_text": _check_pydoc_text,
}

# K (the output vocabulary) and the number of strata of each dataset, from its options
NUM_CLASSES: dict[str, Callable[..., int]] = {
    "arithmetic": lambda *, modulus=DEFAULT_MODULUS, **_: int(modulus),
    "markov": lambda *, vocab=DEFAULT_VOCAB, **_: int(vocab),
    "parity": lambda **_: 2,
    "reverse": lambda *, symbols=8, **_: int(symbols),
    "sort": lambda *, symbols=8, **_: int(symbols),
    "pydoc_text": _pydoc_classes,
}
NUM_STRATA: dict[str, Callable[..., int]] = {
    "arithmetic": lambda *, operations=DEFAULT_OPERATIONS, **_: len(operations),
    "markov": lambda *, num_chains=DEFAULT_CHAINS, **_: int(num_chains),
    "parity": lambda **_: 2,
    "reverse": lambda **_: 1,
    "sort": lambda **_: 1,
    "pydoc_text": lambda **_: 1,
}
