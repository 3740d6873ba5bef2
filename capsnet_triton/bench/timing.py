"""Timing and memory: repeated calls timed on the host clock (CPU) or with CUDA events after an
L2 flush (GPU), the memory one call allocates, and the device's copy bandwidth."""

import ctypes
import time

import numpy as np
import torch

FLOAT32 = 4               # bytes
CPU_SAMPLE_S = 2e-3       # seconds of back-to-back calls per timed repetition on a CPU


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, reps_min, reps_max, budget_s):
    """Milliseconds of each repetition: at least reps_min, then more until budget_s has passed
    or reps_max is reached. The caller has warmed fn up (compiled, autotuned). On CUDA each call
    is timed with events after L2 is flushed (as triton.testing.do_bench does), so that data
    never comes from cache. On a CPU a repetition is a run of back-to-back calls lasting about
    CPU_SAMPLE_S, timed as one and divided by the calls: a call of 0.1 ms timed alone is at the
    mercy of every scheduler tick (one function timed as two providers came out 0.64x and 1.29x
    of itself in one run)."""
    sync(device)
    times = []
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if device.type == "cuda" else None
    if flush is None:
        t0 = time.perf_counter()
        fn()
        repeat = max(1, int(CPU_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    start = time.perf_counter()
    while len(times) < reps_min or (len(times) < reps_max and time.perf_counter() - start < budget_s):
        if flush is None:
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / repeat)
            continue
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return np.array(times)


def _status_kib(field_name):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def peak_memory_mib(fn, device):
    """MiB allocated during one call of fn beyond what was allocated before it; None where the
    platform cannot tell (no /proc/self/clear_refs)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)    # freed heap pages would hide new allocations
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")                       # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def copy_bandwidth_gbs(device, mib):
    """GB/s of a copy of `mib` MiB, counting bytes read and written: the achievable ceiling."""
    src = torch.ones(mib * 2**20 // FLOAT32, device=device)
    dst = torch.empty_like(src).copy_(src)
    ms = np.median(time_calls(lambda: dst.copy_(src), device, reps_min=5, reps_max=20, budget_s=0.5))
    return 2 * src.numel() * FLOAT32 / (ms * 1e6)
