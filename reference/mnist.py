"""MNIST in its original IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/).

An IDX file is a big-endian header followed by the raw data:

    bytes 0-1   0x00 0x00
    byte  2     type code (0x08 = unsigned byte, the only type MNIST uses)
    byte  3     number of dimensions k
    4k bytes    k sizes, each a big-endian uint32
    payload     prod(sizes) values, row-major

The files may be gzipped (`.gz`, as distributed) or raw. Everything here is checked, so a
truncated download fails with a message naming the file instead of a garbled array.
"""

import gzip
import math
import os
import zlib

import numpy as np

__all__ = ["SPLIT_FILES", "read_idx", "find_idx", "idx_folders", "find_split", "load_mnist", "read_split"]

_UBYTE = 0x08

# (images, labels) file names per split, without the optional ".gz".
SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path):
    """Read an IDX file (gzipped when the name ends in .gz) into a uint8 array of its shape.

    Raises FileNotFoundError when the file is missing and ValueError(f"{path}: ...") when it is
    corrupt: a gzip stream that fails to decompress, a wrong magic, a type other than uint8, or
    a payload longer or shorter than the header's sizes say.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (OSError, EOFError, zlib.error) as e:
            # gzip raises BadGzipFile (an OSError) on a bad header, EOFError on a cut-off stream.
            raise ValueError(f"{path}: gzip stream does not decompress ({e})") from e
    else:
        with open(path, "rb") as f:
            data = f.read()

    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header (needs 4)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad magic {data[:4].hex()}, an IDX file starts with two zero bytes")
    if data[2] != _UBYTE:
        raise ValueError(f"{path}: type code 0x{data[2]:02x} is not supported, only 0x08 (uint8)")
    ndim = data[3]
    if ndim == 0:
        raise ValueError(f"{path}: header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated header, {ndim} dimensions need {header_len} bytes, file has {len(data)}")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)                 # Python ints: a huge header cannot wrap around
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes"
        raise ValueError(f"{path}: {what}, shape {shape} needs {expected} data bytes, found {payload}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def find_idx(directory, stem):
    """The path of `stem`.gz or `stem` in `directory` (the gzipped one first), or None."""
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def idx_folders(directory, folder="MNIST"):
    """Where the IDX files may lie under `directory`: torchvision's layout (`folder`/raw, then
    raw) first, as it is the only one that tells MNIST and Fashion-MNIST apart, then `directory`."""
    return [os.path.join(directory, folder, "raw"), os.path.join(directory, "raw"), directory]


def find_split(directory, train=True, folder="MNIST", what=None, advice=None):
    """The first of idx_folders(directory, folder) that holds both files of the training or test
    split (SPLIT_FILES), each gzipped or not. FileNotFoundError otherwise, naming the missing file
    of a folder that holds half of the pair (most likely the one meant), else every folder looked
    in; `what` names the files in that message and `advice` ends it."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory not found: {directory}")
    stems = SPLIT_FILES[bool(train)]
    folders = idx_folders(directory, folder)
    found = {candidate: [find_idx(candidate, stem) is not None for stem in stems] for candidate in folders}
    for candidate in folders:
        if all(found[candidate]):
            return candidate
    for candidate in folders:
        if any(found[candidate]):
            missing = stems[found[candidate].index(False)]
            raise FileNotFoundError(f"{missing}(.gz) is missing from {candidate} (its companion file is there)")
    what = what or f"{folder}'s {' and '.join(stem + '(.gz)' for stem in stems)}"
    raise FileNotFoundError(f"{what} not found in any of: {', '.join(folders)}" + (f"; {advice}" if advice else ""))


def load_mnist(directory, train=True):
    """Load the MNIST training (60,000) or test (10,000) split from `directory`, where its two
    files lie flat or in torchvision's layout below it (find_split).

    Returns (images uint8 [N, H, W], 28 x 28 for MNIST itself, and labels uint8 [N]) with labels
    in 0..9.
    """
    return read_split(find_split(directory, train), train)


def read_split(folder, train=True):
    """load_mnist's arrays from the split's two files in `folder` itself (no search), checked."""
    image_path, label_path = (find_idx(folder, stem) for stem in SPLIT_FILES[bool(train)])
    if image_path is None or label_path is None:
        raise FileNotFoundError(f"the {'training' if train else 'test'} split's files are not both in {folder}")
    images = read_idx(image_path)                                  # [N, H, W]
    labels = read_idx(label_path)                                  # [N]
    if images.ndim != 3:
        raise ValueError(f"{image_path}: images must have 3 dimensions [N, H, W], got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{label_path}: labels must have 1 dimension [N], got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images, labels
