"""conv2d, relu, linear, sigmoid: identical to torch.nn.functional, gradients against finite
differences and torch autograd (float64)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton.reference import (
    conv2d_backward,
    conv2d_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
)
from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error, sample_indices


@st.composite
def conv_problems(draw):
    """x [N, C, H, W], weight [O, C, kh, kw], bias [O], stride and dout, all small."""
    N, C, O = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = draw(st.integers(kh, 8)), draw(st.integers(kw, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Ho, Wo = (H - kh) // stride + 1, (W - kw) // stride + 1
    return (rng.normal(size=(N, C, H, W)), rng.normal(size=(O, C, kh, kw)), rng.normal(size=O), stride,
            rng.normal(size=(N, O, Ho, Wo)), rng)


@given(conv_problems())
def test_conv2d_is_a_cross_correlation(problem):
    x, weight, bias, stride, dout, _ = problem
    out, _ = conv2d_forward(x, weight, bias, stride)
    assert out.shape == dout.shape
    kh, kw = weight.shape[2:]
    for n, o, r, c in np.ndindex(*out.shape):
        patch = x[n, :, r * stride:r * stride + kh, c * stride:c * stride + kw]
        assert out[n, o, r, c] == pytest.approx(bias[o] + np.sum(weight[o] * patch), rel=1e-12, abs=1e-12)


@given(conv_problems())
def test_conv2d_backward_matches_finite_differences(problem):
    x, weight, bias, stride, dout, rng = problem
    dx, dweight, dbias = conv2d_backward(dout, conv2d_forward(x, weight, bias, stride)[1])
    loss = lambda: np.sum(conv2d_forward(x, weight, bias, stride)[0] * dout)  # noqa: E731
    for analytic, param in ((dx, x), (dweight, weight), (dbias, bias)):
        indices = sample_indices(param.shape, rng, 30)
        assert relative_error(analytic.ravel()[indices], numerical_gradient(loss, param, indices)) <= FD_TOLERANCE


@pytest.mark.parametrize("shape, kernel, stride", [((2, 3, 11, 9), (4, 3, 3, 2), 1), ((2, 4, 20, 20), (6, 4, 9, 9), 2),
                                                   ((1, 2, 7, 8), (3, 2, 2, 3), 3)])
def test_conv2d_matches_torch(rng, shape, kernel, stride):
    torch = pytest.importorskip("torch")
    x, weight, bias = rng.normal(size=shape), rng.normal(size=kernel), rng.normal(size=kernel[0])
    x_t, w_t, b_t = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    out_t = torch.nn.functional.conv2d(x_t, w_t, b_t, stride=stride)
    dout = rng.normal(size=tuple(out_t.shape))
    out_t.backward(torch.tensor(dout))
    out, cache = conv2d_forward(x, weight, bias, stride)
    grads = conv2d_backward(dout, cache)
    assert relative_error(out, out_t.detach().numpy()) <= 1e-12
    for analytic, tensor in zip(grads, (x_t, w_t, b_t)):
        assert relative_error(analytic, tensor.grad.numpy()) <= 1e-12


def test_conv2d_bad_input_raises(rng):
    x, weight, bias = rng.normal(size=(1, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        conv2d_forward(x[0], weight, bias)
    with pytest.raises(ValueError, match=r"\[O, C, kh, kw\]"):
        conv2d_forward(x, weight[0], bias)
    with pytest.raises(ValueError, match="input channels"):
        conv2d_forward(x, rng.normal(size=(3, 1, 3, 3)), bias)
    with pytest.raises(ValueError, match="bias"):
        conv2d_forward(x, weight, bias[:2])
    with pytest.raises(ValueError, match="stride"):
        conv2d_forward(x, weight, bias, stride=0)
    with pytest.raises(ValueError, match="smaller than"):
        conv2d_forward(x[:, :, :2], weight, bias)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        conv2d_forward(np.ones((1, 2, 5, 5), dtype=np.int64), weight, bias)    # would give integers
    _, cache = conv2d_forward(x, weight, bias)
    with pytest.raises(ValueError, match="dout"):
        conv2d_backward(np.zeros((1, 3, 2, 2)), cache)


def test_linear_matches_torch_and_finite_differences(rng):
    torch = pytest.importorskip("torch")
    x, weight, bias = rng.normal(size=(4, 7)), rng.normal(size=(5, 7)), rng.normal(size=5)
    dout = rng.normal(size=(4, 5))
    out, cache = linear_forward(x, weight, bias)
    grads = linear_backward(dout, cache)
    x_t, w_t, b_t = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    out_t = torch.nn.functional.linear(x_t, w_t, b_t)
    out_t.backward(torch.tensor(dout))
    assert relative_error(out, out_t.detach().numpy()) <= 1e-14
    loss = lambda: np.sum(linear_forward(x, weight, bias)[0] * dout)  # noqa: E731
    for analytic, tensor, param in zip(grads, (x_t, w_t, b_t), (x, weight, bias)):
        assert relative_error(analytic, tensor.grad.numpy()) <= 1e-14
        assert relative_error(analytic.ravel(), numerical_gradient(loss, param)) <= FD_TOLERANCE


def test_linear_bad_input_raises(rng):
    with pytest.raises(ValueError, match=r"\[N, in\]"):
        linear_forward(rng.normal(size=7), rng.normal(size=(5, 7)), rng.normal(size=5))
    with pytest.raises(ValueError, match="weight"):
        linear_forward(rng.normal(size=(2, 7)), rng.normal(size=(5, 6)), rng.normal(size=5))
    with pytest.raises(ValueError, match="bias"):
        linear_forward(rng.normal(size=(2, 7)), rng.normal(size=(5, 7)), rng.normal(size=4))
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        linear_forward(rng.normal(size=(2, 7)), np.ones((5, 7), dtype=np.int32), rng.normal(size=5))
    _, cache = linear_forward(rng.normal(size=(2, 7)), rng.normal(size=(5, 7)), rng.normal(size=5))
    with pytest.raises(ValueError, match="dout"):
        linear_backward(np.zeros((2, 4)), cache)
    # A dout NumPy would broadcast to the output's shape is refused too.
    for forward, backward in ((relu_forward, relu_backward), (sigmoid_forward, sigmoid_backward)):
        _, cache = forward(rng.normal(size=(2, 3)))
        with pytest.raises(ValueError, match=r"dout must have shape \(2, 3\), got \(1, 3\)"):
            backward(np.ones((1, 3)), cache)


def test_relu_matches_torch_including_zero(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(3, 8))
    x[0, :3] = 0.0
    dout = rng.normal(size=x.shape)
    x_t = torch.tensor(x, requires_grad=True)
    torch.relu(x_t).backward(torch.tensor(dout))
    out, cache = relu_forward(x)
    assert np.array_equal(out, torch.relu(x_t).detach().numpy())
    assert np.array_equal(relu_backward(dout, cache), x_t.grad.numpy())


def test_sigmoid_matches_torch_and_finite_differences(rng):
    torch = pytest.importorskip("torch")
    x, dout = rng.normal(size=(3, 8)) * 5, rng.normal(size=(3, 8))
    x_t = torch.tensor(x, requires_grad=True)
    torch.sigmoid(x_t).backward(torch.tensor(dout))
    y, cache = sigmoid_forward(x)
    assert relative_error(y, torch.sigmoid(x_t).detach().numpy()) <= 1e-15
    assert relative_error(sigmoid_backward(dout, cache), x_t.grad.numpy()) <= 1e-14
    numeric = numerical_gradient(lambda: np.sum(sigmoid_forward(x)[0] * dout), x)
    assert relative_error(sigmoid_backward(dout, cache).ravel(), numeric) <= FD_TOLERANCE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_never_overflows(dtype):
    x = np.array([-np.finfo(dtype).max, -1e4, -100, 0, 100, 1e4, np.finfo(dtype).max], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = sigmoid_forward(x)
        dx = sigmoid_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and np.isfinite(y).all() and np.isfinite(dx).all()
    assert (np.diff(y) >= 0).all() and y[0] == 0 and y[3] == 0.5 and y[-1] == 1
