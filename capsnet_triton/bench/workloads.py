"""What bench times: the shapes, each workload's inputs, its NumPy reference computation and its
torch computation, and the callable that runs one provider on one workload."""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from capsnet_triton import reference as ref
from capsnet_triton.reference.optim import Adam as NumpyAdam

from .timing import FLOAT32


@dataclass(frozen=True)
class Shape:
    B: int
    I: int
    r: int
    J: int = 10
    D: int = 16
    P: int = 8
    conv_channels: int = 256            # only the training step's network uses it

    @property
    def u_hat_bytes(self):
        return self.B * self.I * self.J * self.D * FLOAT32

    @property
    def prediction_flops(self):
        """u_hat = W u once: 2P FLOP per element (as are du = W^T du_hat and dW = du_hat u^T)."""
        return 2 * self.P * self.B * self.I * self.J * self.D

    def network(self):
        """The reference network's config with I = primary_types * 6 * 6 input capsules."""
        return ref.CapsNetConfig(conv_channels=self.conv_channels, primary_types=self.I // 36,
                                 primary_dims=self.P, num_classes=self.J, digit_dims=self.D)


def _inputs_squash(shape, rng):
    return dict(s=rng.normal(0, 0.5, (shape.B, shape.I, shape.P)))


def _inputs_routing(shape, rng):
    # Scaled so that |s| is about 1 under uniform coupling: squash is neither linear nor saturated.
    scale = shape.J / np.sqrt(shape.I * shape.D)
    return dict(u_hat=rng.normal(0, scale, (shape.B, shape.I, shape.J, shape.D)),
                dv=rng.normal(0, 1, (shape.B, shape.J, shape.D)))


def _inputs_digitcaps(shape, rng):
    return dict(u=rng.normal(0, 1 / np.sqrt(shape.P), (shape.B, shape.I, shape.P)),
                W=rng.normal(0, shape.J / np.sqrt(shape.I * shape.D), (shape.I, shape.J, shape.D, shape.P)),
                dv=rng.normal(0, 1, (shape.B, shape.J, shape.D)))


def _inputs_train(shape, rng):
    config = shape.network()
    return dict(images=rng.uniform(0, 1, (shape.B, 1, config.image_size, config.image_size)),
                labels=rng.integers(0, shape.J, shape.B), **ref.init_params(config, rng))


def _numpy_squash(x, shape):
    return (ref.squash_forward(x["s"]),)


def _numpy_routing_forward(x, shape):
    return (ref.routing_forward(x["u_hat"], shape.r)[0],)


def _numpy_routing_backward(x, shape):
    v, cache = ref.routing_forward(x["u_hat"], shape.r)
    return v, ref.routing_backward(x["dv"], cache)


def _numpy_digitcaps_forward(x, shape):
    return (ref.capsule_linear_forward(x["u"], x["W"], shape.r)[0],)


def _numpy_digitcaps_backward(x, shape):
    v, cache = ref.capsule_linear_forward(x["u"], x["W"], shape.r)
    return (v, *ref.capsule_linear_backward(x["dv"], cache))


def _digitcaps(provider, x, iterations):
    """The DigitCaps layer u, W -> v: the provider's fused layer, or its predict then routing."""
    if provider.layer is not None:
        return provider.layer(x["u"], x["W"], iterations)
    return provider.routing(provider.predict(x["u"], x["W"]), iterations)


def _numpy_train_step(x, shape):
    """A callable for one step (loss, gradients, then Adam) on its own copy of the params."""
    config = shape.network()
    names = list(ref.parameter_shapes(config))
    params = {name: x[name].copy() for name in names}
    optimizer = NumpyAdam(params)

    def step():
        loss, cache = ref.network_forward(params, x["images"], x["labels"], config, shape.r)
        grads = ref.network_backward(cache)
        optimizer.step(params, grads)
        return (np.asarray(loss), *(grads[name] for name in names))
    return step


class _DigitCapsWith(torch.nn.Module):
    """DigitCaps with the parameter name `weight` of the project's layer, computed by a
    provider's own layer, or predict and routing (so the baseline model loads the same state_dict)."""

    def __init__(self, weight_shape, provider, iterations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(weight_shape))
        self.provider, self.iterations = provider, iterations

    def forward(self, u):
        return _digitcaps(self.provider, {"u": u, "W": self.weight}, self.iterations)


def _train_step(provider, x, shape):
    """A callable for one step (loss, gradients, then Adam) of the project's CapsNet, whose
    DigitCaps is fused (capsule_linear) for providers with a fused layer and unfused otherwise;
    providers without a project backend get DigitCaps made of their own layer, or predict and routing."""
    from capsnet_triton.losses import capsnet_loss
    from capsnet_triton.model import CapsNet

    config = shape.network()
    images, labels = x["images"], x["labels"]
    model = CapsNet(conv_channels=config.conv_channels, primary_types=config.primary_types,
                    routing_iterations=shape.r, routing_backend=provider.backend or "torch",
                    fused=provider.layer is not None)
    if provider.backend is None:
        model.digit_caps = _DigitCapsWith(model.digit_caps.weight.shape, provider, shape.r)
    names = list(ref.parameter_shapes(config))
    model.load_state_dict({name: x[name] for name in names})
    model.to(device=images.device, dtype=images.dtype)
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = capsnet_loss(model(images, labels), images, labels).total
        loss.backward()
        grads = [parameters[name].grad for name in names]       # of the params before the step
        optimizer.step()
        return (loss.detach(), *grads)
    return step


@dataclass(frozen=True)
class Workload:
    """`numpy_fn(inputs, shape)` computes the outputs with the reference (float64 inputs give the
    ground truth). Torch providers run `torch_fn(provider, tensors, iterations)` and, when
    `grad_wrt` names inputs, also the gradients of its output w.r.t. them for upstream `dv`.
    A stateful workload (a training step) instead gives builders of a step callable:
    `numpy_step(inputs, shape)` and `torch_step(provider, tensors, shape)`.
    `bytes_moved(shape)` counts the traffic of a fused kernel: the least any implementation of
    the recompute-from-u_hat design (SPEC section 3) must move; terms of B J D left out. It stays
    the yardstick of the bandwidth targets, though the routing kernels now keep the couplings:
    their backward skips one read of u_hat (B I J D values) and moves 5 (r - 1) B I J values of
    couplings and logit gradients instead (5/8 of it at the MNIST shape, r = 3; docs/PERF.md,
    2026-11-30, tenth run), so their GB/s is an effective figure, about 5% above what they move.
    `flops(shape)` counts, for the DigitCaps layer, the multiply-adds of the fused design's
    products (2P FLOP per u_hat element for each prediction, du and dW), a lower bound on its
    arithmetic: its compute floor is that over the device's fp32 rate."""

    name: str
    make_inputs: Callable
    numpy_fn: Optional[Callable] = None
    torch_fn: Optional[Callable] = None
    grad_wrt: tuple = ()
    numpy_step: Optional[Callable] = None
    torch_step: Optional[Callable] = None
    bytes_moved: Callable = lambda shape: None
    flops: Callable = lambda shape: None
    batch_sweep: bool = True              # timed at every batch of the plan, else at its layer_batch
    whole_layer: bool = False             # needs only the DigitCaps layer (a fused provider runs it)
    routed: bool = True                   # runs routing, so the shape's r matters (squash does not)


WORKLOADS = [
    Workload("squash", _inputs_squash, _numpy_squash,
             torch_fn=lambda p, x, r: p.squash(x["s"]), routed=False,
             bytes_moved=lambda s: 2 * s.B * s.I * s.P * FLOAT32),                # read s, write v
    Workload("routing fwd", _inputs_routing, _numpy_routing_forward,
             torch_fn=lambda p, x, r: p.routing(x["u_hat"], r),
             # u_hat once per iteration (the kernels' kept couplings, (r - 1) B I J, left out)
             bytes_moved=lambda s: s.r * s.u_hat_bytes),
    Workload("routing fwd+bwd", _inputs_routing, _numpy_routing_backward,
             torch_fn=lambda p, x, r: p.routing(x["u_hat"], r), grad_wrt=("u_hat",),
             # forward r reads; backward r reads (r - 1 for the dV chain, one for du_hat, which the
             # kernels now form from kept couplings instead; see Workload's docstring) + du_hat
             bytes_moved=lambda s: (2 * s.r + 1) * s.u_hat_bytes),
    Workload("digitcaps fwd", _inputs_digitcaps, _numpy_digitcaps_forward, torch_fn=_digitcaps,
             batch_sweep=False, whole_layer=True,
             flops=lambda s: s.r * s.prediction_flops),                          # u_hat once per iteration
    Workload("digitcaps fwd+bwd", _inputs_digitcaps, _numpy_digitcaps_backward, torch_fn=_digitcaps,
             grad_wrt=("u", "W"), batch_sweep=False, whole_layer=True,
             # forward r; backward r - 1 to recompute u_hat for the logit gradients, then du and dW
             # once each (kernel B forms du_hat from the kept couplings, without u_hat)
             flops=lambda s: (2 * s.r + 1) * s.prediction_flops),
    Workload("train step", _inputs_train, numpy_step=_numpy_train_step, torch_step=_train_step,
             batch_sweep=False, whole_layer=True),
]
SWEPT = "routing fwd+bwd"


def build(provider, workload, x, shape):
    """A no-argument callable returning the workload's outputs (and gradients) as a tuple."""
    if provider.numpy:
        return workload.numpy_step(x, shape) if workload.numpy_step else functools.partial(workload.numpy_fn, x, shape)
    if workload.torch_step:
        return workload.torch_step(provider, x, shape)
    if not workload.grad_wrt:
        def forward():
            with torch.no_grad():
                return (workload.torch_fn(provider, x, shape.r),)
        return forward

    def forward_backward():
        leaves = {name: x[name].detach().requires_grad_() for name in workload.grad_wrt}
        out = workload.torch_fn(provider, {**x, **leaves}, shape.r)
        grads = torch.autograd.grad(out, list(leaves.values()), x["dv"])
        return (out.detach(), *grads)
    return forward_backward


def as_inputs(arrays, dtype, device, numpy):
    """The float inputs in `dtype` (integers as they are), as NumPy arrays or torch tensors."""
    cast = {k: a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a for k, a in arrays.items()}
    if numpy:
        return cast
    return {k: torch.from_numpy(a).to(device) for k, a in cast.items()}


def make_arrays(workload, shape):
    """The workload's inputs, floats rounded to float32: every provider and the float64 ground
    truth then start from the same numbers."""
    arrays = workload.make_inputs(shape, np.random.default_rng(0))
    return {k: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for k, a in arrays.items()}
