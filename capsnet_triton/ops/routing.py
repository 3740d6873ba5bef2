"""dynamic_routing (paper Procedure 1) for torch tensors: the PyTorch path, the custom ops, the
public function.

The PyTorch path is written for CPUs. Its forward saves the per-iteration s (s_all,
[r, B, J, D]) and the couplings its backward reads (1/D of u_hat's size per iteration): c^(2..r)
under the "full" gradient policy, c^(r) alone under "last" (see kept_couplings), as the Triton
kernels do (SPEC section 3 lets either recompute them from u_hat instead). On a
CPU, recomputing them cost a wider product over u_hat and a softmax per iteration; keeping them
made forward + backward 15-20% faster at B = 32 and 3-6% at B = 128, and 19-25% under the
"last" policy, whose backward no longer reads u_hat (docs/PERF.md, 2026-11-30). Every
contraction over capsule dims is one batched matrix product against a block-diagonal matrix
built from a [B, T, J, D] tensor, so no contraction builds a temporary of u_hat's size (what
does: the float32 copy of a half-precision u_hat, _as_rows, and off a CPU the first iteration's
test for non-finite samples, _first_s_as_the_reference). These products do
J times the multiply-adds the contraction needs, yet on a CPU at the MNIST shape they beat the
alternatives measured (one bmm per parent over strided views, einsum, multiply-and-sum, a
[B, J, I, D] copy of u_hat, J padded to 16, parents in groups; docs/PERF.md). The exception is
a u_hat small enough to stay in cache and laid out as the prediction writes it, as in the fused
layer's chunks: there the agreements and weighted sums are one product per sample and parent
(see _parent_matrices).

The per-input tensors (logits b, couplings c and their gradients) are laid out [B, T, J, I],
parents before inputs: the softmax's reductions over j then run along whole contiguous rows of
I, several times faster on a CPU than over a last axis of J = 10, and the products take and give
that layout through a transposed operand at no cost.
"""

import math
from typing import Optional

import torch

from ..checks import (check_bias, check_differentiation, check_gradient, check_iterations, check_u_hat, compute_dtype,
                      differentiable_once, kept_iterations, nan_rows, needs_backward, pick_backend,
                      runs_as_function)
from .batching import register_folding_rule
from .squash import squash_backward_torch, squash_forward_torch

__all__ = ["dynamic_routing"]

# Elements of u_hat (8 MiB in float32, 11 samples at the MNIST shape) that stay in a 2-core
# CPU's cache from one product to the next: the fused layer's chunks hold at most this many, and
# routing takes its per-parent products (see _parent_matrices) at most at this size.
CACHED_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------------------------
# The PyTorch path
# ---------------------------------------------------------------------------------------------

def _block_diagonal(x):
    """[B, T, J, D] -> [B, T*J, J*D] with row (t, j) holding x[b, t, j] in columns j*D .. j*D+D-1.

    Multiplying u_hat viewed as [B, I, J*D] by this matrix (or its transpose) performs, for all
    T vectors at once, a contraction over d (or an outer product) separately for each parent j,
    in one batched matrix product that needs no copy of u_hat."""
    B, T, J, D = x.shape
    # Written into zeros, not multiplied by an identity: a NaN or inf in x stays in its block
    # (times 0 it would be NaN in every block of its row, so in every parent of a product).
    out = x.new_zeros((B, T, J, J, D))
    torch.diagonal(out, dim1=2, dim2=3).copy_(x.transpose(2, 3))
    return out.view(B, T * J, J * D)


def _agreement(u3, x, parents=None):
    """sum_d u_hat[b,i,j,d] x[b,j,d] -> [B, J, I], for u3 = u_hat as [B, I, J*D] (and parents,
    see _parent_matrices)."""
    B, J, D = x.shape
    if parents is not None:
        return torch.bmm(parents, x.reshape(B * J, D, 1)).view(B, J, u3.shape[1])
    return torch.bmm(_block_diagonal(x.unsqueeze(1)), u3.transpose(1, 2)).view(B, J, u3.shape[1])


def _weighted_sum(weights, u3, parents=None):
    """sum_i weights[b,j,i] u_hat[b,i,j,d] -> [B, J, D]. With parents, weights is copied where
    its samples and parents do not merge (db's slot of the backward's buffer): [B, J, I], small
    next to the cached u_hat the product reads."""
    B, J, I = weights.shape
    D = u3.shape[2] // J
    if parents is not None:
        return torch.bmm(weights.reshape(B * J, 1, I), parents).view(B, J, D)
    full = torch.bmm(weights, u3)                                          # [B, J, J*D]
    return torch.diagonal(full.view(B, J, J, D), dim1=1, dim2=2).transpose(1, 2)


def _parent_matrices(u3, J):
    """u_hat as [B*J, I, D], one matrix per sample and parent, where that is a view (samples and
    parents merge into one batch axis: the prediction's layout [I, B, J, D] in memory, as in the
    fused layer's chunks, or a single sample) of a CPU u_hat small enough for the cache, else
    None. There a product per sample and parent, at exactly the multiply-adds the contraction
    needs, beat the block-diagonal products by 15-25% (docs/PERF.md, twelfth run); over a larger
    u_hat, read from memory, they lost."""
    B, I, JD = u3.shape
    if (u3.device.type != "cpu" or u3.numel() > CACHED_ELEMENTS or u3.stride(2) != 1
            or (B > 1 and u3.stride(0) != JD)):
        return None
    return u3.view(B, I, J, JD // J).transpose(1, 2).view(B * J, I, JD // J)


def _coupling(logits):
    """The coupling c = softmax over the parents j of logits [B, J, I]: along contiguous rows of
    I, where torch.softmax is faster than over a last axis of J = 10 written out by hand."""
    return torch.softmax(logits, dim=1)


def _as_rows(u_hat):
    """u_hat [B, I, J, D] in the compute dtype, viewed as [B, I, J*D] (a copy only when u_hat is
    half precision or its J and D axes cannot be merged)."""
    B, I, J, D = u_hat.shape
    return u_hat.to(compute_dtype(u_hat.dtype)).reshape(B, I, J * D)


def _first_s_as_the_reference(u3, J):
    """s^(1) [B, J, D] formed as the reference forms it, for u3 = u_hat as [B, I, J*D]: each term
    c u_hat scaled by c = 1/J before the sum (as a product with a vector of 1/J, no temporary of
    u_hat's size), so that a sum which overflows only before the division stays finite; and all
    of a sample's values NaN where its u_hat holds a NaN or inf (SPEC 7: every output of such a
    sample is NaN, even at r = 1). On a CPU it runs only for the samples whose plain sum over I is
    not finite; a sample whose sum still overflows keeps its other parents, as in the reference and
    the kernels."""
    B, I, JD = u3.shape
    s = torch.matmul(u3.transpose(1, 2), u3.new_full((I, 1), 1.0 / J)).view(B, J, JD // J)
    finite = torch.isfinite(u3).flatten(1).all(dim=1)             # [B]
    return torch.where(finite.view(-1, 1, 1), s, torch.nan)


def kept_couplings(like, B, I, J, iterations, backend, gradient, keep=True):
    """A buffer for the couplings a forward keeps for its backward, on like's device in the compute
    dtype: c^(2..r) under the "full" policy and c^(r) alone under "last", none at r = 1
    (checks.kept_iterations), and none without keep (no backward to come); laid out [k, B, J, I]
    on the PyTorch path (parents before inputs, see the module's docstring), [k, B, I, J] as the
    Triton kernels write them. The routing and fused-layer ops' fakes give this too."""
    kept = kept_iterations(iterations, gradient, keep)
    shape = (kept, B, I, J) if backend == "triton" else (kept, B, J, I)
    return like.new_empty(shape, dtype=compute_dtype(like.dtype))


def routing_forward_torch(u_hat, iterations, bias, gradient, keep=True, couplings=None):
    """(v, s_all, couplings): v [B, J, D] in u_hat's dtype; s_all [r, B, J, D] and the couplings
    the gradient policy's backward reads (see kept_couplings; c^(1) is uniform; none without
    keep) in the compute dtype. couplings: optional buffer of that shape and dtype to write them
    into (the fused layer's slice of its own), instead of a new one."""
    B, I, J, D = u_hat.shape
    u3 = _as_rows(u_hat)
    parents = _parent_matrices(u3, J)
    s_all = u3.new_empty((iterations, B, J, D))
    if couplings is None:
        couplings = kept_couplings(u3, B, I, J, iterations, "torch", gradient, keep)
    first_kept = iterations - len(couplings)     # steps t >= first_kept keep theirs, in slot t - first_kept
    v_sum = None                                                   # V = v^(1) + ... + v^(t-1)
    for t in range(iterations):
        if v_sum is None:                                          # b = 0: uniform c = 1/J
            s = u3.sum(dim=1).view(B, J, D) / J
            # Looking at s first is a read by the host: cheap on a CPU, a wait for the device
            # elsewhere. Only the samples whose s is not finite take the reference's form, each
            # on its own (a batched product's rounding depends on how many samples it holds), so
            # that every sample's result is the same whatever another sample holds (SPEC 7).
            if s.device.type != "cpu":
                s = _first_s_as_the_reference(u3, J)
            elif not bool(torch.isfinite(s).all()):
                for row in (~torch.isfinite(s).flatten(1).all(dim=1)).nonzero().flatten().tolist():
                    s[row] = _first_s_as_the_reference(u3[row:row + 1], J)[0]
        else:
            c = _coupling(_agreement(u3, v_sum, parents))                  # [B, J, I]
            if t >= first_kept:
                couplings[t - first_kept].copy_(c)
            s = _weighted_sum(c, u3, parents)                          # [B, J, D]
        if bias is not None:
            s = s + bias.to(s.dtype)
        s_all[t] = s
        v = squash_forward_torch(s)
        v_sum = v if v_sum is None else v_sum + v
    return v.to(u_hat.dtype), s_all, couplings


def _rows_out(workspace, shape):
    """du_hat as `shape`, [B, I, J*D], in the first elements of workspace (a 1-D buffer of the
    compute dtype), or None for fresh memory."""
    return None if workspace is None else workspace[:math.prod(shape)].view(shape)


def routing_backward_torch(dv, u_hat, s_all, couplings, gradient, workspace=None):
    """(du_hat, ds_all) from routing_forward_torch's s_all and couplings; du_hat in workspace's
    first elements when given (see _rows_out)."""
    if gradient == "last":
        return routing_backward_last_torch(dv, u_hat.shape, u_hat.dtype, s_all, couplings, workspace)
    r, B, J, D = s_all.shape
    u3 = _as_rows(u_hat)
    I = u3.shape[1]
    parents = _parent_matrices(u3, J)
    v_all = squash_forward_torch(s_all)                           # [r, B, J, D]
    v_sums = (torch.cumsum(v_all, dim=0) - v_all).transpose(0, 1)  # [B, r, J, D], V^(t)
    ds_all = torch.empty_like(s_all)
    # du_hat = sum_t c^(t) ds^(t) [+ db^(t) V^(t)], as one product over all t at the end, with
    # the weights c^(1..r) then db^(2..r); the loop writes each db^(t) in place.
    weights = u3.new_empty((B, 2 * r - 1, J, I))
    weights[:, 1:r] = couplings.transpose(0, 1)                    # c^(1), uniform, after the loop
    grad_v = dv.to(s_all.dtype)                                    # dL/dv^(t)
    grad_v_sum = torch.zeros_like(grad_v)                          # sum of dV over later t
    for t in reversed(range(r)):
        ds = squash_backward_torch(grad_v, s_all[t])              # [B, J, D]
        ds_all[t] = ds
        if t == 0:
            break                                                  # V^(1) = 0: no agreement
        c = couplings[t - 1]                                       # [B, J, I]
        dc = _agreement(u3, ds, parents)                           # u_hat . ds  [B, J, I]
        # The softmax's backward db = c (e - sum_j c e) with e = dc - sum_j c dc, which changes
        # nothing but rounding (sum_j c = 1). Where a coupling saturates (c -> 1), dc - sum_j c dc
        # alone cancels to the small (1 - c) dc left over and keeps mostly the rounding of the
        # sum; sum_j c e is that rounding, and taking it off leaves errors of the result's size,
        # as measuring dc from the most coupled parent's does (the reference), in 6 passes over
        # [B, J, I] instead of 11 (docs/PERF.md, twelfth run). In place, in db's slot of
        # weights: every new [B, J, I] tensor is fresh memory, which costs more than the
        # arithmetic here.
        db_slot = weights[:, r - 1 + t]
        e = dc.sub_(torch.mul(c, dc, out=db_slot).sum(dim=1, keepdim=True))
        c_e = torch.mul(c, e, out=db_slot)
        db = c_e.addcmul_(c, c_e.sum(dim=1, keepdim=True), value=-1)   # softmax over j
        grad_v_sum = grad_v_sum + _weighted_sum(db, u3, parents)
        grad_v = grad_v_sum
    # c^(1) = 1/J, with checks.nan_rows: a NaN in c^(1)'s weights spreads to all of the sample's
    # du_hat in the product below (NaN times its zeros).
    weights[:, 0] = nan_rows(ds_all[0]).add_(1.0 / J).view(B, 1, 1)
    vectors = torch.cat((ds_all.transpose(0, 1), v_sums[:, 1:]), dim=1)       # [B, T, J, D]
    du3 = torch.bmm(weights.view(B, (2 * r - 1) * J, I).transpose(1, 2), _block_diagonal(vectors),
                    out=_rows_out(workspace, u3.shape))
    return du3.view(u_hat.shape).to(u_hat.dtype), ds_all


def routing_backward_last_torch(dv, shape, dtype, s_all, couplings, workspace=None):
    """(du_hat, ds_all) under the "last" policy, for a u_hat of `shape` [B, I, J, D] and `dtype`:
    c^(r) is a constant, du_hat = c^(r) ds^(r) and ds^(t) = 0 for t < r.

    It reads nothing of u_hat (so the fused layer's backward predicts none) and nothing of the
    earlier iterations but c^(r): one pass to write du_hat (into workspace, see _rows_out)."""
    r, B, J, D = s_all.shape
    I = shape[1]
    if r == 1:
        coupling = s_all.new_full((B, J, I), 1.0 / J)              # c^(1): uniform
    else:
        coupling = couplings[-1]
    ds_all = torch.zeros_like(s_all)
    ds_all[-1] = squash_backward_torch(dv.to(s_all.dtype), s_all[-1])       # [B, J, D]
    du3 = torch.bmm(coupling.transpose(1, 2), _block_diagonal(ds_all[-1].unsqueeze(1)),
                    out=_rows_out(workspace, (B, I, J * D)))
    return du3.view(shape).to(dtype), ds_all


# ---------------------------------------------------------------------------------------------
# Custom ops: one schema, two implementations chosen by `backend`
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("capsnet_triton::routing_forward", mutates_args=())
def _routing_forward_op(u_hat: torch.Tensor, iterations: int, bias: Optional[torch.Tensor],
                        gradient: str, backend: str,
                        keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # gradient picks the couplings kept for the backward (none without keep: no backward will
    # come); the backward rule reads it too.
    if backend == "triton":
        from capsnet_triton.kernels import routing_forward
        return routing_forward(u_hat, iterations, bias, gradient=gradient, keep=keep)
    return routing_forward_torch(u_hat, iterations, bias, gradient, keep)


@torch.library.custom_op("capsnet_triton::routing_backward", mutates_args=())
def _routing_backward_op(dv: torch.Tensor, u_hat: torch.Tensor, s_all: torch.Tensor,
                         couplings: torch.Tensor, gradient: str,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from capsnet_triton.kernels import routing_backward
        return routing_backward(dv, u_hat, s_all, couplings, gradient=gradient)
    return routing_backward_torch(dv, u_hat, s_all, couplings, gradient)


@_routing_forward_op.register_fake
def _(u_hat, iterations, bias, gradient, backend, keep):
    B, I, J, D = u_hat.shape
    v = u_hat.new_empty((B, J, D))
    return (v, u_hat.new_empty((iterations, B, J, D), dtype=compute_dtype(u_hat.dtype)),
            kept_couplings(u_hat, B, I, J, iterations, backend, gradient, keep))


@_routing_backward_op.register_fake
def _(dv, u_hat, s_all, couplings, gradient, backend):
    # Both implementations return a contiguous du_hat whatever u_hat's strides are.
    return u_hat.new_empty(u_hat.shape), torch.empty_like(s_all)


def _setup_context(ctx, inputs, output):
    u_hat, _, bias, gradient, backend, _ = inputs
    _, s_all, couplings = output
    ctx.save_for_backward(u_hat, s_all, couplings)
    # s_all and the couplings are outputs for the backward alone: without this, autograd would
    # fill a zero gradient for each (11.8 MB of fresh memory for the couplings at B = 128).
    ctx.set_materialize_grads(False)
    ctx.gradient = gradient
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dv, _ds_all_unused, _couplings_unused):
    if dv is None:                     # no gradient reached v (set_materialize_grads above)
        return None, None, None, None, None, None
    u_hat, s_all, couplings = ctx.saved_tensors
    du_hat, ds_all = _routing_backward_op(dv.contiguous(), u_hat, s_all, couplings, ctx.gradient,
                                          ctx.backend)
    dbias = None if ctx.bias_dtype is None else ds_all.sum(dim=(0, 1)).to(ctx.bias_dtype)
    return du_hat, None, dbias, None, None, None


_routing_forward_op.register_autograd(_backward, setup_context=_setup_context)
differentiable_once(_routing_backward_op, "dynamic_routing")
# The samples' axis: u_hat's, dv's and du_hat's first, s_all's, ds_all's and the couplings' second.
register_folding_rule(_routing_forward_op, (0, None, None, None, None, None), (0, 1, 1))
register_folding_rule(_routing_backward_op, (0, 0, 1, 1, None, None), (0, 1))


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def dynamic_routing(u_hat, iterations=3, *, bias=None, gradient="full", backend=None):
    """Routing by agreement (paper Procedure 1) from prediction vectors to output capsules.

    u_hat: [B, I, J, D] prediction vectors u_hat[b, i, j] = W[i, j] u[b, i] (Eq. 2).
    iterations: r >= 1 routing iterations (the paper uses 3; r = 1 is uniform coupling 1/J).
    bias: optional [J, D] added to s in every iteration (the official code has one), of any
        float dtype: added in the compute dtype, its gradient returned in its own.
    gradient: "full" (default, as the official code) lets the gradient flow through every
        iteration, agreement included; "last" treats u_hat (and bias) as constants in iterations
        1..r-1, so the coupling c^(r) is a constant and du_hat = c^(r) ds^(r): a cheaper backward
        that needs no pass over the earlier iterations (SPEC section 3).
    backend: None picks the Triton kernels for CUDA tensors and the PyTorch path otherwise;
        "triton" or "torch" forces one (see capsnet_triton.ops).
    Returns v [B, J, D] in u_hat's dtype (half precision is accumulated in float32). A sample
    whose u_hat holds a NaN or inf gets NaN in all of its v; an empty batch gives an empty v.
    """
    check_u_hat(u_hat)
    iterations = check_iterations(iterations)
    check_bias(bias, u_hat)
    check_gradient(gradient)
    check_differentiation("dynamic_routing", u_hat, bias)
    backend = pick_backend(backend, u_hat)
    if backend == "torch" and runs_as_function(u_hat, bias):
        return routing_forward_torch(u_hat, iterations, bias, gradient, keep=False)[0]
    v, _, _ = _routing_forward_op(u_hat, iterations, bias, gradient, backend, needs_backward(u_hat, bias))
    return v
