#!/usr/bin/env python3
"""How fast is each implementation of CapsNet's dynamic routing, and how far from the hardware?

    python bench.py                 # about 2 minutes on a 2-core CPU; a CUDA GPU is used when present
    python bench.py --quick         # under a minute
    python bench.py --tiny          # seconds, small shapes: the smoke test
    python bench.py --json out.json --plot out.png

Providers (one row each):
  numpy-ref      capsnet_triton.reference, the NumPy ground truth, fed float32 (small batches only)
  torch-eager    the routing loop as public CapsNet repos write it: autograd through a Python loop
  torch-einsum   the same loop with each contraction one einsum, and u_hat = W u as one einsum
                 (W is never copied per sample): a clean eager version
  torch-compile  torch.compile of torch-eager's squash and routing loop; u_hat = W u stays eager
                 (compiled, its backward ran over 10x slower than eager on CPU)
  project-torch  capsnet_triton.ops with backend="torch"
  triton         capsnet_triton.ops with backend="triton": the fused kernels, on a CUDA GPU only
                 (the interpreter is never timed)

Workloads, float32, at the MNIST shape I=1152, J=10, D=16, P=8, r=3 unless a row says otherwise:
  squash           v = squash(s), s [B, I, P] (the primary capsules)            B up to 128 (CPU)
  routing fwd      u_hat [B, I, J, D] -> v [B, J, D]                            or 512 (GPU)
  routing fwd+bwd  also du_hat for a random upstream gradient dv; and a sweep over r (1..5; --quick: 5)
  digitcaps        u [B, I, P], W [I, J, D, P] -> u_hat (Eq. 2) -> v, with du and dW
  train step       one Adam step of the whole CapsNet (margin + reconstruction loss); the rows
                   differ only in DigitCaps (PrimaryCaps' squash is the project's, backend=None)
The last two run at one batch: B = 128 (on a CPU with --quick, 16).

Before a provider is timed, its outputs and gradients are compared with float64 ground truth:
the NumPy reference, or for batches above the NumPy limit torch-einsum's code run in float64 on
the CPU (itself checked against the NumPy reference at startup). Relative error ||out - ref|| / ||ref||
must be <= 1e-5 (SPEC section 8, float32). A provider that disagrees or raises is not timed: its
row says FAILED, the error goes to stderr, and bench exits with status 1.

Columns: median and interquartile range (p25-p75) of the repetitions after two warm-up calls;
"vs eager" = torch-eager's median / this median, same run; GB/s = the bytes a fused kernel must
move per call (`bytes_moved` below) / median, and that as a share of the device's copy bandwidth
measured in this run; peak MiB = memory allocated during one call beyond what was allocated
before it (CUDA: torch.cuda.max_memory_allocated; CPU: growth of the process's peak resident set,
Linux VmHWM, reset just before the call after returning freed heap pages to the OS).
"""

import argparse
import ctypes
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

# Under Triton's interpreter a "triton" timing would measure NumPy emulating a GPU: the triton
# provider refuses to run, and on a GPU bench refuses to start.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from capsnet_triton import reference as ref  # noqa: E402
from capsnet_triton.reference.optim import Adam as NumpyAdam  # noqa: E402

TOLERANCE = 1e-5          # float32 against float64 (SPEC section 8)
GROUND_TRUTH_TOLERANCE = 1e-12   # float64 torch against the float64 NumPy reference
FLOAT32 = 4               # bytes


# ---------------------------------------------------------------------------------------------
# The eager baseline, as public CapsNet repos write it (softmax over parents j, as SPEC asks)
# ---------------------------------------------------------------------------------------------

def baseline_squash(s):
    """Eq. 1 as gram-ai/capsule-networks writes it: no epsilon, so s = 0 gives NaN (random inputs
    never hit it). Reads s twice and writes two temporaries of its size besides v."""
    squared_norm = (s ** 2).sum(dim=-1, keepdim=True)
    scale = squared_norm / (1 + squared_norm)
    return scale * s / torch.sqrt(squared_norm)


def baseline_predict(u, W):
    """u_hat = W u (Eq. 2) by broadcasting matmul: [1, I, J, D, P] @ [B, I, 1, P, 1] materialises
    W expanded to [B, I, J, D, P], as the public repos' `x[None, :, :, None, :] @ W[:, None]` does."""
    return (W.unsqueeze(0) @ u[:, :, None, :, None]).squeeze(-1)           # [B, I, J, D]


def baseline_routing(u_hat, iterations=3):
    """Procedure 1 with autograd through the loop. Each iteration but the last writes two
    temporaries of u_hat's size (c * u_hat, u_hat * v), reads u_hat twice, and autograd keeps them."""
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)   # [B, I, J]
    for t in range(iterations):
        c = torch.softmax(b, dim=2)                                        # [B, I, J], over parents
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)                           # [B, J, D]
        v = baseline_squash(s)                                             # [B, J, D]
        if t < iterations - 1:
            b = b + (u_hat * v.unsqueeze(1)).sum(dim=-1)                   # [B, I, J]
    return v


def einsum_predict(u, W):
    """u_hat = W u (Eq. 2) as one einsum, the clean way: W is never copied per sample."""
    return torch.einsum("ijdp,bip->bijd", W, u)                            # [B, I, J, D]


def einsum_routing(u_hat, iterations=3):
    """Procedure 1 as a careful eager implementation writes it: each contraction one einsum, no
    explicit product of u_hat's size (torch may still copy u_hat to lay out a contraction), and
    autograd keeps every iteration's c and b."""
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)   # [B, I, J]
    for t in range(iterations):
        c = torch.softmax(b, dim=2)                                        # [B, I, J], over parents
        v = baseline_squash(torch.einsum("bij,bijd->bjd", c, u_hat))       # [B, J, D]
        if t < iterations - 1:
            b = b + torch.einsum("bijd,bjd->bij", u_hat, v)                # [B, I, J]
    return v


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    """One implementation. NumPy providers have no torch functions; torch providers give squash,
    predict and routing; `backend` names the project's routing_backend (CapsNet uses it as is),
    otherwise the training step swaps DigitCaps for this provider's predict and routing."""

    name: str
    about: str
    numpy: bool = False
    squash: Optional[Callable] = None
    predict: Optional[Callable] = None
    routing: Optional[Callable] = None
    backend: Optional[str] = None
    unavailable: Optional[str] = None       # why this provider cannot run in this process at all
    needs_cuda: bool = False


NUMPY = Provider("numpy-ref", "capsnet_triton.reference on float32 arrays", numpy=True)
EAGER = Provider("torch-eager", "public-repo routing loop, eager autograd", squash=baseline_squash,
                 predict=baseline_predict, routing=baseline_routing)
EINSUM = Provider("torch-einsum", "the routing loop and u_hat written with einsum, eager autograd",
                  squash=baseline_squash, predict=einsum_predict, routing=einsum_routing)


def make_providers():
    torch._dynamo.config.recompile_limit = 64    # one graph per (grad mode, shape, r): never fall back to eager
    compiled = dict(squash=torch.compile(baseline_squash), predict=baseline_predict,
                    routing=torch.compile(baseline_routing))
    providers = [
        NUMPY,
        EAGER,
        EINSUM,
        Provider("torch-compile", "torch.compile of torch-eager's squash and routing", **compiled),
    ]
    from capsnet_triton.layers import predict
    from capsnet_triton.ops import dynamic_routing, squash
    for name, backend in (("project-torch", "torch"), ("triton", "triton")):
        about = f'capsnet_triton.ops, backend="{backend}"'
        refusal = None
        if backend == "triton" and TRITON_INTERPRET:
            refusal = ("refused: TRITON_INTERPRET is set, so Triton would time its CPU interpreter; "
                       "unset it to time the kernels")
        providers.append(Provider(name, about, squash=functools.partial(squash, backend=backend),
                                  predict=predict, backend=backend, unavailable=refusal,
                                  routing=functools.partial(dynamic_routing, backend=backend),
                                  needs_cuda=backend == "triton"))
    return providers


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

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


def _numpy_digitcaps(x, shape):
    u_hat, prediction_cache = ref.prediction_forward(x["u"], x["W"])
    v, routing_cache = ref.routing_forward(u_hat, shape.r)
    du, dW = ref.prediction_backward(ref.routing_backward(x["dv"], routing_cache), prediction_cache)
    return v, du, dW


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
    provider's own predict and routing (so the baseline model loads the same state_dict)."""

    def __init__(self, weight_shape, predict, routing, iterations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(weight_shape))
        self.predict, self.routing, self.iterations = predict, routing, iterations

    def forward(self, u):
        return self.routing(self.predict(u, self.weight), self.iterations)


def _train_step(provider, x, shape):
    """A callable for one step (loss, gradients, then Adam) of the project's CapsNet; providers
    without a project backend get DigitCaps made of their own predict and routing."""
    from capsnet_triton.losses import capsnet_loss
    from capsnet_triton.model import CapsNet

    config = shape.network()
    images, labels = x["images"], x["labels"]
    model = CapsNet(conv_channels=config.conv_channels, primary_types=config.primary_types,
                    routing_iterations=shape.r, routing_backend=provider.backend or "torch")
    if provider.backend is None:
        model.digit_caps = _DigitCapsWith(model.digit_caps.weight.shape, provider.predict,
                                          provider.routing, shape.r)
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
    the project's recompute-from-u_hat design (SPEC section 3) must move; terms of B J D left out."""

    name: str
    make_inputs: Callable
    numpy_fn: Optional[Callable] = None
    torch_fn: Optional[Callable] = None
    grad_wrt: tuple = ()
    numpy_step: Optional[Callable] = None
    torch_step: Optional[Callable] = None
    bytes_moved: Callable = lambda shape: None
    batch_sweep: bool = True              # timed at every batch of the plan, else at its layer_batch


WORKLOADS = [
    Workload("squash", _inputs_squash, _numpy_squash,
             torch_fn=lambda p, x, r: p.squash(x["s"]),
             bytes_moved=lambda s: 2 * s.B * s.I * s.P * FLOAT32),                # read s, write v
    Workload("routing fwd", _inputs_routing, _numpy_routing_forward,
             torch_fn=lambda p, x, r: p.routing(x["u_hat"], r),
             bytes_moved=lambda s: s.r * s.u_hat_bytes),                          # u_hat once per iteration
    Workload("routing fwd+bwd", _inputs_routing, _numpy_routing_backward,
             torch_fn=lambda p, x, r: p.routing(x["u_hat"], r), grad_wrt=("u_hat",),
             # forward r reads; backward r reads (r - 1 for the dV chain, one to form du_hat) + du_hat
             bytes_moved=lambda s: (2 * s.r + 1) * s.u_hat_bytes),
    Workload("digitcaps", _inputs_digitcaps, _numpy_digitcaps,
             torch_fn=lambda p, x, r: p.routing(p.predict(x["u"], x["W"]), r), grad_wrt=("u", "W"),
             batch_sweep=False),
    Workload("train step", _inputs_train, numpy_step=_numpy_train_step, torch_step=_train_step,
             batch_sweep=False),
]
SWEPT = "routing fwd+bwd"


# ---------------------------------------------------------------------------------------------
# Building a provider's callable for a workload
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Checking, timing, memory
# ---------------------------------------------------------------------------------------------

def relative_error(outputs, expected):
    """Largest ||out - ref|| / ||ref|| over the outputs; inf for NaN, inf or a wrong shape."""
    worst = 0.0
    for out, want in zip(outputs, expected, strict=True):
        got = out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
        if got.shape != want.shape:
            return float("inf")
        scale = np.linalg.norm(want)
        err = np.linalg.norm(got - want) / (scale if scale > 0 else 1.0)
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, plan):
    """Milliseconds of each repetition: at least plan.reps_min, then more until plan.budget_s
    has passed or plan.reps_max is reached. The caller has warmed fn up (compiled, autotuned). On
    CUDA each call is timed with events after L2 is flushed (as triton.testing.do_bench does), so
    that data never comes from cache."""
    _sync(device)
    times = []
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if device.type == "cuda" else None
    start = time.perf_counter()
    while len(times) < plan.reps_min or (len(times) < plan.reps_max and time.perf_counter() - start < plan.budget_s):
        if flush is None:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return np.array(times)


def _status_kib(field_name):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def peak_memory_mib(fn, device):
    """MiB allocated during one call of fn beyond what was allocated before it; None where the
    platform cannot tell (no /proc/self/clear_refs)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)    # freed heap pages would hide new allocations
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")                       # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def copy_bandwidth_gbs(device, plan):
    """GB/s of a large tensor copy, counting bytes read and written: the achievable ceiling."""
    src = torch.ones(plan.copy_mib * 2**20 // FLOAT32, device=device)
    dst = torch.empty_like(src).copy_(src)
    ms = np.median(time_calls(lambda: dst.copy_(src), device, replace(plan, reps_min=5, reps_max=20, budget_s=0.5)))
    return 2 * src.numel() * FLOAT32 / (ms * 1e6)


# ---------------------------------------------------------------------------------------------
# The plan and the loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    batches: tuple                      # squash and routing
    layer_batch: int                    # digitcaps and train step
    sweep_batch: int
    sweep_iterations: tuple
    numpy_max_batch: int
    reps_min: int
    reps_max: int
    budget_s: float
    I: int = 1152
    conv_channels: int = 256
    copy_mib: int = 256


PLANS = {
    ("cpu", "default"): Plan((8, 32, 128), 128, 32, (1, 2, 3, 4, 5), 32, 3, 15, 1.0),
    ("cpu", "quick"): Plan((16,), 16, 16, (5,), 16, 3, 5, 0.3),
    ("cuda", "default"): Plan((32, 128, 512), 128, 128, (1, 2, 3, 4, 5), 32, 10, 200, 1.0, copy_mib=1024),
    ("cuda", "quick"): Plan((128, 512), 128, 128, (5,), 8, 5, 50, 0.3, copy_mib=1024),
    # Small shapes for the smoke test: I = 72 input capsules (2 types on the 6 x 6 grid).
    ("cpu", "tiny"): Plan((2,), 2, 2, (2,), 2, 2, 2, 0.0, I=72, conv_channels=16, copy_mib=16),
    ("cuda", "tiny"): Plan((2,), 2, 2, (2,), 2, 2, 2, 0.0, I=72, conv_channels=16, copy_mib=16),
}


@dataclass
class Row:
    workload: str
    B: int
    r: int
    provider: str
    status: str                          # "ok", "FAILED" or "skipped"
    note: str = ""
    rel_error: Optional[float] = None
    median_ms: Optional[float] = None
    p25_ms: Optional[float] = None
    p75_ms: Optional[float] = None
    reps: int = 0
    first_call_s: Optional[float] = None  # the checked first call: includes torch.compile's compiling
    peak_mib: Optional[float] = None
    gbs: Optional[float] = None
    copy_share: Optional[float] = None
    vs_eager: Optional[float] = None


def shapes_for(workload, plan):
    batches = plan.batches if workload.batch_sweep else (plan.layer_batch,)
    configs = [(B, 3) for B in batches]
    if workload.name == SWEPT:
        configs += [(plan.sweep_batch, r) for r in plan.sweep_iterations if (plan.sweep_batch, r) not in configs]
    return [Shape(B, plan.I, r, conv_channels=plan.conv_channels) for B, r in configs]


def skip_reason(provider, shape, device, plan):
    if provider.unavailable:
        return provider.unavailable
    if provider.needs_cuda and device.type != "cuda":
        return "skipped: needs a CUDA GPU (the interpreter is never timed)"
    if provider.numpy and shape.B > plan.numpy_max_batch:
        return f"skipped: small batches only (B <= {plan.numpy_max_batch})"
    return None


def make_arrays(workload, shape):
    """The workload's inputs, floats rounded to float32: every provider and the float64 ground
    truth then start from the same numbers."""
    arrays = workload.make_inputs(shape, np.random.default_rng(0))
    return {k: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for k, a in arrays.items()}


def ground_truth(workload, arrays, shape, use_numpy):
    """float64 outputs: the NumPy reference, or torch-einsum's code in float64 (large batches).
    Always on the CPU, where the project's model (in the train step) uses no Triton kernel."""
    provider = NUMPY if use_numpy else EINSUM
    outputs = build(provider, workload, as_inputs(arrays, np.float64, torch.device("cpu"), use_numpy), shape)()
    return [out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out) for out in outputs]


def check_ground_truth(workloads=WORKLOADS):
    """torch-einsum in float64 must equal the NumPy reference to rounding, at every r the plans
    time, or it cannot stand in for the reference on large batches."""
    for workload in workloads:
        for r in (1, 2, 3, 4, 5) if workload.name == SWEPT else (3,):
            shape = Shape(2, 72, r, conv_channels=16)
            arrays = make_arrays(workload, shape)
            expected = ground_truth(workload, arrays, shape, use_numpy=True)
            got = ground_truth(workload, arrays, shape, use_numpy=False)
            err = relative_error(got, expected)
            if not err <= GROUND_TRUTH_TOLERANCE:
                sys.exit(f"bench: torch-einsum in float64 differs from the NumPy reference on {workload.name} "
                         f"at r = {r} (relative error {err:.1e}); ground truth for large batches is broken")


def measure(row, provider, workload, shape, arrays, expected, device, plan, bandwidth):
    """Fill `row`: check the first call against `expected`, and time only if it agrees."""
    where = torch.device("cpu") if provider.numpy else device
    fn = build(provider, workload, as_inputs(arrays, np.float32, device, provider.numpy), shape)
    start = time.perf_counter()
    outputs = fn()
    _sync(where)
    row.first_call_s = time.perf_counter() - start
    row.rel_error = relative_error(outputs, expected)
    if not row.rel_error <= TOLERANCE:
        row.status, row.note = "FAILED", f"relative error {row.rel_error:.2e} > {TOLERANCE:.0e}: not timed"
        return
    row.peak_mib = peak_memory_mib(fn, where)             # also the second warm-up call
    times = time_calls(fn, where, plan)
    row.status, row.reps = "ok", len(times)
    row.p25_ms, row.median_ms, row.p75_ms = (float(q) for q in np.percentile(times, [25, 50, 75]))
    moved = workload.bytes_moved(shape)
    if moved is not None:
        row.gbs = moved / (row.median_ms * 1e6)
        row.copy_share = row.gbs / bandwidth[where.type]


def run(providers, workloads, plan, device, bandwidth, progress=True):
    """Check and time every (workload, shape, provider); returns the rows in that order."""
    tasks = [(w, s, p) for w in workloads for s in shapes_for(w, plan) for p in providers]
    rows, cache = [], {}
    bar = tqdm(tasks, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for workload, shape, provider in bar:
        bar.set_description(f"{workload.name} B={shape.B} r={shape.r} {provider.name}")
        row = Row(workload.name, shape.B, shape.r, provider.name, "skipped")
        rows.append(row)
        reason = skip_reason(provider, shape, device, plan)
        if reason:
            row.note = reason
            continue
        key = (workload.name, shape)
        if key not in cache:
            arrays = make_arrays(workload, shape)
            cache.clear()                   # keep one shape's inputs and ground truth alive at a time
            cache[key] = arrays, ground_truth(workload, arrays, shape, shape.B <= plan.numpy_max_batch)
        arrays, expected = cache[key]
        try:
            measure(row, provider, workload, shape, arrays, expected, device, plan, bandwidth)
        except Exception as exc:            # a provider that raises is as wrong as one that disagrees
            row.status, row.note = "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if row.status == "FAILED":
            tqdm.write(f"bench: FAILED {provider.name} on {workload.name} B={shape.B} r={shape.r}: {row.note}",
                       file=sys.stderr)
    eager = {(r.workload, r.B, r.r): r.median_ms for r in rows if r.provider == "torch-eager" and r.median_ms}
    for row in rows:
        if row.median_ms and (row.workload, row.B, row.r) in eager:
            row.vs_eager = eager[(row.workload, row.B, row.r)] / row.median_ms
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def environment(device, bandwidth, args, load_before):
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench.py", *args]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU timings: the 1-minute load before and after.
        "load_average": [load_before, _load()],
        "python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
        "numpy": np.__version__, "cuda": torch.version.cuda,
        "tf32": "off (every provider computes in full float32, as checked)" if device.type == "cuda" else None,
        "copy_bandwidth_gbs": bandwidth,
    }


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _num(value, fmt):
    return format(value, fmt) if value is not None else "-"


def format_table(rows, env, providers):
    lines = [f"CapsNet routing benchmark  {env['date']}",
             f"device {env['device']} | cpu {env['cpu']} ({env['cpu_count']} cores, torch threads "
             f"{env['torch_threads']}) | load average {_num(env['load_average'][0], '.1f')} before, "
             f"{_num(env['load_average'][1], '.1f')} after",
             f"python {env['python']} torch {env['torch']} triton {env['triton']} numpy {env['numpy']}"
             + (f" cuda {env['cuda']} | TF32 {env['tf32']}" if env["cuda"] and env["device"] != "cpu" else ""),
             "copy bandwidth (read + write): "
             + ", ".join(f"{dev} {gbs:.1f} GB/s" for dev, gbs in env["copy_bandwidth_gbs"].items()),
             f"command: {env['command']}"]
    lines += ["providers:"] + [f"  {p.name:<15}{p.about}" for p in providers]
    load = env["load_average"][0]
    if load is not None and load + env["torch_threads"] > env["cpu_count"] + 0.5 and env["device"] == "cpu":
        lines += [f"WARNING: load average {load:.1f} before the run on {env['cpu_count']} cores: other processes "
                  "compete for the CPU,", "         and multi-threaded timings can come out several times "
                  "slower (--threads 1 is steadier)"]
    lines.append("")
    header = (f"{'B':>5} {'r':>2}  {'provider':<14}{'median ms':>11}{'p25-p75 ms':>21}{'vs eager':>10}"
              f"{'GB/s':>8}{'%copy':>7}{'peak MiB':>10}{'rel.err':>9}")
    for workload in dict.fromkeys(r.workload for r in rows):
        lines += [f"== {workload} ==", header]
        for row in (r for r in rows if r.workload == workload):
            lead = f"{row.B:>5} {row.r:>2}  {row.provider:<14}"
            if row.status != "ok":
                lines.append(f"{lead}{row.status}: {row.note}" if row.status == "FAILED" else f"{lead}{row.note}")
                continue
            spread = f"{row.p25_ms:.4g}-{row.p75_ms:.4g}"
            lines.append(f"{lead}{row.median_ms:>11.4g}{spread:>21}{_num(row.vs_eager, '.2f') + ('x' if row.vs_eager else ''):>10}"
                         f"{_num(row.gbs, '.1f'):>8}{_num(row.copy_share and 100 * row.copy_share, '.0f'):>7}"
                         f"{_num(row.peak_mib, '.0f'):>10}{row.rel_error:>9.1e}")
        lines.append("")
    lines += ["vs eager: torch-eager's median / this median, same shape.  rel.err: against float64 ground truth.",
              "GB/s: the bytes a fused kernel must move / median; %copy: that / the copy bandwidth above.",
              "peak MiB: memory allocated during one call beyond what was allocated before it."]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.status == "ok"]
    if not timed:
        print(f"bench: no row was timed, so there is no plot ({path} not written)", file=sys.stderr)
        return
    swept_batches = {r.B for r in timed if r.workload == SWEPT and r.r != 3}   # the r sweep's batch
    panels = [(w, "B") for w in dict.fromkeys(r.workload for r in timed)] + [(SWEPT, "r")] * bool(swept_batches)
    columns = min(3, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.5 * columns, 3.6 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    providers = list(dict.fromkeys(r.provider for r in timed))
    colours = {provider: f"C{k}" for k, provider in enumerate(providers)}   # one colour per provider in every panel
    for ax, (workload, axis) in zip(axes.flat, panels):
        series = {}
        for provider in providers:
            points = sorted((getattr(r, axis), r.median_ms) for r in timed
                            if r.workload == workload and r.provider == provider
                            and (r.r == 3 if axis == "B" else r.B in swept_batches))
            if points:
                series[provider] = points
        if axis == "B" and all(len(points) == 1 for points in series.values()):
            # A workload timed at one batch: bars compare the providers better than lone dots.
            names = list(series)
            ax.barh(names, [series[name][0][1] for name in names], color=[colours[name] for name in names])
            ax.invert_yaxis()
            ax.set(title=f"{workload} (B = {series[names[0]][0][0]})", xlabel="median ms")
            continue
        for provider, points in series.items():
            ax.plot(*zip(*points), marker="o", label=provider, color=colours[provider])
        ax.set(title=workload + (" (r sweep)" if axis == "r" else ""), xlabel=axis, ylabel="median ms", yscale="log")
        if axis == "B":
            ax.set_xscale("log", base=2)
    line_panels = [ax for ax in axes.flat if ax.get_lines()]
    if line_panels:                                        # bar panels name providers on their axis
        line_panels[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer sizes and repetitions: under a minute on CPU")
    size.add_argument("--tiny", action="store_true", help="small shapes, two repetitions: a smoke test in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--providers", help="comma-separated subset of provider names")
    parser.add_argument("--workloads", help="comma-separated subset of workload names")
    parser.add_argument("--json", metavar="PATH", help="also write the environment and rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw median time per provider to a PNG")
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA GPU")
        if TRITON_INTERPRET:
            # CapsNet's squash picks Triton for CUDA tensors: every train-step row would time the interpreter.
            parser.error("TRITON_INTERPRET is set: unset it to benchmark on a GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    plan = PLANS[(device.type, "tiny" if args.tiny else "quick" if args.quick else "default")]
    providers = _select(make_providers(), args.providers, parser, "provider")
    workloads = _select(WORKLOADS, args.workloads, parser, "workload")

    load_before = _load()
    check_ground_truth(workloads)
    bandwidth = {d.type: copy_bandwidth_gbs(d, plan) for d in dict.fromkeys([torch.device("cpu"), device])}
    rows = run(providers, workloads, plan, device, bandwidth)
    env = environment(device, bandwidth, sys.argv[1:] if argv is None else argv, load_before)
    print(format_table(rows, env, providers))
    if args.json:
        with open(args.json, "w") as out:
            # An infinite relative error (a provider that gave NaN) becomes null: JSON has no Infinity.
            records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
                       for r in rows]
            json.dump({"environment": env, "rows": records}, out, indent=1)
    if args.plot:
        plot(rows, args.plot)
    failed = [r for r in rows if r.status == "FAILED"]
    if failed:
        print(f"bench: {len(failed)} row(s) FAILED the check against the reference and were not timed",
              file=sys.stderr)
        return 1
    return 0


def _select(items, wanted, parser, kind):
    if wanted is None:
        return items
    names = [name.strip() for name in wanted.split(",")]
    unknown = sorted(set(names) - {item.name for item in items})
    if unknown:
        parser.error(f"unknown {kind}(s) {unknown}; choose from {[item.name for item in items]}")
    return [item for item in items if item.name in names]


if __name__ == "__main__":
    sys.exit(main())
