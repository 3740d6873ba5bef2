"""The implementations bench times, one Provider each: the NumPy reference, the eager baselines
of `capsnet_triton.baselines`, torch.compile of the public-repo style, and the project's ops,
unfused (predict, then dynamic_routing) and fused (capsule_linear)."""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from capsnet_triton import baselines
from capsnet_triton.checks import interpreting

# Under Triton's interpreter a "triton" timing would measure NumPy emulating a GPU: the triton
# provider refuses to run, and on a GPU bench refuses to start.
TRITON_INTERPRET = interpreting()


@dataclass(frozen=True)
class Provider:
    """One implementation. NumPy providers have no torch functions; torch providers give squash,
    predict and routing, or `layer`, the whole DigitCaps layer (u, W, r) -> v in one call (the
    fused capsule_linear, which has no separate routing: such a provider times the layer
    workloads only); `backend` names the project's routing_backend (CapsNet uses it as is, its
    DigitCaps fused exactly when `layer` is given), otherwise the training step swaps DigitCaps
    for this provider's layer, or its predict and routing."""

    name: str
    about: str
    numpy: bool = False
    squash: Optional[Callable] = None
    predict: Optional[Callable] = None
    routing: Optional[Callable] = None
    layer: Optional[Callable] = None
    backend: Optional[str] = None
    unavailable: Optional[str] = None       # why this provider cannot run in this process at all
    needs_cuda: bool = False


NUMPY = Provider("numpy-ref", "capsnet_triton.reference on float32 arrays", numpy=True)
EAGER = Provider("torch-eager", "public-repo routing loop, eager autograd", squash=baselines.squash,
                 predict=baselines.predict, routing=baselines.routing)
EINSUM = Provider("torch-einsum", "the routing loop and u_hat written with einsum, eager autograd",
                  squash=baselines.squash, predict=baselines.einsum_predict, routing=baselines.einsum_routing)


class _SampleRouting(torch.autograd.Function):
    """The Triton routing kernels' one-program-per-sample variant (kernels/routing.py), forward
    and "full" backward: the variant the default (split) is measured against."""

    @staticmethod
    def forward(ctx, u_hat, iterations):
        from capsnet_triton.kernels.routing import routing_forward
        v, s_all, couplings = routing_forward(u_hat, iterations, variant="sample")
        ctx.save_for_backward(u_hat, s_all, couplings)
        return v

    @staticmethod
    def backward(ctx, dv):
        from capsnet_triton.kernels.routing import routing_backward
        u_hat, s_all, couplings = ctx.saved_tensors
        du_hat, _ = routing_backward(dv.contiguous(), u_hat, s_all, couplings, variant="sample")
        return du_hat, None


def _sample_routing(u_hat, iterations=3):
    return _SampleRouting.apply(u_hat, iterations)


class _SampleCapsuleLinear(torch.autograd.Function):
    """The fused DigitCaps kernels' one-program-per-sample variant (kernels/capsule_linear.py),
    forward and "full" backward: the variant the default (split) is measured against."""

    @staticmethod
    def forward(ctx, u, weight, iterations):
        from capsnet_triton.kernels.capsule_linear import capsule_linear_forward
        v, s_all, couplings = capsule_linear_forward(u, weight, iterations, variant="sample")
        ctx.save_for_backward(u, weight, s_all, couplings)
        return v

    @staticmethod
    def backward(ctx, dv):
        from capsnet_triton.kernels.capsule_linear import capsule_linear_backward
        u, weight, s_all, couplings = ctx.saved_tensors
        du, dweight, _ = capsule_linear_backward(dv.contiguous(), u, weight, s_all, couplings, variant="sample")
        return du, dweight, None


def _sample_capsule_linear(u, weight, iterations=3):
    return _SampleCapsuleLinear.apply(u, weight, iterations)


def make_providers():
    # Enough recompiles for every (grad mode, shape, r) of a run, so that torch.compile never falls
    # back to eager. From a second batch size on it compiles a dynamic-shape graph, as it does for
    # any user with default settings (one static graph per batch timed the same on a CPU: 14.49
    # against 14.33 ms at B = 32). (torch before 2.7 names the limit cache_size_limit.)
    config = torch._dynamo.config
    setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 64)
    compiled = dict(squash=torch.compile(baselines.squash), predict=baselines.predict,
                    routing=torch.compile(baselines.routing))
    providers = [
        NUMPY,
        EAGER,
        EINSUM,
        Provider("torch-compile", "torch.compile of torch-eager's squash and routing", **compiled),
    ]
    from capsnet_triton.layers import predict
    from capsnet_triton.ops import capsule_linear, dynamic_routing, squash
    refusal = None
    if TRITON_INTERPRET:
        refusal = ("refused: TRITON_INTERPRET is set, so Triton would time its CPU interpreter; "
                   "unset it to time the kernels")
    for name, backend in (("project-torch", "torch"), ("triton", "triton")):
        about = f'capsnet_triton.ops, backend="{backend}"'
        providers.append(Provider(name, about, squash=functools.partial(squash, backend=backend),
                                  predict=predict, backend=backend,
                                  unavailable=refusal if backend == "triton" else None,
                                  routing=functools.partial(dynamic_routing, backend=backend),
                                  needs_cuda=backend == "triton"))
        providers.append(Provider(f"{name.split('-')[0]}-fused", f"{about}: capsule_linear, u_hat never stored",
                                  layer=functools.partial(capsule_linear, backend=backend), backend=backend,
                                  unavailable=refusal if backend == "triton" else None,
                                  needs_cuda=backend == "triton"))
    # No backend: the training step builds its DigitCaps from this routing, or this layer.
    providers.append(Provider("triton-sample", 'the Triton routing kernels with variant="sample"',
                              squash=functools.partial(squash, backend="triton"), predict=predict,
                              routing=_sample_routing, unavailable=refusal, needs_cuda=True))
    providers.append(Provider("triton-fused-sample", 'the fused DigitCaps kernels with variant="sample"',
                              layer=_sample_capsule_linear, unavailable=refusal, needs_cuda=True))
    return providers
