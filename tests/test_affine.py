"""Affine robustness (SPEC 9): mnist40 for training, the generated affNIST-like test set, the
reader of affNIST's own .mat files (on tiny files written here), and `evaluate` scoring a
mnist40 model on them."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capsnet_triton import evaluate, mnist_variants, train
from capsnet_triton.affnist import read_affnist, read_mat
from capsnet_triton.data import DownloadError, Split, dataset_spec, download, load_split
from capsnet_triton.synthetic import affine_transform
from idx_files import make_digits, write_dataset

TINY_MODEL = ["--conv-channels", "8", "--primary-types", "2", "--decoder-hidden", "16", "32"]


# --- MAT v5 files like affNIST's, written by hand ------------------------------------------------

def element(kind, payload):
    return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(name, array_class, shape, body):
    flags = element(6, struct.pack("<II", array_class, 0))
    dims = element(5, np.array(shape, dtype="<i4").tobytes())
    return element(14, flags + dims + element(1, name.encode()) + body)


def uint8_matrix(name, array):
    return matrix(name, 9, array.shape, element(2, np.asarray(array, dtype=np.uint8).tobytes(order="F")))


def text_matrix(name, text, kind):
    """A 1 x n char array stored as miUINT16 (kind 4, MATLAB's way) or UTF-8/16/32 (16, 17, 18)."""
    encoded = (np.array([ord(c) for c in text], dtype="<u2").tobytes() if kind == 4
               else text.encode({16: "utf-8", 17: "utf-16-le", 18: "utf-32-le"}[kind]))
    return matrix(name, 4, (1, len(text)), element(kind, encoded))


def struct_matrix(name, fields):
    """A 1 x 1 struct; each field an array (stored as uint8) or the bytes of a ready matrix element."""
    width = 32
    names = b"".join(field.encode().ljust(width, b"\0") for field in fields)
    body = struct.pack("<Ii", (4 << 16) | 5, width) + element(1, names)      # width as a small element
    values = (value if isinstance(value, bytes) else uint8_matrix("", value) for value in fields.values())
    return matrix(name, 2, (1, 1), body + b"".join(values))


def compressed(element_bytes):
    """A miCOMPRESSED element holding the given element, unpadded as MATLAB writes it."""
    packed = zlib.compress(element_bytes)
    return struct.pack("<II", 15, len(packed)) + packed


def write_mat(path, *elements):
    """A MAT v5 file: the 128-byte header, then the elements."""
    header = b"MATLAB 5.0 MAT-file, written by the tests".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + b"".join(elements))


def write_affnist_mat(path, images, labels, compress, text_kind=4):
    """affNIST's layout: struct affNISTdata, image [1600, N] (column n: image n row-major), label_int [1, N],
    and fields the reader ignores (one of them text, stored as text_kind)."""
    record = struct_matrix("affNISTdata", {
        "image": images.reshape(len(images), 1600).T,
        "label_int": labels[None, :],
        "label_one_of_n": np.eye(10, dtype=np.uint8)[labels].T,
        "comment": text_matrix("", "affNIST-like, 40×40", text_kind),
    })
    write_mat(path, compressed(record) if compress else record)


def affnist_like(count, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 40, 40), dtype=np.uint8), rng.integers(0, 10, count).astype(np.uint8)


@pytest.mark.parametrize("compress, text_kind", [(False, 4), (True, 4), (False, 16), (True, 17), (False, 18)])
def test_read_affnist_single_file(tmp_path, compress, text_kind):
    """Text stored as UTF-8 (SciPy's savemat) failed the whole file before its images were read."""
    images, labels = affnist_like(7, 0)
    write_affnist_mat(tmp_path / "test.mat", images, labels, compress, text_kind)
    read_images, read_labels = read_affnist(tmp_path)
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)
    record = read_mat(tmp_path / "test.mat")["affNISTdata"]
    assert record["label_one_of_n"].shape == (10, 7) and record["comment"] == "affNIST-like, 40×40"


def test_read_affnist_batches_in_numeric_order(tmp_path):
    parts = [affnist_like(3, seed) for seed in range(32)]
    for n, (images, labels) in enumerate(parts, start=1):
        write_affnist_mat(tmp_path / "affNIST" / "test_batches" / f"{n}.mat", images, labels, compress=n % 2 == 0)
    split = load_split(tmp_path, "affnist", train=False)
    assert split.images.shape == (96, 1, 40, 40)
    assert torch.equal(split.images[:, 0], torch.from_numpy(np.concatenate([p[0] for p in parts])))
    assert torch.equal(split.labels, torch.from_numpy(np.concatenate([p[1] for p in parts])).long())


def test_affnist_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not downloaded by this package: pass its folder with --data"):
        read_affnist(tmp_path)
    (tmp_path / "test.mat").write_bytes(b"\x89HDF\r\n" + b"\0" * 200)
    with pytest.raises(ValueError, match="not a MATLAB v5"):
        read_affnist(tmp_path)
    with pytest.raises(ValueError, match="test set only"):
        load_split(tmp_path, "affnist", train=True)
    with pytest.raises(DownloadError, match="no download"):
        download(tmp_path, "affnist")


def test_damaged_or_foreign_affnist_files_are_refused_naming_the_file(tmp_path):
    images, labels = affnist_like(4, 1)
    path = tmp_path / "test.mat"
    write_affnist_mat(path, images, labels, compress=True)
    whole = path.read_bytes()
    for damaged in (whole[:-40], whole[:200] + b"\xff" * 40 + whole[240:]):   # cut short; zlib stream broken
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"{path}: truncated or damaged"):
            read_affnist(tmp_path)
    # Values a uint8 cast would hide: pixels past 255 (stored as uint16 here) or between two bytes
    # (float64 halves), a label of 10.
    wide = matrix("", 9, (1600, 4), element(4, np.full((1600, 4), 300, "<u2").tobytes(order="F")))
    fractional = matrix("", 6, (1600, 4), element(9, np.full((1600, 4), 0.5, "<f8").tobytes(order="F")))
    for fields, what in (({"image": wide, "label_int": labels[None, :]}, r"image must hold whole numbers in \[0, 255\]"),
                         ({"image": fractional, "label_int": labels[None, :]}, r"image must hold whole numbers"),
                         ({"image": images.reshape(4, 1600).T, "label_int": np.array([[1, 2, 10, 3]])},
                          r"label_int must hold whole numbers in \[0, 9\]")):
        write_mat(path, struct_matrix("affNISTdata", fields))
        with pytest.raises(ValueError, match=what):
            read_affnist(tmp_path)


def test_a_batch_folder_missing_a_file_or_holding_an_extra_one_is_refused(tmp_path):
    folder = tmp_path / "test_batches"
    for n in (1, 2, 3):
        write_affnist_mat(folder / f"{n}.mat", *affnist_like(2, n), compress=False)
    (folder / "3 (copy).mat").write_bytes((folder / "3.mat").read_bytes())
    with pytest.raises(ValueError, match=r"missing \['10.mat', .*unexpected \['3 \(copy\).mat'\]"):
        read_affnist(tmp_path)


# --- mnist40 and the generated set --------------------------------------------------------------

def test_mnist40_and_generated_sets(tmp_path):
    write_dataset(tmp_path, train_count=20, test_count=12)
    train_split = load_split(tmp_path, "mnist40", train=True)
    digits, labels = make_digits(20, 0)
    assert train_split.images.shape == (20, 1, 40, 40)
    assert torch.equal(train_split.images[:, 0, 6:34, 6:34], torch.from_numpy(digits))
    assert int(train_split.images.sum()) == int(digits.astype(np.int64).sum())
    evaluation = dataset_spec("mnist40").evaluation_split(load_split(tmp_path, "mnist40", train=False), True)
    assert evaluation.images.shape == (12, 1, 40, 40) and not torch.equal(evaluation.images[:, 0, 6:34, 6:34],
                                                                       torch.from_numpy(make_digits(12, 1)[0]))
    generated = load_split(tmp_path, "affnist-generated", train=False)
    assert generated.images.shape == (12, 1, 40, 40) and generated.images.dtype == torch.uint8
    assert torch.equal(generated.labels, torch.from_numpy(make_digits(12, 1)[1]).long())
    assert torch.equal(generated.images, load_split(tmp_path, "affnist-generated", train=False).images)
    with pytest.raises(ValueError, match="test set only"):
        load_split(tmp_path, "affnist-generated", train=True)


def test_evaluate_scores_a_mnist40_model_on_the_generated_set_and_affnist(tmp_path, capsys):
    data_dir = tmp_path / "digits"
    write_dataset(data_dir, train_count=80, test_count=20)
    write_affnist_mat(data_dir / "test.mat", *affnist_like(9, 3), compress=True)
    out = tmp_path / "run"
    assert train.main(["--data", str(data_dir), "--dataset", "mnist40", "--out", str(out), "--epochs", "1",
                       "--batch-size", "16", "--validation-size", "16", "--limit-train", "32",
                       "--device", "cpu", "--no-verify-data", *TINY_MODEL]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["config"]["max_shift"] == 6
    capsys.readouterr()
    own_figure = (out / "reconstructions.png").read_bytes()
    assert evaluate.main([str(out / "best.pt"), "--dataset", "affnist-generated", "--device", "cpu",
                          "--no-verify-data"]) == 0
    assert "affnist-generated test accuracy" in capsys.readouterr().out
    # Figures of another dataset go to a subfolder named after it; the run's own stay, training curves, which are not about that dataset, are not copied there.
    assert set(os.listdir(out / "affnist-generated")) == {"reconstructions.png", "perturbations.png", "evaluation.json"}
    assert (out / "reconstructions.png").read_bytes() == own_figure
    assert evaluate.main([str(out / "best.pt"), "--dataset", "affnist", "--device", "cpu",
                          "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    assert "affnist test accuracy" in printed and "on 9 images" in printed
    with pytest.raises(SystemExit) as stopped:                   # a usage error, said before any data is read
        evaluate.main([str(out / "best.pt"), "--dataset", "mnist", "--device", "cpu", "--no-verify-data"])
    assert stopped.value.code == 2 and "cannot score mnist" in capsys.readouterr().err


def test_the_generated_set_is_the_affine_transform_rounded_to_bytes(tmp_path, monkeypatch):
    """Pixels are rounded to the nearest byte, not truncated (which darkens every pixel)."""
    write_dataset(tmp_path, train_count=4, test_count=16)
    seen = []

    def spy(images, *, generator):
        out, params = affine_transform(images, generator=generator)
        seen.append(out)
        return out, params

    monkeypatch.setattr(mnist_variants, "affine_transform", spy)
    generated = load_split(tmp_path, "affnist-generated", train=False, verify=False)
    (floats,) = seen
    assert torch.equal(generated.images, torch.round(floats * 255.0).to(torch.uint8))


def test_mnist40_evaluation_digits_take_every_position_of_the_training_range():
    """Validation and test digits of mnist40 are moved by up to 6 pixels (its max_shift) each way."""
    digits = F.pad(torch.full((400, 1, 28, 28), 200, dtype=torch.uint8), (6,) * 4)
    shifted = dataset_spec("mnist40").evaluation_split(Split(digits, torch.arange(400) % 10), True)
    tops = torch.argmax((shifted.images[:, 0].sum(dim=2) > 0).int(), dim=1) - 6
    lefts = torch.argmax((shifted.images[:, 0].sum(dim=1) > 0).int(), dim=1) - 6
    assert sorted(set(tops.tolist())) == list(range(-6, 7)) == sorted(set(lefts.tolist()))


def test_read_mat_reads_compressed_variables_one_after_another(tmp_path):
    """miCOMPRESSED elements are not padded to 8 bytes: the next one starts right after."""
    first, second = np.arange(6, dtype=np.uint8).reshape(2, 3), np.full((3, 2), 9, dtype=np.uint8)
    variables = [compressed(uint8_matrix(name, array)) for name, array in (("a", first), ("b", second))]
    assert len(variables[0]) % 8 != 0
    write_mat(tmp_path / "two.mat", *variables)
    variables = read_mat(tmp_path / "two.mat")
    assert np.array_equal(variables["a"], first) and np.array_equal(variables["b"], second)
