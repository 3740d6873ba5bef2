"""Input checks shared by the public ops (capsnet_triton.ops) and the kernel launchers
(capsnet_triton.kernels), so that a mistake gets the same exception and message wherever it is
made: TypeError for a wrong type or dtype, ValueError for a wrong shape or value.

Imports torch and the NumPy reference only (never triton), so that the ops' CPU path works where
triton is absent. The gradient policies are the reference's (SPEC section 3).
"""

import numbers
import os

import torch

from capsnet_triton.reference.routing import GRADIENT_POLICIES, check_gradient

__all__ = ["BACKENDS", "FLOAT_DTYPES", "compute_dtype", "kept_iterations", "interpreting", "check_float_tensor",
           "check_capsules", "check_u_hat", "check_iterations", "check_bias", "check_backend", "pick_backend",
           "GRADIENT_POLICIES", "check_gradient", "check_u_and_weight", "check_differentiation",
           "differentiable_once", "check_positive_int", "check_flag", "autocast_dtype", "needs_backward",
           "runs_as_function", "active_transforms", "autocast_mixes", "nan_rows"]

BACKENDS = ("torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype):
    """float64 is computed in float64; float32, float16 and bfloat16 in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_iterations(iterations, gradient, keep=True):
    """How many iterations' couplings a forward keeps for its backward under the gradient policy:
    c^(2..r) under "full", c^(r) alone under "last", none at r = 1 (c^(1) is the uniform 1/J),
    and none without keep, where no backward will follow (needs_backward).
    Both ops keep them on both paths (capsnet_triton.ops.routing.kept_couplings has the layouts)."""
    if not keep:
        return 0
    return iterations - 1 if gradient == "full" else min(1, iterations - 1)


def nan_rows(ds_first):
    """[B]: 0 for each sample, NaN where its ds^(1) [B, J, D] holds a NaN or inf. The full
    gradient's du_hat gains the term db^(1) V^(1), left out as 0 by V^(1) = 0, but NaN as the
    reference computes it where db^(1) is not finite: for finite u_hat, exactly such a sample (one
    whose first s overflowed, SPEC 7), whose du_hat is then NaN throughout. Both backward paths
    add this to c^(1)'s uniform weight."""
    return (ds_first * 0.0).sum(dim=(1, 2))


def interpreting():
    """True when Triton kernels run through the CPU interpreter: TRITON_INTERPRET read as Triton
    3.6 and 3.9 read it (1, true, on, yes or y, in any case; anything else, or unset, means
    compiled)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def check_float_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    return x


def check_capsules(s, name, dim=-1):
    """s: a float tensor whose axis `dim` (an integer in [-s.dim(), s.dim())) holds the capsules'
    D >= 1 dimensions (any other axis may be empty: no capsules, an empty result)."""
    check_float_tensor(s, name)
    if s.dim() < 1:
        raise ValueError(f"{name} must have at least one axis (the capsule dimension), got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -s.dim() <= dim < s.dim():
        raise ValueError(f"dim must be an integer in [{-s.dim()}, {s.dim() - 1}] for {name} of shape "
                         f"{tuple(s.shape)}, got {dim!r}")
    if s.shape[dim] == 0:
        raise ValueError(f"{name} has capsules of 0 dimensions (axis {dim} of shape {tuple(s.shape)} is empty)")
    return s


def check_u_hat(u_hat):
    """u_hat [B, I, J, D], a float tensor with at least one input capsule, parent and dimension
    (B = 0, an empty batch, gives empty results)."""
    check_float_tensor(u_hat, "u_hat")
    if u_hat.dim() != 4:
        raise ValueError(f"u_hat must have shape [B, I, J, D] (4 axes), got shape {tuple(u_hat.shape)}")
    if min(u_hat.shape[1:]) < 1:
        raise ValueError("u_hat needs at least one input capsule, parent and dimension, "
                         f"got shape {tuple(u_hat.shape)}")
    return u_hat


def check_positive_int(value, name):
    """value as a Python int (NumPy's integers too, as the reference takes them), >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_iterations(iterations, name="iterations"):
    return check_positive_int(iterations, name)


def check_flag(value, name):
    """value, a bool: a string such as "no" would otherwise count as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_bias(bias, u_hat, name="u_hat"):
    """bias [J, D] on u_hat's device, or None. u_hat: a tensor of shape [B, I, J, D] or a view
    of that shape (the fused layer passes one of W's) that error messages call `name`."""
    if bias is None:
        return None
    check_float_tensor(bias, "bias")
    if tuple(bias.shape) != tuple(u_hat.shape[2:]):
        raise ValueError(f"bias must have shape [J, D] = {tuple(u_hat.shape[2:])}, got {tuple(bias.shape)}")
    if bias.device != u_hat.device:
        raise ValueError(f"bias is on {bias.device} but {name} is on {u_hat.device}; "
                         "they must be on one device")
    return bias


def check_backend(backend, name="backend"):
    """backend: None (chosen by device) or one of BACKENDS (the option is called `name`)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name} must be None, 'torch' or 'triton', got {backend!r}")
    return backend


def pick_backend(backend, tensor):
    """backend None -> "triton" for CUDA tensors, "torch" otherwise; a forced "triton" on CPU
    tensors needs the interpreter (on a machine with CUDA, Triton would otherwise fail on the
    CPU pointer with an obscure message)."""
    if check_backend(backend) is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}), or Triton's "
            "interpreter for CPU tensors: set TRITON_INTERPRET=1 before triton is first imported")
    return backend


def autocast_dtype(tensor):
    """The low dtype autocast computes matmuls in on tensor's device, or None where it is off
    (or where the device has no autocast, as 'meta', on which asking would raise)."""
    device_type = tensor.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_mixes(tensor, other_dtype):
    """Whether autocast, on for tensor's device, lets tensor's dtype stand beside other_dtype as
    operands of one matmul or convolution: it casts both to its low dtype, but never a float64."""
    return autocast_dtype(tensor) is not None and torch.float64 not in (tensor.dtype, other_dtype)


def needs_backward(*tensors):
    """Whether autograd may run an op's backward: grad mode is on and one of its tensors (None
    for an absent bias) requires grad. Where not (inference, torch.no_grad), a forward keeps no
    couplings for a backward that cannot come."""
    return torch.is_grad_enabled() and any(t is not None and _requires_grad(t) for t in tensors)


def _unbatched(tensor):
    """tensor without torch.func.vmap's batched wrappers, which hide what the tensor under them
    is: whether it requires grad (they report False) and whether it is dual (torch has no batching
    rule for unpacking a dual tensor)."""
    while torch._C._functorch.is_batchedtensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def _requires_grad(tensor):
    """tensor.requires_grad, seen through vmap's wrappers: the backward that follows vmap reads
    the couplings the forward keeps."""
    return _unbatched(tensor).requires_grad


def active_transforms():
    """The names of torch.func's transforms active around the call (vmap, grad, jvp, ...)."""
    stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)() or ()
    return {interpreter.key().name for interpreter in stack}


def runs_as_function(*tensors):
    """Whether a public op may call its PyTorch path as a plain function instead of its
    torch.library custom op, which then buys nothing: no backward may follow (needs_backward),
    the tensors (None for an absent bias) are torch.Tensor itself or nn.Parameter (a subclass may
    override torch functions or dispatch), and nothing traces, transforms or recasts the call: no
    torch.compile or export, no torch.func transform, no torch function or dispatch mode
    (FakeTensorMode, FlopCounterMode), no torch.jit.trace (which would bake the PyTorch path's
    data-dependent choices into its graph), no autocast. The dispatch costs 25-80 us a call on a
    CPU, a third of squash's time at B = 8 (docs/PERF.md, 2026-11-30, eleventh run)."""
    present = [t for t in tensors if t is not None]
    return (not needs_backward(*present)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in present)
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and not active_transforms()
            and autocast_dtype(present[0]) is None)


def check_differentiation(op, *tensors):
    """Refuse what the ops' autograd rules (reverse mode, registered with torch.library) cannot
    give: forward-mode derivatives, for which torch drops the tangents without a word (jvp,
    jacfwd and dual tensors would get derivatives of 0), and torch.func's reverse-mode transforms,
    which fail deep inside torch (grad, vjp, jacrev). vmap runs, through the ops' folding rules
    (ops/batching.py). Skipped while torch.compile traces, which does not compose the ops with either."""
    if torch.compiler.is_compiling():
        return
    transforms = active_transforms()
    forward_ad = torch.autograd.forward_ad
    dual = forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(_unbatched(t)).tangent is not None for t in tensors)
    if dual or "Jvp" in transforms:
        raise NotImplementedError(f"{op} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
                                  f"torch.autograd.forward_ad); use reverse mode: .backward() or "
                                  f"torch.autograd.grad")
    if "Grad" in transforms:
        raise NotImplementedError(f"{op} does not support torch.func.grad, vjp or jacrev (its autograd rule is "
                                  f"a torch.library custom op's); use .backward() or torch.autograd.grad")


def differentiable_once(backward_op, op):
    """Give an op's backward (a custom op) an autograd rule that refuses its own derivative by
    name: without one, differentiating a gradient taken with create_graph=True fails in torch with
    a message asking for an autograd formula to be registered."""
    def refuse(ctx, *grads):
        raise NotImplementedError(f"{op} is differentiable once: its gradient has no derivative "
                                  f"(a backward through a gradient taken with create_graph=True)")
    backward_op.register_autograd(refuse)


def check_u_and_weight(u, weight, autocast=False):
    """u [B, I, P] and W [I, J, D, P] of capsule_linear: one float dtype, one device, I and P
    agreeing, and every axis but the batch non-empty (B = 0 gives empty results). With autocast
    (for a matmul of the two, where autocast is on), the dtypes may differ as a matmul's operands
    may there: any but float64 beside another."""
    check_float_tensor(u, "u")
    check_float_tensor(weight, "weight")
    if u.dim() != 3:
        raise ValueError(f"u must have shape [B, I, P] (3 axes), got shape {tuple(u.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape [I, J, D, P] (4 axes), got shape {tuple(weight.shape)}")
    if u.shape[1] != weight.shape[0] or u.shape[2] != weight.shape[3]:
        raise ValueError(f"u [B, I, P] = {tuple(u.shape)} does not match weight [I, J, D, P] = "
                         f"{tuple(weight.shape)}: I and P must agree")
    if min(weight.shape) < 1:
        raise ValueError("capsule_linear needs at least one input capsule, input dimension, parent and "
                         f"output dimension, got weight of shape {tuple(weight.shape)}")
    if weight.dtype != u.dtype and not (autocast and autocast_mixes(u, weight.dtype)):
        low = autocast_dtype(u) if autocast else None
        detail = ("" if low is None else f": under autocast only float64 may stand beside float64, as in a matmul "
                                         f"(the other dtypes are cast to {low})")
        raise TypeError(f"weight must have u's dtype {u.dtype}, got {weight.dtype}{detail}")
    if weight.device != u.device:
        raise ValueError(f"weight is on {weight.device} but u is on {u.device}; they must be on one device")
    return u, weight
