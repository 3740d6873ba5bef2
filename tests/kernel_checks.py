"""Inputs of the kernel tests: the device, the dtypes and magnitudes drawn, outputs poisoned on
that device, and what autograd saves. What "agree" means is capsnet_triton.numerics (SPEC section 8).
"""

import numpy as np
import torch
from conftest import interpreted

from capsnet_triton import numerics
from capsnet_triton.numerics import as_float64  # noqa: F401  (re-exported for the kernel tests)

# Interpreted kernels take CPU tensors; compiled ones (on a GPU machine) take CUDA tensors.
DEVICE = "cpu" if interpreted() else "cuda"
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MAGNITUDES = {"zeros": 0.0, "tiny": 1e-20, "normal": 1.0, "large": 1e15}


# How the kernels convert float32 to bfloat16: Triton's interpreter truncates (toward zero),
# compiled kernels round to nearest even. SPEC 8's rounding rule compares with that conversion.
CONVERSION = "truncate" if interpreted() else "nearest"


def assert_agrees(out, ref, input_dtype, name, output_dtype=None, spread=0.0):
    """The kernel tests' comparison: numerics.assert_agrees with the kernels' CONVERSION."""
    numerics.assert_agrees(out, ref, input_dtype, name, output_dtype, spread, conversion=CONVERSION)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def magnitudes(dtype):
    """The magnitude names that make sense for dtype: 1e15 is past float16's largest value."""
    return [name for name in MAGNITUDES if not (name == "large" and dtype == torch.float16)]


def sample(rng, shape, dtype, magnitude="normal"):
    """Standard normal values times the magnitude, rounded to dtype, on the kernels' device."""
    values = rng.standard_normal(shape) * MAGNITUDES[magnitude]
    return torch.from_numpy(values).to(device=DEVICE, dtype=dtype)


def saved_numel(call):
    """How many elements autograd saves for the backward while call() runs."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = call()
    return sum(saved), result


# The poison of outputs that should hold NaN (SPEC 7): a NaN poison would pass there unwritten.
FINITE_POISON = 12345.0


def poisoned(shape, dtype, value=float("nan")):
    """A NaN-filled output buffer on the kernels' device (SPEC 8: unwritten elements fail); `value`
    fills it instead where NaN is the expected output."""
    return numerics.poisoned(shape, dtype, DEVICE, value)
