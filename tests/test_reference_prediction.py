"""Prediction vectors u_hat = W u (Eq. 2): values and gradients against torch and finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton.reference import prediction_backward, prediction_forward
from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error


@st.composite
def prediction_problems(draw):
    B, I, J, D, P = (draw(st.integers(1, n)) for n in (3, 6, 4, 5, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.normal(size=(B, I, P)), rng.normal(size=(I, J, D, P)), rng.normal(size=(B, I, J, D))


@given(prediction_problems())
def test_each_prediction_is_its_own_matrix_times_its_input(problem):
    u, W, _ = problem
    u_hat, _ = prediction_forward(u, W)
    B, I, J, D = u_hat.shape
    for b, i, j in np.ndindex(B, I, J):
        np.testing.assert_allclose(u_hat[b, i, j], W[i, j] @ u[b, i], rtol=1e-13, atol=1e-13)


@given(prediction_problems())
def test_backward_matches_finite_differences(problem):
    u, W, du_hat = problem
    du, dW = prediction_backward(du_hat, prediction_forward(u, W)[1])
    loss = lambda: np.sum(prediction_forward(u, W)[0] * du_hat)  # noqa: E731
    assert relative_error(du.ravel(), numerical_gradient(loss, u)) <= FD_TOLERANCE
    assert relative_error(dW.ravel(), numerical_gradient(loss, W)) <= FD_TOLERANCE


def test_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    u, W, du_hat = rng.normal(size=(3, 10, 8)), rng.normal(size=(10, 4, 16, 8)), rng.normal(size=(3, 10, 4, 16))
    u_t, W_t = torch.tensor(u, requires_grad=True), torch.tensor(W, requires_grad=True)
    u_hat_t = (W_t[None] @ u_t[:, :, None, :, None]).squeeze(-1)   # [B, I, J, D]
    u_hat_t.backward(torch.tensor(du_hat))
    u_hat, cache = prediction_forward(u, W)
    du, dW = prediction_backward(du_hat, cache)
    assert relative_error(u_hat, u_hat_t.detach().numpy()) <= 1e-12
    assert relative_error(du, u_t.grad.numpy()) <= 1e-12
    assert relative_error(dW, W_t.grad.numpy()) <= 1e-12


def test_bad_shapes_raise(rng):
    with pytest.raises(ValueError, match=r"u must have shape \[B, I, P\]"):
        prediction_forward(rng.normal(size=(3, 8)), rng.normal(size=(3, 2, 4, 8)))
    with pytest.raises(ValueError, match=r"W must have shape \[I, J, D, P\]"):
        prediction_forward(rng.normal(size=(1, 3, 8)), rng.normal(size=(3, 4, 8)))
    with pytest.raises(ValueError, match="I and P must agree"):
        prediction_forward(rng.normal(size=(1, 3, 8)), rng.normal(size=(3, 2, 4, 7)))
    with pytest.raises(ValueError, match="I and P must agree"):
        prediction_forward(rng.normal(size=(1, 5, 8)), rng.normal(size=(3, 2, 4, 8)))
    with pytest.raises(TypeError, match="u must be a floating-point"):
        prediction_forward(np.ones((1, 3, 8), dtype=np.int32), rng.normal(size=(3, 2, 4, 8)))
    with pytest.raises(TypeError, match="W must be a floating-point"):
        prediction_forward(rng.normal(size=(1, 3, 8)), np.ones((3, 2, 4, 8), dtype=np.int64))
    _, cache = prediction_forward(rng.normal(size=(1, 3, 8)), rng.normal(size=(3, 2, 4, 8)))
    with pytest.raises(ValueError, match="du_hat"):
        prediction_backward(np.zeros((1, 3, 2, 5)), cache)


@pytest.mark.parametrize("empty_axis", range(4))
def test_only_the_batch_may_be_empty(rng, empty_axis):
    """SPEC section 7: an empty batch gives empty predictions; any other empty axis is an error."""
    u_hat, _ = prediction_forward(np.zeros((0, 3, 2)), rng.normal(size=(3, 4, 5, 2)))
    assert u_hat.shape == (0, 3, 4, 5)
    shape = [3, 4, 5, 2]
    shape[empty_axis] = 0
    u = np.zeros((2, shape[0], shape[3]))
    with pytest.raises(ValueError, match="needs at least one input capsule"):
        prediction_forward(u, np.zeros(shape))
