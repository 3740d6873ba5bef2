"""bench.py's command line: parse the flags, pick the plan, providers and workloads, run, report."""

import argparse
import json
import math
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

    load_before = load_average()
    check_ground_truth(workloads)
    bandwidth = {d.type: copy_bandwidth_gbs(d, plan.copy_mib) for d in dict.fromkeys([torch.device("cpu"), device])}
    rows = run(providers, workloads, plan, device, bandwidth)
    env = environment(device, bandwidth, sys.argv[1:] if argv is None else argv, load_before)
    print(format_table(rows, env, providers))
    if args.json:
        with open(args.json, "w") as out:
            # An infinite relative error (a provider that gave NaN) becomes null: JSON has no Infinity.
            records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
                       for r in rows]
            json.dump({"environment": env, "rows": records}, out, indent=1)
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
