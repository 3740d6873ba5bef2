"""scripts/gpu_check.sh: its smoke run on a CPU (the same stages as on a GPU, at tiny sizes),
so that the script a GPU machine runs cannot rot; its summary of stages cut short; and its side
commands (summary, ceilings, kernels) refusing bad arguments before they measure."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsnet_triton.bench import ceilings, kernels, summary
from idx_files import write_dataset

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["ceilings", "tests", "memcheck", "bench", "train"]
# The smoke's budget and stage limits, a few times over, for a machine busy with the rest of the suite.
LOADED_MACHINE = {"GPU_CHECK_BUDGET": "700",
                  "GPU_CHECK_LIMITS": "ceilings=120 tests=200 memcheck=120 bench=200 train=300 evaluate=120"}


def test_smoke_run_writes_a_summary_of_every_stage(tmp_path):
    # The smoke's own budget (170 s) and stage limits hold on a quiet CPU; beside the rest of the
    # suite on few cores every stage runs a few times slower, so the test gives it more.
    data = write_dataset(tmp_path / "mnist", train_count=300, test_count=100)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, **LOADED_MACHINE}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", str(data), str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (out / "summary.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for stage in STAGES:
        assert f"| {stage} | pass |" in rows[stage], table
    assert " passed" in rows["tests"] and "failed" not in rows["tests"]
    assert "0 FAILED" in rows["bench"] and "routing fwd+bwd B=2" in rows["bench"]
    assert "1/1 epochs" in rows["train"] and "test " in rows["train"]
    assert "GB/s" in rows["ceilings"] and "fp32" in rows["ceilings"]
    assert "| kernels | SKIPPED |" in rows["kernels"] and "needs a CUDA GPU" in rows["kernels"]
    # On a CPU no Triton row is timed: every GPU target is there, none judged.
    assert "| routing fwd+bwd, B = 128: triton >= 2x torch-compile | - | not measured |" in table
    assert "| digitcaps fwd+bwd, B = 128: triton-fused >= 3x triton (unfused) | - | not measured |" in table
    assert json.loads((out / "bench.json").read_text())["rows"]
    assert (out / "train" / "log.jsonl").exists() and (out / "bench.png").exists()
    # 200 training images at batch 16, whatever DATA_DIR holds: real MNIST's 55,000 ran past the limit.
    records = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "validation"] == [200 // 16]
    assert not list(out.rglob("*.pt")), "checkpoints must stay out of OUT"


def test_summary_of_stages_that_failed_or_ran_out_of_time(tmp_path):
    (tmp_path / "stages.tsv").write_text("ceilings\tpass\t9\t40\t\ntests\tfail\t80\t150\t\n"
                                         "bench\tfail\t3\t180\t\nkernels\tpass\t80\t90\t\n"
                                         "train\ttimeout\t200\t200\t\nevaluate\tpass\t6\t40\t\n"
                                         "multimnist\tpass\t900\t36000\t\naffnist-generated\tpass\t27\t600\t\n")
    (tmp_path / "bench.log").write_text("Traceback (most recent call last):\nRuntimeError: CUDA error\n")
    (tmp_path / "multimnist.log").write_text("test both-digit accuracy 94.10% (error 5.90%) on 100000 images, "
                                             "best model from epoch 40\nsome warning\n")
    (tmp_path / "affnist-generated.log").write_text("affnist-generated test accuracy 79.50% (error 20.50%) on "
                                                    "10000 images, loss 0.1\n")
    kernel_rows = [dict(B=B, workload="routing fwd", config=c, graph_ms=ms, call_ms=ms + 0.3, copy_pct=100 / ms)
                   for B, c, ms in ((128, "sample", 0.4), (512, "sample", 1.0), (512, "split S=4", 0.5))]
    kernel_rows.append(dict(B=512, workload="routing fwd", config="split S=8", error="CompilationError: x"))
    kernel_rows += [dict(B=512, workload="digitcaps bwd", config=c, graph_ms=ms, call_ms=ms + 0.3, copy_pct=None)
                    for c, ms in (("split", 5.0), ("B (last)", 1.0))]
    (tmp_path / "kernels.json").write_text(json.dumps({"default": "sample", "baselines": ["unfused", "B (last)"],
                                                       "complete": False, "rows": kernel_rows}))
    (tmp_path / "evaluate.log").write_text("mnist test accuracy 99.10% (error 0.90%) on 10000 images, loss 0.01\n"
                                           "wrote OUT/train/training_curves.png\n")      # as evaluate prints
    (tmp_path / "tests.log").write_text("12 workers [548 items]\nFAILED tests/test_x.py::test_y - AssertionError\n"
                                        "2 failed, 181 passed, 3 skipped in 79.10s (0:01:19)\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "log.jsonl").write_text("".join(
        json.dumps({"event": "validation", "epoch": e, "seconds": s, "accuracy": a}) + "\n"
        for e, s, a in ((1, 6.0, 0.98), (2, 4.0, 0.99), (3, 5.0, 0.985))))
    table = summary.write_summary(str(tmp_path), epochs=50)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| tests | FAIL |" in rows["tests"] and "2 failed, 181 passed, 3 skipped of 548 collected" in rows["tests"]
    assert "tests/test_x.py::test_y" in rows["tests"]
    assert "no ceilings.json" in rows["ceilings"] and "no bench.json" in rows["bench"]
    assert "| train | TIMEOUT |" in rows["train"]
    assert ("routing fwd B=512: best split S=4 0.5 ms, 200% copy (default sample 1 ms, as a call 1.3 ms)"
            in rows["kernels"])
    # "B (last)" runs another gradient policy: beside the candidates, never the best of them.
    assert "digitcaps bwd B=512: best split 5 ms; B (last) 1 ms" in rows["kernels"]
    assert "5 rows timed, 1 FAILED; the stage was cut off" in rows["kernels"]
    assert "3/50 epochs, median 5.0 s" in rows["train"] and "99.00% (epoch 2)" in rows["train"]
    assert "not tested" in rows["train"]
    assert "its log ends: `RuntimeError: CUDA error`" in rows["bench"]
    assert "| evaluate | pass |" in rows["evaluate"] and "test accuracy 99.10%" in rows["evaluate"]
    assert "**test both-digit accuracy 94.10%" in rows["multimnist"]        # the optional SPEC 9 stages
    # SPEC 9: the generated set is never named affNIST, its stage neither.
    assert rows["affnist-generated"].startswith("| affnist-generated | pass |")
    assert "**affnist-generated test accuracy 79.50%" in rows["affnist-generated"]


def test_summary_of_a_test_stage_stopped_before_pytests_summary(tmp_path):
    """Cut by its limit, pytest prints no summary line: the tests that ended, as -v named them,
    are counted instead, and the failed ones named."""
    (tmp_path / "stages.tsv").write_text("tests\ttimeout\t200\t200\t\n")
    (tmp_path / "tests.log").write_text(
        "12 workers [484 items]\n[gw0] [  1%] PASSED tests/test_a.py::test_one\n"
        "[gw3] [  2%] FAILED tests/test_b.py::test_two[I and P must agree]\n"
        "[gw1] [  3%] PASSED tests/test_a.py::test_three\n[gw2] [ 4%] SKIPPED tests/test_c.py::test_four\n"
        "[gw0] [  5%] ERROR tests/test_c.py::test_five \n")
    table = summary.write_summary(str(tmp_path), epochs=50)
    row = next(line for line in table.splitlines() if line.startswith("| tests |"))
    assert "| TIMEOUT |" in row
    assert "stopped before pytest's summary: 1 failed, 2 passed, 1 skipped, 1 errors of 484 collected" in row
    assert "FAILED tests/test_b.py::test_two[I and P must agree], ERROR tests/test_c.py::test_five" in row


def test_summary_shows_the_default_models_train_step(tmp_path):
    """The train step's figure is the default model's, DigitCaps fused (triton-fused on a GPU),
    not the unfused one's; routing has no fused row, and shows the Triton kernels'."""
    rows = [dict(workload=w, B=128, r=3, provider=p, status="ok", median_ms=ms, vs_eager=None, copy_share=None)
            for w, p, ms in (("train step", "triton", 30.0), ("train step", "triton-fused", 20.0),
                             ("routing fwd+bwd", "triton", 1.0), ("routing fwd+bwd", "project-torch", 9.0))]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "complete": True}))
    figures = summary.bench_figures(str(tmp_path))
    assert "train step B=128: triton-fused 20 ms" in figures and "routing fwd+bwd B=128: triton 1 ms" in figures


def test_on_a_gpu_the_tests_stage_runs_every_file_whose_tests_use_the_device():
    """gpu_check.sh runs only the test files that use the GPU (the rest, CPU alone, run in CI):
    every file that takes kernel_checks.DEVICE or asks torch for CUDA must be in its list."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    listed = set(script.split("device_tests=(", 1)[1].split(")", 1)[0].split())
    uses_device = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
                   if path.name != "test_gpu_check.py"
                   and ("DEVICE" in path.read_text() or "torch.cuda.is_available()" in path.read_text())}
    assert listed == uses_device and all((ROOT / name).exists() for name in listed)


def test_the_tests_stage_deselects_tests_that_exist():
    """pytest ignores a --deselect that names no test: a renamed test would run again unseen."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    deselected = re.findall(r"--deselect (\S+)::(\w+)", script)
    assert deselected
    for path, name in deselected:
        assert f"def {name}(" in (ROOT / path).read_text(), (path, name)


def test_a_stage_that_fails_or_runs_out_of_time_does_not_stop_the_next(tmp_path):
    """Also: a compute-sanitizer that refuses the machine (as on some GPU machines: "Device not
    supported") leaves the routing check to run without it, not the stage failed for the tool;
    without MNIST (a DATA_DIR not there) the training stages are skipped, the rest measure; and
    PYTHON may be a path relative to where the script was started."""
    missing = tmp_path / "no-mnist-here"
    out = tmp_path / "out"
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "compute-sanitizer").write_text('#!/bin/sh\necho "Error: Device not supported" >&2\nexit 1\n')
    (tools / "compute-sanitizer").chmod(0o755)
    # The tests and bench stages outlast their 5 s limits whatever the machine's speed: a quick
    # machine with warm caches ran the smoke's pytest selection in under 5 s.
    (tools / "py").write_text(f'#!/bin/sh\ncase "$*" in *"-m pytest"*|*bench.py*) exec sleep 60;; esac\n'
                              f'exec "{sys.executable}" "$@"\n')
    (tools / "py").chmod(0o755)
    env = {**os.environ, "PYTHON": "bin/py", "GPU_CHECK_EXPERIMENTS": "1",
           "GPU_CHECK_BUDGET": LOADED_MACHINE["GPU_CHECK_BUDGET"],
           "GPU_CHECK_LIMITS": LOADED_MACHINE["GPU_CHECK_LIMITS"] + " tests=5 bench=5",
           "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", str(missing), str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    status = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert status == {"ceilings": "pass", "tests": "timeout", "memcheck": "pass", "bench": "timeout",
                      "kernels": "skipped", "train": "skipped", "multimnist": "skipped", "mnist40": "skipped",
                      "affnist-generated": "skipped"}, status
    table = (out / "summary.md").read_text()
    assert "| tests | TIMEOUT |" in table and "| train | SKIPPED |" in table and f"no DATA_DIR {missing}" in table
    assert "compute-sanitizer cannot run on this machine" in table
    assert "Device not supported" in (out / "memcheck-probe.log").read_text()


def _bench_row(workload, B, provider, ms, **extra):
    return dict(workload=workload, B=B, r=3, provider=provider, status="ok", median_ms=ms, **extra)


def test_summary_judges_every_gpu_target_and_compares_the_variants(tmp_path):
    rows = [_bench_row("routing fwd", 128, "triton", 0.2, copy_share=0.71, vs_eager=9.0),
            _bench_row("routing fwd", 128, "triton-sample", 0.3),
            _bench_row("routing fwd", 128, "torch-compile", 0.3),
            _bench_row("routing fwd", 512, "triton", 0.9, copy_share=0.69),
            _bench_row("routing fwd", 512, "triton-sample", 0.8),
            _bench_row("routing fwd+bwd", 128, "triton", 1.0, copy_share=0.4, vs_eager=4.9),
            _bench_row("routing fwd+bwd", 128, "torch-compile", 2.5),
            dict(workload="routing fwd+bwd", B=512, r=3, provider="triton", status="FAILED", note="x"),
            _bench_row("digitcaps fwd+bwd", 128, "triton", 3.0),
            _bench_row("digitcaps fwd+bwd", 128, "triton-fused", 1.2, flops=3.0e9),
            _bench_row("train step", 128, "triton-fused", 17.0),
            _bench_row("train step", 128, "triton", 12.0)]
    (tmp_path / "bench.json").write_text(json.dumps({"environment": {}, "complete": True, "rows": rows}))
    (tmp_path / "ceilings.json").write_text(json.dumps({"gemm_tflops": {"fp32": 50.0}}))
    table = summary.write_summary(str(tmp_path), epochs=50)
    verdicts = {cells[0]: cells[1:] for cells in
                (line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| "))}
    assert verdicts["routing fwd, B = 128: triton at >= 70% of the copy bandwidth"] == ["71%", "met"]
    assert verdicts["routing fwd, B = 512: triton at >= 70% of the copy bandwidth"] == ["69%", "**not met**"]
    assert verdicts["routing fwd+bwd, B = 512: triton at >= 70% of the copy bandwidth"] == ["-", "not measured"]
    assert verdicts["routing fwd, B = 128: triton >= 5x torch-eager"] == ["9.00x", "met"]
    assert verdicts["routing fwd+bwd, B = 128: triton >= 5x torch-eager"] == ["4.90x", "**not met**"]
    assert verdicts["routing fwd, B = 128: triton >= 2x torch-compile"] == ["1.50x", "**not met**"]
    assert verdicts["routing fwd+bwd, B = 128: triton >= 2x torch-compile"] == ["2.50x", "met"]
    assert verdicts["digitcaps fwd+bwd, B = 128: triton-fused >= 3x triton (unfused)"] == ["2.50x", "**not met**"]
    # 3 GFLOP at 50 TFLOP/s: a floor of 60 us, and 1.2 ms is 20x it.
    floor = verdicts["digitcaps fwd+bwd, B = 128: triton-fused within 2x of its compute floor"]
    assert floor == ["1.2 ms, floor 60 us (3.00 GFLOP at 50 TFLOP/s): 20.0x the floor", "**not met**"]
    assert verdicts["routing fwd: triton (the default variant) / triton-sample"] == [
        "B = 128: 0.2 / 0.3 ms (default faster); B = 512: 0.9 / 0.8 ms (sample faster)"]
    assert verdicts["digitcaps fwd: triton-fused (the default variant) / triton-fused-sample"] == ["not measured"]
    assert verdicts["train step, B = 128: the default model (triton-fused) / DigitCaps unfused (triton)"] == [
        "17 / 12 ms"]


def test_summary_refuses_a_missing_folder_and_warns_of_an_empty_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        summary.main([str(tmp_path / "missing"), "--epochs", "1"])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err
    assert summary.main([str(tmp_path), "--epochs", "1"]) == 0
    assert "no stage output" in capsys.readouterr().err


def test_ceilings_checks_its_flags_before_measuring(tmp_path, monkeypatch, capsys):
    def never(*args):
        raise AssertionError("measured before the flags were checked")

    monkeypatch.setattr(ceilings, "measure", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, says in ((["--device", "cuda", "--json", str(tmp_path / "c.json")], "error: --device cuda, but"),
                       (["--json", str(tmp_path / "no" / "c.json")], "error: --json")):
        with pytest.raises(SystemExit) as exit_info:
            ceilings.main(argv)
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_ceilings_prints_small_rates_and_says_what_it_did_not_measure(tmp_path, monkeypatch, capsys):
    facts = {"device": {"cpu": "a test CPU"}, "copy_bandwidth_gbs": 20.0, "gemm_n": 256,
             "gemm_tflops": {"fp32": 0.2, "tf32": None, "bf16": 0.0121}}
    monkeypatch.setattr(ceilings, "measure", lambda device, size: facts)
    assert ceilings.main(["--device", "cpu", "--smoke", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "bf16 0.0121" in out and "tf32 not measured" in out


@pytest.mark.parametrize("batches", ["0", "x,128"])
def test_kernels_checks_its_batches_before_measuring(tmp_path, capsys, batches):
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--json", str(tmp_path / "k.json"), "--batches", batches])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m capsnet_triton.bench.kernels: error: --batches" in err
