"""The plain layers around the capsules: convolution, ReLU, fully connected, sigmoid.

Each is `forward(...) -> (out, cache)` and `backward(dout, cache)`, and computes exactly what
the matching torch.nn.functional op computes, with torch's weight layouts:

- conv2d: NCHW, weight [out, in, kh, kw], valid padding, a stride; cross-correlation
      y[n, o, r, c] = b[o] + sum_{i, p, q} w[o, i, p, q] x[n, i, r*stride + p, c*stride + q]
- linear: weight [out, in], y = x W^T + b
- relu: max(0, x); sigmoid: 1 / (1 + e^-x), computed without overflow for any x.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .checks import check_floating

__all__ = [
    "conv2d_forward",
    "conv2d_backward",
    "conv2d_output_size",
    "relu_forward",
    "relu_backward",
    "linear_forward",
    "linear_backward",
    "sigmoid_forward",
    "sigmoid_backward",
]


def _check_dout(dout, shape):
    """dout as an array of the forward output's shape (NumPy would broadcast a wrong one)."""
    dout = np.asarray(dout)
    if dout.shape != shape:
        raise ValueError(f"dout must have shape {shape}, got {dout.shape}")
    return dout


def conv2d_output_size(size, kernel_size, stride=1):
    """Spatial output size of a valid (unpadded) convolution."""
    return (size - kernel_size) // stride + 1


def conv2d_forward(x, weight, bias, stride=1):
    """Valid cross-correlation. x [N, C, H, W], weight [O, C, kh, kw], bias [O] -> [N, O, Ho, Wo].

    The windows are a strided view of x (no copy); tensordot then contracts (C, kh, kw) in one
    BLAS call, which is what makes the reference network trainable in NumPy.
    """
    x, weight, bias = np.asarray(x), np.asarray(weight), np.asarray(bias)
    check_floating(x=x, weight=weight, bias=bias)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [N, C, H, W] (4 axes), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"weight must have shape [O, C, kh, kw] (4 axes), got shape {weight.shape}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[1]}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [O] = ({weight.shape[0]},), got {bias.shape}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    kh, kw = weight.shape[2:]
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the {kh}x{kw} kernel")
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [N, C, Ho, Wo, kh, kw]
    out = np.tensordot(windows, weight, axes=([1, 4, 5], [1, 2, 3]))  # [N, Ho, Wo, O]
    out = out.transpose(0, 3, 1, 2) + bias[:, None, None]          # [N, O, Ho, Wo]
    return out, (x, weight, stride)


def conv2d_backward(dout, cache):
    """(dx [N, C, H, W], dweight [O, C, kh, kw], dbias [O]) for dout [N, O, Ho, Wo].

        dweight[o, i, p, q] = sum_{n, r, c} dout[n, o, r, c] x[n, i, r*stride + p, c*stride + q]
        dx[n, i, r*stride + p, c*stride + q] += sum_o dout[n, o, r, c] w[o, i, p, q]
    """
    x, weight, stride = cache
    kh, kw = weight.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [N, C, Ho, Wo, kh, kw]
    N, _, Ho, Wo = windows.shape[:4]
    dout = _check_dout(dout, (N, weight.shape[0], Ho, Wo))
    dbias = dout.sum(axis=(0, 2, 3))                               # [O]
    dweight = np.tensordot(dout, windows, axes=([0, 2, 3], [0, 2, 3]))  # [O, C, kh, kw]
    dwindows = np.tensordot(dout, weight, axes=([1], [0]))         # [N, Ho, Wo, C, kh, kw]
    dx = np.zeros_like(x, dtype=dwindows.dtype)                    # [N, C, H, W]
    # Scatter each kernel offset back; overlapping windows add, hence the loop over (p, q).
    for p in range(kh):
        for q in range(kw):
            dx[:, :, p:p + stride * Ho:stride, q:q + stride * Wo:stride] += (
                dwindows[:, :, :, :, p, q].transpose(0, 3, 1, 2)   # [N, C, Ho, Wo]
            )
    return dx, dweight, dbias


def relu_forward(x):
    """max(0, x) -> (out, cache)."""
    x = np.asarray(x)
    return np.maximum(x, 0), x > 0


def relu_backward(dout, cache):
    """dx = dout where x > 0, else 0 (torch's choice of 0 at x = 0)."""
    return np.where(cache, _check_dout(dout, cache.shape), 0)


def linear_forward(x, weight, bias):
    """y = x W^T + b. x [N, in], weight [out, in], bias [out] -> (y [N, out], cache)."""
    x, weight, bias = np.asarray(x), np.asarray(weight), np.asarray(bias)
    check_floating(x=x, weight=weight, bias=bias)
    if x.ndim != 2:
        raise ValueError(f"x must have shape [N, in] (2 axes), got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [out, in={x.shape[1]}], got {weight.shape}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [out] = ({weight.shape[0]},), got {bias.shape}")
    return x @ weight.T + bias, (x, weight)                        # [N, out]


def linear_backward(dout, cache):
    """(dx [N, in] = dout W, dweight [out, in] = dout^T x, dbias [out] = sum_n dout)."""
    x, weight = cache
    dout = _check_dout(dout, (x.shape[0], weight.shape[0]))
    return dout @ weight, dout.T @ x, dout.sum(axis=0)


def sigmoid_forward(x):
    """1 / (1 + e^-x), with e^-|x| only, so no overflow for any x -> (y, cache)."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))                                         # in (0, 1]
    y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, y


def sigmoid_backward(dout, cache):
    """dx = dout y (1 - y)."""
    y = cache
    return _check_dout(dout, y.shape) * y * (1.0 - y)
