"""bench.py: the smoke run at tiny sizes, and its refusal to time a wrong implementation."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interpreted

from capsnet_triton import baselines
from capsnet_triton.bench import check, cli, providers, report, runner, timing
from capsnet_triton.bench.workloads import WORKLOADS, Shape

ROOT = Path(__file__).resolve().parent.parent


def _provider(name, routing):
    return providers.Provider(name, "a test double", squash=baselines.squash,
                              predict=baselines.predict, routing=routing)


def _workload(name):
    return next(w for w in WORKLOADS if w.name == name)


def test_tiny_run_has_every_provider_and_workload(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--tiny", "--json", str(tmp_path / "rows.json"),
         "--plot", str(tmp_path / "rows.png")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "rows.json").read_text())
    rows = report["rows"]
    providers = ["numpy-ref", "torch-eager", "torch-einsum", "torch-compile", "project-torch", "project-fused",
                 "triton", "triton-fused", "triton-sample", "triton-fused-sample"]
    layer_workloads = ["digitcaps fwd", "digitcaps fwd+bwd", "train step"]
    workloads = ["squash", "routing fwd", "routing fwd+bwd", *layer_workloads]
    for workload in workloads:
        assert f"== {workload} ==" in result.stdout
        for provider in providers:
            assert any(r["workload"] == workload and r["provider"] == provider for r in rows), (workload, provider)
    for provider in providers:
        assert any(provider in line for line in result.stdout.splitlines() if line.startswith("    2 ")), provider
    gpu = torch.cuda.is_available()
    for row in rows:
        fused = "-fused" in row["provider"]
        expect_timed = (not row["provider"].startswith("triton") or gpu) and (
            not fused or row["workload"] in layer_workloads)
        assert (row["status"] == "ok") == expect_timed, row
        if expect_timed:
            assert row["rel_error"] <= 1e-5 and 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"], row
        else:
            assert "CUDA GPU" in row["note"] or (fused and "no separate" in row["note"]), row
    assert {r["r"] for r in rows if r["workload"] == "routing fwd+bwd"} == {2, 3}
    assert report["environment"]["torch"] == torch.__version__
    assert (tmp_path / "rows.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("wrong", ["scaled", "nan", "raises", "iterations"])
def test_a_wrong_provider_is_refused_not_timed(wrong):
    """Including one that routes once instead of r times: the inputs must be large enough for the
    couplings to move (at a thousandth of their scale, one iteration passed the gate)."""
    def routing(u_hat, iterations):
        if wrong == "raises":
            raise RuntimeError("kernel exploded")
        if wrong == "iterations":
            return baselines.routing(u_hat, 1)
        v = baselines.routing(u_hat, iterations)
        return v * 1.0001 if wrong == "scaled" else v * float("nan")   # 1e-4: ten times the tolerance

    plan = runner.PLANS[("cpu", "tiny")]
    rows = runner.run([_provider("wrong", routing), providers.EAGER], [_workload("routing fwd+bwd")],
                      plan, torch.device("cpu"), {"cpu": 1.0}, progress=False)
    for row in rows:
        if row.provider == "wrong":
            assert row.status == "FAILED" and row.median_ms is None and row.reps == 0, row
            assert ("kernel exploded" in row.note) if wrong == "raises" else ("relative error" in row.note)
        else:
            assert row.status == "ok" and row.rel_error <= check.TOLERANCE, row


def test_bytes_and_rates_are_the_documented_counts(monkeypatch):
    """docs/PERF.md, "How to read a table": squash reads s and writes v, the routing forward reads
    u_hat once per iteration, forward + backward 2r times and writes du_hat once; GB/s is those
    bytes over the median; vs eager is torch-eager's median over the row's."""
    shape = Shape(2, 72, 3)                                   # u_hat: 2 x 72 x 10 x 16 float32 = 92,160 bytes
    moved = {w.name: w.bytes_moved(shape) for w in WORKLOADS}
    assert (moved["squash"], moved["routing fwd"], moved["routing fwd+bwd"]) == (9216, 3 * 92160, 7 * 92160)
    monkeypatch.setattr(runner, "time_calls", lambda *args: [2.0] * 5)           # milliseconds
    monkeypatch.setattr(runner, "peak_memory_mib", lambda *args: 0.0)
    rows = runner.run([providers.EAGER, replace(providers.EAGER, name="other")], [_workload("squash")],
                      runner.PLANS[("cpu", "tiny")], torch.device("cpu"), {"cpu": 1.0}, progress=False)
    eager, other = (next(r for r in rows if r.provider == name) for name in ("torch-eager", "other"))
    assert eager.gbs == pytest.approx(9216 / 2e-3 / 1e9) and eager.copy_share == pytest.approx(eager.gbs)
    eager.median_ms = 3.0
    runner._compare_with_eager(rows)
    assert other.vs_eager == pytest.approx(1.5)                # 1.5 times as fast as eager


def test_main_exits_nonzero_and_says_failed(monkeypatch, capsys):
    def routing(u_hat, iterations):
        return baselines.routing(u_hat, iterations).flip(1)   # parents in the wrong order

    real = providers.make_providers
    monkeypatch.setattr(cli, "make_providers", lambda: real() + [_provider("flipped", routing)])
    status = cli.main(["--tiny", "--device", "cpu", "--providers", "flipped,torch-eager",
                         "--workloads", "routing fwd"])
    out, err = capsys.readouterr()
    assert status == 1
    assert re.search(r"\n +2 +3  flipped +FAILED: relative error", out)
    assert "FAILED flipped on routing fwd" in err


def test_triton_is_refused_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(providers, "TRITON_INTERPRET", True)
    triton = next(p for p in providers.make_providers() if p.name == "triton")
    assert triton.unavailable and "TRITON_INTERPRET" in triton.unavailable
    shape = Shape(2, 72, 3)
    assert runner.skip_reason(triton, shape, torch.device("cuda"), runner.PLANS[("cpu", "tiny")]) == triton.unavailable


def test_relative_error_fails_nan_and_wrong_shapes():
    want = [np.ones((2, 3))]
    assert check.relative_error([torch.ones(2, 3)], want) == 0.0
    assert check.relative_error([np.full((2, 3), np.nan)], want) == float("inf")
    assert check.relative_error([np.ones((3, 2))], want) == float("inf")
    assert check.relative_error([np.ones((2, 3)) * 1.1], want) == pytest.approx(0.1)


def test_float64_torch_ground_truth_matches_the_reference():
    check.check_ground_truth()    # exits the process if not


def test_peak_memory_sees_a_new_allocation():
    megabytes = 64
    peak = timing.peak_memory_mib(lambda: np.ones(megabytes * 2**20 // 8), torch.device("cpu"))
    if peak is None:
        pytest.skip("this platform cannot reset the peak resident set (/proc/self/clear_refs)")
    assert megabytes * 0.9 <= peak < megabytes * 4


def test_batches_flag_sets_the_batches_of_squash_and_routing(tmp_path):
    status = cli.main(["--tiny", "--device", "cpu", "--batches", "3,5", "--providers", "torch-eager",
                       "--workloads", "squash,digitcaps fwd+bwd", "--json", str(tmp_path / "rows.json")])
    assert status == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert sorted((r["workload"], r["B"]) for r in rows) == [("digitcaps fwd+bwd", 2), ("squash", 3), ("squash", 5)]
    # The layer's counted FLOPs (for its compute floor): 2P per u_hat element, 2r + 1 times over
    # (--tiny: I = 72, r = 3); none for squash.
    flops = {r["workload"]: r["flops"] for r in rows}
    assert flops == {"squash": None, "digitcaps fwd+bwd": 7 * 2 * 8 * (2 * 72 * 10 * 16)}
    # squash has no routing iterations: no r in the JSON, as the table's "-".
    assert {r["workload"]: r["r"] for r in rows} == {"squash": None, "digitcaps fwd+bwd": 3}


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0,2"], "--batches must be in [1, 1048576]"),
    (["--batches", "99999999999999999999999"], "--batches must be in [1, 1048576]"),
    (["--batches", "4", "--workloads", "train step"], "--batches sets the batches of the squash and routing"),
    (["--json", "same.png", "--plot", "same.png"], "--json and --plot name one file"),
])
def test_flags_that_would_be_ignored_or_clash_are_usage_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, path", [("--json", "missing-folder/out.json"), ("--plot", "missing-folder/out.png"),
                                        ("--json", "/proc/bench-out.json"), ("--plot", "/proc/bench-out.png"),
                                        ("--plot", "out.xyz"), ("--plot", "out")])
def test_an_unwritable_output_path_is_refused_before_any_benchmark(tmp_path, monkeypatch, capsys, flag, path):
    # /proc refuses new files even to root, for whom permission bits (os.access) say yes.
    if path.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this platform")

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before the output path was checked")

    monkeypatch.setattr(cli, "run", never)
    monkeypatch.setattr(cli, "check_ground_truth", never)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", flag, str(tmp_path / path)])
    assert exit_info.value.code == 2
    assert f"error: {flag} " in capsys.readouterr().err


def test_json_onto_a_device_or_a_link_to_one_is_refused(tmp_path, capsys):
    """The JSON is renamed into place, which would replace a device node with a plain file."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null on this platform")
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--device", "cpu", "--json", str(link)])
    assert exit_info.value.code == 2 and "not a regular file" in capsys.readouterr().err
    assert link.is_symlink()


def test_a_json_that_cannot_be_written_mid_run_keeps_the_run_and_fails_at_the_end(tmp_path, monkeypatch, capsys):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_json", full_disk)
    status = cli.main(["--tiny", "--device", "cpu", "--workloads", "squash", "--providers", "torch-eager",
                       "--batches", "2,3", "--json", str(tmp_path / "rows.json")])
    captured = capsys.readouterr()
    assert status == 1 and captured.err.count("cannot write it (No space left on device)") == 1
    assert "was not written" in captured.err and re.search(r"\n +3 +-  torch-eager", captured.out)


def test_pgf_plots_need_their_tex_program(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert ".pgf" not in report.plot_formats() and ".png" in report.plot_formats()


def test_the_writability_check_leaves_no_file_behind_and_keeps_an_old_one(tmp_path):
    parser = cli.build_parser()
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("earlier run")
    for path in (new, old):
        cli.check_writable(parser, "--json", str(path))
    assert not new.exists() and old.read_text() == "earlier run"


def test_recorded_command_quotes_its_arguments_and_the_network_shape():
    plan = runner.PLANS[("cpu", "tiny")]
    args = ["--tiny", "--workloads", "routing fwd+bwd,digitcaps fwd+bwd"]
    env = report.environment(torch.device("cpu"), {"cpu": 1.0}, args, None, plan)
    assert shlex.split(env["command"]) == ["python", "bench.py", *args]
    assert env["network"] == dict(I=72, J=10, D=16, P=8, conv_channels=16) and env["plan"]["reps_max"] == 2
    table = report.format_table([], env, [])
    assert "network I = 72, J = 10, D = 16, P = 8, Conv1 16 channels (NOT the MNIST shape" in table
    mnist = report.environment(torch.device("cpu"), {"cpu": 1.0}, [], None, runner.PLANS[("cpu", "quick")])
    assert "I = 1152, J = 10, D = 16, P = 8, Conv1 256 channels (the MNIST shape)" in report.format_table([], mnist, [])


def test_inputs_too_large_for_memory_skip_their_rows():
    plan = replace(runner.PLANS[("cpu", "tiny")], batches=(10**9,))
    rows = runner.run([providers.EAGER, providers.EINSUM], [_workload("squash")], plan, torch.device("cpu"),
                      {"cpu": 1.0}, progress=False)
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert all("do not fit in memory" in r.note for r in rows), rows


def _timed_row(workload, B, r, provider, ms):
    return runner.Row(workload, B, r, provider, "ok", median_ms=ms, p25_ms=ms, p75_ms=ms, rel_error=0.0)


def test_plot_keeps_its_legend_off_the_data_and_names_what_it_leaves_out():
    shapes = ((8, 3), (32, 3), (8, 1), (8, 2))               # B = 8 and 32, and the r sweep at B = 8
    rows = [_timed_row("routing fwd+bwd", B, r, provider, ms * B * r)
            for provider, ms in (("torch-eager", 2.0), ("torch-einsum", 1.0)) for B, r in shapes]
    rows.append(runner.Row("routing fwd+bwd", 8, 3, "flipped", "FAILED", note="relative error 1e-1"))
    env = {"device": "cpu", "cpu": "a test CPU", "network": runner.network_shape(runner.PLANS[("cpu", "tiny")])}
    fig = report.figure(rows, env)
    fig.canvas.draw()
    over_b, over_r = (ax for ax in fig.axes if ax.get_visible())
    assert [t.get_text() for t in over_b.get_xticklabels()] == ["8", "32"]
    assert [t.get_text() for t in over_r.get_xticklabels()] == ["1", "2", "3"]
    assert over_b.get_legend() is None and over_r.get_legend() is None and len(fig.legends) == 1
    legend_top = fig.legends[0].get_window_extent().y1
    assert legend_top <= min(ax.get_window_extent().y0 for ax in (over_b, over_r))
    title = "\n".join(text.get_text() for text in fig.texts)
    assert "cpu" in title and "I = 72" in title and "flipped (routing fwd+bwd)" in title
    import matplotlib.pyplot as plt                         # report.figure chose the Agg backend
    plt.close(fig)


def test_a_plot_of_the_r_sweep_alone_has_one_panel():
    """Rows timed only away from r = 3 (the others skipped) leave no panel over B."""
    rows = [_timed_row("routing fwd+bwd", 2, r, "numpy-ref", float(r)) for r in (1, 2)]
    env = {"device": "cpu", "cpu": "a test CPU", "network": runner.network_shape(runner.PLANS[("cpu", "tiny")])}
    fig = report.figure(rows, env)
    (over_r,) = (ax for ax in fig.axes if ax.get_visible())
    assert over_r.get_xlabel() == "r"
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_table_footnotes_and_squash_rows():
    env = report.environment(torch.device("cpu"), {"cpu": 1.0}, [], None, runner.PLANS[("cpu", "tiny")])
    rows = [_timed_row("squash", 2, None, "torch-einsum", 1.0)]
    table = report.format_table(rows, env, [providers.EINSUM])
    assert re.search(r"\n +2 +-  torch-einsum +1 ", table), table
    assert "torch-eager was not among the providers" in table
    assert "on a CPU, the growth of the process's resident memory" in table


def test_repeated_batches_and_providers_run_once(tmp_path):
    path = tmp_path / "rows.json"
    assert cli.main(["--tiny", "--device", "cpu", "--batches", "2,3,2", "--providers", "torch-eager,torch-eager",
                     "--workloads", "squash", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["B"], r["provider"]) for r in rows] == [(2, "torch-eager"), (3, "torch-eager")]


def test_a_run_that_measured_nothing_says_so(capsys):
    # On a CPU the triton provider is always skipped: needs a GPU, or refused under the interpreter.
    assert cli.main(["--tiny", "--device", "cpu", "--workloads", "squash", "--providers", "triton"]) == 0
    assert "bench: no row was measured" in capsys.readouterr().err


def test_ctrl_c_prints_the_rows_so_far_and_exits_130(tmp_path, monkeypatch, capsys):
    def routing(u_hat, iterations):
        if u_hat.shape[0] == 3:
            raise KeyboardInterrupt
        return baselines.routing(u_hat, iterations)

    real = providers.make_providers
    monkeypatch.setattr(cli, "make_providers", lambda: real() + [_provider("stopper", routing)])
    path = tmp_path / "rows.json"
    status = cli.main(["--tiny", "--device", "cpu", "--batches", "2,3", "--providers", "torch-eager,stopper",
                       "--workloads", "routing fwd", "--json", str(path)])
    out, err = capsys.readouterr()
    assert status == 130
    assert re.search(r"\n +2 +3  stopper +[0-9.]+ ", out) and re.search(r"\n +3 +3  torch-eager +[0-9.]+ ", out)
    assert "interrupted (Ctrl-C): the table holds the 3 row(s)" in err
    report_ = json.loads(path.read_text())
    assert report_["complete"] is False and len(report_["rows"]) == 3


def test_sigterm_prints_the_rows_so_far_and_exits_143(tmp_path, monkeypatch, capsys):
    """A time limit's SIGTERM (the GPU check's stages) stops bench as Ctrl-C does; its handler is
    bench's only while bench runs."""
    def routing(u_hat, iterations):
        if u_hat.shape[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return baselines.routing(u_hat, iterations)

    real = providers.make_providers
    monkeypatch.setattr(cli, "make_providers", lambda: real() + [_provider("stopper", routing)])
    path = tmp_path / "rows.json"
    before = signal.getsignal(signal.SIGTERM)
    status = cli.main(["--tiny", "--device", "cpu", "--batches", "2,3", "--providers", "torch-eager,stopper",
                       "--workloads", "routing fwd", "--json", str(path)])
    out, err = capsys.readouterr()
    assert status == 143 and signal.getsignal(signal.SIGTERM) == before
    assert re.search(r"\n +2 +3  stopper +[0-9.]+ ", out) and re.search(r"\n +3 +3  torch-eager +[0-9.]+ ", out)
    assert "interrupted (SIGTERM): the table holds the 3 row(s)" in err
    assert json.loads(path.read_text())["complete"] is False


def test_ctrl_c_before_any_row_or_a_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tiny", "--device", "cpu", "--plot", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err

    def stopped():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "make_providers", stopped)
    assert cli.main(["--tiny", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "bench: interrupted (Ctrl-C)"


def test_json_holds_the_rows_measured_so_far_while_the_run_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    seen = []
    real_run = cli.run

    def watching_run(*args, on_row, **kwargs):
        def on_row_and_read(rows):
            on_row(rows)
            report = json.loads(path.read_text())
            # vs eager is filled as the rows come: a run stopped early (a time limit) keeps it.
            assert all(row["vs_eager"] == 1.0 for row in report["rows"]), report["rows"]
            seen.append((report["complete"], len(report["rows"])))
        return real_run(*args, on_row=on_row_and_read, **kwargs)

    monkeypatch.setattr(cli, "run", watching_run)
    assert cli.main(["--tiny", "--device", "cpu", "--batches", "3,5", "--providers", "torch-eager",
                     "--workloads", "squash", "--json", str(path)]) == 0
    assert seen == [(False, 1), (False, 2)]
    assert json.loads(path.read_text())["complete"] is True


@pytest.mark.skipif(not interpreted(), reason="natively, the GPU check's kernels stage runs every row")
def test_kernel_timing_builds_and_runs_every_row(monkeypatch):
    """python -m capsnet_triton.bench.kernels times on a GPU only (CUDA graphs), so here each of
    its rows runs through the interpreter, with the graph replaced by a plain call: every
    workload and config builds and runs, none ends as an error row."""
    from capsnet_triton.bench import kernels

    monkeypatch.setattr(kernels, "_graph_ms", lambda run, device: (run(), 1.0)[1])
    monkeypatch.setattr(kernels, "time_calls", lambda fn, device, **_: (fn(), np.array([2.0]))[1])
    monkeypatch.setattr(kernels, "copy_bandwidth_gbs", lambda device, mib: 1.0)
    monkeypatch.setattr(kernels.torch.cuda, "get_device_name", lambda device: "cpu")
    seen = []
    result = kernels.measure(torch.device("cpu"), [3], I=20, on_row=lambda so_far: seen.append(len(so_far["rows"])))
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    assert seen == list(range(1, len(rows) + 1))              # kernels.json rewritten after every row
    counts = {w: sum(r["workload"] == w for r in rows) for w in dict.fromkeys(r["workload"] for r in rows)}
    configs = len(kernels.CONFIGS)
    assert counts == {"routing fwd": configs, "routing fwd+bwd": configs, "digitcaps fwd": configs + 1,
                      "digitcaps fwd+bwd": configs + 1, kernels.BACKWARD: len(kernels.BACKWARD_CONFIGS)}
    assert all(r["graph_ms"] == 1.0 and r["call_ms"] == 2.0 for r in rows)
    assert result["default"] in {r["config"] for r in rows if r["workload"] == kernels.BACKWARD}   # the summary's


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_kernel_timing_says_it_needs_a_gpu_first(capsys):
    from capsnet_triton.bench import kernels
    with pytest.raises(SystemExit) as exit_info:
        kernels.main([])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernels.main(["--help"])
    assert "Needs a CUDA GPU." in capsys.readouterr().out


def test_a_gpu_run_without_numpy_rows_skips_the_cpu_copy():
    """The CPU's copy bandwidth is measured only for the NumPy reference's rows (or a CPU run): at
    the GPU plans' 1 GiB it cost seconds of GPU time that no row used."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    every = providers.make_providers()
    quick = runner.PLANS[("cuda", "quick")]
    every_workload = WORKLOADS
    assert cli.bandwidth_devices(gpu, every, every_workload, replace(quick, batches=(32, 128, 512))) == [gpu]
    assert cli.bandwidth_devices(gpu, every, every_workload, replace(quick, batches=(2, 128))) == [cpu, gpu]
    assert cli.bandwidth_devices(gpu, [p for p in every if not p.numpy], every_workload,
                                 replace(quick, batches=(2,))) == [gpu]
    assert cli.bandwidth_devices(cpu, every, every_workload, runner.PLANS[("cpu", "default")]) == [cpu]
    # The sweep over r and the layer run at the plan's own batches: NumPy rows there need the CPU's.
    tiny = runner.PLANS[("cuda", "tiny")]
    assert cli.bandwidth_devices(gpu, every, every_workload, replace(tiny, batches=(4,))) == [cpu, gpu]
