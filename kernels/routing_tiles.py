"""The tile helpers every routing kernel shares (kernels/routing.py, kernels/routing_split.py,
kernels/capsule_linear.py, kernels/capsule_linear_split.py): a program's sample layout, u_hat
tiles, couplings and their gradient, V^(t) from s_all, a tile's share of s, the split kernels'
partial sums, the fused layer's W and u tiles and prediction u_hat = W u, and the kept
couplings and logit gradients with du_hat formed from them.
"""

import triton
import triton.language as tl

from .squash import squash_backward_tile, squash_tile

__all__ = ["sample_layout", "load_u_hat", "coupling_tile", "logits_grad", "v_sum_before", "sample_ds", "s_of_tile",
           "load_bias", "end_iteration", "sum_partials",
           "split_forward_start", "split_backward_ds", "store_partial", "uniform_share", "spread_nan",
           "jd_layout", "predict_tile", "kept_rows", "kept_tile",
           "kept_logits_grad", "du_hat_of_kept"]


@triton.jit
def sample_layout(u_hat_ptr, stride_ub, stride_uj, stride_ud, J, D,
                   BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample and the [BLOCK_J, BLOCK_D] offsets and mask every routing kernel uses.

    Returns (sample, u_hat_sample, j_valid, jd_mask, jd_offsets, u_jd_offsets): the sample index
    (int64, for the batch offset), the pointer to u_hat[sample], which parents are real
    [BLOCK_J], which (j, d) are real [BLOCK_J, BLOCK_D], offsets into a contiguous [J, D], and
    offsets into u_hat[sample, i] through u_hat's strides.
    """
    sample = tl.program_id(0).to(tl.int64)
    j_valid, jd_mask, jd_offsets = jd_layout(J, D, BLOCK_J, BLOCK_D)
    u_jd_offsets = tl.arange(0, BLOCK_J)[:, None] * stride_uj + tl.arange(0, BLOCK_D)[None, :] * stride_ud
    return sample, u_hat_ptr + sample * stride_ub, j_valid, jd_mask, jd_offsets, u_jd_offsets


@triton.jit
def load_u_hat(u_hat_sample, i_start, i_in_block, I, stride_ui, u_jd_offsets, jd_mask,
               COMPUTE_DTYPE: tl.constexpr):
    """The u_hat tile of inputs i_start + i_in_block [BLOCK_I] in the compute dtype, padded entries
    0, and its mask, both [BLOCK_I, BLOCK_J, BLOCK_D].

    The tile's start is a 64-bit offset and only the offsets inside the tile are int32, so that a
    sample may span more than 2**31 elements (a batch-inner u_hat at a large batch) uncopied."""
    mask = (i_start + i_in_block < I)[:, None, None] & jd_mask[None, :, :]
    tile = u_hat_sample + tl.cast(i_start, tl.int64) * stride_ui
    u_hat = tl.load(tile + (i_in_block * stride_ui)[:, None, None] + u_jd_offsets[None, :, :],
                    mask=mask, other=0.0).to(COMPUTE_DTYPE)
    return u_hat, mask


@triton.jit
def coupling_tile(u_hat, v_sum, j_valid):
    """c = softmax_j(b), b = u_hat . V (Procedure 1 lines 4 and 7): [BLOCK_I, BLOCK_J].

    u_hat [BLOCK_I, BLOCK_J, BLOCK_D], v_sum = V [BLOCK_J, BLOCK_D], j_valid [BLOCK_J]; or, for
    a block of samples, u_hat [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] and v_sum [BLOCK_B, BLOCK_J,
    BLOCK_D] to c [BLOCK_B, BLOCK_I, BLOCK_J]. The logits are max-subtracted; padded parents get
    -inf, so their coupling is exactly 0.
    """
    agreement = tl.sum(u_hat * tl.expand_dims(v_sum, -3), axis=-1)        # [..., BLOCK_I, BLOCK_J]
    agreement = tl.where(j_valid, agreement, float("-inf"))
    e = tl.exp(agreement - tl.max(agreement, axis=-1, keep_dims=True))
    return e / tl.sum(e, axis=-1, keep_dims=True)


@triton.jit
def logits_grad(u_hat, coupling, ds):
    """db = c (dc - sum_j c dc) with dc = u_hat . ds: the gradient of the logits b [BLOCK_I, BLOCK_J].

    dc is the gradient of the coupling through s = sum_i c u_hat; the softmax over j turns it
    into db. Padded parents (c = 0) and padded inputs (u_hat = 0) get db = 0. Leading sample
    axes as in coupling_tile (ds then [BLOCK_B, BLOCK_J, BLOCK_D]).
    """
    dc = tl.sum(u_hat * tl.expand_dims(ds, -3), axis=-1)                   # [..., BLOCK_I, BLOCK_J]
    # Measured from the most coupled parent's dc (the largest among ties): exact, since
    # sum_j c = 1, and where c saturates it keeps dc - sum_j c dc from cancelling to rounding.
    top = coupling == tl.max(coupling, axis=-1, keep_dims=True)
    dc -= tl.max(tl.where(top, dc, float("-inf")), axis=-1, keep_dims=True)
    return coupling * (dc - tl.sum(coupling * dc, axis=-1, keep_dims=True))


@triton.jit
def v_sum_before(s_all_ptr, t, B, sample, J, D, offsets, mask,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """V before iteration t (0-based): the sum of squash(s) over iterations 0..t-1 read back from
    s_all [iterations, B, J, D], for the rows at `sample` that offsets and mask place (one
    sample's [J, D], or a block of samples' [SAMPLES J, D]) -> [BLOCK_ROWS, BLOCK_D].

    Summed in the forward kernel's order, so that the recomputed V matches it bit for bit.
    """
    v_sum = tl.zeros([BLOCK_ROWS, BLOCK_D], COMPUTE_DTYPE)
    for k in range(t):
        s = tl.load(s_all_ptr + (k * B + sample) * J * D + offsets, mask=mask, other=0.0)
        v_sum += squash_tile(s)
    return v_sum


@triton.jit
def sample_ds(grad_v, s_all_ptr, ds_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask):
    """ds^(t) = squash_backward(dL/dv^(t), s^(t)) for one sample's [BLOCK_J, BLOCK_D] at iteration t
    (0-based), read from s_all and stored in ds_all (both [iterations, B, J, D]) -> ds^(t): the
    step of the sample kernels' backward kernel A."""
    offsets = (t * B + sample) * J * D + jd_offsets
    ds = squash_backward_tile(grad_v, tl.load(s_all_ptr + offsets, mask=jd_mask, other=0.0))
    tl.store(ds_all_ptr + offsets, ds, mask=jd_mask)
    return ds


@triton.jit
def s_of_tile(u_hat, v_sum, j_valid):
    """(s, c): s = sum_i c u_hat over the inputs of one u_hat tile [BLOCK_I, BLOCK_J, BLOCK_D], with
    c [BLOCK_I, BLOCK_J] recomputed from V = v_sum: the tile's share of s (Eq. 2) -> [BLOCK_J,
    BLOCK_D], and the couplings it took (the forwards keep them for the backward)."""
    coupling = coupling_tile(u_hat, v_sum, j_valid)
    return tl.sum(coupling[:, :, None] * u_hat, axis=0), coupling


@triton.jit
def kept_rows(kept_ptr, slot, B, I, J, sample):
    """Where `slot` starts for sample (a scalar, or [BLOCK_B, 1, 1] for a block) in a per-input
    buffer [slots, B, I, J], contiguous (input i, parent j at i J + j from there): the couplings a
    forward keeps (routing_forward's and capsule_linear_forward's third output, c^(t) in slot
    t - first_kept) and the logit gradients backward kernel A keeps for kernel B (db^(t) in slot
    t - 1; t counts from 0)."""
    return kept_ptr + (slot * B + tl.cast(sample, tl.int64)) * I * J


@triton.jit
def kept_tile(i, I, J, j_valid, BLOCK_J: tl.constexpr):
    """(offsets from kept_rows' rows, mask) [BLOCK_I, BLOCK_J] of one sample's inputs i [BLOCK_I]
    and every parent in a kept buffer."""
    j = tl.arange(0, BLOCK_J)
    return i[:, None] * J + j[None, :], (i < I)[:, None] & j_valid[None, :]


@triton.jit
def kept_logits_grad(u_hat, ds, coupling_rows, grad_logits_rows, at, mask):
    """Backward kernel A's db^(t) = logits_grad of a u_hat tile, from the coupling c^(t) the forward
    kept (read at coupling_rows + at) and ds^(t): stored at grad_logits_rows + at for kernel B, and
    returned. Rows from kept_rows, offsets and mask as kept_tile's (or, for a block of samples,
    with a leading sample axis); masked entries read c = 0, so padded parents and inputs get db = 0."""
    grad_logits = logits_grad(u_hat, tl.load(coupling_rows + at, mask=mask, other=0.0), ds)
    tl.store(grad_logits_rows + at, grad_logits, mask=mask)
    return grad_logits


@triton.jit
def du_hat_of_kept(couplings_ptr, grad_logits_ptr, s_all_ptr, ds_all_ptr, B, I, J, D, sample, i, iterations,
                   j_valid, jd_mask, jd_offsets, GRADIENT_FULL: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """du_hat for one sample's inputs i [BLOCK_I] -> [BLOCK_I, BLOCK_J, BLOCK_D], from kept values
    (kept_rows): no u_hat, no coupling recomputed.

        GRADIENT_FULL:  du_hat = sum_t [ c^(t) ds^(t) + db^(t) V^(t) ]
        otherwise:      du_hat = c^(r) ds^(r)                 (the "last" policy)

    with c^(0) = 1/J and V^(0) = 0; c^(t), t >= 1 (0-based), from the forward's couplings
    (couplings_ptr: slot t - 1 under "full", slot 0 holding c^(r) under "last"), db^(t) from
    backward kernel A's (grad_logits_ptr, slot t - 1; read under "full" only), V^(t) summed
    from s_all (v_sum_before's order). Padded inputs and parents get 0, but for the NaN below,
    which the callers' stores mask out there.
    """
    at, mask = kept_tile(i, I, J, j_valid, BLOCK_J)
    uniform = tl.where(mask, tl.full([], 1.0, COMPUTE_DTYPE) / J, 0.0)    # c^(0) [BLOCK_I, BLOCK_J]
    if GRADIENT_FULL:
        ds = tl.load(ds_all_ptr + sample * J * D + jd_offsets, mask=jd_mask, other=0.0)
        # db^(0) V^(0) is 0 by V^(0) = 0, but as the reference computes it, NaN where db^(0) is not
        # finite: for finite u_hat, exactly where ds^(0) holds a NaN or inf (a finite sample whose
        # first s overflowed, SPEC 7), which spreads to all of the sample's du_hat. So does this.
        du_hat = uniform[:, :, None] * ds[None, :, :] + tl.sum(tl.sum(ds * 0.0, axis=1), axis=0)
        v_sum = squash_tile(tl.load(s_all_ptr + sample * J * D + jd_offsets, mask=jd_mask, other=0.0))
        for t in range(1, iterations):
            offsets = (t * B + sample) * J * D + jd_offsets                # s^(t) in s_all
            ds = tl.load(ds_all_ptr + offsets, mask=jd_mask, other=0.0)
            coupling = tl.load(kept_rows(couplings_ptr, t - 1, B, I, J, sample) + at, mask=mask, other=0.0)
            grad_logits = tl.load(kept_rows(grad_logits_ptr, t - 1, B, I, J, sample) + at, mask=mask, other=0.0)
            du_hat += coupling[:, :, None] * ds[None, :, :] + grad_logits[:, :, None] * v_sum[None, :, :]
            v_sum += squash_tile(tl.load(s_all_ptr + offsets, mask=jd_mask, other=0.0))
    else:
        ds = tl.load(ds_all_ptr + ((iterations - 1) * B + sample) * J * D + jd_offsets, mask=jd_mask, other=0.0)
        coupling = uniform
        if iterations > 1:
            coupling = tl.load(kept_rows(couplings_ptr, 0, B, I, J, sample) + at, mask=mask, other=0.0)
        du_hat = coupling[:, :, None] * ds[None, :, :]
    return du_hat


@triton.jit
def load_bias(bias_ptr, jd_offsets, jd_mask, HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr,
              BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The routing bias [J, D] as a [BLOCK_J, BLOCK_D] tile; zeros (bias_ptr never read) without one."""
    bias = tl.zeros([BLOCK_J, BLOCK_D], COMPUTE_DTYPE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + jd_offsets, mask=jd_mask, other=0.0).to(COMPUTE_DTYPE)
    return bias


@triton.jit
def end_iteration(s, bias, s_all_ptr, t, B, sample, J, D, jd_offsets, jd_mask, v_sum,
                  HAS_BIAS: tl.constexpr):
    """The end of routing iteration t once s = sum_i c u_hat is summed: add the bias, save s^(t)
    into s_all [iterations, B, J, D] (all backward needs), squash. Returns (v^(t), V^(t+1))."""
    if HAS_BIAS:
        s += bias
    tl.store(s_all_ptr + (t * B + sample) * J * D + jd_offsets, s, mask=jd_mask)
    v = squash_tile(s)
    return v, v_sum + v


@triton.jit
def sum_partials(partial_ptr, slot, blocks, block, splits, rows, D, offsets, mask,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """sum_k partial[slot, block, k] of partial_ptr [slots, blocks, S = splits, rows, D] over the
    chunks k, in the order k = 0..S-1 -> [BLOCK_ROWS, BLOCK_D] (rows: a block's (sample, parent) pairs)."""
    total = tl.zeros([BLOCK_ROWS, BLOCK_D], COMPUTE_DTYPE)
    for k in range(splits):
        total += tl.load(partial_ptr + ((slot * blocks + block) * splits + k) * rows * D + offsets,
                         mask=mask, other=0.0)
    return total


@triton.jit
def split_forward_start(partial_ptr, bias_ptr, s_all_ptr, v_ptr, t, iterations, B, splits, J, D,
                        offsets, mask, bias_offsets, bias_mask, HAS_BIAS: tl.constexpr, SAMPLES: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """V^(t) [BLOCK_ROWS, BLOCK_D] at the start of launch t (0-based) of a split forward, grid
    (cdiv(B, SAMPLES), splits): a program per block of SAMPLES consecutive samples and chunk of I.

    The tiles' rows are the block's (sample, parent) pairs: offsets and mask place them in a
    contiguous [SAMPLES J, D] at the block's first sample (for SAMPLES = 1 simply [J, D]), and
    bias_offsets and bias_mask in the bias [J, D]. A launch t >= 1 first sums the S partials of
    iteration t - 1 in the order k = 0..S-1 (partial_ptr: [2, cdiv(B, SAMPLES), S, SAMPLES J, D],
    slot (t - 1) % 2) to s^(t-1) (+ bias), which chunk 0 stores in s_all [iterations, B, J, D]
    (and, in the last launch t = iterations, v = squash(s^(r)) in v [B, J, D]), and adds
    squash(s^(t-1)) to V, the earlier iterations' squash(s) read back from s_all.
    """
    block = tl.program_id(0).to(tl.int64)
    first = block * SAMPLES
    v_sum = v_sum_before(s_all_ptr, tl.maximum(t - 1, 0), B, first, J, D, offsets, mask,
                         BLOCK_ROWS, BLOCK_D, COMPUTE_DTYPE)                # V^(t-1)
    if t > 0:
        s = sum_partials(partial_ptr, (t - 1) % 2, tl.num_programs(0), block, splits, SAMPLES * J, D,
                         offsets, mask, BLOCK_ROWS, BLOCK_D, COMPUTE_DTYPE)
        if HAS_BIAS:
            s += tl.load(bias_ptr + bias_offsets, mask=bias_mask, other=0.0).to(COMPUTE_DTYPE)
        v = squash_tile(s)
        v_sum += v
        if tl.program_id(1) == 0:
            tl.store(s_all_ptr + ((t - 1) * B + first) * J * D + offsets, s, mask=mask)
            if t == iterations:
                tl.store(v_ptr + first * J * D + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
    return v_sum


@triton.jit
def split_backward_ds(dv_ptr, s_all_ptr, ds_all_ptr, partial_ptr, t, iterations, B, splits, J, D, offsets, mask,
                      SAMPLES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      COMPUTE_DTYPE: tl.constexpr):
    """ds^(t) [BLOCK_ROWS, BLOCK_D] at step t (0-based, walked from iterations - 1 down to 0) of a
    split backward kernel A, grid and rows as in split_forward_start.

    dL/dv^(t) is dv [B, J, D] for the last iteration, else the sum over the later iterations t'
    of dV^(t') = sum_k partial[t', block, k] (in the order t' = r-1 .. t+1, k = 0..S-1;
    partial_ptr: [iterations, cdiv(B, SAMPLES), S, SAMPLES J, D]); then
    ds^(t) = squash_backward(dL/dv^(t), s^(t)), which chunk 0 stores in ds_all [iterations, B, J, D].
    """
    block = tl.program_id(0).to(tl.int64)
    first = block * SAMPLES
    if t == iterations - 1:
        grad_v = tl.load(dv_ptr + first * J * D + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        grad_v = tl.zeros([BLOCK_ROWS, BLOCK_D], COMPUTE_DTYPE)
        for k in range(iterations - 1 - t):
            grad_v += sum_partials(partial_ptr, iterations - 1 - k, tl.num_programs(0), block, splits,
                                   SAMPLES * J, D, offsets, mask, BLOCK_ROWS, BLOCK_D, COMPUTE_DTYPE)
    s_offsets = (t * B + first) * J * D + offsets                          # s^(t) in s_all
    ds = squash_backward_tile(grad_v, tl.load(s_all_ptr + s_offsets, mask=mask, other=0.0))
    if tl.program_id(1) == 0:
        tl.store(ds_all_ptr + s_offsets, ds, mask=mask)
    return ds


@triton.jit
def store_partial(partial_ptr, slot, splits, J, D, offsets, mask, partial, SAMPLES: tl.constexpr):
    """Store this program's partial sum (rows as in split_forward_start) as partial[slot, block, split]
    of partial_ptr: [slots, cdiv(B, SAMPLES), splits, SAMPLES J, D]."""
    block = tl.program_id(0).to(tl.int64)
    tl.store(partial_ptr + ((slot * tl.num_programs(0) + block) * splits + tl.program_id(1)) * SAMPLES * J * D
             + offsets, partial, mask=mask)


@triton.jit
def uniform_share(u_hat, J):
    """c u_hat for the first iteration's uniform coupling c = 1/J, with NaN where u_hat is not
    finite (inf * 0 is NaN): a multiply and an FMA.

    Scaled before it is summed, as the reference does: a sum that would overflow only before the
    division by J stays finite. And the first iteration has no softmax to spread a NaN or inf
    input to every parent of its sample, as SPEC 7 asks (later iterations' agreement u_hat . V
    does it): a split program sums these instead of c u_hat, and spread_nan then spreads over the
    sample only NaN, so a finite sample whose sum overflows makes inf, not NaN, and keeps its
    other parents, as in the reference and the sample kernels. (Finite inputs whose per-thread
    sums overflow to +inf and -inf in one parent make NaN there, and the whole sample NaN: a sum
    that is lost anyway.)"""
    coupling = tl.full([], 1.0, u_hat.dtype) / J                           # 1/J in u_hat's dtype
    return u_hat * coupling + u_hat * 0.0


@triton.jit
def spread_nan(partial):
    """partial [..., BLOCK_J, BLOCK_D] (one sample's share of s per leading index) made NaN in all
    of a sample's entries where any of them is NaN (see uniform_share)."""
    nan_or_zero = tl.where(partial == partial, 0.0, partial)
    return partial + tl.sum(tl.sum(nan_or_zero, axis=-1, keep_dims=True), axis=-2, keep_dims=True)


@triton.jit
def jd_layout(J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """(j_valid [BLOCK_J], jd_mask and jd_offsets [BLOCK_J, BLOCK_D] into a contiguous [J, D]):
    which parents and (j, d) are real, and where they sit in s, v and the bias."""
    j = tl.arange(0, BLOCK_J)
    d = tl.arange(0, BLOCK_D)
    j_valid = j < J
    return j_valid, j_valid[:, None] & (d < D)[None, :], j[:, None] * D + d[None, :]


@triton.jit
def _predict_slice(w_rows, w_mask, u_at, u_valid, p, J, D, COMPUTE_DTYPE: tl.constexpr):
    """W[i, :, :, p] u[.., i, p]: one term of predict_tile's sum."""
    w = tl.load(w_rows + p * (J * D), mask=w_mask, other=0.0).to(COMPUTE_DTYPE)
    return w * tl.expand_dims(tl.load(u_at + p, mask=u_valid, other=0.0).to(COMPUTE_DTYPE), (-2, -1))


@triton.jit
def predict_tile(slices_ptr, u_rows, i, I, J, D, P, jd_mask, jd_offsets, COMPUTE_DTYPE: tl.constexpr):
    """u_hat = W u (Eq. 2) for the inputs i [BLOCK_I], read from memory: [BLOCK_I, BLOCK_J, BLOCK_D]
    for one sample (u_rows: a pointer to u[b] [I, P]), [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] for a
    block of samples (u_rows: [BLOCK_B, 1] pointers), each W slice then used for every sample.
    slices_ptr: W as [I, P, J, D], contiguous (_weight_slices in kernels/capsule_linear.py), so
    that a slice W[i, :, :, p] is J D contiguous values, loaded in 16-byte vectors.

    A loop over p adds one slice W[i, :, :, p] u[.., i, p] at a time: the sum over p is plain FMAs
    in each thread's registers (never TF32, no cross-thread reduction), and a tile of u_hat takes
    P times the inputs a tile holding W's [BLOCK_I, J, D, P] could (on one H200 those ran
    BLOCK_I = 2 inputs a loop step and the fused layer 5-8x slower than predict plus routing).
    Padded entries are 0.
    """
    i_valid = i < I
    w_rows = slices_ptr + (i * (P * J * D))[:, None, None] + jd_offsets[None, :, :]
    w_mask = i_valid[:, None, None] & jd_mask[None, :, :]
    u_at = u_rows + i * P
    u_hat = _predict_slice(w_rows, w_mask, u_at, i_valid, 0, J, D, COMPUTE_DTYPE)
    for p in range(1, P):
        u_hat += _predict_slice(w_rows, w_mask, u_at, i_valid, p, J, D, COMPUTE_DTYPE)
    return u_hat
