"""The PyTorch path's careful forms, which tensors off a CPU take everywhere, on ordinary inputs.

On a CPU the PyTorch path takes its one-pass forms where they are exact to rounding, and the
careful forms only for the capsules or samples that need them (zero, tiny, huge or non-finite
ones: reading which those are is cheap there). Off a CPU (a CUDA tensor with backend="torch")
that read would wait for the device, so every capsule and sample takes the careful forms, which
a suite run without a GPU would otherwise meet on extreme inputs alone.
"""

import importlib

import numpy as np
import pytest
import torch

from capsnet_triton.numerics import assert_agrees
from capsnet_triton.ops.routing import _first_s_as_the_reference
from capsnet_triton.reference import routing_forward, squash_backward, squash_forward

squash_ops = importlib.import_module("capsnet_triton.ops.squash")     # the package's `squash` is the function


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_scaled_squash_of_ordinary_capsules(dtype, monkeypatch, rng):
    """Norms from about 0.1 to 300, on both sides of the scaled forms' switch at |s| = 1."""
    monkeypatch.setattr(squash_ops, "_per_capsule", lambda x, direct, scaled, *others: scaled(x, *others))
    s = rng.standard_normal((64, 7)) * 10.0 ** rng.uniform(-1, 2, (64, 1))
    dv = rng.standard_normal((64, 7))
    s_t, dv_t = (torch.tensor(x, dtype=dtype) for x in (s, dv))
    s, dv = (x.double().numpy() for x in (s_t, dv_t))                    # what the dtype holds
    assert_agrees(squash_ops.squash_forward_torch(s_t), squash_forward(s), dtype, "v")
    assert_agrees(squash_ops.squash_backward_torch(dv_t, s_t), squash_backward(dv, s), dtype, "ds")


def test_the_first_iteration_in_the_references_form_for_every_sample(rng):
    """s^(1) as the reference forms it, and all of a sample's s NaN where its u_hat holds a NaN
    or inf (SPEC 7), the other samples unaffected."""
    u_hat = rng.standard_normal((4, 13, 3, 5))
    u_hat[1, 7, 2, 0] = np.nan
    u_hat[3, 0, 0, 4] = np.inf
    s = _first_s_as_the_reference(torch.tensor(u_hat).reshape(4, 13, 15), 3).numpy()
    clean = [0, 2]
    _, cache = routing_forward(u_hat[clean], 1)
    assert_agrees(s[clean], cache["s_all"][0], torch.float64, "s^(1)")
    assert np.isnan(s[[1, 3]]).all()
