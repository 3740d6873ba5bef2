"""The PyTorch face (capsnet_triton.ops) against the float64 NumPy reference.

The torch backend runs everywhere; the triton backend runs through the interpreter here and
natively on a GPU machine (see conftest.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton import dynamic_routing, squash
from capsnet_triton.reference import (routing_backward, routing_forward, squash_backward,
                                      squash_forward)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(out, ref):
    out = out.detach().double().cpu().numpy()
    assert np.all(np.isfinite(out)), "non-finite values in the output"
    denom = np.linalg.norm(ref)
    if denom == 0:
        return float(np.linalg.norm(out))
    return float(np.linalg.norm(out - ref) / denom)


def rounded(array, dtype):
    """The array as the low-precision dtype sees it, and that value back in float64."""
    tensor = torch.tensor(array).to(dtype)
    return tensor, tensor.double().numpy()


def reference_routing(u_hat, dv, iterations, bias, agreement_grad):
    v, cache = routing_forward(u_hat, iterations, bias=bias, agreement_grad=agreement_grad)
    grads = routing_backward(dv, cache)
    du_hat, dbias = grads if bias is not None else (grads, None)
    return v, du_hat, dbias


shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 10), st.integers(1, 16))


@given(shape=shapes, iterations=st.integers(1, 4), use_bias=st.booleans(),
       agreement_grad=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       scale=st.sampled_from([1.0, 1e-3, 30.0]), seed=st.integers(0, 2**32 - 1))
def test_torch_routing_matches_reference(shape, iterations, use_bias, agreement_grad, dtype, scale,
                                         seed):
    rng = np.random.default_rng(seed)
    B, I, J, D = shape
    u_hat_t, u_hat = rounded(scale * rng.standard_normal(shape), dtype)
    dv_t, dv = rounded(rng.standard_normal((B, J, D)), dtype)
    bias_t, bias = rounded(rng.standard_normal((J, D)), dtype) if use_bias else (None, None)
    v_ref, du_ref, dbias_ref = reference_routing(u_hat, dv, iterations, bias, agreement_grad)

    u_hat_t.requires_grad_(True)
    if bias_t is not None:
        bias_t.requires_grad_(True)
    v = dynamic_routing(u_hat_t, iterations, backend="torch", bias=bias_t,
                        agreement_grad=agreement_grad)
    v.backward(dv_t)
    assert v.dtype == dtype and u_hat_t.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_error(v, v_ref) <= tol
    # Half-precision gradients are rounded once more on the way out; the bound scales with it.
    assert rel_error(u_hat_t.grad, du_ref) <= (tol if dtype not in (torch.float16, torch.bfloat16)
                                               else 2 * tol)
    if use_bias:
        assert rel_error(bias_t.grad, dbias_ref) <= 2 * tol


@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 9)),
       dim=st.integers(-3, 2), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.0, 1e-30, 1.0, 1e15]))
def test_torch_squash_matches_reference_on_any_axis(shape, dim, seed, scale):
    rng = np.random.default_rng(seed)
    s = scale * rng.standard_normal(shape)
    dv = rng.standard_normal(shape)
    s_t = torch.tensor(s, requires_grad=True)
    v = squash(s_t, dim=dim, backend="torch")
    v.backward(torch.tensor(dv))
    v_ref = np.moveaxis(squash_forward(np.moveaxis(s, dim, -1)), -1, dim)
    ds_ref = np.moveaxis(squash_backward(np.moveaxis(dv, dim, -1), np.moveaxis(s, dim, -1)), -1, dim)
    assert rel_error(v, v_ref) <= 1e-12
    assert rel_error(s_t.grad, ds_ref) <= 1e-12


def test_squash_of_zero_has_zero_gradient_in_every_backend():
    for backend in ("torch", "triton"):
        s = torch.zeros(3, 5, dtype=torch.float32, device=DEVICE, requires_grad=True)
        squash(s, backend=backend).sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s)), backend


def test_squash_float32_extremes_stay_finite_and_exact():
    largest = float(np.sqrt(np.finfo(np.float32).max)) * 0.999
    s = np.array([[largest, 0.0], [1e-30, -1e-30], [3.0e38, 3.0e38], [2e-45, 0.0]], np.float32)
    dv = np.array([[1.0, 2.0], [1.0, 0.0], [0.5, -1.0], [1.0, 1.0]], np.float32)
    s_t = torch.tensor(s, requires_grad=True)
    v = squash(s_t, backend="torch")
    v.backward(torch.tensor(dv))
    assert torch.isfinite(v).all() and torch.isfinite(s_t.grad).all()
    lengths = torch.linalg.vector_norm(v.double(), dim=-1)
    assert 0.999999 < lengths[0] <= 1 and 0.999999 < lengths[2] <= 1 + 1e-6
    # Tiny vectors: v underflows, but ds = f(n) dv + ... ~ |s| dv is representable and must be
    # computed, not flushed to zero by squaring s.
    ds_ref = squash_backward(dv.astype(np.float64), s.astype(np.float64))
    assert rel_error(s_t.grad[1], ds_ref[1]) <= 1e-5 and s_t.grad[1, 0] > 0


def test_gradcheck_float64():
    u_hat = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, b: dynamic_routing(u, 3, backend="torch", bias=b),
                                    (u_hat, bias))
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: squash(x, dim=0, backend="torch"), (s,))


def eager_routing(u_hat, iterations, agreement_grad):
    """Autograd through a plain loop: the oracle for the agreement-stopped gradient policy."""
    logits = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype)
    for t in range(iterations):
        c = torch.softmax(logits, dim=2)
        s = (c.unsqueeze(-1) * u_hat).sum(dim=1)
        n2 = (s * s).sum(-1, keepdim=True)
        v = s * n2.sqrt() / (1 + n2)
        if t < iterations - 1:
            agreeing = u_hat if agreement_grad else u_hat.detach()
            logits = logits + (agreeing * v.unsqueeze(1)).sum(-1)
    return v


@pytest.mark.parametrize("agreement_grad", [True, False])
def test_gradient_policies_match_autograd_of_an_eager_loop(agreement_grad):
    u_hat = torch.randn(2, 7, 4, 3, dtype=torch.float64, requires_grad=True)
    dv = torch.randn(2, 4, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad(eager_routing(u_hat, 3, agreement_grad), u_hat, dv)
    (got,) = torch.autograd.grad(dynamic_routing(u_hat, 3, backend="torch",
                                                 agreement_grad=agreement_grad), u_hat, dv)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_saves_only_u_hat_and_per_iteration_s(backend):
    B, I, J, D, r = 2, 50, 10, 16, 3
    u_hat = torch.randn(B, I, J, D, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = dynamic_routing(u_hat, r, backend=backend)
    assert sum(saved) <= u_hat.numel() + r * B * J * D
    v.sum().backward()
    assert torch.isfinite(u_hat.grad).all()


def test_triton_backend_agrees_with_torch_backend():
    u_hat = torch.randn(3, 37, 10, 16, dtype=torch.float32, device=DEVICE)
    bias = torch.randn(10, 16, dtype=torch.float32, device=DEVICE)
    dv = torch.randn(3, 10, 16, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        u = u_hat.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        v = dynamic_routing(u, 3, backend=backend, bias=b)
        v.backward(dv)
        results[backend] = (v.detach(), u.grad, b.grad)
    for got, expected in zip(results["triton"], results["torch"]):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_inputs_are_never_modified():
    u_hat = torch.randn(2, 9, 3, 5, requires_grad=True)
    before = u_hat.detach().clone()
    dynamic_routing(u_hat, 3, backend="torch").sum().backward()
    s = torch.randn(4, 5)
    s_before = s.clone()
    squash(s, backend="torch")
    assert torch.equal(u_hat.detach(), before) and torch.equal(s, s_before)


def test_non_contiguous_u_hat():
    base = torch.randn(5, 2, 3, 4, dtype=torch.float64)       # [I, B, J, D] in memory
    u_hat = base.permute(1, 0, 2, 3)
    u_np = u_hat.numpy().copy()
    v_ref, _ = routing_forward(u_np, 3)
    assert rel_error(dynamic_routing(u_hat, 3, backend="torch"), v_ref) <= 1e-12


def test_compile_fullgraph_traces_through_the_ops():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(0.1 * torch.randn(6, 3, 4, 5))

        def forward(self, u):
            u_hat = torch.einsum("ijdp,bip->bijd", self.weight, squash(u))
            return torch.linalg.vector_norm(dynamic_routing(u_hat, 3), dim=-1)

    head = Head()
    u = torch.randn(2, 6, 5)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    expected = head(u)
    got = compiled(u)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("call, error, words", [
    (lambda: dynamic_routing(torch.randn(2, 3, 4)), ValueError, "4 axes"),
    (lambda: dynamic_routing(torch.ones(2, 3, 4, 5, dtype=torch.int64)), TypeError, "floating"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), 0), ValueError, "iterations"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), True), ValueError, "iterations"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), backend="cuda"), ValueError, "backend"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), bias=torch.randn(4, 4)), ValueError, "bias"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), bias=torch.randn(4, 5, device="meta")),
     ValueError, "device"),
    (lambda: dynamic_routing(np.zeros((2, 3, 4, 5))), TypeError, "torch.Tensor"),
    (lambda: squash(torch.tensor(1.0)), ValueError, "scalar"),
    (lambda: squash(torch.ones(3, dtype=torch.int32)), TypeError, "floating"),
    (lambda: squash(torch.randn(3), backend="numpy"), ValueError, "backend"),
    (lambda: squash(torch.randn(3).to(torch.float8_e4m3fn)), TypeError, "float16, bfloat16"),
])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_triton_backend_on_cpu_tensors_without_the_interpreter_says_so(monkeypatch):
    # Where CUDA exists, Triton would otherwise fail on the CPU pointer with an obscure message.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (lambda: squash(torch.randn(3), backend="triton"),
                 lambda: dynamic_routing(torch.randn(2, 3, 4, 5), backend="triton")):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            call()
