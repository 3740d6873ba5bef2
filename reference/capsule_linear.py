"""The DigitCaps layer as one function: prediction vectors (Eq. 2), then routing (Procedure 1).

    u_hat[b, i, j] = W[i, j] @ u[b, i]              u [B, I, P], W [I, J, D, P] -> [B, I, J, D]
    v = routing(u_hat, r)                           -> v [B, J, D]

This is the oracle of the fused `capsule_linear` of the kernels and the PyTorch path, which
compute the same function without ever holding u_hat [B, I, J, D] in memory: they recompute
each u_hat tile from u and W where they need it. Here the two steps are simply composed, so
the reader sees that the fused layer is nothing but prediction followed by routing.
"""

from .prediction import prediction_backward, prediction_forward
from .routing import routing_backward, routing_forward

__all__ = ["capsule_linear_forward", "capsule_linear_backward"]


def capsule_linear_forward(u, W, iterations=3, *, bias=None, gradient="full"):
    """v = routing(W u, iterations) for u [B, I, P], W [I, J, D, P] -> (v [B, J, D], cache).

    bias: optional [J, D] added to s in every routing iteration. gradient: the routing's gradient
    policy of SPEC section 3, "full" or "last" (the cache remembers it).
    """
    u_hat, prediction_cache = prediction_forward(u, W)                     # [B, I, J, D]
    v, routing_cache = routing_forward(u_hat, iterations, bias=bias, gradient=gradient)  # [B, J, D]
    return v, (prediction_cache, routing_cache)


def capsule_linear_backward(dv, cache):
    """(du [B, I, P], dW [I, J, D, P]), or (du, dW, dbias [J, D]) when the forward had a bias,
    for dv = dL/dv [B, J, D]: routing's backward gives du_hat, prediction's turns it into du, dW."""
    prediction_cache, routing_cache = cache
    grads = routing_backward(dv, routing_cache)
    du_hat, dbias = grads if routing_cache["has_bias"] else (grads, None)  # [B, I, J, D], [J, D]
    du, dW = prediction_backward(du_hat, prediction_cache)                 # [B, I, P], [I, J, D, P]
    return (du, dW) if dbias is None else (du, dW, dbias)
