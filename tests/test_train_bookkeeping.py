"""What a training run writes and when, and the edges of what it accepts: checkpoints and log
records every N steps, train records as means of their window and epochs started afresh, the
ends of the documented ranges, a relative --data stored absolute, the test files checked too,
divergence caught before a periodic save and in validation, and the torchrun and argv entry
points' exits. Run through the commands on the tiny configuration of tests/command_runs.py."""

import errno
import importlib
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from command_runs import args, fake_mnist, nan_from_step, one_line, read_records, run  # noqa: F401 (fixtures)

from capsnet_triton import evaluate, train
from capsnet_triton.data import DATASETS, load_split
from capsnet_triton.model import build_model
from capsnet_triton.training import loop
from capsnet_triton.training.checkpoint import restore_training_state, rng_state
from capsnet_triton.training.config import build_parser, check_config
from idx_files import write_dataset, write_idx

pytestmark = pytest.mark.xdist_group("train_reliability")


def test_checkpoints_and_log_records_fall_every_n_steps(fake_mnist, tmp_path, capsys, monkeypatch):
    """7 steps an epoch: --checkpoint-every 3 saves after steps 3 and 6 (and at the epoch's end),
    --log-every 2 writes train records after steps 2, 4 and 6."""
    saved, real = [], loop.save_training_state

    def save(path, **kwargs):
        saved.append((kwargs["epoch"], kwargs["step_in_epoch"]))
        return real(path, **kwargs)
    monkeypatch.setattr(loop, "save_training_state", save)
    out = tmp_path / "run"
    status, err = run(train.main, args(fake_mnist, out, "--batch-size", "8", "--limit-train", "56",
                                       "--checkpoint-every", "3", "--log-every", "2"), capsys)
    assert status == 0, err
    assert saved == [(0, 3), (0, 6), (1, 0)]
    assert [r["step"] for r in read_records(out / "log.jsonl") if r["event"] == "train"] == [2, 4, 6]


def test_train_records_are_window_means_and_epochs_start_afresh(fake_mnist, tmp_path, capsys):
    """Each epoch's train_loss is the mean of its own steps' records (one step a record here),
    not of every step since the run began."""
    out = tmp_path / "run"
    status, err = run(train.main, args(fake_mnist, out, "--epochs", "2", "--log-every", "1"), capsys)
    assert status == 0, err
    records = read_records(out / "log.jsonl")
    for epoch in (1, 2):
        steps = [r["loss"] for r in records if r["event"] == "train" and r["epoch"] == epoch]
        (validation,) = [r for r in records if r["event"] == "validation" and r["epoch"] == epoch]
        assert len(steps) == 2 and validation["train_loss"] == pytest.approx(sum(steps) / len(steps), rel=1e-9)


def test_log_every_zero_is_a_usage_error(fake_mnist, tmp_path, capsys):
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--log-every", "0"), capsys)
    assert status == 2 and "--log-every must be positive" in one_line(err)


def test_a_reconstruction_weight_without_a_decoder_is_a_usage_error(fake_mnist, tmp_path, capsys):
    """It would change nothing: said, not ignored."""
    status, err = run(train.main, args(fake_mnist, tmp_path / "run", "--no-decoder", "--reconstruction-weight", "0.1"),
                      capsys)
    assert status == 2 and "--reconstruction-weight weighs the decoder's loss" in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("lr", 1.0), ("lr_decay", 1.0), ("reconstruction_weight", 0.0)])
def test_the_ends_of_the_documented_ranges_are_accepted(flag, value):
    """--lr in (0, 1], --lr-decay in (0, 1], --reconstruction-weight >= 0: their closed ends pass."""
    config = vars(build_parser().parse_args([]))
    config[flag] = value

    def error(message):
        raise AssertionError(message)
    check_config(config, error)


def test_the_optimizer_is_adam_at_the_papers_settings(fake_mnist, tmp_path, capsys):
    """SPEC 6: Adam at lr 1e-3 with its usual constants (no weight decay, not AdamW's decoupled
    one, not AMSGrad), each parameter with its two moments, as last.pt keeps the optimizer."""
    assert run(train.main, args(fake_mnist, tmp_path / "run"), capsys)[0] == 0
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    optimizer = checkpoint["optimizer"]
    (group,) = optimizer["param_groups"]
    assert group["initial_lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0 and not group["amsgrad"] and not group.get("decoupled_weight_decay", False)
    assert len(optimizer["state"]) == len(group["params"]) == len(list(build_model(checkpoint["config"]).parameters()))
    assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in optimizer["state"].values())


def test_a_relative_data_folder_is_stored_absolute(fake_mnist, tmp_path, capsys, monkeypatch):
    """--resume from another working directory finds the data the run was started with."""
    monkeypatch.chdir(os.path.dirname(fake_mnist))
    assert run(train.main, args(os.path.basename(fake_mnist), tmp_path / "run"), capsys)[0] == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["data"] == fake_mnist


def test_real_mnist_with_wrong_test_labels_is_refused_before_the_first_step(mnist_dir, tmp_path, capsys):
    """The MD5 check covers the test files too: MNIST whose t10k labels are shifted by one is
    refused before any training, not scored at the end."""
    shifted = tmp_path / "shifted"
    shutil.copytree(mnist_dir, shifted)
    labels = load_split(mnist_dir, train=False).labels.numpy().astype(np.uint8)
    write_idx(shifted / "t10k-labels-idx1-ubyte.gz", (labels + 1) % 10)
    status, err = run(train.main, args(shifted, tmp_path / "run", verify=True), capsys)
    assert status == 1 and "t10k-labels-idx1-ubyte.gz" in one_line(err)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_periodic_checkpoint_after_a_nan_step_is_not_written(fake_mnist, tmp_path, capsys, monkeypatch):
    """A NaN loss from the first step with --checkpoint-every 1: the save after it finds the
    divergence, so no last.pt of NaN parameters is written."""
    monkeypatch.setattr(loop, "capsnet_loss", nan_from_step(1, "loss"))
    out = tmp_path / "run"
    status, err = run(train.main, args(fake_mnist, out, "--checkpoint-every", "1"), capsys)
    assert status == 1 and "became NaN or infinite before step 2" in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_a_non_finite_validation_loss_is_called_divergence(fake_mnist, tmp_path, capsys, monkeypatch):
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": math.nan})
    status, err = run(train.main, args(fake_mnist, tmp_path / "run"), capsys)
    assert status == 1 and "training diverged: the validation loss of epoch 1 is nan" in err
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_failed_torchrun_worker_does_not_exit_0(fake_mnist, tmp_path, monkeypatch):
    """Under torchrun a worker ends by os._exit after a success only: a failure returns its status."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    exits = []
    monkeypatch.setattr(train, "run_command", lambda *a, **k: 1)
    monkeypatch.setattr(os, "_exit", exits.append)
    assert train.main(args(fake_mnist, tmp_path / "run")) == 1 and exits == []


def test_main_with_argv_leaves_the_allocator_alone(fake_mnist, tmp_path, monkeypatch):
    """main(argv), called from a caller's Python (a test runner), does not change the caller's
    allocator; the command line does (tests/test_train_reliability.py)."""
    called = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(train, "run_command", lambda *a, **k: 0)
    assert train.main(args(fake_mnist, tmp_path / "run")) == 0 and called == []


def test_mnist_trains_with_shifts_of_up_to_two_pixels_by_default():
    """SPEC 6's augmentation: the training command's default for MNIST and Fashion-MNIST."""
    assert build_parser().parse_args(["--data", "d"]).max_shift == 2
    assert "max_shift" not in DATASETS["mnist"].defaults and "max_shift" not in DATASETS["fashion-mnist"].defaults


def test_the_validation_split_is_drawn_from_the_split_seed(tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "digits", train_count=40, test_count=10)
    seen = []

    def spy(count, size, seed=0):
        seen.append(seed)
        raise RuntimeError("stop before any training")
    monkeypatch.setattr(loop, "validation_split", spy)
    with pytest.raises(RuntimeError, match="stop before any training"):
        train.main(["--data", str(data_dir), "--out", str(tmp_path / "run"), "--validation-size", "10",
                    "--seed", "3", "--split-seed", "7", "--device", "cpu", "--no-verify-data"])
    assert seen == [7]


@pytest.mark.parametrize("script, module, parser", [("capsnet-train", "train", build_parser),
                                                    ("capsnet-evaluate", "evaluate", evaluate.build_parser)])
def test_the_usage_names_the_command_as_it_was_started(monkeypatch, script, module, parser):
    """A console script's usage and error lines say its name, not python -m ..."""
    monkeypatch.setattr("sys.argv", [f"/somewhere/bin/{script}", "--help"])
    assert parser().prog == script
    monkeypatch.setattr("sys.argv", [f"/somewhere/capsnet_triton/{module}.py"])
    assert parser().prog == f"python -m capsnet_triton.{module}"


def test_every_command_has_its_console_script():
    """pyproject.toml installs capsnet-train and capsnet-evaluate, each calling its module's main."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(capsnet-[a-z]+) = "([a-z_.]+:main)"$', text, flags=re.M))
    assert scripts == {"capsnet-train": "capsnet_triton.train:main", "capsnet-evaluate": "capsnet_triton.evaluate:main"}
    for target in scripts.values():
        module, _ = target.split(":")
        assert callable(importlib.import_module(module).main)


def test_a_stop_request_is_taken_where_stderr_cannot_say_so(monkeypatch):
    """Ctrl-C's answer goes to stderr from the signal handler: a closed stderr or a broken pipe
    must not turn the request to stop into an error inside whatever step it came in."""
    stop = loop._StopRequest(False)
    stop.previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}

    def closed(fd, data):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr(loop.os, "write", closed)
    stop._request(signal.SIGINT, None)
    assert stop.requested == signal.SIGINT


def test_the_same_place_of_two_epochs_is_shifted_afresh(fake_mnist, tmp_path, monkeypatch):
    """The run draws each step's shifts by its global step (by its step in the epoch, they repeated each epoch)."""
    monkeypatch.setattr(loop, "epoch_order", lambda count, seed, epoch: torch.arange(count))    # the same order
    batches, shard = [], loop._shard
    monkeypatch.setattr(loop, "_shard", lambda *a: batches.append(shard(*a)) or batches[-1])
    assert train.main(args(fake_mnist, tmp_path / "run", "--epochs", "2")) == 0
    assert len(batches) == 4 and torch.equal(batches[0].labels, batches[2].labels)        # 2 steps an epoch
    assert not torch.equal(batches[0].images, batches[2].images)


def test_resume_restores_every_global_rng_where_last_pt_left_it():
    """restore_training_state leaves torch's, NumPy's and Python's RNGs as last.pt saved them
    (nothing in the loop draws from them today, so dropping the restore passed every run test)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saved = rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "rng": saved, "position": {"epoch": 1, "step_in_epoch": 2}, "sums": {}, "best": {}}
    restore_training_state(checkpoint, model, optimizer, scheduler, torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


_INTERRUPT_AT_TORCH = """
import sys
class Interrupt:                      # Ctrl-C pressed while Python loads torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize("start, stderr", [
    ("import runpy; runpy.run_module('capsnet_triton.train', run_name='__main__', alter_sys=True)",
     "python -m capsnet_triton.train: interrupted (Ctrl-C) before its work began\n"),
    ("sys.argv[0] = '/venv/bin/capsnet-evaluate'; from capsnet_triton.evaluate import main",
     "capsnet-evaluate: interrupted (Ctrl-C) before its work began\n"),
    ("import capsnet_triton.train", None),                # imported by other code: its KeyboardInterrupt
])
def test_a_ctrl_c_while_a_command_loads_is_one_line(start, stderr):
    """README: a Ctrl-C outside the training steps stops at once with one line and status 130;
    in the second or two before torch has loaded too, not with a traceback through the imports."""
    result = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_TORCH + start], capture_output=True, text=True,
                            timeout=120)
    if stderr is None:
        assert result.returncode != 130 and result.stderr.rstrip().endswith("KeyboardInterrupt")
    else:
        assert (result.returncode, result.stderr) == (130, stderr)


def test_a_ctrl_c_while_the_command_reads_its_options_is_one_line(monkeypatch, capsys):
    """The same while it reads its options and checkpoints (resolve_config), but for main(argv)."""
    def interrupted(argv, parser):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "resolve_config", interrupted)
    try:
        train.main()
    except (SystemExit, KeyboardInterrupt) as e:      # caught here: one escaping would stop pytest itself
        stopped = e
    err = capsys.readouterr().err
    assert isinstance(stopped, SystemExit) and stopped.code == 130
    assert err.count("\n") == 1 and "interrupted (Ctrl-C) before its work began" in err
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", "anywhere"])
