"""The tiny training runs and helpers shared by the tests of what the training and evaluation
commands refuse and write (tests/test_train_reliability.py, tests/test_run_folder.py,
tests/test_train_bookkeeping.py): fake MNIST files, a configuration that trains in seconds (T),
a finished run to damage in copies, readers of a command's exit status and one-line error, and
a loss that turns NaN."""

import json
import shutil

import pytest
import torch

from capsnet_triton import train
from capsnet_triton.training import loop
from idx_files import write_dataset

T = ["--epochs", "1", "--batch-size", "32", "--limit-train", "64", "--limit-val", "32", "--limit-test", "32",
     "--conv-channels", "16", "--primary-types", "4", "--decoder-hidden", "32", "64"]


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    """MNIST-shaped files that are not MNIST: enough training images for the default validation split."""
    return str(write_dataset(tmp_path_factory.mktemp("fake_mnist"), train_count=5100, test_count=40))


def args(data, out, *extra, verify=False):
    return ["--data", str(data), "--out", str(out), *T, "--device", "cpu",
            *([] if verify else ["--no-verify-data"]), *extra]


def run(command, argv, capsys):
    """(exit status, stderr) of a command's main, whether it returns or exits."""
    capsys.readouterr()
    try:
        status = command(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    return lines[0]


def last_line(err):
    """The last line of a run's stderr, split at newlines only: a progress bar left open would
    share its line with what follows (its redraws start with a carriage return)."""
    return err.rstrip("\n").split("\n")[-1]


def read_records(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(path, "rb") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope="module")
def finished_run(fake_mnist, tmp_path_factory):
    """A T run of one epoch: last.pt, best.pt and the log to corrupt in copies."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert train.main(args(fake_mnist, out)) == 0
    return out


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


def nan_from_step(first_bad_step, where, factor=float("nan")):
    """A stand-in for the loop's capsnet_loss whose total (where="loss") or whose gradient
    (where="gradient", the loss staying finite) is NaN from the `first_bad_step`-th call on; or
    whose gradient is `factor` times the true one, where a factor is given."""
    calls = []
    original = loop.capsnet_loss

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * factor

    def capsnet_loss(*a, **k):
        terms = original(*a, **k)
        calls.append(None)
        if len(calls) < first_bad_step:
            return terms
        total = terms.total * float("nan") if where == "loss" else NanGradient.apply(terms.total)
        return terms._replace(total=total)

    return capsnet_loss
