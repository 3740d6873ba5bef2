"""The run folder's checkpoints and lock: corrupt or foreign checkpoints are refused, a resumed
run checks best.pt before training, one run writes a folder at a time, and killed saves leave
nothing behind. Run through the commands on the tiny configuration of tests/command_runs.py."""

import os
import subprocess
import sys

import pytest
import torch
from command_runs import args, copy_run, fake_mnist, finished_run, one_line, run  # noqa: F401 (fixtures)

from capsnet_triton import evaluate, train
from capsnet_triton.training.checkpoint import LOCK_NAME, payload_checksum, save_atomic

pytestmark = pytest.mark.xdist_group("train_reliability")


# --- checksummed checkpoints -------------------------------------------------------------

def flip_middle(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_bytes_are_refused_by_evaluate_and_resume(finished_run, fake_mnist, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    flip_middle(out / "best.pt")
    status, err = run(evaluate.main, [str(out / "best.pt"), "--data", fake_mnist, "--device", "cpu",
                                      "--no-verify-data"], capsys)
    # best.pt has no optimizer state: "the run's other checkpoint" is no way to resume.
    assert status == 2 and "corrupt" in one_line(err) and str(out / "best.pt") in err
    assert one_line(err).endswith("restore an intact copy of it (see --help)")
    flip_middle(out / "last.pt")
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    assert status == 2 and "corrupt" in one_line(err) and str(out / "last.pt") in err
    assert "other checkpoint" not in err


def test_the_checksum_covers_every_stored_value(tmp_path):
    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "best": {"accuracy": 0.5},
               "rng": [torch.tensor([1, 2], dtype=torch.int64), None]}
    save_atomic(payload, tmp_path / "x.pt")
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)
    assert payload_checksum(loaded) == payload_checksum(payload)
    loaded["model"]["w"][1, 2] = 5.000001
    changed = payload_checksum(loaded)
    loaded["model"]["w"][1, 2] = 5.0
    loaded["epoch"] = 4
    assert len({changed, payload_checksum(loaded), payload_checksum(payload)}) == 3


def with_checkpoint_changed(path, change):
    """Rewrite the checkpoint at `path` after change(contents), with a checksum that matches."""
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["checksum"]
    change(checkpoint)
    save_atomic({**checkpoint, "checksum": payload_checksum(checkpoint)}, path)


DAMAGES = ["missing", "corrupt", "another epoch", "another run"]


def damage(best, how):
    if how == "missing":
        os.remove(best)
    elif how == "corrupt":
        flip_middle(best)
    elif how == "another epoch":
        with_checkpoint_changed(best, lambda checkpoint: checkpoint.update(epoch=2))
    else:
        with_checkpoint_changed(best, lambda checkpoint: checkpoint["config"].update(seed=8))


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_checks_best_pt_before_training(finished_run, tmp_path, capsys, how):
    """The final test reads best.pt: a resumed run refuses, before any step, one that is not the
    best model last.pt records, instead of finding it after the remaining epochs. (Here last.pt
    does not hold that model itself: it records no validation, as an earlier version's did not.)"""
    out = copy_run(finished_run, tmp_path / "run")
    with_checkpoint_changed(out / "last.pt", lambda checkpoint: checkpoint["best"].pop("validation"))
    best = out / "best.pt"
    damage(best, how)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "log.jsonl")}
    for _ in range(2):                  # a refusal releases the run folder's lock: the second says the same
        status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
        line = one_line(err)
        assert status == 2 and str(best) in line and "epoch 1" in line and "another --out" in line
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("how", [*DAMAGES, "intact"])
def test_resume_writes_best_pt_again_where_last_pt_holds_the_best_model(finished_run, tmp_path, capsys, how):
    """last.pt saved at the end of the best epoch holds the best model and its validation: that is
    where a run stopped between its saves of last.pt and best.pt stands, and the resumed run
    writes best.pt again from it, whatever the file held, and says so (an intact one is left alone)."""
    out = copy_run(finished_run, tmp_path / "run")
    written, before = torch.load(out / "best.pt", weights_only=True), (out / "best.pt").read_bytes()
    if how != "intact":
        damage(out / "best.pt", how)
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume"]) == 0
    said = "was not the best model that" in capsys.readouterr().err
    assert said == (how != "intact")
    if how == "intact":
        assert (out / "best.pt").read_bytes() == before                     # not written at all
    again = torch.load(out / "best.pt", weights_only=True)
    # The checksum covers every value and tensor byte (the files' bytes differ in pickle's memo only).
    contents = {key: value for key, value in again.items() if key != "checksum"}
    assert again["checksum"] == written["checksum"] == payload_checksum(contents)


def test_a_best_pt_written_with_other_resumable_options_passes(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    with_checkpoint_changed(out / "best.pt", lambda checkpoint: checkpoint["config"].update(
        epochs=9, log_every=3, out="/where/the/run/was/before"))
    assert train.main(["--out", str(out), "--resume"]) == 0


def test_resuming_a_finished_run_says_nothing_is_trained(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    assert train.main(["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"nothing to train: {out / 'last.pt'} has finished all --epochs 1" in printed
    assert "test accuracy" in printed


def test_resume_refuses_a_best_model_copied_over_last_pt(finished_run, tmp_path, capsys):
    """best.pt holds a model but no optimizer, position or RNG state to continue from."""
    out = copy_run(finished_run, tmp_path / "run")
    os.replace(out / "last.pt", out / "saved-last.pt")
    (out / "last.pt").write_bytes((out / "best.pt").read_bytes())
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    line = one_line(err)
    assert status == 2 and str(out / "last.pt") in line and "not a last.pt" in line and "position" in line


@pytest.mark.parametrize("kept", [("best.pt", "log.jsonl"), ("last.pt",)])
def test_a_new_run_refuses_a_folder_with_a_runs_checkpoints(finished_run, fake_mnist, tmp_path, capsys, kept):
    """A finished run's best.pt is its result even after its last.pt was deleted to save space:
    a new run there would replace it and cut the log."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in {"last.pt", "best.pt", "log.jsonl"} - set(kept):
        os.remove(out / name)
    before = {name: (out / name).read_bytes() for name in kept}
    status, err = run(train.main, args(fake_mnist, out), capsys)
    line = one_line(err)
    assert status == 2 and f"already holds a run ({', '.join(n for n in kept if n.endswith('.pt'))})" in line
    assert ("--resume" in line) == ("last.pt" in kept) and "another --out" in line
    assert {name: (out / name).read_bytes() for name in kept} == before


# --- one run per folder, stale temporaries -----------------------------------------------

_HOLD_LOCK = """
import fcntl, sys
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()                                 # until the test closes stdin
"""


def test_a_run_folder_that_another_run_holds_is_refused(finished_run, fake_mnist, tmp_path, capsys):
    fresh, resumed = tmp_path / "fresh", copy_run(finished_run, tmp_path / "resumed")
    fresh.mkdir()
    log_before = (resumed / "log.jsonl").read_bytes()
    for out in (fresh, resumed):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / LOCK_NAME)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "locked\n"
            argv = args(fake_mnist, out) if out == fresh else ["--out", str(out), "--resume"]
            status, err = run(train.main, argv, capsys)
            line = one_line(err)
            assert status == 2 and f"another run is writing {out}" in line and "another --out" in line
        finally:
            holder.communicate("", timeout=60)
    assert os.listdir(fresh) == [LOCK_NAME] and (resumed / "log.jsonl").read_bytes() == log_before
    # The lock ends with the process that held it.
    assert train.main(["--out", str(resumed), "--resume"]) == 0


def test_stale_temporaries_of_killed_saves_are_removed(finished_run, fake_mnist, tmp_path):
    stale = [".last.pt.k1l2l3.tmp", ".best.pt.x9y8z7.tmp"]
    out = copy_run(finished_run, tmp_path / "run")
    for name in stale:
        (out / name).write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("not ours")
    assert train.main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert not set(stale) & set(os.listdir(out)) and (out / "notes.tmp").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in stale:
        (fresh / name).write_bytes(b"half a checkpoint")
    assert train.main(args(fake_mnist, fresh)) == 0
    assert not set(stale) & set(os.listdir(fresh))
