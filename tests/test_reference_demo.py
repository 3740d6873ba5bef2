"""`python -m capsnet_triton.reference`: the NumPy training demo runs end to end on tiny data."""

import re
import subprocess
import sys

import numpy as np

from idx_files import write_mnist


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "capsnet_triton.reference", *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_trains_on_tiny_generated_data(tmp_path):
    write_mnist(tmp_path, 16, 6, np.random.default_rng(0))
    result = run_demo("--data", str(tmp_path), "--steps", "3", "--batch", "4", "--eval", "6")
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    validation = [float(x) for x in re.findall(r"validation accuracy\s+(\d+\.\d)%", result.stdout)]
    test = [float(x) for x in re.findall(r"test accuracy (\d+\.\d)% on 6 test images", result.stdout)]
    assert len(losses) == 3 and all(np.isfinite(losses)), result.stdout
    assert len(validation) == 3 and all(0 <= a <= 100 for a in validation), result.stdout
    assert len(test) == 1 and 0 <= test[0] <= 100, result.stdout
    assert "10 training images" in result.stdout and "6 held out for validation" in result.stdout


def test_demo_refuses_a_validation_set_that_leaves_nothing_to_train(tmp_path):
    write_mnist(tmp_path, 16, 6, np.random.default_rng(0))
    result = run_demo("--data", str(tmp_path), "--eval", "16")
    assert result.returncode == 2 and "leaves no training images" in result.stderr


def test_demo_without_data_prints_usage_error():
    result = run_demo()
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--data" in result.stderr


def test_demo_with_missing_data_says_which_file(tmp_path):
    result = run_demo("--data", str(tmp_path))
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr
