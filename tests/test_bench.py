"""bench.py: the smoke run at tiny sizes, and its refusal to time a wrong implementation."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _provider(bench, name, routing):
    return bench.Provider(name, "a test double", squash=bench.baseline_squash,
                          predict=bench.baseline_predict, routing=routing)


def _workload(bench, name):
    return next(w for w in bench.WORKLOADS if w.name == name)


def test_tiny_run_has_every_provider_and_workload(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--tiny", "--json", str(tmp_path / "rows.json"),
         "--plot", str(tmp_path / "rows.png")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "rows.json").read_text())
    rows = report["rows"]
    providers = ["numpy-ref", "torch-eager", "torch-einsum", "torch-compile", "project-torch", "triton"]
    workloads = ["squash", "routing fwd", "routing fwd+bwd", "digitcaps", "train step"]
    for workload in workloads:
        assert f"== {workload} ==" in result.stdout
        for provider in providers:
            assert any(r["workload"] == workload and r["provider"] == provider for r in rows), (workload, provider)
    for provider in providers:
        assert any(provider in line for line in result.stdout.splitlines() if line.startswith("    2 ")), provider
    gpu = torch.cuda.is_available()
    for row in rows:
        expect_timed = row["provider"] != "triton" or gpu
        assert (row["status"] == "ok") == expect_timed, row
        if expect_timed:
            assert row["rel_error"] <= 1e-5 and 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"], row
        else:
            assert "CUDA GPU" in row["note"]
    assert {r["r"] for r in rows if r["workload"] == "routing fwd+bwd"} == {2, 3}
    assert report["environment"]["torch"] == torch.__version__
    assert (tmp_path / "rows.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("wrong", ["scaled", "nan", "raises"])
def test_a_wrong_provider_is_refused_not_timed(bench, wrong):
    def routing(u_hat, iterations):
        if wrong == "raises":
            raise RuntimeError("kernel exploded")
        v = bench.baseline_routing(u_hat, iterations)
        return v * 1.001 if wrong == "scaled" else v * float("nan")

    plan = bench.PLANS[("cpu", "tiny")]
    rows = bench.run([_provider(bench, "wrong", routing), bench.EAGER], [_workload(bench, "routing fwd+bwd")],
                     plan, torch.device("cpu"), {"cpu": 1.0}, progress=False)
    for row in rows:
        if row.provider == "wrong":
            assert row.status == "FAILED" and row.median_ms is None and row.reps == 0, row
            assert ("kernel exploded" in row.note) if wrong == "raises" else ("relative error" in row.note)
        else:
            assert row.status == "ok" and row.rel_error <= bench.TOLERANCE, row


def test_main_exits_nonzero_and_says_failed(bench, monkeypatch, capsys):
    def routing(u_hat, iterations):
        return bench.baseline_routing(u_hat, iterations).flip(1)   # parents in the wrong order

    real = bench.make_providers
    monkeypatch.setattr(bench, "make_providers", lambda: real() + [_provider(bench, "flipped", routing)])
    status = bench.main(["--tiny", "--device", "cpu", "--providers", "flipped,torch-eager",
                         "--workloads", "routing fwd"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "flipped       FAILED: relative error" in out
    assert "FAILED flipped on routing fwd" in err


def test_triton_is_refused_under_the_interpreter(bench, monkeypatch):
    monkeypatch.setattr(bench, "TRITON_INTERPRET", True)
    triton = next(p for p in bench.make_providers() if p.name == "triton")
    assert triton.unavailable and "TRITON_INTERPRET" in triton.unavailable
    shape = bench.Shape(2, 72, 3)
    assert bench.skip_reason(triton, shape, torch.device("cuda"), bench.PLANS[("cpu", "tiny")]) == triton.unavailable


def test_relative_error_fails_nan_and_wrong_shapes(bench):
    want = [np.ones((2, 3))]
    assert bench.relative_error([torch.ones(2, 3)], want) == 0.0
    assert bench.relative_error([np.full((2, 3), np.nan)], want) == float("inf")
    assert bench.relative_error([np.ones((3, 2))], want) == float("inf")
    assert bench.relative_error([np.ones((2, 3)) * 1.1], want) == pytest.approx(0.1)


def test_float64_torch_ground_truth_matches_the_reference(bench):
    bench.check_ground_truth()    # exits the process if not


def test_peak_memory_sees_a_new_allocation(bench):
    megabytes = 64
    peak = bench.peak_memory_mib(lambda: np.ones(megabytes * 2**20 // 8), torch.device("cpu"))
    if peak is None:
        pytest.skip("this platform cannot reset the peak resident set (/proc/self/clear_refs)")
    assert megabytes * 0.9 <= peak < megabytes * 4
