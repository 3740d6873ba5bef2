"""Helpers shared by the reference tests: finite differences, relative error, straightforward
torch versions of squash and routing (torch is imported inside, so this module loads without it).
"""

import numpy as np

FD_STEP = 1e-6
FD_TOLERANCE = 1e-6   # SPEC section 8: float64 backward vs central differences


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| (SPEC section 8); inf when anything is NaN."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if np.isnan(actual).any() or np.isnan(expected).any():
        return np.inf
    scale = np.linalg.norm(expected)
    return np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0)


def sample_indices(shape, rng, count):
    """Up to `count` distinct flat indices into an array of `shape` (all of them if fewer)."""
    size = int(np.prod(shape))
    if size <= count:
        return np.arange(size)
    return rng.choice(size, size=count, replace=False)


def numerical_gradient(loss, x, indices=None, step=FD_STEP):
    """Central differences of the scalar loss() w.r.t. the float64 array x at flat `indices`.

    x is perturbed in place and restored, so loss() must read x. Returns the gradient entries
    in the order of `indices` (all entries when None).
    """
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x), "x must be contiguous so that perturbing the view moves x"
    indices = np.arange(flat.size) if indices is None else np.asarray(indices)
    grad = np.empty(len(indices))
    for n, k in enumerate(indices):
        original = flat[k]
        flat[k] = original + step
        plus = float(loss())
        flat[k] = original - step
        minus = float(loss())
        flat[k] = original
        grad[n] = (plus - minus) / (2 * step)
    return grad


def torch_squash(s):
    """The textbook formula |s|^2 / (1 + |s|^2) * s / |s| on torch tensors (for s != 0)."""
    squared = (s * s).sum(dim=-1, keepdim=True)
    return squared / (1 + squared) * s / squared.sqrt()


def torch_routing(u_hat, iterations, bias=None, agreement_grad=True):
    """Procedure 1 written the plain way, with logits b stored and updated, in torch.

    agreement_grad=False detaches u_hat inside the agreement u_hat . v only.
    """
    import torch

    B, I, J, _ = u_hat.shape
    b = torch.zeros(B, I, J, dtype=u_hat.dtype)
    for t in range(iterations):
        c = torch.softmax(b, dim=2)
        s = (c[..., None] * u_hat).sum(dim=1)
        if bias is not None:
            s = s + bias
        v = torch_squash(s)
        if t < iterations - 1:
            agreeing = u_hat if agreement_grad else u_hat.detach()
            b = b + (agreeing * v[:, None]).sum(dim=-1)
    return v
