"""The evaluate command on a finished run of tests/command_runs.py: what it scores, where its
figures go, and the mistakes it refuses (exit 2 for options and folders, before any data is read;
1 for data that fails its checks).
"""

import os

from capsnet_triton import evaluate, figures
from capsnet_triton.data import DATASETS
from command_runs import copy_run, fake_mnist, finished_run, one_line, run  # noqa: F401 (fixtures)


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
    status, _ = run(evaluate.main, [str(finished_run / "best.pt"), "--data", missing, "--device", "cpu",
                                    "--out", str(tmp_path / "figures" / "here")], capsys)
    assert status == 1 and not (tmp_path / "figures").exists()


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


def test_figures_name_the_model_they_show(finished_run, fake_mnist, tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(figures, "reconstruction_figure", lambda *a, title, **k: titles.append(title) or "r.png")
    monkeypatch.setattr(figures, "perturbation_figure", lambda *a, title, **k: titles.append(title) or "p.png")
    out = copy_run(finished_run, tmp_path / "run")
    assert evaluate.main([str(out / "last.pt"), "--data", fake_mnist, "--device", "cpu", "--no-verify-data",
                          "--out", str(tmp_path / "figures")]) == 0
    assert len(titles) == 2 and all(title.startswith("last.pt on ") and "mnist test" in title for title in titles)
