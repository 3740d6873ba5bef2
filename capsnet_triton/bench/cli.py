"""bench.py's command line: parse the flags, pick the plan, providers and workloads, run, report."""

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import threading
from dataclasses import asdict, replace

import torch

from ..files import atomic_write
from . import providers as _providers
from .check import check_ground_truth
from .providers import make_providers
from .report import environment, format_table, load_average, plot, plot_formats
from .runner import PLANS, Interrupted, Terminated, run, shapes_for, stop_cause
from .timing import copy_bandwidth_gbs
from .workloads import WORKLOADS


def build_parser(description=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="fewer sizes and repetitions: about 1-2 minutes on a 2-core CPU")
    size.add_argument("--tiny", action="store_true",
                      help="small shapes (I = 72), two repetitions: the smoke test, under a minute "
                           "(most of it torch.compile compiling)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batches", metavar="B,B,...",
                        help="comma-separated batch sizes of the squash and routing rows (default: the plan's; "
                             "the sweep over r keeps the plan's batch: 32 on a CPU (16 with --quick), 128 on a "
                             "GPU, 2 with --tiny)")
    parser.add_argument("--providers", help="comma-separated subset of provider names")
    parser.add_argument("--workloads", help="comma-separated subset of workload names")
    parser.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="also draw median time per provider, in the format of PATH's extension "
                             "(.png, .svg, .pdf ...)")
    return parser


def check_writable(parser, flag, path, renamed=False):
    """Refuse an output path that cannot be written before the measuring, not after it. The path
    is really opened: permission bits say nothing of /proc or a read-only mount, least of all to root.
    renamed: the file is written beside PATH and renamed onto it (write_json_atomic), so a file
    in PATH's folder must be possible too (tried as PATH.tmp), and PATH, where it exists, must be
    a regular file (a rename would replace a device or a pipe with a file)."""
    if path is None:
        return
    if renamed and os.path.lexists(path) and not os.path.isfile(path):
        parser.error(f"{flag} {path}: not a regular file; give a file path")
    for target in (path, path + ".tmp") if renamed else (path,):
        existed = os.path.lexists(target)
        try:
            with open(target, "a"):
                pass
        except OSError as exc:
            parser.error(f"{flag} {target}: cannot write there ({exc.strerror}); give a file path in a writable folder")
        if not existed:
            os.remove(target)


def pick_device(parser, name):
    """The device of --device `name` (None: cuda when available); asking for cuda without a GPU
    is a usage error."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU: leave --device out, or run on a GPU machine")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# Past any machine's memory at the MNIST shape (u_hat alone is 737 KB a sample), and far past what
# tensor shapes hold without overflow further up.
MAX_BATCH = 2**20


def parse_batches(parser, flag, text):
    """Comma-separated batch sizes in [1, MAX_BATCH], each once, in the order given."""
    try:
        batches = tuple(dict.fromkeys(int(b) for b in text.split(",")))
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, got {text!r}")
    if min(batches) < 1 or max(batches) > MAX_BATCH:
        parser.error(f"{flag} must be in [1, {MAX_BATCH}], got {text!r}")
    return batches


def bandwidth_devices(device, providers, workloads, plan):
    """The devices whose copy bandwidth the rows are measured against: the run's, and the CPU where
    the NumPy reference's rows run (at any of the workloads' shapes: the sweep over r and the
    layer run at batches of their own). A GPU run without them skips the CPU's copy (1 GiB at the
    GPU plans' size: seconds of scarce GPU time)."""
    numpy_rows = any(p.numpy for p in providers) and any(
        shape.B <= plan.numpy_max_batch for workload in workloads for shape in shapes_for(workload, plan))
    return list(dict.fromkeys(([torch.device("cpu")] if numpy_rows else []) + [device]))


def write_json_atomic(path, obj):
    """json.dump through files.atomic_write: a reader (the GPU check's summary, after a stage was
    stopped mid-run) never sees half a file."""
    with atomic_write(path) as out:
        out.write(json.dumps(obj, indent=1).encode())


def _write_json(path, env, rows, complete):
    """The environment and the rows so far; "complete" is false while the run goes on."""
    # An infinite relative error (a provider that gave NaN) becomes null: JSON has no Infinity.
    records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
               for r in rows]
    write_json_atomic(path, {"environment": env, "complete": complete, "rows": records})


def _terminate(signum, frame):
    raise Terminated


def main(argv=None, description=None):
    """bench.py's command; Ctrl-C anywhere ends it with one line and status 130 (while rows are
    measured, after printing the rows finished before it), SIGTERM (a time limit's) alike with
    status 143, where bench runs in the main thread (Python's signal handlers live there)."""
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_sigterm else None
    try:
        return _main(argv, description)
    except KeyboardInterrupt as stop:
        name, status = stop_cause(stop)
        print(f"bench: interrupted ({name})", file=sys.stderr)
        return status
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv, description):
    parser = build_parser(description)
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = pick_device(parser, args.device)
    if device.type == "cuda":
        if _providers.TRITON_INTERPRET:
            # CapsNet's squash picks Triton for CUDA tensors: every train-step row would time the interpreter.
            parser.error("TRITON_INTERPRET is set: unset it to benchmark on a GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    plan = PLANS[(device.type, "tiny" if args.tiny else "quick" if args.quick else "default")]
    if args.batches is not None:
        plan = replace(plan, batches=parse_batches(parser, "--batches", args.batches))
    providers = _select(make_providers(), args.providers, parser, "provider")
    workloads = _select(WORKLOADS, args.workloads, parser, "workload")
    if args.batches is not None and not any(w.batch_sweep for w in workloads):
        parser.error(f"--batches sets the batches of the squash and routing workloads, and none is selected "
                     f"(the DigitCaps layer and the train step run at B = {plan.layer_batch})")

    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib); leave it out to run without a plot")
    if args.plot is not None and os.path.splitext(args.plot)[1].lower() not in plot_formats():
        # Without a known extension savefig raises after the whole run, or writes PATH.png instead.
        parser.error(f"--plot {args.plot}: not an image name matplotlib can write; "
                     f"end it in one of {' '.join(sorted(plot_formats()))}")
    if args.json is not None and args.plot is not None and os.path.realpath(args.json) == os.path.realpath(args.plot):
        parser.error(f"--json and --plot name one file, {args.plot}: the plot would overwrite the JSON")
    check_writable(parser, "--json", args.json, renamed=True)
    check_writable(parser, "--plot", args.plot)

    load_before = load_average()
    try:
        check_ground_truth(workloads)
        bandwidth = {d.type: copy_bandwidth_gbs(d, plan.copy_mib)
                     for d in bandwidth_devices(device, providers, workloads, plan)}
    except KeyboardInterrupt as stop:
        name, status = stop_cause(stop)
        print(f"bench: interrupted ({name}) before any row was measured", file=sys.stderr)
        return status
    command = sys.argv[1:] if argv is None else argv
    json_error = []

    def write_json(rows, complete):
        """Write the rows so far; a failure (the disk filled, the folder went away) is said once
        and the measuring goes on: the table still comes, and the exit status is 1."""
        if not args.json:
            return
        try:
            _write_json(args.json, environment(device, bandwidth, command, load_before, plan), rows, complete)
        except OSError as exc:
            if not json_error:
                print(f"bench: --json {args.json}: cannot write it ({exc.strerror or exc}); the run goes on "
                      f"and the table below has every row", file=sys.stderr)
            json_error.append(exc)
        else:
            json_error.clear()

    interrupted = None
    try:
        rows = run(providers, workloads, plan, device, bandwidth, on_row=lambda rows: write_json(rows, False))
    except Interrupted as stop:
        rows, interrupted = stop.rows, stop.cause
    env = environment(device, bandwidth, command, load_before, plan)
    print(format_table(rows, env, providers))
    write_json(rows, interrupted is None)
    if interrupted is not None:
        # 130 or 143: the shell's status for a command ended by SIGINT or SIGTERM, so that scripts
        # see the run as cut short.
        name, status = stop_cause(interrupted)
        print(f"bench: interrupted ({name}): the table holds the {len(rows)} row(s) finished before it"
              + (", and so does the JSON (complete: false)" if args.json else "")
              + ("; the plot was not drawn" if args.plot else ""), file=sys.stderr)
        return status
    if args.plot:
        plot(rows, args.plot, env)
    failed = [r for r in rows if r.status == "FAILED"]
    if failed:
        print(f"bench: {len(failed)} row(s) FAILED (disagreed with the reference, or raised) and were not timed",
              file=sys.stderr)
        return 1
    if json_error:
        print(f"bench: --json {args.json} was not written: {json_error[-1]}", file=sys.stderr)
        return 1
    if not any(r.status == "ok" for r in rows):
        print("bench: no row was measured: every row was skipped; the table says why for each", file=sys.stderr)
    return 0


def _select(items, wanted, parser, kind):
    """The items named in `wanted` (each once, in the order of `items`), or all of them."""
    if wanted is None:
        return items
    names = [name.strip() for name in wanted.split(",")]
    unknown = sorted(set(names) - {item.name for item in items})
    if unknown:
        parser.error(f"unknown {kind}(s) {unknown}; choose from {[item.name for item in items]}")
    return [item for item in items if item.name in names]
