"""OUT/summary.md of scripts/gpu_check.sh: one table with every stage's result and figures,
read from what the stages left in OUT (stages.tsv, ceilings.json, tests.log, memcheck.log,
bench.json, kernels.json, train/log.jsonl, evaluate.log, and the optional multimnist.log,
mnist40.log and affnist-generated.log). A stage that failed or ran out of time still shows what it wrote.
Below it, every GPU target of the project (docs/PERF.md, "Where the targets stand") with its
measured value and verdict, and which kernel variant was faster at each batch: what the next
GPU run has to decide from.

    python -m capsnet_triton.bench.summary OUT --epochs 50 [--smoke]
"""

import argparse
import datetime
import json
import os
import re
import sys

COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
# What pytest -v says as each test ends, under pytest-xdist: "[gw3] [ 45%] PASSED tests/a.py::t[a b]"
# (a test's id may hold spaces), and the words its summary line uses for each outcome, in its order.
ENDED = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+?)\s*$", re.MULTILINE)
OUTCOMES = {"FAILED": "failed", "PASSED": "passed", "SKIPPED": "skipped", "XFAIL": "xfailed", "XPASS": "xpassed",
            "ERROR": "errors"}


def _read(out, name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def _json(out, name):
    text = _read(out, name)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _last_line(out, name):
    lines = [line.strip() for line in (_read(out, name) or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty)"


def stages(out):
    """[(name, status, seconds, limit, note)] in the order the stages ran."""
    rows = []
    for line in (_read(out, "stages.tsv") or "").splitlines():
        name, status, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
        rows.append((name, status, seconds, limit, note))
    return rows


def ceilings_figures(out):
    c = _json(out, "ceilings.json")
    if not c:
        return "no ceilings.json"
    rates = ", ".join(f"{k} {v:.3g}" for k, v in c["gemm_tflops"].items() if v is not None)
    name = c["device"].get("name", c["device"]["cpu"])
    v = c["versions"]
    return (f"{name}: copy {c['copy_bandwidth_gbs']:.0f} GB/s; GEMM n = {c['gemm_n']}: {rates} TFLOP/s; "
            f"torch {v['torch']}, triton {v['triton']}, cuda {v['cuda']}, numpy {v['numpy']}, python {v['python']}")


def _collected(log):
    """How many tests pytest set out to run, from its header: pytest-xdist's "12 workers [548
    items]", or "collected 552 items / 544 deselected / 8 selected"; None without either."""
    workers = re.search(r"workers \[(\d+) items?\]", log)
    if workers:
        return int(workers.group(1))
    collected = re.search(r"collected (\d+) items?(?: / \d+ deselected / (\d+) selected)?", log)
    return int(collected.group(2) or collected.group(1)) if collected else None


def tests_figures(out):
    log = _read(out, "tests.log") or ""
    summaries = [line for line in log.splitlines() if COUNTS.search(line) and " in " in line]
    ended = ENDED.findall(log)
    if summaries:
        counts = ", ".join(f"{n} {word}" for n, word in COUNTS.findall(summaries[-1]))
        failed = [line.split(" - ")[0] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    elif ended:
        # Stopped by its limit before pytest's summary: the tests that ended, as -v named them.
        outcomes = [outcome for outcome, _ in ended]
        counts = "stopped before pytest's summary: " + ", ".join(
            f"{outcomes.count(outcome)} {word}" for outcome, word in OUTCOMES.items() if outcome in outcomes)
        failed = [f"{outcome} {test}" for outcome, test in ended if outcome in ("FAILED", "ERROR")]
    else:
        return "no pytest summary line in tests.log"
    collected = _collected(log)
    if collected is not None:
        # A run stopped by its limit counts only the tests it reached.
        counts += f" of {collected} collected"
    return counts + ("; " + ", ".join(failed[:8]) + (" ..." if len(failed) > 8 else "") if failed else "")


def memcheck_figures(out):
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", _read(out, "memcheck.log") or "")
    return f"compute-sanitizer memcheck: {found[-1]} errors" if found else _last_line(out, "memcheck.log")[:200]


def bench_figures(out):
    report = _json(out, "bench.json")
    if not report:
        return "no bench.json"
    rows = report["rows"]
    parts = []
    for workload in ("routing fwd+bwd", "train step"):
        timed = [r for r in rows if r["workload"] == workload and r["r"] == 3 and r["status"] == "ok"]
        if not timed:
            continue
        B = max(r["B"] for r in timed)
        at_B = {r["provider"]: r for r in timed if r["B"] == B}
        # The project's default: the Triton kernels on a GPU, the PyTorch path on a CPU; the
        # train step's model with its DigitCaps fused, as CapsNet builds it (no such row for routing).
        shown = next((at_B[p] for p in ("triton-fused", "triton", "project-fused", "project-torch") if p in at_B), None)
        if shown:
            share = f", {100 * shown['copy_share']:.0f}% copy" if shown.get("copy_share") else ""
            eager = f", {shown['vs_eager']:.2f}x eager" if shown.get("vs_eager") else ""
            parts.append(f"{workload} B={B}: {shown['provider']} {shown['median_ms']:.3g} ms{eager}{share}")
    failed = sum(r["status"] == "FAILED" for r in rows)
    timed = sum(r["status"] == "ok" for r in rows)
    cut = _cut_off(report)
    return "; ".join(parts + [f"{timed} rows timed, {failed} FAILED"] + cut)


def _cut_off(report):
    """[the note] when a JSON report says its stage stopped before its last row, else []."""
    return [] if report.get("complete", True) else ["the stage was cut off: these are the rows it finished"]


def kernels_figures(out):
    """Per workload at the largest batch: the default launch and the fastest config, GPU time
    alone (graph replay) and as a plain call."""
    report = _json(out, "kernels.json")
    if not report:
        return "no kernels.json"
    rows = [r for r in report["rows"] if "error" not in r]
    baselines = report.get("baselines", [])
    parts = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        B = max(r["B"] for r in rows if r["workload"] == workload)
        at_B = [r for r in rows if r["workload"] == workload and r["B"] == B]
        candidates = [r for r in at_B if r["config"] not in baselines]
        if not candidates:
            continue
        default = next((r for r in at_B if r["config"] == report["default"]), None)
        best = min(candidates, key=lambda r: r["graph_ms"])
        pct = f", {best['copy_pct']:.0f}% copy" if best.get("copy_pct") else ""
        text = f"{workload} B={B}: best {best['config']} {best['graph_ms']:.3g} ms{pct}"
        if default:
            text += (f" (default {default['config']} {default['graph_ms']:.3g} ms, "
                     f"as a call {default['call_ms']:.3g} ms)")
        text += "".join(f"; {r['config']} {r['graph_ms']:.3g} ms" for r in at_B if r["config"] in baselines)
        parts.append(text)
    failed = sum("error" in r for r in report["rows"])
    cut = _cut_off(report)
    return "; ".join(parts + [f"{len(rows)} rows timed, {failed} FAILED"] + cut)


def _ok_row(rows, workload, B, provider):
    """bench.json's timed row of provider on workload at batch B and r = 3, or None."""
    return next((row for row in rows if row["workload"] == workload and row["B"] == B and row["r"] == 3
                 and row["provider"] == provider and row["status"] == "ok"), None)


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def _verdict(value, least):
    return "not measured" if value is None else "met" if value >= least else "**not met**"


def _x(value):
    return "-" if value is None else f"{value:.2f}x"


def targets(out):
    """[(target, measured, verdict)]: the project's GPU targets, read from bench.json
    (and ceilings.json for the compute floor). The routing kernels (`triton`): at
    least 70% of the copy bandwidth at B = 128 and 512, 5x torch-eager and 2x torch.compile at
    B = 128, forward and forward + backward. The fused DigitCaps layer
    (`triton-fused`): forward + backward at least 3x the unfused kernels (`triton`) at B = 128,
    and within 2x of its compute floor (Workload.flops over the fp32 GEMM rate)."""
    report = _json(out, "bench.json")
    rows = report["rows"] if report else []
    result = []
    for workload in ("routing fwd", "routing fwd+bwd"):
        for B in (128, 512):
            share = (_ok_row(rows, workload, B, "triton") or {}).get("copy_share")
            result.append((f"{workload}, B = {B}: triton at >= 70% of the copy bandwidth",
                           "-" if share is None else f"{100 * share:.0f}%", _verdict(share, 0.7)))
        triton = _ok_row(rows, workload, 128, "triton")
        vs_eager = triton and triton.get("vs_eager")
        result.append((f"{workload}, B = 128: triton >= 5x torch-eager", _x(vs_eager), _verdict(vs_eager, 5)))
        compiled = _ok_row(rows, workload, 128, "torch-compile")
        vs_compile = _ratio(compiled and compiled["median_ms"], triton and triton["median_ms"])
        result.append((f"{workload}, B = 128: triton >= 2x torch-compile", _x(vs_compile),
                       _verdict(vs_compile, 2)))
    fused = _ok_row(rows, "digitcaps fwd+bwd", 128, "triton-fused")
    unfused = _ok_row(rows, "digitcaps fwd+bwd", 128, "triton")
    vs_unfused = _ratio(unfused and unfused["median_ms"], fused and fused["median_ms"])
    result.append(("digitcaps fwd+bwd, B = 128: triton-fused >= 3x triton (unfused)", _x(vs_unfused),
                   _verdict(vs_unfused, 3)))
    fp32 = ((_json(out, "ceilings.json") or {}).get("gemm_tflops") or {}).get("fp32")
    floor_ms = fused and fused.get("flops") and fp32 and fused["flops"] / (fp32 * 1e9)
    measured = "-" if not floor_ms else (f"{fused['median_ms']:.3g} ms, floor {1000 * floor_ms:.3g} us "
                                         f"({fused['flops'] / 1e9:.2f} GFLOP at {fp32:.3g} TFLOP/s): "
                                         f"{fused['median_ms'] / floor_ms:.1f}x the floor")
    result.append(("digitcaps fwd+bwd, B = 128: triton-fused within 2x of its compute floor", measured,
                   _verdict(_ratio(2 * floor_ms, fused and fused["median_ms"]) if floor_ms else None, 1)))
    return result


def variants(out):
    """[(comparison, measured)]: which kernel variant was faster at each batch (the launchers'
    default, `triton` and `triton-fused`, against variant="sample"), and the default model's
    training step (fused DigitCaps, SPEC 7) against the unfused layer."""
    report = _json(out, "bench.json")
    rows = report["rows"] if report else []
    result = []
    for workload, default, sample in (("routing fwd", "triton", "triton-sample"),
                                      ("routing fwd+bwd", "triton", "triton-sample"),
                                      ("digitcaps fwd", "triton-fused", "triton-fused-sample"),
                                      ("digitcaps fwd+bwd", "triton-fused", "triton-fused-sample")):
        pairs = [(B, _ok_row(rows, workload, B, default), _ok_row(rows, workload, B, sample))
                 for B in sorted({row["B"] for row in rows if row["workload"] == workload})]
        speed_ups = [(B, d["median_ms"], s["median_ms"]) for B, d, s in pairs if d and s]
        text = "; ".join(f"B = {B}: {d:.3g} / {s:.3g} ms ({'default' if d <= s else 'sample'} faster)"
                         for B, d, s in speed_ups)
        result.append((f"{workload}: {default} (the default variant) / {sample}", text or "not measured"))
    fused, unfused = (_ok_row(rows, "train step", 128, provider) for provider in ("triton-fused", "triton"))
    result.append(("train step, B = 128: the default model (triton-fused) / DigitCaps unfused (triton)",
                   f"{fused['median_ms']:.3g} / {unfused['median_ms']:.3g} ms" if fused and unfused
                   else "not measured"))
    return result


def train_figures(out, epochs):
    records = [json.loads(line) for line in (_read(out, "train/log.jsonl") or "").splitlines() if line.strip()]
    validation = [r for r in records if r.get("event") == "validation"]
    if not validation:
        return "no epoch finished"
    seconds = sorted(r["seconds"] for r in validation)
    best = max(validation, key=lambda r: r["accuracy"])
    test = next((r for r in records if r.get("event") == "test"), None)
    text = (f"{len(validation)}/{epochs} epochs, median {seconds[len(seconds) // 2]:.1f} s an epoch (with validation); "
            f"best validation {best['accuracy']:.2%} (epoch {best['epoch']})")
    return text + (f"; **test {test['accuracy']:.2%}** (model of epoch {test['best_epoch']})" if test else "; not tested")


def evaluate_figures(out):
    """The evaluation of the model training chose on validation before its limit stopped it."""
    lines = [line for line in (_read(out, "evaluate.log") or "").splitlines() if "test accuracy" in line]
    return f"**{lines[-1]}** (the validation-chosen model of the epochs done)" if lines else "no test accuracy"


def experiment_figures(out, name):
    """The test line of one of SPEC 9's optional stages (multimnist, mnist40, affnist-generated)."""
    log = (_read(out, name + ".log") or "").splitlines()
    lines = [line for line in log if "test " in line and " accuracy " in line]
    return f"**{lines[-1]}**" if lines else "no test accuracy"


def write_summary(out, epochs, smoke=False):
    figures = {"ceilings": lambda: ceilings_figures(out), "tests": lambda: tests_figures(out),
               "memcheck": lambda: memcheck_figures(out), "bench": lambda: bench_figures(out),
               "kernels": lambda: kernels_figures(out),
               "train": lambda: train_figures(out, epochs), "evaluate": lambda: evaluate_figures(out),
               **{name: lambda name=name: experiment_figures(out, name)
                  for name in ("multimnist", "mnist40", "affnist-generated")}}
    mode = "smoke run on a CPU, tiny sizes" if smoke else "GPU run"
    lines = [f"# GPU check ({mode}), {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", "",
             "| stage | result | seconds (limit) | figures |", "| --- | --- | --- | --- |"]
    for name, status, seconds, limit, note in stages(out):
        try:
            text = figures[name]() if name in figures else ""
        except (KeyError, TypeError, ValueError) as exc:       # a stage cut off mid-write
            text = f"unreadable output ({type(exc).__name__}: {exc})"
        if status in ("fail", "timeout"):
            ending = _last_line(out, name + ".log")[:200].replace("`", "'")
            text += f"; its log ends: `{ending}`"
        text = "; ".join(filter(None, [note, text])).replace("|", "/")
        lines.append(f"| {name} | {status.upper() if status != 'pass' else 'pass'} | {seconds} ({limit}) | {text} |")
    lines += ["", "Each stage's output is OUT/<stage>.log; bench.json, kernels.json, ceilings.json and train/ "
              "(log and figures of the run, not its checkpoints) beside it.",
              "", "## The open issues' GPU targets, from bench.json", "",
              "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in targets(out)]
    lines += ["", "## Which variant to make the default, and the default model's DigitCaps", "",
              "| comparison | measured |", "| --- | --- |"]
    lines += [f"| {comparison} | {measured} |" for comparison, measured in variants(out)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m capsnet_triton.bench.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT", help="the folder gpu_check.sh wrote")
    parser.add_argument("--epochs", type=int, required=True, help="epochs the train stage was asked for")
    parser.add_argument("--smoke", action="store_true", help="the run was gpu_check.sh --smoke")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out):
        parser.error(f"{args.out}: no such folder; give the OUT folder scripts/gpu_check.sh wrote")
    if not stages(args.out):
        print(f"summary: no stage output in {args.out} (stages.tsv is missing or empty): "
              "is it the OUT folder of scripts/gpu_check.sh?", file=sys.stderr)
    print(write_summary(args.out, args.epochs, args.smoke), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
