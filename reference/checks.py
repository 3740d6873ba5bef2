"""The input checks the reference's functions share: the arrays they compute with are floating
point (integer arrays would give integer results, or wrap around), and a capsule has an axis of
dimensions to squash or measure."""

import numpy as np

__all__ = ["check_floating", "check_capsules"]


def check_floating(**arrays):
    """ValueError naming the first of the keyword arrays that is not floating point."""
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")


def check_capsules(x, name):
    """x as an array of capsules [..., D]: at least one axis, D >= 1, floating point."""
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one axis (the capsule dimension), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has capsules of 0 dimensions (its last axis is empty, shape {x.shape})")
    check_floating(**{name: x})
    return x
