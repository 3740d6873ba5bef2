"""The run folder's checkpoints and lock: corrupt or foreign checkpoints are refused, a resumed
run checks best.pt before training and keeps it, one run writes a folder at a time, and killed
saves leave nothing behind. Run through the commands on the tiny configuration of
tests/command_runs.py, and each promise of the checkpoints alone."""

import os
import subprocess
import sys

import pytest
import torch
from command_runs import args, copy_run, fake_mnist, finished_run, one_line, run  # noqa: F401 (fixtures)

from capsnet_triton import evaluate, train
from capsnet_triton.training import checkpoint as checkpoint_module
from capsnet_triton.training import loop
from capsnet_triton.training.checkpoint import (LOCK_NAME, SCORES_NAME, best_model_in, load_checkpoint, lock_run_folder,
                                               payload_checksum, restore_best_model, save_atomic, save_best_model)
from capsnet_triton.training.config import build_parser, check_run_config
from capsnet_triton.training.distributed import Context, init_distributed

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


def test_resume_refuses_a_best_pt_of_the_recorded_epoch_with_another_validation_accuracy(finished_run, tmp_path,
                                                                                         capsys):
    """best.pt must match last.pt's record in validation accuracy too (an epoch-only comparison passed it)."""
    out = copy_run(finished_run, tmp_path / "run")
    with_checkpoint_changed(out / "last.pt", lambda checkpoint: checkpoint["best"].pop("validation"))
    with_checkpoint_changed(out / "best.pt", lambda checkpoint: checkpoint["validation"].update(
        accuracy=checkpoint["validation"]["accuracy"] + 0.5))
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    assert status == 2 and "is not the best model that last.pt records" in one_line(err)


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


@pytest.mark.parametrize("kept, held", [(("best.pt", "log.jsonl"), "best.pt, log.jsonl with validation and test results"),
                                        (("last.pt",), "last.pt"),
                                        (("log.jsonl",), "log.jsonl with validation and test results")])
def test_a_new_run_refuses_a_folder_with_a_runs_results(finished_run, fake_mnist, tmp_path, capsys, kept, held):
    """A finished run's best.pt is its result even after its last.pt was deleted to save space,
    and so is its log (with the figures drawn from it) after both were: a new run there would
    replace them."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in {"last.pt", "best.pt", "log.jsonl"} - set(kept):
        os.remove(out / name)
    before = {name: (out / name).read_bytes() for name in kept}
    status, err = run(train.main, args(fake_mnist, out), capsys)
    line = one_line(err)
    assert status == 2 and f"already holds a run ({held})" in line
    assert ("--resume" in line) == ("last.pt" in kept) and "another --out" in line
    assert ("delete its log.jsonl to start over" in line) == (kept == ("log.jsonl",))
    assert {name: (out / name).read_bytes() for name in kept} == before


def test_a_new_run_replaces_a_log_of_training_records_alone(finished_run, fake_mnist, tmp_path, capsys):
    """A run stopped before its first epoch ended has no result: a new run takes its folder."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        os.remove(out / name)
    log = out / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"event": "train"' in line)
                   + "not a record\n")
    assert train.main(args(fake_mnist, out)) == 0
    assert any('"event": "test"' in line for line in log.read_text().splitlines())


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
    # --resume of a run still starting, before its first last.pt, is told the same, not "no checkpoint".
    for out, argv in ((fresh, args(fake_mnist, fresh)), (fresh, ["--out", str(fresh), "--resume"]),
                      (resumed, ["--out", str(resumed), "--resume"])):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / LOCK_NAME)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "locked\n"
            status, err = run(train.main, argv, capsys)
            line = one_line(err)
            assert status == 2 and f"another run is writing {out}" in line and "another --out" in line
        finally:
            holder.communicate("", timeout=60)
    assert os.listdir(fresh) == [LOCK_NAME] and (resumed / "log.jsonl").read_bytes() == log_before
    # The lock ends with the process that held it.
    assert train.main(["--out", str(resumed), "--resume"]) == 0


def test_evaluate_writes_a_run_folder_only_under_its_lock(finished_run, fake_mnist, tmp_path, capsys):
    """A run still training in the folder would replace best.pt and its figures under evaluate's
    scores: evaluate is refused there (its scores and figures go elsewhere with --out), as a
    second run is; without a holder it takes the lock itself, so none starts meanwhile."""
    out = copy_run(finished_run, tmp_path / "run")
    evaluate_argv = [str(out / "best.pt"), "--data", fake_mnist, "--device", "cpu", "--no-verify-data"]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / LOCK_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        status, err = run(evaluate.main, evaluate_argv, capsys)
        assert status == 2 and f"another run is writing {out}" in one_line(err) and "another --out" in err
        assert not (out / SCORES_NAME).exists()
        assert run(evaluate.main, evaluate_argv + ["--out", str(tmp_path / "elsewhere")], capsys)[0] == 0
        assert (tmp_path / "elsewhere" / SCORES_NAME).exists()
    finally:
        holder.communicate("", timeout=60)
    # A run folder without a .lock yet (copied, say) is locked too: it is the checkpoint's own.
    (out / LOCK_NAME).unlink()
    taken = []

    def training_meanwhile(*arguments, **kwargs):
        with pytest.raises(ValueError, match="another run is writing"):
            lock_run_folder(str(out))
        taken.append(True)
        return []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "write_figures", training_meanwhile)
        assert run(evaluate.main, evaluate_argv, capsys)[0] == 0
    assert taken and (out / SCORES_NAME).exists()


def test_a_new_best_pt_takes_evaluates_scores_of_the_old_one_along(finished_run, tmp_path):
    """evaluation.json names the best.pt it scored by checksum; once a resumed run replaces that
    best.pt (or writes it again from last.pt), the scores beside it are of a model gone."""
    out = copy_run(finished_run, tmp_path / "run")
    best, last = (load_checkpoint(out / name) for name in ("best.pt", "last.pt"))
    scores = out / SCORES_NAME
    scores.write_text("{}")
    assert not restore_best_model(str(out / "best.pt"), best) and scores.exists()    # the same model: kept
    save_best_model(str(out / "best.pt"), config=last["config"], model=last["model"], epoch=2, global_step=4,
                    validation={"accuracy": 0.5})
    assert not scores.exists()
    scores.write_text("{}")
    assert restore_best_model(str(out / "best.pt"), best) and not scores.exists()


def test_stale_temporaries_of_killed_saves_are_removed(finished_run, fake_mnist, tmp_path):
    """Of checkpoints, and of the scores and figures that evaluate too writes there only under the
    folder's lock; not those of its subfolders (an evaluate may be writing one now), nor others'."""
    stale = [".last.pt.k1l2l3.tmp", ".best.pt.x9y8z7.tmp", f".{SCORES_NAME}.q1w2e3r4.tmp",
             ".perturbations.png.a1b2c3d4.tmp"]
    out = copy_run(finished_run, tmp_path / "run")
    for name in stale:
        (out / name).write_bytes(b"half a checkpoint")
    (out / "last").mkdir()
    others = ["notes.tmp", ".notes.v2.tmp", "last/.perturbations.png.a1b2c3d4.tmp"]
    for name in others:
        (out / name).write_text("not the run's to remove")
    assert train.main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert not set(stale) & set(os.listdir(out)) and all((out / name).exists() for name in others)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in stale:
        (fresh / name).write_bytes(b"half a checkpoint")
    assert train.main(args(fake_mnist, fresh)) == 0
    assert not set(stale) & set(os.listdir(fresh))


# --- each promise alone: durable renames, an exclusive lock, checksummed keys, best.pt kept ---

def test_save_atomic_makes_the_rename_durable_with_a_directory_fsync(tmp_path, monkeypatch):
    """The temporary file is synced before its rename and the folder after it: without the
    folder's sync, a crash can lose the rename of a checkpoint that was written whole."""
    synced, original = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return original(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    save_atomic({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert os.path.basename(synced[0]).startswith(".a.pt.") and synced[-1] == str(tmp_path)


def test_the_run_folder_lock_is_exclusive(tmp_path):
    """Two runs of this process's kind each asking for the lock: the second is refused (a shared
    lock would let both write the folder)."""
    first = lock_run_folder(str(tmp_path))
    try:
        with pytest.raises(ValueError, match="another run is writing"):
            lock_run_folder(str(tmp_path))
    finally:
        first.close()
    lock_run_folder(str(tmp_path)).close()


def test_a_lock_file_that_cannot_be_opened_is_said_in_one_line(tmp_path, monkeypatch):
    """Another user's .lock in a folder shared with them: a usage error naming it, not a traceback."""
    def refuse(path, mode):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(checkpoint_module, "open", refuse, raising=False)
    with pytest.raises(ValueError, match=r"cannot open .*\.lock to take the run folder's lock \(Permission denied\)"):
        lock_run_folder(str(tmp_path))


def test_the_checksum_covers_the_keys():
    assert payload_checksum({"epoch": 3}) != payload_checksum({"step": 3})


def test_best_model_in_needs_last_pt_at_the_end_of_the_best_epoch():
    """last.pt holds the best model only where it was saved at the end of the best epoch."""
    checkpoint = {"config": {}, "model": {}, "best": {"accuracy": 0.5, "epoch": 1, "validation": {"accuracy": 0.5}},
                  "position": {"epoch": 2, "step_in_epoch": 0, "global_step": 20}}
    assert best_model_in(checkpoint) is None
    checkpoint["position"] = {"epoch": 1, "step_in_epoch": 0, "global_step": 10}
    assert best_model_in(checkpoint)["epoch"] == 1


def test_resuming_a_run_whose_best_epoch_is_not_its_last_keeps_best_pt(fake_mnist, tmp_path, capsys, monkeypatch):
    """Validation accuracy 0.9, then 0.1: best.pt is epoch 1's, and a resumed third epoch (0.1
    again) must neither rewrite it from last.pt (epoch 2's model) nor call it damaged."""
    real, accuracies = loop.evaluate, iter([0.9, 0.1, 0.1])

    def evaluate(model, data, **kwargs):
        result = real(model, data, **kwargs)
        return {**result, "accuracy": next(accuracies)} if kwargs.get("progress") == "validation" else result
    monkeypatch.setattr(loop, "evaluate", evaluate)
    out = tmp_path / "run"
    assert run(train.main, args(fake_mnist, out, "--epochs", "2", "--lr", "0.01"), capsys)[0] == 0
    before = (out / "best.pt").read_bytes()
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "3"], capsys)
    assert status == 0 and "was not the best model" not in err, err
    assert (out / "best.pt").read_bytes() == before


def test_resume_refuses_fewer_epochs_than_a_partly_trained_one(finished_run, tmp_path, capsys):
    """A last.pt saved inside epoch 2, resumed with --epochs 1: the started epoch is not dropped
    in silence."""
    out = copy_run(finished_run, tmp_path / "run")
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    del checkpoint["checksum"]
    checkpoint["position"].update(step_in_epoch=1, global_step=3)
    save_atomic({**checkpoint, "checksum": payload_checksum(checkpoint)}, out / "last.pt")
    status, err = run(train.main, ["--out", str(out), "--resume", "--epochs", "1"], capsys)
    assert status == 2 and "--epochs 1 is fewer than the 2 epochs this run has started" in one_line(err)


def test_a_checkpoint_config_with_a_bool_for_a_number_is_refused():
    config = vars(build_parser().parse_args(["--data", "."]))
    check_run_config(config, "last.pt")
    with pytest.raises(ValueError, match="has --batch-size True"):
        check_run_config({**config, "batch_size": True}, "last.pt")


def test_only_global_rank_0_writes_the_run_folder():
    """Local rank 0 of a second node is not the main process: it would write the folder too."""
    assert Context(rank=0, local_rank=0, world_size=4).is_main
    assert not Context(rank=2, local_rank=0, world_size=4).is_main


@pytest.mark.parametrize("rank, local_rank", [(3, 1), (0, 0)])
def test_init_distributed_takes_the_global_rank_from_RANK(monkeypatch, rank, local_rank):
    """The rank is torchrun's RANK, not LOCAL_RANK: a second node's local rank 0 is no main process."""
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 4)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    context, device = init_distributed("cpu")
    assert (context.rank, context.local_rank, context.world_size, device.type) == (rank, local_rank, 4, "cpu")
    assert context.is_main == (rank == 0)
