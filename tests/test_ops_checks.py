"""The public ops' input checks (capsnet_triton.checks): what they refuse, with which error and
words, what they take as the reference takes it, and the interpreter flag read as Triton reads it."""

import numpy as np
import pytest
import torch

from capsnet_triton import dynamic_routing, squash


@pytest.mark.parametrize("call, error, words", [
    (lambda: dynamic_routing(torch.randn(2, 3, 4)), ValueError, "4 axes"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5, 6)), ValueError, "4 axes"),
    (lambda: dynamic_routing(torch.ones(2, 3, 4, 5, dtype=torch.int64)), TypeError, "floating"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), 0), ValueError, "iterations"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), True), ValueError, "iterations"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), backend="cuda"), ValueError, "backend"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), bias=torch.randn(4, 4)), ValueError, "bias"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), bias=torch.ones(4, 5, dtype=torch.int64)), TypeError,
     "bias must have a floating-point dtype"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), bias=torch.randn(4, 5, device="meta")),
     ValueError, "device"),
    (lambda: dynamic_routing(np.zeros((2, 3, 4, 5))), TypeError, "torch.Tensor"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), gradient=True), ValueError,
     r"gradient must be one of \('full', 'last'\)"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 5), gradient="agreement"), ValueError, "gradient"),
    (lambda: dynamic_routing(torch.randn(2, 0, 4, 5)), ValueError, "at least one input capsule"),
    (lambda: dynamic_routing(torch.randn(2, 3, 0, 5)), ValueError, "at least one input capsule"),
    (lambda: dynamic_routing(torch.randn(2, 3, 4, 0)), ValueError, "at least one input capsule"),
    (lambda: squash(torch.randn(3, 0)), ValueError, "0 dimensions"),
    (lambda: squash(torch.randn(0, 3), dim=0), ValueError, "0 dimensions"),
    (lambda: squash(torch.tensor(1.0)), ValueError, "scalar"),
    (lambda: squash(torch.ones(3, dtype=torch.int32)), TypeError, "floating"),
    (lambda: squash(torch.randn(3), backend="numpy"), ValueError, "backend"),
    (lambda: squash(torch.randn(3).to(torch.float8_e4m3fn)), TypeError, "float16, bfloat16"),
    (lambda: squash(torch.randn(2, 3, 4), dim=3), ValueError, r"dim must be an integer in \[-3, 2\]"),
    (lambda: squash(torch.randn(2, 3, 4), dim=-4), ValueError, r"dim must be an integer in \[-3, 2\]"),
    (lambda: squash(torch.randn(2, 3, 4), dim=True), ValueError, "dim must be an integer"),
])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_numpy_integers_are_iterations_and_dims_as_in_the_reference():
    u_hat = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    assert torch.equal(dynamic_routing(u_hat, np.int64(2)), dynamic_routing(u_hat, 2))
    s = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(squash(s, dim=np.int64(0)), squash(s, dim=0))


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "On", " on", "yes", "y", "Y", "t", "01", "0", "false", "off",
                                   "no", "n", "", "2"])
def test_the_interpreter_flag_is_read_as_triton_reads_it(value, monkeypatch):
    """checks.interpreting() (the launchers', bench's and the tests' one reading of it) against
    Triton's own: TRITON_INTERPRET=true runs the interpreter, and must not be taken for compiled."""
    from triton._C.libtriton import getenv_bool

    from capsnet_triton.checks import interpreting
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == getenv_bool("TRITON_INTERPRET", False)


def test_no_backend_picks_triton_for_cuda_tensors_and_the_torch_path_for_others():
    """SPEC 7's default, which a suite run without a GPU never meets through the ops: were it to
    pick the PyTorch path everywhere, every test would still pass, and on a GPU the kernels would
    never run. A stand-in answers is_cuda as a CUDA tensor does."""
    from types import SimpleNamespace

    from capsnet_triton.checks import pick_backend
    assert pick_backend(None, SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))) == "triton"
    assert pick_backend(None, torch.ones(1)) == "torch"
    assert pick_backend(None, torch.ones(1, device="meta")) == "torch"
    assert pick_backend("torch", SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))) == "torch"
