"""Small IDX files (MNIST's format) for the tests of both readers: reference/mnist.py and
capsnet_triton/data.py. NumPy only, so the reference tests can use it without torch."""

import gzip
import os

import numpy as np


def idx_bytes(array, type_code=0x08):
    """The IDX encoding of a uint8 array: magic, big-endian uint32 sizes, then the data."""
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write(path, data):
    """Write bytes to path, gzipped when its name ends in .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return path


def write_idx(path, array):
    return write(path, idx_bytes(np.asarray(array, dtype=np.uint8)))


def write_mnist(directory, train_count, test_count, rng, size=28):
    """Small MNIST-shaped IDX files of random pixels (gzipped images, raw labels) in directory."""
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels)


def make_digits(count, seed):
    """`count` 28 x 28 images whose bright bar's row encodes the label, so a tiny net can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
    for n, label in enumerate(labels):
        images[n, 4 + label:10 + label, 6:22] = 255
    return images, labels


def write_dataset(directory, train_count=200, test_count=50, compress=True, seed=0):
    """The four MNIST IDX files of a small learnable dataset (make_digits) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, count, offset in (("train", train_count, 0), ("t10k", test_count, 1)):
        images, labels = make_digits(count, seed + offset)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    return directory
