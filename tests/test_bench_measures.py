"""What each number of bench's table and JSON measures, one at a time: medians and quartiles of
the repetitions, runs of calls on a CPU, the copy bandwidth, peak memory around the provider's
own call, ratios against eager at the same r, the counts of bytes and FLOPs, which code each
provider runs, the float64 ground truth and its startup check, and what the GPU check's
summary reads. Fast: about 10 s in all."""

import importlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from capsnet_triton import baselines, ops
from capsnet_triton.bench import check, cli, providers, report, runner, summary, timing
from capsnet_triton.bench.workloads import SWEPT, WORKLOADS, Shape

TINY = runner.PLANS[("cpu", "tiny")]


def _workload(name):
    return next(w for w in WORKLOADS if w.name == name)


def _provider(name, routing):
    return providers.Provider(name, "a test double", squash=baselines.squash, predict=baselines.predict,
                              routing=routing)


def test_median_and_quartiles_are_those_of_the_repetitions(monkeypatch):
    monkeypatch.setattr(runner, "time_calls", lambda *args: np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    monkeypatch.setattr(runner, "peak_memory_mib", lambda *args: 0.0)
    (row,) = runner.run([providers.EAGER], [_workload("squash")], TINY, torch.device("cpu"), {"cpu": 1.0},
                        progress=False)
    assert (row.p25_ms, row.median_ms, row.p75_ms, row.reps) == (2.0, 3.0, 4.0, 5)


def test_numpy_rows_of_a_gpu_run_are_read_against_the_cpu_copy_bandwidth(monkeypatch):
    monkeypatch.setattr(runner, "time_calls", lambda *args: np.array([2.0] * 5))
    monkeypatch.setattr(runner, "peak_memory_mib", lambda *args: 0.0)
    (row,) = runner.run([providers.NUMPY], [_workload("squash")], TINY, torch.device("cuda"),
                        {"cpu": 2.0, "cuda": 1000.0}, progress=False)
    assert row.status == "ok" and row.copy_share == pytest.approx(row.gbs / 2.0)


def test_peak_memory_is_measured_around_the_providers_call():
    def routing(u_hat, iterations):
        torch.ones(16 * 2**20)                                # 64 MiB, touched, then freed
        return baselines.routing(u_hat, iterations)

    rows = runner.run([_provider("allocating", routing)], [_workload("routing fwd")], TINY, torch.device("cpu"),
                      {"cpu": 1.0}, progress=False)
    if rows[0].peak_mib is None:
        pytest.skip("this platform cannot reset the peak resident set")
    assert rows[0].status == "ok" and rows[0].peak_mib >= 60, rows[0]


def test_peak_memory_forgets_an_earlier_peak():
    big = np.ones(512 * 2**20 // 8)
    del big
    peak = timing.peak_memory_mib(lambda: None, torch.device("cpu"))
    if peak is None:
        pytest.skip("this platform cannot reset the peak resident set")
    assert peak < 16


def test_vs_eager_compares_the_same_routing_iterations():
    rows = [runner.Row(SWEPT, 2, 3, "torch-eager", "ok", median_ms=1.0),
            runner.Row(SWEPT, 2, 2, "torch-eager", "ok", median_ms=4.0),
            runner.Row(SWEPT, 2, 3, "other", "ok", median_ms=1.0),
            runner.Row(SWEPT, 2, 2, "other", "ok", median_ms=2.0)]
    runner._compare_with_eager(rows)
    assert [r.vs_eager for r in rows[2:]] == [1.0, 2.0]


def test_skipped_rows_keep_their_reason_and_numpy_runs_up_to_its_limit():
    cpu, shape = torch.device("cpu"), Shape(2, 72, 3)
    every = {p.name: p for p in providers.make_providers()}
    assert runner.skip_reason(every["numpy-ref"], shape, cpu, TINY, _workload("squash")) is None
    assert "B <= 2" in runner.skip_reason(every["numpy-ref"], Shape(3, 72, 3), cpu, TINY, _workload("squash"))
    assert "no separate squash" in runner.skip_reason(every["project-fused"], shape, cpu, TINY, _workload("squash"))
    assert runner.skip_reason(every["project-fused"], shape, cpu, TINY, _workload("digitcaps fwd")) is None
    (row,) = runner.run([every["triton"]], [_workload("squash")], TINY, cpu, {"cpu": 1.0}, progress=False)
    assert row.status == "skipped" and row.note and row.median_ms is None, row


def test_the_layer_forward_counts_r_predictions():
    shape = Shape(2, 72, 3)
    assert _workload("digitcaps fwd").flops(shape) == 3 * 2 * 8 * (2 * 72 * 10 * 16)


def test_providers_are_fed_float32_and_ground_truth_is_the_numpy_reference_on_small_batches(monkeypatch):
    seen, sources = [], []

    def routing(u_hat, iterations):
        seen.append(u_hat.dtype)
        return baselines.routing(u_hat, iterations)

    real = runner.ground_truth

    def spy(workload, arrays, shape, use_numpy):
        sources.append((shape.B, use_numpy))
        return real(workload, arrays, shape, use_numpy)

    monkeypatch.setattr(runner, "ground_truth", spy)
    plan = replace(TINY, batches=(2, 3))
    rows = runner.run([_provider("spy", routing)], [_workload("routing fwd")], plan, torch.device("cpu"),
                      {"cpu": 1.0}, progress=False)
    assert all(r.status == "ok" for r in rows) and set(seen) == {torch.float32}
    assert sources == [(2, True), (3, False)]


def test_sweep_shapes_are_each_timed_once():
    shapes = runner.shapes_for(_workload(SWEPT), runner.PLANS[("cpu", "default")])
    assert sorted((s.B, s.r) for s in shapes) == [(8, 3), (32, 1), (32, 2), (32, 3), (32, 4), (32, 5), (128, 3)]


def test_relative_error_is_the_worst_output_and_a_missing_output_fails():
    ones = np.ones((2, 3))
    assert check.relative_error([ones, ones * 1.1], [ones, ones]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        check.relative_error([ones], [ones, ones])


def test_a_provider_with_a_right_forward_and_a_wrong_gradient_fails():
    def routing(u_hat, iterations):
        u = u_hat * 1.0
        if u.requires_grad:
            u.register_hook(lambda g: g * 1.001)
        return baselines.routing(u, iterations)

    (row,) = runner.run([_provider("bad-grad", routing)], [_workload("routing fwd+bwd")],
                        replace(TINY, sweep_iterations=()),
                        torch.device("cpu"), {"cpu": 1.0}, progress=False)
    assert row.status == "FAILED" and row.median_ms is None, row


def test_ground_truth_is_checked_at_every_r_a_plan_times(monkeypatch):
    seen = []
    real = check.ground_truth
    monkeypatch.setattr(check, "ground_truth",
                        lambda w, a, shape, use_numpy: (seen.append(shape.r), real(w, a, shape, use_numpy))[1])
    check.check_ground_truth([_workload(SWEPT)])
    timed = {r for plan in runner.PLANS.values() for r in plan.sweep_iterations} | {3}
    assert timed <= set(seen)


class _Clock:
    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self):
        return self.now

    def work(self):
        self.calls += 1
        self.now += 1 / 1024                                # seconds per call, exact in binary


def test_cpu_repetitions_are_runs_of_calls_divided_by_their_count(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    times = timing.time_calls(clock.work, torch.device("cpu"), reps_min=3, reps_max=10, budget_s=9 / 1024)
    # The sizing call: 2 calls fill CPU_SAMPLE_S (2 ms); 5 repetitions of 2 ms pass the 9/1024 s budget.
    assert list(times) == [1000 / 1024] * 5 and clock.calls == 1 + 2 * 5


def test_copy_bandwidth_counts_bytes_read_and_written_over_the_median(monkeypatch):
    monkeypatch.setattr(timing, "time_calls", lambda *args, **kwargs: np.array([1.0, 1.0, 100.0]))
    assert timing.copy_bandwidth_gbs(torch.device("cpu"), 1) == pytest.approx(2 * 2**20 / 1e6)


def test_each_provider_runs_the_code_its_name_says():
    every = {p.name: p for p in providers.make_providers()}
    for name, backend in (("project-torch", "torch"), ("triton", "triton")):
        p = every[name]
        assert p.routing.func is ops.dynamic_routing and p.routing.keywords == {"backend": backend}
        assert p.squash.func is ops.squash and p.squash.keywords == {"backend": backend}
        fused = every[f"{name.split('-')[0]}-fused"]
        assert fused.layer.func is ops.capsule_linear and fused.layer.keywords == {"backend": backend}
    compiled = every["torch-compile"]
    assert getattr(compiled.routing, "_torchdynamo_orig_callable", None) is baselines.routing
    assert getattr(compiled.squash, "_torchdynamo_orig_callable", None) is baselines.squash
    assert (every["torch-einsum"].routing, every["torch-einsum"].predict) == (baselines.einsum_routing,
                                                                             baselines.einsum_predict)
    assert (every["torch-eager"].routing, every["torch-eager"].predict) == (baselines.routing, baselines.predict)


def test_json_of_a_nan_provider_is_strict_json(tmp_path, monkeypatch):
    real = providers.make_providers
    monkeypatch.setattr(cli, "make_providers",
                        lambda: real() + [_provider("nan", lambda u, r: baselines.routing(u, r) * float("nan"))])
    path = tmp_path / "rows.json"
    assert cli.main(["--tiny", "--device", "cpu", "--providers", "nan", "--workloads", "routing fwd",
                     "--json", str(path)]) == 1

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    (row,) = json.loads(path.read_text(), parse_constant=refuse)["rows"]
    assert row["status"] == "FAILED" and row["rel_error"] is None


def test_the_gpu_checks_summary_reads_benchs_own_json(tmp_path):
    assert cli.main(["--tiny", "--device", "cpu", "--workloads", "routing fwd+bwd", "--batches", "2",
                     "--providers", "torch-eager,project-torch", "--json", str(tmp_path / "bench.json")]) == 0
    text = summary.bench_figures(str(tmp_path))
    assert "routing fwd+bwd B=2: project-torch" in text and "x eager" in text and "% copy" in text, text


def test_table_columns_say_what_the_footnotes_say():
    env = report.environment(torch.device("cpu"), {"cpu": 20.0}, [], None, TINY)
    row = runner.Row("routing fwd", 2, 3, "project-torch", "ok", median_ms=1.0, p25_ms=0.9, p75_ms=1.1,
                     rel_error=1e-7, vs_eager=4.0, gbs=10.0, copy_share=0.5, peak_mib=3.0)
    line = next(l for l in report.format_table([row], env, []).splitlines() if "project-torch" in l)
    assert line.split()[3:9] == ["1", "0.9-1.1", "4.00x", "10.0", "50", "3"], line


def test_a_loaded_cpu_is_said_before_the_table():
    """Other processes on the cores make multi-threaded CPU timings far slower (about 170x in one
    loaded run of --tiny): the table says so where the load average and torch's threads exceed
    the cores, and not on a quiet machine or a GPU."""
    env = report.environment(torch.device("cpu"), {"cpu": 20.0}, [], None, TINY)

    def warned(load, device="cpu"):
        text = report.format_table([], dict(env, load_average=(load, load, load), torch_threads=2, cpu_count=2,
                                            device=device), [])
        return "WARNING: load average" in text and "--threads 1 is steadier" in text
    assert warned(1.0) and not warned(0.4) and not warned(1.0, device="cuda")


def _write_bench(tmp_path, rows):
    (tmp_path / "bench.json").write_text(json.dumps({"environment": {}, "complete": True, "rows": rows}))


def test_summary_meets_the_floor_within_2x_and_reports_the_largest_batch(tmp_path):
    row = dict(workload="digitcaps fwd+bwd", B=128, r=3, provider="triton-fused", status="ok",
               median_ms=0.1, flops=3.0e9)
    _write_bench(tmp_path, [row] + [dict(workload="routing fwd+bwd", B=B, r=3, provider="triton", status="ok",
                                         median_ms=float(B)) for B in (32, 128)])
    (tmp_path / "ceilings.json").write_text(json.dumps({"gemm_tflops": {"fp32": 50.0}}))
    verdicts = {target: verdict for target, _, verdict in summary.targets(str(tmp_path))}
    assert verdicts["digitcaps fwd+bwd, B = 128: triton-fused within 2x of its compute floor"] == "met"
    assert "routing fwd+bwd B=128: triton 128 ms" in summary.bench_figures(str(tmp_path))


def test_bench_checks_its_ground_truth_before_measuring(monkeypatch):
    called = []
    monkeypatch.setattr(cli, "check_ground_truth", lambda workloads: called.append([w.name for w in workloads]))
    assert cli.main(["--tiny", "--device", "cpu", "--workloads", "squash", "--providers", "triton"]) == 0
    assert called == [["squash"]]


def test_the_ground_truth_check_is_held_to_float64_rounding(monkeypatch):
    def off(u_hat, iterations):
        return baselines.einsum_routing(u_hat, iterations) * (1 + 1e-8)

    monkeypatch.setattr(check, "EINSUM", replace(providers.EINSUM, routing=off))
    with pytest.raises(SystemExit, match="ground truth for large batches is broken"):
        check.check_ground_truth([_workload("routing fwd")])


def test_the_ground_truth_check_runs_the_train_step_over_several_chunks(monkeypatch):
    """Above the NumPy limit the train step's ground truth is the project's own network with
    DigitCaps in einsum: a bug in its recomputed convolutions that shows only past their first
    chunk of samples must stop bench at its startup check, not pass every row as correct."""
    model = importlib.import_module("capsnet_triton.model")
    real = model.recomputed_convolutions

    def later_chunks_off(images, first, second, chunk):
        out = real(images, first, second, chunk)
        factor = torch.ones(len(images), dtype=out.dtype)
        factor[chunk:] = 1.01
        return out * factor.view(-1, *[1] * (out.dim() - 1))
    monkeypatch.setattr(model, "recomputed_convolutions", later_chunks_off)
    with pytest.raises(SystemExit, match="on train step at r = 3 .* ground truth for large batches is broken"):
        check.check_ground_truth([_workload("train step")])
