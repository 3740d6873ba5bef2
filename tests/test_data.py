"""The data pipeline: finding and loading IDX files, download with checksums, the validation
split, the epoch order and the random-shift augmentation."""

import dataclasses
import gzip
import hashlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton import data
from capsnet_triton.data import DATASETS, DownloadError, IdxFile
from idx_files import make_digits, write_dataset, write_idx, write_mnist

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- finding and loading --------------------------------------------------------------------

def test_load_flat_gz_layout(tmp_path):
    write_dataset(tmp_path, train_count=30, test_count=12)
    train = data.load_split(tmp_path, train=True)
    test = data.load_split(tmp_path, train=False)
    expected_images, expected_labels = make_digits(30, 0)
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and len(train) == 30 and len(test) == 12
    assert np.array_equal(train.images[:, 0].numpy(), expected_images)
    assert np.array_equal(train.labels.numpy(), expected_labels)


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_load_torchvision_layout_uncompressed(tmp_path, dataset, folder):
    write_dataset(tmp_path / folder / "raw", train_count=20, test_count=10, compress=False)
    assert data.find_split_dir(tmp_path, dataset, train=False) == os.path.join(tmp_path, folder, "raw")
    assert len(data.load_split(tmp_path, dataset, train=False)) == 10


def test_torchvision_layout_tells_the_datasets_apart(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw", train_count=20, test_count=10, seed=0)
    write_dataset(tmp_path / "FashionMNIST" / "raw", train_count=20, test_count=10, seed=5)
    mnist = data.load_split(tmp_path, "mnist", train=True)
    fashion = data.load_split(tmp_path, "fashion-mnist", train=True)
    assert not torch.equal(mnist.images, fashion.images)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        data.load_split(tmp_path, train=True)
    # evaluate says this too, and has no --download; a set built from MNIST names MNIST's files.
    with pytest.raises(FileNotFoundError, match=r"multimnist test files \(MNIST's t10k-images.*the training "
                                                r"command's --download fetches MNIST's files$"):
        data.load_split(tmp_path, "multimnist", train=False)
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        data.load_split(tmp_path / "nowhere", train=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", make_digits(5, 0)[0])
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_split(tmp_path, train=False)


def test_a_complete_folder_wins_over_a_half_filled_one(tmp_path):
    # What an interrupted --download leaves: one file of the pair in MNIST/raw, the set flat in DIR.
    write_dataset(tmp_path, train_count=12, test_count=6)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", make_digits(3, 9)[0])
    assert data.find_split_dir(tmp_path, train=False) == os.fspath(tmp_path)
    assert len(data.load_split(tmp_path, train=False)) == 6


def test_images_of_another_shape_than_the_entry_are_refused(tmp_path):
    write_mnist(tmp_path, 4, 3, np.random.default_rng(0), size=12)
    assert DATASETS["mnist"].image_shape == (1, 28, 28) and DATASETS["mnist"].num_classes == 10
    with pytest.raises(ValueError, match=r"have shape \[1, 12, 12\], expected \[1, 28, 28\]"):
        data.load_split(tmp_path, "mnist", train=False)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_split(tmp_path, "cifar")


def test_truncated_file_names_file_and_problem(tmp_path):
    write_dataset(tmp_path, train_count=10, test_count=5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        data.load_split(tmp_path, train=True)


def test_corrupt_gzip_names_file(tmp_path):
    write_dataset(tmp_path, train_count=10, test_count=5)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])                        # cut the stream and its trailer
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_split(tmp_path, train=False)


def test_image_and_label_counts_must_agree(tmp_path):
    write_dataset(tmp_path, train_count=10, test_count=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        data.load_split(tmp_path, train=False)


def test_real_mnist(mnist_dir):
    train = data.load_split(mnist_dir, "mnist", train=True)
    test = data.load_split(mnist_dir, "mnist", train=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert set(train.labels.unique().tolist()) == set(range(10)) == set(test.labels.unique().tolist())
    for idx_file in DATASETS["mnist"].files:                          # the pinned content checksums
        data._verify(os.path.join(mnist_dir, idx_file.stem + ".gz"), idx_file)


# --- download -------------------------------------------------------------------------------

def _fake_source(monkeypatch, mirror_dir, digest_of="content"):
    """Register a dataset 'tiny' whose checksums are those of the files in mirror_dir."""
    files = []
    for stem in STEMS:
        raw = (mirror_dir / f"{stem}.gz").read_bytes()
        digest = hashlib.md5(gzip.decompress(raw) if digest_of == "content" else raw).hexdigest()
        files.append(IdxFile(stem, digest, digest_of))
    source = dataclasses.replace(DATASETS["mnist"], name="tiny", folder="Tiny",
                                 mirrors=(mirror_dir.as_uri() + "/",), files=tuple(files))
    monkeypatch.setitem(DATASETS, "tiny", source)
    return source


@pytest.mark.parametrize("digest_of", ["content", "gzip"])
def test_download_from_local_mirror(tmp_path, monkeypatch, digest_of):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror, digest_of)
    messages = []
    target = data.download(tmp_path / "data", "tiny", progress=messages.append)
    assert target == os.path.join(tmp_path, "data", "Tiny", "raw")
    assert sorted(os.listdir(target)) == sorted(stem + ".gz" for stem in STEMS)   # no temporary left
    assert len(messages) == 4 and all(m.startswith("downloading file://") for m in messages)
    assert len(data.load_split(tmp_path / "data", "tiny", train=True)) == 20
    # Verified files already there are kept: a second call fetches nothing.
    messages.clear()
    data.download(tmp_path / "data", "tiny", mirrors=["file:///nonexistent/"], progress=messages.append)
    assert messages == []


def test_download_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    write_idx(mirror / "train-labels-idx1-ubyte.gz", np.ones(20, np.uint8))   # content changed after hashing
    with pytest.raises(DownloadError, match=r"train-labels-idx1-ubyte.gz.*MD5 of its decompressed content"):
        data.download(tmp_path / "data", "tiny", progress=lambda _: None)
    target = tmp_path / "data" / "Tiny" / "raw"
    assert sorted(os.listdir(target)) == ["train-images-idx3-ubyte.gz"]          # the file before it only


def test_download_broken_gzip_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    images = mirror / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(DownloadError, match="not a complete gzip stream"):
        data.download(tmp_path / "data", "tiny", progress=lambda _: None)
    assert os.listdir(tmp_path / "data" / "Tiny" / "raw") == []


def test_download_falls_back_to_next_mirror_and_replaces_corrupt_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    target = tmp_path / "data" / "Tiny" / "raw"
    target.mkdir(parents=True)
    (target / "t10k-images-idx3-ubyte.gz").write_bytes(b"not what it should be")
    data.download(tmp_path / "data", "tiny", mirrors=[(tmp_path / "empty").as_uri(), mirror.as_uri()],
                  progress=lambda _: None)
    assert (target / "t10k-images-idx3-ubyte.gz").read_bytes() == (mirror / "t10k-images-idx3-ubyte.gz").read_bytes()
    assert len(os.listdir(target)) == 4


def test_a_response_cut_short_moves_on_to_the_next_mirror_and_stale_partials_go(tmp_path, monkeypatch):
    """A chunked response cut mid-transfer raises http.client's IncompleteRead, which is neither
    an OSError nor a ValueError; and a download killed midway leaves a hidden .part file."""
    import http.client
    import urllib.request
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    target = tmp_path / "data" / "Tiny" / "raw"
    target.mkdir(parents=True)
    stale = target / ".train-images-idx3-ubyte.gz.k1ll3d.part"
    stale.write_bytes(b"half a file")
    real_urlopen = urllib.request.urlopen

    class CutShort:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, *args):
            raise http.client.IncompleteRead(b"partial", 1000)

    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, **kw: CutShort() if url.startswith("http://cut/") else real_urlopen(url, **kw))
    data.download(tmp_path / "data", "tiny", mirrors=["http://cut/", mirror.as_uri()], progress=lambda _: None)
    assert sorted(os.listdir(target)) == sorted(stem + ".gz" for stem in STEMS)


def test_download_every_mirror_failing_lists_each(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    with pytest.raises(DownloadError) as error:
        data.download(tmp_path / "data", "tiny", mirrors=[(tmp_path / "a").as_uri(), (tmp_path / "b").as_uri()],
                      progress=lambda _: None)
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)
    assert "\n" not in str(error.value)                 # the commands' errors are one line


def test_download_keeps_valid_files_of_a_flat_folder(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    flat = tmp_path / "flat"
    write_dataset(flat, train_count=20, test_count=10)                # the same files, straight in the folder
    messages = []
    data.download(flat, "tiny", mirrors=["file:///nonexistent/"], progress=messages.append)
    assert messages == [] and not (flat / "Tiny").exists()              # no empty folder left behind
    # A split that does not pass is fetched whole into the dataset's folder; the other stays.
    write_idx(flat / "t10k-labels-idx1-ubyte.gz", np.ones(10, np.uint8))
    data.download(flat, "tiny", progress=messages.append)
    assert sorted(os.listdir(flat / "Tiny" / "raw")) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert data.find_split_dir(flat, "tiny", train=True) == str(flat)
    for train in (True, False):
        data.verify_split(flat, "tiny", train)


def test_download_of_files_in_place_needs_no_target_folder(tmp_path, monkeypatch):
    # Even where a file holds the target folder's name, as long as nothing must be fetched.
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    flat = tmp_path / "flat"
    write_dataset(flat, train_count=20, test_count=10)
    (flat / "Tiny").write_text("not a folder")
    data.download(flat, "tiny", mirrors=["file:///nonexistent/"], progress=lambda _: None)
    assert (flat / "Tiny").read_text() == "not a folder"


def test_verify_split_names_the_file_and_both_digests(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    source = _fake_source(monkeypatch, mirror)
    plain = tmp_path / "plain"
    write_dataset(plain, train_count=20, test_count=10, compress=False)   # content digests: raw files pass
    data.verify_split(plain, "tiny", train=True)
    labels = plain / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(20, np.uint8))
    actual = hashlib.md5(labels.read_bytes()).hexdigest()
    with pytest.raises(ValueError) as error:
        data.verify_split(plain, "tiny", train=True)
    assert str(labels) in str(error.value) and actual in str(error.value) and source.files[1].md5 in str(error.value)
    assert len(data.load_split(plain, "tiny", train=True)) == 20           # unverified loads still work
    with pytest.raises(ValueError, match=str(labels)):
        data.load_split(plain, "tiny", train=True, verify=True)
    # A digest of the .gz file cannot check an uncompressed copy: said so, not a false mismatch.
    _fake_source(monkeypatch, mirror, digest_of="gzip")
    with pytest.raises(ValueError, match="uncompressed copy cannot be checked"):
        data.verify_split(plain, "tiny", train=False)


def test_only_a_checksum_mismatch_suggests_skipping_the_check(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_dataset(mirror, train_count=20, test_count=10)
    _fake_source(monkeypatch, mirror)
    labels = mirror / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(10, np.uint8))                            # complete, but other content
    with pytest.raises(ValueError, match="MD5 of its decompressed content.*pass --no-verify-data"):
        data.verify_split(mirror, "tiny", train=False)
    labels.write_bytes(labels.read_bytes()[:-12])                        # broken: no flag makes it readable
    with pytest.raises(ValueError, match="not a complete gzip stream") as error:
        data.verify_split(mirror, "tiny", train=False)
    assert "--no-verify-data" not in str(error.value)
    # Complete gzip streams whose content no flag makes readable either: nothing, a cut IDX file.
    write_idx(labels, np.zeros(10, np.uint8))
    cut = gzip.decompress(labels.read_bytes())[:-3]
    for content, problem in ((b"", "0 bytes is too short for an IDX header"), (cut, "truncated")):
        labels.write_bytes(gzip.compress(content))
        with pytest.raises(ValueError, match=problem) as error:
            data.verify_split(mirror, "tiny", train=False)
        assert "--no-verify-data" not in str(error.value)


def test_labels_out_of_range_are_refused_at_load(tmp_path, monkeypatch):
    # Whatever the loader, a split's labels are range-checked once, when it is loaded.
    def loader(spec, directory, train):
        return data.Split(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 5, 10]))

    monkeypatch.setitem(DATASETS, "bad", dataclasses.replace(DATASETS["mnist"], name="bad", loader=loader))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.load_split(tmp_path, "bad", train=False)


def test_shifts_are_drawn_on_the_images_device_from_a_generator_there():
    images = torch.rand(8, 1, 28, 28)
    generator = data.shift_generator(3, 11, images.device)
    assert generator.device == images.device
    assert torch.equal(data.random_shift(images, 2, generator=generator),
                       data.random_shift(images, 2, generator=data.shift_generator(3, 11)))


def test_download_real_mnist_checksums(tmp_path, mnist_dir):
    # The real files served from a file:// mirror pass the pinned MNIST checksums.
    target = data.download(tmp_path, "mnist", mirrors=[f"file://{os.path.abspath(mnist_dir)}/"],
                           progress=lambda _: None)
    assert len(data.load_split(tmp_path, "mnist", train=False)) == 10000
    assert target == os.path.join(tmp_path, "MNIST", "raw")


# --- split, order, augmentation -------------------------------------------------------------

def test_validation_split_disjoint_and_fixed_by_seed():
    train, val = data.validation_split(1000, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(1000))
    again_train, again_val = data.validation_split(1000, 100, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, data.validation_split(1000, 100, seed=4)[1])
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="--validation-size must be in"):
            data.validation_split(1000, bad)


def test_epoch_order_is_a_permutation_per_epoch():
    first, second = data.epoch_order(500, seed=1, epoch=0), data.epoch_order(500, seed=1, epoch=1)
    assert torch.equal(torch.sort(first).values, torch.arange(500))
    assert not torch.equal(first, second)
    assert torch.equal(first, data.epoch_order(500, seed=1, epoch=0))


def _shifted(image, dy, dx):
    """image [C, H, W] moved down by dy and right by dx, zero filled (the slow obvious way)."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    if abs(dy) >= height or abs(dx) >= width:
        return out                                  # moved wholly off (and negative stops would wrap)
    out[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[:, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


@given(batch=st.integers(1, 6), channels=st.integers(1, 2), height=st.integers(1, 9), width=st.integers(1, 9),
       max_shift=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_random_shift_is_a_translation_by_at_most_max_shift(batch, channels, height, width, max_shift, seed):
    images = torch.randint(1, 256, (batch, channels, height, width), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    out = data.random_shift(images, max_shift, generator=torch.Generator().manual_seed(seed))
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets = range(-max_shift, max_shift + 1)
    for image, moved in zip(images, out):
        # Some translation within the bound explains the output (several only when it moved the
        # whole tiny image out, leaving zeros).
        assert any(torch.equal(moved, _shifted(image, dy, dx)) for dy in offsets for dx in offsets)


def test_random_shift_preserves_interior_content_and_uses_every_offset():
    images = torch.zeros(400, 1, 28, 28)
    images[:, :, 2:26, 2:26] = torch.rand(400, 1, 24, 24) + 0.1        # nothing within 2 pixels of the border
    out = data.random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
    seen = set()
    for image, moved in zip(images, out):
        nonzero = moved[0].nonzero()
        dy, dx = (nonzero.min(dim=0).values - 2).tolist()
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        assert torch.equal(moved, _shifted(image, dy, dx))
        seen.add((dy, dx))
    assert len(seen) == 25                                             # uniform over [-2, 2]^2: all appear


def test_random_shift_is_reproducible_and_checks_arguments():
    images = torch.rand(8, 1, 28, 28)
    first = data.random_shift(images, 2, generator=data.shift_generator(0, 5))
    assert torch.equal(first, data.random_shift(images, 2, generator=data.shift_generator(0, 5)))
    assert not torch.equal(first, data.random_shift(images, 2, generator=data.shift_generator(0, 6)))
    assert data.random_shift(images, 0) is images
    with pytest.raises(ValueError, match="max_shift"):
        data.random_shift(images, -1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        data.random_shift(images[0], 2)


def test_to_float_scales_to_unit_interval():
    pixels = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    assert torch.equal(data.to_float(pixels), torch.tensor([[[[0.0, 128 / 255, 1.0]]]]))


def test_training_batches_reconstruct_what_they_show_and_depend_on_the_run_seed():
    """The decoder's target is the shifted image the model sees; the run's --seed and the step move the shifts."""
    images = torch.randint(1, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split, index = data.Split(images, torch.arange(40) % 10), torch.arange(40)
    batch = split.augmented(index, 1, 5, 2)
    assert torch.equal(batch.targets, batch.images) and not torch.equal(batch.images, data.to_float(images))
    assert not torch.equal(batch.images, split.augmented(index, 2, 5, 2).images)
    # Each global step draws its own shifts (one draw for all steps passed), the same again for a step.
    assert torch.equal(batch.images, split.augmented(index, 1, 5, 2).images)
    assert not torch.equal(batch.images, split.augmented(index, 1, 6, 2).images)


def test_a_flat_set_beside_mnist_in_its_torchvision_folder_loads_as_itself(tmp_path, rng):
    """Fashion-MNIST's files flat in DIR, MNIST's in DIR/MNIST/raw (where --download puts them):
    the folder found is the one read (and the one whose MD5s are checked), not MNIST's."""
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_mnist(tmp_path / "MNIST" / "raw", 3, 2, rng)
    write_mnist(tmp_path, 5, 4, rng)
    assert data.find_split_dir(tmp_path, "fashion-mnist", train=False) == str(tmp_path)
    assert len(data.load_split(tmp_path, "fashion-mnist", train=False)) == 4
    assert len(data.load_split(tmp_path, "mnist", train=False)) == 2
