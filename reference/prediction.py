"""Prediction vectors (paper Eq. 2): what each input capsule predicts for each parent.

    u_hat[b, i, j] = W[i, j] @ u[b, i]        W [I, J, D, P], u [B, I, P] -> u_hat [B, I, J, D]

u_hat[b, i, j] is the paper's u_hat_{j|i}: input capsule i's prediction for parent j. Every
(input capsule i, parent j) pair has its own D x P matrix; in the MNIST network the matrices are
NOT shared over the 6 x 6 grid of primary capsules (SPEC section 1).
"""

import numpy as np

from .checks import check_floating

__all__ = ["prediction_forward", "prediction_backward"]


def prediction_forward(u, W):
    """u_hat = W u per (i, j) (Eq. 2). u [B, I, P], W [I, J, D, P] -> (u_hat [B, I, J, D], cache)."""
    u, W = np.asarray(u), np.asarray(W)
    if u.ndim != 3:
        raise ValueError(f"u must have shape [B, I, P] (3 axes), got shape {u.shape}")
    if W.ndim != 4:
        raise ValueError(f"W must have shape [I, J, D, P] (4 axes), got shape {W.shape}")
    check_floating(u=u, W=W)
    if u.shape[1] != W.shape[0] or u.shape[2] != W.shape[3]:
        raise ValueError(
            f"u [B, I, P] = {u.shape} does not match W [I, J, D, P] = {W.shape}: I and P must agree"
        )
    if min(W.shape) < 1:    # only the batch may be empty (SPEC section 7)
        raise ValueError(f"W [I, J, D, P] needs at least one input capsule, parent, output dimension and "
                         f"input dimension, got shape {W.shape}")
    u_hat = np.einsum("ijdp,bip->bijd", W, u, optimize=True)      # [B, I, J, D]
    return u_hat, (u, W)


def prediction_backward(du_hat, cache):
    """(du [B, I, P], dW [I, J, D, P]) for du_hat = dL/du_hat [B, I, J, D].

        du[b, i]   = sum_j W[i, j]^T du_hat[b, i, j]
        dW[i, j]   = sum_b du_hat[b, i, j] u[b, i]^T
    """
    u, W = cache
    du_hat = np.asarray(du_hat)
    expected = (u.shape[0], W.shape[0], W.shape[1], W.shape[2])
    if du_hat.shape != expected:
        raise ValueError(f"du_hat must have shape [B, I, J, D] = {expected}, got {du_hat.shape}")
    du = np.einsum("ijdp,bijd->bip", W, du_hat, optimize=True)    # [B, I, P]
    dW = np.einsum("bijd,bip->ijdp", du_hat, u, optimize=True)    # [I, J, D, P]
    return du, dW
