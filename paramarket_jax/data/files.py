"""Readers for dataset files on disk: IDX (LeCun et al. 1998, MNIST) and CIFAR-10 python batches."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import stat
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from paramarket_jax.errors import ParamarketError

IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_EXPECTED = ", ".join(IDX_FILES) + " (raw or .gz)"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SUBDIR = "cifar-10-batches-py"
CIFAR_EXPECTED = ", ".join((*CIFAR_TRAIN, CIFAR_TEST)) + f" (optionally inside {CIFAR_SUBDIR}/)"


def _one_line(error: BaseException) -> str:
    """The message of an exception flattened to one line."""
    return " ".join(str(error).split()) or type(error).__name__


MAX_IDX_BYTES = 1 << 32
"""Largest (uncompressed) IDX file read: 4 GiB (MNIST's largest file is 47 MB)."""
MAX_CIFAR_BATCH_BYTES = 1 << 28
"""Largest CIFAR batch read: 256 MiB (the official batches are about 31 MB)."""


def _read_up_to(stream: BinaryIO, n: int, chunk: int = 1 << 24) -> bytes:
    """Up to n bytes of a stream of unknown length, in chunks (no n-byte buffer up front,
    so a small corrupt file whose header claims gigabytes costs nothing)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(min(chunk, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_idx_stream(stream: BinaryIO, size: int | None) -> np.ndarray:
    """Decode an IDX file from a binary stream, the header first.

    Args:
        stream: positioned at the start of the (uncompressed) file.
        size: the file's size when known (raw files): checked against the header before
            the values are read; None for compressed streams (read up to what the header
            says, then checked to end there).

    Raises:
        ValueError: bad magic number, unknown dtype code, or a size that disagrees with
            the header (or exceeds MAX_IDX_BYTES).
    """
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise ValueError("bad magic number (not an IDX file)")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(f"truncated header: {4 + len(raw_dims)} bytes, need {header}")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise ValueError(
            f"header gives shape {tuple(dims)}: {expected} bytes, more than {MAX_IDX_BYTES}"
        )
    if size is not None and size != expected:
        raise ValueError(f"{size} bytes, expected {expected} for shape {tuple(dims)}")
    body = (
        stream.read(expected - header)
        if size is not None
        else _read_up_to(stream, expected - header)
    )
    if len(body) < expected - header:
        raise ValueError(f"{header + len(body)} bytes, expected {expected} for shape {tuple(dims)}")
    if size is None and stream.read(1):
        raise ValueError(f"more than the {expected} bytes expected for shape {tuple(dims)}")
    values = np.frombuffer(body, dtype=dtype).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def parse_idx(data: bytes) -> np.ndarray:
    """Decode the bytes of an IDX file.

    Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian
    uint32 per dimension and the big-endian values in C order.

    Args:
        data: the whole (uncompressed) file.

    Returns:
        Array of the shape and dtype given by the header, in native byte order.

    Raises:
        ValueError: bad magic number, unknown dtype code or a size that disagrees with the header.
    """
    return _read_idx_stream(io.BytesIO(data), len(data))


def _regular_file(path: Path, what: str) -> os.stat_result | None:
    """The file's stat if it is a regular file; None if it does not exist.

    Raises:
        ParamarketError: it exists but is not a regular file (a folder, a device, a pipe)
            or cannot be examined.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ParamarketError(f"cannot read {what} {path}: {_one_line(error)}") from error
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ParamarketError(f"{what} {path} is {kind}")
    return info


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, raw or gzip-compressed (detected from its first bytes).

    The header is read first: a raw file's size must agree with it before any value is
    read, and a compressed one is decompressed only as far as the header says.

    Args:
        path: the file.

    Returns:
        The stored array, e.g. (n, 28, 28) uint8 images or (n,) uint8 labels.

    Raises:
        ParamarketError: the file is missing, not a regular file, unreadable, truncated,
            too large or not IDX.
    """
    path = Path(path)
    info = _regular_file(path, "IDX file")
    if info is None:
        raise ParamarketError(f"missing IDX file {path}")
    try:
        with path.open("rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
            handle.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=handle) as stream:
                    return _read_idx_stream(stream, None)
            return _read_idx_stream(handle, info.st_size)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise ParamarketError(f"corrupt IDX file {path}: {_one_line(error)}") from error


def _folder(directory: str | Path, name: str, expected: str) -> Path:
    """The dataset folder ``directory``, which must exist and be a folder."""
    directory = Path(directory)
    try:
        exists, is_dir = directory.exists(), directory.is_dir()
    except (OSError, ValueError) as error:
        raise ParamarketError(f"{name}: cannot read {directory}: {_one_line(error)}") from error
    if not exists:
        raise ParamarketError(f"{name}: missing directory {directory}; expected {expected}")
    if not is_dir:
        raise ParamarketError(
            f"{name}: {directory} is a file, not a directory; data.path must name the folder "
            f"holding {expected}"
        )
    return directory


def _find_idx(directory: Path, stem: str, name: str) -> Path:
    """The raw or gzipped IDX file `stem` in `directory`."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise ParamarketError(
        f"{name}: missing {directory / stem}[.gz] in {directory}; expected {IDX_EXPECTED}"
    )


def _read_idx_in(directory: Path, stem: str, name: str) -> np.ndarray:
    """read_idx for one file of a dataset directory, errors naming the dataset's files."""
    path = _find_idx(directory, stem, name)
    try:
        return read_idx(path)
    except ParamarketError as error:
        raise ParamarketError(f"{name}: {error}; expected {IDX_EXPECTED}") from error


def read_idx_dataset(
    directory: str | Path, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read an MNIST-style directory of four IDX files.

    Args:
        directory: folder holding the files of IDX_FILES, each raw or with `.gz`.
        name: dataset name used in error messages.

    Returns:
        x_train: (n_train, h, w), y_train: (n_train,), x_test: (n_test, h, w), y_test: (n_test,),
        with the dtypes stored in the files (uint8 for MNIST).

    Raises:
        ParamarketError: missing directory or file, corrupt file or mismatched shapes.
    """
    directory = _folder(directory, name, IDX_EXPECTED)
    arrays = [_read_idx_in(directory, stem, name) for stem in IDX_FILES]
    for images, labels, split in ((arrays[0], arrays[1], "train"), (arrays[2], arrays[3], "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ParamarketError(
                f"{name}: {split} images of shape {images.shape} do not match labels of shape "
                f"{labels.shape} in {directory}; expected (n, h, w) images and (n,) labels"
            )
        if min(images.shape[1:]) < 1:
            raise ParamarketError(
                f"{name}: {split} images of shape {images.shape} in {directory} are empty; "
                f"expected (n, h, w) images with h, w >= 1"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ParamarketError(
                f"{name}: {split} labels in {directory} are {labels.dtype}; expected integers"
            )
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise ParamarketError(f"{name}: {split} images in {directory} are not all finite")
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ParamarketError(
            f"{name}: train images {x_train.shape[1:]} and t10k images {x_test.shape[1:]} in "
            f"{directory} differ in size; expected one image size"
        )
    return x_train, y_train, x_test, y_test


def _batch_field(batch: dict, field: str):
    """A field of a CIFAR batch dict, whose keys are bytes in the official pickles."""
    return batch[field.encode()] if field.encode() in batch else batch[field]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch (trusted input: unpickling runs code from the file).

    Args:
        path: a file holding a dict with b"data" (n, 3072) uint8 rows in CHW order
            (1024 red, 1024 green, 1024 blue values, each row-major) and b"labels" (n,).

    Returns:
        images: (n, 32, 32, 3) uint8 in HWC order; labels: (n,) int64.

    Raises:
        ParamarketError: missing, corrupt or wrongly shaped batch.
    """
    try:
        info = _regular_file(path, "CIFAR batch")
    except ParamarketError as error:
        raise ParamarketError(f"cifar10: {error}; expected {CIFAR_EXPECTED}") from error
    if info is None:
        raise ParamarketError(f"cifar10: missing {path}; expected {CIFAR_EXPECTED}")
    if info.st_size > MAX_CIFAR_BATCH_BYTES:
        raise ParamarketError(
            f"cifar10: batch {path} has {info.st_size} bytes, more than {MAX_CIFAR_BATCH_BYTES}; "
            f"expected {CIFAR_EXPECTED}"
        )
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(_batch_field(batch, "data"))
        labels = np.asarray(_batch_field(batch, "labels"))
    except Exception as error:  # unpickling a corrupt file can raise almost anything
        raise ParamarketError(
            f"cifar10: corrupt batch {path}: {_one_line(error)}; expected {CIFAR_EXPECTED}"
        ) from error
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (len(data),)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise ParamarketError(
            f"cifar10: corrupt batch {path}: data {data.dtype} {data.shape}, labels "
            f"{labels.dtype} {labels.shape}; expected uint8 (n, 3072) data and (n,) int labels"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar_batches(
    directory: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the CIFAR-10 python batches from `directory` or its `cifar-10-batches-py` subfolder.

    Args:
        directory: folder holding data_batch_1..5 and test_batch.

    Returns:
        x_train: (n_train, 32, 32, 3) uint8 HWC, y_train: (n_train,) int64,
        x_test: (n_test, 32, 32, 3) uint8, y_test: (n_test,) int64.

    Raises:
        ParamarketError: missing directory or batch, or a corrupt batch.
    """
    directory = _folder(directory, "cifar10", CIFAR_EXPECTED)
    if (directory / CIFAR_SUBDIR).is_dir():
        directory = directory / CIFAR_SUBDIR
    train = [read_cifar_batch(directory / stem) for stem in CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(directory / CIFAR_TEST)
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return x_train, y_train, x_test, y_test
