"""affNIST's published test files, read with NumPy alone (no SciPy).

affNIST (Tijmen Tieleman, 2013) publishes MATLAB v5 `.mat` files. The transformed test set is
either one file `test.mat` (320,000 images) or the folder `test_batches/` of `1.mat` ... `32.mat`
(10,000 each). Each file holds one variable, `affNISTdata`, a 1 x 1 struct whose fields include

- `image`: uint8 [1600, N], column n the n-th 40 x 40 image in row-major pixel order,
- `label_int`: uint8 [1, N] (or [N, 1]), the digit classes 0..9,

stored plain or zlib-compressed (miCOMPRESSED, MATLAB's default since v7 saved as -v6/-v7). Other
fields are read and ignored. `read_affnist(directory)` finds the files and returns the images and
labels; the reader understands the part of the format those files use (numeric arrays, structs,
cells, compressed elements), not MATLAB v7.3's HDF5 files.
"""

import glob
import os
import zlib

import numpy as np

__all__ = ["read_mat", "read_affnist", "find_affnist_files"]

# MAT v5 data types (the "mi" codes) that hold numbers, as NumPy dtypes (byte order added later).
_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MATRIX, _COMPRESSED = 14, 15
_CELL_CLASS, _STRUCT_CLASS, _CHAR_CLASS = 1, 2, 4
# The published test set in batches: test_batches/1.mat ... 32.mat.
_BATCHES = 32
# Text may also be stored as UTF-8, -16 or -32 (SciPy's savemat writes UTF-8), not as numbers.
_TEXT = {16: "utf-8", 17: "utf-16", 18: "utf-32"}


def _elements(buffer, order):
    """Yield (type, payload bytes) of the data elements in `buffer`, decompressing miCOMPRESSED."""
    position = 0
    while position + 8 <= len(buffer):
        first, second = np.frombuffer(buffer, dtype=order + "u4", count=2, offset=position)
        if first >> 16:                                   # small element: size and type in one word
            kind, size, start, position = int(first & 0xFFFF), int(first >> 16), position + 4, position + 8
        else:
            kind, size, start = int(first), int(second), position + 8
            position = start + (size if kind == _COMPRESSED else (size + 7) // 8 * 8)
        payload = buffer[start:start + size]
        if len(payload) != size:
            raise ValueError(f"truncated MAT data element (type {kind}: {size} bytes announced, {len(payload)} left)")
        if kind == _COMPRESSED:
            yield from _elements(zlib.decompress(payload), order)
        else:
            yield kind, payload


def _matrix(payload, order):
    """The value of one miMATRIX element: a NumPy array, a dict for a 1 x 1 struct (a list of
    dicts for a larger one), a list for a cell, a str for a char array. Returns (name, value)."""
    if not payload:
        return "", np.zeros((0, 0))
    parts = _elements(payload, order)
    _, flags = next(parts)
    array_class = int(np.frombuffer(flags, dtype=order + "u4", count=1)[0]) & 0xFF
    _, dims = next(parts)
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=order + "i4"))
    _, name = next(parts)
    name = name.decode("ascii")
    count = int(np.prod(shape))
    if array_class == _STRUCT_CLASS:
        _, width = next(parts)
        width = int(np.frombuffer(width, dtype=order + "i4", count=1)[0])
        _, names = next(parts)
        fields = [names[k:k + width].split(b"\0")[0].decode("ascii") for k in range(0, len(names), width)]
        records = [{field: _matrix(next(parts)[1], order)[1] for field in fields} for _ in range(count)]
        return name, records[0] if count == 1 else records
    if array_class == _CELL_CLASS:
        return name, [_matrix(next(parts)[1], order)[1] for _ in range(count)]
    kind, real = next(parts)
    if array_class == _CHAR_CLASS and kind in _TEXT:
        encoding = _TEXT[kind] + ("" if kind == 16 else "-le" if order == "<" else "-be")
        return name, real.decode(encoding)
    if kind not in _NUMERIC:
        raise ValueError(f"MAT array {name!r} stores its values as type {kind}, which this reader does not know")
    values = np.frombuffer(real, dtype=order + _NUMERIC[kind], count=count).reshape(shape, order="F")
    if array_class == _CHAR_CLASS:
        return name, "".join(map(chr, values.ravel(order="F")))
    return name, values


def read_mat(path):
    """The variables of a MATLAB v5 `.mat` file, as a dict name -> value (see `_matrix`).

    ValueError naming `path` for a file that is not one, or is truncated or damaged."""
    with open(path, "rb") as f:
        content = f.read()
    if len(content) < 128 or content[124:126] not in (b"\x00\x01", b"\x01\x00"):
        raise ValueError(f"{path}: not a MATLAB v5 .mat file (v7.3 files are HDF5, which this reader does not read)")
    order = "<" if content[126:128] == b"IM" else ">"
    variables = {}
    try:
        for kind, payload in _elements(content[128:], order):
            if kind == _MATRIX:
                name, value = _matrix(payload, order)
                variables[name] = value
    # A damaged file fails wherever its bytes stop making sense: in zlib, in an element that
    # ends early (StopIteration from its parts) or in NumPy's reading of a payload.
    except (zlib.error, StopIteration, ValueError) as e:
        raise ValueError(f"{path}: truncated or damaged .mat file ({str(e) or type(e).__name__})") from e
    return variables


def find_affnist_files(directory):
    """The affNIST test files under `directory`: `test.mat`, else `test_batches/<n>.mat` by n."""
    for folder in (directory, os.path.join(directory, "affNIST")):
        single = os.path.join(folder, "test.mat")
        if os.path.isfile(single):
            return [single]
        batches = glob.glob(os.path.join(folder, "test_batches", "*.mat"))
        if batches:
            # The published folder: 1.mat ... 32.mat, each once. A missing or an extra file would
            # score a different test set without a word.
            names = sorted(os.path.basename(p) for p in batches)
            expected = sorted(f"{n}.mat" for n in range(1, _BATCHES + 1))
            if names != expected:
                missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
                raise ValueError(f"{os.path.join(folder, 'test_batches')} must hold exactly 1.mat ... "
                                 f"{_BATCHES}.mat: missing {missing or 'none'}, unexpected {extra or 'none'}")
            return [os.path.join(folder, "test_batches", f"{n}.mat") for n in range(1, _BATCHES + 1)]
    raise FileNotFoundError(f"no affNIST test files (test.mat or test_batches/*.mat) in {directory} "
                            f"or {os.path.join(directory, 'affNIST')}; affNIST is not downloaded by this package: pass "
                            f"its folder with --data, or score --dataset affnist-generated")


def read_affnist(directory):
    """affNIST's test set from the files under `directory` (see the module docstring).

    Returns (images uint8 [N, 40, 40], labels uint8 [N]). ValueError for files of another layout.
    """
    images, labels = [], []
    for path in find_affnist_files(directory):
        record = read_mat(path).get("affNISTdata")
        if not isinstance(record, dict) or "image" not in record or "label_int" not in record:
            raise ValueError(f"{path}: expected a struct variable affNISTdata with fields image and label_int")
        image, label = np.asarray(record["image"]), np.asarray(record["label_int"]).ravel()
        if image.ndim != 2 or image.shape[0] != 1600 or image.shape[1] != label.shape[0]:
            raise ValueError(f"{path}: image must be [1600, N] with N labels, got {list(image.shape)} "
                             f"and {label.shape[0]} labels")
        # The published values are whole numbers (pixels 0..255, classes 0..9), whatever type the
        # file stores them in; anything else is another dataset, which a cast would hide.
        # Only values stored as floats can hold fractions; the test set's 512 M uint8 pixels get
        # no rounded copy made of them.
        for what, values, top in (("image", image, 255), ("label_int", label, 9)):
            fractional = values.dtype.kind == "f" and not np.all(values == np.round(values))
            if values.size and (fractional or values.min() < 0 or values.max() > top):
                raise ValueError(f"{path}: {what} must hold whole numbers in [0, {top}], got values in "
                                 f"[{values.min()}, {values.max()}]")
        images.append(image.T.reshape(-1, 40, 40))
        labels.append(label)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.uint8)
