"""Training that never lies: what the training and evaluation commands refuse, and how.

Each test is one failure a user can meet (bad flags, a run that diverges, wrong or corrupt
data, a cut log, a full disk), run through the commands on the tiny configuration and fake MNIST
files of tests/command_runs.py, in seconds. The run folder's checkpoints and lock are
tests/test_run_folder.py's.
"""

import errno
import gzip
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from capsnet_triton import evaluate, train, training
from capsnet_triton.data import DATASETS, load_split, verify_split
from capsnet_triton.training import allocator, errors, loop
from capsnet_triton.training.checkpoint import LOCK_NAME, payload_checksum, save_atomic
from capsnet_triton.training.config import build_parser
from capsnet_triton.training.log import RunLog
from command_runs import (args, copy_run, fake_mnist, finished_run, last_line, nan_from_step,  # noqa: F401 (fixtures)
                          one_line, read_records, run)
from idx_files import write_idx

pytestmark = pytest.mark.xdist_group("train_reliability")


# --- 1. numeric flags and diverging runs ----------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--reconstruction-weight", "nan", "--reconstruction-weight must be a finite number >= 0"),
    ("--reconstruction-weight", "-1", "--reconstruction-weight must be a finite number >= 0"),
    ("--reconstruction-weight", "inf", "--reconstruction-weight must be a finite number >= 0"),
    ("--lr", "inf", "--lr must be a number in (0, 1.0]"),
    ("--lr", "nan", "--lr must be a number in (0, 1.0]"),
    ("--lr", "5", "--lr must be a number in (0, 1.0]"),
    ("--lr-decay", "nan", "--lr-decay must be in (0, 1]"),
    ("--max-shift", "100", "--max-shift must be at most 7 pixels"),
    ("--seed", "-1", "--seed must not be negative"),
    ("--seed", str(2**32), "--seed must be at most 4294967295"),
    ("--split-seed", "-3", "--split-seed must not be negative"),
    ("--checkpoint-every", "-1", "--checkpoint-every must not be negative"),
    ("--limit-train", "7", "--limit-train 7 does not fill one batch of"),
])
def test_out_of_range_flags_are_refused_before_anything_runs(fake_mnist, tmp_path, capsys, flag, value, message):
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", flag, value), capsys)
    assert status == 2 and message in one_line(err)
    assert not (tmp_path / "run").exists()


def test_a_run_whose_loss_turns_nan_stops_and_keeps_its_finite_best(fake_mnist, tmp_path, capsys, monkeypatch):
    # Two epochs of two steps; the loss is NaN from step 3 on, in the second epoch.
    monkeypatch.setattr(loop, "capsnet_loss", nan_from_step(3, "loss"))
    out = tmp_path / "nan"
    status, err = run(train.main, args(fake_mnist, out, "--epochs", "2"), capsys)
    assert status == 1
    line = last_line(err)
    assert "training diverged: the loss or a gradient became NaN or infinite" in line
    # --lr cannot change on --resume: the advice is a new run.
    assert "start a new run (another --out) with a smaller --lr" in line
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["position"]["global_step"] == 2          # nothing of epoch 2 saved
    for state in (best["model"], last["model"]):
        assert all(torch.isfinite(value).all() for value in state.values())
    records = read_records(out / "log.jsonl")                                     # strict JSON only
    assert [r["event"] for r in records] == ["validation"]


def test_a_nan_gradient_under_a_finite_loss_is_caught_at_the_next_log_point(fake_mnist, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(loop, "capsnet_loss", nan_from_step(1, "gradient"))
    out = tmp_path / "nan_gradient"
    status, err = run(train.main, args(fake_mnist, out, "--log-every", "1"), capsys)
    # Raised inside the epoch: the progress bar is closed before the error's line, not redrawn after.
    assert status == 1 and last_line(err).startswith("python -m capsnet_triton.train: error: training diverged:")
    assert "became NaN or infinite by step 1" in last_line(err)
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert read_records(out / "log.jsonl") == []


def test_finite_gradients_diverge_only_where_adams_squares_overflow(fake_mnist, tmp_path, capsys, monkeypatch):
    """Gradients 1e21 times the true ones are finite, but the sum of their squares overflows
    float32: the run was stopped as diverged, though Adam's steps do not grow with the gradient.
    A gradient of 1e25 is finite too, but Adam's running square of it overflows to inf, and its
    parameter never moves again: that is divergence, with every gradient and parameter finite."""
    monkeypatch.setattr(loop, "capsnet_loss", nan_from_step(1, "gradient", factor=1e21))
    status, err = run(train.main, args(fake_mnist, tmp_path / "large", "--log-every", "1"), capsys)
    assert status == 0, err
    assert all(torch.isfinite(value).all() for value in torch.load(tmp_path / "large" / "best.pt")["model"].values())
    monkeypatch.undo()
    step = loop._train_step

    def with_a_huge_gradient(model, *rest):
        if not hasattr(model, "huge"):
            model.huge = model.digit_caps.weight.register_hook(lambda grad: torch.full_like(grad, 1e25))
        return step(model, *rest)

    monkeypatch.setattr(loop, "_train_step", with_a_huge_gradient)
    status, err = run(train.main, args(fake_mnist, tmp_path / "frozen", "--log-every", "1"), capsys)
    assert status == 1 and "parameter digit_caps.weight or its Adam state became NaN or infinite" in last_line(err)


def test_the_log_refuses_non_finite_numbers(tmp_path):
    log = RunLog(str(tmp_path / "log.jsonl"), enabled=True)
    log.write(event="train", loss=0.5)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        log.write(event="train", loss=float("nan"))
    log.close()
    assert read_records(tmp_path / "log.jsonl") == [{"event": "train", "loss": 0.5}]


# --- 2. dataset digests ---------------------------------------------------------------------

def content_md5(path):
    with gzip.open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_files_that_are_not_the_dataset_are_refused_before_the_first_step(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run(train.main, args(fake_mnist, out, verify=True), capsys)
    line = one_line(err)
    images = os.path.join(fake_mnist, "train-images-idx3-ubyte.gz")
    assert status == 1 and images in line and "--no-verify-data" in line
    assert content_md5(images) in line and DATASETS["mnist"].files[0].md5 in line
    assert os.listdir(out) == [LOCK_NAME]                                 # no step, no log, no checkpoint


def test_a_resumed_run_can_turn_the_data_checks_back_on(finished_run, fake_mnist, tmp_path, capsys):
    """--no-verify-data is kept by a resumed run, like --data; --verify-data turns it back (there
    was no such flag, so a run started without the checks never had them again)."""
    out = copy_run(finished_run, tmp_path / "run")
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2", "--verify-data"], capsys)
    assert status == 1 and "MD5" in one_line(err) and "--no-verify-data" in one_line(err)


def test_real_mnist_with_shifted_labels_is_refused_and_recompressed_copies_pass(mnist_dir, tmp_path, capsys):
    shifted = tmp_path / "shifted"
    shutil.copytree(mnist_dir, shifted)
    labels = load_split(mnist_dir, train=True).labels.numpy().astype(np.uint8)
    write_idx(shifted / "train-labels-idx1-ubyte.gz", (labels + 1) % 10)      # a valid gzip, wrong content
    status, err = run(train.main, args(shifted, tmp_path / "run", verify=True), capsys)
    line = one_line(err)
    expected = DATASETS["mnist"].files[1].md5
    assert status == 1 and "train-labels-idx1-ubyte.gz" in line and expected in line
    assert content_md5(shifted / "train-labels-idx1-ubyte.gz") in line
    # Content digests: the same data uncompressed (or compressed by another tool) passes.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in os.listdir(mnist_dir):
        with gzip.open(os.path.join(mnist_dir, name), "rb") as f:
            (plain / name[:-len(".gz")]).write_bytes(f.read())
    for train_split in (True, False):
        verify_split(plain, "mnist", train_split)


# --- 3. the log -----------------------------------------------------------------------------

def test_resume_drops_the_records_written_after_last_pt(finished_run, tmp_path, capsys):
    """Records past the length last.pt recorded belong to steps the resumed run redoes."""
    out = copy_run(finished_run, tmp_path / "run")
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"event": "train", "step": 999}\n' * 50)
    assert run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)[0] == 0
    assert not [r for r in read_records(out / "log.jsonl") if r.get("step") == 999]


@pytest.mark.parametrize("damage", ["truncated", "torn"])
def test_resume_refuses_a_log_that_differs_from_what_the_checkpoint_recorded(finished_run, tmp_path, capsys,
                                                                              damage):
    out = copy_run(finished_run, tmp_path / "run")
    log_path = out / "log.jsonl"
    data = log_path.read_bytes()
    if damage == "truncated":
        data = data[:100]
    else:
        data = data[:50] + b"\0" * 20 + data[70:]
    log_path.write_bytes(data)
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    line = one_line(err)
    assert status == 2 and str(log_path) in line                        # a usage error, before any data is read
    assert ("fewer than" if damage == "truncated" else "changed or torn") in line
    assert log_path.read_bytes() == data                                  # refused, not padded or cut


@pytest.mark.parametrize("module, name", [("log", "log.jsonl"), ("checkpoint", "last.pt")])
def test_a_run_file_this_process_may_not_read_is_one_line_naming_why(finished_run, tmp_path, capsys, monkeypatch,
                                                                     module, name):
    """(Permissions that root, running this suite, would ignore are stood in for by open.) The log
    check raised a traceback; a checkpoint was called corrupt, losing the reason."""
    out = copy_run(finished_run, tmp_path / "run")
    refused = str(out / name)

    def guarded_open(path, *args, **kwargs):
        if str(path) == refused:
            raise PermissionError(13, "Permission denied", refused)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(getattr(training, module), "open", guarded_open, raising=False)
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    assert status == 2 and "Permission denied" in one_line(err) and refused in one_line(err)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced files")
def test_the_log_is_made_durable_before_each_checkpoint(fake_mnist, tmp_path, monkeypatch):
    synced = []
    original = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train.main(args(fake_mnist, tmp_path / "run", "--log-every", "1", "--checkpoint-every", "1")) == 0
    saves = [i for i, name in enumerate(synced) if name.startswith(".last.pt.")]
    assert len(saves) == 2                                               # after step 1, at the epoch's end
    assert all(synced[i - 1] == "log.jsonl" for i in saves)


# --- 4. every split before the first step ---------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_test_files_stop_the_run_before_the_first_step(fake_mnist, tmp_path, capsys, damage):
    data = tmp_path / "data"
    shutil.copytree(fake_mnist, data)
    if damage == "missing":
        os.remove(data / "t10k-labels-idx1-ubyte.gz")
        name = "t10k-labels-idx1-ubyte"
    else:
        images = data / "t10k-images-idx3-ubyte.gz"
        images.write_bytes(images.read_bytes()[:300])
        name = "t10k-images-idx3-ubyte.gz"
    out = tmp_path / "run"
    status, err = run(train.main, args(data, out), capsys)
    assert status == 1 and name in one_line(err)
    assert os.listdir(out) == [LOCK_NAME]


# --- 5. errors as one line ------------------------------------------------------------------

def test_user_errors_are_one_line_with_usage_and_failure_statuses(finished_run, fake_mnist, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, err = run(train.main, args(fake_mnist, blocker / "run"), capsys)
    assert status == 2 and "cannot create the run folder" in one_line(err)
    status, err = run(train.main, args(fake_mnist, blocker), capsys)
    assert status == 2 and f"cannot create the run folder: {blocker} is a file" in one_line(err)
    # A data folder that is not there is an option's mistake, said before the run folder is made.
    for missing, state, extra in ((tmp_path / "no_data", "does not exist", []),
                                  (blocker, "is a file, not a folder", []),
                                  (blocker, "is a file, not a folder", ["--download"])):   # which cannot make it
        status, err = run(train.main, args(missing, tmp_path / "run", *extra), capsys)
        assert status == 2 and f"--data {missing} {state}" in one_line(err) and not (tmp_path / "run").exists()
    empty = tmp_path / "empty_data"
    empty.mkdir()
    status, err = run(train.main, args(empty, tmp_path / "run"), capsys)
    assert status == 1 and "train-images-idx3-ubyte" in one_line(err)
    status, err = run(train.main, args(empty, tmp_path / "run", "--verbose"), capsys)
    assert status == 1 and "Traceback" in err and "train-images-idx3-ubyte" in err.strip().splitlines()[-1]
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--validation-size", "6000"), capsys)
    assert status == 1 and "--validation-size must be in [1, 5099]" in one_line(err)
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--validation-size", "5090"), capsys)
    assert status == 1 and "10 training images do not fill one batch of 32; lower --batch-size or hold out fewer " \
        "than --validation-size 5090" in one_line(err)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    log = tmp_path / "log.jsonl"                  # once said to hold Python objects
    log.write_text('{"event": "train"}\n')
    for path, message in ((empty, "empty, truncated or corrupt"), (tmp_path / "none.pt", "no checkpoint file"),
                          (log, "or another kind of file (not the zip archive torch.save writes)")):
        status, err = run(evaluate.main, [str(path), "--data", fake_mnist, "--device", "cpu"], capsys)
        assert status == 2 and message in one_line(err)

    # A checkpoint whose config does not describe its weights (checksum intact).
    mismatched = torch.load(finished_run / "best.pt", weights_only=True)
    del mismatched["checksum"]
    mismatched["config"]["conv_channels"] = 8
    save_atomic({**mismatched, "checksum": payload_checksum(mismatched)}, tmp_path / "mismatched.pt")
    status, err = run(evaluate.main, [str(tmp_path / "mismatched.pt"), "--data", fake_mnist, "--device", "cpu"],
                      capsys)
    assert status == 2 and "do not fit the model its config describes" in one_line(err)


@pytest.mark.parametrize("edit, words", [
    (lambda config: config.pop("lr"), "lacks --lr"),
    (lambda config: config.update(dataset="cifar"), "has --dataset 'cifar'"),
    (lambda config: config.update(batch_size=16.0), "has --batch-size 16.0"),
    (lambda config: config.update(amp="no"), "has --amp 'no'"),
    (lambda config: config.update(decoder_hidden=[16]), "has --decoder-hidden [16]"),
])
def test_a_checkpoint_whose_config_no_option_could_give_is_one_usage_error(finished_run, fake_mnist, tmp_path,
                                                                            capsys, edit, words):
    """A checkpoint of another version, or edited (checksum intact), is refused by name by both
    commands, not with a KeyError or TypeError from deep in the run."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(out / name, weights_only=True)
        del checkpoint["checksum"]
        edit(checkpoint["config"])
        save_atomic({**checkpoint, "checksum": payload_checksum(checkpoint)}, out / name)
    for command, argv in ((train.main, ["--out", str(out), "--resume", "--epochs", "9"]),
                          (evaluate.main, [str(out / "best.pt"), "--data", fake_mnist, "--device", "cpu"])):
        status, err = run(command, argv, capsys)
        assert status == 2 and words in one_line(err) and "another version" in one_line(err), command


def test_the_command_line_process_ends_with_one_line_and_its_status(fake_mnist, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for extra, status, message in ((["--lr", "nan"], 2, "--lr must be a number"),
                                   (["--data", str(tmp_path / "no_data")], 2, "no_data does not exist"),
                                   (["--validation-size", "9999"], 1, "--validation-size must be in")):
        command = [sys.executable, "-m", "capsnet_triton.train", *args(fake_mnist, tmp_path / "run"), *extra]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == status and message in one_line(result.stderr)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_temporary(fake_mnist, tmp_path, capsys, monkeypatch):
    original = os.fsync

    def fsync(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    status, err = run(train.main, args(fake_mnist, out), capsys)
    line = err.strip().splitlines()[-1]
    assert status == 1 and "could not write" in line and "last.pt" in line and "No space left on device" in line
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_a_tie_keeps_the_first_best_model_and_the_seeds_range_ends_where_it_says(fake_mnist, tmp_path, capsys):
    """At lr 1e-9 both epochs validate alike: best.pt stays the first (a strict improvement
    only). The largest --seed trains; the split seed, part of the run, cannot change on --resume."""
    out = tmp_path / "tie"
    status, _ = run(train.main, args(fake_mnist, out, "--epochs", "2", "--lr", "1e-9", "--seed", str(2**32 - 1)),
                    capsys)
    validation = [r for r in read_records(out / "log.jsonl") if r["event"] == "validation"]
    assert status == 0 and validation[0]["accuracy"] == validation[1]["accuracy"]
    assert [r["best"] for r in validation] == [True, False]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "3", "--split-seed", "5"], capsys)
    assert status == 2 and "--split-seed 5, which differs from the run's" in one_line(err)


def test_device_cuda_without_cuda_is_a_usage_error(finished_run, fake_mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--device", "cuda"), capsys)
    assert status == 2 and "--device cuda" in one_line(err) and "--device cpu" in one_line(err)
    assert not (tmp_path / "run").exists()
    out = copy_run(finished_run, tmp_path / "resumed")
    status, err = run(train.main, ["--out", str(out), "--resume", "--device", "cuda"], capsys)
    assert status == 2 and "--device cuda" in one_line(err)


# --- 6. smaller ones ------------------------------------------------------------------------

def test_a_checkpoint_holding_python_objects_is_refused_without_advice_to_load_it_unsafely(fake_mnist, tmp_path,
                                                                                         capsys):
    path = tmp_path / "objects.pt"
    torch.save({"format": 1, "hook": print}, path)
    status, err = run(evaluate.main, [str(path), "--data", fake_mnist, "--device", "cpu"], capsys)
    line = one_line(err)
    assert status == 2 and "Python objects" in line and "weights_only" not in line


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_batch_the_processes_cannot_share_is_one_usage_error(fake_mnist, tmp_path, capsys,
                                                                               monkeypatch, rank):
    """Every rank parses the same command line: rank 0 alone says what is wrong, before any
    process group exists."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", str(rank))
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--batch-size", "16"), capsys)
    assert status == 2
    if rank == 0:
        assert "--batch-size 16 is split over the 3 processes torchrun started" in one_line(err)
    else:
        assert err == ""


def _raise(error):
    raise error


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_errors_say_which_rank_and_who_failed_first(monkeypatch, capsys, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    prefix = "" if rank == 0 else "rank 1: "
    assert errors.run_command("prog", False, _raise, ValueError("no data")) == 1
    assert capsys.readouterr().err == f"{prefix}prog: error: no data\n"
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1234")
    assert errors.run_command("prog", False, _raise, lost) == 1
    assert capsys.readouterr().err == f"{prefix}prog: stopped because another rank failed (its error is above)\n"
    # Ctrl-C reaches every rank through torchrun: one line, from rank 0.
    for owns_ctrl_c in (True, False):                   # a caller's argv or not: torchrun sent it to every rank
        assert errors.run_command("prog", False, _raise, KeyboardInterrupt(), owns_ctrl_c=owns_ctrl_c,
                                  after_ctrl_c=lambda: "continue with --resume") == errors.INTERRUPTED_STATUS
        err = capsys.readouterr().err
        assert err == ("prog: interrupted (Ctrl-C); continue with --resume\n" if rank == 0 else "")
    with pytest.raises(TypeError):                      # not a user's error: the traceback stays
        errors.run_command("prog", False, _raise, TypeError("a bug"))


def test_a_single_process_leaves_ctrl_c_to_a_caller_and_unknown_runtime_errors_alone(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(KeyboardInterrupt):
        errors.run_command("prog", False, _raise, KeyboardInterrupt(), owns_ctrl_c=False)
    with pytest.raises(RuntimeError):
        errors.run_command("prog", False, _raise, RuntimeError("Connection closed by peer"))
    # The process's own command: one line, whatever it was doing.
    assert errors.run_command("prog", False, _raise, KeyboardInterrupt()) == errors.INTERRUPTED_STATUS
    assert capsys.readouterr().err == "prog: interrupted (Ctrl-C)\n"


def test_real_mnist_is_told_apart_from_fashion_mnist(mnist_dir):
    verify_split(mnist_dir, "mnist", train=False)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: MD5 of the .gz file .* of fashion-mnist"):
        verify_split(mnist_dir, "fashion-mnist", train=False)


def test_help_shows_no_default_for_switches():
    text = " ".join(build_parser().format_help().split())
    assert "--no-decoder" in text and "(default: True)" not in text and "(default: False)" not in text
    assert "global batch, split over the ranks (default: 128)" in text


_FRESH_TENSOR_FAULTS = """
import resource, sys, torch
from capsnet_triton.training.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def page_faults(elements):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(elements)                                   # written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
page_faults(16 << 20)                                      # 64 MiB
print(kept, page_faults(8 << 20))                          # 32 MiB, which fits in the freed block
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_the_training_command_keeps_freed_memory_for_the_next_tensor():
    """By default glibc returns a freed 64 MiB block to the system and the next large tensor is
    faulted in page by page; after keep_freed_memory (what `python -m capsnet_triton.train` runs
    first) it reuses the block. Each case in its own process, whose allocator it changes."""
    env = {name: value for name, value in os.environ.items() if name not in allocator.USER_SETTINGS}
    faults = {}
    for case in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", _FRESH_TENSOR_FAULTS, case], env=env,
                                capture_output=True, text=True, timeout=120, check=True)
        kept, faults[case] = result.stdout.split()
        assert kept == ("True" if case == "keep" else "None")
    default, kept = int(faults["default"]), int(faults["keep"])
    assert default > 0 and kept <= default // 10, faults


def test_keep_freed_memory_leaves_an_allocator_the_user_chose(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False


@pytest.mark.parametrize("lr", [1e-3, 1e-7])
def test_the_learning_rate_decays_to_its_floor_and_never_above_lr(lr):
    """The floor is MIN_LR, or --lr where that is smaller: --lr 1e-7 trained at 1e-6 from its first step."""
    factor = loop._learning_rate_factor({"lr": lr, "lr_decay": 0.5, "lr_decay_steps": 1})
    rates = [lr * factor(step) for step in (0, 1, 60)]
    assert rates[0] == lr and rates[1] == pytest.approx(max(lr / 2, min(lr, loop.MIN_LR)), rel=1e-12)
    assert rates[2] == pytest.approx(min(lr, loop.MIN_LR), rel=1e-12)
