"""The input checks the reference's functions share: the arrays they compute with are floating
point (integer arrays would give integer results, or wrap around), and a capsule has an axis of
dimensions to squash or measure."""

import math
import numbers

import numpy as np

__all__ = ["check_floating", "check_capsules", "check_constant"]


def check_floating(**arrays):
    """TypeError naming the first of the keyword arrays that is not floating point (as the torch
    ops raise for a tensor of another dtype)."""
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")


def check_constant(name, value):
    """ValueError unless value is a finite real number >= 0 (a loss's weight or margin: a
    negative one would reward errors, a NaN would train on NaN)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_capsules(x, name):
    """x as an array of capsules [..., D]: at least one axis, D >= 1, floating point."""
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one axis (the capsule dimension), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has capsules of 0 dimensions (its last axis is empty, shape {x.shape})")
    check_floating(**{name: x})
    return x
