"""The ops inside torch's machinery: what autograd saves for the backward (and keeps for none),
the custom ops' fake implementations torch.compile traces through, fullgraph compilation, and
torch.func's transforms (refused where they would be wrong, vmap where they run).

The torch backend runs everywhere; the triton backend runs through the interpreter here and
natively on a GPU machine (see conftest.py)."""

import importlib

import pytest
import torch
from kernel_checks import DEVICE, sample, saved_numel

from capsnet_triton import capsule_linear, dynamic_routing, squash


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("r", [1, 3])
def test_backward_saves_u_hat_per_iteration_s_and_the_couplings(backend, gradient, r):
    """Both paths keep u_hat, s^(1..r) and the couplings the backward reads: c^(2..r) under
    "full", c^(r) alone under "last" ([k, B, J, I] on the PyTorch path, [k, B, I, J] from the
    kernels)."""
    B, I, J, D = 2, 50, 10, 16
    u_hat = torch.randn(B, I, J, D, device=DEVICE, requires_grad=True)
    saved, v = saved_numel(lambda: dynamic_routing(u_hat, r, gradient=gradient, backend=backend))
    kept = r - 1 if gradient == "full" else min(1, r - 1)
    couplings = kept * B * J * I
    assert saved == u_hat.numel() + r * B * J * D + couplings
    v.sum().backward()
    assert torch.isfinite(u_hat.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gradient, keep", [("full", True), ("last", True), ("full", False)])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("op", ["routing", "capsule_linear"])
def test_the_ops_fake_implementations_give_what_the_backends_return(op, r, gradient, keep, backend, dtype):
    """torch.compile traces the custom ops through their fakes: each must give the shapes, dtypes
    and strides its backend really returns, the kept couplings included ([k, B, J, I] from the
    PyTorch path, [k, B, I, J] from the kernels; none for a forward no backward follows), in
    half precision too (v in u's dtype, s_all and the couplings in float32), and for u_hat laid
    out as predict returns it (a permuted view; du_hat comes back contiguous)."""
    ops = importlib.import_module(f"capsnet_triton.ops.{op}")
    forward, backward = getattr(ops, f"_{op}_forward_op"), getattr(ops, f"_{op}_backward_op")
    if op == "routing":
        inputs = (torch.randn(7, 3, 4, 6, device=DEVICE, dtype=dtype).transpose(0, 1),)   # u_hat [B, I, J, D]
    else:
        inputs = (torch.randn(3, 7, 5, device=DEVICE, dtype=dtype),
                  torch.randn(7, 4, 6, 5, device=DEVICE, dtype=dtype))                   # u, W
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(forward, (*inputs, r, None, gradient, backend, keep), test_utils=checks)
    _, s_all, couplings = forward(*inputs, r, None, gradient, backend, keep)
    if keep:
        dv = torch.randn(3, 4, 6, device=DEVICE, dtype=dtype)
        torch.library.opcheck(backward, (dv, *inputs, s_all, couplings, gradient, backend), test_utils=checks)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["routing", "capsule_linear"])
def test_a_forward_no_backward_follows_keeps_no_couplings(op, backend, monkeypatch):
    """Inference (torch.no_grad, or inputs that require no gradient) keeps no couplings: at B =
    1024 they would be 94 MB of an eighth of u_hat's size. v is the same either way, and a
    forward under autograd still keeps them. (The PyTorch path's forward is recorded, which
    inference calls without the custom op.)"""
    ops = importlib.import_module(f"capsnet_triton.ops.{op}")
    name = {"triton": f"_{op}_forward_op", "torch": f"{'_' * (op != 'routing')}{op}_forward_torch"}[backend]
    forward, kept = getattr(ops, name), []

    def recording(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        kept.append(outputs[2].shape[0])
        return outputs
    monkeypatch.setattr(ops, name, recording)
    generator = torch.Generator().manual_seed(5)
    if op == "routing":
        inputs = [torch.randn(3, 7, 4, 6, generator=generator).to(DEVICE)]
        call = lambda *x: dynamic_routing(*x, 3, backend=backend)                  # noqa: E731
    else:
        inputs = [torch.randn(3, 7, 5, generator=generator).to(DEVICE),
                  torch.randn(7, 4, 6, 5, generator=generator).to(DEVICE)]
        call = lambda *x: capsule_linear(*x, 3, backend=backend)                   # noqa: E731
    v_plain = call(*inputs)
    with torch.no_grad():
        v_no_grad = call(*[x.clone().requires_grad_() for x in inputs])
    v_grad = call(*[x.clone().requires_grad_() for x in inputs])
    assert kept == [0, 0, 2]
    assert torch.equal(v_plain, v_no_grad) and torch.equal(v_plain, v_grad.detach())


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
    (expected_grad,) = torch.autograd.grad(expected.sum(), [head.weight])
    got = compiled(u)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.allclose(head.weight.grad, expected_grad, rtol=1e-5, atol=1e-6)


def _three_ops(backend, dtype=torch.float64):
    """squash, dynamic_routing and capsule_linear as functions of one tensor each (of dtype, the
    fused layer's weight's)."""
    weight = torch.randn(5, 3, 4, 2, dtype=torch.float64, device=DEVICE).to(dtype)
    return {"squash": lambda s: squash(s, backend=backend),
            "dynamic_routing": lambda u_hat: dynamic_routing(u_hat, 2, backend=backend),
            "capsule_linear": lambda u: capsule_linear(u, weight, 2, backend=backend)}, \
        {"squash": (2, 4), "dynamic_routing": (2, 5, 3, 4), "capsule_linear": (2, 5, 2)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_mode_and_func_grad_are_refused_not_zero(backend):
    """torch drops forward tangents of a custom op whose autograd rule is reverse mode: jvp would
    give a derivative of 0. The ops refuse it, and torch.func's grad transforms, in one line, also
    through vmap's batched tensors (torch cannot unpack a dual tensor under them)."""
    import torch.autograd.forward_ad as fwAD
    ops, shapes = _three_ops(backend)
    for name, op in ops.items():
        x = torch.randn(shapes[name], dtype=torch.float64, device=DEVICE)
        rows = torch.stack([x, x + 1])
        mapped = torch.func.vmap(op)
        for transform in (lambda: torch.func.jvp(op, (x,), (torch.ones_like(x),)),
                          lambda: torch.func.jacfwd(op)(x),
                          lambda: torch.func.jvp(mapped, (rows,), (torch.ones_like(rows),))):
            with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
                transform()
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            op(fwAD.make_dual(x, torch.ones_like(x)))
        with fwAD.dual_level():                       # inside a level, a plain input is fine, batched too
            assert torch.equal(op(x), ops[name](x))
            assert torch.allclose(mapped(rows), torch.stack([op(x), op(x + 1)]), rtol=1e-12, atol=1e-15)
        for transform in (torch.func.grad, torch.func.jacrev):
            with pytest.raises(NotImplementedError, match="does not support torch.func.grad"):
                transform(lambda t: op(t).sum())(x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_derivative_is_refused_by_name(backend):
    """The ops are differentiable once: a backward through their gradient (taken with
    create_graph=True) raises an error that names the op, not torch's request for a formula."""
    ops, shapes = _three_ops(backend)
    for name, op in ops.items():
        x = torch.randn(shapes[name], dtype=torch.float64, device=DEVICE, requires_grad=True)
        grad, = torch.autograd.grad(op(x).pow(2).sum(), x, create_graph=True)
        assert torch.equal(grad, torch.autograd.grad(op(x).pow(2).sum(), x)[0])
        with pytest.raises(NotImplementedError, match=f"{name} is differentiable once"):
            torch.autograd.grad(grad.sum(), x)


def test_vmap_folds_its_slices_into_one_call_and_matches_a_loop(monkeypatch):
    """The ops' vmap rules (ops/batching.py): 3 slices are one call of the PyTorch path, where
    torch's fallback would call it 3 times (and warn); so is the backward that follows, recorded
    on the folded call."""
    ops, shapes = _three_ops("torch")
    modules = {name: importlib.import_module(f"capsnet_triton.ops.{name}")
               for name in ("squash", "routing", "capsule_linear")}
    paths = {"squash": (modules["squash"], "squash_forward_torch", "squash_backward_torch"),
             "dynamic_routing": (modules["routing"], "routing_forward_torch", "routing_backward_torch"),
             "capsule_linear": (modules["capsule_linear"], "_capsule_linear_forward_torch",
                                "_capsule_linear_backward_torch")}
    for name, op in ops.items():
        x = torch.randn((3, *shapes[name]), dtype=torch.float64)
        expected = torch.stack([op(row) for row in x])
        calls = []
        module, *functions = paths[name]
        for function in functions:
            real = getattr(module, function)
            monkeypatch.setattr(module, function, lambda *a, _real=real, _name=function, **k: calls.append(_name)
                                or _real(*a, **k))
        mapped = x.clone().requires_grad_()
        got = torch.func.vmap(op)(mapped)
        got.sum().backward()
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15), name
        assert calls == functions, (name, calls)
        # Another vmapped axis, and out_dims; and 0 slices.
        got = torch.func.vmap(op, in_dims=1, out_dims=1)(x.movedim(0, 1))
        assert torch.allclose(got, expected.movedim(0, 1), rtol=1e-12, atol=1e-15), name
        assert torch.func.vmap(op)(x[:0]).shape == (0, *expected.shape[1:]), name
    # A vmapped argument that the samples share (the bias) runs once per slice.
    u_hat, bias = torch.randn(3, 2, 5, 3, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda u, b: dynamic_routing(u, 2, bias=b))(u_hat, bias)
    expected = torch.stack([dynamic_routing(u, 2, bias=b) for u, b in zip(u_hat, bias)])
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_a_backward_after_vmap_gives_the_gradients_of_a_loop(gradient, backend):
    """vmap's batched wrappers say requires_grad=False for a tensor that requires grad: the ops
    must still keep the couplings their backward reads (r = 3), for a batched u_hat, u or W (the
    last as torch.func.stack_module_state batches an ensemble's weights)."""
    generator = torch.Generator().manual_seed(3)
    u_hat, u, weight = (torch.randn(shape, dtype=torch.float64, generator=generator).to(DEVICE)
                        for shape in ((2, 3, 5, 4, 6), (2, 3, 5, 2), (2, 5, 4, 6, 2)))
    routing = lambda x: dynamic_routing(x, 3, gradient=gradient, backend=backend)        # noqa: E731
    layer = lambda x, w: capsule_linear(x, w, 3, gradient=gradient, backend=backend)     # noqa: E731
    cases = {"u_hat": (routing, u_hat), "u": (lambda x: layer(x, weight[0]), u),
             "W": (lambda w: layer(u[0], w), weight)}
    for name, (op, batched) in cases.items():
        dv = torch.randn((2, *op(batched[0]).shape), dtype=torch.float64, generator=generator).to(DEVICE)
        mapped = batched.clone().requires_grad_()
        (torch.func.vmap(op)(mapped) * dv).sum().backward()
        looped = batched.clone().requires_grad_()
        sum((op(row) * grad).sum() for row, grad in zip(looped, dv)).backward()
        assert torch.allclose(mapped.grad, looped.grad, rtol=1e-10, atol=1e-12), name


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _FunctionPassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    """A tensor subclass, whose torch functions a plain call would run as its own."""


@pytest.mark.parametrize("op", ["squash", "dynamic_routing", "capsule_linear"])
def test_inference_on_the_torch_path_skips_the_custom_op_and_nothing_else_does(op, monkeypatch):
    """Where nothing can see the call (no backward to follow, no compile, transform, mode or
    autocast), the public functions call the PyTorch path as a function: the custom op's
    dispatch was a third of squash's time at B = 8. Everything else still goes through the op,
    with the same v."""
    module = importlib.import_module(f"capsnet_triton.ops.{op.replace('dynamic_', '')}")
    name = [n for n in vars(module) if n.endswith("_forward_op")][0]
    through_op, op_forward = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: through_op.append(1) or op_forward(*args))
    ops, shapes = _three_ops("torch")
    x = torch.randn(shapes[op], dtype=torch.float64)
    expected = ops[op](x)
    assert through_op == []
    with torch.no_grad():
        assert torch.equal(ops[op](x.clone().requires_grad_()), expected) and through_op == []
    if op == "capsule_linear":                     # the layer's weight as a module holds it
        weight = torch.nn.Parameter(torch.randn(5, 3, 4, 2, dtype=torch.float64))
        layer_v = capsule_linear(x, weight, 2, backend="torch").detach()
        through_op.clear()
        with torch.no_grad():
            assert torch.equal(capsule_linear(x, weight, 2, backend="torch"), layer_v) and through_op == []
    seen = {"backward": lambda: ops[op](x.clone().requires_grad_()).detach(),
            "dispatch mode": lambda: _with(_PassThrough(), lambda: ops[op](x)),
            "torch function mode": lambda: _with(_FunctionPassThrough(), lambda: ops[op](x)),
            "tensor subclass": lambda: ops[op](x.as_subclass(_Subclass)).as_subclass(torch.Tensor),
            "autocast": lambda: _with(torch.autocast("cpu", dtype=torch.bfloat16), lambda: ops[op](x)),
            "compile": lambda: torch.compile(ops[op], fullgraph=True, backend="eager")(x),
            "jit trace": lambda: torch.jit.trace(ops[op], (x,))(x)}
    for what, call in seen.items():
        through_op.clear()
        assert torch.equal(call(), expected) and through_op, what
    through_op.clear()
    assert torch.equal(torch.func.vmap(ops[op])(x[None])[0], expected) and through_op


def _with(context, call):
    with context:
        return call()


@pytest.mark.parametrize("case", ["float16", "empty batch", "NaN"])
@pytest.mark.parametrize("op", ["squash", "dynamic_routing", "capsule_linear"])
def test_the_plain_call_and_the_custom_op_give_the_same_v(op, case):
    """Inference calls the PyTorch path as a function, anything that watches the call (here a
    dispatch mode) gets the custom op: the two must not differ, in half precision, for an empty
    batch or a NaN (SPEC 7), to the bit."""
    dtype = torch.float16 if case == "float16" else torch.float64
    ops, shapes = _three_ops("torch", dtype)
    x = torch.randn(shapes[op], dtype=torch.float64).to(dtype)
    if case == "empty batch":
        x = x[:0]
    if case == "NaN":
        x[0].view(-1)[0] = float("nan")
    with torch.no_grad():
        plain = ops[op](x)
        with _PassThrough():
            through_op = ops[op](x)
    assert plain.dtype == through_op.dtype == dtype and plain.shape == through_op.shape
    torch.testing.assert_close(through_op, plain, rtol=0, atol=0, equal_nan=True)
    assert case != "NaN" or plain.isnan().any()


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["dynamic_routing", "capsule_linear"])
def test_a_bias_alone_requiring_grad_gets_its_gradient(op, backend, gradient, rng):
    """A frozen layer below a learned bias: the op must still keep the couplings the backward
    reads and follow the gradient policy, as when every input requires a gradient."""
    def draw(*shape):
        return sample(rng, shape, torch.float64)

    if op == "dynamic_routing":
        inputs, call = [draw(2, 5, 3, 4)], dynamic_routing
    else:
        inputs, call = [draw(2, 5, 2), draw(5, 3, 4, 2)], capsule_linear
    bias, dv = 0.1 * draw(3, 4), draw(2, 3, 4)
    grads = []
    for tensors in (inputs, [x.clone().requires_grad_() for x in inputs]):
        learned = bias.clone().requires_grad_()
        (call(*tensors, 3, bias=learned, gradient=gradient, backend=backend) * dv).sum().backward()
        grads.append(learned.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_squash_over_an_inner_axis_traces_with_the_strides_it_runs_with(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    s = torch.randn(4, 3, 5, device=DEVICE)
    real = squash(s, dim=1, backend=backend)
    with FakeTensorMode() as mode:
        fake = squash(mode.from_tensor(s), dim=1, backend=backend)
    assert fake.shape == real.shape and fake.stride() == real.stride()
