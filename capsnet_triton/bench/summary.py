"""OUT/summary.md of scripts/gpu_check.sh: one table with every stage's result and figures,
read from what the stages left in OUT (stages.tsv, ceilings.json, tests.log, memcheck.log,
bench.json, kernels.json, train/log.jsonl, evaluate.log, and the optional multimnist.log,
mnist40.log and affnist.log). A stage that failed or ran out of time still shows what it wrote.

    python -m capsnet_triton.bench.summary OUT --epochs 50 [--smoke]
"""

import argparse
import datetime
import json
import os
import re

COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


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


def tests_figures(out):
    log = _read(out, "tests.log") or ""
    summaries = [line for line in log.splitlines() if COUNTS.search(line) and " in " in line]
    if not summaries:
        return "no pytest summary line in tests.log"
    counts = ", ".join(f"{n} {word}" for n, word in COUNTS.findall(summaries[-1]))
    failed = [line.split(" - ")[0] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
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
        best = at_B.get("triton") or at_B.get("project-torch")
        if best:
            share = f", {100 * best['copy_share']:.0f}% copy" if best.get("copy_share") else ""
            eager = f", {best['vs_eager']:.2f}x eager" if best.get("vs_eager") else ""
            parts.append(f"{workload} B={B}: {best['provider']} {best['median_ms']:.3g} ms{eager}{share}")
    failed = sum(r["status"] == "FAILED" for r in rows)
    timed = sum(r["status"] == "ok" for r in rows)
    cut = [] if report.get("complete", True) else ["the run was cut off: these are the rows it finished"]
    return "; ".join(parts + [f"{timed} rows timed, {failed} FAILED"] + cut)


def kernels_figures(out):
    """Per workload at the largest batch: the default launch and the fastest config, GPU time
    alone (graph replay) and as a plain call."""
    report = _json(out, "kernels.json")
    if not report:
        return "no kernels.json"
    rows = [r for r in report["rows"] if "error" not in r]
    parts = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        B = max(r["B"] for r in rows if r["workload"] == workload)
        at_B = [r for r in rows if r["workload"] == workload and r["B"] == B]
        default = next((r for r in at_B if r["config"] == report["default"]), None)
        best = min(at_B, key=lambda r: r["graph_ms"])
        pct = f", {best['copy_pct']:.0f}% copy" if best.get("copy_pct") else ""
        text = f"{workload} B={B}: best {best['config']} {best['graph_ms']:.3g} ms{pct}"
        if default:
            text += (f" (default {default['config']} {default['graph_ms']:.3g} ms, "
                     f"as a call {default['call_ms']:.3g} ms)")
        parts.append(text)
    failed = sum("error" in r for r in report["rows"])
    return "; ".join(parts + [f"{len(rows)} rows timed, {failed} FAILED"])


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
    """The test line of one of SPEC 9's optional stages (multimnist, mnist40, affnist)."""
    log = (_read(out, name + ".log") or "").splitlines()
    lines = [line for line in log if "test " in line and " accuracy " in line]
    return f"**{lines[-1]}**" if lines else "no test accuracy"


def write_summary(out, epochs, smoke=False):
    figures = {"ceilings": lambda: ceilings_figures(out), "tests": lambda: tests_figures(out),
               "memcheck": lambda: memcheck_figures(out), "bench": lambda: bench_figures(out),
               "kernels": lambda: kernels_figures(out),
               "train": lambda: train_figures(out, epochs), "evaluate": lambda: evaluate_figures(out),
               **{name: lambda name=name: experiment_figures(out, name)
                  for name in ("multimnist", "mnist40", "affnist")}}
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
              "(log and figures of the run, not its checkpoints) beside it."]
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
    print(write_summary(args.out, args.epochs, args.smoke), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
