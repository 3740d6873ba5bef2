"""The capsule layers of the MNIST CapsNet (paper Section 4) as torch modules.

PrimaryCaps (convolutional capsules, squashed), DigitCaps (prediction vectors, Eq. 2, then
routing by agreement, Procedure 1; fused into capsule_linear by default) and the reconstruction
Decoder (Section 4.1). The maths lives in `capsnet_triton.ops`; these modules own the
parameters and the reshapes. `recomputed_convolutions` runs Conv1, its ReLU and PrimaryCaps'
convolution keeping none of their activations for the backward (the model uses it on a CPU).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (active_transforms, check_backend, check_flag, check_float_tensor, check_gradient,
                     check_iterations, check_positive_int)
from .ops import capsule_linear, dynamic_routing, squash
from .ops.capsule_linear import predict

__all__ = ["PrimaryCaps", "DigitCaps", "Decoder", "predict", "recomputed_convolutions"]


class PrimaryCaps(nn.Module):
    """Convolutional capsules: one conv gives `types * dims` channels, grouped into capsules.

    Input [B, C, H, W] -> u [B, I, P] with I = types * h * w and P = dims, squashed (Eq. 1).
    Capsule (type t, row y, col x) is channels t*dims .. t*dims + dims - 1 at (y, x) (SPEC
    section 5), and its index is i = t*h*w + y*w + x, the reference network's order (which W's
    rows follow). Reshaping the NCHW output straight to [B, I, P] would mix positions into one
    capsule, hence the permute.
    """

    def __init__(self, in_channels, types=32, dims=8, kernel_size=9, stride=2):
        super().__init__()
        for name, size in (("in_channels", in_channels), ("types", types), ("dims", dims),
                           ("kernel_size", kernel_size), ("stride", stride)):
            check_positive_int(size, name)
        self.types, self.dims = types, dims
        self.conv = nn.Conv2d(in_channels, types * dims, kernel_size, stride=stride)

    def forward(self, x):
        check_float_tensor(x, "x")
        # nn.Conv2d would also take one unbatched [C, H, W] image, which capsules() cannot group.
        if x.ndim != 4:
            raise ValueError(f"PrimaryCaps expects x of shape [B, C, H, W], got {list(x.shape)}")
        return self.capsules(self.conv(x))

    def capsules(self, out):
        """The convolution's output [B, T*P, h, w] grouped into capsules and squashed: u [B, I, P]."""
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
            return capsule_linear(u, self.weight, self.routing_iterations, bias=self.bias,
                                  gradient=self.gradient, backend=self.backend)
        u_hat = predict(u, self.weight)                                 # [B, I, J, D]
        return dynamic_routing(u_hat, self.routing_iterations, bias=self.bias,
                               gradient=self.gradient, backend=self.backend)

    def extra_repr(self):
        in_caps, out_caps, out_dims, in_dims = self.weight.shape
        return (f"in_caps={in_caps}, in_dims={in_dims}, out_caps={out_caps}, out_dims={out_dims}, "
                f"routing_iterations={self.routing_iterations}, gradient={self.gradient!r}, "
                f"bias={self.bias is not None}, fused={self.fused}")


def check_hidden_widths(hidden, name="hidden"):
    """The decoder's two hidden widths, a pair of integers >= 1 (the option is called `name`)."""
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__len__") or len(hidden) != 2:
        raise ValueError(f"{name} must give the widths of the two hidden layers, got {hidden!r}")
    return tuple(check_positive_int(width, f"{name}[{k}]") for k, width in enumerate(hidden))


class Decoder(nn.Module):
    """Reconstruction decoder (Section 4.1): FC ReLU -> FC ReLU -> FC sigmoid.

    Input: the flattened capsules [B, J*D] with every capsule but one masked to zero.
    Output: [B, out_features] pixel intensities in (0, 1).
    """

    def __init__(self, in_features, hidden=(512, 1024), out_features=784):
        super().__init__()
        hidden = check_hidden_widths(hidden)
        for name, width in (("in_features", in_features), ("out_features", out_features)):
            check_positive_int(width, name)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], out_features)

    def forward(self, masked):
        hidden = torch.relu(self.fc1(masked))                           # [B, hidden[0]]
        hidden = torch.relu(self.fc2(hidden))                           # [B, hidden[1]]
        return torch.sigmoid(self.fc3(hidden))                          # [B, out_features]


def recomputed_convolutions(images, first, second, chunk):
    """second(relu(first(images))) for two nn.Conv2d, keeping only `images` for the backward.

    Autograd would keep relu(first(images)) ([B, 256, 20, 20] in the MNIST network: 50 MiB at
    B = 128) and, in the backward, hold its gradient and the ReLU's beside it. Here the backward
    recomputes the activation `chunk` samples at a time and turns each chunk's gradient at once
    into the weights' (added up in chunk order: deterministic): on a 2-core CPU the whole MNIST
    training step at B = 128 then grows the peak memory by 105-132 MiB against 274-312, for one
    more pass of the first convolution and the chunks' weight gradients added up: steps about 9%
    slower (docs/PERF.md, 2026-11-30, seventh run).
    The same function and gradients as the modules called directly, under autocast too. The
    backward is made of differentiable ops, so a gradient taken with create_graph=True has its
    own (second) derivative. Under a torch.func transform (vmap, grad, jvp, ...) or forward-mode
    AD, which an autograd.Function without setup_context cannot join, the modules run as they
    are and keep the activation. Both convolutions must zero-pad by integer amounts (the
    network's do not pad at all).
    """
    for conv in (first, second):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"recomputed_convolutions takes convolutions with integer zero padding, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    if not torch.compiler.is_compiling() and (active_transforms() or torch.autograd.forward_ad._current_level >= 0):
        return second(torch.relu(first(images)))
    return _RecomputedConvolutions.apply(images, first.weight, first.bias, second.weight, second.bias,
                                         _geometry(first), _geometry(second), chunk)


def _geometry(conv):
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _convolution_backward(grad, x, weight, has_bias, geometry, input_grad):
    """(dx or None, dweight, dbias or None) of F.conv2d(x, weight, bias, **geometry) for its output
    gradient, computed in grad's dtype (the forward's: autocast's, where it ran), which weight
    must already have."""
    return torch.ops.aten.convolution_backward(
        grad, x.to(grad.dtype), weight, [weight.shape[0]] if has_bias else None,
        list(geometry["stride"]), list(geometry["padding"]), list(geometry["dilation"]), False, [0, 0],
        geometry["groups"], [input_grad, True, has_bias])


class _RecomputedConvolutions(torch.autograd.Function):
    """recomputed_convolutions' forward and backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, images, weight1, bias1, weight2, bias2, geometry1, geometry2, chunk):
        ctx.save_for_backward(images, weight1, bias1, weight2)
        ctx.geometry, ctx.chunk, ctx.has_bias = (geometry1, geometry2), chunk, (bias1 is not None, bias2 is not None)
        return torch.cat([F.conv2d(torch.relu(F.conv2d(x, weight1, bias1, **geometry1)), weight2, bias2, **geometry2)
                          for x in images.split(chunk)])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        images, weight1, bias1, weight2 = ctx.saved_tensors
        (geometry1, geometry2), (has_bias1, has_bias2) = ctx.geometry, ctx.has_bias
        input_grad = ctx.needs_input_grad[0]
        # The weights in the forward's compute dtype (autocast's, where it ran), cast once, not per chunk.
        cast1, cast2 = weight1.to(grad.dtype), weight2.to(grad.dtype)
        # Accumulated in the parameters' dtype (float32 under autocast), in chunk order.
        grads = [torch.zeros_like(weight1), weight1.new_zeros(weight1.shape[0]) if has_bias1 else None,
                 torch.zeros_like(weight2), weight2.new_zeros(weight2.shape[0]) if has_bias2 else None]
        dimages = []
        for x, g in zip(images.split(ctx.chunk), grad.split(ctx.chunk)):
            features = torch.relu(F.conv2d(x, weight1, bias1, **geometry1))     # recomputed, one chunk
            dfeatures, dweight2, dbias2 = _convolution_backward(g, features, cast2, has_bias2, geometry2, True)
            dfeatures.masked_fill_(features <= 0, 0)                            # the ReLU's backward, in place
            del features
            dx, dweight1, dbias1 = _convolution_backward(dfeatures, x, cast1, has_bias1, geometry1, input_grad)
            for total, part in zip(grads, (dweight1, dbias1, dweight2, dbias2)):
                if total is not None:
                    total += part
            if input_grad:
                dimages.append(dx.to(images.dtype))
            # Gone before the next chunk's backward makes its own (dweight2 is 21 MB in the MNIST network).
            del dfeatures, dx, dweight1, dbias1, dweight2, dbias2
        return (torch.cat(dimages) if input_grad else None, *grads, None, None, None)
