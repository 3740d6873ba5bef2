"""Inputs of the kernel tests: the device, the dtypes and magnitudes drawn, outputs poisoned on
that device, and what autograd saves. What "agree" means is capsnet_triton.numerics (SPEC section 8).
"""

import math

import numpy as np
import torch
from conftest import interpreted

from capsnet_triton import numerics
from capsnet_triton.numerics import as_float64  # noqa: F401  (re-exported for the kernel tests)

# Interpreted kernels take CPU tensors; compiled ones (on a GPU machine) take CUDA tensors.
DEVICE = "cpu" if interpreted() else "cuda"
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MAGNITUDES = {"zeros": 0.0, "tiny": 1e-20, "normal": 1.0, "large": 1e15}
# The NaN-policy tests' launches (variant, iterations, gradient, dtype): every one in float32; in
# half precision (loaded into float32, stored back) one per variant and gradient policy, at both
# ends of the iterations.
NAN_CASES = ([(variant, iterations, gradient, torch.float32) for variant in ("sample", "split")
              for iterations in (1, 3) for gradient in ("full", "last")]
             + [("split", 3, "full", torch.bfloat16), ("sample", 1, "last", torch.bfloat16),
                ("sample", 3, "full", torch.float16), ("split", 1, "last", torch.float16)])


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


# Every poisoned buffer has guards either side, as large as itself and at least MIN_GUARD
# elements, holding GUARD_VALUE: a kernel that writes past its output's ends (the rows of a
# block's samples past B, a padded parent) changes them, where the interpreter, storing through
# raw pointers, would corrupt other memory or crash, if anything.
MIN_GUARD = 1024
GUARD_VALUE = -4321.0
_guarded = []                     # (buffer, guard, the output's shape) of the running test


def poisoned(shape, dtype, value=float("nan")):
    """A NaN-filled output buffer on the kernels' device (SPEC 8: unwritten elements fail); `value`
    fills it instead where NaN is the expected output. It is the middle of a larger buffer whose
    guards either side the fixture guarded_outputs (conftest.py) checks after the test."""
    numel = math.prod(shape)
    # A multiple of 64 elements (128 bytes or more): the output keeps the alignment of a fresh
    # tensor, so that a compiled kernel runs the variant it runs on the tensors users pass.
    guard = -(-max(numel, MIN_GUARD) // 64) * 64
    buffer = numerics.poisoned((guard + numel + guard,), dtype, DEVICE, GUARD_VALUE)
    _guarded.append((buffer, guard, tuple(shape)))
    return buffer[guard:guard + numel].view(shape).fill_(value)


def written_past_the_ends():
    """The shapes and dtypes of the poisoned buffers made since the last call whose guards a
    kernel wrote into; the list of buffers is emptied."""
    spoiled = []
    for buffer, guard, shape in _guarded:
        guards = torch.cat((buffer[:guard], buffer[guard + math.prod(shape):]))
        if not bool((guards == torch.full_like(guards, GUARD_VALUE)).all()):
            spoiled.append(f"{list(shape)} {buffer.dtype}")
    _guarded.clear()
    return spoiled
