"""The evaluate command on a finished run of tests/command_runs.py: what it scores, where its
figures go, and the mistakes it refuses (exit 2 for options and folders, before any data is read;
1 for data that fails its checks).
"""

import hashlib
import json
import os

import pytest
import torch

from capsnet_triton import CapsNet, evaluate, figures, train
from capsnet_triton.data import DATASETS, Split
from capsnet_triton.losses import capsnet_loss
from capsnet_triton.training.checkpoint import payload_checksum, save_atomic
from command_runs import args, copy_run, fake_mnist, finished_run, one_line, read_records, run  # noqa: F401 (fixtures)
from idx_files import write_dataset


def test_evaluate_refuses_files_of_another_dataset(finished_run, fake_mnist, capsys):
    status, err = run(evaluate.main, [str(finished_run / "best.pt"), "--data", fake_mnist, "--device", "cpu",
                                      "--dataset", "fashion-mnist"], capsys)
    line = one_line(err)
    assert status == 1 and "fashion-mnist" in line and DATASETS["fashion-mnist"].files[2].md5 in line


def test_evaluate_refuses_a_figures_folder_it_cannot_write_before_reading_the_data(finished_run, tmp_path, capsys):
    """It scored the whole test set first, then failed on a bare errno (exit 1)."""
    (tmp_path / "a-file").write_text("")
    missing = str(tmp_path / "no-data")                         # read after the check: never reached
    status, err = run(evaluate.main, [str(finished_run / "best.pt"), "--data", missing, "--device", "cpu",
                                      "--out", str(tmp_path / "a-file")], capsys)
    assert status == 2 and f"--out {tmp_path / 'a-file'}: cannot create the figures' folder" in one_line(err)
    # A folder it could make is made when the figures are written: a failure before leaves none behind.
    status, err = run(evaluate.main, [str(finished_run / "best.pt"), "--data", missing, "--device", "cpu",
                                      "--out", str(tmp_path / "figures" / "here")], capsys)
    assert status == 2 and f"--data {missing} does not exist" in one_line(err) and not (tmp_path / "figures").exists()


def test_a_run_folder_given_for_a_checkpoint_points_at_the_checkpoint_in_it(finished_run, capsys):
    status, err = run(evaluate.main, [str(finished_run), "--device", "cpu"], capsys)
    assert status == 2 and (f"{finished_run} is a folder, not a checkpoint file: pass the checkpoint in it, "
                            f"{finished_run / 'best.pt'}") in one_line(err)


def test_a_data_folder_the_checkpoint_records_but_that_moved_is_named_as_such(finished_run, tmp_path, capsys):
    """evaluate and --resume read the run's data folder from its checkpoint: where it is gone,
    the user did not type that path, so the message says where it came from and what to pass."""
    out = copy_run(finished_run, tmp_path / "run")
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    gone = checkpoint["config"]["data"] + "-moved"
    for name in ("last.pt", "best.pt"):
        payload = torch.load(out / name, weights_only=True)
        payload["config"]["data"] = gone
        del payload["checksum"]
        save_atomic({**payload, "checksum": payload_checksum(payload)}, out / name)
    for command, argv, recorded_in in ((evaluate.main, [str(out / "best.pt"), "--device", "cpu"], "the checkpoint"),
                                       (train.main, ["--out", str(out), "--resume", "--epochs", "2"], "last.pt")):
        status, err = run(command, argv, capsys)
        assert status == 2 and f"the run's data folder {gone}, as {recorded_in} records it, does not exist" \
            in one_line(err) and "pass --data DIR" in one_line(err), command


def test_evaluate_writes_another_models_figures_beside_the_runs(finished_run, fake_mnist, tmp_path, capsys):
    """The run folder's figures are its best.pt's on the whole test set; last.pt, or a --limit,
    gets a subfolder, and each figure names its model."""
    out = copy_run(finished_run, tmp_path / "run")
    figures = ("reconstructions.png", "perturbations.png", "training_curves.png")
    before = {name: (out / name).read_bytes() for name in figures}
    common = ["--data", fake_mnist, "--device", "cpu", "--no-verify-data"]
    for checkpoint, extra, folder in (("last.pt", [], out / "last"), ("best.pt", ["--limit", "5"], out / "first-5"),
                                      ("last.pt", ["--limit", "5"], out / "last-first-5")):
        status, _ = run(evaluate.main, [str(out / checkpoint), *common, *extra], capsys)
        assert status == 0 and set(figures) <= set(os.listdir(folder)), (checkpoint, extra)
    assert {name: (out / name).read_bytes() for name in figures} == before
    assert evaluate.main([str(out / "best.pt"), *common]) == 0
    assert f"wrote {out / 'reconstructions.png'}" in capsys.readouterr().out


def test_evaluate_keeps_its_scores_beside_its_figures(finished_run, fake_mnist, tmp_path, capsys, monkeypatch):
    """stdout alone lost the score (an affNIST run's whole point): evaluation.json keeps it, with
    the SHA-256 of the checkpoint scored, even where a running training replaces the file while
    it is scored (the hash was of the file read again after scoring)."""
    out = copy_run(finished_run, tmp_path / "run")
    scored = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    score = evaluate.evaluate

    def score_then_replace(*args, **kwargs):
        metrics = score(*args, **kwargs)
        (out / "last.pt").write_bytes((out / "best.pt").read_bytes())
        return metrics

    monkeypatch.setattr(evaluate, "evaluate", score_then_replace)
    status = evaluate.main([str(out / "last.pt"), "--data", fake_mnist, "--device", "cpu", "--no-verify-data",
                            "--limit", "5"])
    printed = capsys.readouterr().out
    scores = json.loads((out / "last-first-5" / evaluate.SCORES_NAME).read_text())
    assert status == 0 and f"wrote {out / 'last-first-5' / evaluate.SCORES_NAME}" in printed
    assert {k: scores[k] for k in ("checkpoint", "sha256", "data", "dataset", "metric", "limit", "count")} == {
        "checkpoint": str(out / "last.pt"), "sha256": scored,
        "data": fake_mnist, "dataset": "mnist", "metric": "accuracy", "limit": 5, "count": 5}
    assert f"mnist test accuracy {scores['accuracy']:.2%}" in printed and f"loss {scores['loss']:.5f}" in printed
    assert scores["loss"] == pytest.approx(scores["margin"] + 0.0005 * scores["reconstruction"])


def test_figures_name_the_model_they_show(finished_run, fake_mnist, tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(figures, "reconstruction_figure", lambda *a, title, **k: titles.append(title) or "r.png")
    monkeypatch.setattr(figures, "perturbation_figure", lambda *a, title, **k: titles.append(title) or "p.png")
    out = copy_run(finished_run, tmp_path / "run")
    assert evaluate.main([str(out / "last.pt"), "--data", fake_mnist, "--device", "cpu", "--no-verify-data",
                          "--out", str(tmp_path / "figures")]) == 0
    assert len(titles) == 2 and all(title.startswith("last.pt on ") and "mnist test" in title for title in titles)


def test_evaluate_is_the_loss_and_accuracy_of_the_whole_split_at_once():
    """In batches of 16, the last one partial, evaluate() gives what the model and the loss give
    on all 40 images at once, each image weighted once; the decoder sees the longest capsule (its
    first layer scaled up, as an untrained network's capsules are about 1e-4 long, so that which
    capsule it sees shows in the reconstruction error), and the accuracy counts the longest capsule."""
    torch.manual_seed(0)
    model = CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(16, 32))
    with torch.no_grad():
        model.decoder.fc1.weight.mul_(1e6)
    images, labels = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (40,))
    split = DATASETS["mnist"].evaluation_split(Split(images, labels), False)
    got = evaluate.evaluate(model, split, batch_size=16)
    batch = split.batch(torch.arange(40))
    model.eval()
    with torch.no_grad():
        output = model(batch.images)
        terms = capsnet_loss(output, batch.targets, labels)
        by_label = capsnet_loss(model(batch.images, labels), batch.targets, labels)
    assert by_label.reconstruction.item() != pytest.approx(terms.reconstruction.item(), rel=1e-3)
    assert got["count"] == 40
    assert got["loss"] == pytest.approx(terms.total.item(), rel=1e-5)
    assert got["reconstruction"] == pytest.approx(terms.reconstruction.item(), rel=1e-5)
    assert got["accuracy"] == (output.lengths.argmax(dim=1) == labels).double().mean().item()


def test_figure_subfolders_are_named_checkpoint_then_dataset_then_limit():
    assert evaluate._figure_folder("/r", "last.pt", "affnist", False, 100) == os.path.join("/r", "last-affnist-first-100")
    assert evaluate._figure_folder("/r", "last.pt", "affnist", False, None) == os.path.join("/r", "last-affnist")
    assert evaluate._figure_folder("/r", "best.pt", "mnist", True, None) == "/r"


def test_naming_the_runs_own_dataset_still_writes_the_runs_own_figures(finished_run, monkeypatch):
    got = []
    monkeypatch.setattr(evaluate, "_evaluate_checkpoint", lambda *a: got.append(a))
    assert evaluate.main([str(finished_run / "best.pt"), "--dataset", "mnist", "--device", "cpu"]) == 0
    (*_, log_path, folder), = got
    assert folder == str(finished_run) and log_path == os.path.join(str(finished_run), "log.jsonl")


def test_a_limit_of_zero_is_refused_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([str(tmp_path / "best.pt"), "--limit", "0"])
    assert stopped.value.code == 2 and "--limit must be positive, got 0" in capsys.readouterr().err


def test_evaluate_reads_the_data_folder_it_is_given_and_names_the_set_it_scores(finished_run, tmp_path, monkeypatch):
    """--data replaces the run's folder; the figures name --dataset's set, not the training set's."""
    other = write_dataset(tmp_path / "other", train_count=1, test_count=12)
    scored, drawn_as = [], []
    monkeypatch.setattr(evaluate, "evaluate", lambda model, split, **k: scored.append(split) or dict(
        accuracy=0.5, loss=1.0))
    monkeypatch.setattr(evaluate, "write_figures", lambda *a, dataset, **k: drawn_as.append(dataset) or [])
    assert evaluate.main([str(finished_run / "best.pt"), "--data", str(other), "--dataset", "fashion-mnist",
                          "--device", "cpu", "--no-verify-data", "--out", str(tmp_path / "f")]) == 0
    (split,) = scored
    assert len(split) == 12 and drawn_as == ["fashion-mnist"]


def test_the_runs_reconstruction_weight_weighs_every_loss_it_logs_and_evaluate_scores(fake_mnist, tmp_path, capsys):
    """--reconstruction-weight reaches the training steps, the validation, the final test and
    evaluate: each loss is margin + 0.01 reconstruction here, not the default 0.0005's sum."""
    out = tmp_path / "run"
    status, _ = run(train.main, args(fake_mnist, out, "--reconstruction-weight", "0.01", "--log-every", "1"), capsys)
    records = [r for r in read_records(out / "log.jsonl") if "margin" in r]
    assert status == 0 and {r["event"] for r in records} >= {"train", "validation", "test"}
    status, _ = run(evaluate.main, [str(out / "best.pt"), "--data", fake_mnist, "--device", "cpu",
                                    "--no-verify-data", "--limit", "8"], capsys)
    scores = json.loads((out / "first-8" / evaluate.SCORES_NAME).read_text())
    assert status == 0
    for record in (*records, scores):
        assert record["loss"] == pytest.approx(record["margin"] + 0.01 * record["reconstruction"], rel=1e-5), record
        assert record["loss"] != pytest.approx(record["margin"] + 0.0005 * record["reconstruction"], rel=1e-3)
