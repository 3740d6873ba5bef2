"""The split variant of the fused DigitCaps forward and backward kernel A: grid (cdiv(B, BLOCK_B), S).

The sample kernels of kernels/capsule_linear.py run one program per sample over all of I, so
every sample reads all of W (I J D P: 5.9 MB in float32 at the MNIST shape, from L2) once per
routing iteration, and a GPU gets only B programs. Here a program owns a block of BLOCK_B
consecutive samples and one chunk of I, as kernels/routing_split.py splits I for u_hat inputs:
each W tile it loads is used for all BLOCK_B samples while it sits in registers (u_hat tiles
[BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] predicted from it), which divides the W traffic by BLOCK_B,
and each routing iteration is one launch over (block of samples, chunk of I) whose programs
write the chunk's partial sums; the next launch's programs add the S partials of their samples
in the fixed order k = 0..S-1: deterministic, no float atomics. Within a chunk every thread
accumulates its own share in a [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] tile reduced once per chunk;
the loop over the chunk is `tl.range(..., num_stages=NUM_STAGES)`; the first iteration (uniform
coupling 1/J) skips the softmax.

A program's [J, D] quantities (s, V, ds, partial sums) are [BLOCK_B * BLOCK_J, BLOCK_D] tiles
whose row b * BLOCK_J + j is sample b's parent j: squash acts per row, and since the block's
samples are consecutive, s_all [r, B, J, D] of samples first..first+BLOCK_B-1 is one
[BLOCK_B J, D] matrix at sample `first`. So the split routing kernels' helpers
(kernels/routing_tiles.py: split_forward_start, split_backward_ds, store_partial)
serve both, with the partial sums laid out to match: [slots, cdiv(B, BLOCK_B), S, BLOCK_B J, D].
Samples past B in the last block read sample B - 1's u (never out of bounds) and are masked out
of every store.

Memory traffic per launch: u once (B I P), W once per block of samples (cdiv(B, BLOCK_B) I J D P,
from L2), cdiv(B, BLOCK_B) S BLOCK_B J D partials written and S times that read, and for
t >= 1 the B I J couplings of iteration t (forward: written where kept; kernel A: read, and as
many logit gradients written). On one
H200 they ran the layer's forward + backward about 1.1x faster than the sample kernels at B = 128
and 512, so they are the default; both were then 5-8x slower than predicting u_hat and routing it
with the routing kernels, before predict_tile took W one slice at a time (docs/PERF.md), after
which the sample kernels execute half their instructions per (input, sample): a GPU measures again.
"""

import triton
import triton.language as tl

from .routing_tiles import (coupling_tile, jd_layout, kept_logits_grad, kept_rows, predict_tile, split_backward_ds,
                            split_forward_start, spread_nan, store_partial, uniform_share)

__all__ = ["split_forward_kernel", "split_backward_ds_all_kernel"]


@triton.jit
def _kept_layout(first, B, I, J, i_start, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """The block's samples [BLOCK_B, 1, 1] (not clamped: masked), and the offsets [1, BLOCK_I, BLOCK_J]
    from kept_rows and mask [BLOCK_B, BLOCK_I, BLOCK_J] of the (sample, input, parent) of the tile
    at i_start in a kept buffer [slots, B, I, J]."""
    samples = (first + tl.arange(0, BLOCK_B))[:, None, None]
    i = (i_start + tl.arange(0, BLOCK_I))[None, :, None]
    j = tl.arange(0, BLOCK_J)[None, None, :]
    return samples, i * J + j, (samples < B) & (i < I) & (j < J)


@triton.jit
def _block_layout(u_ptr, B, I, J, D, P, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of samples and its [BLOCK_B * BLOCK_J, BLOCK_D] row tiles.

    Returns (first, u_block, rows_mask, rows_offsets, bias_offsets, bias_mask): the block's first
    sample (int64), pointers to u[b] of its samples [BLOCK_B, 1] (samples past B clamped to
    B - 1), which rows (sample b < B, parent j < J) and dims are real, offsets of row
    b * BLOCK_J + j into the block's contiguous [BLOCK_B J, D] at sample `first`, and the row's
    offsets and mask into a [J, D] shared by the samples (the bias).
    """
    first = tl.program_id(0).to(tl.int64) * BLOCK_B
    samples = tl.minimum(first + tl.arange(0, BLOCK_B), B - 1)
    u_block = u_ptr + (samples * I * P)[:, None]
    row = tl.arange(0, BLOCK_B * BLOCK_J)
    in_block = row // BLOCK_J
    j = row % BLOCK_J
    d = tl.arange(0, BLOCK_D)
    bias_mask = (j < J)[:, None] & (d < D)[None, :]
    rows_mask = bias_mask & (first + in_block < B)[:, None]
    bias_offsets = j[:, None] * D + d[None, :]
    rows_offsets = (in_block * J * D)[:, None] + bias_offsets
    return first, u_block, rows_mask, rows_offsets, bias_offsets, bias_mask


@triton.jit(do_not_specialize=["t"])
def split_forward_kernel(
    u_ptr, slices_ptr, bias_ptr, v_ptr, s_all_ptr, partial_ptr, couplings_ptr,
    B, I, J, D, P, iterations, t, chunk, splits, first_kept,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Launch t (0-based) of the fused forward: grid (cdiv(B, BLOCK_B), splits) for t < iterations,
    then (cdiv(B, BLOCK_B), 1) for t = iterations, which only finishes.

    A launch t >= 1 first sums the partials of iteration t - 1 to s^(t-1) (+ bias), which chunk 0
    stores in s_all, and adds squash(s^(t-1)) to V = squash(s^(1)) + ... read back from s_all.
    For t < iterations the program then sums c^(t) u_hat over inputs [k chunk, (k + 1) chunk) of
    its samples, u_hat = W u predicted per tile, into partial[t % 2, block, k], and for
    t >= first_kept stores the couplings c^(t) it took in slot t - first_kept of couplings_ptr
    ([iterations - first_kept, B, I, J], contiguous, COMPUTE_DTYPE; see kept_rows); the last
    launch stores v = squash(s^(r)).
    u_ptr: u [B, I, P], contiguous, any float dtype. slices_ptr: W as [I, P, J, D], contiguous,
    u's dtype (see predict_tile). bias_ptr: bias [J, D], contiguous (read only when HAS_BIAS). v_ptr: v [B, J, D],
    contiguous, u's dtype. s_all_ptr: [iterations, B, J, D] and partial_ptr:
    [2, cdiv(B, BLOCK_B), splits, BLOCK_B J, D], contiguous, COMPUTE_DTYPE. chunk: a multiple of
    BLOCK_I. Memory traffic per program: reads chunk J D P of W and BLOCK_B chunk P of u, and
    BLOCK_B (splits + t) J D of partials and s_all; writes BLOCK_B J D (+ as much of s_all in chunk 0)
    and, for t >= first_kept, BLOCK_B chunk J couplings.
    """
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    first, u_block, rows_mask, rows_offsets, bias_offsets, bias_mask = _block_layout(
        u_ptr, B, I, J, D, P, BLOCK_B, BLOCK_J, BLOCK_D)
    v_sum = split_forward_start(partial_ptr, bias_ptr, s_all_ptr, v_ptr, t, iterations, B, splits, J, D,
                                rows_offsets, rows_mask, bias_offsets, bias_mask, HAS_BIAS, BLOCK_B,
                                BLOCK_B * BLOCK_J, BLOCK_D, COMPUTE_DTYPE)  # V^(t), one row per (sample, parent)
    if t < iterations:
        i_in_block = tl.arange(0, BLOCK_I)
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, I)
        v_sums = tl.reshape(v_sum, [BLOCK_B, BLOCK_J, BLOCK_D])            # one V per sample
        acc = tl.zeros([BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D], COMPUTE_DTYPE)  # per-thread partial sums
        if t == 0:
            for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
                acc += uniform_share(predict_tile(slices_ptr, u_block, i_start + i_in_block, I, J, D, P,
                                                  jd_mask, jd_offsets, COMPUTE_DTYPE), J)
            partial = spread_nan(tl.sum(acc, axis=1))
        else:
            # Kept for the backward (and storing them lets the compiler compute the softmax once
            # per (sample, input, parent) instead of on a layout replicated over D: half the loop's
            # instructions in the sm_90 SASS; docs/PERF.md, 2026-11-30, tenth run).
            for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
                u_hat = predict_tile(slices_ptr, u_block, i_start + i_in_block, I, J, D, P, jd_mask, jd_offsets,
                                     COMPUTE_DTYPE)              # [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D]
                coupling = coupling_tile(u_hat, v_sums, j_valid)       # [BLOCK_B, BLOCK_I, BLOCK_J]
                acc += tl.expand_dims(coupling, -1) * u_hat
                if t >= first_kept:
                    samples, at, kept_mask = _kept_layout(first, B, I, J, i_start, BLOCK_B, BLOCK_I, BLOCK_J)
                    tl.store(kept_rows(couplings_ptr, t - first_kept, B, I, J, samples) + at, coupling,
                             mask=kept_mask)
            partial = tl.sum(acc, axis=1)
        store_partial(partial_ptr, t % 2, splits, J, D, rows_offsets, rows_mask,
                      tl.reshape(partial, [BLOCK_B * BLOCK_J, BLOCK_D]), BLOCK_B)


@triton.jit(do_not_specialize=["t"])
def split_backward_ds_all_kernel(
    u_ptr, slices_ptr, dv_ptr, s_all_ptr, ds_all_ptr, partial_ptr, couplings_ptr, grad_logits_ptr,
    B, I, J, D, P, iterations, t, chunk, splits,
    BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Step t (0-based, launched for t = iterations - 1 down to 0) of backward kernel A
    (gradient="full"): grid (cdiv(B, BLOCK_B), splits) for t >= 1, (cdiv(B, BLOCK_B), 1) for t = 0.

    dL/dv^(t) is dv for the last iteration, else the sum over the later iterations t' of
    dV^(t') = sum_k partial[t', block, k] (in the order t' = r-1 .. t+1, k = 0..S-1); then
    ds^(t) = squash_backward(dL/dv^(t), s^(t)), stored by chunk 0, and for t >= 1 the chunk's
    share of dV^(t) = sum_i db^(t) u_hat, u_hat = W u predicted per tile and c^(t) read from the
    forward's couplings, goes to partial[t, block, k], and the chunk's db^(t) to grad_logits_ptr
    for kernel B. couplings_ptr and grad_logits_ptr: [iterations - 1, B, I, J], contiguous,
    COMPUTE_DTYPE, slot t - 1 (routing_tiles.kept_rows).
    u_ptr, slices_ptr: as in the forward. dv_ptr: dL/dv [B, J, D], contiguous, any float dtype.
    s_all_ptr, ds_all_ptr: [iterations, B, J, D] and partial_ptr:
    [iterations, cdiv(B, BLOCK_B), splits, BLOCK_B J, D], contiguous, COMPUTE_DTYPE.
    Memory traffic per program: reads chunk J D P of W and BLOCK_B chunk P of u, and
    O(BLOCK_B (iterations splits + t) J D) of partials and s_all, and for t >= 1 BLOCK_B chunk J
    couplings; writes BLOCK_B J D (+ as much of ds_all in chunk 0) and for t >= 1 BLOCK_B chunk J
    logit gradients.
    """
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    first, u_block, rows_mask, rows_offsets, _, _ = _block_layout(
        u_ptr, B, I, J, D, P, BLOCK_B, BLOCK_J, BLOCK_D)
    ds = split_backward_ds(dv_ptr, s_all_ptr, ds_all_ptr, partial_ptr, t, iterations, B, splits, J, D,
                           rows_offsets, rows_mask, BLOCK_B, BLOCK_B * BLOCK_J, BLOCK_D, COMPUTE_DTYPE)
    if t > 0:
        ds_block = tl.reshape(ds, [BLOCK_B, BLOCK_J, BLOCK_D])             # one ds per sample
        i_in_block = tl.arange(0, BLOCK_I)
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, I)
        acc = tl.zeros([BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
        for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
            u_hat = predict_tile(slices_ptr, u_block, i_start + i_in_block, I, J, D, P, jd_mask, jd_offsets,
                                 COMPUTE_DTYPE)                  # [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D]
            samples, at, kept_mask = _kept_layout(first, B, I, J, i_start, BLOCK_B, BLOCK_I, BLOCK_J)
            # Samples past B (u_hat of sample B - 1) get c = 0, so db = 0 (NaN where sample B - 1's
            # u_hat is not finite): their rows are masked out of every store.
            grad_logits = kept_logits_grad(u_hat, ds_block, kept_rows(couplings_ptr, t - 1, B, I, J, samples),
                                           kept_rows(grad_logits_ptr, t - 1, B, I, J, samples), at,
                                           kept_mask)                     # [BLOCK_B, BLOCK_I, BLOCK_J]
            acc += tl.expand_dims(grad_logits, -1) * u_hat
        store_partial(partial_ptr, t, splits, J, D, rows_offsets, rows_mask,
                      tl.reshape(tl.sum(acc, axis=1), [BLOCK_B * BLOCK_J, BLOCK_D]), BLOCK_B)
