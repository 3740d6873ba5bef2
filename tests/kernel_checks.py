"""Comparison helpers of the kernel tests (SPEC section 8): the tolerances per dtype, inputs
rounded to the low-precision dtype before the reference sees them, and outputs poisoned with
NaN so that an element a kernel leaves unwritten fails.
"""

import numpy as np
import torch
from conftest import interpreted

# Interpreted kernels take CPU tensors; compiled ones (on a GPU machine) take CUDA tensors.
DEVICE = "cpu" if interpreted() else "cuda"
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
MAGNITUDES = {"zeros": 0.0, "tiny": 1e-20, "normal": 1.0, "large": 1e15}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def magnitudes(dtype):
    """The magnitude names that make sense for dtype: 1e15 is past float16's largest value."""
    return [name for name in MAGNITUDES if not (name == "large" and dtype == torch.float16)]


def sample(rng, shape, dtype, magnitude="normal"):
    """Standard normal values times the magnitude, rounded to dtype, on the kernels' device."""
    values = rng.standard_normal(shape) * MAGNITUDES[magnitude]
    return torch.from_numpy(values).to(device=DEVICE, dtype=dtype)


def as_float64(x):
    """A tensor's values as a float64 NumPy array (what the reference sees: already rounded)."""
    return x.detach().to(device="cpu", dtype=torch.float64).numpy()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_agrees(out, ref, dtype, name):
    """SPEC 8: ||out - ref|| / ||ref|| within the tolerance of the input dtype.

    NaN never passes; where the reference is all zeros the output must be exactly zero. Values
    below the smallest normal number of out's dtype may come back flushed to zero or as
    subnormals (no format holds them to the tolerance), hence the allowance of one smallest
    normal number per element.
    """
    got = as_float64(out)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite values"
    if not np.any(ref):
        assert not np.any(got), f"{name}: the reference is all zeros, the kernel gave max |out| {np.abs(got).max()}"
        return
    error = np.linalg.norm(got - ref)
    allowed = TOLERANCE[dtype] * np.linalg.norm(ref) + np.sqrt(ref.size) * torch.finfo(out.dtype).tiny
    assert error <= allowed, (f"{name}: relative error {error / np.linalg.norm(ref):.3e} "
                              f"over the {dtype} tolerance {TOLERANCE[dtype]:.0e}")
