"""Eager PyTorch versions of squash, prediction and routing, as public CapsNet code writes them.

The one place where Procedure 1 is written the plain way, with the logits b stored and updated.
`bench.py` times these against the project's ops, and the tests use them as autograd oracles
(in float64 they compute the paper's function, so autograd through them is the exact gradient).

- `squash`, `predict`, `routing`: the public-repo style (gram-ai, XifengGuo, danielhavir):
  broadcasting matmul for u_hat, a Python loop with autograd for routing.
- `einsum_predict`, `einsum_routing`: a careful eager version, each contraction one einsum.

Memory traffic, with U = B I J D elements of u_hat and r iterations: each iteration reads u_hat
twice, writes and reads b and c (B I J each) and a temporary of u_hat's size per product;
autograd keeps every iteration's c and b, and the products' operands.
"""

import torch

from .reference.routing import GRADIENT_POLICIES, check_gradient

__all__ = ["squash", "predict", "routing", "einsum_predict", "einsum_routing", "GRADIENT_POLICIES"]


def squash(s):
    """Eq. 1 as gram-ai/capsule-networks writes it: no epsilon, so s = 0 gives NaN (random inputs
    never hit it). Reads s twice and writes two temporaries of its size besides v."""
    squared_norm = (s ** 2).sum(dim=-1, keepdim=True)
    scale = squared_norm / (1 + squared_norm)
    return scale * s / torch.sqrt(squared_norm)


def predict(u, W):
    """u_hat = W u (Eq. 2) by broadcasting matmul: [1, I, J, D, P] @ [B, I, 1, P, 1] materialises
    W expanded to [B, I, J, D, P], as the public repos' `x[None, :, :, None, :] @ W[:, None]` does."""
    return (W.unsqueeze(0) @ u[:, :, None, :, None]).squeeze(-1)           # [B, I, J, D]


def _early(x, gradient):
    """u_hat or the bias as the iterations before the last see it under the gradient policy of
    SPEC section 3: "full" lets the gradient flow through every iteration; "last" detaches them
    in iterations 1..r-1, so that the coupling c^(r) is a constant."""
    return x.detach() if check_gradient(gradient) == "last" and x is not None else x


def routing(u_hat, iterations=3, *, bias=None, gradient="full"):
    """Procedure 1 with autograd through the loop, b stored and updated (`b += u_hat . v`).

    Each iteration but the last writes two temporaries of u_hat's size (c * u_hat, u_hat * v),
    reads u_hat twice, and autograd keeps them. bias: optional [J, D] added to every s.
    """
    early, early_bias = _early(u_hat, gradient), _early(bias, gradient)
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)   # [B, I, J]
    for t in range(iterations):
        seen, seen_bias = (u_hat, bias) if t == iterations - 1 else (early, early_bias)
        c = torch.softmax(b, dim=2)                                        # [B, I, J], over parents
        s = (c.unsqueeze(-1) * seen).sum(dim=1)                            # [B, J, D]
        if bias is not None:
            s = s + seen_bias
        v = squash(s)                                                      # [B, J, D]
        if t < iterations - 1:
            b = b + (seen * v.unsqueeze(1)).sum(dim=-1)                    # [B, I, J]
    return v


def einsum_predict(u, W):
    """u_hat = W u (Eq. 2) as one einsum, the clean way: W is never copied per sample."""
    return torch.einsum("ijdp,bip->bijd", W, u)                            # [B, I, J, D]


def einsum_routing(u_hat, iterations=3, *, bias=None, gradient="full"):
    """Procedure 1 as a careful eager implementation writes it: each contraction one einsum, no
    explicit product of u_hat's size (torch may still copy u_hat to lay out a contraction), and
    autograd keeps every iteration's c and b."""
    early, early_bias = _early(u_hat, gradient), _early(bias, gradient)
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)   # [B, I, J]
    for t in range(iterations):
        seen, seen_bias = (u_hat, bias) if t == iterations - 1 else (early, early_bias)
        c = torch.softmax(b, dim=2)                                        # [B, I, J], over parents
        s = torch.einsum("bij,bijd->bjd", c, seen)                         # [B, J, D]
        if bias is not None:
            s = s + seen_bias
        v = squash(s)                                                      # [B, J, D]
        if t < iterations - 1:
            b = b + torch.einsum("bijd,bjd->bij", seen, v)                 # [B, I, J]
    return v
