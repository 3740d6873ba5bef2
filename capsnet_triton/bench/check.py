"""The correctness gate: every provider's outputs and gradients against float64 ground truth
before it is timed (SPEC section 8, float32), and the ground truth itself checked at startup."""

import sys

import numpy as np
import torch

from .. import numerics
from ..model import RECOMPUTE_CHUNK
from .providers import EINSUM, NUMPY
from .workloads import SWEPT, WORKLOADS, Shape, as_inputs, build, make_arrays

TOLERANCE = numerics.TOLERANCE["float32"]               # float32 against float64 (SPEC 8)
GROUND_TRUTH_TOLERANCE = numerics.TOLERANCE["float64"]  # float64 torch against the float64 NumPy reference


def relative_error(outputs, expected):
    """The largest relative error (capsnet_triton.numerics) over the outputs: inf for NaN, inf
    or a wrong shape."""
    return max(numerics.relative_error(numerics.as_float64(out), want)
               for out, want in zip(outputs, expected, strict=True))


def ground_truth(workload, arrays, shape, use_numpy):
    """float64 outputs: the NumPy reference, or torch-einsum's code in float64 (large batches; for
    the train step, the project's network with DigitCaps in einsum). Always on the CPU, where the
    project's model (in the train step) uses no Triton kernel."""
    provider = NUMPY if use_numpy else EINSUM
    outputs = build(provider, workload, as_inputs(arrays, np.float64, torch.device("cpu"), use_numpy), shape)()
    return [out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out) for out in outputs]


def check_ground_truth(workloads=WORKLOADS):
    """torch-einsum in float64 must equal the NumPy reference to rounding, at every r the plans
    time, or it cannot stand in for the reference on large batches. For the train step that
    stand-in is the project's own network with DigitCaps in einsum, so it runs on more samples
    than one chunk of the network's recomputed convolutions: their chunking is then checked too."""
    for workload in workloads:
        batch = RECOMPUTE_CHUNK + 2 if workload.torch_step else 2
        for r in (1, 2, 3, 4, 5) if workload.name == SWEPT else (3,):
            shape = Shape(batch, 72, r, conv_channels=16)
            arrays = make_arrays(workload, shape)
            expected = ground_truth(workload, arrays, shape, use_numpy=True)
            got = ground_truth(workload, arrays, shape, use_numpy=False)
            err = relative_error(got, expected)
            if not err <= GROUND_TRUTH_TOLERANCE:
                sys.exit(f"bench: torch-einsum in float64 differs from the NumPy reference on {workload.name} "
                         f"at r = {r} (relative error {err:.1e}); ground truth for large batches is broken")
