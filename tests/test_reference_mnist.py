"""Reading MNIST's IDX files: round trips, every kind of corruption, and the real data set."""

import gzip
import os

import numpy as np
import pytest

from capsnet_triton.reference import load_mnist, read_idx
from idx_files import idx_bytes, write, write_mnist


@pytest.mark.parametrize("name", ["data.gz", "data"])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 2), (2, 1, 3, 1), (0, 28, 28)])
def test_read_idx_round_trip(tmp_path, rng, name, shape):
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    result = read_idx(write(tmp_path / name, idx_bytes(array)))
    assert result.dtype == np.uint8 and result.shape == shape and np.array_equal(result, array)
    assert result.flags.writeable


@pytest.mark.parametrize("name", ["data.gz", "data"])
@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:10], "truncated"),                          # cut inside the sizes
        (lambda b: b[:3], "too short"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "type code 0x0d"),    # float32 IDX
        (lambda b: b[:3] + b"\x00", "0 dimensions"),
        # Sizes whose product overflows 64 bits: the count of bytes needed, exact, not wrapped.
        (lambda b: b[:3] + b"\x04" + b"\xff\xff\xff\xff" * 4, f"needs {(2**32 - 1) ** 4} data bytes"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, name, corrupt, match):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    path = write(tmp_path / name, corrupt(good))
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    for name, data in (("garbage.gz", b"not a gzip stream at all"), ("cut.gz", compressed[: len(compressed) // 2]),
                       ("flipped.gz", compressed[:20] + bytes([compressed[20] ^ 0xFF]) + compressed[21:])):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match="gzip") as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_read_idx_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.gz"):
        read_idx(tmp_path / "nothing-here.gz")


def test_load_mnist_from_generated_files(tmp_path, rng):
    write_mnist(tmp_path, 12, 5, rng)
    for train, count in ((True, 12), (False, 5)):
        images, labels = load_mnist(tmp_path, train=train)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.uint8


def test_load_mnist_checks_counts_labels_and_presence(tmp_path, rng):
    write_mnist(tmp_path, 4, 4, rng)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 10, 2], dtype=np.uint8)))
    with pytest.raises(ValueError, match="0..9, found 10"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros((4, 1), dtype=np.uint8)))
    with pytest.raises(ValueError, match="1 dimension"):
        load_mnist(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, train=False)


def test_load_real_mnist(mnist_dir):
    for train, count in ((True, 60_000), (False, 10_000)):
        images, labels = load_mnist(mnist_dir, train=train)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and set(np.unique(labels)) == set(range(10))
        assert images.max() == 255 and images.min() == 0


def test_load_mnist_accepts_every_digit(tmp_path, rng):
    """Labels 0..9 all load (the real files, whose test is skipped without them, hold every digit)."""
    write_mnist(tmp_path, 10, 2, rng)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.arange(10, dtype=np.uint8)))
    _, labels = load_mnist(tmp_path, train=True)
    assert labels.tolist() == list(range(10))


def test_load_mnist_finds_torchvisions_layout_and_says_what_is_missing(tmp_path, rng):
    """As the training command does (its --download writes DIR/MNIST/raw): DIR/MNIST/raw before
    DIR/raw before DIR; a folder with half of a pair names the other file; none, every folder looked in."""
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_mnist(tmp_path / "MNIST" / "raw", 3, 2, rng)
    write_mnist(tmp_path, 5, 4, rng)
    assert len(load_mnist(tmp_path)[0]) == 3 and len(load_mnist(tmp_path, train=False)[0]) == 2
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    assert len(load_mnist(tmp_path, train=False)[0]) == 4          # only the flat folder has both
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\(.gz\) is missing from .*MNIST/raw \(its"):
        load_mnist(tmp_path, train=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not found in any of: .*empty/MNIST/raw, .*empty/raw, .*empty$"):
        load_mnist(tmp_path / "empty", train=False)
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        load_mnist(tmp_path / "absent")
