"""Squash (paper Eq. 1) as Triton kernels, forward and backward, over the last axis.

    v = f(n) s,   n = |s|,   f(n) = n / (1 + n^2)
    ds = f(n) (dv - r s_hat) + h(n) r s_hat,   s_hat = s / n,   r = s_hat . dv,   h(n) = 2n / (1 + n^2)^2

The same function as capsnet_triton.reference.squash, with SPEC section 2's numerics: no epsilon,
s = 0 gives v = 0 and ds = 0, and no overflow (the norm is taken of s / max|s|, and for n >= 1
only 1/n is squared). A capsule holding a NaN or inf gives NaN in all of its v and ds
(SPEC section 7). The tile helpers `squash_tile` and `squash_backward_tile` are shared with
the routing kernels, which squash [J, D] tiles held in registers.

Naive PyTorch squash reads s three times (norm, scale, multiply) and writes two temporaries of
its size; these kernels read s once and write v once (backward: read s and dv, write ds).
"""

import triton
import triton.language as tl

from capsnet_triton.checks import check_capsules, check_float_tensor

from .launch import launch_options, max_tile, on_tensor_device, output, tl_dtype

__all__ = ["squash_forward", "squash_backward"]


@triton.jit
def _norm_and_direction(s):
    """n = |s| [R] and s_hat = s / n [R, BLOCK_D] (0 where s = 0, NaN where s is not finite) for
    the rows of a tile s.

    Padded entries of s must be 0. The norm is taken of s / max|s|, so no square overflows or
    underflows, and the direction stays exact when n itself overflows to inf.
    """
    scale = tl.max(tl.abs(s), axis=1)                                      # [R]
    # A true division: 1 / scale would overflow for a subnormal scale.
    t = s / tl.where(scale > 0, scale, 1.0)[:, None]                       # [R, BLOCK_D], |t| <= 1
    t_norm = tl.sqrt(tl.sum(t * t, axis=1))                                # [R], in [1, sqrt(D)] or 0
    # t_norm is 0 or in [1, sqrt(D)], so one reciprocal per row is safe and spares a division per
    # element. It is NaN exactly where the row holds a NaN or inf: the whole direction is then NaN,
    # so the whole capsule's v and ds are NaN (SPEC 7), whatever tl.max and tl.minimum do with NaN.
    direction = t * (1.0 / tl.where(t_norm == 0, 1.0, t_norm))[:, None]    # [R, BLOCK_D]
    return scale * t_norm, direction


@triton.jit
def squash_tile(s):
    """v = f(|s|) s (Eq. 1) for every row of a tile s [R, BLOCK_D] whose padded entries are 0."""
    n, direction = _norm_and_direction(s)
    small = tl.minimum(n, 1.0)                                             # the n < 1 branch
    inv = 1.0 / tl.maximum(n, 1.0)                                         # the n >= 1 branch, 1/n
    # f(n) s = s_hat / (1 + 1/n^2) for n >= 1: exact even where n overflows to inf.
    v_short = s * (small / (1.0 + small * small))[:, None]
    v_long = direction / (1.0 + inv * inv)[:, None]
    return tl.where((n < 1.0)[:, None], v_short, v_long)


@triton.jit
def squash_backward_tile(dv, s):
    """ds = f(n) (dv - r s_hat) + h(n) r s_hat, r = s_hat . dv, for every row of tiles dv, s [R, BLOCK_D].

    h(n) = d|v|/dn is computed directly, not as f + n f', whose terms cancel for large n (see
    reference/squash.py). h(0) = 0 and s_hat(0) = 0, so the gradient at s = 0 is exactly
    f(0) dv = 0, never NaN.
    """
    n, direction = _norm_and_direction(s)
    small = tl.minimum(n, 1.0)
    small_sq = small * small
    inv = 1.0 / tl.maximum(n, 1.0)
    inv_sq = inv * inv
    f = tl.where(n < 1.0, small / (1.0 + small_sq), inv / (1.0 + inv_sq))
    h = tl.where(
        n < 1.0,
        2.0 * small / ((1.0 + small_sq) * (1.0 + small_sq)),
        2.0 * inv * inv_sq / ((1.0 + inv_sq) * (1.0 + inv_sq)),
    )
    radial_part = tl.sum(direction * dv, axis=1)[:, None] * direction      # [R, BLOCK_D]
    return f[:, None] * (dv - radial_part) + h[:, None] * radial_part


@triton.jit
def _squash_forward_kernel(
    s_ptr, v_ptr, rows, D,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """v = squash(s) for BLOCK_ROWS rows per program.

    s_ptr: s [rows, D], contiguous, any float dtype; v_ptr: v [rows, D], contiguous, s's dtype.
    Each row's D values are one capsule, padded to BLOCK_D (a power of two) and masked.
    Memory traffic: reads rows * D elements, writes rows * D elements.
    """
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)   # [BLOCK_ROWS]
    d = tl.arange(0, BLOCK_D)                                                       # [BLOCK_D]
    mask = (row < rows)[:, None] & (d < D)[None, :]
    offsets = row[:, None] * D + d[None, :]
    s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    v = squash_tile(s)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _squash_backward_kernel(
    dv_ptr, s_ptr, ds_ptr, rows, D,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """ds = dL/ds from dv = dL/dv and s, for BLOCK_ROWS rows per program.

    dv_ptr, s_ptr: [rows, D], contiguous, any float dtypes; ds_ptr: ds [rows, D], contiguous,
    s's dtype. Memory traffic: reads 2 * rows * D elements, writes rows * D elements.
    """
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D)
    mask = (row < rows)[:, None] & (d < D)[None, :]
    offsets = row[:, None] * D + d[None, :]
    dv = tl.load(dv_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    ds = squash_backward_tile(dv, s)
    tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# Launchers.

# A capsule is one tile row: far wider rows would not fit a program's registers on a GPU.
_MAX_BLOCK_D = 1 << 14


def _squash_launch_config(rows, D, dtype):
    """The kernels' block sizes, compute dtype and launch options for `rows` capsules of D dimensions."""
    block_d = triton.next_power_of_2(D)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(f"squash kernels take capsules of at most {_MAX_BLOCK_D} dimensions, got {D}")
    block_rows = min(triton.next_power_of_2(rows), max(1, max_tile(dtype) // block_d))
    return dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, COMPUTE_DTYPE=tl_dtype(dtype),
                **launch_options(block_rows * block_d))


def _launch_over_rows(kernel, inputs, s, result):
    """Launch a squash kernel over the capsules (rows of D values) of s, reading `inputs` (made
    contiguous) and writing `result`; an empty s launches nothing."""
    if s.numel() == 0:
        return result
    D = s.shape[-1]
    rows = s.numel() // D
    config = _squash_launch_config(rows, D, s.dtype)
    kernel[(triton.cdiv(rows, config["BLOCK_ROWS"]),)](
        *(x.contiguous() for x in inputs), result, rows, D, **config)
    return result


@on_tensor_device
def squash_forward(s, *, out=None):
    """v = squash(s) over the last axis (Eq. 1); any leading shape, v in s's dtype.

    float16/bfloat16/float32 are computed in float32, float64 in float64. A non-contiguous s is
    copied once to a contiguous one, since the kernel walks rows of D contiguous values.
    out: optional contiguous tensor of s's shape and dtype to write v into.
    """
    s = check_capsules(s, "s")
    return _launch_over_rows(_squash_forward_kernel, (s,), s, output(out, s.shape, s.dtype, s.device, "out"))


@on_tensor_device
def squash_backward(dv, s, *, out=None):
    """ds = dL/ds of v = squash(s) given dv = dL/dv; shapes equal, ds in s's dtype.

    Same dtype rules and contiguous copies as squash_forward. out: optional contiguous tensor of
    s's shape and dtype to write ds into.
    """
    s = check_capsules(s, "s")
    dv = check_float_tensor(dv, "dv")
    if dv.shape != s.shape:
        raise ValueError(f"dv has shape {tuple(dv.shape)} but s has shape {tuple(s.shape)}; they must match")
    if dv.device != s.device:
        raise ValueError(f"dv is on {dv.device} but s is on {s.device}; they must be on one device")
    return _launch_over_rows(_squash_backward_kernel, (dv, s), s, output(out, s.shape, s.dtype, s.device, "out"))
