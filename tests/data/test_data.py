"""Tests for paramarket_jax.data: dataset loaders, file readers and partitioners."""

import gzip
import pickle
import random
import struct

import jax
import numpy as np
import pytest

from paramarket_jax.data import DATASETS, PARTITIONERS, Dataset, load_dataset, partition
from paramarket_jax.data.files import read_cifar_batches, read_idx
from paramarket_jax.data.partition import eval_subsets, largest_remainder
from paramarket_jax.data.sequences import LOADERS  # tests/data/test_sequences.py
from paramarket_jax.errors import ParamarketError

IN_MEMORY = {
    "digits": {},
    "mnist1d": {"num_samples": 1000},
    "gaussian": {"n_train": 600, "n_test": 200, "dim": 16, "num_classes": 5},
}
FILE_BACKED = {"mnist", "fashion_mnist", "cifar10"}
DISJOINT = {"iid", "dirichlet", "shards", "groups"}  # class_split shards overlap by design
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", key(0))


# ---- in-memory datasets ----


def test_every_dataset_is_tested():
    assert set(IN_MEMORY) | FILE_BACKED | set(LOADERS) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(IN_MEMORY))
def test_in_memory_dataset(name):
    data = load_dataset(name, key(0), **IN_MEMORY[name])
    splits = [(data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test)]
    for x, y in splits:
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert len(x) == len(y) > 0
        assert x.shape[1:] == data.input_shape
        assert y.min() >= 0 and y.max() < data.num_classes
    flat = data.x_train.reshape(-1, data.input_shape[-1] if len(data.input_shape) == 3 else 1)
    assert np.allclose(flat.mean(axis=0), 0, atol=1e-4)
    assert len(np.unique(data.y_train)) == data.num_classes

    again = load_dataset(name, key(0), **IN_MEMORY[name])
    for a, b in zip(data, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = load_dataset(name, key(1), **IN_MEMORY[name])
    assert other.x_train.shape == data.x_train.shape
    assert not np.array_equal(other.x_train, data.x_train)


def test_input_shapes_and_sizes():
    assert load_dataset("digits", key()).input_shape == (8, 8, 1)
    assert load_dataset("mnist1d", key(), num_samples=200).input_shape == (40,)
    gauss = load_dataset("gaussian", key(), n_train=1000, n_test=30, dim=7, val_fraction=0.2)
    assert gauss.input_shape == (7,)
    assert (len(gauss.x_train), len(gauss.x_val), len(gauss.x_test)) == (800, 200, 30)
    assert len(load_dataset("gaussian", key(), n_train=1000, max_train=50).x_train) == 50
    assert len(load_dataset("digits", key(), max_train=40).y_train) == 40


def test_legacy_uint32_key_is_accepted():
    data = load_dataset("gaussian", jax.random.PRNGKey(3), n_train=100, n_test=10, dim=4)
    assert data.x_train.shape == (85, 4)


def test_gaussian_test_split_does_not_depend_on_train_size():
    small = load_dataset("gaussian", key(), n_train=100, n_test=50, dim=4)
    large = load_dataset("gaussian", key(), n_train=400, n_test=50, dim=4)
    np.testing.assert_array_equal(small.y_test, large.y_test)


def test_mnist1d_restores_global_rngs():
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    load_dataset("mnist1d", key(), num_samples=100)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # noqa: NPY002
    assert random.random() == random.Random(123).random()


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("gaussian", {"bogus": 1}, "'bogus'"),
        ("gaussian", {"val_fraction": 1.5}, "val_fraction"),
        ("gaussian", {"noise": 0.0}, "noise"),
        ("gaussian", {"dim": 0}, "dim"),
        ("digits", {"max_train": 0}, "max_train"),
        ("digits", {"test_fraction": 0}, "test_fraction"),
        ("mnist1d", {"num_samples": 3}, "num_samples"),
        ("mnist", {}, "path"),
        ("cifar10", {}, "path"),
        ("imagenet", {}, "imagenet"),
    ],
)
def test_bad_dataset_options(name, options, needle):
    with pytest.raises(ParamarketError, match=needle):
        load_dataset(name, key(), **options)


def test_unknown_option_lists_allowed_ones():
    with pytest.raises(ParamarketError, match="allowed: .*n_train"):
        load_dataset("gaussian", key(), sizes=3)


# ---- IDX files ----


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """Write `array` in IDX format (uint8 or int32), optionally gzipped."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_mnist(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images whose pixel [0, 0] identifies the image, and (n,) labels."""
    i, r, c = np.ogrid[:n, :28, :28]
    images = ((i + offset) * 37 + 3 * r + 5 * c) % 256
    return images.astype(np.uint8), ((np.arange(n) + offset) * 3 % 10).astype(np.uint8)


def write_mnist(directory, compress: bool) -> tuple[np.ndarray, ...]:
    arrays = (*fake_mnist(20, 0), *fake_mnist(10, 20))
    for stem, array in zip(IDX_STEMS, arrays, strict=True):
        write_idx(directory / (stem + ".gz" if compress else stem), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images, _ = fake_mnist(4, 0)
    signed = np.array([[-5, 7, 1 << 20]], dtype=np.int32)
    write_idx(tmp_path / "a", images, compress)
    write_idx(tmp_path / "b", signed, compress)
    got = read_idx(tmp_path / "a")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), signed)


@pytest.mark.parametrize(("name", "compress"), [("mnist", False), ("fashion_mnist", True)])
def test_idx_dataset_round_trip(tmp_path, name, compress):
    x_raw, y_raw, xt_raw, yt_raw = write_mnist(tmp_path, compress)
    data = load_dataset(name, key(), path=tmp_path, val_fraction=0.25)
    assert data.input_shape == (28, 28, 1)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (15, 5, 10)
    np.testing.assert_array_equal(data.y_test, yt_raw)

    # One channel: standardising is one increasing affine map of the raw pixels.
    slope, intercept = np.polyfit(xt_raw.ravel().astype(float), data.x_test.ravel(), 1)
    assert slope > 0
    np.testing.assert_allclose(data.x_test[..., 0], slope * xt_raw + intercept, atol=1e-4)

    # Undo it on train and validation: each row is a raw image, with its own label.
    x = np.concatenate([data.x_train, data.x_val])[..., 0]
    y = np.concatenate([data.y_train, data.y_val])
    recovered = np.rint((x - intercept) / slope).astype(int)
    source = [int(np.flatnonzero(x_raw[:, 0, 0] == row[0, 0])[0]) for row in recovered]
    assert sorted(source) == list(range(20))
    np.testing.assert_array_equal(recovered, x_raw[source])
    np.testing.assert_array_equal(y, y_raw[source])


def test_idx_missing_file(tmp_path):
    write_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ParamarketError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("mnist", key(), path=tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(ParamarketError, match="missing directory"):
        load_dataset("mnist", key(), path=tmp_path / "nowhere")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_file(tmp_path, compress):
    write_mnist(tmp_path, compress)
    victim = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    victim.write_bytes(victim.read_bytes()[:-30])
    with pytest.raises(ParamarketError, match="train-images-idx3-ubyte") as info:
        load_dataset("mnist", key(), path=tmp_path)
    assert "\n" not in str(info.value)


def test_idx_bad_magic(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ParamarketError, match="magic"):
        read_idx(tmp_path / "x")


# ---- CIFAR-10 batches ----


def write_cifar(directory) -> list[np.ndarray]:
    """Two images per train batch, three in the test batch, in the official pickle format."""
    directory.mkdir(parents=True)
    rows = []
    for b, stem in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = 3 if stem == "test_batch" else 2
        data = ((np.arange(n * 3072).reshape(n, 3072) * 7 + b) % 251).astype(np.uint8)
        if b == 0:
            data[0, [0 * 1024 + 3 * 32 + 5, 1024 + 3 * 32 + 5, 2048 + 3 * 32 + 5]] = (200, 100, 50)
        labels = [(b + j) % 10 for j in range(n)]
        with (directory / stem).open("wb") as handle:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, handle)
        rows.append(data)
    return rows


def test_cifar_layout(tmp_path):
    rows = write_cifar(tmp_path / "cifar-10-batches-py")
    x_train, y_train, x_test, y_test = read_cifar_batches(tmp_path)
    assert x_train.shape == (10, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(x_train[0, 3, 5], [200, 100, 50])
    np.testing.assert_array_equal(x_train[:2], rows[0].reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y_test, [5, 6, 7])
    np.testing.assert_array_equal(y_train[:4], [0, 1, 1, 2])

    data = load_dataset("cifar10", key(), path=tmp_path / "cifar-10-batches-py", val_fraction=0.2)
    assert data.input_shape == (32, 32, 3)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (8, 2, 3)
    assert np.allclose(data.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)


def test_cifar_errors(tmp_path):
    with pytest.raises(ParamarketError, match="missing directory"):
        load_dataset("cifar10", key(), path=tmp_path / "nowhere")
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(ParamarketError, match="data_batch_3"):
        load_dataset("cifar10", key(), path=tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ParamarketError, match="corrupt batch .*data_batch_3"):
        load_dataset("cifar10", key(), path=tmp_path / "c")


# ---- partitions ----


def test_every_partitioner_is_classified():
    assert DISJOINT | {"class_split"} == set(PARTITIONERS)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_partition_is_well_formed(digits, name):
    n_agents = 3
    part = partition(name, key(5), digits, n_agents, eval_size=100)
    n_train = len(digits.y_train)
    assert part.train_rows.dtype == part.train_size.dtype == part.train_start.dtype == np.int32
    assert part.train_rows.shape == (part.train_size.sum(),)
    np.testing.assert_array_equal(part.train_start, np.cumsum(part.train_size) - part.train_size)
    assert part.val_idx.shape == part.test_idx.shape == (n_agents, 100)
    assert part.val_idx.dtype == part.test_idx.dtype == np.int32
    assert part.train_size.min() >= 1
    assert part.train_rows.min() >= 0 and part.train_rows.max() < n_train
    assert part.val_idx.min() >= 0 and part.val_idx.max() < len(digits.y_val)
    assert part.test_idx.min() >= 0 and part.test_idx.max() < len(digits.y_test)
    shards = []
    for i, size in enumerate(part.train_size):
        shard = part.shard(i)
        assert len(shard) == size and len(np.unique(shard)) == size
        shards.append(shard)
    if name in DISJOINT:
        everything = np.concatenate(shards)
        assert len(everything) == n_train
        np.testing.assert_array_equal(np.sort(everything), np.arange(n_train))

    again = partition(name, key(5), digits, n_agents, eval_size=100)
    for a, b in zip(part, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = partition(name, key(6), digits, n_agents, eval_size=100)
    assert not np.array_equal(other.val_idx, part.val_idx)


def test_class_split_two_agents(digits):
    part = partition("class_split", key(), digits, 2, d=0.1)
    y = digits.y_train
    counts = np.bincount(y, minlength=10)
    for agent, own in ((0, range(5)), (1, range(5, 10))):
        held = np.bincount(y[part.shard(agent)], minlength=10)
        for c in range(10):
            expected = counts[c] if c in own else max(1, round(0.1 * counts[c]))
            assert held[c] == expected


def test_class_split_keeps_at_least_one_of_rare_classes():
    labels = np.repeat(np.arange(4), [30, 3, 30, 40])
    shards = PARTITIONERS["class_split"](key(), labels, 2, 4, d=0.1)
    np.testing.assert_array_equal(np.bincount(labels[shards[0]], minlength=4), [30, 3, 3, 4])
    np.testing.assert_array_equal(np.bincount(labels[shards[1]], minlength=4), [3, 1, 30, 40])


def test_eval_subsets_follow_train_histogram(digits):
    part = partition("shards", key(2), digits, 10, shards_per_agent=1, eval_size=60)
    y = digits.y_train
    for i in range(10):
        train = np.bincount(y[part.shard(i)], minlength=10)
        assert (train > 0).sum() < 10
        for labels, idx in ((digits.y_val, part.val_idx[i]), (digits.y_test, part.test_idx[i])):
            drawn = np.bincount(labels[idx], minlength=10)
            assert drawn.sum() == 60
            assert np.all(drawn[train == 0] == 0)
            assert np.all(np.abs(drawn - 60 * train / train.sum()) < 1)


def test_eval_subsets_resample_small_classes():
    labels = np.array([0, 0, 1, 2, 2, 2, 2, 2])
    idx = eval_subsets(key(), np.array([[0, 5, 5]]), labels, 6)[0]
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=3), [0, 3, 3])
    assert np.all(idx[labels[idx] == 1] == 2)  # one example: drawn with replacement
    assert len(np.unique(idx[labels[idx] == 2])) == 3  # five examples: without replacement


def test_largest_remainder_sums_exactly():
    weights = np.array([1.0, 1.0, 1.0, 0.0])
    for m in range(1, 20):
        counts = largest_remainder(weights, m)
        assert counts.sum() == m and counts[3] == 0
        assert np.all(np.abs(counts - m * weights / 3) < 1)


def test_dirichlet_gives_up_with_an_error():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ParamarketError, match="alpha"):
        PARTITIONERS["dirichlet"](key(), labels, 10, 2, alpha=1e-3, min_size=2)


@pytest.mark.parametrize(
    ("name", "n_agents", "options", "needle"),
    [
        ("dirichlet", 3, {"alpha": 0}, "'alpha'"),
        ("dirichlet", 3, {"alpha": -1.0}, "'alpha'"),
        ("dirichlet", 3, {"min_size": 0}, "'min_size'"),
        ("class_split", 3, {"d": 0}, "'d'"),
        ("class_split", 3, {"d": 1.5}, "'d'"),
        ("class_split", 11, {}, "'n_agents'"),
        ("shards", 3, {"shards_per_agent": 0}, "'shards_per_agent'"),
        ("iid", 3, {"alpha": 0.5}, "'alpha'"),
        ("iid", 0, {}, "'n_agents'"),
        ("iid", 3, {"eval_size": 0}, "'eval_size'"),
        ("random", 3, {}, "'random'"),
    ],
)
def test_bad_partition_options(digits, name, n_agents, options, needle):
    with pytest.raises(ParamarketError, match=needle):
        partition(name, key(), digits, n_agents, **options)


def test_digits_read_without_scikit_learn_equal_its_loader():
    """The bundled CSV read directly (no scikit-learn import on the run path) gives what
    ``sklearn.datasets.load_digits`` gives."""
    from sklearn.datasets import load_digits as sklearn_digits

    from paramarket_jax.data.datasets import digits_arrays

    images, target = digits_arrays()
    bunch = sklearn_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)
    assert images.dtype == bunch.images.dtype and target.dtype == bunch.target.dtype
