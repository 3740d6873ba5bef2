"""MNIST and Fashion-MNIST as in-memory tensors: finding, downloading, splitting, augmenting.

Each dataset is one entry of DATASETS (a `DatasetSpec`): its image shape, number of classes,
loader and files. Training, evaluation and `model.build_model` read the shape, the classes and
the dataset choices from there, so a new dataset is a new entry.

The whole dataset fits in memory (60,000 x 28 x 28 bytes = 47 MB), so it is held as one uint8
tensor on the training device and every batch is a single indexing operation; there is no
per-sample Python and no DataLoader.

- Files: the standard IDX `*-ubyte(.gz)` files, parsed by `capsnet_triton.reference.mnist`,
  found either straight in the data directory or in torchvision's `MNIST/raw` /
  `FashionMNIST/raw` layout below it.
- Download (optional): from the canonical mirrors into `DIR/<MNIST|FashionMNIST>/raw` (the two
  datasets share file names), each file to a temporary name first, verified against its MD5,
  then renamed, so a failed or corrupt download never leaves a file that looks complete.
- Validation: a split of the training images held out by a seeded permutation (SPEC 6: the
  model is selected on it, the test set is evaluated once).
- Augmentation (SPEC 6, the paper's only one): random shifts of up to 2 pixels in each
  direction with zero padding, vectorised over the batch.
"""

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .reference.mnist import find_idx, load_mnist

__all__ = [
    "DATASETS", "DatasetSpec", "IdxFile", "Split", "DownloadError", "dataset_spec",
    "find_split_dir", "load_split", "load_idx_split", "download", "validation_split", "epoch_order",
    "shift_generator", "derive_seed", "random_shift", "to_float", "default_permissions",
]


@dataclass(frozen=True)
class IdxFile:
    """One file of a dataset: its name without `.gz` and the MD5 it is checked against.

    digest_of says what the MD5 covers: "content" (the decompressed IDX bytes, which does not
    depend on how a mirror compressed them) or "gzip" (the `.gz` file as served).
    """

    stem: str
    md5: str
    digest_of: str = "content"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: what its examples look like, how to load a split, and where its files come from.

    loader(spec, directory, train) -> Split reads one split from `directory`; `load_split`
    checks that its images have image_shape.
    """

    name: str
    image_shape: tuple           # (channels, height, width) of one example
    num_classes: int
    loader: Callable
    folder: str                  # torchvision's class name, the folder above `raw/`
    mirrors: tuple
    files: tuple                 # IdxFile: train images, train labels, test images, test labels

    def split_files(self, train):
        """The (images, labels) IdxFile pair of the training or the test split."""
        return self.files[0:2] if train else self.files[2:4]


def load_idx_split(spec, directory, train):
    """The loader of MNIST-format datasets: a split's IDX pair from `find_split_dir`."""
    images, labels = load_mnist(find_split_dir(directory, spec.name, train), train=train)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


DATASETS = {
    "mnist": DatasetSpec(
        name="mnist",
        image_shape=(1, 28, 28),
        num_classes=10,
        loader=load_idx_split,
        folder="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        # MD5 of the decompressed files: mirrors serve byte-different gzips of the same data.
        files=(
            IdxFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
            IdxFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
            IdxFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
            IdxFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        image_shape=(1, 28, 28),
        num_classes=10,
        loader=load_idx_split,
        folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # The MD5s torchvision publishes (torchvision/datasets/mnist.py), which are of the .gz files.
        files=(
            IdxFile("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "gzip"),
            IdxFile("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe", "gzip"),
            IdxFile("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79", "gzip"),
            IdxFile("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310", "gzip"),
        ),
    ),
}


class Split(NamedTuple):
    """A dataset split in memory: images uint8 [N, C, H, W] and labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return self.labels.shape[0]

    def subset(self, index):
        """The samples at `index` (a LongTensor or a slice)."""
        return Split(self.images[index], self.labels[index])

    def to(self, device):
        return Split(self.images.to(device), self.labels.to(device))


class DownloadError(OSError):
    """No mirror delivered a file that passed its checksum."""


def dataset_spec(dataset):
    """The DATASETS entry named `dataset`; ValueError naming the choices for any other name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _candidate_dirs(directory, spec):
    # torchvision's layout first: it is the only one that tells MNIST and Fashion-MNIST apart.
    return [os.path.join(directory, spec.folder, "raw"), os.path.join(directory, "raw"), directory]


def find_split_dir(directory, dataset="mnist", train=True):
    """The folder under `directory` that holds both IDX files of a split.

    Looks in `directory/<MNIST|FashionMNIST>/raw`, `directory/raw` and `directory` itself, in
    that order, and returns the first that holds both; each file may be gzipped or not. Raises
    FileNotFoundError naming what is missing.
    """
    spec = dataset_spec(dataset)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory not found: {directory}")
    stems = [f.stem for f in spec.split_files(train)]
    candidates = _candidate_dirs(directory, spec)
    found = {candidate: [find_idx(candidate, stem) is not None for stem in stems] for candidate in candidates}
    for candidate in candidates:
        if all(found[candidate]):
            return candidate
    # No folder has both; one that has half of the pair is most likely what the user meant.
    for candidate in candidates:
        if any(found[candidate]):
            missing = stems[found[candidate].index(False)]
            raise FileNotFoundError(f"{missing}(.gz) is missing from {candidate} (its companion file is there)")
    raise FileNotFoundError(
        f"{spec.name} {'training' if train else 'test'} files ({' and '.join(s + '(.gz)' for s in stems)}) "
        f"not found in any of: {', '.join(candidates)}; pass --download to fetch them"
    )


def load_split(directory, dataset="mnist", train=True):
    """Load the training or test split of `dataset` from `directory` into memory.

    Returns a `Split` (images uint8 [N, *image_shape], labels int64 [N]), by the entry's loader.
    Corrupt or truncated files raise ValueError naming the file and the problem (see
    `reference.mnist.read_idx`); images of another shape than the entry's raise ValueError.
    """
    spec = dataset_spec(dataset)
    split = spec.loader(spec, directory, train)
    if tuple(split.images.shape[1:]) != tuple(spec.image_shape):
        raise ValueError(f"{spec.name} images in {directory} have shape {list(split.images.shape[1:])}, "
                         f"expected {list(spec.image_shape)}")
    return split


def _md5(path, digest_of):
    digest = hashlib.md5()
    try:
        with (gzip.open(path, "rb") if digest_of == "content" else open(path, "rb")) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a complete gzip stream ({e})") from e
    return digest.hexdigest()


def _verify(path, idx_file):
    """Raise ValueError unless the file at `path` has idx_file's MD5."""
    actual = _md5(path, idx_file.digest_of)
    if actual != idx_file.md5:
        what = "its decompressed content" if idx_file.digest_of == "content" else "the .gz file"
        raise ValueError(f"{path}: MD5 of {what} is {actual}, expected {idx_file.md5} for {idx_file.stem}")


def download(directory, dataset="mnist", *, mirrors=None, progress=print):
    """Fetch the four `.gz` files of `dataset` into `directory/<MNIST|FashionMNIST>/raw`.

    Files already there that pass their checksum are kept. Each download goes to a temporary
    file in the same folder, is verified, and only then renamed into place; every failure
    (network error, checksum mismatch, broken gzip) removes the temporary file and tries the
    next mirror. Raises DownloadError, listing each mirror's failure, when no mirror works.
    mirrors: base URLs to use instead of the canonical ones (any scheme urllib opens, file:// too).
    Returns the folder the files are in.
    """
    spec = dataset_spec(dataset)
    target = os.path.join(os.fspath(directory), spec.folder, "raw")
    os.makedirs(target, exist_ok=True)
    for idx_file in spec.files:
        name = idx_file.stem + ".gz"
        final = os.path.join(target, name)
        failures = []
        if os.path.isfile(final):
            try:
                _verify(final, idx_file)
                continue
            except ValueError as e:
                failures.append(f"existing file: {e}")
        for mirror in mirrors or spec.mirrors:
            url = mirror.rstrip("/") + "/" + name
            progress(f"downloading {url}")
            fd, partial = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
            default_permissions(fd)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
                _verify(partial, idx_file)
                os.replace(partial, final)
                break
            except (OSError, ValueError) as e:                        # URLError is an OSError
                failures.append(f"{url}: {e}")
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
        else:
            raise DownloadError(f"could not download {name} of {spec.name}:\n  " + "\n  ".join(failures))
    return target


def derive_seed(*keys):
    """A 64-bit seed from a tuple of non-negative integers (e.g. run seed, stream, epoch).

    Every random draw of the data pipeline is a pure function of such a key, so a resumed or a
    distributed run draws exactly what an uninterrupted single-process run draws.
    """
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def _generator(*keys):
    return torch.Generator().manual_seed(derive_seed(*keys))


def validation_split(count, validation_size, seed=0):
    """Indices (train, validation) of a seeded random split of `count` samples.

    The validation part is `validation_size` samples; both parts are disjoint and together
    cover range(count). The split depends only on (count, validation_size, seed).
    """
    if not 0 < validation_size < count:
        raise ValueError(f"validation_size must be in [1, {count - 1}] for {count} samples, got {validation_size}")
    order = torch.randperm(count, generator=_generator(seed, 0))
    return order[validation_size:], order[:validation_size]


def epoch_order(count, seed, epoch):
    """The shuffled order of `count` training samples in `epoch` (a function of seed and epoch)."""
    return torch.randperm(count, generator=_generator(seed, 1, epoch))


def shift_generator(seed, step):
    """The generator of the random shifts of global training step `step` (see `random_shift`)."""
    return _generator(seed, 2, step)


def random_shift(images, max_shift=2, *, generator=None):
    """Translate each image by its own random (dy, dx), uniform in [-max_shift, max_shift]^2.

    images [B, C, H, W] (any dtype) -> the same shape, vacated pixels zero. Pads by max_shift
    and gathers one H x W window per sample with a single advanced-indexing operation.
    generator: a CPU torch.Generator for the offsets (they are drawn on the CPU, so the same
    generator gives the same shifts on every device).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {list(images.shape)}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    if max_shift == 0:
        return images
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)                            # [B, C, H+2m, W+2m]
    start = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator).to(device)  # window corner
    rows = start[0, :, None] + torch.arange(height, device=device)      # [B, H]
    cols = start[1, :, None] + torch.arange(width, device=device)       # [B, W]
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]                                                                   # [B, C, H, W]


def default_permissions(fd):
    """Give a file from tempfile.mkstemp (mode 0600) the mode open() would: 0666 less the umask,
    so that downloads and checkpoints renamed into place are as readable as any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def to_float(images):
    """uint8 pixels [B, C, H, W] -> float32 in [0, 1], the model's input (and decoder target)."""
    return images.to(torch.float32) / 255.0
