"""The training and evaluation commands end to end on a tiny synthetic dataset and a tiny model:
files written, exact resume (also after a SIGKILL or a Ctrl-C), distributed training equal to
one process, and the figures."""

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from capsnet_triton import evaluate, train
from capsnet_triton.data import load_split, to_float
from capsnet_triton.figures import PERTURBATIONS, capsule_perturbations
from capsnet_triton.model import build_model
from capsnet_triton.training import loop
from capsnet_triton.training.checkpoint import rng_state, save_atomic, set_rng_state
from idx_files import write_dataset

# One xdist worker runs this file (addopts use --dist loadgroup), so the module's runs are shared.
pytestmark = pytest.mark.xdist_group("train")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--conv-channels", "8", "--primary-types", "2", "--decoder-hidden", "16", "32"]
STEPS_PER_EPOCH = 10                                        # 160 training images / batch 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("digits"), train_count=200, test_count=40))


def tiny_args(data_dir, out, *extra):
    return ["--data", data_dir, "--out", str(out), "--batch-size", "16", "--validation-size", "40",
            "--limit-test", "24", "--log-every", "2", "--checkpoint-every", "3", "--seed", "7",
            "--device", "cpu", "--no-verify-data", *TINY_MODEL, *extra]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def load(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Model and optimizer of two checkpoints bit-identical."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert a["scheduler"] == b["scheduler"]
    assert a["position"] == b["position"]


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())         # the same threads as this process
    return env


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """Two uninterrupted epochs (20 steps): the reference the resumed runs must equal."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train.main(tiny_args(data_dir, out, "--epochs", "2")) == 0
    return out


def test_smoke_run_writes_log_checkpoints_and_figures(straight_run, capsys):
    files = set(os.listdir(straight_run))
    assert {"log.jsonl", "last.pt", "best.pt", "training_curves.png", "reconstructions.png",
            "perturbations.png"} <= files
    assert not [name for name in files if name.endswith(".tmp")]
    for figure in ("training_curves.png", "reconstructions.png", "perturbations.png"):
        with open(os.path.join(straight_run, figure), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    records = read_log(straight_run)
    events = [r["event"] for r in records]
    assert events.count("train") == 2 * STEPS_PER_EPOCH // 2 and events.count("validation") == 2
    assert events[-1] == "test" and events.count("test") == 1
    for record in records:
        assert 0.0 <= record["accuracy"] <= 1.0 and record["loss"] > 0
    for record in (r for r in records if r["event"] == "train"):
        # The rate the record's last step ran at: 1e-3 * 0.96^(steps before it / 2000), the
        # official code's continuous decay.
        assert record["lr"] == pytest.approx(1e-3 * 0.96 ** ((record["step"] - 1) / 2000), rel=1e-12)
    validation = [r for r in records if r["event"] == "validation"]
    assert [r["count"] for r in validation] == [40, 40] and records[-1]["count"] == 24
    last, best = load(straight_run), load(straight_run, "best.pt")
    assert last["position"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 20, "seconds_in_epoch": 0.0}
    best_epoch = max(validation, key=lambda r: r["accuracy"])["epoch"]   # first of equals: strict improvement
    assert best["epoch"] == best_epoch == records[-1]["best_epoch"]
    assert best["validation"]["accuracy"] == max(r["accuracy"] for r in validation)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("last.pt", "best.pt"):      # written through mkstemp (0600), then given open()'s mode
        assert stat.S_IMODE(os.stat(straight_run / name).st_mode) == 0o666 & ~umask, name


def test_a_fresh_run_replaces_the_log_of_an_earlier_run_that_never_checkpointed(data_dir, tmp_path):
    out = tmp_path / "reused"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"event": "train", "step": 999}) + "\n")
    assert train.main(tiny_args(data_dir, out, "--epochs", "1", "--limit-train", "32")) == 0
    steps = [r["step"] for r in read_log(out) if "step" in r]
    assert 999 not in steps and steps == sorted(steps)


def test_evaluate_command_reports_test_accuracy_and_figures(straight_run, data_dir, tmp_path, capsys):
    assert evaluate.main([str(straight_run / "best.pt"), "--data", data_dir, "--limit", "24",
                          "--device", "cpu", "--out", str(tmp_path), "--no-verify-data"]) == 0
    output, progress = capsys.readouterr()
    assert "mnist test:   0%|" in progress                # a progress bar over the batches while it scores
    test_record = read_log(straight_run)[-1]
    assert f"test accuracy {test_record['accuracy']:.2%}" in output and "on 24 images" in output
    assert {"reconstructions.png", "perturbations.png", "training_curves.png"} <= set(os.listdir(tmp_path))


def test_resume_at_epoch_end_with_more_epochs_is_bit_identical(straight_run, data_dir, tmp_path):
    out = tmp_path / "resumed"
    train.main(tiny_args(data_dir, out, "--epochs", "1"))
    assert load(out)["position"]["global_step"] == STEPS_PER_EPOCH
    train.main(["--out", str(out), "--resume", "--epochs", "2"])
    assert_same_state(load(out), load(straight_run))
    for key, value in load(out, "best.pt")["model"].items():
        assert torch.equal(value, load(straight_run, "best.pt")["model"][key])
    assert without_timing(read_log(out)) == without_timing(read_log(straight_run))


def test_resume_after_sigkill_is_bit_identical(straight_run, data_dir, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "capsnet_triton.train", *tiny_args(data_dir, out, "--epochs", "2")]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "last.pt"
    try:
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    interrupted_at = load(out)["position"]["global_step"]
    assert 0 < interrupted_at < 2 * STEPS_PER_EPOCH                # the run was cut off mid-training
    train.main(["--out", str(out), "--resume"])
    assert_same_state(load(out), load(straight_run))
    for key, value in load(out, "best.pt")["model"].items():
        assert torch.equal(value, load(straight_run, "best.pt")["model"][key])
    assert without_timing(read_log(out)) == without_timing(read_log(straight_run))


# Runs the training command killed (os._exit, as SIGKILL: no handler, no flush) right after the
# `after`-th rename that completes a save of last.pt or best.pt, and lists the files it saved.
_KILL_AFTER_SAVE = """
import os, sys
from capsnet_triton import train
after, saved, replace = int(sys.argv[1]), [], os.replace
def replace_then_die(source, target, *args, **kwargs):
    replace(source, target, *args, **kwargs)
    if os.path.basename(target) in ("last.pt", "best.pt"):
        saved.append(os.path.basename(target))
        if len(saved) == after:
            print(" ".join(saved), flush=True)
            os._exit(137)
os.replace = replace_then_die
sys.argv = ["capsnet_triton.train", *sys.argv[2:]]
sys.exit(train.main())
"""


# Both epochs of this run improve on validation (accuracy 0.25, then 0.5; else choose these again),
# and it saves only at their ends: four saves, last.pt and best.pt after each epoch.
IMPROVING = ("--epochs", "2", "--lr", "0.01", "--checkpoint-every", "0")


@pytest.fixture(scope="module")
def improving_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "improving"
    assert train.main(tiny_args(data_dir, out, *IMPROVING)) == 0
    assert [r["best"] for r in read_log(out) if r["event"] == "validation"] == [True, True], "see IMPROVING"
    return out


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_a_run_killed_right_after_any_save_resumes_bit_identical(improving_run, data_dir, tmp_path, after):
    """An improving epoch ends with two saves, of last.pt and best.pt: killed between them, a run
    once left a best.pt that its last.pt did not record (or a best.pt and no last.pt at all), and
    the folder, holding the only copy of the run's best model, could be neither resumed nor reused."""
    out = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", _KILL_AFTER_SAVE, str(after), *tiny_args(data_dir, out, *IMPROVING)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 137, result.stderr[-2000:]
    assert train.main(["--out", str(out), "--resume"]) == 0, result.stdout
    assert_same_state(load(out), load(improving_run))
    assert load(out, "best.pt")["epoch"] == load(improving_run, "best.pt")["epoch"] == 2
    for key, value in load(out, "best.pt")["model"].items():
        assert torch.equal(value, load(improving_run, "best.pt")["model"][key])
    assert without_timing(read_log(out)) == without_timing(read_log(improving_run))


# Runs the training command with Ctrl-C pressed (or another signal, SIGNAL in the environment)
# `presses` times in the `after`-th call of loop.<where> (a step or a validation pass), placed
# exactly by the test; with that signal ignored from the start where IGNORED is set, as a job
# started so has it, else as Python sets it up (even if pytest runs with it ignored, as `cmd &`).
_CTRL_C_AT = """
import os, signal, sys
from capsnet_triton import train
from capsnet_triton.training import loop
where, after, presses = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sent = getattr(signal, os.environ.get("SIGNAL", "SIGINT"))
usual = signal.default_int_handler if sent == signal.SIGINT else signal.SIG_DFL
signal.signal(sent, signal.SIG_IGN if os.environ.get("IGNORED") else usual)
original = getattr(loop, where)
calls = 0
def pressed(*args, **kwargs):
    global calls
    calls += 1
    if calls == after:
        for _ in range(presses):
            os.kill(os.getpid(), sent)
    return original(*args, **kwargs)
setattr(loop, where, pressed)
sys.argv = ["capsnet_triton.train", *sys.argv[4:]]
sys.exit(train.main())                                  # as the command: main(argv) leaves Ctrl-C alone
"""


def run_with_ctrl_c(where, after, presses, argv, sent="SIGINT", ignored=False):
    return subprocess.run([sys.executable, "-c", _CTRL_C_AT, where, str(after), str(presses), *argv],
                          env={**subprocess_env(), "SIGNAL": sent, **({"IGNORED": "1"} if ignored else {})},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sent, status, by", [("SIGINT", 130, ""), ("SIGTERM", 143, " by SIGTERM")])
def test_ctrl_c_saves_where_it_stops_and_resume_is_bit_identical(straight_run, data_dir, tmp_path, sent, status, by,
                                                                  capsys):
    """Ctrl-C, or SIGTERM (what a cluster's scheduler sends before it kills a job)."""
    out = tmp_path / "interrupted"
    # No periodic checkpoints: a last.pt inside the first epoch can only be the one the signal saved.
    result = run_with_ctrl_c("_train_step", 3, 1, tiny_args(data_dir, out, "--epochs", "2", "--checkpoint-every", "0"),
                             sent)
    assert result.returncode == status and "stopping after this step to save" in result.stderr, result.stderr[-2000:]
    assert load(out)["position"]["global_step"] == 3                   # the step it came in ends first
    assert result.stderr.rstrip("\n").split("\n")[-1] == (
        f"python -m capsnet_triton.train: interrupted{by} after step 3, saved in {out / 'last.pt'}; continue with "
        f"--out {out} --resume")
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert f"resuming at epoch 1/2, step 3 of {STEPS_PER_EPOCH}\n" in capsys.readouterr().out
    assert_same_state(load(out), load(straight_run))
    for key, value in load(out, "best.pt")["model"].items():
        assert torch.equal(value, load(straight_run, "best.pt")["model"][key])
    assert without_timing(read_log(out)) == without_timing(read_log(straight_run))


def test_a_run_started_with_sigterm_ignored_keeps_it_ignored(data_dir, tmp_path):
    result = run_with_ctrl_c("_train_step", 2, 1, tiny_args(data_dir, tmp_path / "run", "--epochs", "1"), "SIGTERM",
                             ignored=True)
    assert result.returncode == 0 and "interrupted" not in result.stderr, result.stderr[-2000:]


def test_an_epoch_resumed_mid_way_logs_the_seconds_of_both_parts(data_dir, tmp_path, monkeypatch):
    """The validation record's seconds are the whole epoch's: last.pt records the time the epoch
    took before the interruption, and the resumed part adds to it (here it takes no time at all:
    the resumed process's clock stands still)."""
    out = tmp_path / "interrupted"
    result = run_with_ctrl_c("_train_step", 3, 1, tiny_args(data_dir, out, "--epochs", "1", "--checkpoint-every", "0"))
    assert result.returncode == 130, result.stderr[-2000:]
    before = load(out)["position"]
    assert before["step_in_epoch"] == 3 and before["seconds_in_epoch"] > 0
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 1000.0)
    assert train.main(["--out", str(out), "--resume"]) == 0
    (validation,) = [r for r in read_log(out) if r["event"] == "validation"]
    assert validation["seconds"] == before["seconds_in_epoch"]
    assert load(out)["position"]["seconds_in_epoch"] == 0.0            # saved at the epoch's end


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_an_epochs_validation_stops_after_it_and_a_second_one_at_once(data_dir, tmp_path, presses):
    out = tmp_path / "validating"
    steps = 2                                                   # per epoch: 32 training images / batch 16
    result = run_with_ctrl_c("evaluate", 1, presses,
                             tiny_args(data_dir, out, "--epochs", "2", "--limit-train", str(16 * steps)))
    events = [r["event"] for r in read_log(out)]
    if presses == 1:
        # The epoch ends as it would have (validation, best.pt, last.pt), then the run stops.
        assert result.returncode == 130, result.stderr[-2000:]
        assert load(out)["position"]["global_step"] == steps and load(out, "best.pt")["epoch"] == 1
        assert events == ["train", "validation"]
        assert f"interrupted after step {steps}," in result.stderr.rstrip("\n").split("\n")[-1]
    else:
        # The second stops at once, nothing of the epoch saved, with one line.
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.rstrip("\n").split("\n")[-1] == (
            "python -m capsnet_triton.train: interrupted (Ctrl-C); nothing of the run was saved yet; start it again")
        assert events == ["train"] and not (out / "last.pt").exists()


def test_ctrl_c_in_the_final_test_is_one_line_and_resume_tests_again(data_dir, tmp_path):
    """Outside the training steps (the final test here; loading data, the figures) Ctrl-C stops
    at once: one line saying how to continue, not a traceback."""
    out = tmp_path / "testing"
    argv = tiny_args(data_dir, out, "--epochs", "1", "--limit-train", "32")
    result = run_with_ctrl_c("evaluate", 2, 1, argv)                  # 1: the validation, 2: the test
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.rstrip("\n").split("\n")[-1] == (
        f"python -m capsnet_triton.train: interrupted (Ctrl-C); continue from {out / 'last.pt'} with --out {out} "
        f"--resume")
    assert [r["event"] for r in read_log(out)] == ["train", "validation"]
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert [r["event"] for r in read_log(out)] == ["train", "validation", "test"]


def test_main_called_with_argv_leaves_ctrl_c_to_its_caller(data_dir, tmp_path, monkeypatch):
    """A test runner stopped by Ctrl-C in the middle of a training test must see KeyboardInterrupt."""
    handlers = []
    validate = loop.evaluate

    def evaluate(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGINT))
        return validate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    before = signal.getsignal(signal.SIGINT)
    assert train.main(tiny_args(data_dir, tmp_path / "run", "--epochs", "1", "--limit-train", "32")) == 0
    assert handlers and set(handlers) == {before}


def test_unfused_digitcaps_trains_the_same_function_and_a_resumed_run_may_switch(straight_run, data_dir, tmp_path):
    """--digitcaps unfused runs DigitCaps as predict then dynamic_routing: the same function as
    the fused default, so the same losses to rounding. It is not part of the run: a resumed run may
    change it either way, and a config older than the option builds the fused layer."""
    out = tmp_path / "unfused"
    assert train.main(tiny_args(data_dir, out, "--epochs", "1", "--digitcaps", "unfused")) == 0
    config = load(out)["config"]
    assert config["digitcaps"] == "unfused" and not build_model(config).digit_caps.fused
    assert train.main(["--out", str(out), "--resume", "--epochs", "2", "--digitcaps", "fused"]) == 0
    assert load(out)["config"]["digitcaps"] == "fused"
    straight = [r for r in read_log(straight_run) if r["event"] in ("train", "validation")]
    switched = [r for r in read_log(out) if r["event"] in ("train", "validation")]
    assert [(r["event"], r["step"]) for r in switched] == [(r["event"], r["step"]) for r in straight]
    for a, b in zip(switched, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    del config["digitcaps"]
    assert build_model(config).digit_caps.fused


def test_distributed_gloo_step_equals_single_process(data_dir, tmp_path, capsys):
    # One test image: rank 1's share of it is empty (it crashed the rank, after all the training).
    one_step = ["--epochs", "1", "--limit-train", "16", "--limit-val", "8", "--limit-test", "1"]
    train.main(tiny_args(data_dir, tmp_path / "single", *one_step))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "capsnet_triton.train", *tiny_args(data_dir, tmp_path / "ddp", *one_step)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = load(tmp_path / "single"), load(tmp_path / "ddp")
    assert ddp["world_size"] == 2 and ddp["position"]["global_step"] == 1
    assert read_log(tmp_path / "ddp")[-1]["count"] == 1 and "on 1 image, best model" in result.stdout
    torch.manual_seed(7)                                           # the run's seed: its initial parameters
    initial = build_model(single["config"]).state_dict()
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=1e-6, msg=key)
    # Adam's first step moves a parameter with a clear gradient by about lr = 1e-3, far beyond the tolerance.
    assert max((value - initial[key]).abs().max() for key, value in single["model"].items()) > 5e-4
    # Both ranks saw their halves of the same global batch: the metrics of the step agree.
    single_log, ddp_log = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert ddp_log[0]["train_accuracy"] == single_log[0]["train_accuracy"]
    assert ddp_log[0]["train_loss"] == pytest.approx(single_log[0]["train_loss"], rel=1e-5)
    # Resumed in one process, the run goes on and says it is no longer bit for bit the same.
    capsys.readouterr()
    assert train.main(["--out", str(tmp_path / "ddp"), "--resume", "--epochs", "2"]) == 0
    assert "resuming a run of 2 process(es) with 1: it continues" in capsys.readouterr().err


def test_multimnist_final_lines_count_pairs(data_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    assert train.main(tiny_args(data_dir, out, "--dataset", "multimnist", "--epochs", "1", "--limit-train", "32",
                                "--limit-val", "8")) == 0
    printed = capsys.readouterr().out
    assert "multimnist test both-digit accuracy" in printed and "on 24 pairs, best model" in printed
    assert evaluate.main([str(out / "best.pt"), "--limit", "12", "--device", "cpu", "--out", str(tmp_path / "f"),
                          "--no-verify-data"]) == 0
    assert "on 12 pairs, loss" in capsys.readouterr().out


def test_amp_run_is_finite(data_dir, tmp_path):
    train.main(tiny_args(data_dir, tmp_path / "amp", "--epochs", "1", "--limit-train", "32", "--amp",
                         "--routing-gradient", "last", "--routing-bias"))
    records = read_log(tmp_path / "amp")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "digit_caps.bias" in load(tmp_path / "amp")["model"]
    assert load(tmp_path / "amp")["config"]["routing_gradient"] == "last"


def test_no_decoder_run_writes_only_the_curves(data_dir, tmp_path):
    train.main(tiny_args(data_dir, tmp_path / "bare", "--epochs", "1", "--limit-train", "32", "--no-decoder"))
    files = os.listdir(tmp_path / "bare")
    assert "training_curves.png" in files and "reconstructions.png" not in files
    assert all(r["reconstruction"] == 0.0 for r in read_log(tmp_path / "bare"))


def test_command_line_errors(straight_run, data_dir, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    fails(["--out", str(tmp_path / "none"), "--resume"], "no checkpoint")
    fails(tiny_args(data_dir, straight_run), "already holds a run")
    fails(["--out", str(straight_run), "--resume", "--lr", "0.01"], "--lr 0.01, which differs from the run's 0.001,")
    fails(["--out", str(straight_run), "--resume", "--no-decoder"], "--no-decoder, which the run was started without,")
    fails(["--out", str(straight_run), "--resume", "--decoder-hidden", "8", "16"],
          "--decoder-hidden 8 16, which differs from the run's 16 32,")
    fails(["--out", str(straight_run), "--resume", "--epochs", "1"], "--epochs 1 is fewer than the 2 epochs")
    fails(["--out", str(tmp_path / "x")], "--data DIR is required")
    fails(tiny_args(data_dir, tmp_path / "x", "--epochs", "0"), "--epochs must be positive")
    fails(tiny_args(data_dir, tmp_path / "x", "--no-agreement-grad"), "unrecognized arguments: --no-agreement-grad")
    fails(tiny_args(data_dir, tmp_path / "x", "--routing-gradient", "agreement"), "invalid choice: 'agreement'")
    fails(tiny_args(data_dir, tmp_path / "x", "--dataset", "affnist"), "invalid choice: 'affnist'")  # a test set
    fails(tiny_args(data_dir, tmp_path / "x", "--limit-train", "8"), "--limit-train 8 does not fill one batch of 16")
    assert train.main(tiny_args(data_dir, tmp_path / "small", "--validation-size", "190")) == 1  # seen in the data
    assert "10 training images do not fill one batch of 16" in capsys.readouterr().err


def with_old_gradient_key(source, target, agreement_grad):
    """A copy of the run folder `source` whose checkpoints have the config key written before
    SPEC 3's gradient policies: a boolean agreement_grad instead of routing_gradient."""
    shutil.copytree(source, target)
    for name in ("last.pt", "best.pt"):
        checkpoint = load(target, name)
        del checkpoint["config"]["routing_gradient"]
        checkpoint["config"]["agreement_grad"] = agreement_grad
        del checkpoint["checksum"]                          # nor had checkpoints of that time a checksum
        torch.save(checkpoint, target / name)
    return target


def test_checkpoints_with_the_old_agreement_grad_key(straight_run, data_dir, tmp_path, capsys):
    assert load(straight_run)["config"]["routing_gradient"] == "full"
    # agreement_grad=True was the "full" policy: such a checkpoint loads, evaluates and resumes.
    old_full = with_old_gradient_key(straight_run, tmp_path / "old_full", True)
    model, checkpoint = evaluate.load_model(old_full / "best.pt")
    assert checkpoint["config"]["routing_gradient"] == "full" and "agreement_grad" not in checkpoint["config"]
    for key, value in load(straight_run, "best.pt")["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert train.main(["--out", str(old_full), "--resume", "--data", data_dir]) == 0
    # agreement_grad=False was a variant SPEC 3 removed: refused in one line, by both commands.
    old_stopped = with_old_gradient_key(straight_run, tmp_path / "old_stopped", False)
    capsys.readouterr()
    for command, argv in ((evaluate.main, [str(old_stopped / "best.pt"), "--data", data_dir, "--device", "cpu"]),
                          (train.main, ["--out", str(old_stopped), "--resume"])):
        with pytest.raises(SystemExit) as exit_info:
            command(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error:" in error and "agreement_grad=False" in error and "removed" in error


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    device = torch.device("cpu")
    state = rng_state(device)
    save_atomic({"rng": state}, tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], device)
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
    assert os.listdir(tmp_path) == ["rng.pt"]


def test_perturbations_follow_figure_4(straight_run, data_dir):
    model, _ = evaluate.load_model(straight_run / "best.pt")
    image = to_float(load_split(data_dir, train=False).images[:1])
    capsule, grid = capsule_perturbations(model, image[0])
    assert grid.shape == (16, 11, 1, 28, 28) and len(PERTURBATIONS) == 11
    assert PERTURBATIONS[0] == -0.25 and PERTURBATIONS[-1] == 0.25
    with torch.no_grad():
        output = model(image)
    assert capsule == int(output.lengths.argmax())
    # The zero perturbation is the plain reconstruction, whichever dimension is "moved".
    for d in range(16):
        torch.testing.assert_close(grid[d, 5].flatten(), output.reconstruction[0], rtol=0, atol=1e-6)
    assert not torch.allclose(grid[:, 0], grid[:, 10])
