"""Triton kernels for CapsNet: squash (Eq. 1), fused dynamic routing (Procedure 1), and the
DigitCaps layer fused from u and W (capsule_linear: prediction Eq. 2 and routing, u_hat never stored).

Importing this package imports triton; code outside it imports it lazily. On a machine without
a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
first imported). Each launcher takes torch tensors and returns torch tensors; the autograd
wrappers live in capsnet_triton.ops.
"""

from .capsule_linear import capsule_linear_backward, capsule_linear_forward
from .routing import routing_backward, routing_forward
from .squash import squash_backward, squash_forward

__all__ = ["squash_forward", "squash_backward", "routing_forward", "routing_backward",
           "capsule_linear_forward", "capsule_linear_backward"]
