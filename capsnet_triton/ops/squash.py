"""squash (paper Eq. 1) for torch tensors: the PyTorch path, the custom ops, the public function.

The PyTorch path computes in float32 for half-precision inputs and follows SPEC section 2's
numerics like the reference: no epsilon, 0 -> 0 with gradient 0, no overflow (the norm is taken
of s / max|s|, and every function of n = |s| is written with 1/n for n >= 1). On a CPU, for
every capsule whose squared norm can neither overflow nor lose bits to underflow, the norm is
taken of s directly, one pass instead of five, with the same result to rounding; the other
capsules alone take the scaled path.
"""

import torch

from ..checks import (check_capsules, check_differentiation, compute_dtype, differentiable_once, pick_backend,
                      runs_as_function)
from .batching import register_folding_rule

__all__ = ["squash", "squash_forward_torch", "squash_backward_torch"]


# ---------------------------------------------------------------------------------------------
# The PyTorch path
# ---------------------------------------------------------------------------------------------

def _scaled_norm_and_direction(s):
    """|s| (keepdim) and s / |s| (0 where s = 0) over the last axis, free of overflow and
    underflow: the norm is taken of s / max|s| (see reference/squash.py)."""
    scale = s.abs().amax(dim=-1, keepdim=True)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = s / safe_scale
    t_norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    direction = t / torch.where(t_norm > 0, t_norm, torch.ones_like(t_norm))
    return scale * t_norm, direction


def _dot_last(a, b):
    """sum over the last axis of a * b, keepdim. On a CPU as a matrix-vector product with ones:
    torch's reduction over a short contiguous axis (D = 8 or 16) runs about 1.5x slower there
    than the multiply and BLAS's GEMV together. Elsewhere a plain sum, which cannot be routed
    through TF32 matmuls."""
    product = a * b
    if product.device.type != "cpu":
        return product.sum(dim=-1, keepdim=True)
    return (product @ product.new_ones(product.shape[-1])).unsqueeze(-1)


def _per_capsule(x, direct, scaled, *others):
    """direct(x, n, n^2, *others) where it is exact, scaled(x, *others) for the other capsules.

    The one-pass norm n = |s| (torch's, which writes no temporary of s's size: at B = 32 the
    forward ran 1.4x faster than with s . s as a product and a sum) and n^2 = n n are safe for a
    capsule whose n^2 lies in [tiny / eps, sqrt(max)] of the dtype: no square lost bits to
    underflow and n^2 is far from overflow, so f(n) = n / (1 + n^2) and h(n) = 2 f(n) / (1 + n^2)
    can be computed as written, exact to rounding like the scaled forms. (Neither forms
    (1 + n^2)^2, so max would do as the upper bound; capsules past sqrt(max) are rare enough that
    the margin costs nothing.)
    The capsules outside that range (zero, tiny, huge, NaN or inf ones) are recomputed by the
    scaled form, rows of x (and of `others`) alone, so each capsule's result depends on it alone.
    Finding them is a read by the host: off a CPU it would wait for the device, so there the
    scaled form runs everywhere."""
    if x.numel() == 0 or x.device.type != "cpu":
        return scaled(x, *others)
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    n_sq = n * n
    info = torch.finfo(x.dtype)
    low, high = info.tiny / info.eps, info.max ** 0.5
    out = direct(x, n, n_sq, *others)
    smallest, largest = (bound.item() for bound in torch.aminmax(n_sq))   # NaN if any is NaN
    if not (smallest >= low and largest <= high):       # the mask costs more than this check
        rows = ~((n_sq >= low) & (n_sq <= high)).squeeze(-1)
        out[rows] = scaled(x[rows], *(other[rows] for other in others))
    return out


def _branches(n):
    """n clamped to [0, 1], 1/n clamped to (0, 1], and the mask n >= 1 that picks between them."""
    return n.clamp(max=1.0), 1.0 / n.clamp(min=1.0), n >= 1.0


def _f_and_h(n):
    """f(n) = n / (1 + n^2) and h(n) = d|v|/dn = 2n / (1 + n^2)^2, written with 1/n for n >= 1
    so that n^2 never overflows (see reference/squash.py for why h, not n f')."""
    small, inv, large = _branches(n)
    small_sq, inv_sq = small * small, inv * inv
    f = torch.where(large, inv / (1.0 + inv_sq), small / (1.0 + small_sq))
    h = torch.where(large, 2.0 * inv * inv_sq / (1.0 + inv_sq) ** 2,
                    2.0 * small / (1.0 + small_sq) ** 2)
    return f, h


def _forward_direct(x, n, n_sq):
    return x * (n / (1.0 + n_sq))


def _forward_scaled(x):
    """length times the direction of the scaled norm, right where |s| itself overflows."""
    n, direction = _scaled_norm_and_direction(x)
    small, inv, large = _branches(n)
    length = torch.where(large, 1.0 / (1.0 + inv * inv), small * small / (1.0 + small * small))
    return length * direction


def squash_forward_torch(s):
    """v = |v| s/|s| with |v| = n^2 / (1 + n^2) (Eq. 1 as the paper writes it), over the last axis:
    s f(n), two passes over s, for every capsule whose one-pass norm is safe (see _per_capsule)."""
    x = s.to(compute_dtype(s.dtype))
    return _per_capsule(x, _forward_direct, _forward_scaled).to(s.dtype)


def _ds(direction, f, h, dv):
    """f(n) (dv - (s_hat . dv) s_hat) + h(n) (s_hat . dv) s_hat: the tangential and radial parts
    apart, since their sum cancels for a radial dv (see reference/squash.py)."""
    radial_part = _dot_last(direction, dv) * direction
    return torch.addcmul(h * radial_part, f, dv - radial_part)


def _backward_direct(x, n, n_sq, dv):
    f = n / (1.0 + n_sq)
    return _ds(x / n, f, 2.0 * f / (1.0 + n_sq), dv)


def _backward_scaled(x, dv):
    n, direction = _scaled_norm_and_direction(x)
    return _ds(direction, *_f_and_h(n), dv)


def squash_backward_torch(dv, s):
    """ds over the last axis, in s's dtype (see _ds and _per_capsule)."""
    x = s.to(compute_dtype(s.dtype))
    return _per_capsule(x, _backward_direct, _backward_scaled, dv.to(x.dtype)).to(s.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops: one schema, two implementations chosen by `backend`
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("capsnet_triton::squash_forward", mutates_args=())
def _squash_forward_op(s: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from capsnet_triton.kernels import squash_forward
        return squash_forward(s)
    return squash_forward_torch(s)


@torch.library.custom_op("capsnet_triton::squash_backward", mutates_args=())
def _squash_backward_op(dv: torch.Tensor, s: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from capsnet_triton.kernels import squash_backward
        return squash_backward(dv, s)
    return squash_backward_torch(dv, s)


@_squash_forward_op.register_fake
def _(s, backend):
    return torch.empty_like(s)


@_squash_backward_op.register_fake
def _(dv, s, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, backend = inputs
    ctx.save_for_backward(s)
    ctx.backend = backend


def _backward(ctx, dv):
    (s,) = ctx.saved_tensors
    return _squash_backward_op(dv.contiguous(), s, ctx.backend), None


_squash_forward_op.register_autograd(_backward, setup_context=_setup_context)
differentiable_once(_squash_backward_op, "squash")
# Each capsule on its own: the vmapped axis is one more leading axis of capsules.
register_folding_rule(_squash_forward_op, (0, None), 0, new_axis=True)
register_folding_rule(_squash_backward_op, (0, 0, None), 0, new_axis=True)


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def squash(s, dim=-1, *, backend=None):
    """Squash (paper Eq. 1) over `dim`: v = s |s| / (1 + |s|^2).

    Exact (no epsilon), 0 -> 0 with gradient exactly 0, overflow-safe. Half and bfloat16 inputs
    are computed in float32 and returned in their own dtype. A capsule holding a NaN or inf gives
    NaN in all of its outputs; no capsules (an empty axis other than `dim`) give an empty result.
    backend: None picks the Triton kernels for CUDA tensors and the PyTorch path otherwise;
    "triton" or "torch" forces one (see capsnet_triton.ops).
    """
    check_capsules(s, "s", dim)
    check_differentiation("squash", s)
    backend = pick_backend(backend, s)
    last = dim in (-1, s.ndim - 1)             # the common case, without two no-op view calls
    x = (s if last else s.movedim(dim, -1)).contiguous()
    v = squash_forward_torch(x) if backend == "torch" and runs_as_function(s) else _squash_forward_op(x, backend)
    return v if last else v.movedim(-1, dim)
