"""capsule_linear, the DigitCaps layer fused (prediction Eq. 2, then routing Procedure 1), for
torch tensors: the PyTorch path, the custom ops, the public function.

    v = dynamic_routing(u_hat),  u_hat[b, i, j] = W[i, j] @ u[b, i]
    u [B, I, P], W [I, J, D, P] -> v [B, J, D]

without u_hat [B, I, J, D] (or its gradient) ever in memory. Unfused, a training step at the
MNIST shape moves about nine u_hat-sized tensors (94 MB each in float32 at B = 128; eleven on
the PyTorch path): predict writes u_hat, the routing forward reads it r times, the backward
reads it r - 1 times (the PyTorch path: 2(r - 1), a product over it for dc and one for dV in
each iteration) and writes du_hat, and the prediction's backward reads du_hat twice more.

The PyTorch path is written for CPUs. Routing treats every sample on its own, so it runs over
chunks of samples: for each chunk it computes u_hat from u and W, routes it with the routing
op's PyTorch path, and keeps only v, s_all ([r, B, J, D]) and the couplings that path keeps.
The backward recomputes each chunk's u_hat (under "full"; "last" reads none), gets du_hat from
the routing backward, and turns it at once into du = W^T du_hat and the chunk's share of
dW = sum_b du_hat u^T, added chunk by chunk in order (deterministic). The largest temporaries
are one chunk's u_hat and du_hat.
"""

from typing import Optional

import torch

from ..checks import (autocast_dtype, check_bias, check_differentiation, check_gradient,
                      check_iterations, check_u_and_weight, compute_dtype, differentiable_once, needs_backward,
                      pick_backend, runs_as_function)
from .batching import register_folding_rule
from .routing import (CACHED_ELEMENTS, kept_couplings, routing_backward_last_torch, routing_backward_torch,
                      routing_forward_torch)

__all__ = ["capsule_linear", "predict"]

# Elements of u_hat per chunk of samples, at most: what stays in cache (11 samples at the MNIST
# shape), so that routing takes its per-parent products; each op of a chunk runs on all of
# torch's threads. Measured on a quiet 2-core CPU at B = 128 (docs/PERF.md): chunks of 4, 6 or
# 8 samples ran 1.15-1.3x slower, as every op's thread fork and join and BLAS set-up weigh on
# little work (so did 5 samples per thread, each thread with chunks of its own); chunks of 32
# ran 1.1x slower and grew the peak to 103 MiB, out of cache.
_CHUNK_ELEMENTS = CACHED_ELEMENTS


# ---------------------------------------------------------------------------------------------
# The PyTorch path
# ---------------------------------------------------------------------------------------------

def _chunks(B, sample_elements):
    """Slices of the batch of equal sizes (to one sample), each holding at most _CHUNK_ELEMENTS
    elements of u_hat (one sample where a sample holds more); sample_elements is I J D."""
    count = -(-B // max(1, _CHUNK_ELEMENTS // sample_elements))
    size = max(1, -(-B // max(1, count)))
    return [slice(start, min(start + size, B)) for start in range(0, B, size)]


def predict(u, weight):
    """u_hat[b, i, j] = W[i, j] @ u[b, i] (Eq. 2): u [B, I, P], W [I, J, D, P] -> [B, I, J, D].

    One batched matmul over i, [I, B, P] @ [I, P, J*D] -> [I, B, J*D], instead of B*I*J tiny
    D x P products. The result is returned as a permuted view, not copied: routing reads u_hat
    through its strides, and a contiguous copy would cost one more u_hat-sized buffer (94 MB at
    the MNIST shape, B = 128) and about 4% of a CPU training step.
    u and W are checked as capsule_linear's, but under autocast they may differ in dtype, as the
    operands of any matmul may there.
    """
    check_u_and_weight(u, weight, autocast=True)
    return _predict(u, weight)


def _predict(u, weight, workspace=None):
    """predict without its checks, for the fused path's chunks. workspace: optional 1-D tensor of
    u's dtype and device, at least B I J D elements, that u_hat is written into (and then views)
    instead of fresh memory."""
    in_caps, out_caps, out_dims, in_dims = weight.shape
    weight_rows = weight.reshape(in_caps, out_caps * out_dims, in_dims).transpose(1, 2)  # [I, P, J*D]
    shape = (in_caps, u.shape[0], out_caps * out_dims)
    out = None if workspace is None else workspace[:shape[0] * shape[1] * shape[2]].view(shape)
    per_capsule = torch.bmm(u.transpose(0, 1), weight_rows, out=out)                     # [I, B, J*D]
    return per_capsule.view(in_caps, -1, out_caps, out_dims).transpose(0, 1)             # [B, I, J, D]


def _workspace(B, sample_elements, dtype, device):
    """One buffer for the largest chunk's u_hat, reused by every chunk of a call. Fresh memory
    per chunk costs page faults: on a 2-core CPU, allocating and filling 94 MB took 25 ms
    against 6 ms for refilling a buffer, and the chunks' u_hat and du_hat (8 MiB each) were
    handed back to the system between chunks often enough to cost about 15% of the layer's
    forward and backward (docs/PERF.md, 2026-11-30)."""
    samples = max((chunk.stop - chunk.start for chunk in _chunks(B, sample_elements)), default=0)
    return torch.empty(samples * sample_elements, dtype=dtype, device=device)


def _capsule_linear_forward_torch(u, weight, iterations, bias, gradient, keep):
    B, I, _ = u.shape
    _, J, D, _ = weight.shape
    cdtype = compute_dtype(u.dtype)
    weight = weight.to(cdtype)
    v = u.new_empty((B, J, D))
    s_all = u.new_empty((iterations, B, J, D), dtype=cdtype)
    couplings = kept_couplings(u, B, I, J, iterations, "torch", gradient, keep)
    workspace = _workspace(B, I * J * D, cdtype, u.device)
    for chunk in _chunks(B, I * J * D):
        u_hat = _predict(u[chunk].to(cdtype), weight, workspace)  # [b, I, J, D]
        v[chunk], s_all[:, chunk], _ = routing_forward_torch(u_hat, iterations, bias, gradient, keep,
                                                             couplings[:, chunk])
    return v, s_all, couplings


def _capsule_linear_backward_torch(dv, u, weight, s_all, couplings, gradient):
    B, I, P = u.shape
    _, J, D, _ = weight.shape
    cdtype = s_all.dtype
    weight_c = weight.to(cdtype)
    weight_rows = weight_c.reshape(I, J * D, P)
    du = u.new_empty((B, I, P))
    ds_all = torch.empty_like(s_all)
    # dW accumulated transposed, [I, P, J*D]: each chunk's product then writes rows of J*D, where
    # rows of P ran 3x slower on a 2-core CPU; one transposed copy at the end.
    dW_t = torch.zeros((I, P, J * D), dtype=cdtype, device=u.device)
    du_hat_space = _workspace(B, I * J * D, cdtype, u.device)
    # "last" reads no u_hat (du_hat = c^(r) ds^(r)): its chunks predict none.
    u_hat_space = _workspace(B, I * J * D, cdtype, u.device) if gradient == "full" else None
    for chunk in _chunks(B, I * J * D):
        u_chunk = u[chunk].to(cdtype)                                      # [b, I, P]
        if gradient == "full":
            u_hat = _predict(u_chunk, weight_c, u_hat_space)      # [b, I, J, D]
            du_hat, ds_all[:, chunk] = routing_backward_torch(dv[chunk], u_hat, s_all[:, chunk],
                                                              couplings[:, chunk], gradient,
                                                              workspace=du_hat_space)
        else:
            du_hat, ds_all[:, chunk] = routing_backward_last_torch(dv[chunk], (len(u_chunk), I, J, D), cdtype,
                                                                   s_all[:, chunk], couplings[:, chunk],
                                                                   workspace=du_hat_space)
        du_hat_rows = du_hat.reshape(-1, I, J * D).transpose(0, 1)         # [I, b, J*D]
        du[chunk] = torch.bmm(du_hat_rows, weight_rows).transpose(0, 1)   # W^T du_hat  [b, I, P]
        dW_t.baddbmm_(u_chunk.permute(1, 2, 0), du_hat_rows)                # += (du_hat u^T)^T
    dW = dW_t.view(I, P, J, D).permute(0, 2, 3, 1)                        # [I, J, D, P]
    return du, dW.to(weight.dtype).contiguous(), ds_all


# ---------------------------------------------------------------------------------------------
# Custom ops: one schema, two implementations chosen by `backend`
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("capsnet_triton::capsule_linear_forward", mutates_args=())
def _capsule_linear_forward_op(u: torch.Tensor, weight: torch.Tensor, iterations: int,
                               bias: Optional[torch.Tensor], gradient: str, backend: str,
                               keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # gradient picks the couplings kept for the backward (none without keep: no backward will
    # come); the backward rule reads it too.
    if backend == "triton":
        from capsnet_triton.kernels import capsule_linear_forward
        return capsule_linear_forward(u, weight, iterations, bias, gradient=gradient, keep=keep)
    return _capsule_linear_forward_torch(u, weight, iterations, bias, gradient, keep)


@torch.library.custom_op("capsnet_triton::capsule_linear_backward", mutates_args=())
def _capsule_linear_backward_op(dv: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                                s_all: torch.Tensor, couplings: torch.Tensor, gradient: str,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from capsnet_triton.kernels import capsule_linear_backward
        return capsule_linear_backward(dv, u, weight, s_all, couplings, gradient=gradient)
    return _capsule_linear_backward_torch(dv, u, weight, s_all, couplings, gradient)


@_capsule_linear_forward_op.register_fake
def _(u, weight, iterations, bias, gradient, backend, keep):
    B, I, _ = u.shape
    _, J, D, _ = weight.shape
    return (u.new_empty((B, J, D)), u.new_empty((iterations, B, J, D), dtype=compute_dtype(u.dtype)),
            kept_couplings(u, B, I, J, iterations, backend, gradient, keep))


@_capsule_linear_backward_op.register_fake
def _(dv, u, weight, s_all, couplings, gradient, backend):
    return u.new_empty(u.shape), weight.new_empty(weight.shape), torch.empty_like(s_all)


def _setup_context(ctx, inputs, output):
    u, weight, _, bias, gradient, backend, _ = inputs
    _, s_all, couplings = output
    ctx.save_for_backward(u, weight, s_all, couplings)
    # s_all and the couplings are outputs for the backward alone: without this, autograd would
    # fill a zero gradient for each (11.8 MB of fresh memory for the couplings at B = 128).
    ctx.set_materialize_grads(False)
    ctx.gradient = gradient
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dv, _ds_all_unused, _couplings_unused):
    if dv is None:                     # no gradient reached v (set_materialize_grads above)
        return None, None, None, None, None, None, None
    u, weight, s_all, couplings = ctx.saved_tensors
    du, dW, ds_all = _capsule_linear_backward_op(dv.contiguous(), u, weight, s_all, couplings,
                                                 ctx.gradient, ctx.backend)
    dbias = None if ctx.bias_dtype is None else ds_all.sum(dim=(0, 1)).to(ctx.bias_dtype)
    return du, dW, None, dbias, None, None, None


_capsule_linear_forward_op.register_autograd(_backward, setup_context=_setup_context)
differentiable_once(_capsule_linear_backward_op, "capsule_linear")
# As routing's; W is shared by the samples, and dW sums over them: the backward runs per slice.
register_folding_rule(_capsule_linear_forward_op, (0, None, None, None, None, None, None), (0, 1, 1))
register_folding_rule(_capsule_linear_backward_op, (0, 0, None, 1, 1, None, None), (0, None, 1))


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def _as_autocast_casts(u, weight):
    """u and W checked as predict checks them, then cast as autocast casts a matmul's operands
    where it is on: both to its low dtype, a float64 left alone."""
    check_u_and_weight(u, weight, autocast=True)
    low = autocast_dtype(u)
    if low is None:
        return u, weight
    return tuple(x if x.dtype == torch.float64 else x.to(low) for x in (u, weight))


def capsule_linear(u, weight, iterations=3, *, bias=None, gradient="full", backend=None):
    """The DigitCaps layer fused: v = dynamic_routing(u_hat), u_hat[b, i, j] = W[i, j] @ u[b, i].

    u: [B, I, P] input capsules; weight: W [I, J, D, P], one matrix per (input, parent), in u's
    dtype and on u's device. iterations, bias ([J, D]) and gradient ("full" or "last") are
    dynamic_routing's, and so is backend (None: the Triton kernels for CUDA tensors, the PyTorch
    path otherwise). Differentiable in u, weight and bias; u_hat [B, I, J, D] and its gradient
    are never held whole: the Triton kernels recompute each tile of u_hat they need from u and W,
    and the PyTorch path works through chunks of samples whose u_hat fits a CPU's cache (at most
    2**21 elements: 11 samples at the MNIST shape, so a batch of up to 11 is one chunk). Returns
    v [B, J, D] in u's dtype (half precision is accumulated in float32). Under
    autocast, u and W are first cast as autocast casts predict's matmul (to its low dtype, float64
    left alone), so that the result is dynamic_routing(predict(u, W))'s in dtype too.
    """
    u, weight = _as_autocast_casts(u, weight)
    iterations = check_iterations(iterations)
    check_gradient(gradient)
    # check_bias reads J, D and the device off a [B, I, J, D] tensor: a view of W of that shape.
    check_bias(bias, weight[None, ..., 0], "weight")
    check_differentiation("capsule_linear", u, weight, bias)
    backend = pick_backend(backend, u)
    if backend == "torch" and runs_as_function(u, weight, bias):
        return _capsule_linear_forward_torch(u, weight, iterations, bias, gradient, keep=False)[0]
    v, _, _ = _capsule_linear_forward_op(u, weight, iterations, bias, gradient, backend,
                                         needs_backward(u, weight, bias))
    return v
