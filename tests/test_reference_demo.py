"""`python -m capsnet_triton.reference`: the NumPy training demo runs end to end on tiny data."""

import io
import re
import subprocess
import sys

import numpy as np
import pytest

from capsnet_triton.reference import init_params, load_mnist
from idx_files import write_idx, write_mnist


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
    assert result.stderr == ""


def test_demo_takes_an_adam_step_on_every_parameter_each_step(tmp_path, monkeypatch, capsys):
    """Finite losses and accuracies in range, all the run above checks, held with no update at all."""
    from capsnet_triton.reference import __main__ as demo

    write_mnist(tmp_path, 16, 6, np.random.default_rng(0))
    moved = []                                     # per step: whether every parameter moved

    class Recording(demo.Adam):
        def step(self, params, grads):
            before = {name: value.copy() for name, value in params.items()}
            super().step(params, grads)
            moved.append(all(not np.array_equal(before[name], value) for name, value in params.items()))

    monkeypatch.setattr(demo, "Adam", Recording)
    assert demo.main(["--data", str(tmp_path), "--steps", "3", "--batch", "4", "--eval", "6"]) == 0
    capsys.readouterr()
    assert moved == [True, True, True]


def test_demo_refuses_a_validation_set_that_leaves_nothing_to_train(tmp_path):
    write_mnist(tmp_path, 16, 6, np.random.default_rng(0))
    result = run_demo("--data", str(tmp_path), "--eval", "16")
    assert result.returncode == 2 and "leaves no training images" in result.stderr


def test_demo_refuses_an_eval_the_test_set_cannot_fill(tmp_path, capsys):
    """Said as a usage error once the data is read, before any training: it scored fewer test
    images than --eval says, without a word."""
    from capsnet_triton.reference import __main__ as demo

    write_mnist(tmp_path, 9, 5, np.random.default_rng(0))
    with pytest.raises(SystemExit) as stop:
        demo.main(["--data", str(tmp_path), "--steps", "1", "--eval", "6"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "--eval 6 asks for more test images than the 5 in " in err and out == "", err


def test_demo_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """--batch 100000 on MNIST ended in a 69.5 GiB allocation's traceback. A batch larger than
    the training images is allowed (drawn with replacement): here 7 of 6."""
    from capsnet_triton.reference import __main__ as demo

    write_mnist(tmp_path, 9, 5, np.random.default_rng(0))
    real_forward = demo.network_forward

    def forward(params, images, *args, **kwargs):
        if len(images) == 7 and forward.calls:
            raise MemoryError
        forward.calls += 1
        return real_forward(params, images, *args, **kwargs)

    forward.calls = 0
    monkeypatch.setattr(demo, "network_forward", forward)
    assert demo.main(["--data", str(tmp_path), "--steps", "2", "--batch", "7", "--eval", "3"]) == 1
    assert capsys.readouterr().err == ("python -m capsnet_triton.reference: out of memory at step 2 with "
                                       "--batch 7: pass a smaller one\n")


def test_demo_refuses_a_negative_seed_as_a_usage_error(capsys):
    """NumPy's generators take only non-negative seeds: a usage error, not NumPy's traceback."""
    from capsnet_triton.reference import __main__ as demo

    with pytest.raises(SystemExit) as stop:
        demo.main(["--data", "unused", "--seed", "-1"])
    assert stop.value.code == 2 and "--seed must be 0 or more, got -1" in capsys.readouterr().err


def test_demo_without_data_prints_usage_error():
    result = run_demo()
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--data" in result.stderr


def test_demo_with_missing_data_says_which_file(tmp_path):
    result = run_demo("--data", str(tmp_path))
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr


def test_demo_scales_pixels_and_validates_on_held_out_training_images(tmp_path, monkeypatch, capsys):
    """The demo validates on the last --eval training images and scores the first --eval test
    images once, at the end (SPEC 6). Its loss is bounded by the paper's constants when pixels
    lie in [0, 1]: margin <= 0.9^2 + 9 * 0.5 * 0.9^2, reconstruction <= 0.0005 * 784 (it is
    thousands with pixels left in 0..255)."""
    from capsnet_triton.reference import __main__ as demo

    write_mnist(tmp_path, 9, 5, np.random.default_rng(0))
    seen = []
    real_accuracy = demo._accuracy

    def recording_accuracy(params, images, labels, config, batch=100):
        seen.append(images.copy())
        return real_accuracy(params, images, labels, config, batch)

    monkeypatch.setattr(demo, "_accuracy", recording_accuracy)
    assert demo.main(["--data", str(tmp_path), "--steps", "2", "--batch", "2", "--eval", "3"]) == 0
    train, _ = load_mnist(tmp_path, train=True)
    test, _ = load_mnist(tmp_path, train=False)
    assert len(seen) == 3
    for images in seen[:-1]:
        np.testing.assert_array_equal(images, train[-3:])
    np.testing.assert_array_equal(seen[-1], test[:3])
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert losses and all(loss <= 0.81 + 9 * 0.405 + 0.0005 * 784 for loss in losses), losses


def test_demo_stopped_by_ctrl_c_says_the_steps_done_in_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C (here in the second step's forward pass) ends the run with one line and status 130,
    not with a KeyboardInterrupt traceback."""
    from capsnet_triton.reference import __main__ as demo

    write_mnist(tmp_path, 9, 5, np.random.default_rng(0))
    real_forward, calls = demo.network_forward, []

    def forward_until_ctrl_c(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(demo, "network_forward", forward_until_ctrl_c)
    try:
        status = demo.main(["--data", str(tmp_path), "--steps", "3", "--batch", "2", "--eval", "3"])
    except KeyboardInterrupt:      # escaping, it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped main() as a KeyboardInterrupt traceback")
    assert status == 130
    assert capsys.readouterr().err == "python -m capsnet_triton.reference: interrupted (Ctrl-C) after 1 of 3 steps\n"


def test_demo_shows_a_counter_while_scoring_on_a_terminal_only(monkeypatch, capsys):
    """A long validation (--eval 10000 takes 10 s or more) shows a counter on a terminal's stderr,
    erased when done so that the report lines stay clean; off a terminal stderr gets nothing."""
    from capsnet_triton.reference import __main__ as demo

    config = demo._small_config(28)
    params = init_params(config, np.random.default_rng(0), dtype=np.float32)
    images, labels = np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8)
    demo._accuracy(params, images, labels, config, batch=2)
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    demo._accuracy(params, images, labels, config, batch=2)
    assert terminal.getvalue() == ("scoring 5 images:   0%\rscoring 5 images:  40%\rscoring 5 images:  80%\r"
                                   + " " * len("scoring 5 images: 100%") + "\r")


def test_demo_refuses_test_images_of_another_size_and_images_not_square(tmp_path):
    """Found before training, not as a traceback at the first step or the final scoring."""
    write_mnist(tmp_path, 9, 5, np.random.default_rng(0))
    other = tmp_path / "other"
    other.mkdir()
    write_mnist(other, 9, 5, np.random.default_rng(0), size=32)
    (other / "t10k-images-idx3-ubyte.gz").replace(tmp_path / "t10k-images-idx3-ubyte.gz")
    result = run_demo("--data", str(tmp_path), "--steps", "1", "--eval", "3")
    assert result.returncode == 2 and "the test images 32 x 32" in result.stderr, result.stderr
    rng = np.random.default_rng(1)
    for prefix, count in (("train", 9), ("t10k", 5)):
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (count, 28, 32), dtype=np.uint8))
    result = run_demo("--data", str(tmp_path), "--steps", "1", "--eval", "3")
    assert result.returncode == 2 and "are 28 x 32" in result.stderr and "square" in result.stderr, result.stderr
