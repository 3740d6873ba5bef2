"""The DigitCaps layer u, W -> v (prediction then routing): gradients against finite differences
and against torch autograd through the eager baselines, for both gradient policies."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error, sample_indices
from capsnet_triton.reference import capsule_linear_backward, capsule_linear_forward

POLICIES = ("full", "last")


@st.composite
def layer_problems(draw):
    """u [B, I, P], W [I, J, D, P] (B <= 3, I <= 8, J <= 5, D <= 4, P <= 4), r in 1..3, an
    optional bias, dv, and the policy."""
    B, I, J, D, P = (draw(st.integers(1, n)) for n in (3, 8, 5, 4, 4))
    iterations = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u, W = rng.normal(size=(B, I, P)), rng.normal(size=(I, J, D, P)) * draw(st.sampled_from([0.1, 0.5]))
    bias = rng.normal(size=(J, D)) * 0.5 if draw(st.booleans()) else None
    return u, W, iterations, bias, rng.normal(size=(B, J, D)), draw(st.sampled_from(POLICIES)), rng


def gradients(u, W, iterations, bias, dv, gradient):
    """(du, dW, dbias or None) from the reference backward."""
    _, cache = capsule_linear_forward(u, W, iterations, bias=bias, gradient=gradient)
    grads = capsule_linear_backward(dv, cache)
    return grads if bias is not None else (*grads, None)


@given(layer_problems())
def test_full_gradient_matches_finite_differences(problem):
    u, W, iterations, bias, dv, _, rng = problem
    du, dW, dbias = gradients(u, W, iterations, bias, dv, "full")
    # Differenced in long double: where u is tiny (a draw of 4e-5 did it) and a bias carries the
    # loss, W moves the loss by ~1e-11 of ~0.3 per step, and float64 differences would carry
    # ~2e-6 relative rounding error of their own.
    u, W, bias = (None if x is None else x.astype(np.longdouble) for x in (u, W, bias))

    def loss():
        return np.sum(capsule_linear_forward(u, W, iterations, bias=bias)[0] * dv)

    assert relative_error(du.ravel(), numerical_gradient(loss, u)) <= FD_TOLERANCE
    indices = sample_indices(W.shape, rng, 60)
    assert relative_error(dW.ravel()[indices], numerical_gradient(loss, W, indices)) <= FD_TOLERANCE
    if bias is not None:
        assert relative_error(dbias.ravel(), numerical_gradient(loss, bias)) <= FD_TOLERANCE


@given(layer_problems())
def test_matches_torch_autograd_through_the_baselines(problem):
    torch = pytest.importorskip("torch")
    from capsnet_triton import baselines

    u, W, iterations, bias, dv, gradient, _ = problem
    u_t, W_t = torch.tensor(u, requires_grad=True), torch.tensor(W, requires_grad=True)
    bias_t = None if bias is None else torch.tensor(bias, requires_grad=True)
    v_t = baselines.routing(baselines.predict(u_t, W_t), iterations, bias=bias_t, gradient=gradient)
    v_t.backward(torch.tensor(dv))

    v, _ = capsule_linear_forward(u, W, iterations, bias=bias, gradient=gradient)
    du, dW, dbias = gradients(u, W, iterations, bias, dv, gradient)
    assert relative_error(v, v_t.detach().numpy()) <= 1e-12
    assert relative_error(du, u_t.grad.numpy()) <= 1e-12
    assert relative_error(dW, W_t.grad.numpy()) <= 1e-12
    if bias is not None:
        assert relative_error(dbias, bias_t.grad.numpy()) <= 1e-12


def test_bad_input_raises(rng):
    with pytest.raises(ValueError, match="I and P must agree"):
        capsule_linear_forward(rng.normal(size=(2, 6, 3)), rng.normal(size=(6, 4, 5, 2)))
    with pytest.raises(ValueError, match="gradient"):
        capsule_linear_forward(rng.normal(size=(2, 6, 3)), rng.normal(size=(6, 4, 5, 3)), gradient="none")
    _, cache = capsule_linear_forward(rng.normal(size=(2, 6, 3)), rng.normal(size=(6, 4, 5, 3)))
    with pytest.raises(ValueError, match="dv"):
        capsule_linear_backward(np.zeros((2, 4, 4)), cache)
