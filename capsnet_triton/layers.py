"""The capsule layers of the MNIST CapsNet (paper Section 4) as torch modules.

PrimaryCaps (convolutional capsules, squashed), DigitCaps (prediction vectors, Eq. 2, then
routing by agreement, Procedure 1; fused into capsule_linear by default) and the reconstruction
Decoder (Section 4.1). The maths lives in `capsnet_triton.ops`; these modules own the
parameters and the reshapes.
"""

import torch
from torch import nn

from .checks import (autocast_dtype, check_backend, check_flag, check_float_tensor, check_gradient,
                     check_iterations, check_positive_int)
from .ops import capsule_linear, dynamic_routing, squash
from .ops.capsule_linear import predict

__all__ = ["PrimaryCaps", "DigitCaps", "Decoder", "predict"]


class PrimaryCaps(nn.Module):
    """Convolutional capsules: one conv gives `types * dims` channels, grouped into capsules.

    Input [B, C, H, W] -> u [B, I, P] with I = types * h * w and P = dims, squashed (Eq. 1).
    Capsule (type t, row y, col x) is channels t*dims .. t*dims + dims - 1 at (y, x), and its
    index is i = t*h*w + y*w + x (SPEC section 5). Reshaping the NCHW output straight to
    [B, I, P] would mix positions into one capsule, hence the permute.
    """

    def __init__(self, in_channels, types=32, dims=8, kernel_size=9, stride=2):
        super().__init__()
        self.types, self.dims = types, dims
        self.conv = nn.Conv2d(in_channels, types * dims, kernel_size, stride=stride)

    def forward(self, x):
        out = self.conv(x)                                              # [B, T*P, h, w]
        batch, _, h, w = out.shape
        out = out.view(batch, self.types, self.dims, h, w)              # [B, T, P, h, w]
        out = out.permute(0, 1, 3, 4, 2)                                # [B, T, h, w, P]
        return squash(out.reshape(batch, self.types * h * w, self.dims))  # [B, I, P]


class DigitCaps(nn.Module):
    """Prediction vectors u_hat[b, i, j] = W[i, j] @ u[b, i] (Eq. 2), routed to v [B, J, D].

    weight: W [I, J, D, P], one matrix per (input capsule, parent), initialised N(0, 0.01^2).
    bias: True adds a learned [J, D] bias to every routing iteration's s (zeros at start; off by
    default so the network has the paper's parameter count). `gradient` ("full" or "last", SPEC section 3)
    and `backend` are passed to the op (see `dynamic_routing` for the gradient policies).
    fused: True (default) runs the layer as `capsule_linear`, which never holds u_hat [B, I, J, D]
    in memory; False computes u_hat with `predict` and routes it with `dynamic_routing`: the same
    function, for comparison and, on a GPU, for speed (the fused Triton kernels are still slower
    there; README, "Use it").
    """

    def __init__(self, in_caps, in_dims, out_caps, out_dims, routing_iterations=3,
                 gradient="full", bias=False, backend=None, fused=True):
        super().__init__()
        for name, size in (("in_caps", in_caps), ("in_dims", in_dims), ("out_caps", out_caps), ("out_dims", out_dims)):
            check_positive_int(size, name)
        self.routing_iterations = check_iterations(routing_iterations, "routing_iterations")
        self.gradient = check_gradient(gradient)
        self.backend = check_backend(backend)      # here, not at the first forward
        self.fused = check_flag(fused, "fused")
        check_flag(bias, "bias")
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dims, in_dims))
        self.bias = nn.Parameter(torch.zeros(out_caps, out_dims)) if bias else None
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, u):
        check_float_tensor(u, "u")
        in_caps, out_caps, out_dims, in_dims = self.weight.shape
        if u.ndim != 3 or u.shape[1:] != (in_caps, in_dims):
            raise ValueError(
                f"DigitCaps expects u of shape [B, I, P] = [B, {in_caps}, {in_dims}], got {list(u.shape)}"
            )
        if self.fused:
            weight, low = self.weight, autocast_dtype(u)
            if low is not None:
                # As autocast casts the unfused path's matmul: both operands to its low dtype
                # (float64 left alone), so that the two paths compute in, and return, one dtype.
                u, weight = (x if x.dtype == torch.float64 else x.to(low) for x in (u, weight))
            return capsule_linear(u, weight, self.routing_iterations, bias=self.bias,
                                  gradient=self.gradient, backend=self.backend)
        u_hat = predict(u, self.weight)                                 # [B, I, J, D]
        return dynamic_routing(u_hat, self.routing_iterations, bias=self.bias,
                               gradient=self.gradient, backend=self.backend)

    def extra_repr(self):
        in_caps, out_caps, out_dims, in_dims = self.weight.shape
        return (f"in_caps={in_caps}, in_dims={in_dims}, out_caps={out_caps}, out_dims={out_dims}, "
                f"routing_iterations={self.routing_iterations}, gradient={self.gradient!r}, "
                f"bias={self.bias is not None}, fused={self.fused}")


class Decoder(nn.Module):
    """Reconstruction decoder (Section 4.1): FC ReLU -> FC ReLU -> FC sigmoid.

    Input: the flattened capsules [B, J*D] with every capsule but one masked to zero.
    Output: [B, out_features] pixel intensities in (0, 1).
    """

    def __init__(self, in_features, hidden=(512, 1024), out_features=784):
        super().__init__()
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__len__") or len(hidden) != 2:
            raise ValueError(f"hidden must give the widths of the two hidden layers, got {hidden!r}")
        for name, width in (("in_features", in_features), ("hidden[0]", hidden[0]), ("hidden[1]", hidden[1]),
                            ("out_features", out_features)):
            check_positive_int(width, name)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], out_features)

    def forward(self, masked):
        hidden = torch.relu(self.fc1(masked))                           # [B, hidden[0]]
        hidden = torch.relu(self.fc2(hidden))                           # [B, hidden[1]]
        return torch.sigmoid(self.fc3(hidden))                          # [B, out_features]
