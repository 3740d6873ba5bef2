"""MultiMNIST (SPEC 9): the training and evaluation sets built from the pair generator, and the
training and evaluation commands end to end."""

import json
import os

import pytest
import torch

from capsnet_triton import evaluate, train
from capsnet_triton.data import Split, dataset_spec, load_split, to_float
from idx_files import write_dataset
from test_synthetic import noisy_digits

TINY_MODEL = ["--conv-channels", "8", "--primary-types", "2", "--decoder-hidden", "16", "32"]


# --- training and evaluation sets ---------------------------------------------------------------

def digits_split(count=60, seed=0):
    images, labels = noisy_digits(count, seed)
    return Split(torch.round(images * 255).to(torch.uint8), labels)


def test_training_pairs_are_a_function_of_seed_and_step():
    spec = dataset_spec("multimnist")
    source = spec.training_split(digits_split())
    index = torch.tensor([5, 0, 17, 17, 42])
    batch = source.augmented(index, 7, 12, 4)
    assert batch.images.shape == (5, 1, 36, 36) and batch.targets.shape == (5, 2, 1, 36, 36)
    # The partners are drawn inside augmented: found again by their ink.
    ink = to_float(source.digits.images).sum(dim=(1, 2, 3))
    partners = (batch.targets[:, 1].sum(dim=(1, 2, 3))[:, None] - ink).abs().argmin(dim=1)
    assert_each_target_is_its_labels_digit(batch, source.digits, torch.stack([index, partners], dim=1))
    assert torch.equal(batch.labels[:, 0], source.digits.labels[index])
    assert bool((batch.labels[:, 0] != batch.labels[:, 1]).all())
    assert all(torch.equal(a, b) for a, b in zip(batch, source.augmented(index, 7, 12, 4)))   # resumable
    assert not torch.equal(batch.images, source.augmented(index, 7, 13, 4).images)           # fresh each step


def assert_each_target_is_its_labels_digit(batch, digits, index):
    """targets[:, k] is the canvas of digit index[:, k] (of class labels[:, k]): all of its ink,
    shifted (the shifts keep a digit whole); the pair is their sum clipped at 1."""
    for k in range(2):
        assert torch.equal(batch.labels[:, k], digits.labels[index[:, k]])
        ink = to_float(digits.images[index[:, k]]).sum(dim=(1, 2, 3))
        assert torch.allclose(batch.targets[:, k].sum(dim=(1, 2, 3)), ink, rtol=1e-6), k
    assert torch.equal(batch.images, batch.targets.sum(dim=1).clamp(max=1))


def test_fixed_evaluation_pairs():
    spec = dataset_spec("multimnist")
    split = digits_split(30)
    test, validation = spec.evaluation_split(split, True), spec.evaluation_split(split, False)
    assert len(test) == 300 and len(validation) == 30
    assert_each_target_is_its_labels_digit(test.batch(torch.arange(300)), split, test.recipe.index)
    assert torch.equal(test.recipe.index[:, 0], torch.arange(300) % 30)
    again = spec.evaluation_split(split, True).subset(slice(0, 12)).batch(torch.arange(12))
    assert all(torch.equal(a, b) for a, b in zip(test.subset(slice(0, 12)).batch(torch.arange(12)), again))
    assert not torch.equal(test.recipe.index[:30], validation.recipe.index)


# --- the commands -------------------------------------------------------------------------------

def test_multimnist_training_and_evaluation_commands(tmp_path, capsys, monkeypatch):
    data_dir = str(write_dataset(tmp_path / "digits", train_count=120, test_count=30))
    out = tmp_path / "run"
    assert train.main(["--data", data_dir, "--dataset", "multimnist", "--out", str(out), "--epochs", "1",
                       "--batch-size", "16", "--validation-size", "40", "--limit-train", "64", "--limit-val", "24",
                       "--limit-test", "40", "--log-every", "2", "--device", "cpu", "--no-verify-data",
                       *TINY_MODEL]) == 0
    printed = capsys.readouterr().out
    assert "multimnist test both-digit accuracy" in printed and "on 40 pairs" in printed
    assert {"segmentation.png", "perturbations.png", "training_curves.png", "best.pt"} <= set(os.listdir(out))
    with open(out / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["event"] == "test" and records[-1]["metric"] == "both-digit accuracy"
    assert records[-1]["count"] == 40 and 0.0 <= records[-1]["accuracy"] <= 1.0
    assert [r["count"] for r in records if r["event"] == "validation"] == [24]
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert (config["lr_decay_steps"], config["max_shift"]) == (20000, 4)     # SPEC 9's defaults
    assert evaluate.main([str(out / "best.pt"), "--limit", "20", "--device", "cpu", "--out", str(tmp_path / "f"),
                          "--no-verify-data"]) == 0
    assert "multimnist test both-digit accuracy" in capsys.readouterr().out
    assert len(load_split(data_dir, "multimnist", train=False)) == 30
    # evaluate scores the test pairs, ten per test digit, not validation's one.
    scored = []
    monkeypatch.setattr(evaluate, "evaluate", lambda model, split, **k: scored.append(split) or dict(accuracy=0.5, loss=1.0))
    monkeypatch.setattr(evaluate, "write_figures", lambda *a, **k: [])
    assert evaluate.main([str(out / "best.pt"), "--device", "cpu", "--no-verify-data", "--out", str(tmp_path / "g")]) == 0
    expected = dataset_spec("multimnist").evaluation_split(load_split(data_dir, "multimnist", train=False), True)
    assert len(scored[0]) == 300 and torch.equal(scored[0].recipe.index, expected.recipe.index)


@pytest.mark.parametrize("dataset, largest", [("multimnist", 4), ("mnist40", 6)])
def test_a_shift_that_would_push_a_digit_off_the_canvas_is_a_usage_error(tmp_path, capsys, dataset, largest):
    """A 28x28 digit centred on 36x36 (MultiMNIST) or 40x40 (mnist40) stays whole up to 4 or 6 pixels;
    mnist40 took up to 10 (a quarter of its side), which cut into 7% of digits at 10."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(tmp_path), "--dataset", dataset, "--max-shift", str(largest + 1),
                    "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert f"--max-shift must be at most {largest} pixels for {dataset} (a 28x28 digit" in capsys.readouterr().err


def test_a_pair_split_subset_keeps_each_pairs_digits_and_shifts_together():
    images = (torch.arange(20 * 28 * 28) % 251).to(torch.uint8).reshape(20, 1, 28, 28)
    pairs = dataset_spec("multimnist").evaluation_split(Split(images, torch.arange(20) % 10), True)
    index = torch.tensor([7, 3, 150])
    whole, part = pairs.batch(index), pairs.subset(index).batch(torch.arange(3))
    assert all(torch.equal(a, b) for a, b in zip(whole, part))


def test_training_pairs_depend_on_the_run_seed():
    images = torch.randint(1, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pairs, index = dataset_spec("multimnist").training_split(Split(images, torch.arange(40) % 10)), torch.arange(40)
    assert not torch.equal(pairs.augmented(index, 1, 5, 4).images, pairs.augmented(index, 2, 5, 4).images)
