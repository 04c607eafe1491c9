"""Tests for paramarket_jax.data.sequences (token datasets) and their partitioning."""

import sys

import jax
import numpy as np
import pytest

from paramarket_jax.data import (
    DATASETS,
    PARTITIONERS,
    load_dataset,
    markov_entropy_rates,
    partition,
    wrong_labels,
)
from paramarket_jax.data import sequences as seq
from paramarket_jax.data.datasets import (
    check_dataset_options,
    dataset_num_classes,
    dataset_num_strata,
)
from paramarket_jax.data.partition import _concat, eval_subsets
from paramarket_jax.errors import ParamarketError

SMALL = {
    "arithmetic": {"modulus": 7, "operations": ["+", "/", "x^2+xy+y^2"]},
    "markov": {"num_chains": 3, "vocab": 5, "length": 8, "num_samples": 300},
    "parity": {"train_length": 5, "test_length": 9, "num_samples": 200, "num_test": 100},
    "reverse": {"symbols": 3, "train_length": 4, "test_length": 7, "num_samples": 200},
    "sort": {"symbols": 5, "train_length": 4, "test_length": 6, "num_test": 50},
    "pydoc_text": {"length": 16, "blocks": 10, "max_train": 500},
}
OPERATORS = {
    "+": lambda a, b, p: (a + b) % p,
    "-": lambda a, b, p: (a - b) % p,
    "*": lambda a, b, p: (a * b) % p,
    "/": lambda a, b, p: (a * pow(b, -1, p)) % p,
    "x^2+xy+y^2": lambda a, b, p: (a * a + a * b + b * b) % p,
}


def key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed)


def splits(data):
    return [(data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test)]


# ---- every generator ----


def test_every_sequence_dataset_is_registered_and_tested():
    assert set(SMALL) == set(seq.LOADERS) <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sequence_dataset_is_well_formed(name):
    options = SMALL[name]
    check_dataset_options(name, **options)
    data = load_dataset(name, key(0), **options)
    assert data.name == name and data.vocab >= data.num_classes >= 2
    assert dataset_num_classes(name, **options) == data.num_classes
    assert dataset_num_strata(name, **options) == data.num_strata
    for i, (x, y) in enumerate(splits(data)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.ndim == 2 and len(x) == len(y) > 0 and x.shape[1:] == data.input_shape
        assert y.shape in {(len(x),), x.shape}
        assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() < data.vocab
        counted = y[y >= 0]
        assert counted.size > 0 and counted.max() < data.num_classes
        assert np.all((y >= 0) | (y == seq.IGNORE))
        strata = data.strata(("train", "val", "test")[i])
        assert strata.shape == (len(x),) and 0 <= strata.min() <= strata.max() < data.num_strata
    if data.groups is not None:
        assert data.num_groups == data.num_strata >= 2
        assert [len(g) for g in data.groups] == [len(y) for _, y in splits(data)]
        assert all(g.dtype == np.int32 for g in data.groups)
        assert set(np.unique(data.groups[0])) == set(range(data.num_groups))

    again = load_dataset(name, key(0), **options)
    for a, b in zip(data, again, strict=True):
        if isinstance(a, tuple):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)
        else:
            np.testing.assert_array_equal(a, b)
    other = load_dataset(name, key(1), **options)
    assert other.input_shape == data.input_shape
    assert not np.array_equal(other.x_train, data.x_train)


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("arithmetic", {"modulus": 21}, "'modulus' must be a prime in [3, 257]"),
        ("arithmetic", {"modulus": 263}, "'modulus'"),
        ("arithmetic", {"operations": ["+", "^"]}, "'operations' must be a list of distinct"),
        ("arithmetic", {"operations": ["+", "+"]}, "'operations'"),
        ("arithmetic", {"operations": []}, "'operations'"),
        ("arithmetic", {"fraction": 1.0}, "'fraction' must be a number in (0, 1)"),
        ("arithmetic", {"modulus": 3, "fraction": 0.1}, "fraction=0.1"),
        ("markov", {"mix": 1.5}, "'mix' must be a number in [0, 1]"),
        ("markov", {"vocab": 1}, "'vocab'"),
        ("markov", {"concentration": 0}, "'concentration'"),
        ("markov", {"num_chains": 0}, "'num_chains'"),
        ("markov", {"length": 0}, "'length'"),
        ("markov", {"num_samples": 12, "num_chains": 4}, "every split needs at least 4"),
        ("markov", {"num_samples": 100_000, "length": 1000}, "num_samples x (length + 1)"),
        ("parity", {"train_length": 5, "test_length": 5}, "'test_length' must be an integer"),
        ("parity", {"train_length": 0}, "'train_length'"),
        ("parity", {"num_test": 0}, "'num_test'"),
        ("parity", {"num_samples": 2, "val_fraction": 0.9}, "leaves no training rows"),
        ("reverse", {"symbols": 1}, "'symbols' must be an integer in [2, 256]"),
        ("sort", {"test_length": 3000}, "'test_length'"),
        ("pydoc_text", {"pin": "yes"}, "'pin' must be true or false"),
        ("pydoc_text", {"length": 0}, "'length'"),
        ("pydoc_text", {"stride": 0}, "'stride'"),
        ("pydoc_text", {"blocks": 2}, "'blocks'"),
        ("pydoc_text", {"length": 4000, "blocks": 200}, "length + stride must be at most"),
        ("pydoc_text", {"test_fraction": 0}, "'test_fraction'"),
        ("markov", {"nodes": 3}, "unknown option 'nodes'"),
    ],
)
def test_bad_sequence_options(name, options, needle):
    for call in (
        lambda: check_dataset_options(name, **options),
        lambda: load_dataset(name, key(), **options),
    ):
        with pytest.raises(ParamarketError) as err:
            call()
        message = str(err.value)
        assert needle in message and "\n" not in message, message
        assert message.startswith(f"dataset {name!r}"), message


# ---- arithmetic ----


def test_arithmetic_answers_tokens_and_disjoint_splits():
    p, ops = 11, list(OPERATORS)
    data = load_dataset("arithmetic", key(3), modulus=p, operations=ops, fraction=0.4)
    assert (data.vocab, data.num_classes, data.num_groups) == (p + 6, p, 5)
    seen = []
    for (x, y), groups in zip(splits(data), data.groups, strict=True):
        rows = x.astype(int)
        assert np.all(rows[:, 3] == p + len(ops))  # "="
        np.testing.assert_array_equal(rows[:, 1] - p, groups)  # the operation token
        for (a, op, b, _), answer in zip(rows.tolist(), y.tolist(), strict=True):
            assert 0 <= a < p and 0 <= b < p
            assert answer == OPERATORS[ops[op - p]](a, b, p)
        seen.append({tuple(r) for r in rows[:, :3].tolist()})
        assert len(seen[-1]) == len(rows)  # no row twice within a split
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    table = {(a, p + k, b) for k, op in enumerate(ops) for a in range(p) for b in range(p)}
    assert seen[0] | seen[1] | seen[2] == {r for r in table if r[1] != p + 3 or r[2] != 0}
    # each operation's table is split on its own: about 40% of it in the pool
    pool = np.bincount(np.concatenate(data.groups[:2]), minlength=5)
    np.testing.assert_array_equal(pool, [round(0.4 * n) for n in (121, 121, 121, 110, 121)])


def test_arithmetic_max_train_and_defaults():
    data = load_dataset("arithmetic", key(), max_train=100)
    assert len(data.y_train) == 100 and data.input_shape == (4,)
    assert data.num_classes == 23 and data.vocab == 23 + len(seq.DEFAULT_OPERATIONS) + 1


# ---- markov ----


def test_markov_entropy_rate_matches_the_generated_transitions():
    options = {"num_chains": 2, "vocab": 6, "length": 24, "num_samples": 4000}
    data = load_dataset("markov", key(7), **options)
    exact = markov_entropy_rates(key(7), **options)
    assert exact.shape == (2,) and np.all((exact > 0) & (exact < np.log(6)))
    x = np.concatenate([data.x_train, data.x_val, data.x_test]).astype(int)
    y = np.concatenate([data.y_train, data.y_val, data.y_test])
    g = np.concatenate(data.groups)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for chain in range(2):
        xs, ys = x[g == chain], y[g == chain]
        counts = np.zeros((6, 6))
        np.add.at(counts, (xs.ravel(), ys.ravel()), 1)
        empirical = counts / counts.sum(axis=1, keepdims=True)
        nll = -np.log(empirical[xs, ys])  # plug-in estimate, one value per transition
        per_row = nll.mean(axis=1)  # rows are independent walks
        estimate, n = nll.mean(), nll.size
        standard_error = per_row.std() / np.sqrt(len(per_row))
        # the plug-in entropy is biased low by about (cells - states) / (2 n) (Miller-Madow);
        # five standard errors of the row means plus that bias fail only for a wrong rate
        tolerance = 5 * standard_error + 30 / (2 * n)
        assert abs(estimate - exact[chain]) < tolerance, (chain, estimate, exact, tolerance)
        assert tolerance < 0.05  # the check is sharp enough to tell the chains apart
    assert abs(exact[0] - exact[1]) > 0.05
    # the walks follow the chains' matrices and start in their stationary distributions
    chains = seq.markov_chains(key(7), **options)
    np.testing.assert_allclose(seq.entropy_rate(chains), exact)
    for chain in range(2):
        xs, ys = x[g == chain], y[g == chain]
        nll = -np.log(chains[chain][xs, ys])
        standard_error = nll.mean(axis=1).std() / np.sqrt(len(nll))
        assert abs(nll.mean() - exact[chain]) < 5 * standard_error
        first = np.bincount(xs[:, 0], minlength=6) / len(xs)
        pi = seq.stationary(chains[chain])
        assert np.abs(first - pi).max() < 5 * np.sqrt(pi * (1 - pi) / len(xs)).max()


def test_markov_mix_zero_gives_one_language():
    options = {"num_chains": 3, "vocab": 5, "mix": 0.0}
    rates = markov_entropy_rates(key(2), **options)
    assert np.all(rates == rates[0])
    matrices = seq.markov_transitions(key(2), 3, 5, 0.0, 0.5)
    assert np.array_equal(matrices[0], matrices[1]) and np.array_equal(matrices[0], matrices[2])
    mixed = seq.markov_transitions(key(2), 3, 5, 0.5, 0.5)
    assert not np.allclose(mixed[0], mixed[1])
    np.testing.assert_allclose(mixed.sum(axis=-1), 1.0)
    # rates depend on the chain options only, and follow the dataset's key
    assert np.array_equal(rates, markov_entropy_rates(key(2), **options, length=4))
    assert not np.array_equal(rates, markov_entropy_rates(key(3), **options))
    with pytest.raises(ParamarketError, match="unknown option 'bad'"):
        markov_entropy_rates(key(), bad=1)


def test_entropy_rate_of_known_chains():
    uniform = np.full((4, 4), 0.25)
    assert np.isclose(seq.entropy_rate(uniform), np.log(4))
    flip = np.array([[0.0, 1.0], [1.0, 0.0]])  # deterministic: zero entropy, pi = (1/2, 1/2)
    assert seq.entropy_rate(flip) == 0.0
    np.testing.assert_allclose(seq.stationary(flip), [0.5, 0.5])
    two = np.array([[0.9, 0.1], [0.5, 0.5]])  # pi = (5/6, 1/6)
    h = -(5 / 6) * (0.9 * np.log(0.9) + 0.1 * np.log(0.1)) - (1 / 6) * np.log(0.5)
    assert np.isclose(seq.entropy_rate(two), h)


# ---- algorithmic tasks ----


def _lengths_of(x: np.ndarray, stop: int) -> np.ndarray:
    """Index of the first ``stop`` token in every row (the string's length)."""
    return np.argmax(x == stop, axis=1)


def test_parity_targets_and_length_split():
    options = {"train_length": 6, "test_length": 11, "num_samples": 400, "num_test": 200}
    data = load_dataset("parity", key(4), **options)
    assert (data.vocab, data.num_classes, data.input_shape) == (3, 2, (11,))
    lengths = []
    for x, y in splits(data):
        x = x.astype(int)
        n = np.where((x == seq.PARITY_PAD).any(axis=1), _lengths_of(x, seq.PARITY_PAD), 11)
        inside = np.arange(11) < n[:, None]
        assert np.all((x < seq.PARITY_PAD) == inside)  # bits, then only padding
        np.testing.assert_array_equal(y, (x == 1).sum(axis=1) % 2)
        lengths.append(n)
    assert lengths[0].min() == 1 and lengths[0].max() == lengths[1].max() == 6
    assert lengths[2].min() == 7 and lengths[2].max() == 11
    assert set(np.unique(data.y_test)) == {0, 1}


@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_transduction_targets_and_length_split(task):
    s, train_length, test_length = 4, 5, 9
    options = {
        "symbols": s,
        "train_length": train_length,
        "test_length": test_length,
        "num_samples": 300,
        "num_test": 150,
    }
    data = load_dataset(task, key(5), **options)
    width = 2 * test_length + 1
    assert (data.vocab, data.num_classes, data.input_shape) == (s + 2, s, (width,))
    pad, sep = s, s + 1
    answer = (lambda v: v[::-1]) if task == "reverse" else sorted
    lengths = []
    for x, y in splits(data):
        x = x.astype(int)
        assert np.all((x == sep).sum(axis=1) == 1)
        n = _lengths_of(x, sep)
        for row, target, length in zip(x.tolist(), y.tolist(), n.tolist(), strict=True):
            string = row[:length]
            assert all(0 <= c < s for c in string) and set(row[length + 1 :]) == {pad}
            expected = [-1] * (length + 1) + list(answer(string))
            expected += [-1] * (width - len(expected))
            assert target == expected
        lengths.append(n)
    assert lengths[0].min() == 1 and max(lengths[0].max(), lengths[1].max()) == train_length
    assert lengths[2].min() == train_length + 1 and lengths[2].max() == test_length


# ---- pydoc_text ----


def test_pydoc_text_is_pinned_and_gives_next_characters():
    digest = seq.pydoc_sha256()
    if sys.version_info[:3] == (3, 11, 7):
        assert digest == seq.PYDOC_SHA256
    if digest in seq.PYDOC_KNOWN:  # elsewhere the pin refuses (see the next test)
        data = load_dataset("pydoc_text", key(), length=32, max_train=300)
        text = seq.pydoc_text()
        alphabet = sorted(set(text))
        assert data.num_classes == data.vocab == len(alphabet) == dataset_num_classes("pydoc_text")
        for x, y in splits(data):
            x = x.astype(int)
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
            for row, last in zip(x[:5].tolist(), y[:5, -1].tolist(), strict=True):
                assert "".join(alphabet[c] for c in row + [last]) in text
        assert len(data.y_train) == 300 and data.input_shape == (32,) and data.groups is None
        assert data.num_strata == 1 and not data.strata("test").any()


def test_pydoc_text_refuses_a_different_text(monkeypatch):
    from pydoc_data import topics

    real = seq.pydoc_sha256()
    tampered = dict(topics.topics, zzz_extra="A topic that is not in the pinned text.\n")
    monkeypatch.setattr(topics, "topics", tampered)
    digest = seq.pydoc_sha256()
    assert digest != real and digest not in seq.PYDOC_KNOWN
    for call in (
        lambda: load_dataset("pydoc_text", key()),
        lambda: check_dataset_options("pydoc_text"),
        lambda: dataset_num_classes("pydoc_text"),
    ):
        with pytest.raises(ParamarketError) as err:
            call()
        message = str(err.value)
        assert digest[:12] in message and seq.PYDOC_SHA256[:12] in message, message
        assert "pin = false" in message and "\n" not in message
    data = load_dataset("pydoc_text", key(), pin=False, length=16, max_train=50)
    assert len(data.y_train) == 50


def test_pydoc_text_splits_are_contiguous_blocks(monkeypatch):
    """A text of distinct characters makes every token id its position in the text."""
    from pydoc_data import topics

    n = 6000
    monkeypatch.setattr(topics, "topics", {"t": "".join(chr(0x100 + i) for i in range(n))})
    options = {"pin": False, "length": 20, "stride": 7, "blocks": 12}
    data = load_dataset("pydoc_text", key(9), **options)
    assert data.vocab == data.num_classes == n
    block = n // 12
    owned = []
    for x, y in splits(data):
        x, y = x.astype(int), y.astype(int)
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(20))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)
        assert np.all(x[:, 0] // block == y[:, -1] // block)  # inside one block
        owned.append(set(np.unique(x[:, 0] // block)))
    assert [len(b) for b in owned] == [9, 2, 1]  # test 10% of 12, val 15% of the other 11
    assert not (owned[0] & owned[1] or owned[0] & owned[2] or owned[1] & owned[2])
    other = load_dataset("pydoc_text", key(10), **options)
    assert not np.array_equal(other.x_test, data.x_test)


# ---- partitions ----


@pytest.fixture(scope="module")
def arithmetic():
    return load_dataset("arithmetic", key(1), modulus=13, operations=["+", "-", "*", "/"])


def test_groups_partitioner_gives_each_agent_its_groups(arithmetic):
    n_agents = 2
    part = partition("groups", key(), arithmetic, n_agents, eval_size=64)
    g_train, g_val, g_test = arithmetic.groups
    held = [part.shard(i) for i in range(n_agents)]
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(len(g_train)))
    for i in range(n_agents):
        assert set(np.unique(g_train[held[i]])) == {i, i + 2}
        assert set(np.unique(g_val[part.val_idx[i]])) == {i, i + 2}
        assert set(np.unique(g_test[part.test_idx[i]])) == {i, i + 2}
    mixed = partition("groups", key(), arithmetic, n_agents, eval_size=64, eval_mix="global")
    np.testing.assert_array_equal(mixed.train_rows, part.train_rows)
    assert set(np.unique(g_val[mixed.val_idx[0]])) == {0, 1, 2, 3}


def test_groups_partitioner_shares_groups_when_agents_outnumber_them():
    data = load_dataset("markov", key(), num_chains=2, vocab=4, length=4, num_samples=200)
    g = data.groups[0]
    part = partition("groups", key(3), data, 5, eval_size=16)
    for group, sharers in ((0, (0, 2, 4)), (1, (1, 3))):
        shards = [part.shard(i) for i in sharers]
        assert all(np.all(g[s] == group) for s in shards)
        assert all(np.all(data.groups[1][part.val_idx[i]] == group) for i in sharers)
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.flatnonzero(g == group))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    other = partition("groups", key(4), data, 5, eval_size=16)
    assert not np.array_equal(other.train_rows, part.train_rows)
    with pytest.raises(ParamarketError, match="agents .* got no training examples"):
        partition("groups", key(), data._replace(groups=(g * 0, *data.groups[1:])), 3)


def _label_partition(name, k, dataset, n_agents, eval_size, eval_mix, **options):
    """partition() as it was before strata: labels and classes straight from y."""
    k_train, k_val, k_test = jax.random.split(k, 3)
    labels, classes = dataset.y_train, dataset.num_classes
    pieces = PARTITIONERS[name](k_train, labels, n_agents, classes, **options)
    if eval_mix == "global":
        histograms = np.tile(np.bincount(labels, minlength=classes), (n_agents, 1))
    else:
        histograms = np.stack([np.bincount(labels[p], minlength=classes) for p in pieces])
    return (
        *_concat(pieces),
        eval_subsets(k_val, histograms, dataset.y_val, min(eval_size, len(dataset.y_val))),
        eval_subsets(k_test, histograms, dataset.y_test, min(eval_size, len(dataset.y_test))),
    )


@pytest.mark.parametrize("name", ["iid", "dirichlet", "class_split", "shards", "groups"])
@pytest.mark.parametrize("eval_mix", ["shard", "global"])
def test_label_datasets_partition_by_their_labels(name, eval_mix):
    data = load_dataset("gaussian", key(), n_train=400, n_test=100, dim=4, num_classes=6)
    assert data.groups is None and data.vocab == 0 and data.num_strata == 6
    np.testing.assert_array_equal(data.strata("val"), data.y_val)
    part = partition(name, key(8), data, 3, eval_size=50, eval_mix=eval_mix)
    reference = _label_partition(name, key(8), data, 3, 50, eval_mix)
    for a, b in zip(part, reference, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ParamarketError, match="split must be one of train, val, test"):
        data.strata("validation")


def test_per_position_targets_partition_as_one_stratum():
    data = load_dataset("reverse", key(), symbols=3, train_length=3, test_length=5)
    assert data.y_train.ndim == 2 and data.num_strata == 1
    part = partition("dirichlet", key(), data, 3, eval_size=40, alpha=1.0)
    assert part.val_idx.shape == part.test_idx.shape == (3, 40)
    assert np.sort(part.train_rows).tolist() == list(range(len(data.y_train)))


def test_wrong_labels_per_position_keeps_ignored_positions():
    labels = np.array([[0, -1, 2, 1], [-1, -1, 3, 0]], np.int32)
    wrong = wrong_labels(key(), labels, 4)
    assert wrong.shape == labels.shape and wrong.dtype == np.int32
    np.testing.assert_array_equal(wrong[labels < 0], labels[labels < 0])
    assert np.all(wrong[labels >= 0] != labels[labels >= 0])
    assert wrong[labels >= 0].min() >= 0 and wrong[labels >= 0].max() < 4
    flat = np.arange(50) % 5
    shift = np.random.default_rng(
        np.asarray(jax.random.key_data(key(1)), np.uint32).ravel()
    ).integers(1, 5, size=50)
    np.testing.assert_array_equal(wrong_labels(key(1), flat, 5), (flat + shift) % 5)
