"""The split-I variant of the routing forward and of backward kernel A, the default: grid (B, S).

The one-program-per-sample kernels of kernels/routing.py give a GPU B programs, one CTA per SM
at B = 128 on a 132-SM card, each walking all of I with full memory latency per tile. Here each
routing iteration is one launch over (sample, chunk of I): S programs per sample, S chosen so
that every SM holds a few CTAs. Each program writes its chunk's partial sum ([J, D]) and the
next launch's programs first add the S partials of their sample in a fixed order (k = 0..S-1),
so the result is deterministic with no float atomics, and every program of a sample computes
bit-identical s and V. Within a chunk every thread accumulates its own share of the partial
sum in a [BLOCK_I, BLOCK_J, BLOCK_D] tile, reduced across warps once per chunk, not per tile;
the loop over the chunk is `tl.range(..., num_stages=NUM_STAGES)`, so loads are pipelined; the
first iteration (uniform coupling 1/J) skips the softmax.

Memory traffic is that of the sample kernels plus, per launch, B S J D partials written and read
S times per sample (S J D per program: small next to the chunk of u_hat it reads).
On one H200 these kernels ran the forward 1.3-1.7x and the forward + backward 1.1-1.4x faster
than the sample kernels at B = 128 and 512 (docs/PERF.md), so they are the default.
"""

import triton
import triton.language as tl

from .launch import GRID_Y_MAX
from .routing_tiles import (coupling_tile, kept_logits_grad, kept_rows, kept_tile, load_u_hat, sample_layout,
                            split_backward_ds, split_forward_start, spread_nan, store_partial, uniform_share)

__all__ = ["split_forward_kernel", "split_backward_ds_all_kernel", "pick_splits"]


@triton.jit(do_not_specialize=["t"])
def split_forward_kernel(
    u_hat_ptr, bias_ptr, v_ptr, s_all_ptr, partial_ptr, couplings_ptr,
    B, I, J, D, iterations, t, chunk, splits, first_kept,
    stride_ub, stride_ui, stride_uj, stride_ud,
    HAS_BIAS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Launch t (0-based) of the routing forward: grid (B, splits) for t < iterations, then (B, 1)
    for t = iterations, which only finishes.

    A launch t >= 1 first sums the partials of iteration t - 1 to s^(t-1) (+ bias), which chunk 0
    stores in s_all, and adds squash(s^(t-1)) to V = squash(s^(1)) + ... read back from s_all.
    For t < iterations the program then sums c^(t) u_hat over inputs [k chunk, (k + 1) chunk)
    of its sample into partial[t % 2, sample, k], and for t >= first_kept stores the couplings
    c^(t) it took in slot t - first_kept of couplings_ptr ([iterations - first_kept, B, I, J],
    contiguous, COMPUTE_DTYPE; see kept_rows); the last launch stores v = squash(s^(r)).
    u_hat_ptr: u_hat [B, I, J, D] with strides (stride_ub, ...), any float dtype.
    bias_ptr: bias [J, D], contiguous (read only when HAS_BIAS). v_ptr: v [B, J, D], contiguous.
    s_all_ptr: [iterations, B, J, D] and partial_ptr: [2, B, splits, J, D], contiguous, COMPUTE_DTYPE.
    chunk: a multiple of BLOCK_I. Memory traffic per program: reads chunk J D of u_hat and
    (splits + t) J D of partials and s_all; writes J D (+ J D of s_all in chunk 0) and, for
    t >= first_kept, chunk J couplings.
    """
    sample, u_hat_sample, j_valid, jd_mask, jd_offsets, u_jd_offsets = sample_layout(
        u_hat_ptr, stride_ub, stride_uj, stride_ud, J, D, BLOCK_J, BLOCK_D)
    v_sum = split_forward_start(partial_ptr, bias_ptr, s_all_ptr, v_ptr, t, iterations, B, splits, J, D,
                                jd_offsets, jd_mask, jd_offsets, jd_mask, HAS_BIAS, 1, BLOCK_J, BLOCK_D,
                                COMPUTE_DTYPE)                             # V^(t)
    if t < iterations:
        i_in_block = tl.arange(0, BLOCK_I)
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, I)
        acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], COMPUTE_DTYPE)        # per-thread partial sums
        if t == 0:
            for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
                u_hat, _ = load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets,
                                      jd_mask, COMPUTE_DTYPE)
                acc += uniform_share(u_hat, J)
            partial = spread_nan(tl.sum(acc, axis=0))
        else:
            rows = kept_rows(couplings_ptr, t - first_kept, B, I, J, sample)
            for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
                u_hat, _ = load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets,
                                      jd_mask, COMPUTE_DTYPE)
                coupling = coupling_tile(u_hat, v_sum, j_valid)
                acc += coupling[:, :, None] * u_hat
                if t >= first_kept:
                    at, mask = kept_tile(i_start + i_in_block, I, J, j_valid, BLOCK_J)
                    tl.store(rows + at, coupling, mask=mask)
            partial = tl.sum(acc, axis=0)
        store_partial(partial_ptr, t % 2, splits, J, D, jd_offsets, jd_mask, partial, 1)


@triton.jit(do_not_specialize=["t"])
def split_backward_ds_all_kernel(
    u_hat_ptr, dv_ptr, s_all_ptr, ds_all_ptr, partial_ptr, couplings_ptr, grad_logits_ptr,
    B, I, J, D, iterations, t, chunk, splits,
    stride_ub, stride_ui, stride_uj, stride_ud,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Step t (0-based, launched for t = iterations - 1 down to 0) of backward kernel A: grid
    (B, splits) for t >= 1, (B, 1) for t = 0.

    dL/dv^(t) is dv for the last iteration, else the sum over the later iterations t' of
    dV^(t') = sum_k partial[t', sample, k] (in the order t' = r-1 .. t+1, k = 0..S-1); then
    ds^(t) = squash_backward(dL/dv^(t), s^(t)), stored by chunk 0, and for t >= 1 the chunk's
    share of dV^(t) = sum_i db^(t) u_hat, with c^(t) read from the forward's couplings, goes to
    partial[t, sample, k], and the chunk's db^(t) to grad_logits_ptr for kernel B.
    u_hat_ptr: u_hat [B, I, J, D] with strides (stride_ub, ...), any float dtype.
    dv_ptr: [B, J, D], contiguous. s_all_ptr, ds_all_ptr: [iterations, B, J, D] and
    partial_ptr: [iterations, B, splits, J, D], contiguous, COMPUTE_DTYPE. couplings_ptr and
    grad_logits_ptr: [iterations - 1, B, I, J], contiguous, COMPUTE_DTYPE, slot t - 1
    (routing_tiles.kept_rows).
    Memory traffic per program: reads chunk J D of u_hat, chunk J couplings and
    O((iterations splits + t) J D) of partials and s_all; writes J D (+ J D of ds_all in
    chunk 0) and chunk J logit gradients.
    """
    sample, u_hat_sample, j_valid, jd_mask, jd_offsets, u_jd_offsets = sample_layout(
        u_hat_ptr, stride_ub, stride_uj, stride_ud, J, D, BLOCK_J, BLOCK_D)
    ds = split_backward_ds(dv_ptr, s_all_ptr, ds_all_ptr, partial_ptr, t, iterations, B, splits, J, D,
                           jd_offsets, jd_mask, 1, BLOCK_J, BLOCK_D, COMPUTE_DTYPE)
    if t > 0:
        i_in_block = tl.arange(0, BLOCK_I)
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, I)
        acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
        coupling_rows = kept_rows(couplings_ptr, t - 1, B, I, J, sample)
        grad_logits_rows = kept_rows(grad_logits_ptr, t - 1, B, I, J, sample)
        for i_start in tl.range(start, end, BLOCK_I, num_stages=NUM_STAGES):
            u_hat, _ = load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets,
                                  jd_mask, COMPUTE_DTYPE)
            at, mask = kept_tile(i_start + i_in_block, I, J, j_valid, BLOCK_J)
            acc += kept_logits_grad(u_hat, ds, coupling_rows, grad_logits_rows, at, mask)[:, :, None] * u_hat
        store_partial(partial_ptr, t, splits, J, D, jd_offsets, jd_mask, tl.sum(acc, axis=0), 1)


# CTAs wanted per SM, and chunks per sample at least. On one H200 at the MNIST shape, kernels
# alone, fewer and longer chunks won down to two: routing forward at B = 128 took 0.16 ms with
# S = 2, 0.16 with 4, 0.19 with 5 (4 CTAs per SM), 0.18 with 8, 0.21 with 16; at B = 512, 0.57 with
# S = 2 against 0.78 with 16 (docs/PERF.md, "First runs on a GPU").
_CTAS_PER_SM = 2
_MIN_SPLITS = 2
# The SM count of the GPUs this project is measured on (H100, H200), for launches recorded
# without a device to ask (the compile test).
_DEFAULT_SMS = 132


def pick_splits(B, I, block_i, device, splits=None):
    """(splits, chunk): S chunks of I per sample, each a multiple of block_i inputs, so that the
    grid (B, S) gives every SM a few CTAs; `splits` forces S (tests use it), within the grid's
    limit on its second axis (GRID_Y_MAX) and the tiles there are. S, and with it the
    order of a sample's partial sums, depends on B and the SM count: results repeat bit for bit
    for one batch size on one GPU model, not across them (README, "Use it")."""
    tiles = triton.cdiv(I, block_i)
    if splits is None:
        sms = _DEFAULT_SMS
        if device.type == "cuda":
            import torch
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(_MIN_SPLITS, triton.cdiv(_CTAS_PER_SM * sms, B))
    elif isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an integer >= 1, got {splits!r}")
    chunk = triton.cdiv(tiles, min(splits, tiles, GRID_Y_MAX)) * block_i
    return triton.cdiv(I, chunk), chunk
