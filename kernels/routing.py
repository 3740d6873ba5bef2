"""Dynamic routing (paper Procedure 1, Eq. 3) as fused Triton kernels, forward and backward.

Per sample, with prediction vectors u_hat [I, J, D] and V^(t) = v^(1) + ... + v^(t-1):

    b^(t)  = u_hat . V^(t)               [I, J]  agreement logits (b starts at 0)
    c^(t)  = softmax_j(b^(t))            [I, J]  coupling, over the parents j
    s^(t)  = sum_i c^(t) u_hat (+ bias)  [J, D]  (Eq. 2)
    v^(t)  = squash(s^(t))               [J, D]  (Eq. 1)

the same function and gradients as capsnet_triton.reference.routing, under both gradient
policies of SPEC section 3 ("full" and "last"), and the same NaN policy: a sample whose u_hat
holds a NaN or inf gets NaN in all of its v: its first iteration's logits u_hat . 0 are NaN
where the bad value is, the softmax spreads that to the input capsule's whole row of couplings,
and that row to every s. b is never written to memory: the forward keeps V in registers and
recomputes b and c from the u_hat tile it has loaded. Saved for backward are s_all =
(s^(1), ..., s^(r)) [r, B, J, D] (v is recomputed from it with squash: s is stored, not v,
because squash is not invertible) and the couplings the gradient policy's backward reads,
c^(2..r) or c^(r) [k, B, I, J] (1/D of u_hat's size each), as the PyTorch path keeps them:
kernel A then recomputes no softmax, and kernel B reads no u_hat.

Memory traffic, with U = B I J D elements of u_hat, C = B I J and r iterations:
- eager PyTorch: each iteration reads u_hat twice and writes and reads b and c (B I J each),
  and autograd keeps every iteration's c and b: O(r U) read, O(r B I J) saved.
- routing_forward: reads u_hat r times, writes r B J D + B J D and the kept couplings ((r - 1) C
  under "full", C under "last"); saves those.
- routing_backward, gradient="full": reads u_hat r - 1 times (kernel A) and the couplings twice,
  writes (r - 1) C logit gradients (kernel A) and reads them once; writes du_hat once and r B J D
  of ds_all.
- routing_backward, gradient="last": no kernel A; reads c^(r) (C) and writes du_hat once: u_hat
  is not read.

Two variants of the forward and of backward kernel A, chosen by the launchers' `variant=`:
"sample" (in this file), one program per sample for all iterations, and "split" (the default,
kernels/routing_split.py), one launch per iteration over (sample, chunk of I), which fills a GPU
at small batches. Both move the same bytes; the default is the one faster on one H200
(launch.DEFAULT_VARIANT).
"""

import math

import triton
import triton.language as tl

from capsnet_triton.checks import (
    check_bias,
    check_float_tensor,
    check_gradient,
    check_iterations,
    check_u_hat,
    compute_dtype,
    kept_iterations,
)

from .launch import (DEFAULT_VARIANT, GRID_Y_MAX, block_inputs, check_kept_couplings, check_variant, couplings_pointer,
                     launch_options, on_tensor_device, output, outputs, scratch, split_stages, tl_dtype)
from . import routing_split
from .routing_tiles import (du_hat_of_kept, end_iteration, jd_layout, kept_logits_grad, kept_rows, kept_tile, load_bias,
                            load_u_hat, s_of_tile, sample_ds, sample_layout)
from .squash import squash_backward

__all__ = ["routing_forward", "routing_backward"]


@triton.jit
def _routing_forward_kernel(
    u_hat_ptr, bias_ptr, v_ptr, s_all_ptr, couplings_ptr,
    B, I, J, D, iterations, first_kept,
    stride_ub, stride_ui, stride_uj, stride_ud,
    HAS_BIAS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """All routing iterations for one sample per program; grid (B,).

    u_hat_ptr: u_hat [B, I, J, D] with strides (stride_ub, stride_ui, stride_uj, stride_ud),
      any float dtype; read in [BLOCK_I, BLOCK_J, BLOCK_D] tiles, loaded once per iteration.
    bias_ptr: bias [J, D], contiguous (read only when HAS_BIAS).
    v_ptr: v [B, J, D], contiguous, u_hat's dtype: the last iteration's output.
    s_all_ptr: s_all [iterations, B, J, D], contiguous, COMPUTE_DTYPE: every iteration's s.
    couplings_ptr: [iterations - first_kept, B, I, J], contiguous, COMPUTE_DTYPE: c^(t) of the
    iterations t >= first_kept >= 1 (0-based) in slot t - first_kept (routing_tiles.kept_rows).
    J and D are padded to BLOCK_J and BLOCK_D and I to a multiple of BLOCK_I, all masked.
    Memory traffic per program: reads iterations * I J D elements of u_hat (+ J D of bias),
    writes (iterations + 1) J D elements and (iterations - first_kept) I J couplings.
    """
    sample, u_hat_sample, j_valid, jd_mask, jd_offsets, u_jd_offsets = sample_layout(
        u_hat_ptr, stride_ub, stride_uj, stride_ud, J, D, BLOCK_J, BLOCK_D)
    i_in_block = tl.arange(0, BLOCK_I)
    bias = load_bias(bias_ptr, jd_offsets, jd_mask, HAS_BIAS, BLOCK_J, BLOCK_D, COMPUTE_DTYPE)

    v_sum = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)                    # V^(t)
    v = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
    for t in range(iterations):
        s = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
        rows = kept_rows(couplings_ptr, t - first_kept, B, I, J, sample)
        for i_start in range(0, I, BLOCK_I):
            u_hat, _ = load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets,
                                   jd_mask, COMPUTE_DTYPE)                 # [BLOCK_I, BLOCK_J, BLOCK_D]
            share, coupling = s_of_tile(u_hat, v_sum, j_valid)
            s += share
            if t >= first_kept:
                at, mask = kept_tile(i_start + i_in_block, I, J, j_valid, BLOCK_J)
                tl.store(rows + at, coupling, mask=mask)
        v, v_sum = end_iteration(s, bias, s_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask, v_sum, HAS_BIAS)
    tl.store(v_ptr + sample * J * D + jd_offsets, v.to(v_ptr.dtype.element_ty), mask=jd_mask)


@triton.jit
def _routing_backward_ds_all_kernel(
    u_hat_ptr, dv_ptr, s_all_ptr, ds_all_ptr, couplings_ptr, grad_logits_ptr,
    B, I, J, D, iterations,
    stride_ub, stride_ui, stride_uj, stride_ud,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Kernel A of the backward: ds^(t) = dL/ds^(t) for every iteration t, one sample per program; grid (B,).

    Walks t = r..1. ds^(t) = squash_backward(dL/dv^(t), s^(t)); for t >= 2 one pass over I
    reads c^(t) from the forward's couplings, forms db^(t) (kept for kernel B) and sums
    dV^(t) = sum_i db^(t) u_hat, and since v^(t-1) enters every V^(t'), t' >= t,
    dL/dv^(t-1) = sum_{t' >= t} dV^(t').
    u_hat_ptr: u_hat [B, I, J, D] with strides (stride_ub, ...), any float dtype.
    dv_ptr: dL/dv of the last iteration [B, J, D], contiguous, any float dtype.
    s_all_ptr, ds_all_ptr: [iterations, B, J, D], contiguous, COMPUTE_DTYPE.
    couplings_ptr, grad_logits_ptr: [iterations - 1, B, I, J], contiguous, COMPUTE_DTYPE, c^(t)
    and db^(t) in slot t - 1 (routing_tiles.kept_rows).
    Memory traffic per program: reads (iterations - 1) (I J D elements of u_hat + I J couplings)
    and O(iterations^2 J D) of s_all, writes iterations J D elements and (iterations - 1) I J
    logit gradients.
    """
    sample, u_hat_sample, j_valid, jd_mask, jd_offsets, u_jd_offsets = sample_layout(
        u_hat_ptr, stride_ub, stride_uj, stride_ud, J, D, BLOCK_J, BLOCK_D)
    i_in_block = tl.arange(0, BLOCK_I)

    grad_v = tl.load(dv_ptr + sample * J * D + jd_offsets, mask=jd_mask, other=0.0).to(COMPUTE_DTYPE)
    grad_v_sum = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)               # sum of dV over later t
    for k in range(iterations - 1):
        t = iterations - 1 - k                                             # 0-based, t >= 1
        ds = sample_ds(grad_v, s_all_ptr, ds_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask)
        coupling_rows = kept_rows(couplings_ptr, t - 1, B, I, J, sample)
        grad_logits_rows = kept_rows(grad_logits_ptr, t - 1, B, I, J, sample)
        for i_start in range(0, I, BLOCK_I):
            u_hat, _ = load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets,
                                   jd_mask, COMPUTE_DTYPE)                 # [BLOCK_I, BLOCK_J, BLOCK_D]
            i = i_start + i_in_block
            at, mask = kept_tile(i, I, J, j_valid, BLOCK_J)
            grad_logits = kept_logits_grad(u_hat, ds, coupling_rows, grad_logits_rows, at, mask)
            grad_v_sum += tl.sum(grad_logits[:, :, None] * u_hat, axis=0)
        grad_v = grad_v_sum
    sample_ds(grad_v, s_all_ptr, ds_all_ptr, 0, B, sample, J, D, jd_offsets, jd_mask)


@triton.jit
def _routing_backward_u_hat_kernel(
    s_all_ptr, ds_all_ptr, couplings_ptr, grad_logits_ptr, du_hat_ptr,
    B, I, J, D, iterations,
    GRADIENT_FULL: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Kernel B of the backward: du_hat for BLOCK_I input capsules of one sample; grid (B, cdiv(I, BLOCK_I)).

        GRADIENT_FULL:  du_hat = sum_t [ c^(t) ds^(t) + db^(t) V^(t) ]
        otherwise:      du_hat = c^(r) ds^(r)                 (the "last" policy: c^(r) is a constant)

    from the couplings the forward kept and the db^(t) kernel A kept (routing_tiles.du_hat_of_kept):
    u_hat itself is not read. couplings_ptr: [iterations - 1, B, I, J] under "full", [1, B, I, J]
    holding c^(r) under "last", nothing at r = 1; grad_logits_ptr: [iterations - 1, B, I, J],
    "full" only; s_all_ptr, ds_all_ptr: [iterations, B, J, D]; all contiguous, COMPUTE_DTYPE.
    du_hat_ptr: du_hat [B, I, J, D], contiguous, u_hat's dtype.
    Memory traffic per program: reads 2 (iterations - 1) BLOCK_I J kept values and
    2 iterations J D of s_all and ds_all ("last": BLOCK_I J couplings and J D of ds_all), writes
    BLOCK_I J D elements of du_hat.
    """
    sample = tl.program_id(0).to(tl.int64)
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    du_hat = du_hat_of_kept(couplings_ptr, grad_logits_ptr, s_all_ptr, ds_all_ptr, B, I, J, D, sample, i,
                            iterations, j_valid, jd_mask, jd_offsets, GRADIENT_FULL, BLOCK_J, BLOCK_D,
                            COMPUTE_DTYPE)                                 # [BLOCK_I, BLOCK_J, BLOCK_D]
    tl.store(du_hat_ptr + sample * I * J * D + (i * J * D)[:, None, None] + jd_offsets[None, :, :],
             du_hat.to(du_hat_ptr.dtype.element_ty), mask=(i < I)[:, None, None] & jd_mask[None, :, :])


# Launchers.

_INT32_MAX = 2**31 - 1


def _check_sample_size(u_hat):
    """du_hat is contiguous and written with int32 offsets inside a sample."""
    if math.prod(u_hat.shape[1:]) > _INT32_MAX:
        raise ValueError(f"one sample of u_hat has more than 2**31 - 1 elements: shape {tuple(u_hat.shape)}")


def _u_hat_for_kernels(u_hat, block_i):
    """u_hat as the kernels read it: through its own strides, or a contiguous copy where the int32
    offsets inside one tile of block_i inputs would overflow (the tile's start is 64-bit). For a
    batch-inner u_hat, DigitCaps' layout, that is B > 2**31 / (block_i J D): past 800,000 samples
    at the MNIST shape."""
    _, I, J, D = u_hat.shape
    _check_sample_size(u_hat)
    _, stride_i, stride_j, stride_d = (abs(st) for st in u_hat.stride())
    if (min(block_i, I) - 1) * stride_i + (J - 1) * stride_j + (D - 1) * stride_d > _INT32_MAX:
        return u_hat.contiguous()
    return u_hat


def _routing_launch_config(I, J, D, dtype, block_i):
    """(block sizes, compute dtype and launch options, the split kernels' NUM_STAGES) of the
    routing kernels for u_hat [B, I, J, D]; the sample kernels take no NUM_STAGES."""
    block_j = triton.next_power_of_2(J)
    block_d = triton.next_power_of_2(D)
    block_i = block_inputs(I, block_j * block_d, dtype, block_i)       # tiles [BLOCK_I, BLOCK_J, BLOCK_D]
    tile = block_i * block_j * block_d
    return dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, COMPUTE_DTYPE=tl_dtype(dtype),
                **launch_options(tile)), split_stages(tile * dtype.itemsize)


@on_tensor_device
def routing_forward(u_hat, iterations, bias=None, *, gradient="full", keep=True, variant=DEFAULT_VARIANT,
                    splits=None, block_i=None, out=None):
    """Route u_hat [B, I, J, D] to v [B, J, D] with `iterations` routing iterations (Procedure 1).

    variant: "split" (default, kernels/routing_split.py): one launch per iteration (and one to
    finish) over (sample, chunk of I), the chunks' partial sums added in a fixed order; splits
    forces the number of chunks per sample (default: enough for a few CTAs on every SM).
    "sample": one launch runs all iterations, one program per sample. u_hat may have any strides:
    the kernels read it through them (a copy only past int32 offsets within one tile, see
    _u_hat_for_kernels). bias: optional [J, D], added to s in every iteration. block_i:
    force the BLOCK_I inputs per tile (a power of two; tests use it to exercise the loop over I
    and its masks).
    Returns (v, s_all, couplings), all routing_backward needs: v in u_hat's dtype; in the compute
    dtype (float64 for float64 u_hat, else float32) s_all [iterations, B, J, D], every
    iteration's s, and the couplings the gradient policy's backward reads
    (checks.kept_iterations), [k, B, I, J]: c^(2..r) under "full" (k = r - 1), c^(r) under
    "last", none at r = 1, 1/D of u_hat's size per kept iteration; none either with keep=False,
    for a forward no backward will follow (inference). With them the backward's kernel B forms
    du_hat without reading u_hat (docs/PERF.md, 2026-11-30, tenth run).
    out: optional (v, s_all, couplings) of contiguous tensors of those shapes and dtypes to write into.
    """
    check_u_hat(u_hat)
    iterations = check_iterations(iterations)
    check_gradient(gradient)
    check_variant(variant)
    bias = check_bias(bias, u_hat)
    B, I, J, D = u_hat.shape
    dtype = compute_dtype(u_hat.dtype)
    kept = kept_iterations(iterations, gradient, keep)
    v_out, s_all_out, couplings_out = outputs(out, ("v", "s_all", "couplings"))
    v = output(v_out, (B, J, D), u_hat.dtype, u_hat.device, "out[0] (v)")
    s_all = output(s_all_out, (iterations, B, J, D), dtype, u_hat.device, "out[1] (s_all)")
    couplings = output(couplings_out, (kept, B, I, J), dtype, u_hat.device, "out[2] (couplings)")
    if B == 0:
        return v, s_all, couplings
    config, stages = _routing_launch_config(I, J, D, u_hat.dtype, block_i)
    u_hat = _u_hat_for_kernels(u_hat, config["BLOCK_I"])
    # Without a bias the kernel never reads bias_ptr; s_all stands in for the pointer.
    bias_arg = bias.contiguous() if bias is not None else s_all
    couplings_arg = couplings_pointer(couplings, s_all)
    first_kept = iterations - kept
    if variant == "sample":
        _routing_forward_kernel[(B,)](
            u_hat, bias_arg, v, s_all, couplings_arg,
            B, I, J, D, iterations, first_kept, *u_hat.stride(),
            HAS_BIAS=bias is not None, **config,
        )
        return v, s_all, couplings
    splits, chunk = routing_split.pick_splits(B, I, config["BLOCK_I"], u_hat.device, splits)
    partials = scratch((2, B, splits, J, D), s_all)
    for t in range(iterations + 1):
        routing_split.split_forward_kernel[(B, splits if t < iterations else 1)](
            u_hat, bias_arg, v, s_all, partials, couplings_arg,
            B, I, J, D, iterations, t, chunk, splits, first_kept, *u_hat.stride(),
            HAS_BIAS=bias is not None, NUM_STAGES=stages, **config,
        )
    return v, s_all, couplings


@on_tensor_device
def routing_backward(dv, u_hat, s_all, couplings, *, gradient="full", variant=DEFAULT_VARIANT, splits=None,
                     block_i=None, out=None):
    """Gradients of routing_forward: (du_hat [B, I, J, D] in u_hat's dtype, ds_all [r, B, J, D]).

    dv: dL/dv [B, J, D]; s_all and couplings: routing_forward's second and third outputs, from a
    forward under the same gradient policy. ds_all[t] = dL/ds^(t) in the compute dtype; the bias
    gradient is ds_all.sum((0, 1)).
    gradient: "full" (default) lets the gradient flow through every iteration; "last" treats
    u_hat and the bias as constants in iterations 1..r-1 (SPEC section 3), so ds_all is 0 but
    for ds^(r) = squash_backward(dv, s^(r)) and du_hat = c^(r) ds^(r).
    "full": kernel A walks the iterations backwards to ds_all, reading the kept c^(t) and keeping
    the logit gradients db^(t) it forms ([r - 1, B, I, J] in the compute dtype), then kernel B,
    fully parallel over (sample, block of I), forms du_hat from those kept values alone and
    writes it once. Kernel A is one launch, one program per sample, for variant="sample", and one
    launch per iteration over (sample, chunk of I) for variant="split" (the default; see
    routing_forward; splits forces the chunks per sample).
    "last": the squash backward kernel on [B, J, D] gives ds^(r), then kernel B: u_hat is not read.
    out: optional (du_hat, ds_all) of contiguous tensors of those shapes and dtypes to write into.
    """
    check_u_hat(u_hat)
    check_gradient(gradient)
    check_variant(variant)
    B, I, J, D = u_hat.shape
    check_float_tensor(dv, "dv")
    check_float_tensor(s_all, "s_all")
    if dv.shape != (B, J, D):
        raise ValueError(f"dv must have shape [B, J, D] = {(B, J, D)}, got {tuple(dv.shape)}")
    dtype = compute_dtype(u_hat.dtype)
    if s_all.dim() != 4 or s_all.shape[0] < 1 or s_all.shape[1:] != (B, J, D) or s_all.dtype != dtype:
        raise ValueError(f"s_all must be routing_forward's [r, B, J, D] = [r, {B}, {J}, {D}] {dtype} "
                         f"output, got shape {tuple(s_all.shape)} {s_all.dtype}")
    s_all = s_all.contiguous()
    for name, x in (("dv", dv), ("s_all", s_all)):
        if x.device != u_hat.device:
            raise ValueError(f"{name} is on {x.device} but u_hat is on {u_hat.device}; "
                             "they must be on one device")
    iterations = s_all.shape[0]
    couplings = couplings_pointer(check_kept_couplings(couplings, iterations, gradient, B, I, J, dtype,
                                                       u_hat.device, "routing_forward"), s_all)
    du_hat_out, ds_all_out = outputs(out, ("du_hat", "ds_all"))
    du_hat = output(du_hat_out, u_hat.shape, u_hat.dtype, u_hat.device, "out[0] (du_hat)")
    ds_all = output(ds_all_out, s_all.shape, dtype, u_hat.device, "out[1] (ds_all)")
    if B == 0:
        return du_hat, ds_all
    config, stages = _routing_launch_config(I, J, D, u_hat.dtype, block_i)
    # Kernel B's grid is (B, blocks of I): refused before kernel A runs, not after.
    blocks = triton.cdiv(I, config["BLOCK_I"])
    if blocks > GRID_Y_MAX:
        raise ValueError(f"routing_backward takes at most {GRID_Y_MAX} blocks of {config['BLOCK_I']} input "
                         f"capsules (a GPU's grid limit), got I = {I} for J = {J}, D = {D} in {u_hat.dtype}")
    if gradient == "full":
        u_hat = _u_hat_for_kernels(u_hat, config["BLOCK_I"])
    else:                                   # no kernel reads u_hat: nothing to copy
        _check_sample_size(u_hat)
    # Kernel A's logit gradients db^(t) for kernel B; under "last" (or r = 1) nothing reads them,
    # and s_all stands in for the pointer.
    full = gradient == "full" and iterations > 1
    grad_logits = scratch((iterations - 1, B, I, J), s_all) if full else s_all
    if gradient == "full" and variant == "sample":
        _routing_backward_ds_all_kernel[(B,)](
            u_hat, dv.contiguous(), s_all, ds_all, couplings, grad_logits,
            B, I, J, D, iterations, *u_hat.stride(), **config,
        )
    elif gradient == "full":
        splits, chunk = routing_split.pick_splits(B, I, config["BLOCK_I"], u_hat.device, splits)
        partials = scratch((iterations, B, splits, J, D), s_all)
        for t in reversed(range(iterations)):
            routing_split.split_backward_ds_all_kernel[(B, splits if t > 0 else 1)](
                u_hat, dv.contiguous(), s_all, ds_all, partials, couplings, grad_logits,
                B, I, J, D, iterations, t, chunk, splits, *u_hat.stride(),
                NUM_STAGES=stages, **config,
            )
    else:
        ds_all[:-1].zero_()
        squash_backward(dv, s_all[-1], out=ds_all[-1])
    _routing_backward_u_hat_kernel[(B, blocks)](
        s_all, ds_all, couplings, grad_logits, du_hat,
        B, I, J, D, iterations,
        GRADIENT_FULL=gradient == "full", **config,
    )
    return du_hat, ds_all
