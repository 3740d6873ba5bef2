"""The device's ceilings, measured: copy bandwidth and the GEMM rates of fp32, TF32 and bf16,
with the device and the versions, as JSON: the first stage of scripts/gpu_check.sh, the limits
every other figure of a run is read against.

    python -m capsnet_triton.bench.ceilings --json OUT/ceilings.json           (cuda when available)
    python -m capsnet_triton.bench.ceilings --json OUT/ceilings.json --smoke   (small sizes, seconds)
"""

import argparse
import json
import os

import numpy as np
import torch

from .cli import check_writable, pick_device
from .report import cpu_name, versions
from .timing import copy_bandwidth_gbs, time_calls

# A GEMM of n = 8192 runs for milliseconds even at bf16 on a large GPU: launch overhead is noise.
SIZES = {"full": dict(copy_mib=1024, gemm_n=8192), "smoke": dict(copy_mib=16, gemm_n=256)}


def device_facts(device):
    facts = {"type": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    return facts


def gemm_tflops(device, n, dtype, tf32=False):
    """TFLOP/s of an n x n x n matrix product (2 n^3 flops), median of the repetitions."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        torch.mm(a, b, out=out)                                # warm-up: cuBLAS picks its kernel
        ms = np.median(time_calls(lambda: torch.mm(a, b, out=out), device, reps_min=3, reps_max=20, budget_s=1.0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e9)


def measure(device, size):
    sizes = SIZES[size]
    n = sizes["gemm_n"]
    return {
        "device": device_facts(device),
        "versions": versions(),
        "copy_mib": sizes["copy_mib"],
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device, sizes["copy_mib"]),
        "gemm_n": n,
        "gemm_tflops": {
            "fp32": gemm_tflops(device, n, torch.float32),
            "tf32": gemm_tflops(device, n, torch.float32, tf32=True) if device.type == "cuda" else None,
            "bf16": gemm_tflops(device, n, torch.bfloat16),
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m capsnet_triton.bench.ceilings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", required=True, help="where to write the figures")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--smoke", action="store_true", help=f"small sizes: {SIZES['smoke']}")
    args = parser.parse_args(argv)
    device = pick_device(parser, args.device)
    check_writable(parser, "--json", args.json)
    ceilings = measure(device, "smoke" if args.smoke else "full")
    with open(args.json, "w") as out:
        json.dump(ceilings, out, indent=1)
    # Three significant digits: a CPU's bf16 rate (0.01 TFLOP/s) must not print as 0.0.
    rates = ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} not measured (CUDA only)"
                      for k, v in ceilings["gemm_tflops"].items())
    print(f"{ceilings['device'].get('name', ceilings['device']['cpu'])}: copy {ceilings['copy_bandwidth_gbs']:.0f} GB/s, "
          f"GEMM n = {ceilings['gemm_n']} TFLOP/s: {rates}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
