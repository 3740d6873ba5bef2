"""MNIST, Fashion-MNIST and the paper's MNIST-derived sets as in-memory tensors: finding,
downloading, splitting, augmenting.

Each dataset is one entry of DATASETS (a `DatasetSpec`): its image shape, number of classes,
loader and files, and how its training batches and its evaluation split are made from what the
loader read. Training, evaluation and `model.build_model` read everything from there, so a new
dataset is a new entry. Besides MNIST and Fashion-MNIST (SPEC 9):
- multimnist: pairs of overlapping MNIST digits on 36 x 36 (`synthetic.multimnist`), drawn
  afresh for every training step from (seed, step), and fixed by a seed for validation (one
  pair per held-out digit) and test (ten per test digit);
- mnist40: MNIST on a 40 x 40 canvas, each digit at a random position (shifts of up to 6);
- affnist-generated: a test set of the MNIST test digits on 40 x 40 under random affine maps of
  affNIST's ranges (`synthetic.affine_transform`), fixed by a seed; generated, not affNIST;
- affnist: affNIST's own test files, for those who have them (`affnist.read_affnist`).

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

import glob
import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .losses import check_labels
from .reference.mnist import SPLIT_FILES, find_idx, find_split, read_idx, read_split
from .synthetic import multimnist

__all__ = [
    "DATASETS", "DatasetSpec", "IdxFile", "Split", "Batch", "DownloadError", "dataset_spec", "multimnist",
    "find_split_dir", "verify_split", "load_split", "load_idx_split", "download", "validation_split", "epoch_order",
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


def _as_loaded(split, *_):
    return split


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: what its examples look like, how to load a split, and where its files come from.

    loader(spec, directory, train) -> Split reads one split from `directory`; `load_split`
    checks that its images have stored_shape (image_shape unless the examples are built from
    what is stored, like MultiMNIST's pairs from 28 x 28 digits).
    training_split(split) -> what training draws its batches from: an object with len() and
    augmented(index, seed, step, max_shift) -> Batch (a Split, or a `PairSource`).
    evaluation_split(split, test) -> the fixed split that validation (test=False) or the test
    (test=True) scores: an object with len(), subset(), to(device) and batch(index) -> Batch.
    defaults: training options whose default differs for this dataset.
    metric: the name of what `evaluate` counts as right, for printing.
    test_only: a test set with no training split (affNIST and its generated stand-in): the
    training command does not offer it, and load_split refuses its training split.
    digit_shape: for examples that place a smaller digit on a larger canvas (MultiMNIST,
    mnist40), the digit's (channels, height, width): the training command caps --max-shift so
    that a shifted digit stays whole on the canvas.
    """

    name: str
    image_shape: tuple           # (channels, height, width) of one example
    num_classes: int
    loader: Callable
    folder: str                  # torchvision's class name, the folder above `raw/`
    mirrors: tuple
    files: tuple                 # IdxFile: train images, train labels, test images, test labels
    stored_shape: tuple = None
    training_split: Callable = _as_loaded
    evaluation_split: Callable = _as_loaded
    defaults: dict = field(default_factory=dict)
    metric: str = "accuracy"
    test_only: bool = False
    digit_shape: tuple = None

    def split_files(self, train):
        """The (images, labels) IdxFile pair of the training or the test split."""
        return self.files[0:2] if train else self.files[2:4]


def load_idx_split(spec, directory, train):
    """The loader of MNIST-format datasets: a split's IDX pair from `find_split_dir`."""
    images, labels = read_split(find_split_dir(directory, spec.name, train), train=train)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


# Every MNIST-format dataset ships the same four files: train images, labels, test images, labels.
IDX_STEMS = SPLIT_FILES[True] + SPLIT_FILES[False]


def mnist_format(name, folder, mirrors, md5s, digest_of="content"):
    """The entry of a 28 x 28 grey, ten-class dataset in MNIST's IDX files, with the MD5s of
    IDX_STEMS' four files (what they cover: `IdxFile.digest_of`)."""
    return DatasetSpec(name=name, image_shape=(1, 28, 28), num_classes=10, loader=load_idx_split,
                       folder=folder, mirrors=mirrors,
                       files=tuple(IdxFile(stem, md5, digest_of) for stem, md5 in zip(IDX_STEMS, md5s, strict=True)))


DATASETS = {
    # MD5s of the decompressed files: mirrors serve byte-different gzips of the same data.
    "mnist": mnist_format(
        "mnist", "MNIST",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
         "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")),
    # The MD5s torchvision publishes (torchvision/datasets/mnist.py), which are of the .gz files.
    "fashion-mnist": mnist_format(
        "fashion-mnist", "FashionMNIST",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        digest_of="gzip"),
}


class Batch(NamedTuple):
    """One batch as the model and `losses.capsnet_loss` take it."""

    images: torch.Tensor           # float [B, C, H, W] in [0, 1], the model's input
    labels: torch.Tensor           # int64 [B], or [B, K]: the K distinct classes present (MultiMNIST: K = 2)
    targets: torch.Tensor          # what the decoder reconstructs: [B, C, H, W], or [B, K, C, H, W] one per label

    def shard(self, index):
        return Batch(*(tensor[index] for tensor in self))


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

    def batch(self, index):
        """The `Batch` of the samples at `index`: each image is its own target."""
        images = to_float(self.images[index])
        return Batch(images, self.labels[index], images)

    def augmented(self, index, seed, step, max_shift):
        """The training `Batch` of global step `step`: the samples at `index`, shifted (SPEC 6)."""
        generator = shift_generator(seed, step, self.images.device)
        images = to_float(random_shift(self.images[index], max_shift, generator=generator))
        return Batch(images, self.labels[index], images)


class DownloadError(OSError):
    """No mirror delivered a file that passed its checksum."""


class _ChecksumMismatch(ValueError):
    """A complete file whose MD5 is not the published one: another dataset's, or data changed on
    purpose (which --no-verify-data allows), unlike a broken file, which no flag makes readable."""


def dataset_spec(dataset):
    """The DATASETS entry named `dataset`; ValueError naming the choices for any other name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def find_split_dir(directory, dataset="mnist", train=True):
    """The folder under `directory` that holds both IDX files of a split (reference.mnist.find_split:
    `directory/<MNIST|FashionMNIST>/raw`, `directory/raw`, then `directory` itself; each file
    gzipped or not). Raises FileNotFoundError naming what is missing."""
    spec = dataset_spec(dataset)
    stems = SPLIT_FILES[bool(train)]
    # Said the same way by train and evaluate, which has no --download; a set built from MNIST's
    # files (MultiMNIST, mnist40, the generated affNIST-like set) names them as MNIST's.
    what = (f"{spec.name} {'training' if train else 'test'} files ({spec.folder}'s "
            f"{' and '.join(stem + '(.gz)' for stem in stems)})")
    return find_split(directory, train, spec.folder, what, f"the training command's --download fetches "
                                                           f"{spec.folder}'s files")


def load_split(directory, dataset="mnist", train=True, *, verify=False):
    """Load the training or test split of `dataset` from `directory` into memory.

    Returns a `Split` (images uint8 [N, *image_shape], labels int64 [N]), by the entry's loader.
    Corrupt or truncated files raise ValueError naming the file and the problem (see
    `reference.mnist.read_idx`); images of another shape than the entry's, or labels outside
    [0, num_classes), raise ValueError. verify: first check the files' MD5s (`verify_split`).
    """
    spec = dataset_spec(dataset)
    if train and spec.test_only:
        raise ValueError(f"{spec.name} is a test set only: train on mnist40 and evaluate on it")
    if verify:
        verify_split(directory, dataset, train)
    split = spec.loader(spec, directory, train)
    expected = spec.stored_shape or spec.image_shape
    if tuple(split.images.shape[1:]) != tuple(expected):
        raise ValueError(f"{spec.name} images in {directory} have shape {list(split.images.shape[1:])}, "
                         f"expected {list(expected)}")
    check_labels(split.labels, len(split), spec.num_classes)
    return split


def _md5(path, digest_of, compressed):
    """MD5 of the file at `path`: of its IDX content ("content": decompressed when `compressed`,
    so a re-compressed copy has the digest of the original) or of the .gz file itself."""
    if digest_of == "gzip" and not compressed:
        raise ValueError(f"{path}: the published MD5 is of the .gz file, so an uncompressed copy cannot be "
                         f"checked; use the .gz file, or pass --no-verify-data to skip the check")
    digest = hashlib.md5()
    try:
        with (gzip.open(path, "rb") if compressed and digest_of == "content" else open(path, "rb")) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a complete gzip stream ({e})") from e
    return digest.hexdigest()


def _verify(path, idx_file, compressed=None):
    """Raise ValueError unless the file at `path` (gzipped if `compressed`, by default if its
    name ends in .gz) has idx_file's MD5."""
    compressed = path.endswith(".gz") if compressed is None else compressed
    actual = _md5(path, idx_file.digest_of, compressed)
    if actual != idx_file.md5:
        what = ("the .gz file" if idx_file.digest_of == "gzip"
                else "its decompressed content" if compressed else "its content")
        raise _ChecksumMismatch(f"{path}: MD5 of {what} is {actual}, expected {idx_file.md5} for {idx_file.stem}")


def verify_split(directory, dataset="mnist", train=True):
    """Check both files of a split (where `find_split_dir` finds them) against their MD5s.

    Raises ValueError naming the file and both digests on the first mismatch (a file of another
    dataset, a modified or a corrupt one), or naming a file that is not a complete gzip stream;
    FileNotFoundError as `find_split_dir`.
    """
    spec = dataset_spec(dataset)
    folder = find_split_dir(directory, dataset, train)
    for idx_file in spec.split_files(train):
        path = find_idx(folder, idx_file.stem)
        try:
            _verify(path, idx_file)
        except _ChecksumMismatch as e:
            # An empty or cut file has a wrong MD5 too, but no flag makes it readable: say what is
            # wrong with it instead of offering --no-verify-data.
            read_idx(path)
            raise ValueError(f"{e} of {spec.name}; pass --no-verify-data to use other data deliberately") from e


def _split_in_place(directory, dataset, train):
    """Whether both files of a split are already somewhere `find_split_dir` looks, and pass."""
    try:
        verify_split(directory, dataset, train)
        return True
    except (OSError, ValueError):
        return False


def download(directory, dataset="mnist", *, mirrors=None, progress=print):
    """Fetch the `.gz` files of `dataset` into `directory/<MNIST|FashionMNIST>/raw`.

    A split whose two files are already where `find_split_dir` looks (flat in `directory`, in
    `raw/`, or in the dataset's folder) and pass their checksums is kept as it is; so are files
    already in the target folder that pass. Each download goes to a temporary file in the same
    folder, is verified, and only then renamed into place; every failure (network error,
    checksum mismatch, broken gzip) removes the temporary file and tries the next mirror.
    Raises DownloadError, listing each mirror's failure, when no mirror works.
    mirrors: base URLs to use instead of the canonical ones (any scheme urllib opens, file:// too).
    Returns the folder the downloads go to, which is created only when a file must be fetched.
    """
    spec = dataset_spec(dataset)
    if not spec.mirrors:
        raise DownloadError(f"{spec.name} has no download here: put its published files in the data folder")
    target = os.path.join(os.fspath(directory), spec.folder, "raw")
    for train in (True, False):
        if _split_in_place(directory, dataset, train):
            continue
        # Only now: files already in place need no folder (nor a path free of a file of its name).
        os.makedirs(target, exist_ok=True)
        for idx_file in spec.split_files(train):
            _fetch(idx_file, target, spec, mirrors or spec.mirrors, progress)
    return target


def _fetch(idx_file, target, spec, mirrors, progress):
    """Put idx_file's verified .gz into `target`, keeping the one there if it passes."""
    name = idx_file.stem + ".gz"
    final = os.path.join(target, name)
    # A download killed midway leaves its partial file: never mistaken for the file, but removed here.
    for stale in glob.glob(os.path.join(glob.escape(target), f".{name}.*.part")):
        os.remove(stale)
    failures = []
    if os.path.isfile(final):
        try:
            _verify(final, idx_file)
            return
        except ValueError as e:
            failures.append(f"existing file: {e}")
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        progress(f"downloading {url}")
        fd, partial = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
        default_permissions(fd)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out)
            _verify(partial, idx_file, compressed=True)
            os.replace(partial, final)
            return
        # URLError is an OSError; a response cut short raises http.client's IncompleteRead.
        except (OSError, ValueError, http.client.HTTPException) as e:
            failures.append(f"{url}: {e}")
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    # One line, as the commands report every error (training.errors): each mirror's failure after "; ".
    raise DownloadError(f"could not download {name} of {spec.name}: " + "; ".join(failures))


def derive_seed(*keys):
    """A 64-bit seed from a tuple of non-negative integers (e.g. run seed, stream, epoch).

    Every random draw of the data pipeline is a pure function of such a key, so a resumed or a
    distributed run draws exactly what an uninterrupted single-process run draws.
    """
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def _generator(*keys, device="cpu"):
    return torch.Generator(device).manual_seed(derive_seed(*keys))


def validation_split(count, validation_size, seed=0):
    """Indices (train, validation) of a seeded random split of `count` samples.

    The validation part is `validation_size` samples; both parts are disjoint and together
    cover range(count). The split depends only on (count, validation_size, seed).
    """
    if not 0 < validation_size < count:
        raise ValueError(f"--validation-size must be in [1, {count - 1}] for {count} training images, "
                         f"got {validation_size}; pass a smaller one")
    order = torch.randperm(count, generator=_generator(seed, 0))
    return order[validation_size:], order[:validation_size]


def epoch_order(count, seed, epoch):
    """The shuffled order of `count` training samples in `epoch` (a function of seed and epoch)."""
    return torch.randperm(count, generator=_generator(seed, 1, epoch))


def shift_generator(seed, step, device="cpu"):
    """The generator on `device` of the random shifts of global training step `step` (see
    `random_shift`). Seeding it is host-side work only: no transfer, no wait for the device."""
    return _generator(seed, 2, step, device=device)


def random_shift(images, max_shift=2, *, generator=None):
    """Translate each image by its own random (dy, dx), uniform in [-max_shift, max_shift]^2.

    images [B, C, H, W] (any dtype) -> the same shape, vacated pixels zero. Pads by max_shift
    and gathers one H x W window per sample with a single advanced-indexing operation.
    generator: a torch.Generator on the images' device for the offsets, which are drawn on that
    device so that a training step never copies them from the host (the draws of one seed are
    the same on every device of a type, CPU and CUDA draw different ones).
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
    start = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator, device=device)  # window corner
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


# The MNIST-derived datasets of SPEC 9 add their entries to DATASETS; imported last because they
# are built from the names above.
from . import mnist_variants  # noqa: E402,F401
