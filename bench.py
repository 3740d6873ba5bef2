#!/usr/bin/env python3
"""How fast is each implementation of CapsNet's dynamic routing, and how far from the hardware?

    python bench.py                 # about 3 minutes on a quiet 2-core CPU, more under load;
                                    # a CUDA GPU is used when present
    python bench.py --quick         # about 1-2 minutes on a 2-core CPU
    python bench.py --tiny          # under a minute, small shapes (I = 72): the smoke test
    python bench.py --json out.json --plot out.png

Providers (one row each):
  numpy-ref      capsnet_triton.reference, the NumPy ground truth, fed float32 (small batches only)
  torch-eager    the routing loop as public CapsNet repos write it: autograd through a Python loop
  torch-einsum   the same loop with each contraction one einsum, and u_hat = W u as one einsum
                 (W is never copied per sample): a clean eager version
  torch-compile  torch.compile of torch-eager's squash and routing loop; u_hat = W u stays eager
                 (compiled, its backward ran over 10x slower than eager on CPU)
  project-torch  capsnet_triton.ops with backend="torch"
  project-fused  capsnet_triton.ops.capsule_linear with backend="torch": the DigitCaps layer fused,
                 u_hat never stored (the layer workloads only; the train step's default model)
  triton         capsnet_triton.ops with backend="triton": the fused kernels, on a CUDA GPU only
                 (the interpreter is never timed)
  triton-sample  the same ops with the routing forward and backward kernel A one program per
                 sample (variant="sample"), against the default split over I (grid (B, S))
  triton-fused   capsule_linear with backend="triton", on a CUDA GPU only, likewise
  triton-fused-sample  the same layer with its forward and backward kernel A one program per
                 sample (variant="sample"), against the default split over I with each W tile
                 used for a block of samples (the layer workloads only)

Workloads, float32, at the MNIST shape I=1152, J=10, D=16, P=8, r=3 unless a row says otherwise:
  squash           v = squash(s), s [B, I, P] (the primary capsules)            B up to 128 (CPU)
  routing fwd      u_hat [B, I, J, D] -> v [B, J, D]                            or 512 (GPU)
  routing fwd+bwd  also du_hat for a random upstream gradient dv; and a sweep over r (1..5; --quick: 5)
  digitcaps fwd    u [B, I, P], W [I, J, D, P] -> u_hat (Eq. 2) -> v: the whole DigitCaps layer
  digitcaps fwd+bwd  also du and dW
  train step       one Adam step of the whole CapsNet (margin + reconstruction loss); the rows
                   differ only in DigitCaps (PrimaryCaps' squash is the project's, backend=None):
                   project-torch and triton unfused, project-fused and triton-fused the default model
The last three run at one batch: B = 128 (on a CPU with --quick, 16).

Before a provider is timed, its outputs and gradients are compared with float64 ground truth:
the NumPy reference, or for batches above the NumPy limit torch-einsum's code run in float64 on
the CPU (for the train step, the project's network with DigitCaps in einsum), itself checked
against the NumPy reference at startup (the train step on more samples than one chunk of the
network's recomputed convolutions). The largest relative error ||out - ref|| / ||ref|| over the
outputs must be <= 1e-5 (SPEC section 8, float32). A provider that disagrees or raises is not timed: its
row says FAILED, the error goes to stderr, and bench exits with status 1. A shape whose inputs do
not fit in memory is skipped, as are providers this machine cannot run; a run in which every row
was skipped exits 0 and says so. Ctrl-C prints the table of the rows finished so far and exits 130;
SIGTERM (a time limit's) does the same and exits 143.

The table's header names the network shape every row runs (the plan's: --tiny's is not MNIST's)
and the exact command; bench.json's environment records both, and the plan.
Columns: median and interquartile range (p25-p75) of the repetitions after two warm-up calls
(on a CPU a third, untimed, sizes the repetitions);
"vs eager" = torch-eager's median / this median, same run ("-" where torch-eager has no timed
row of that shape, e.g. not among --providers); r is "-" for squash, which has no routing;
GB/s = the bytes a fused kernel must move per call (each workload's `bytes_moved`) / median, and
that as a share of the device's copy bandwidth measured in this run; peak MiB = memory allocated
during one call beyond what was allocated before it (CUDA: torch.cuda.max_memory_allocated; CPU:
growth of the process's peak resident set, Linux VmHWM, reset just before the call after
returning freed heap pages to the OS).

The machinery lives in capsnet_triton/bench/, one module per job: providers.py (the
implementations), workloads.py (shapes, inputs, what each workload computes), check.py (the
gate against ground truth), timing.py (time, memory, copy bandwidth), runner.py (plans and the
loop), report.py (table, environment, plot), cli.py (these flags).
"""

import sys

from capsnet_triton.bench.cli import main as _main


def main(argv=None):
    return _main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
