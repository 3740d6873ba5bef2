"""capsule_linear, the DigitCaps layer fused (capsnet_triton.ops.capsule_linear), against the
float64 NumPy reference, and the promise that makes it worth having: no tensor of u_hat's size
[B, I, J, D] is ever allocated, forward or backward.

The torch backend runs everywhere; the triton backend runs through the interpreter here and
natively on a GPU machine (see conftest.py)."""

import contextlib
import importlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import DEVICE, DTYPES, saved_numel

from capsnet_triton import capsule_linear, dynamic_routing
from capsnet_triton.layers import DigitCaps, predict
from capsnet_triton.numerics import as_float64, assert_agrees
from capsnet_triton.reference import capsule_linear_backward, capsule_linear_forward

# The module, which capsnet_triton.ops' function of the same name hides from attribute access.
capsule_linear_module = importlib.import_module("capsnet_triton.ops.capsule_linear")


def run(u, weight, iterations, dv, *, bias=None, gradient="full", backend="torch"):
    """(v, du, dW, dbias or None) from the public function and autograd."""
    u = u.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = None if bias is None else bias.clone().requires_grad_(True)
    v = capsule_linear(u, weight, iterations, bias=bias, gradient=gradient, backend=backend)
    v.backward(dv)
    return v.detach(), u.grad, weight.grad, None if bias is None else bias.grad


def reference(u, weight, iterations, dv, bias, gradient):
    """(v, du, dW, dbias or None) of the float64 reference at the tensors' own values."""
    v, cache = capsule_linear_forward(as_float64(u), as_float64(weight), iterations,
                                      bias=None if bias is None else as_float64(bias), gradient=gradient)
    grads = capsule_linear_backward(as_float64(dv), cache)
    return (v, *grads) if bias is not None else (v, *grads, None)


@given(shape=st.tuples(*(st.integers(1, n) for n in (4, 12, 6, 7, 9))),
       iterations=st.integers(1, 3), use_bias=st.booleans(), gradient=st.sampled_from(["full", "last"]),
       dtype=st.sampled_from(DTYPES), chunk_elements=st.sampled_from([1, 200, 1 << 20]),
       seed=st.integers(0, 2**32 - 1))
def test_torch_path_matches_reference(shape, iterations, use_bias, gradient, dtype, chunk_elements, seed):
    B, I, J, D, P = shape
    rng = np.random.default_rng(seed)
    u = torch.tensor(rng.standard_normal((B, I, P))).to(dtype)
    weight = torch.tensor(rng.standard_normal((I, J, D, P)) / np.sqrt(P)).to(dtype)
    bias = torch.tensor(rng.standard_normal((J, D))).to(dtype) if use_bias else None
    dv = torch.tensor(rng.standard_normal((B, J, D))).to(dtype)
    # The chunk size decides how many samples share one u_hat: 1 sample, a few, or the batch.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capsule_linear_module, "_CHUNK_ELEMENTS", chunk_elements)
        got = run(u, weight, iterations, dv, bias=bias, gradient=gradient)
    expected = reference(u, weight, iterations, dv, bias, gradient)
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    for name, out, ref in zip(("v", "du", "dW", "dbias"), got, expected):
        if ref is not None:
            assert_agrees(out, ref, dtype, name)


@pytest.mark.parametrize("gradient", ["full", "last"])
def test_both_backends_agree_with_the_reference_through_the_public_op(gradient):
    """backend="triton" and "torch" through capsule_linear and autograd, each held to SPEC 8's
    float32 rule against the float64 reference (the shared helper, no tolerance of its own)."""
    u = torch.randn(3, 13, 2, device=DEVICE)
    weight = torch.randn(13, 10, 16, 2, device=DEVICE) * 0.5
    bias = torch.randn(10, 16, device=DEVICE)
    dv = torch.randn(3, 10, 16, device=DEVICE)
    expected = reference(u, weight, 3, dv, bias, gradient)
    for backend in ("triton", "torch"):
        got = run(u, weight, 3, dv, bias=bias, gradient=gradient, backend=backend)
        for name, out, ref in zip(("v", "du", "dW", "dbias"), got, expected):
            assert_agrees(out, ref, torch.float32, f"{backend} {name}")


def test_gradcheck_float64():
    u = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: capsule_linear(x[0], x[1], 3, bias=x[2], backend="torch"),
                                    (u, weight, bias))


def test_equals_dynamic_routing_of_the_predictions():
    from capsnet_triton import dynamic_routing
    from capsnet_triton.layers import predict

    u, weight = torch.randn(4, 9, 8, dtype=torch.float64), torch.randn(9, 10, 16, 8, dtype=torch.float64)
    for gradient in ("full", "last"):
        fused = run(u, weight, 3, torch.ones(4, 10, 16, dtype=torch.float64), gradient=gradient)
        u_t, weight_t = u.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        v = dynamic_routing(predict(u_t, weight_t), 3, gradient=gradient)
        v.sum().backward()
        for out, ref in zip(fused, (v.detach(), u_t.grad, weight_t.grad)):
            assert torch.allclose(out, ref, rtol=1e-12, atol=1e-15)


@contextlib.contextmanager
def _torch_threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_torch_path_on_two_threads_is_deterministic_and_equals_one_thread():
    """dW's shares are added chunk by chunk in order, and no op's result depends on the run."""
    u, weight = torch.randn(40, 30, 8), 0.3 * torch.randn(30, 10, 16, 8)
    dv = torch.randn(40, 10, 16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capsule_linear_module, "_CHUNK_ELEMENTS", 30 * 160 * 3)     # 14 chunks
        with _torch_threads(2):
            first, second = run(u, weight, 3, dv), run(u, weight, 3, dv)
        with _torch_threads(1):
            single = run(u, weight, 3, dv)
    for a, b, c in zip(first[:3], second[:3], single[:3]):
        assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-5, atol=1e-6)


def _allocations(step):
    """The bytes of every block torch's CPU allocator hands out while step() runs (the profiler's
    memory records, which see inside custom ops and autograd's backward too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("gradient", ["full", "last"])
def test_torch_path_never_allocates_anything_of_u_hats_size(gradient):
    """At B = 128 and the MNIST layer (I = 1152, J = 10, D = 16), u_hat would take 94 MB in
    float32; every allocation of the public function's forward and backward is at least 8x
    smaller (a chunk of u_hat is 11 samples, 8.1 MB; the couplings kept for the backward,
    at most [r-1, B, J, I], are (r-1)/D of u_hat under "full": 11.8 MB at r = 3; W and dW 5.9 MB).
    The same measurement of the unfused layer (predict, then dynamic_routing) finds u_hat's."""
    B, I, J, D, P = 128, 1152, 10, 16, 8
    u = torch.randn(B, I, P, requires_grad=True)
    weight = (0.05 * torch.randn(I, J, D, P)).requires_grad_(True)
    bias = torch.randn(J, D, requires_grad=True)
    dv = torch.randn(B, J, D)
    u_hat_bytes = B * I * J * D * 4

    def step(layer):
        u.grad = weight.grad = bias.grad = None
        layer().backward(dv)

    fused = _allocations(lambda: step(lambda: capsule_linear(u, weight, 3, bias=bias, gradient=gradient,
                                                             backend="torch")))
    assert all(torch.isfinite(x).all() for x in (u.grad, weight.grad, bias.grad))
    assert len(fused) > 100 and max(fused) <= u_hat_bytes // 8
    unfused = _allocations(lambda: step(lambda: dynamic_routing(predict(u, weight), 3, bias=bias, gradient=gradient,
                                                                backend="torch")))
    assert max(unfused) >= u_hat_bytes


def test_the_last_policys_torch_backward_reads_no_u_hat(monkeypatch):
    """Under "last" du_hat = c^(r) ds^(r): the fused layer's backward predicts no chunk of u_hat
    (the forward predicts each once), and the routing backward of a half-precision u_hat makes no
    float32 copy of it (94 MB at B = 128), whatever "full" does."""
    ops_capsule_linear = importlib.import_module("capsnet_triton.ops.capsule_linear")
    ops_routing = importlib.import_module("capsnet_triton.ops.routing")
    calls = []
    for module, name in ((ops_capsule_linear, "_predict"), (ops_routing, "_as_rows")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    u = torch.randn(30, 9, 8, requires_grad=True)
    weight = torch.randn(9, 10, 16, 8, requires_grad=True)
    u_hat = torch.randn(3, 9, 10, 16, dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setattr(ops_capsule_linear, "_CHUNK_ELEMENTS", 9 * 10 * 16 * 4)     # chunks of 4 samples
    for gradient, backward_calls in (("last", []), ("full", ["_predict", "_as_rows"] * 8 + ["_as_rows"])):
        v = capsule_linear(u, weight, 3, gradient=gradient, backend="torch")
        v_routed = dynamic_routing(u_hat, 3, gradient=gradient, backend="torch")
        calls.clear()
        torch.autograd.grad((v.sum(), v_routed.float().sum()), (u, weight, u_hat))
        assert sorted(calls) == sorted(backward_calls), gradient


@pytest.mark.parametrize("layer", ["capsule_linear", "dynamic_routing"])
def test_backward_allocates_no_zero_gradient_for_what_the_forward_keeps(layer):
    """s_all and the couplings are outputs of the forward op for its backward alone, and no loss
    reads them: autograd must not hand the backward zero gradients for them, which would cost the
    couplings' size ([r-1, B, J, I]: 11.8 MB at B = 128) in fresh memory filled with zeros."""
    B, I, J, D, P, r = 16, 100, 10, 16, 8, 3
    u = torch.randn(B, I, P, requires_grad=True)
    weight = (0.05 * torch.randn(I, J, D, P)).requires_grad_(True)
    if layer == "capsule_linear":
        v = capsule_linear(u, weight, r, backend="torch")
    else:
        v = dynamic_routing(predict(u, weight), r, backend="torch")
    allocations = _allocations(lambda: v.backward(torch.randn(B, J, D)))
    assert torch.isfinite(u.grad).all() and torch.isfinite(weight.grad).all()
    assert len(allocations) > 10 and (r - 1) * B * J * I * 4 not in allocations


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("r", [1, 3])
def test_backward_saves_u_weight_per_iteration_s_and_the_couplings(backend, gradient, r):
    """Both paths keep u, W, s^(1..r) and the couplings the backward reads: c^(2..r) under "full",
    c^(r) alone under "last" ([r-1, B, J, I] or [1, B, J, I] on the PyTorch path, [., B, I, J]
    from the kernels), nothing of u_hat's size."""
    B, I, J, D, P = 2, 50, 10, 16, 8
    u = torch.randn(B, I, P, device=DEVICE, requires_grad=True)
    weight = torch.randn(I, J, D, P, device=DEVICE, requires_grad=True)
    saved, _ = saved_numel(lambda: capsule_linear(u, weight, r, gradient=gradient, backend=backend))
    kept = r - 1 if gradient == "full" else min(1, r - 1)
    couplings = kept * B * J * I
    assert saved == u.numel() + weight.numel() + r * B * J * D + couplings


# NaN and inf in, on purpose: the interpreter's NumPy says so for every op they reach.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_input_gives_nan_in_its_own_samples_as_the_reference(backend, gradient):
    # float64, so that the rounding of products summed in another order for another batch (a few
    # float32 ulps, which failed 3 draws in 20 at the float32 tolerance this test had) is 1e-16.
    generator = torch.Generator().manual_seed(3)
    u = torch.randn(3, 6, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(6, 5, 3, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    u[0, 1, 2] = float("nan")
    u[2, 4, 0] = float("-inf")
    v = capsule_linear(u, weight, 3, gradient=gradient, backend=backend)
    assert torch.isnan(v[0]).all() and torch.isnan(v[2]).all()
    # The other sample is unaffected.
    assert torch.allclose(v[1], capsule_linear(u[1:2], weight, 3, gradient=gradient, backend=backend)[0],
                          rtol=1e-12, atol=1e-15)
    # The gradients are the reference's, NaN exactly where it has NaN: all of those samples' du,
    # all of dW (a sum over the batch).
    dv = torch.randn(3, 5, 3, generator=generator, dtype=torch.float64).to(DEVICE)
    _, du, dW, _ = run(u, weight, 3, dv, gradient=gradient, backend=backend)
    _, ref_du, ref_dW, _ = reference(u, weight, 3, dv, None, gradient)
    assert np.isnan(ref_du[[0, 2]]).all() and np.isnan(ref_dW).all()
    assert_agrees(du, ref_du, torch.float64, "du")
    assert_agrees(dW, ref_dW, torch.float64, "dW")
    # To the bit, in float32, against the same batch without the NaN and inf (SPEC 7), v and du.
    clean = torch.randn(3, 6, 4, generator=generator).to(DEVICE)
    outputs = []
    for u in (clean, torch.where(torch.isfinite(u), clean, u)):
        u = u.float().requires_grad_()
        v = capsule_linear(u, weight.float(), 3, gradient=gradient, backend=backend)
        v.backward(torch.ones_like(v))
        outputs.append((v[1], u.grad[1]))
    assert all(torch.equal(bad, good) for bad, good in zip(outputs[1], outputs[0]))


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_empty_results_and_zero_weight_gradient(backend, gradient):
    u = torch.empty(0, 6, 4, device=DEVICE, requires_grad=True)
    weight = torch.randn(6, 5, 3, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    v = capsule_linear(u, weight, 3, bias=bias, gradient=gradient, backend=backend)
    assert v.shape == (0, 5, 3)
    v.sum().backward()
    assert u.grad.shape == (0, 6, 4) and torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_compile_fullgraph_traces_through_the_op():
    weight = torch.nn.Parameter(0.1 * torch.randn(6, 3, 4, 5))
    u = torch.randn(2, 6, 5)

    def head(u):
        return torch.linalg.vector_norm(capsule_linear(u, weight, 3), dim=-1)

    expected = head(u)
    (expected_grad,) = torch.autograd.grad(expected.sum(), [weight])
    got = torch.compile(head, fullgraph=True, backend="aot_eager")(u)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.allclose(weight.grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, error, words", [
    (lambda: capsule_linear(torch.randn(2, 3), torch.randn(3, 4, 5, 2)), ValueError, "3 axes"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5)), ValueError, "4 axes"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 3)), ValueError, "I and P must agree"),
    (lambda: capsule_linear(torch.randn(2, 0, 2), torch.randn(0, 4, 5, 2)), ValueError, "at least one"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 0, 5, 2)), ValueError, "at least one"),
    (lambda: capsule_linear(torch.randn(2, 3, 0), torch.randn(3, 4, 5, 0)), ValueError, "at least one"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 0, 2)), ValueError, "at least one"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2).double()), TypeError, "dtype"),
    (lambda: capsule_linear(torch.ones(2, 3, 2, dtype=torch.int64), torch.ones(3, 4, 5, 2)), TypeError,
     "floating"),
    (lambda: capsule_linear(np.ones((2, 3, 2)), torch.ones(3, 4, 5, 2)), TypeError, "torch.Tensor"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), 0), ValueError, "iterations"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), gradient=True), ValueError,
     "gradient"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), bias=torch.randn(5, 4)),
     ValueError, "bias"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), bias=torch.ones(4, 5, dtype=torch.int64)),
     TypeError, "bias must have a floating-point dtype"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), backend="cuda"), ValueError,
     "backend"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2, device="meta")), ValueError,
     "device"),
    (lambda: capsule_linear(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2), bias=torch.randn(4, 5, device="meta")),
     ValueError, "bias is on meta but weight is on cpu"),
])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("call, error, words", [
    (lambda: predict(torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2).double()), TypeError, "weight must have u's dtype"),
    (lambda: predict(torch.randn(2, 6), torch.randn(3, 4, 5, 2)), ValueError, "u must have shape"),
    (lambda: predict(torch.randn(2, 3, 2), torch.randn(4, 4, 5, 2)), ValueError, "I and P must agree"),
    (lambda: predict(np.zeros((2, 3, 2)), torch.randn(3, 4, 5, 2)), TypeError, "u must be a torch.Tensor"),
    (lambda: DigitCaps(3, 2, 4, 5)(np.zeros((2, 3, 2), np.float32)), TypeError, "u must be a torch.Tensor"),
])
def test_predict_and_digit_caps_name_what_is_wrong(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_predict_under_autocast_takes_a_float32_weight_beside_low_precision_u():
    u, weight = torch.randn(2, 3, 2), torch.randn(3, 4, 5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_hat = predict(u.bfloat16(), weight)
    assert u_hat.dtype == torch.bfloat16
    assert_agrees(u_hat, torch.einsum("ijdp,bip->bijd", weight.double(), u.bfloat16().double()), torch.bfloat16,
                  "u_hat")


def test_digit_caps_under_autocast_computes_in_one_dtype_fused_or_not():
    """A float32 u under autocast: the unfused path's matmul casts u and W to bfloat16, and
    capsule_linear does as autocast would (float32 or bfloat16 u beside a float32 W), so the two
    return one dtype, and each agrees (SPEC 8) with the float64 reference of what it was given:
    the fused layer with u and W rounded to bfloat16, the unfused routing with its bfloat16
    u_hat."""
    from capsnet_triton.reference import routing_forward
    fused = DigitCaps(9, 8, 10, 16)
    unfused = DigitCaps(9, 8, 10, 16, fused=False)
    unfused.load_state_dict(fused.state_dict())
    u = torch.randn(4, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_fused, v_unfused = fused(u), unfused(u)
        u_hat = predict(u, unfused.weight)
        for given in (u, u.bfloat16()):
            assert torch.equal(capsule_linear(given, fused.weight), v_fused)
        for call in (capsule_linear, predict):           # predict's matmul raised a RuntimeError
            with pytest.raises(TypeError, match="u's dtype torch.float64, got torch.float32"):
                call(u.double(), fused.weight)
    assert v_fused.dtype == v_unfused.dtype == u_hat.dtype == torch.bfloat16
    rounded = (as_float64(x.detach().bfloat16()) for x in (u, fused.weight))
    assert_agrees(v_fused, capsule_linear_forward(*rounded, 3)[0], torch.bfloat16, "fused v")
    assert_agrees(v_unfused, routing_forward(as_float64(u_hat), 3)[0], torch.bfloat16, "unfused v")


def test_digit_caps_fused_runs_capsule_linear_and_unfused_predict_then_routing(monkeypatch):
    """Equal values do not show which path ran (the fused one is the one that never holds u_hat)."""
    layers = importlib.import_module("capsnet_triton.layers")
    calls = []
    for name in ("capsule_linear", "predict", "dynamic_routing"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    u = torch.randn(2, 9, 8)
    DigitCaps(9, 8, 10, 16)(u)
    assert calls == ["capsule_linear"]
    calls.clear()
    DigitCaps(9, 8, 10, 16, fused=False)(u)
    assert calls == ["predict", "dynamic_routing"]


@pytest.mark.parametrize("gradient", ["full", "last"])
def test_digit_caps_fused_by_default_equals_its_unfused_path(gradient):
    fused = DigitCaps(9, 8, 10, 16, gradient=gradient, bias=True).double()
    unfused = DigitCaps(9, 8, 10, 16, gradient=gradient, bias=True, fused=False).double()
    torch.nn.init.normal_(fused.bias)                  # a zero bias would look the same used or dropped
    unfused.load_state_dict(fused.state_dict())
    assert fused.fused and not unfused.fused and "fused=True" in repr(fused)
    u = torch.randn(4, 9, 8, dtype=torch.float64)
    for layer in (fused, unfused):
        layer(u).pow(2).sum().backward()
    assert torch.allclose(fused(u), unfused(u), rtol=1e-12, atol=0)
    for got, expected in zip(fused.parameters(), unfused.parameters()):
        assert got.grad is not None and expected.grad is not None
        assert torch.allclose(got.grad, expected.grad, rtol=1e-12, atol=1e-15)
