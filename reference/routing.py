"""Routing by agreement (paper Procedure 1, Eq. 3), forward and backward.

Per sample, with prediction vectors u_hat[i, j] (the paper's u_hat_{j|i}: what input capsule i
predicts for parent j):

    b = 0                                      # [I, J] routing logits, new for every sample
    for t in 1..r:
        c = softmax_j(b)                       # coupling coefficients (Eq. 3); each row sums to 1 over PARENTS j
        s_j = sum_i c_ij u_hat_ij (+ bias_j)   # [J, D] total input of parent j (Eq. 2)
        v_j = squash(s_j)                      # [J, D] output of parent j (Eq. 1)
        if t < r: b_ij += u_hat_ij . v_j       # agreement (Procedure 1, line 7)
    return v

The paper's line 7 also updates b after the last iteration; that b is never read, so it is skipped.
routing_forward is that loop, with b stored and updated. The kernels compute the same function
without ever storing b, from an identity: since b starts at 0,

    b^(t) = u_hat . V^(t),   V^(t) = v^(1) + ... + v^(t-1)        (v_sum, [J, D] per sample)

so the running sum of the outputs is all the state routing needs: b and c are recomputed from
the u_hat tile in registers, and only the couplings the backward reads are stored (SPEC section
3 lets an implementation keep them or recompute them). routing_backward is derived with the
same identity: the gradient reaches u_hat through s = sum_i c u_hat and through b = u_hat . V,
and reaches every earlier output v^(t) through each later V.

Gradient policies (SPEC section 3), `gradient=`:
- "full" (default, as the official code): the gradient flows through every iteration,
  agreement included.
- "last": u_hat (and the bias) are constants in iterations 1..r-1, so the coupling c^(r) is a
  constant and the gradient reaches u_hat only through the last iteration's s:
  du_hat = c^(r) ds^(r), dbias = sum over the batch of ds^(r). The backward needs no pass over
  the earlier iterations.

Non-finite input (SPEC section 7): a sample whose u_hat holds a NaN or inf gives NaN in all of
its v (and gradients); the other samples are unaffected. An empty batch gives empty results.
"""

import numpy as np

from .checks import check_floating
from .squash import squash_backward, squash_forward

__all__ = ["routing_forward", "routing_backward", "softmax", "GRADIENT_POLICIES", "check_gradient"]

GRADIENT_POLICIES = ("full", "last")


def check_gradient(gradient, name="gradient"):
    """The gradient policy, or a ValueError that names the choices (and the option, `name`)."""
    if not isinstance(gradient, str) or gradient not in GRADIENT_POLICIES:
        raise ValueError(f"{name} must be one of {GRADIENT_POLICIES}, got {gradient!r}")
    return gradient


def softmax(logits, axis):
    """Max-subtracted softmax (the coupling coefficients of Eq. 3), so large logits never overflow."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def routing_forward(u_hat, iterations=3, *, bias=None, gradient="full"):
    """Route prediction vectors u_hat [B, I, J, D] to output capsules v [B, J, D] (Procedure 1).

    iterations: r >= 1; r = 1 is a single pass with uniform coupling c = 1/J.
    bias: optional [J, D] added to s in every iteration (the official code has one; off by default),
    in u_hat's dtype, so that v keeps u_hat's dtype whatever the bias's.
    gradient: "full" or "last", the policy routing_backward follows (see the module docstring).
    Returns (v, cache); the cache holds every iteration's coupling, s and v for routing_backward.
    """
    u_hat = np.asarray(u_hat)
    if u_hat.ndim != 4:
        raise ValueError(f"u_hat must have shape [B, I, J, D] (4 axes), got shape {u_hat.shape}")
    check_floating(u_hat=u_hat)
    if min(u_hat.shape[1:]) < 1:
        raise ValueError(f"u_hat needs at least one input capsule, parent and dimension, got shape {u_hat.shape}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    check_gradient(gradient)
    B, I, J, D = u_hat.shape
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (J, D):
            raise ValueError(f"bias must have shape [J, D] = {(J, D)}, got {bias.shape}")
        check_floating(bias=bias)
        bias = bias.astype(u_hat.dtype, copy=False)
    # 0 for a sample whose u_hat is finite, NaN for one that is not: added to every s, it makes
    # all of that sample's outputs NaN (SPEC 7), not only the parents the bad value reaches.
    finite = np.isfinite(u_hat).all(axis=(1, 2, 3))                # [B]
    non_finite = np.where(finite, 0.0, np.nan).astype(u_hat.dtype)[:, None, None]  # [B, 1, 1]

    logits = np.zeros((B, I, J), dtype=u_hat.dtype)                # [B, I, J]   b = 0
    couplings, s_all, v_all = [], [], []
    for t in range(iterations):
        coupling = softmax(logits, axis=2)                         # [B, I, J]   c (Eq. 3), over parents j
        s = np.einsum("bij,bijd->bjd", coupling, u_hat) + non_finite  # [B, J, D]
        if bias is not None:
            s = s + bias                                           # [B, J, D]
        v = squash_forward(s)                                      # [B, J, D]
        if t < iterations - 1:
            logits = logits + np.einsum("bijd,bjd->bij", u_hat, v) # [B, I, J]   b += u_hat . v
        couplings.append(coupling)
        s_all.append(s)
        v_all.append(v)
    cache = dict(u_hat=u_hat, couplings=couplings, s_all=s_all, v_all=v_all,
                 has_bias=bias is not None, gradient=gradient)
    return v, cache


def routing_backward(dv, cache):
    """du_hat [B, I, J, D] for the loss gradient dv = dL/dv [B, J, D] of the last iteration.

    Walks the iterations backwards ("last": the last iteration only). In iteration t, with
    V^(t) = v^(1) + ... + v^(t-1) and ds = squash_backward(dL/dv^(t), s^(t)):
        du_hat += c ds                                  (through s = sum_i c u_hat)
        dc      = u_hat . ds                            [B, I, J]
        dlogits = c (dc - sum_j c dc)                   (softmax over j; dc taken relative
                                                         to the most coupled parent's)
        du_hat += dlogits V^(t)                         (through b = u_hat . V)
        dV      = sum_i dlogits u_hat                   [B, J, D]
    and, because v^(t-1) enters every V^(t'), t' >= t, dL/dv^(t-1) is the sum of dV over the
    iterations from t on (grad_v_sum).
    Returns du_hat, or (du_hat, dbias) when the forward had a bias.
    """
    u_hat = cache["u_hat"]
    dv = np.asarray(dv)
    B, I, J, D = u_hat.shape
    if dv.shape != (B, J, D):
        raise ValueError(f"dv must have shape [B, J, D] = {(B, J, D)}, got {dv.shape}")
    iterations = len(cache["s_all"])
    # V^(t) for t = 1..r: the running sums of the outputs before each iteration.
    v_sums = np.cumsum([np.zeros_like(cache["v_all"][0])] + cache["v_all"][:-1], axis=0)  # [r, B, J, D]

    du_hat = np.zeros_like(u_hat)                                  # [B, I, J, D]
    dbias = np.zeros((J, D), dtype=u_hat.dtype)                    # [J, D]
    grad_v = dv                                                    # dL/dv^(t), starts at the last
    grad_v_sum = np.zeros_like(dv)                                 # sum of dV over later iterations
    for t in reversed(range(iterations)):
        coupling, s, v_sum = cache["couplings"][t], cache["s_all"][t], v_sums[t]
        ds = squash_backward(grad_v, s)                            # [B, J, D]
        if cache["has_bias"]:
            dbias += ds.sum(axis=0)                                # [J, D]: s^(t) = sum_i c u_hat + bias
        du_hat += coupling[..., None] * ds[:, None, :, :]          # [B, I, J, D]
        if cache["gradient"] == "last":
            break                                                  # c^(r) is a constant: done
        dc = np.einsum("bijd,bjd->bij", u_hat, ds)                 # [B, I, J]
        # Measured from the most coupled parent's dc, which changes nothing (sum_j c = 1) but
        # rounding: where the coupling saturates (c -> 1), dc - sum_j c dc would cancel to the
        # small (1 - c) dc left over, and keep mostly the rounding of dc.
        dc = dc - np.take_along_axis(dc, coupling.argmax(axis=2)[..., None], axis=2)
        dlogits = coupling * (dc - np.sum(coupling * dc, axis=2, keepdims=True))  # [B, I, J]
        du_hat += dlogits[..., None] * v_sum[:, None, :, :]        # [B, I, J, D]
        grad_v_sum = grad_v_sum + np.einsum("bij,bijd->bjd", dlogits, u_hat)  # [B, J, D]
        grad_v = grad_v_sum                                        # v^(t-1) feeds every V^(t'), t' >= t
    if cache["has_bias"]:
        return du_hat, dbias
    return du_hat
