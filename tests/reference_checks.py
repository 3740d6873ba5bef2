"""Helpers shared by the reference tests: SPEC 8's rules (capsnet_triton.numerics) and a plain
torch routing loop (torch is imported inside, so this module loads without it).
"""

from capsnet_triton.numerics import (FD_TOLERANCE, numerical_gradient, relative_error,  # noqa: F401
                                     sample_indices)


def torch_routing(u_hat, iterations, bias=None, agreement_grad=True):
    """Procedure 1 written the plain way, with logits b stored and updated, in torch.

    agreement_grad=False detaches u_hat inside the agreement u_hat . v only.
    """
    import torch

    from capsnet_triton.baselines import squash

    B, I, J, _ = u_hat.shape
    b = torch.zeros(B, I, J, dtype=u_hat.dtype)
    for t in range(iterations):
        c = torch.softmax(b, dim=2)
        s = (c[..., None] * u_hat).sum(dim=1)
        if bias is not None:
            s = s + bias
        v = squash(s)
        if t < iterations - 1:
            agreeing = u_hat if agreement_grad else u_hat.detach()
            b = b + (agreeing * v[:, None]).sum(dim=-1)
    return v
