"""The PyTorch face of the CapsNet ops: differentiable, dispatching, compile-friendly.

One file per op, each holding, in order, the op's PyTorch path, its torch.library custom-op
registration (`capsnet_triton::*`, fake, autograd and vmap rules, the last from batching.py) and
its public function, which validates its input (with capsnet_triton.checks) and calls the custom
op, so that `torch.compile(..., fullgraph=True)` traces through it as a single node. Where no
backward may follow and nothing traces, transforms or recasts the call (checks.runs_as_function),
the PyTorch path is called as a plain function instead: the op's dispatch would cost 25-80 us.
Each op has two implementations, chosen by `backend`:

- "triton": the fused kernels of `capsnet_triton.kernels` (CUDA tensors; CPU tensors only when
  TRITON_INTERPRET=1 was set before triton was imported);
- "torch": a PyTorch path written for CPUs, with the kernels' memory plan: nothing of u_hat's
  size kept for the backward, only s^(1..r) and the couplings the backward reads, 1/D of u_hat's
  size each (c^(2..r) under gradient="full", c^(r) alone under "last"), and those only where a
  backward may follow (not under torch.no_grad, checks.needs_backward).

`backend=None` picks "triton" for CUDA tensors and "torch" otherwise.
"""

from ..checks import BACKENDS
from .capsule_linear import capsule_linear
from .routing import dynamic_routing
from .squash import squash

__all__ = ["squash", "dynamic_routing", "capsule_linear", "BACKENDS"]
