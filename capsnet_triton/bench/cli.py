"""bench.py's command line: parse the flags, pick the plan, providers and workloads, run, report."""

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, replace

import torch

from . import providers as _providers
from .check import check_ground_truth
from .providers import make_providers
from .report import environment, format_table, load_average, plot
from .runner import PLANS, run
from .timing import copy_bandwidth_gbs
from .workloads import WORKLOADS


def build_parser(description=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer sizes and repetitions: under a minute on CPU")
    size.add_argument("--tiny", action="store_true", help="small shapes, two repetitions: a smoke test in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batches", metavar="B,B,...",
                        help="comma-separated batch sizes of the squash and routing rows (default: the plan's)")
    parser.add_argument("--providers", help="comma-separated subset of provider names")
    parser.add_argument("--workloads", help="comma-separated subset of workload names")
    parser.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw median time per provider to a PNG")
    return parser


def _check_writable(path, flag, parser):
    """Refuse an output path that cannot be written before the benchmark runs, not after it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"{flag} {path}: cannot write there (is the folder missing, or the path a folder?)")


def _write_json(path, env, rows, complete):
    """The environment and the rows so far; "complete" is false while the run goes on. Written to
    a temporary name and renamed, so a reader never sees half a file."""
    # An infinite relative error (a provider that gave NaN) becomes null: JSON has no Infinity.
    records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
               for r in rows]
    with open(path + ".tmp", "w") as out:
        json.dump({"environment": env, "complete": complete, "rows": records}, out, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None, description=None):
    parser = build_parser(description)
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA GPU")
        if _providers.TRITON_INTERPRET:
            # CapsNet's squash picks Triton for CUDA tensors: every train-step row would time the interpreter.
            parser.error("TRITON_INTERPRET is set: unset it to benchmark on a GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    plan = PLANS[(device.type, "tiny" if args.tiny else "quick" if args.quick else "default")]
    if args.batches is not None:
        plan = replace(plan, batches=_batches(args.batches, parser))
    providers = _select(make_providers(), args.providers, parser, "provider")
    workloads = _select(WORKLOADS, args.workloads, parser, "workload")

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _check_writable(path, flag, parser)

    load_before = load_average()
    check_ground_truth(workloads)
    bandwidth = {d.type: copy_bandwidth_gbs(d, plan.copy_mib) for d in dict.fromkeys([torch.device("cpu"), device])}
    command = sys.argv[1:] if argv is None else argv

    def write_json(rows, complete):
        if args.json:
            _write_json(args.json, environment(device, bandwidth, command, load_before), rows, complete)

    rows = run(providers, workloads, plan, device, bandwidth, on_row=lambda rows: write_json(rows, False))
    env = environment(device, bandwidth, command, load_before)
    print(format_table(rows, env, providers))
    write_json(rows, True)
    if args.plot:
        plot(rows, args.plot)
    failed = [r for r in rows if r.status == "FAILED"]
    if failed:
        print(f"bench: {len(failed)} row(s) FAILED the check against the reference and were not timed",
              file=sys.stderr)
        return 1
    return 0


def _batches(text, parser):
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {text!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive, got {text!r}")
    return batches


def _select(items, wanted, parser, kind):
    if wanted is None:
        return items
    names = [name.strip() for name in wanted.split(",")]
    unknown = sorted(set(names) - {item.name for item in items})
    if unknown:
        parser.error(f"unknown {kind}(s) {unknown}; choose from {[item.name for item in items]}")
    return [item for item in items if item.name in names]
