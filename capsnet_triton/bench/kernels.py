"""GPU time of the Triton kernels alone, per variant and launch config, beside the same work's
time as one call.

bench.py times whole calls: argument checks, custom-op dispatch and one Python launch per kernel
included. At the MNIST shape those cost about as much as the kernels (on one H200 the Triton
squash took 0.14 ms a call for 2 MB of traffic), so bench's rows cannot say whether a change must
shrink the kernels or the host's work. Here each launcher sequence is captured once in a CUDA
graph and timed by replaying it (events, L2 flushed before each replay, as bench times): GPU
time, launch gaps included, host work left out. Each row also gives the same launches timed as
plain calls, and the kernels' traffic as bench counts it against the copy bandwidth.

    python -m capsnet_triton.bench.kernels --json OUT/kernels.json [--batches 128,512]

On a CUDA GPU only (the interpreter's times mean nothing).
"""

import argparse

import numpy as np
import torch

from .cli import check_writable, parse_batches, write_json_atomic
from .report import versions
from .timing import copy_bandwidth_gbs, time_calls
from .workloads import WORKLOADS, Shape, make_arrays

# (label, launcher keyword arguments): the default launch, then the knobs a default could move.
# block_i scales the BLOCK_I the launcher picks (a power of two stays one).
CONFIGS = [
    ("sample", dict(variant="sample")),
    ("sample BLOCK_I=2x", dict(variant="sample", block_i=2)),
    ("sample BLOCK_I=x/2", dict(variant="sample", block_i=0.5)),
    ("split", dict(variant="split")),
    ("split S=2", dict(variant="split", splits=2)),
    ("split S=4", dict(variant="split", splits=4)),
    ("split S=8", dict(variant="split", splits=8)),
    ("split S=16", dict(variant="split", splits=16)),
    ("split BLOCK_I=2x", dict(variant="split", block_i=2)),
    # Half the inputs a loop step: the fused split forward then takes 78 registers instead of 126
    # (float32; 157 in bfloat16) under Triton 3.6, three CTAs per SM instead of two (one).
    ("split BLOCK_I=x/2", dict(variant="split", block_i=0.5)),
]
# The fused layer's rows start with the unfused layer (predict, then the routing kernels) through
# the public ops, autograd included: the baseline capsule_linear must beat.
UNFUSED = ("unfused", None)
# The fused backward alone, split into its kernels: A and B under "full" per variant (labelled as
# the variant, like the forward's rows, so that the default is found by the same name), and B alone
# ("last" runs no kernel A, only a squash backward of [B, J, D] before kernel B).
BACKWARD = "digitcaps bwd"
LAST_ONLY = "B (last)"
BACKWARD_CONFIGS = [
    ("sample", dict(variant="sample")),
    ("split", dict(variant="split")),
    (LAST_ONLY, dict(gradient="last")),
    # Kernel B at other (BLOCK_B, BLOCK_JD, num_warps) than its default (16, 64, 4), both without
    # spills in the sm_90 compile (tests/test_kernels_compile.py compiles them): twice the columns
    # a program (two chunks, not three), and twice the samples a step, each at 8 warps (docs/PERF.md,
    # seventeenth run).
    ("split, B 16x128", dict(variant="split", weight_launch=(16, 128, 8))),
    ("split, B 32x64", dict(variant="split", weight_launch=(32, 64, 8))),
]
# Rows that time other work than their workload's candidates (another code path, another gradient
# policy): shown beside them, never picked as the best launch.
BASELINES = (UNFUSED[0], LAST_ONLY)


def _routing(x, r, kwargs, backward, shape):
    from capsnet_triton.kernels import routing, routing_backward, routing_forward
    if kwargs.get("block_i"):
        default = routing._routing_launch_config(shape.I, shape.J, shape.D, torch.float32, None)[0]["BLOCK_I"]
        kwargs = dict(kwargs, block_i=max(1, int(default * kwargs["block_i"])))

    def run():
        _, s_all, couplings = routing_forward(x["u_hat"], r, **kwargs)
        if backward:
            routing_backward(x["dv"], x["u_hat"], s_all, couplings, **kwargs)
    return run


def _fused(x, r, kwargs, backward, shape):
    from capsnet_triton.kernels import capsule_linear, capsule_linear_backward, capsule_linear_forward
    if kwargs is None:
        return _unfused(x, r, backward)
    if kwargs.get("block_i"):
        samples = capsule_linear._SPLIT_BLOCK_B if kwargs["variant"] == "split" else None
        default = capsule_linear._launch_config(shape.I, shape.J, shape.D, shape.P, torch.float32, None,
                                                samples=samples)["BLOCK_I"]
        kwargs = dict(kwargs, block_i=max(1, int(default * kwargs["block_i"])))

    def run():
        _, s_all, couplings = capsule_linear_forward(x["u"], x["W"], r, **kwargs)
        if backward:
            capsule_linear_backward(x["dv"], x["u"], x["W"], s_all, couplings, **kwargs)
    return run


def _fused_backward(x, r, kwargs):
    from capsnet_triton.kernels import capsule_linear_backward, capsule_linear_forward
    _, s_all, couplings = capsule_linear_forward(x["u"], x["W"], r, gradient=kwargs.get("gradient", "full"))

    def run():
        capsule_linear_backward(x["dv"], x["u"], x["W"], s_all, couplings, **kwargs)
    return run


def _unfused(x, r, backward):
    from capsnet_triton.ops import dynamic_routing
    from capsnet_triton.ops.capsule_linear import predict

    def run():
        if not backward:
            with torch.no_grad():
                dynamic_routing(predict(x["u"], x["W"]), r, backend="triton")
            return
        u, weight = (x[k].detach().requires_grad_() for k in ("u", "W"))
        v = dynamic_routing(predict(u, weight), r, backend="triton")
        torch.autograd.grad(v, (u, weight), x["dv"])
    return run


def _graph_ms(run, device):
    run()                                       # compile outside the capture
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()                                   # allocator warm-up on the capture stream
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return float(np.median(time_calls(graph.replay, device, reps_min=10, reps_max=50, budget_s=0.3)))


def measure(device, batches, r=3, I=1152, on_row=None):
    """Every row, each also given to on_row(result so far) as it is measured."""
    from capsnet_triton.kernels.launch import DEFAULT_VARIANT
    copy_gbs = copy_bandwidth_gbs(device, 1024)
    workloads = {w.name: w for w in WORKLOADS}
    rows = []
    result = dict(versions=versions(), device=torch.cuda.get_device_name(device), copy_bandwidth_gbs=copy_gbs,
                  I=I, r=r, default=DEFAULT_VARIANT, baselines=list(BASELINES), rows=rows)
    for B in batches:
        shape = Shape(B=B, I=I, r=r)
        # (workload, the bench workload whose inputs and bytes it takes, configs, run builder)
        jobs = [("routing fwd", "routing fwd", CONFIGS, lambda x, kw: _routing(x, r, kw, False, shape)),
                ("routing fwd+bwd", "routing fwd+bwd", CONFIGS, lambda x, kw: _routing(x, r, kw, True, shape)),
                ("digitcaps fwd", "digitcaps fwd", [UNFUSED] + CONFIGS, lambda x, kw: _fused(x, r, kw, False, shape)),
                ("digitcaps fwd+bwd", "digitcaps fwd+bwd", [UNFUSED] + CONFIGS,
                 lambda x, kw: _fused(x, r, kw, True, shape)),
                (BACKWARD, "digitcaps fwd+bwd", BACKWARD_CONFIGS, lambda x, kw: _fused_backward(x, r, kw))]
        for workload, inputs, configs, build in jobs:
            x = {k: torch.from_numpy(a).to(device) for k, a in make_arrays(workloads[inputs], shape).items()}
            moved = workloads[workload].bytes_moved(shape) if workload in workloads else None
            for label, kwargs in configs:
                row = dict(B=B, workload=workload, config=label)
                try:
                    run = build(x, kwargs)
                    graph_ms = _graph_ms(run, device)
                    call_ms = float(np.median(time_calls(run, device, reps_min=10, reps_max=50, budget_s=0.3)))
                    row.update(graph_ms=graph_ms, call_ms=call_ms,
                               copy_pct=None if moved is None else 100 * moved / (graph_ms * 1e6) / copy_gbs)
                except Exception as error:                # a config that fails to compile or launch
                    row.update(error=f"{type(error).__name__}: {error}"[:300])
                rows.append(row)
                print(_line(row), flush=True)
                if on_row is not None:
                    on_row(result)
    return result


def _line(row):
    head = f"{row['B']:>5}  {row['workload']:<18} {row['config']:<17}"
    if "error" in row:
        return f"{head} FAILED {row['error']}"
    pct = "-" if row["copy_pct"] is None else f"{row['copy_pct']:.0f}%"
    return f"{head} graph {row['graph_ms']:8.4f} ms  call {row['call_ms']:8.4f} ms  copy {pct:>4}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m capsnet_triton.bench.kernels",
                                     description=__doc__.split("\n\n")[0] + "\n\nNeeds a CUDA GPU.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="where to write the rows (required)")
    parser.add_argument("--batches", default="128,512", help="comma-separated batch sizes (default 128,512)")
    args = parser.parse_args(argv)
    batches = parse_batches(parser, "--batches", args.batches)
    if not torch.cuda.is_available():
        parser.error("times GPU kernels: needs a CUDA GPU")
    if args.json is None:
        parser.error("--json PATH is required: where to write the rows")
    check_writable(parser, "--json", args.json, renamed=True)
    print(f"{'B':>5}  {'workload':<18} {'config':<17}")
    # Written after every row (whole files only, renamed into place), so a stage stopped by its
    # time limit keeps the rows it measured; "complete" says whether all were.
    result = measure(torch.device("cuda"), batches,
                     on_row=lambda so_far: write_json_atomic(args.json, dict(so_far, complete=False)))
    write_json_atomic(args.json, dict(result, complete=True))
    failed = sum("error" in row for row in result["rows"])
    if failed:
        print(f"{failed} of {len(result['rows'])} rows FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
