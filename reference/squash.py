"""Squash, the capsule non-linearity (paper Eq. 1).

    v = (|s|^2 / (1 + |s|^2)) * s / |s|  =  f(n) * s,   n = |s|,   f(n) = n / (1 + n^2)

It shrinks short vectors to almost zero and long ones to just under unit length, keeping the
direction, so a capsule's length can be read as the probability that its entity is present.

Numerics pinned by the specification (SPEC section 2):
- no epsilon anywhere: for every finite non-zero s the result is the exact formula, rounded;
- s = 0 gives v = 0 and, since the Jacobian at 0 is 0, a gradient of exactly 0 (never NaN);
- no overflow: the norm is taken of s / max|s|, and every function of n is written with 1/n for
  n >= 1, so n^2 is never formed where it could overflow. The forward is computed as the paper
  writes it, length times direction, which stays right even where |s| itself overflows;
- a capsule holding a NaN or inf gives NaN in all of its outputs (SPEC section 7).
"""

import numpy as np

from .checks import check_capsules

__all__ = ["squash_forward", "squash_backward"]


def _norm_and_direction(s):
    """Return n = |s| (keepdims) and the unit vector s / n (0 where s = 0), without overflow.

    NumPy's warnings are silenced because both cases are meant: a capsule holding inf gives
    inf / inf = NaN, as SPEC section 7 asks, and n itself may overflow to inf near the largest
    float, where the length 1 / (1 + 1/n^2) = 1 is still right.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.max(np.abs(s), axis=-1, keepdims=True)         # [..., 1]
        safe_scale = np.where(scale > 0, scale, 1.0)               # [..., 1]
        t = s / safe_scale                                         # [..., D], |t| <= 1
        t_norm = np.sqrt(np.sum(t * t, axis=-1, keepdims=True))    # [..., 1], in [1, sqrt(D)] or 0
        n = scale * t_norm                                         # [..., 1]
        direction = t / np.where(t_norm > 0, t_norm, 1.0)          # [..., D], unit or 0
    return n, direction


def _length(n):
    """|v| = n^2 / (1 + n^2), written as 1 / (1 + 1/n^2) for n >= 1."""
    small = np.minimum(n, 1.0)
    inv = 1.0 / np.maximum(n, 1.0)
    return np.where(n < 1.0, small * small / (1.0 + small * small), 1.0 / (1.0 + inv * inv))


def _f(n):
    """f(n) = n / (1 + n^2), written as 1 / (n + 1/n) for n >= 1 so that n^2 never overflows."""
    small = np.minimum(n, 1.0)                                     # the n < 1 branch, n^2 < 1
    large = np.maximum(n, 1.0)                                     # the n >= 1 branch, 1/n <= 1
    return np.where(n < 1.0, small / (1.0 + small * small), 1.0 / (large + 1.0 / large))


def _h(n):
    """h(n) = d|v|/dn = d(n f(n))/dn = 2n / (1 + n^2)^2, written as 2 (1/n)^3 / (1 + 1/n^2)^2 for
    n >= 1 so that n^2 never overflows."""
    small = np.minimum(n, 1.0)
    inv = 1.0 / np.maximum(n, 1.0)
    return np.where(
        n < 1.0,
        2.0 * small / (1.0 + small * small) ** 2,
        2.0 * inv * inv * inv / (1.0 + inv * inv) ** 2,
    )


def squash_forward(s):
    """v = (|s|^2 / (1 + |s|^2)) s / |s| over the last axis (Eq. 1). Any shape [..., D]."""
    s = check_capsules(s, "s")
    n, direction = _norm_and_direction(s)                          # [..., 1], [..., D]
    return _length(n) * direction                                  # [..., D]


def squash_backward(dv, s):
    """ds for v = squash(s), given dv = dL/dv (same shape as s).

    With n = |s|, s_hat = s / n, f(n) = n / (1 + n^2) and h(n) = d|v|/dn = 2n / (1 + n^2)^2,
    dv splits into its radial part (s_hat . dv) s_hat, which changes the length |v| = n f(n),
    and the rest, which turns the direction:

        ds = f(n) (dv - (s_hat . dv) s_hat) + h(n) (s_hat . dv) s_hat

    This is SPEC's `f(n) dv + f'(n) ((s . dv) / n) s`, since h = f + n f'. SPEC's form is not
    used: for large n, f ~ 1/n and n f' ~ -1/n, so for a radial dv (always, when D = 1) its two
    terms cancel down to h ~ 2/n^3 and lose a factor n^2 of relative precision. h is computed
    directly instead, so the radial part keeps its precision, and for D = 1 so does ds. For
    D >= 2 and a dv that is radial or nearly so (the margin loss alone gives a radial dv), ds is
    ill-conditioned in dv itself: dv - (s_hat . dv) s_hat cancels to dv's rounding, which f ~ 1/n
    carries against the radial part's h ~ 2/n^3, so ds has a relative error of about eps n^2 / 2
    in either form, as a change of dv by its own rounding would give; at the digit capsules'
    moderate n this is rounding. h(0) = 0 and s_hat(0) = 0, so ds at s = 0 is exactly f(0) dv = 0.
    """
    s = check_capsules(s, "s")
    dv = np.asarray(dv)
    if dv.shape != s.shape:
        raise ValueError(f"dv has shape {dv.shape} but s has shape {s.shape}; they must match")
    n, direction = _norm_and_direction(s)                          # [..., 1], [..., D]
    radial = np.sum(direction * dv, axis=-1, keepdims=True)        # [..., 1]
    radial_part = radial * direction                               # [..., D]
    return _f(n) * (dv - radial_part) + _h(n) * radial_part        # [..., D]
