"""Squash (paper Eq. 1) as Triton kernels, forward and backward, over the last axis.

    v = f(n) s,   n = |s|,   f(n) = n / (1 + n^2)
    ds = f(n) dv + g(n) (s_hat . dv) s_hat,   s_hat = s / n,   g(n) = n f'(n) = n (1 - n^2) / (1 + n^2)^2

The same function as capsnet_triton.reference.squash, with SPEC section 2's numerics: no epsilon,
s = 0 gives v = 0 and ds = 0, and no overflow (the norm is taken of s / max|s|, and for n >= 1
only 1/n is squared). The tile helpers `_squash_tile` and `_squash_backward_tile` are shared with
the routing kernels, which squash [J, D] tiles held in registers.

Naive PyTorch squash reads s three times (norm, scale, multiply) and writes two temporaries of
its size; these kernels read s once and write v once (backward: read s and dv, write ds).
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["squash_forward", "squash_backward"]


@triton.jit
def _norm_and_direction(s):
    """n = |s| [R] and s_hat = s / n [R, BLOCK_D] (0 where s = 0) for the rows of a tile s.

    Padded entries of s must be 0. The norm is taken of s / max|s|, so no square overflows or
    underflows, and the direction stays exact when n itself overflows to inf.
    """
    scale = tl.max(tl.abs(s), axis=1)                                      # [R]
    # A true division: 1 / scale would overflow for a subnormal scale.
    t = s / tl.where(scale > 0, scale, 1.0)[:, None]                       # [R, BLOCK_D], |t| <= 1
    t_norm = tl.sqrt(tl.sum(t * t, axis=1))                                # [R], in [1, sqrt(D)] or 0
    # t_norm is 0 or in [1, sqrt(D)], so one reciprocal per row is safe and spares a division per element.
    direction = t * (1.0 / tl.where(t_norm > 0, t_norm, 1.0))[:, None]     # [R, BLOCK_D]
    return scale * t_norm, direction


@triton.jit
def _squash_tile(s):
    """v = f(|s|) s (Eq. 1) for every row of a tile s [R, BLOCK_D] whose padded entries are 0."""
    n, direction = _norm_and_direction(s)
    small = tl.minimum(n, 1.0)                                             # the n < 1 branch
    inv = 1.0 / tl.maximum(n, 1.0)                                         # the n >= 1 branch, 1/n
    # f(n) s = s_hat / (1 + 1/n^2) for n >= 1: exact even where n overflows to inf.
    v_short = s * (small / (1.0 + small * small))[:, None]
    v_long = direction / (1.0 + inv * inv)[:, None]
    return tl.where((n < 1.0)[:, None], v_short, v_long)


@triton.jit
def _squash_backward_tile(dv, s):
    """ds = f(n) dv + g(n) (s_hat . dv) s_hat for every row of tiles dv, s [R, BLOCK_D].

    g(0) = 0 and s_hat(0) = 0, so the gradient at s = 0 is exactly f(0) dv = 0, never NaN.
    """
    n, direction = _norm_and_direction(s)
    small = tl.minimum(n, 1.0)
    small_sq = small * small
    inv = 1.0 / tl.maximum(n, 1.0)
    inv_sq = inv * inv
    f = tl.where(n < 1.0, small / (1.0 + small_sq), inv / (1.0 + inv_sq))
    g = tl.where(
        n < 1.0,
        small * (1.0 - small_sq) / ((1.0 + small_sq) * (1.0 + small_sq)),
        inv * (inv_sq - 1.0) / ((1.0 + inv_sq) * (1.0 + inv_sq)),
    )
    radial = tl.sum(direction * dv, axis=1)                                # [R], s_hat . dv
    return f[:, None] * dv + (g * radial)[:, None] * direction


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
    v = _squash_tile(s)
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
    ds = _squash_backward_tile(dv, s)
    tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# Launchers. The helpers below are shared with kernels/routing.py.

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The most elements one tile may hold on a GPU, by compute dtype: enough to keep a tile and its
# temporaries in registers without spilling (float64 division and sqrt take many more registers
# per value, see tests/test_kernels_compile.py).
_GPU_TILE = {torch.float32: 4096, torch.float64: 1024}
# The interpreter pays per program and loop iteration, not per element: it takes far larger tiles.
_INTERPRETER_TILE = 1 << 16
# A capsule is one tile row: far wider rows would not fit a program's registers on a GPU.
_MAX_BLOCK_D = 1 << 14


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compute_dtype(dtype):
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_float_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _output(out, shape, dtype, device, name):
    """A new tensor for a kernel to fill, or the caller's `out` once it is checked to fit."""
    shape = torch.Size(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype
            or out.device != device or not out.is_contiguous()):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} "
                         f"on {device}, got {got}")
    return out


def _max_tile(dtype):
    """The most elements a kernel tile may hold for inputs of `dtype`."""
    if _interpreting():
        return _INTERPRETER_TILE
    return _GPU_TILE[_compute_dtype(dtype)]


def _launch_options(tile_elements):
    """num_warps for a tile of this many elements (16 values a thread at the GPU tile limit), and FMA
    contraction asked for explicitly, so that the numerics do not change when a Triton release
    flips its default."""
    return dict(num_warps=4 if tile_elements <= 2048 else 8, enable_fp_fusion=True)


def _squash_launch_config(rows, D, dtype):
    """The kernels' block sizes, compute dtype and launch options for `rows` capsules of D dimensions."""
    block_d = triton.next_power_of_2(D)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(f"squash kernels take capsules of at most {_MAX_BLOCK_D} dimensions, got {D}")
    block_rows = min(triton.next_power_of_2(rows), max(1, _max_tile(dtype) // block_d))
    return dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, COMPUTE_DTYPE=_tl_dtype(dtype),
                **_launch_options(block_rows * block_d))


def squash_forward(s, *, out=None):
    """v = squash(s) over the last axis (Eq. 1); any leading shape, v in s's dtype.

    float16/bfloat16/float32 are computed in float32, float64 in float64. A non-contiguous s is
    copied once to a contiguous one, since the kernel walks rows of D contiguous values.
    out: optional contiguous tensor of s's shape and dtype to write v into.
    """
    s = _check_float_tensor(s, "s")
    if s.dim() < 1:
        raise ValueError("s must have at least one axis (the capsule dimension), got a scalar")
    v = _output(out, s.shape, s.dtype, s.device, "out")
    if s.numel() == 0:
        return v
    D = s.shape[-1]
    rows = s.numel() // D
    config = _squash_launch_config(rows, D, s.dtype)
    grid = (triton.cdiv(rows, config["BLOCK_ROWS"]),)
    _squash_forward_kernel[grid](
        s.contiguous(), v, rows, D,
        **config,
    )
    return v


def squash_backward(dv, s, *, out=None):
    """ds = dL/ds of v = squash(s) given dv = dL/dv; shapes equal, ds in s's dtype.

    Same dtype rules and contiguous copies as squash_forward. out: optional contiguous tensor of
    s's shape and dtype to write ds into.
    """
    s = _check_float_tensor(s, "s")
    dv = _check_float_tensor(dv, "dv")
    if s.dim() < 1:
        raise ValueError("s must have at least one axis (the capsule dimension), got a scalar")
    if dv.shape != s.shape:
        raise ValueError(f"dv has shape {tuple(dv.shape)} but s has shape {tuple(s.shape)}; they must match")
    if dv.device != s.device:
        raise ValueError(f"dv is on {dv.device} but s is on {s.device}; they must be on one device")
    ds = _output(out, s.shape, s.dtype, s.device, "out")
    if s.numel() == 0:
        return ds
    D = s.shape[-1]
    rows = s.numel() // D
    config = _squash_launch_config(rows, D, s.dtype)
    grid = (triton.cdiv(rows, config["BLOCK_ROWS"]),)
    _squash_backward_kernel[grid](
        dv.contiguous(), s.contiguous(), ds, rows, D,
        **config,
    )
    return ds
