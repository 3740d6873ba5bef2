"""The PyTorch face of squash and dynamic routing: differentiable, dispatching, compile-friendly.

`squash` and `dynamic_routing` validate their input, then call torch.library custom ops
(`capsnet_triton::*`), so `torch.compile(..., fullgraph=True)` traces through them as single
nodes. Each op has two implementations, chosen by `backend`:

- "triton": the fused kernels of `capsnet_triton.kernels` (CUDA tensors; CPU tensors only when
  TRITON_INTERPRET=1 was set before triton was imported);
- "torch": a PyTorch path written for CPUs, with the same memory plan as the kernels: the forward
  saves only the per-iteration s ([r, B, J, D]); the backward recomputes the couplings from u_hat.
  Every contraction over capsule dims is one batched matrix product against a block-diagonal
  matrix built from a [B, J, D] tensor, so no temporary is ever as large as u_hat.

`backend=None` picks "triton" for CUDA tensors and "torch" otherwise.
"""

import os
from typing import Optional

import torch

__all__ = ["squash", "dynamic_routing", "BACKENDS"]

BACKENDS = ("torch", "triton")
_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype):
    """Half and bfloat16 inputs are computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in _HALF else dtype


# ---------------------------------------------------------------------------------------------
# The PyTorch path
# ---------------------------------------------------------------------------------------------

def _norm_and_direction(s):
    """|s| (keepdim) and s / |s| (0 where s = 0) over the last axis, free of overflow and
    underflow: the norm is taken of s / max|s| (see reference/squash.py)."""
    scale = s.abs().amax(dim=-1, keepdim=True)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = s / safe_scale
    t_norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    direction = t / torch.where(t_norm > 0, t_norm, torch.ones_like(t_norm))
    return scale * t_norm, direction


def _f_and_g(n):
    """f(n) = n / (1 + n^2) and g(n) = n f'(n) = n (1 - n^2) / (1 + n^2)^2, written with 1/n for
    n >= 1 so that n^2 never overflows."""
    small, inv, large = _branches(n)
    f = torch.where(large, inv / (1.0 + inv * inv), small / (1.0 + small * small))
    g = torch.where(large, inv * (inv * inv - 1.0) / (1.0 + inv * inv) ** 2,
                    small * (1.0 - small * small) / (1.0 + small * small) ** 2)
    return f, g


def _branches(n):
    """n clamped to [0, 1], 1/n clamped to (0, 1], and the mask n >= 1 that picks between them."""
    return n.clamp(max=1.0), 1.0 / n.clamp(min=1.0), n >= 1.0


def _squash_forward_torch(s):
    """v = |v| s/|s| with |v| = n^2 / (1 + n^2) (Eq. 1 as the paper writes it)."""
    x = s.to(_compute_dtype(s.dtype))
    n, direction = _norm_and_direction(x)
    small, inv, large = _branches(n)
    length = torch.where(large, 1.0 / (1.0 + inv * inv), small * small / (1.0 + small * small))
    return (length * direction).to(s.dtype)


def _squash_backward_torch(dv, s):
    x = s.to(_compute_dtype(s.dtype))
    n, direction = _norm_and_direction(x)
    f, g = _f_and_g(n)
    dv = dv.to(x.dtype)
    radial = (direction * dv).sum(dim=-1, keepdim=True)
    return (f * dv + g * radial * direction).to(s.dtype)


def _block_diagonal(x):
    """[B, T, J, D] -> [B, T*J, J*D] with row (t, j) holding x[b, t, j] in columns j*D .. j*D+D-1.

    Multiplying u_hat viewed as [B, I, J*D] by this matrix (or its transpose) performs, for all
    T vectors at once, a contraction over d (or an outer product) separately for each parent j,
    in one batched matrix product that needs no copy of u_hat."""
    B, T, J, D = x.shape
    eye = torch.eye(J, dtype=x.dtype, device=x.device)
    return (x.unsqueeze(3) * eye.view(1, 1, J, J, 1)).reshape(B, T * J, J * D)


def _agreement(u3, x):
    """sum_d u_hat[b,i,j,d] x[b,t,j,d] -> [B, I, T, J], for u3 = u_hat as [B, I, J*D]."""
    B, T, J, _ = x.shape
    return torch.bmm(u3, _block_diagonal(x).transpose(1, 2)).view(B, -1, T, J)


def _weighted_sum(weights, u3, J):
    """sum_i weights[b,i,t,j] u_hat[b,i,j,d] -> [B, T, J, D]."""
    B, I, T, _ = weights.shape
    full = torch.bmm(weights.reshape(B, I, T * J).transpose(1, 2), u3)      # [B, T*J, J*D]
    return torch.diagonal(full.view(B, T, J, J, -1), dim1=2, dim2=3).transpose(2, 3)


def _coupling(logits):
    """softmax over the parents j (the last axis) of logits. Written out because
    torch.softmax on CPU over an axis of 10 runs about 6x slower than these three passes."""
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def _as_rows(u_hat):
    """u_hat [B, I, J, D] in the compute dtype, viewed as [B, I, J*D] (a copy only when u_hat is
    half precision or its J and D axes cannot be merged)."""
    B, I, J, D = u_hat.shape
    return u_hat.to(_compute_dtype(u_hat.dtype)).reshape(B, I, J * D)


def _routing_forward_torch(u_hat, iterations, bias):
    B, I, J, D = u_hat.shape
    u3 = _as_rows(u_hat)
    s_all = u3.new_empty((iterations, B, J, D))
    v_sum = None                                                   # V = v^(1) + ... + v^(t-1)
    for t in range(iterations):
        if v_sum is None:                                          # b = 0: uniform c = 1/J
            s = u3.sum(dim=1).view(B, J, D) / J
        else:
            coupling = _coupling(_agreement(u3, v_sum.unsqueeze(1)))       # [B, I, 1, J]
            s = _weighted_sum(coupling, u3, J).squeeze(1)          # [B, J, D]
        if bias is not None:
            s = s + bias.to(s.dtype)
        s_all[t] = s
        v = _squash_forward_torch(s)
        v_sum = v if v_sum is None else v_sum + v
    return v.to(u_hat.dtype), s_all


def _routing_backward_torch(dv, u_hat, s_all, agreement_grad):
    r, B, J, D = s_all.shape
    u3 = _as_rows(u_hat)
    v_all = _squash_forward_torch(s_all)                           # [r, B, J, D]
    v_sums = (torch.cumsum(v_all, dim=0) - v_all).transpose(0, 1)  # [B, r, J, D], V^(t)
    # The couplings of iterations 2..r, recomputed in one product (the first is uniform).
    couplings = _coupling(_agreement(u3, v_sums[:, 1:])) if r > 1 else None
    ds_all = torch.empty_like(s_all)
    dlogits = []                                                   # db^(t), t = r .. 2
    grad_v = dv.to(s_all.dtype)                                    # dL/dv^(t)
    grad_v_sum = torch.zeros_like(grad_v)                          # sum of dV over later t
    for t in reversed(range(r)):
        ds = _squash_backward_torch(grad_v, s_all[t])              # [B, J, D]
        ds_all[t] = ds
        if t == 0:
            break                                                  # V^(1) = 0: no agreement
        c = couplings[:, :, t - 1]                                 # [B, I, J]
        dc = _agreement(u3, ds.unsqueeze(1)).squeeze(2)            # [B, I, J]
        db = c * (dc - (c * dc).sum(dim=-1, keepdim=True))         # softmax over j
        dlogits.append(db)
        grad_v_sum = grad_v_sum + _weighted_sum(db.unsqueeze(2), u3, J).squeeze(1)
        grad_v = grad_v_sum
    # du_hat = sum_t c^(t) ds^(t) [+ db^(t) V^(t)], as one product over all t.
    uniform = u3.new_full((B, u3.shape[1], 1, J), 1.0 / J)
    weights = [uniform] + ([couplings] if r > 1 else [])
    vectors = [ds_all.transpose(0, 1)]
    if agreement_grad and r > 1:
        weights.append(torch.stack(dlogits[::-1], dim=2))          # [B, I, r-1, J]
        vectors.append(v_sums[:, 1:])
    weights = torch.cat(weights, dim=2)                            # [B, I, T, J]
    vectors = torch.cat(vectors, dim=1)                            # [B, T, J, D]
    du3 = torch.bmm(weights.reshape(B, -1, weights.shape[2] * J), _block_diagonal(vectors))
    return du3.view(u_hat.shape).to(u_hat.dtype), ds_all


# ---------------------------------------------------------------------------------------------
# Custom ops: one schema, two implementations chosen by `backend`
# ---------------------------------------------------------------------------------------------

def _kernels():
    from capsnet_triton.kernels import routing, squash as squash_kernels
    return routing, squash_kernels


@torch.library.custom_op("capsnet_triton::squash_forward", mutates_args=())
def _squash_forward_op(s: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels()[1].squash_forward(s)
    return _squash_forward_torch(s)


@torch.library.custom_op("capsnet_triton::squash_backward", mutates_args=())
def _squash_backward_op(dv: torch.Tensor, s: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels()[1].squash_backward(dv, s)
    return _squash_backward_torch(dv, s)


@_squash_forward_op.register_fake
def _(s, backend):
    return torch.empty_like(s)


@_squash_backward_op.register_fake
def _(dv, s, backend):
    return torch.empty_like(s)


def _squash_setup_context(ctx, inputs, output):
    s, backend = inputs
    ctx.save_for_backward(s)
    ctx.backend = backend


def _squash_backward_rule(ctx, dv):
    (s,) = ctx.saved_tensors
    return _squash_backward_op(dv.contiguous(), s, ctx.backend), None


_squash_forward_op.register_autograd(_squash_backward_rule, setup_context=_squash_setup_context)


@torch.library.custom_op("capsnet_triton::routing_forward", mutates_args=())
def _routing_forward_op(u_hat: torch.Tensor, iterations: int, bias: Optional[torch.Tensor],
                        agreement_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # agreement_grad is unused here; it is an input so that the backward rule can read it.
    if backend == "triton":
        v, s_all = _kernels()[0].routing_forward(u_hat, iterations, bias)
        return v, s_all
    return _routing_forward_torch(u_hat, iterations, bias)


@torch.library.custom_op("capsnet_triton::routing_backward", mutates_args=())
def _routing_backward_op(dv: torch.Tensor, u_hat: torch.Tensor, s_all: torch.Tensor,
                         agreement_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels()[0].routing_backward(dv, u_hat, s_all, agreement_grad=agreement_grad)
    return _routing_backward_torch(dv, u_hat, s_all, agreement_grad)


@_routing_forward_op.register_fake
def _(u_hat, iterations, bias, agreement_grad, backend):
    B, _, J, D = u_hat.shape
    v = u_hat.new_empty((B, J, D))
    return v, u_hat.new_empty((iterations, B, J, D), dtype=_compute_dtype(u_hat.dtype))


@_routing_backward_op.register_fake
def _(dv, u_hat, s_all, agreement_grad, backend):
    # Both implementations return a contiguous du_hat whatever u_hat's strides are.
    return u_hat.new_empty(u_hat.shape), torch.empty_like(s_all)


def _routing_setup_context(ctx, inputs, output):
    u_hat, _, bias, agreement_grad, backend = inputs
    _, s_all = output
    ctx.save_for_backward(u_hat, s_all)
    ctx.agreement_grad = agreement_grad
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _routing_backward_rule(ctx, dv, _ds_all_unused):
    u_hat, s_all = ctx.saved_tensors
    du_hat, ds_all = _routing_backward_op(dv.contiguous(), u_hat, s_all, ctx.agreement_grad,
                                          ctx.backend)
    dbias = None if ctx.bias_dtype is None else ds_all.sum(dim=(0, 1)).to(ctx.bias_dtype)
    return du_hat, None, dbias, None, None


_routing_forward_op.register_autograd(_routing_backward_rule, setup_context=_routing_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def _pick_backend(backend, tensor):
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}), or Triton's "
            "interpreter for CPU tensors: set TRITON_INTERPRET=1 before triton is first imported")
    return backend


def _check_floating(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")


def squash(s, dim=-1, *, backend=None):
    """Squash (paper Eq. 1) over `dim`: v = s |s| / (1 + |s|^2).

    Exact (no epsilon), 0 -> 0 with gradient exactly 0, overflow-safe. Half and bfloat16 inputs
    are computed in float32 and returned in their own dtype.
    """
    _check_floating(s, "s")
    if s.dim() == 0:
        raise ValueError("s must have at least one axis (the capsule dimension), got a scalar")
    backend = _pick_backend(backend, s)
    moved = s.movedim(dim, -1)
    return _squash_forward_op(moved.contiguous(), backend).movedim(-1, dim)


def dynamic_routing(u_hat, iterations=3, *, backend=None, bias=None, agreement_grad=True):
    """Routing by agreement (paper Procedure 1) from prediction vectors to output capsules.

    u_hat: [B, I, J, D] prediction vectors u_hat[b, i, j] = W[i, j] u[b, i] (Eq. 2).
    iterations: r >= 1 routing iterations (the paper uses 3; r = 1 is uniform coupling 1/J).
    bias: optional [J, D] added to s in every iteration (the official code has one).
    agreement_grad: True (default, as the official code) lets the gradient flow through every
        iteration including the agreement b += u_hat . v; False is the common variant that
        treats u_hat as a constant inside the agreement, so that the gradient reaches u_hat only
        through s = sum_i c_ij u_hat_ij of each iteration.
    Returns v [B, J, D] in u_hat's dtype (half precision is accumulated in float32).
    """
    _check_floating(u_hat, "u_hat")
    if u_hat.dim() != 4:
        raise ValueError(f"u_hat must have shape [B, I, J, D] (4 axes), got shape {tuple(u_hat.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if bias is not None:
        _check_floating(bias, "bias")
        if tuple(bias.shape) != tuple(u_hat.shape[2:]):
            raise ValueError(f"bias must have shape [J, D] = {tuple(u_hat.shape[2:])}, "
                             f"got {tuple(bias.shape)}")
        if bias.device != u_hat.device:
            raise ValueError(f"bias is on device {bias.device} but u_hat is on device {u_hat.device}; "
                             "they must be on the same device")
    backend = _pick_backend(backend, u_hat)
    v, _ = _routing_forward_op(u_hat, iterations, bias, bool(agreement_grad), backend)
    return v
