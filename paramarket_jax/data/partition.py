"""Split a dataset's train set among agents (IID, Dirichlet, class scarcity, label shards,
groups).

Partitioners see the rows' strata (:meth:`~paramarket_jax.data.Dataset.strata`): the class
labels of every feature and image dataset, the groups of a sequence dataset that has them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from paramarket_jax.data.base import (
    Dataset,
    _unknown_options,
    check_int,
    host_rng,
    is_real,
    require,
    with_option_check,
)
from paramarket_jax.errors import ParamarketError, unknown

DIRICHLET_TRIES = 1000
MAX_WEIGHT = 1e30  # relative shard sizes: larger ones overflow their sum
DEFAULT_EVAL_SIZE = 256


class Partition(NamedTuple):
    """Each agent's training shard and its own validation and test subsets.

    Shards are slices of one index array grouped by owner, so memory grows as the rows
    owned plus N, never as N x rows.

    Attributes:
        train_rows: (R,) int32 indices into Dataset.x_train, every shard one after another
            (R = total shard size; shards may overlap, so R can exceed the training set).
        train_start: (N,) int32, agent i's shard is ``train_rows[start[i]:start[i] + size[i]]``.
        train_size: (N,) int32 >= 1, shard lengths.
        val_idx: (N, m_val) int32 indices into Dataset.x_val, stratified by the agent's
            train stratum histogram (classes, or groups where the dataset has them).
        test_idx: (N, m_test) int32 indices into Dataset.x_test, stratified the same way.
    """

    train_rows: np.ndarray
    train_start: np.ndarray
    train_size: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray

    def shard(self, i: int) -> np.ndarray:
        """Agent i's training rows (indices into Dataset.x_train)."""
        start = int(self.train_start[i])
        return self.train_rows[start : start + int(self.train_size[i])]


# ---- helpers ----


def _class_order(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(n,) indices grouped by ascending label, in uniformly random order within each class."""
    shuffled = rng.permutation(len(labels))
    return shuffled[np.argsort(labels[shuffled], kind="stable")]


def _class_rank(rng: np.random.Generator, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(n,) position of each example in a random order of its own class (0 = first)."""
    order = _class_order(rng, labels)
    sizes = np.bincount(labels, minlength=num_classes)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def _group(owner: np.ndarray, n_agents: int) -> list[np.ndarray]:
    """Shards from an (n,) array naming each example's agent; each shard sorted."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=n_agents))[:-1])


def _check_agents(
    where: str, n_agents: int, n_examples: int, option: str | None = None, per_agent: int = 1
) -> None:
    """Raise ParamarketError unless n_agents >= 1 agents can each hold ``per_agent`` of the
    n_examples training examples (``per_agent`` is the value of ``option``, if given)."""
    check_int(where, "n_agents", n_agents)
    if n_agents * per_agent <= n_examples:
        return
    if option is None:
        raise ParamarketError(
            f"{where}: 'n_agents' (agents.n) must be in [1, {n_examples}] (at most one agent "
            f"per training example), got {n_agents}"
        )
    fixes = []
    if n_examples // per_agent >= 1:
        fixes.append(f"agents.n in [1, {n_examples // per_agent}] for {option} = {per_agent}")
    if n_examples // n_agents >= 1:
        fixes.append(f"{option} in [1, {n_examples // n_agents}] for agents.n = {n_agents}")
    raise ParamarketError(
        f"{where}: 'n_agents' (agents.n) x option {option!r} must be at most the {n_examples} "
        f"training examples ({' or '.join(fixes) or 'too few examples'}), got "
        f"{n_agents} x {per_agent}"
    )


# ---- partitioners: (key, labels (n,), n_agents, num_classes, **options) -> N index arrays ----


def iid(
    key: jax.Array,
    labels: np.ndarray,
    n_agents: int,
    num_classes: int,
    *,
    weights: list[float] | None = None,
) -> list[np.ndarray]:
    """Random split with the same class mix everywhere.

    Args:
        weights: optional relative shard sizes, one positive number per agent (for example
            ``[8, 1, 1, 1, 1]``: one data-rich agent); default equal sizes (differing by at
            most one).
    """
    _check_iid(n_agents, weights=weights)
    _check_agents("partitioner 'iid'", n_agents, len(labels))
    order = host_rng(key).permutation(len(labels))
    if weights is None:
        return [np.sort(shard) for shard in np.array_split(order, n_agents)]
    counts = np.maximum(largest_remainder(np.asarray(weights, float), len(labels)), 1)
    cuts = np.minimum(np.cumsum(counts)[:-1], len(labels) - 1)
    return [np.sort(shard) for shard in np.split(order, cuts)]


def _dirichlet_owner(
    key: jax.Array, labels: np.ndarray, n_agents: int, num_classes: int, alpha: float
) -> np.ndarray:
    """(n,) agent of each example: class c is cut among agents by p_c ~ Dir(alpha * 1_N)."""
    rng = host_rng(key)
    shares = rng.dirichlet(np.full(n_agents, alpha), num_classes)  # (K, N)
    cuts = np.cumsum(shares, axis=1)[:, :-1]
    rank = _class_rank(rng, labels, num_classes)
    sizes = np.bincount(labels, minlength=num_classes)
    owner = np.empty(len(labels), dtype=np.int64)
    for c in range(num_classes):
        members = labels == c
        bounds = (cuts[c] * sizes[c]).astype(np.int64)
        owner[members] = np.searchsorted(bounds, rank[members], side="right")
    return owner


def dirichlet(
    key: jax.Array,
    labels: np.ndarray,
    n_agents: int,
    num_classes: int,
    *,
    alpha: float = 0.5,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): each class divided by Dirichlet(alpha) shares.

    Redraws with keys folded from `key` until every agent holds at least `min_size`
    examples, giving up after DIRICHLET_TRIES draws.

    Args:
        key: randomness.
        labels: (n,) int train labels.
        n_agents: N.
        num_classes: K.
        alpha: concentration, > 0; small alpha gives few classes per agent.
        min_size: smallest allowed shard, >= 1.
    """
    where = "partitioner 'dirichlet'"
    _check_dirichlet(n_agents, alpha=alpha, min_size=min_size)
    min_size = int(min_size)
    _check_agents(where, n_agents, len(labels), "min_size", min_size)
    for attempt in range(DIRICHLET_TRIES):
        owner = _dirichlet_owner(
            jax.random.fold_in(key, attempt), labels, n_agents, num_classes, float(alpha)
        )
        if np.bincount(owner, minlength=n_agents).min() >= min_size:
            return _group(owner, n_agents)
    raise ParamarketError(
        f"{where}: no draw in {DIRICHLET_TRIES} gave every one of {n_agents} agents "
        f"min_size={min_size} examples with alpha={alpha}; raise 'alpha' or lower 'min_size'"
    )


def class_split(
    key: jax.Array, labels: np.ndarray, n_agents: int, num_classes: int, *, d: float = 0.1
) -> list[np.ndarray]:
    """Complementary class scarcity, the paper's split generalised to N agents.

    Classes are cut into N contiguous blocks; agent i keeps every example of its block and
    an independent random fraction d (round(d * count), at least 1) of every other class.
    Shards overlap across agents.

    Args:
        key: randomness.
        labels: (n,) int train labels.
        n_agents: N <= K.
        num_classes: K.
        d: kept fraction of the other classes, in (0, 1].
    """
    _check_class_split(n_agents, d=d)
    _check_class_blocks(n_agents, num_classes)
    sizes = np.bincount(labels, minlength=num_classes)
    keep = np.where(sizes > 0, np.maximum(1, np.round(d * sizes)), 0)
    blocks = np.array_split(np.arange(num_classes), n_agents)
    shards = []
    for i, block in enumerate(blocks):
        rank = _class_rank(host_rng(jax.random.fold_in(key, i)), labels, num_classes)
        shards.append(np.flatnonzero(np.isin(labels, block) | (rank < keep[labels])))
    return shards


def shards(
    key: jax.Array,
    labels: np.ndarray,
    n_agents: int,
    num_classes: int,
    *,
    shards_per_agent: int = 2,
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): label-sorted shards dealt at random.

    Args:
        key: randomness.
        labels: (n,) int train labels.
        n_agents: N.
        num_classes: K.
        shards_per_agent: s; the label-sorted train set is cut into N * s near-equal shards.
    """
    where = "partitioner 'shards'"
    _check_shards(n_agents, shards_per_agent=shards_per_agent)
    per_agent = int(shards_per_agent)
    _check_agents(where, n_agents, len(labels), "shards_per_agent", per_agent)
    rng = host_rng(key)
    pieces = np.array_split(_class_order(rng, labels), n_agents * per_agent)
    deal = rng.permutation(n_agents * per_agent).reshape(n_agents, per_agent)
    return [np.sort(np.concatenate([pieces[j] for j in row])) for row in deal]


def by_group(
    key: jax.Array, labels: np.ndarray, n_agents: int, num_classes: int
) -> list[np.ndarray]:
    """Non-IID by group: each agent holds the rows of its own groups (strata).

    With G >= N groups agent i holds every row of the groups g with g % N == i; with G < N,
    agent i holds group i % G, and the agents sharing a group split its rows evenly (sizes
    differ by at most one) at random. On a dataset without groups the strata are its
    classes, so agents hold disjoint sets of classes.

    Args:
        key: randomness (only used when G < N).
        labels: (n,) int train strata (group ids).
        n_agents: N.
        num_classes: G, the number of strata.
    """
    check_int("partitioner 'groups'", "n_agents", n_agents)
    labels = np.asarray(labels)
    if num_classes >= n_agents:
        return _group(labels % n_agents, n_agents)
    rank = _class_rank(host_rng(key), labels, num_classes)
    sizes = np.bincount(labels, minlength=num_classes)
    sharers = np.array([len(range(g, n_agents, num_classes)) for g in range(num_classes)])
    turn = rank * sharers[labels] // np.maximum(sizes[labels], 1)
    return _group(labels + num_classes * turn, n_agents)


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    name: with_option_check("partitioner", name, fn)
    for name, fn in {
        "iid": iid,
        "dirichlet": dirichlet,
        "class_split": class_split,
        "shards": shards,
        "groups": by_group,
    }.items()
}


# ---- option checks without data (a scenario's split options are checked when it loads) ----


def _check_iid(n_agents: int, *, weights=None) -> None:
    where = "partitioner 'iid'"
    check_int(where, "n_agents", n_agents)
    if weights is None:
        return
    ok = (
        isinstance(weights, list | tuple)
        and len(weights) == n_agents
        and all(is_real(w) and 0 < w <= MAX_WEIGHT for w in weights)
    )
    require(
        ok,
        where,
        "weights",
        f"a list of agents.n = {n_agents} positive numbers (at most {MAX_WEIGHT:g})",
        weights,
    )


def _check_dirichlet(n_agents: int, *, alpha=0.5, min_size=2) -> None:
    where = "partitioner 'dirichlet'"
    check_int(where, "n_agents", n_agents)
    require(is_real(alpha) and alpha > 0, where, "alpha", "a number > 0", alpha)
    check_int(where, "min_size", min_size)


def _check_class_split(n_agents: int, *, d=0.1) -> None:
    where = "partitioner 'class_split'"
    check_int(where, "n_agents", n_agents)
    require(is_real(d) and 0 < d <= 1, where, "d", "a number in (0, 1]", d)


def _check_shards(n_agents: int, *, shards_per_agent=2) -> None:
    where = "partitioner 'shards'"
    check_int(where, "n_agents", n_agents)
    check_int(where, "shards_per_agent", shards_per_agent)


def _check_groups(n_agents: int) -> None:
    check_int("partitioner 'groups'", "n_agents", n_agents)


OPTION_CHECKS: dict[str, Callable[..., None]] = {
    "iid": _check_iid,
    "dirichlet": _check_dirichlet,
    "class_split": _check_class_split,
    "shards": _check_shards,
    "groups": _check_groups,
}


def check_partition_options(
    name: str, n_agents: int, num_classes: int | None = None, **options
) -> None:
    """Check a partitioner's name and option values for ``n_agents`` agents without data
    (what needs the examples, such as enough of them per agent, is checked when splitting).

    Args:
        name: a key of PARTITIONERS.
        n_agents: N.
        num_classes: the dataset's number of strata if known (``class_split`` needs N <= K;
            :func:`~paramarket_jax.data.datasets.dataset_num_strata`, K for every feature
            and image dataset).
        **options: the partitioner's keyword options.

    Raises:
        ParamarketError: unknown name or option, or a bad option value.
    """
    if name not in PARTITIONERS:
        raise unknown("partitioner", name, PARTITIONERS)
    _unknown_options("partitioner", name, PARTITIONERS[name], options)
    OPTION_CHECKS[name](n_agents, **options)
    if name == "class_split" and num_classes is not None:
        _check_class_blocks(n_agents, num_classes)


def _check_class_blocks(n_agents: int, num_classes: int) -> None:
    if n_agents > num_classes:
        raise ParamarketError(
            f"partitioner 'class_split': 'n_agents' (agents.n) must be in [1, {num_classes}] "
            f"(one class block per agent: at most the dataset's {num_classes} classes), "
            f"got {n_agents}"
        )


# ---- evaluation subsets ----


def largest_remainder(weights: np.ndarray, m: int) -> np.ndarray:
    """Integer counts proportional to weights that sum to exactly m (Hamilton's method).

    Args:
        weights: (K,) non-negative, positive sum.
        m: total.

    Returns:
        (K,) int64 counts; zero where weights are zero.
    """
    quota = m * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    remainder = np.where(weights > 0, quota - counts, -1.0)
    counts[np.argsort(-remainder, kind="stable")[: m - counts.sum()]] += 1
    return counts


def _stratified_draw(key: jax.Array, counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """counts[c] indices of examples of class c: without replacement when the class has
    enough examples, with replacement otherwise.

    Args:
        key: randomness.
        counts: (K,) int, zero for classes absent from labels.
        labels: (n,) int labels of the split drawn from.

    Returns:
        (counts.sum(),) int indices into labels, grouped by class.
    """
    rng = host_rng(key)
    order = _class_order(rng, labels)
    sizes = np.bincount(labels, minlength=len(counts))
    starts = np.cumsum(sizes) - sizes
    picks = []
    for c in np.flatnonzero(counts):
        k = counts[c]
        slots = np.arange(k) if k <= sizes[c] else rng.integers(sizes[c], size=k)
        picks.append(order[starts[c] + slots])
    return np.concatenate(picks)


def eval_subsets(key: jax.Array, histograms: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Per-agent evaluation indices following each agent's train class histogram.

    Classes an agent has no train data for get no examples; if none of an agent's classes
    occurs in the split, the agent falls back to the split's own class distribution.

    Args:
        key: randomness; agent i uses fold_in(key, i).
        histograms: (N, K) int train class counts per agent.
        labels: (n,) int labels of the validation or test split.
        m: examples per agent, 1 <= m.

    Returns:
        (N, m) int32 indices into the split.
    """
    available = np.bincount(labels, minlength=histograms.shape[1])
    rows = []
    for i, histogram in enumerate(histograms):
        weights = histogram * (available > 0)
        counts = largest_remainder(weights if weights.sum() > 0 else available, m)
        rows.append(_stratified_draw(jax.random.fold_in(key, i), counts, labels))
    return np.stack(rows).astype(np.int32)


def _concat(shards: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R,) int32 rows grouped by owner, (N,) int32 starts and (N,) int32 sizes."""
    sizes = np.array([len(shard) for shard in shards], dtype=np.int32)
    starts = (np.cumsum(sizes) - sizes).astype(np.int32)
    return np.concatenate(shards).astype(np.int32), starts, sizes


EVAL_MIXES = ("shard", "global")


def partition(
    name: str,
    key: jax.Array,
    dataset: Dataset,
    n_agents: int,
    *,
    eval_size: int | None = None,
    eval_mix: str = "shard",
    **options,
) -> Partition:
    """Give each of n_agents a train shard and matching validation and test subsets.

    Partitioners split the training rows by their strata (:meth:`Dataset.strata`: the
    classes, or the groups where the dataset has them; one stratum for per-position targets
    without groups), and the evaluation subsets follow the strata's histograms.

    Args:
        name: a key of PARTITIONERS.
        key: jax.random key; the same key gives an identical partition.
        dataset: the Dataset to split.
        n_agents: N >= 1.
        eval_size: validation/test examples per agent; default 256, capped at the split size.
        eval_mix: stratum (class or group) mix of each agent's validation and test rows:
            ``"shard"`` follows the agent's own train histogram (its customers look like its
            data); ``"global"`` follows the whole training set's mix (every agent serves the
            whole task and only its training data is scarce, as in the paper's experiments).
        **options: the partitioner's keyword options.

    Returns:
        The Partition.

    Raises:
        ParamarketError: unknown name or option, bad option value, or an empty shard.
    """
    if name not in PARTITIONERS:
        raise unknown("partitioner", name, PARTITIONERS)
    check_int(f"partitioner {name!r}", "n_agents", n_agents)
    if eval_size is not None:
        check_int(f"partitioner {name!r}", "eval_size", eval_size)
    if eval_mix not in EVAL_MIXES:
        raise ParamarketError(f"eval_mix must be one of {', '.join(EVAL_MIXES)}, got {eval_mix!r}")
    k_train, k_val, k_test = jax.random.split(key, 3)
    labels, k = dataset.strata("train"), dataset.num_strata
    pieces = PARTITIONERS[name](k_train, labels, n_agents, k, **options)
    empty = [i for i, piece in enumerate(pieces) if len(piece) == 0]
    if empty:
        raise ParamarketError(f"partitioner {name!r}: agents {empty} got no training examples")
    if eval_mix == "global":
        histograms = np.tile(np.bincount(labels, minlength=k), (n_agents, 1))
    else:
        histograms = np.stack([np.bincount(labels[p], minlength=k) for p in pieces])
    size = eval_size or DEFAULT_EVAL_SIZE
    val, test = dataset.strata("val"), dataset.strata("test")
    return Partition(
        *_concat(pieces),
        eval_subsets(k_val, histograms, val, min(size, len(val))),
        eval_subsets(k_test, histograms, test, min(size, len(test))),
    )


# ---- label noise (a data-quality problem of some agents' own training rows) ----


def wrong_labels(key: jax.Array, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(n,) int32: for every training row a label other than its own, uniform over the
    other K - 1 classes (what a noisy agent sees on the rows :func:`add_label_noise` picks).

    Per-position targets (n, T) get a wrong token at every counted position of the row, each
    drawn on its own; ignored positions (target < 0) stay as they are.

    Drawn once per dataset (every seed shares the same feature arrays, so a row's wrong
    label is shared too; which rows get it is each seed's draw).
    """
    labels = np.asarray(labels)
    if num_classes < 2:
        return labels.astype(np.int32)
    shift = host_rng(key).integers(1, num_classes, size=labels.shape)
    wrong = (labels + shift) % num_classes
    return np.where(labels < 0, labels, wrong).astype(np.int32)


def add_label_noise(
    key: jax.Array, part: Partition, n_train: int, agents, noise: float
) -> Partition:
    """Give each agent in ``agents`` noisy labels on a fraction ``noise`` of its training rows.

    The labels live with the data, shared by every agent (shards may overlap), so a noisy row
    is a pointer to a second copy of the training set whose labels are wrong: agent i's
    chosen slots point to ``row + n_train`` (the caller appends the copy, with labels from
    :func:`wrong_labels`). Exactly ``round(noise * size_i)`` of agent i's slots are chosen,
    uniformly without replacement (agent i draws with ``fold_in(key, i)``). Every other
    agent's rows, and everyone's validation and test rows, are untouched.

    Args:
        key: randomness (the run seed's).
        part: the clean partition.
        n_train: rows in the training set (where the wrong-label copy starts).
        agents: indices of the noisy agents.
        noise: fraction in [0, 1] of each noisy agent's rows that get a wrong label.

    Returns:
        The Partition with the noisy agents' slots remapped.
    """
    if not 0 <= noise <= 1:
        raise ParamarketError(f"label noise must be in [0, 1], got {noise}")
    rows = np.array(part.train_rows, np.int64)
    for i in sorted(set(int(a) for a in agents)):
        start, size = int(part.train_start[i]), int(part.train_size[i])
        count = int(round(noise * size))
        picked = host_rng(jax.random.fold_in(key, i)).permutation(size)[:count]
        rows[start + picked] += n_train
    return part._replace(train_rows=rows.astype(np.int32))
