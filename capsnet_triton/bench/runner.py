"""The plan of a run (batches, repetitions) and the loop: for every (workload, shape, provider),
check the first call against ground truth, then measure memory and time, one Row each."""

import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .check import TOLERANCE, ground_truth, relative_error
from .timing import peak_memory_mib, sync, time_calls
from .workloads import SWEPT, Shape, as_inputs, build, make_arrays


@dataclass(frozen=True)
class Plan:
    """Which shapes a run times and how often: every row takes at least reps_min repetitions,
    then more until budget_s seconds have passed or reps_max is reached."""

    batches: tuple                      # squash and routing
    layer_batch: int                    # digitcaps and train step
    sweep_batch: int                    # the sweep over r of routing fwd+bwd ...
    sweep_iterations: tuple             # ... at these r
    numpy_max_batch: int                # the NumPy reference is slow: larger batches skip it
    reps_min: int
    reps_max: int
    budget_s: float
    I: int = 1152                       # input capsules
    conv_channels: int = 256            # Conv1 of the training step's network
    copy_mib: int = 256                 # size of the copy that measures bandwidth


PLANS = {
    ("cpu", "default"): Plan((8, 32, 128), 128, 32, (1, 2, 3, 4, 5), 32, 3, 15, 1.0),
    ("cpu", "quick"): Plan((16,), 16, 16, (5,), 16, 3, 5, 0.3),
    ("cuda", "default"): Plan((32, 128, 512), 128, 128, (1, 2, 3, 4, 5), 32, 10, 200, 1.0, copy_mib=1024),
    ("cuda", "quick"): Plan((128, 512), 128, 128, (5,), 8, 5, 50, 0.3, copy_mib=1024),
    # Small shapes for the smoke test: I = 72 input capsules (2 types on the 6 x 6 grid).
    ("cpu", "tiny"): Plan((2,), 2, 2, (2,), 2, 2, 2, 0.0, I=72, conv_channels=16, copy_mib=16),
    ("cuda", "tiny"): Plan((2,), 2, 2, (2,), 2, 2, 2, 0.0, I=72, conv_channels=16, copy_mib=16),
}


def network_shape(plan):
    """The network every row of `plan` runs: rows differ only in B and r."""
    shape = Shape(B=0, I=plan.I, r=0, conv_channels=plan.conv_channels)
    return dict(I=shape.I, J=shape.J, D=shape.D, P=shape.P, conv_channels=shape.conv_channels)


MNIST = network_shape(PLANS[("cpu", "default")])


class Terminated(KeyboardInterrupt):
    """SIGTERM (a time limit's, as the GPU check's stages send), raised by bench's command where
    Ctrl-C raises KeyboardInterrupt, so that both stop a run alike."""


def stop_cause(stop):
    """(what stopped the run, the status a shell reports for it): Ctrl-C 130, SIGTERM 143."""
    return ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during run(): `rows` holds the rows finished before it, `cause` the
    interrupt."""

    def __init__(self, rows, cause):
        super().__init__()
        self.rows, self.cause = rows, cause


@dataclass
class Row:
    workload: str
    B: int
    r: Optional[int]                      # routing iterations; None for squash, which has none
    provider: str
    status: str                          # "ok", "FAILED" or "skipped"
    note: str = ""
    rel_error: Optional[float] = None
    median_ms: Optional[float] = None
    p25_ms: Optional[float] = None
    p75_ms: Optional[float] = None
    reps: int = 0
    first_call_s: Optional[float] = None  # the checked first call: includes torch.compile's compiling
    peak_mib: Optional[float] = None
    gbs: Optional[float] = None
    copy_share: Optional[float] = None
    vs_eager: Optional[float] = None
    flops: Optional[float] = None        # the workload's counted FLOPs (Workload.flops), for a floor


def shapes_for(workload, plan):
    batches = plan.batches if workload.batch_sweep else (plan.layer_batch,)
    configs = [(B, 3) for B in batches]
    if workload.name == SWEPT:
        configs += [(plan.sweep_batch, r) for r in plan.sweep_iterations if (plan.sweep_batch, r) not in configs]
    return [Shape(B, plan.I, r, conv_channels=plan.conv_channels) for B, r in configs]


def skip_reason(provider, shape, device, plan, workload=None):
    if provider.unavailable:
        return provider.unavailable
    if provider.layer is not None and workload is not None and not workload.whole_layer:
        return "skipped: a fused layer has no separate squash or routing"
    if provider.needs_cuda and device.type != "cuda":
        return "skipped: needs a CUDA GPU (the interpreter is never timed)"
    if provider.numpy and shape.B > plan.numpy_max_batch:
        return f"skipped: small batches only (B <= {plan.numpy_max_batch})"
    return None


def measure(row, provider, workload, shape, arrays, expected, device, plan, bandwidth):
    """Fill `row`: check the first call against `expected`, and time only if it agrees."""
    where = torch.device("cpu") if provider.numpy else device
    fn = build(provider, workload, as_inputs(arrays, np.float32, device, provider.numpy), shape)
    start = time.perf_counter()
    outputs = fn()
    sync(where)
    row.first_call_s = time.perf_counter() - start
    row.rel_error = relative_error(outputs, expected)
    # Not kept beside the measured call: a train step's outputs are its parameters' gradients, which
    # would stop the step's zero_grad from freeing them and count a second set in its peak.
    del outputs
    if not row.rel_error <= TOLERANCE:
        row.status, row.note = "FAILED", f"relative error {row.rel_error:.2e} > {TOLERANCE:.0e}: not timed"
        return
    row.peak_mib = peak_memory_mib(fn, where)             # also the second warm-up call
    times = time_calls(fn, where, plan.reps_min, plan.reps_max, plan.budget_s)
    row.status, row.reps = "ok", len(times)
    row.p25_ms, row.median_ms, row.p75_ms = (float(q) for q in np.percentile(times, [25, 50, 75]))
    row.flops = workload.flops(shape)
    moved = workload.bytes_moved(shape)
    if moved is not None:
        row.gbs = moved / (row.median_ms * 1e6)
        row.copy_share = row.gbs / bandwidth[where.type]


def _out_of_memory(exc):
    # torch's CPU allocator raises a plain RuntimeError, not torch.OutOfMemoryError.
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _inputs(workload, shape, plan):
    """The shape's inputs and float64 ground truth, or why they could not be built (a skip reason)."""
    try:
        arrays = make_arrays(workload, shape)
        return arrays, ground_truth(workload, arrays, shape, shape.B <= plan.numpy_max_batch)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        # The machine's limit, not a provider's fault: no row of this shape can run, none is wrong.
        return (f"skipped: the inputs and float64 ground truth of B = {shape.B} do not fit in memory "
                f"({type(exc).__name__}); use a smaller --batches")


def run(providers, workloads, plan, device, bandwidth, progress=True, on_row=None):
    """Check and time every (workload, shape, provider); returns the rows in that order.

    on_row(rows): called with the rows so far after each one, so that a run stopped early
    (a time limit) still leaves what it measured. Ctrl-C (or SIGTERM, Terminated) raises
    Interrupted with the rows finished before it."""
    tasks = [(w, s, p) for w in workloads for s in shapes_for(w, plan) for p in providers]
    rows, cache = [], {}
    bar = tqdm(tasks, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for workload, shape, provider in bar:
            bar.set_description(f"{workload.name} B={shape.B}{f' r={shape.r}' if workload.routed else ''} "
                                f"{provider.name}")
            rows.append(_row(workload, shape, provider, cache, device, plan, bandwidth))
            if on_row is not None:
                on_row(_compare_with_eager(rows))       # vs_eager too, for a run stopped early
    except KeyboardInterrupt as stop:
        bar.close()
        raise Interrupted(_compare_with_eager(rows), stop) from None
    return _compare_with_eager(rows)


def _row(workload, shape, provider, cache, device, plan, bandwidth):
    """One finished Row: skipped, FAILED or timed. `cache` keeps the inputs of one shape."""
    row = Row(workload.name, shape.B, shape.r if workload.routed else None, provider.name, "skipped")
    reason = skip_reason(provider, shape, device, plan, workload)
    if reason:
        row.note = reason
        return row
    key = (workload.name, shape)
    if key not in cache:
        cache.clear()                       # keep one shape's inputs and ground truth alive at a time
        cache[key] = _inputs(workload, shape, plan)
    if isinstance(cache[key], str):
        row.note = cache[key]
        return row
    arrays, expected = cache[key]
    try:
        measure(row, provider, workload, shape, arrays, expected, device, plan, bandwidth)
    except Exception as exc:                # a provider that raises is as wrong as one that disagrees
        row.status, row.note = "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if row.status == "FAILED":
        tqdm.write(f"bench: FAILED {provider.name} on {workload.name} B={shape.B} r={shape.r}: {row.note}",
                   file=sys.stderr)
    return row


def _compare_with_eager(rows):
    """Fill each timed row's vs_eager from torch-eager's row of the same shape; returns rows."""
    eager = {(r.workload, r.B, r.r): r.median_ms for r in rows if r.provider == "torch-eager" and r.median_ms}
    for row in rows:
        if row.median_ms and (row.workload, row.B, row.r) in eager:
            row.vs_eager = eager[(row.workload, row.B, row.r)] / row.median_ms
    return rows
