"""Backward kernel B of the fused DigitCaps layer (capsule_linear): du and dW as two matrix
products over the batch, from the values the forward and backward kernel A kept, without u_hat.

For one input i the backward of u_hat[b, i] = W[i] u[b, i] is

    du[:, i] = du_hat[:, i] @ W[i]        [B, J D] @ [J D, P]
    dW[i]    = du_hat[:, i]^T @ u[:, i]   [J D, B] @ [B, P]

so each program takes one input and one chunk of its J D columns, forms du_hat for a block of
samples at a time in registers and feeds it to both products as tl.dot. capsule_linear.py's
backward launcher calls `weight_launch_config` (before kernel A runs) and `backward_weight`.
"""

import triton
import triton.language as tl

from capsnet_triton.checks import interpreting, nan_rows

from .launch import GRID_Y_MAX, check_tile, launch_options, max_tile, scratch, tl_dtype
from .squash import squash_forward

__all__ = ["backward_weight_kernel", "weight_launch_config", "backward_weight"]


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
def backward_weight_kernel(
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


def weight_launch_config(B, J, D, P, dtype, weight_launch=None):
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
        # Every tile within the interpreter's limit: du_hat [BLOCK_B, BLOCK_JD], W and dW
        # [BLOCK_JD, BLOCK_P], and u [BLOCK_B, BLOCK_P] (at P = 1024, B = 2048 it held 2**21).
        while (max(block_jd * max(block_b, block_p), block_b * block_p) > max_tile(dtype)
               and max(block_b, block_jd) > _DOT_MIN):
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


def backward_weight(u, weight, ds_all, s_all, couplings, grad_logits, du, dweight, gradient, config):
    """Launch backward_weight_kernel with `config` (weight_launch_config's) into du [B, I, P] and dW
    [I, J, D, P]: u and W contiguous, ds_all and s_all [r, B, J, D], the kept couplings and kernel
    A's logit gradients as capsule_linear_backward has them (s_all standing in where none are kept).
    Where there are several chunks of columns, du is summed from their partials, in order."""
    B, I, P = u.shape
    _, J, D, _ = weight.shape
    iterations = s_all.shape[0]
    chunks = triton.cdiv(J * D, config["BLOCK_JD"])
    # du, one partial sum per chunk of columns where there are several; V^(1..r-1) and the samples
    # whose ds^(0) is not finite (NaN in checks.nan_rows, see _du_hat_rows) for "full"; the
    # pointers of what a launch does not read stand in as s_all.
    du_partials = du if chunks == 1 else scratch((chunks, B, I, P), s_all)
    v_sums = squash_forward(s_all[:-1]).cumsum(0) if gradient == "full" and iterations > 1 else s_all
    first_nan = nan_rows(ds_all[0]) if gradient == "full" else s_all
    backward_weight_kernel[(I, chunks)](
        u, weight, ds_all, v_sums, first_nan, couplings, grad_logits, du_partials, dweight,
        B, I, J, D, P, iterations,
        GRADIENT_FULL=gradient == "full", **config,
    )
    if chunks > 1:
        du.copy_(du_partials.sum(dim=0))
