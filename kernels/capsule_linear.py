"""The DigitCaps layer fused (prediction Eq. 2, then routing Procedure 1) as Triton kernels.

    u_hat[b, i, j] = W[i, j] @ u[b, i]          u [B, I, P], W [I, J, D, P]
    v = routing(u_hat)                          v [B, J, D]

the same function and gradients as capsnet_triton.reference.capsule_linear, under both gradient
policies of SPEC section 3, without u_hat [B, I, J, D] or its gradient ever in memory. The
forward and backward kernel A recompute the u_hat tile they need from u and W in registers (2P
FLOP per element where reading it would cost 4 bytes in float32) and run the routing kernels'
tile code on it (kernels/routing_tiles.py). The forward recomputes b and c from V, and keeps
s_all and the couplings the backward reads ([k, B, I, J], 1/D of u_hat's size per kept
iteration), as the PyTorch path does; kernel A reads those couplings and keeps the logit
gradients it forms; kernel B forms du_hat from the two, without u_hat.

Memory traffic, with U = B I J D elements of u_hat and r iterations:
- unfused (predict, routing forward and backward, prediction backward): predict writes U, the
  routing forward reads it r times, the backward reads it r - 1 times and writes du_hat (U),
  and the prediction's backward reads du_hat twice: about 2r + 3 passes over U.
- capsule_linear_forward: copies W to its slices [I, P, J, D] (_weight_slices), then reads u
  (B I P) and the slices (I P J D, from L2 after the first samples) r times per sample, writes
  r B J D of s_all, B J D of v and the kept couplings ((r - 1) B I J under "full", an eighth of
  U at the MNIST shape).
- capsule_linear_backward: kernel A (gradient="full" only) reads u and W and the couplings
  r - 1 times per sample and writes ds_all and the logit gradients it forms ((r - 1) B I J);
  kernel B reads W once, u, ds_all, V (the squashed s_all summed, r - 1 of [B, J, D]), the
  couplings and the logit gradients once per input and chunk of its columns, and writes dW
  (I J D P) once and du (B I P) once per chunk (three on a GPU at the MNIST shape, summed after):
  no buffer of size U. (Each program reads its samples' ds_all and V again: about (2r - 1) U
  elements in all, from the L2 cache, where they fit: (2r - 1) B J D.)

Two variants of the forward and of backward kernel A, chosen by the launchers' `variant=`:
"sample" (in this file), one program per sample for all iterations, which reads all of W once
per sample and iteration, and "split" (the default, kernels/capsule_linear_split.py), one launch
per iteration over (block of BLOCK_B samples, chunk of I), which reads W once per block of
samples and fills a GPU at small batches. The default is the one faster on one H200
(launch.DEFAULT_VARIANT).
"""

import torch
import triton
import triton.language as tl

from capsnet_triton.checks import (
    check_bias,
    check_float_tensor,
    check_gradient,
    check_iterations,
    check_u_and_weight,
    compute_dtype,
    interpreting,
    kept_iterations,
)

from . import capsule_linear_split, routing_split
from .launch import (DEFAULT_VARIANT, GRID_Y_MAX, block_inputs, check_kept_couplings, check_tile, check_variant,
                     couplings_pointer, launch_options, max_tile, on_tensor_device, output, outputs, scratch,
                     split_stages, tl_dtype)
from .routing_tiles import (end_iteration, jd_layout, kept_logits_grad, kept_rows, kept_tile, load_bias, predict_tile,
                            s_of_tile, sample_ds)
from .squash import squash_backward, squash_forward

__all__ = ["capsule_linear_forward", "capsule_linear_backward"]


@triton.jit
def _capsule_linear_forward_kernel(
    u_ptr, slices_ptr, bias_ptr, v_ptr, s_all_ptr, couplings_ptr,
    B, I, J, D, P, iterations, first_kept,
    HAS_BIAS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """All routing iterations for one sample per program, u_hat recomputed per tile; grid (B,).

    u_ptr: u [B, I, P], contiguous, any float dtype. slices_ptr: W as [I, P, J, D], contiguous,
    u's dtype (see predict_tile); read one [BLOCK_I, BLOCK_J, BLOCK_D] slice per p. bias_ptr:
    bias [J, D], contiguous (read only when HAS_BIAS). v_ptr: v [B, J, D], contiguous, u's dtype.
    s_all_ptr: s_all [iterations, B, J, D], contiguous, COMPUTE_DTYPE: every iteration's s.
    couplings_ptr: [iterations - first_kept, B, I, J], contiguous, COMPUTE_DTYPE: c^(t) of the
    iterations t >= first_kept >= 1 (0-based) in slot t - first_kept (routing_tiles.kept_rows).
    Memory traffic per program: reads iterations * (I P of u + I J D P of W), writes
    (iterations + 1) J D elements and (iterations - first_kept) I J couplings.
    """
    sample = tl.program_id(0).to(tl.int64)
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    i_in_block = tl.arange(0, BLOCK_I)
    u_sample = u_ptr + sample * I * P
    bias = load_bias(bias_ptr, jd_offsets, jd_mask, HAS_BIAS, BLOCK_J, BLOCK_D, COMPUTE_DTYPE)

    v_sum = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)                    # V^(t)
    v = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
    for t in range(iterations):
        s = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
        rows = kept_rows(couplings_ptr, t - first_kept, B, I, J, sample)
        for i_start in range(0, I, BLOCK_I):
            i = i_start + i_in_block
            u_hat = predict_tile(slices_ptr, u_sample, i, I, J, D, P, jd_mask, jd_offsets,
                                 COMPUTE_DTYPE)                   # [BLOCK_I, BLOCK_J, BLOCK_D]
            share, coupling = s_of_tile(u_hat, v_sum, j_valid)
            s += share
            if t >= first_kept:
                at, mask = kept_tile(i, I, J, j_valid, BLOCK_J)
                tl.store(rows + at, coupling, mask=mask)
        v, v_sum = end_iteration(s, bias, s_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask, v_sum, HAS_BIAS)
    tl.store(v_ptr + sample * J * D + jd_offsets, v.to(v_ptr.dtype.element_ty), mask=jd_mask)


@triton.jit
def _capsule_linear_backward_ds_all_kernel(
    u_ptr, slices_ptr, dv_ptr, s_all_ptr, ds_all_ptr, couplings_ptr, grad_logits_ptr,
    B, I, J, D, P, iterations,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Kernel A of the backward (gradient="full"): ds^(t) = dL/ds^(t) for every iteration t,
    one sample per program; grid (B,). The routing's kernel A with u_hat recomputed per tile.

    Walks t = r..1: ds^(t) = squash_backward(dL/dv^(t), s^(t)); for t >= 2 one pass over I
    reads c^(t) from the forward's couplings, forms db^(t) from it and sums dV^(t) =
    sum_i db^(t) u_hat, and dL/dv^(t-1) = sum_{t' >= t} dV^(t'); it stores those db^(t) for
    kernel B. couplings_ptr and grad_logits_ptr: [iterations - 1, B, I, J], contiguous,
    COMPUTE_DTYPE, c^(t) and db^(t) in slot t - 1, t counted from 0 (routing_tiles.kept_rows).
    u_ptr, slices_ptr: as in the forward. dv_ptr: dL/dv [B, J, D], contiguous, any float dtype.
    s_all_ptr, ds_all_ptr: [iterations, B, J, D], contiguous, COMPUTE_DTYPE.
    Memory traffic per program: reads (iterations - 1) (I P of u + I J D P of W + I J couplings)
    and O(iterations^2 J D) of s_all, writes iterations J D elements and (iterations - 1) I J
    logit gradients.
    """
    sample = tl.program_id(0).to(tl.int64)
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    i_in_block = tl.arange(0, BLOCK_I)
    u_sample = u_ptr + sample * I * P

    grad_v = tl.load(dv_ptr + sample * J * D + jd_offsets, mask=jd_mask, other=0.0).to(COMPUTE_DTYPE)
    grad_v_sum = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)               # sum of dV over later t
    for k in range(iterations - 1):
        t = iterations - 1 - k                                             # 0-based, t >= 1
        ds = sample_ds(grad_v, s_all_ptr, ds_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask)
        coupling_rows = kept_rows(couplings_ptr, t - 1, B, I, J, sample)
        grad_logits_rows = kept_rows(grad_logits_ptr, t - 1, B, I, J, sample)
        for i_start in range(0, I, BLOCK_I):
            i = i_start + i_in_block
            u_hat = predict_tile(slices_ptr, u_sample, i, I, J, D, P, jd_mask, jd_offsets, COMPUTE_DTYPE)
            at, mask = kept_tile(i, I, J, j_valid, BLOCK_J)
            grad_logits = kept_logits_grad(u_hat, ds, coupling_rows, grad_logits_rows, at, mask)
            grad_v_sum += tl.sum(grad_logits[:, :, None] * u_hat, axis=0)
        grad_v = grad_v_sum
    sample_ds(grad_v, s_all_ptr, ds_all_ptr, 0, B, sample, J, D, jd_offsets, jd_mask)


@triton.jit
def _du_hat_rows(couplings_ptr, grad_logits_ptr, ds_all_ptr, v_sums_ptr, nan_rows_ptr, B, I, J, D, i, b, b_valid,
                 jd, jd_valid, iterations, GRADIENT_FULL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """du_hat[b, i, (j, d)] for one input i and a block of samples b [BLOCK_B] (int64), over the
    flat columns jd = j D + d [BLOCK_JD] -> [BLOCK_B, BLOCK_JD], from kept values alone:

        GRADIENT_FULL:  du_hat = sum_t [ c^(t) ds^(t) + db^(t) V^(t) ]
        otherwise:      du_hat = c^(r) ds^(r)                 (the "last" policy)

    with c^(0) = 1/J and V^(0) = 0 (routing_tiles.du_hat_of_kept's formula, laid out as rows of
    samples for tl.dot). ds_all_ptr: [iterations, B, J, D]; v_sums_ptr: V^(1..r-1)
    [iterations - 1, B, J, D]; couplings_ptr, grad_logits_ptr: as kernel B's. nan_rows_ptr: [B],
    0, or NaN for a sample whose ds^(0) holds a NaN or inf: db^(0) V^(0) is 0 by V^(0) = 0, but as
    the reference computes it NaN there (a finite sample whose first s overflowed, SPEC 7), which
    spreads to all of the sample's du_hat. Padded samples and columns get 0."""
    JD = J * D
    mask = b_valid[:, None] & jd_valid[None, :]
    rows = b[:, None] * JD + jd[None, :]                    # slot 0 of [t, B, J, D] buffers
    kept_at = (b[:, None] * I + i) * J + (jd // D)[None, :]  # slot 0 of [t, B, I, J] buffers
    # A slot further on: r B J D < 2**31 (the launcher checks), but the kept values, (r - 1) B I J,
    # pass 2**31 from about 10**5 samples at the MNIST shape: their slots step in 64 bits.
    rows_slot = B * JD
    kept_slot = tl.cast(B, tl.int64) * I * J
    uniform = tl.full([], 1.0, COMPUTE_DTYPE) / J
    if GRADIENT_FULL:
        ds = tl.load(ds_all_ptr + rows, mask=mask, other=0.0)
        du_hat = ds * uniform + tl.load(nan_rows_ptr + b, mask=b_valid, other=0.0)[:, None]
        for t in range(1, iterations):
            ds = tl.load(ds_all_ptr + rows + t * rows_slot, mask=mask, other=0.0)
            v_sum = tl.load(v_sums_ptr + rows + (t - 1) * rows_slot, mask=mask, other=0.0)
            coupling = tl.load(couplings_ptr + kept_at + (t - 1) * kept_slot, mask=mask, other=0.0)
            grad_logits = tl.load(grad_logits_ptr + kept_at + (t - 1) * kept_slot, mask=mask, other=0.0)
            du_hat += coupling * ds + grad_logits * v_sum
    else:
        ds = tl.load(ds_all_ptr + rows + (iterations - 1) * rows_slot, mask=mask, other=0.0)
        # c^(r), or at r = 1 the uniform c^(1), none kept (the pointer is then never read). One
        # masked load and a select, not two branches: with a branch per case the sm_90 compile
        # gave the tile two layouts and spilled 1.8 KB a thread inside the loop.
        kept = (b[:, None] * 0 + iterations) > 1      # [BLOCK_B, 1]: the interpreter masks with no scalar
        coupling = tl.load(couplings_ptr + kept_at, mask=mask & kept, other=0.0)
        du_hat = tl.where(kept, coupling, uniform) * ds
    return du_hat


@triton.jit
def _capsule_linear_backward_weight_kernel(
    u_ptr, weight_ptr, ds_all_ptr, v_sums_ptr, nan_rows_ptr, couplings_ptr, grad_logits_ptr, du_ptr, dweight_ptr,
    B, I, J, D, P, iterations,
    GRADIENT_FULL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_JD: tl.constexpr, BLOCK_P: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Kernel B of the backward: du and dW of one input i and one chunk of BLOCK_JD of its J D
    columns (j, d); grid (I, cdiv(J D, BLOCK_JD)).

    For i, the backward of u_hat[b, i] = W[i] u[b, i] is two matrix products over the batch:

        du[b, i]  = du_hat[b, i] @ W[i]          [B, J D] @ [J D, P]
        dW[i]     = du_hat[:, i]^T @ u[:, i]     [J D, B] @ [B, P]

    The program loads its chunk of W[i] once and walks the batch in blocks of BLOCK_B samples:
    for each it forms du_hat [BLOCK_B, BLOCK_JD] from kept values alone (_du_hat_rows: the
    couplings the forward kept, the db^(t) kernel A kept, never u_hat) and feeds it to both
    products as tl.dot, float32 as IEEE FMAs (never TF32), float64 on the float64 tensor cores
    (DMMA, exact). The chunk's dW stays in registers and is stored once: each program owns its
    rows of dW and adds the blocks in a fixed order (deterministic, no atomics). du gets one
    partial sum per chunk (du_ptr: [chunks, B, I, P], summed in order by the launcher; du itself
    where there is one chunk).
    u_ptr: u [B, I, P], contiguous, any float dtype. weight_ptr: W [I, J, D, P], contiguous, u's
    dtype. ds_all_ptr: [iterations, B, J, D]; v_sums_ptr: V^(1..r-1), [iterations - 1, B, J, D]
    ("full" only); nan_rows_ptr: [B] ("full" only; see _du_hat_rows); couplings_ptr: [iterations
    - 1, B, I, J] under "full", [1, B, I, J] holding c^(r) under "last", nothing at r = 1;
    grad_logits_ptr: db^(t) in slot t - 1, [iterations - 1, B, I, J] ("full" only); all
    contiguous, COMPUTE_DTYPE. dweight_ptr: dW [I, J, D, P], contiguous, W's dtype.
    Memory traffic per program: reads BLOCK_JD P of W once, and per sample P of u, BLOCK_JD
    (2 iterations - 1) of ds_all and V and 2 (iterations - 1) kept values per parent ("last":
    BLOCK_JD of ds_all and one coupling per parent); writes B P of du and BLOCK_JD P of dW.
    """
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    JD = J * D
    jd = chunk * BLOCK_JD + tl.arange(0, BLOCK_JD)
    jd_valid = jd < JD
    p = tl.arange(0, BLOCK_P)
    p_valid = p < P
    w_mask = jd_valid[:, None] & p_valid[None, :]
    w_offsets = i * (JD * P) + jd[:, None] * P + p[None, :]
    weight = tl.load(weight_ptr + w_offsets, mask=w_mask, other=0.0).to(COMPUTE_DTYPE)   # [BLOCK_JD, BLOCK_P]
    dweight = tl.zeros([BLOCK_JD, BLOCK_P], COMPUTE_DTYPE)
    du_chunk = du_ptr + chunk.to(tl.int64) * B * I * P
    for b_start in range(0, B, BLOCK_B):
        b = b_start + tl.arange(0, BLOCK_B).to(tl.int64)
        b_valid = b < B
        du_hat = _du_hat_rows(couplings_ptr, grad_logits_ptr, ds_all_ptr, v_sums_ptr, nan_rows_ptr, B, I, J, D, i,
                              b, b_valid, jd, jd_valid, iterations, GRADIENT_FULL, COMPUTE_DTYPE)
        u_mask = b_valid[:, None] & p_valid[None, :]
        u_offsets = (b * I + i)[:, None] * P + p[None, :]
        u = tl.load(u_ptr + u_offsets, mask=u_mask, other=0.0).to(COMPUTE_DTYPE)          # [BLOCK_B, BLOCK_P]
        du = tl.dot(du_hat, weight, input_precision="ieee", out_dtype=COMPUTE_DTYPE)
        tl.store(du_chunk + u_offsets, du.to(du_ptr.dtype.element_ty), mask=u_mask)
        dweight = tl.dot(tl.trans(du_hat), u, acc=dweight, input_precision="ieee", out_dtype=COMPUTE_DTYPE)
    tl.store(dweight_ptr + w_offsets, dweight.to(dweight_ptr.dtype.element_ty), mask=w_mask)


# Launchers.

_INT32_MAX = 2**31 - 1


# Samples per program of the split kernels: each W tile they load serves this many samples.
_SPLIT_BLOCK_B = 4

def _launch_config(I, J, D, P, dtype, block_i, samples=None):
    """Block sizes, compute dtype and launch options of the forward and backward kernel A for
    W [I, J, D, P]. The split kernels' programs predict u_hat for up to `samples` samples from
    each W slice (BLOCK_B; None for the sample kernels, one sample). A tile holds u_hat
    [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] (predict_tile reads W one p at a time)."""
    block_j, block_d = (triton.next_power_of_2(n) for n in (J, D))
    if samples is not None:
        # On sm_90 the split kernels' whole tile passes through shared memory for a layout
        # conversion: 4 samples of J = 100, D = 128 in float32 took 256 KB, over the 227 KB a block
        # may have, and would not launch. Fewer samples where one input's tile of them is over the
        # register budget (never at the MNIST shape: 4 samples of 16 x 16).
        while samples > 1 and samples * block_j * block_d > max_tile(dtype):
            samples //= 2
    per_input = (samples or 1) * block_j * block_d
    block_i = block_inputs(I, per_input, dtype, block_i)
    options = launch_options(block_i * per_input)
    if not interpreting() and block_i * per_input > max_tile(dtype):
        # One input's tile is over the budget (parents of many dimensions): spread it over twice
        # the warps so that it stays in registers.
        options["num_warps"] *= 2
    config = dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, COMPUTE_DTYPE=tl_dtype(dtype), **options)
    if samples is not None:
        # A loop step of the split kernels loads P slices of W, [BLOCK_I, BLOCK_J, BLOCK_D] each.
        config.update(BLOCK_B=samples, NUM_STAGES=split_stages(block_i * block_j * block_d * P * dtype.itemsize))
    return config


# tl.dot's smallest side: backward kernel B's blocks of samples, of columns and of P are at least this.
_DOT_MIN = 16
# Backward kernel B's samples per block on a GPU (tl.dot's smallest), and the most elements of its
# [BLOCK_JD, BLOCK_P] tiles of W and dW: 64 of the MNIST shape's 160 columns a program, 4 warps.
# Compiled for sm_90 (float32, "full"), 64 columns took 114 registers and 16.4K instructions per
# (input, sample) over the 3 chunks under Triton 3.9 (128 and 22.7K under the GPU image's 3.6);
# all 160 columns (padded to 256) in one program at 8 warps took 243-255 registers and 20-27K,
# and spilled under 3.6 (docs/PERF.md, seventeenth run).
_WEIGHT_BLOCK_B = _DOT_MIN
_WEIGHT_TILE = 1024


def _weight_launch_config(B, J, D, P, dtype, weight_launch=None):
    """Launch config of backward kernel B for W [I, J, D, P]: BLOCK_B samples per step, BLOCK_JD of
    the J D columns per program, P padded to BLOCK_P, all at least _DOT_MIN. weight_launch:
    optional (BLOCK_B, BLOCK_JD, num_warps) instead (checked). Under the interpreter, which pays
    per program and loop step, the blocks take all of B and J D up to its tile limit. ValueError
    where even the smallest tile, [_DOT_MIN, BLOCK_P], is more than a Triton tensor may hold."""
    block_p = max(_DOT_MIN, triton.next_power_of_2(P))
    check_tile(_DOT_MIN * block_p)
    columns = max(_DOT_MIN, triton.next_power_of_2(J * D))
    if weight_launch is not None:
        if not isinstance(weight_launch, (tuple, list)) or len(weight_launch) != 3:
            raise ValueError(f"weight_launch must be (BLOCK_B, BLOCK_JD, num_warps), got {weight_launch!r}")
        block_b, block_jd, warps = weight_launch
        for name, value, least in (("BLOCK_B", block_b, _DOT_MIN), ("BLOCK_JD", block_jd, _DOT_MIN),
                                   ("num_warps", warps, 1)):
            # A CUDA block holds at most 1024 threads, 32 warps: the interpreter would run more.
            if (isinstance(value, bool) or not isinstance(value, int) or value < least or value & (value - 1)
                    or (name == "num_warps" and value > 32)):
                raise ValueError(f"weight_launch's {name} must be a power of two "
                                 f"{'from 1 to 32' if name == 'num_warps' else f'>= {least}'}, got {value!r}")
        # Its tiles: du_hat [BLOCK_B, BLOCK_JD], W and dW [BLOCK_JD, BLOCK_P], u [BLOCK_B, BLOCK_P].
        check_tile(max(block_b, block_p) * block_jd)
        check_tile(block_b * block_p)
    elif interpreting():
        block_b, block_jd = max(_DOT_MIN, triton.next_power_of_2(B)), columns
        while block_jd * max(block_b, block_p) > max_tile(dtype) and max(block_b, block_jd) > _DOT_MIN:
            if block_b >= block_jd:
                block_b //= 2
            else:
                block_jd //= 2
        warps = launch_options(block_jd * block_p)["num_warps"]
    else:
        block_b, block_jd, warps = _WEIGHT_BLOCK_B, columns, 4
        while block_jd > _DOT_MIN and block_jd * max(_WEIGHT_BLOCK_B, block_p) > _WEIGHT_TILE:
            block_jd //= 2
    # The chunks of columns are the grid's second axis.
    block_jd = max(block_jd, triton.next_power_of_2(triton.cdiv(J * D, GRID_Y_MAX)))
    return dict(BLOCK_B=block_b, BLOCK_JD=block_jd, BLOCK_P=block_p, COMPUTE_DTYPE=tl_dtype(dtype),
                num_warps=warps, enable_fp_fusion=True)


def _split_grid(B, I, config, device, splits):
    """(blocks of samples, splits, chunk) of a split launch: the grid (blocks, splits) gives every
    SM a few CTAs (routing_split.pick_splits), each chunk a multiple of BLOCK_I inputs."""
    blocks = triton.cdiv(B, config["BLOCK_B"])
    return (blocks, *routing_split.pick_splits(blocks, I, config["BLOCK_I"], device, splits))


def _weight_slices(weight):
    """W [I, J, D, P] as [I, P, J, D], contiguous: predict_tile reads one slice W[i, :, :, p] at a
    time, and from this layout each is J D contiguous values (16-byte loads) instead of values P
    apart. One copy of W per call (5.9 MB at the MNIST shape, a few microseconds on a GPU)."""
    return weight.permute(0, 3, 1, 2).contiguous()


def _checked(u, weight, iterations, bias=None):
    """u and W, checked and contiguous (the kernels walk them with contiguous offsets), and bias."""
    check_u_and_weight(u, weight)
    iterations = check_iterations(iterations)
    B, I, J, D, P = u.shape[0], *weight.shape
    # Offsets into W and s_all are int32 in the kernels (the batch offset into u is 64-bit).
    if I * J * D * P > _INT32_MAX or iterations * B * J * D > _INT32_MAX:
        raise ValueError(f"W [I, J, D, P] = {tuple(weight.shape)}, or s_all [r, B, J, D] for r = "
                         f"{iterations} and B = {B}, has more than 2**31 - 1 elements")
    # check_bias reads J, D and the device off a [B, I, J, D] tensor: a view of W of that shape.
    check_bias(bias, weight[None, ..., 0], "weight")
    return u.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()


@on_tensor_device
def capsule_linear_forward(u, weight, iterations, bias=None, *, gradient="full", keep=True, variant=DEFAULT_VARIANT,
                           splits=None, block_i=None, out=None):
    """v [B, J, D] = routing(W u, iterations) for u [B, I, P] and W [I, J, D, P], u_hat never stored.

    variant: "split" (default, kernels/capsule_linear_split.py): one launch per iteration (and
    one to finish) over (block of samples, chunk of I), each W tile loaded once for the block's
    samples, the chunks' partial sums added in a fixed order; splits forces the number of chunks
    per block (default: enough for a few CTAs on every SM). "sample": one launch runs all
    iterations, one program per sample. bias: optional [J, D], added to s in every iteration.
    block_i: force the BLOCK_I inputs per tile (a power of two; tests use it to exercise the loop
    over I and its masks).
    Returns (v, s_all, couplings), all capsule_linear_backward needs: v in u's dtype; in the
    compute dtype (float64 for float64 u, else float32) s_all [iterations, B, J, D], every
    iteration's s, and the couplings the gradient policy's backward reads (checks.kept_iterations),
    [k, B, I, J]: c^(2..r) under "full" (k = r - 1), c^(r) under "last" (k = 1), none at r = 1
    or with keep=False, for a forward no backward will follow (inference).
    They are 1/D of u_hat's size per iteration (11.8 MB at B = 128 and the MNIST shape under
    "full"): the backward then recomputes no softmax, and storing them let the compiler compute
    the softmax once per (sample, input, parent) instead of on a layout replicated over D (the
    split loop halved in the sm_90 SASS; docs/PERF.md, 2026-11-30, tenth run).
    out: optional (v, s_all, couplings) of contiguous tensors of those shapes and dtypes to write into.
    """
    u, weight, bias = _checked(u, weight, iterations, bias)
    check_gradient(gradient)
    check_variant(variant)
    B, I, P = u.shape
    _, J, D, _ = weight.shape
    dtype = compute_dtype(u.dtype)
    kept = kept_iterations(iterations, gradient, keep)
    v_out, s_all_out, couplings_out = outputs(out, ("v", "s_all", "couplings"))
    v = output(v_out, (B, J, D), u.dtype, u.device, "out[0] (v)")
    s_all = output(s_all_out, (iterations, B, J, D), dtype, u.device, "out[1] (s_all)")
    couplings = output(couplings_out, (kept, B, I, J), dtype, u.device, "out[2] (couplings)")
    if B == 0:
        return v, s_all, couplings
    if keep:
        # Where a backward may follow, its kernel B's launch is checked too: a W too large for it
        # is refused here, not by the backward after.
        _weight_launch_config(B, J, D, P, u.dtype)
    # Without a bias the kernels never read bias_ptr; s_all stands in for the pointer.
    bias_arg = bias if bias is not None else s_all
    couplings_arg = couplings_pointer(couplings, s_all)
    first_kept = iterations - kept
    slices = _weight_slices(weight)
    if variant == "sample":
        _capsule_linear_forward_kernel[(B,)](
            u, slices, bias_arg, v, s_all, couplings_arg,
            B, I, J, D, P, iterations, first_kept,
            HAS_BIAS=bias is not None, **_launch_config(I, J, D, P, u.dtype, block_i),
        )
        return v, s_all, couplings
    config = _launch_config(I, J, D, P, u.dtype, block_i, samples=_SPLIT_BLOCK_B)
    blocks, splits, chunk = _split_grid(B, I, config, u.device, splits)
    partials = scratch((2, blocks, splits, config["BLOCK_B"] * J, D), s_all)
    for t in range(iterations + 1):
        capsule_linear_split.split_forward_kernel[(blocks, splits if t < iterations else 1)](
            u, slices, bias_arg, v, s_all, partials, couplings_arg,
            B, I, J, D, P, iterations, t, chunk, splits, first_kept,
            HAS_BIAS=bias is not None, **config,
        )
    return v, s_all, couplings


@on_tensor_device
def capsule_linear_backward(dv, u, weight, s_all, couplings, *, gradient="full", variant=DEFAULT_VARIANT,
                            splits=None, block_i=None, weight_launch=None, out=None):
    """Gradients of capsule_linear_forward: (du [B, I, P] in u's dtype, dW [I, J, D, P] in W's
    dtype, ds_all [r, B, J, D] in the compute dtype; the bias gradient is ds_all.sum((0, 1))).

    dv: dL/dv [B, J, D]; s_all and couplings: capsule_linear_forward's second and third outputs,
    from a forward under the same gradient policy. gradient: "full" (default) or "last", as
    routing_backward's: "last" leaves ds_all 0 but for ds^(r) = squash_backward(dv, s^(r)), and
    du_hat = c^(r) ds^(r).
    "full": kernel A walks the iterations backwards to ds_all, reading the kept c^(t) and keeping
    the logit gradients db^(t) it forms, [r - 1, B, I, J] in the compute dtype ("last": the squash
    backward kernel on [B, J, D]); then kernel B, one program per input and chunk of its J D
    columns, forms du_hat from those kept values alone and turns it into du and dW by two
    matrix products over the batch, dW written once. Kernel A
    is one launch, one program per sample, for variant="sample", and one launch per iteration
    over (block of samples, chunk of I) for variant="split" (the default; see capsule_linear_forward;
    splits forces the chunks per block). Kernel B is the same for both.
    weight_launch: optional (BLOCK_B, BLOCK_JD, num_warps) of kernel B (block_i sets kernel A's
    alone): samples per step and columns per program, powers of two from 16; the kernels stage
    times two others beside the default (docs/PERF.md, seventeenth run).
    out: optional (du, dW, ds_all) of contiguous tensors of those shapes and dtypes to write into.
    """
    check_float_tensor(s_all, "s_all")
    if s_all.dim() != 4 or s_all.shape[0] < 1:
        raise ValueError(f"s_all must be capsule_linear_forward's [r, B, J, D] output, got shape {tuple(s_all.shape)}")
    u, weight, _ = _checked(u, weight, s_all.shape[0])
    check_gradient(gradient)
    check_variant(variant)
    B, I, P = u.shape
    _, J, D, _ = weight.shape
    check_float_tensor(dv, "dv")
    if dv.shape != (B, J, D):
        raise ValueError(f"dv must have shape [B, J, D] = {(B, J, D)}, got {tuple(dv.shape)}")
    dtype = compute_dtype(u.dtype)
    if s_all.shape[1:] != (B, J, D) or s_all.dtype != dtype:
        raise ValueError(f"s_all must be capsule_linear_forward's [r, B, J, D] = [r, {B}, {J}, {D}] "
                         f"{dtype} output, got shape {tuple(s_all.shape)} {s_all.dtype}")
    iterations = s_all.shape[0]
    for name, x in (("dv", dv), ("s_all", s_all)):
        if x.device != u.device:
            raise ValueError(f"{name} is on {x.device} but u is on {u.device}; they must be on one device")
    couplings = check_kept_couplings(couplings, iterations, gradient, B, I, J, dtype, u.device,
                                     "capsule_linear_forward")
    # Kernel B's launch, checked before kernel A writes into the caller's buffers.
    weight_config = _weight_launch_config(B, J, D, P, u.dtype, weight_launch)
    s_all = s_all.contiguous()
    couplings = couplings_pointer(couplings, s_all)
    du_out, dweight_out, ds_all_out = outputs(out, ("du", "dW", "ds_all"))
    du = output(du_out, u.shape, u.dtype, u.device, "out[0] (du)")
    dweight = output(dweight_out, weight.shape, weight.dtype, u.device, "out[1] (dW)")
    ds_all = output(ds_all_out, s_all.shape, dtype, u.device, "out[2] (ds_all)")
    if B == 0:
        dweight.zero_()
        ds_all.zero_()
        return du, dweight, ds_all
    # Kernel A's logit gradients db^(t) for kernel B; under "last" (or r = 1) nothing reads them,
    # and s_all stands in for the pointer.
    full = gradient == "full" and iterations > 1
    grad_logits = scratch((iterations - 1, B, I, J), s_all) if full else s_all
    if gradient == "full" and variant == "sample":
        _capsule_linear_backward_ds_all_kernel[(B,)](
            u, _weight_slices(weight), dv.contiguous(), s_all, ds_all, couplings, grad_logits,
            B, I, J, D, P, iterations, **_launch_config(I, J, D, P, u.dtype, block_i),
        )
    elif gradient == "full":
        split_config = _launch_config(I, J, D, P, u.dtype, block_i, samples=_SPLIT_BLOCK_B)
        blocks, splits, chunk = _split_grid(B, I, split_config, u.device, splits)
        partials = scratch((iterations, blocks, splits, split_config["BLOCK_B"] * J, D), s_all)
        slices = _weight_slices(weight)
        for t in reversed(range(iterations)):
            capsule_linear_split.split_backward_ds_all_kernel[(blocks, splits if t > 0 else 1)](
                u, slices, dv.contiguous(), s_all, ds_all, partials, couplings, grad_logits,
                B, I, J, D, P, iterations, t, chunk, splits, **split_config,
            )
    else:
        ds_all[:-1].zero_()
        squash_backward(dv, s_all[-1], out=ds_all[-1])
    chunks = triton.cdiv(J * D, weight_config["BLOCK_JD"])
    # Kernel B's du, one partial sum per chunk of columns where there are several; V^(1..r-1) and
    # the samples whose ds^(0) is not finite (NaN in nan_rows, see _du_hat_rows) for "full"; the
    # pointers of what a launch does not read stand in as s_all.
    du_partials = du if chunks == 1 else scratch((chunks, B, I, P), s_all)
    v_sums = squash_forward(s_all[:-1]).cumsum(0) if full else s_all
    nan_rows = (ds_all[0] * 0.0).sum(dim=(1, 2)) if gradient == "full" else s_all
    _capsule_linear_backward_weight_kernel[(I, chunks)](
        u, weight, ds_all, v_sums, nan_rows, couplings, grad_logits, du_partials, dweight,
        B, I, J, D, P, iterations,
        GRADIENT_FULL=gradient == "full", **weight_config,
    )
    if chunks > 1:
        du.copy_(du_partials.sum(dim=0))
    return du, dweight, ds_all
