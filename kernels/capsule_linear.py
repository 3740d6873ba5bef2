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

Backward kernel B, du and dW as two matrix products over the batch, is in
kernels/capsule_linear_weight.py. Two variants of the forward and of backward kernel A, chosen by
the launchers' `variant=`:
"sample" (in this file), one program per sample for all iterations, which reads all of W once
per sample and iteration, and "split" (the default, kernels/capsule_linear_split.py), one launch
per iteration over (block of BLOCK_B samples, chunk of I), which reads W once per block of
samples and fills a GPU at small batches. The default is the one faster on one H200
(launch.DEFAULT_VARIANT).
"""

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

from . import capsule_linear_split, capsule_linear_weight, routing_split
from .launch import (DEFAULT_VARIANT, block_inputs, check_kept_couplings, check_variant,
                     couplings_pointer, launch_options, max_tile, on_tensor_device, output, outputs, scratch,
                     split_stages, tl_dtype)
from .routing_tiles import (end_iteration, jd_layout, kept_logits_grad, kept_rows, kept_tile, load_bias, predict_tile,
                            s_of_tile, sample_ds)
from .squash import squash_backward

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
        capsule_linear_weight.weight_launch_config(B, J, D, P, u.dtype)
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
    weight_config = capsule_linear_weight.weight_launch_config(B, J, D, P, u.dtype, weight_launch)
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
    capsule_linear_weight.backward_weight(u, weight, ds_all, s_all, couplings, grad_logits, du, dweight,
                                          gradient, weight_config)
    return du, dweight, ds_all
